import Foundation
import Gateway
import NIOHTTP1
import Testing

/// Several gateway instances sharing a real Postgres and a real Redis.
final class Cluster: @unchecked Sendable {  // set up once per test, then read-only
    let postgres: PostgresServer
    let redis: RedisServer
    var gateways: [TestGateway] = []

    static func start(instances: Int, redisRunning: Bool = true, configure: @escaping @Sendable (inout GatewayConfig) -> Void = { _ in }) async throws -> Cluster {
        let postgres = try await PostgresServer.start()
        let redis: RedisServer
        do { redis = redisRunning ? try await RedisServer.start() : try RedisServer.reserve() } catch { await postgres.stop(); throw error }
        let cluster = Cluster(postgres: postgres, redis: redis, configure: configure)
        do {
            for i in 0..<instances { cluster.gateways.append(try await cluster.startInstance(i)) }
        } catch {
            await cluster.stop()
            throw error
        }
        return cluster
    }

    private let configure: @Sendable (inout GatewayConfig) -> Void

    private init(postgres: PostgresServer, redis: RedisServer, configure: @escaping @Sendable (inout GatewayConfig) -> Void) {
        self.postgres = postgres
        self.redis = redis
        self.configure = configure
    }

    func startInstance(_ i: Int) async throws -> TestGateway {
        try await TestGateway.start { config in
            config.databaseURL = self.postgres.url
            config.redisURL = self.redis.url
            config.instanceId = "gw-\(i)"
            self.configure(&config)
        }
    }

    var ports: [Int] { gateways.map(\.port) }

    func token(_ sub: String = "svc", roles: [String] = ["service"]) async throws -> String {
        try await gateways[0].token(sub, roles: roles)
    }

    func stop() async {
        for gateway in gateways { await gateway.stop() }
        await redis.stop()
        await postgres.stop()
    }
}

/// Runs `body` with a fresh cluster and stops every server of it afterwards, whether `body` succeeded or threw.
func withCluster<T>(instances: Int, redisRunning: Bool = true, configure: @escaping @Sendable (inout GatewayConfig) -> Void = { _ in },
                   _ body: (Cluster) async throws -> T) async throws -> T {
    try await withStarted({ try await Cluster.start(instances: instances, redisRunning: redisRunning, configure: configure) }, stop: { await $0.stop() }, body)
}

@Suite(.serialized) struct ClusterTests {
    static func seqs(_ received: [Received], channel: String) -> [Int64] {
        received.filter { $0.channel == channel }.map(\.seq)
    }

    /// The position before the first message (`0.<hash>`), from an empty-page history answer.
    static func zeroCursor(port: Int, channel: String, token: String) async throws -> String {
        try await HTTPTestClient.zeroCursor(port: port, channel: channel, token: token)
    }

    /// Publishes `count` messages to `channel` through REST on the given ports, `workers` at a time; returns
    /// the acked messages.
    static func publish(ports: [Int], channel: String, count: Int, workers: Int, token: String, tag: String) async throws -> [Received] {
        try await withThrowingTaskGroup(of: [Received].self) { group in
            for w in 0..<workers {
                group.addTask {
                    var acked: [Received] = []
                    var i = w
                    while i < count {
                        let port = ports[i % ports.count]
                        let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["tag": tag, "i": i], token: token)
                        guard response.status == 201, let message = response.json["message"] as? [String: Any] else {
                            throw ServiceError(description: "publish answered \(response.status): \(response.body)")
                        }
                        acked.append(Received(message))
                        i += workers
                    }
                    return acked
                }
            }
            var all: [Received] = []
            for try await part in group { all += part }
            return all
        }
    }

    @Test func threeInstancesDeliverTheSameGaplessOrderEverywhere() async throws {
        try await withCluster(instances: 3) { cluster in
            let token = try await cluster.token()
            let main = "topic:cluster-main"
            let side = (0..<20).map { "topic:side-\($0)" }
            let mainCount = 5000
            let sideCount = 50

            // On every instance: one WebSocket subscribed to all 21 channels, one SSE stream and one long-poller
            // on the main channel.
            var sockets: [WSTestClient] = []
            var streams: [SSETestClient] = []
            for port in cluster.ports {
                let ws = try await WSTestClient.connect(port: port, token: token)
                for (i, channel) in ([main] + side).enumerated() {
                    try await ws.send(["type": "subscribe", "id": "\(i)", "channel": channel])
                    #expect(try await ws.reply("subscribed")["type"] as? String == "subscribed")
                }
                sockets.append(ws)
                let sse = try await SSETestClient.connect(port: port, channel: main, token: token)
                _ = try await sse.guardedNextEvent()
                streams.append(sse)
            }
            let ports = cluster.ports
            let totalPerSocket = mainCount + side.count * sideCount
            try await withThrowingTaskGroup(of: (String, [Received]).self) { group in
                for (i, ws) in sockets.enumerated() { group.addTask { ("ws\(i)", try await ws.messages(totalPerSocket, timeout: 240)) } }
                for (i, sse) in streams.enumerated() { group.addTask { ("sse\(i)", try await sse.messages(mainCount, timeout: 240)) } }
                for (i, port) in ports.enumerated() {
                    group.addTask { ("poll\(i)", try await HTTPTestClient.longPoll(port: port, channel: main, token: token, count: mainCount)) }
                }
                group.addTask { ("acked-main", try await Self.publish(ports: ports, channel: main, count: mainCount, workers: 24, token: token, tag: "main")) }
                for channel in side {
                    group.addTask { ("acked-\(channel)", try await Self.publish(ports: ports, channel: channel, count: sideCount, workers: 2, token: token, tag: channel)) }
                }
                var results: [String: [Received]] = [:]
                for try await (name, received) in group { results[name] = received }

                // Acks: each channel got 1…N, once each.
                #expect(results["acked-main"]!.map(\.seq).sorted() == Array(1...Int64(mainCount)))
                var reference: [String: [Int64: String]] = [:]
                reference[main] = Dictionary(uniqueKeysWithValues: results["acked-main"]!.map { ($0.seq, $0.id) })
                for channel in side {
                    let acked = results["acked-\(channel)"]!
                    #expect(acked.map(\.seq).sorted() == Array(1...Int64(sideCount)))
                    reference[channel] = Dictionary(uniqueKeysWithValues: acked.map { ($0.seq, $0.id) })
                }
                // Every receiver: every channel in seq order, no gap, no duplicate, the same ids as acked.
                for (name, received) in results where !name.hasPrefix("acked") {
                    let channels = name.hasPrefix("ws") ? [main] + side : [main]
                    for channel in channels {
                        let got = received.filter { $0.channel == channel }
                        let expected = Int64(channel == main ? mainCount : sideCount)
                        #expect(got.map(\.seq) == Array(1...expected), "\(name) on \(channel)")
                        #expect(got.allSatisfy { reference[channel]?[$0.seq] == $0.id }, "\(name) on \(channel): ids differ from the acks")
                    }
                }
            }
            for ws in sockets { await ws.close() }
            for sse in streams { await sse.close() }
        }
    }

    @Test func requestIdsAreForgottenAfterTheirWindowInPostgres() async throws {
        try await withCluster(instances: 2, configure: { $0.idempotencyWindow = .seconds(1) }) { cluster in
            try await IdempotencyWindow.check(ports: cluster.ports, token: try await cluster.token())
        }
    }

    @Test func resumeOnAnotherInstanceAndIdempotencyAcrossInstances() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            let channel = "topic:roam"

            let ws = try await WSTestClient.connect(port: a, token: token)
            try await ws.send(["type": "subscribe", "id": "1", "channel": channel])
            _ = try await ws.reply("subscribed")
            _ = try await Self.publish(ports: [a, b], channel: channel, count: 10, workers: 2, token: token, tag: "first")
            let first = try await ws.messages(10)
            #expect(first.map(\.seq) == Array(1...10))
            await ws.close()

            _ = try await Self.publish(ports: [a, b], channel: channel, count: 40, workers: 4, token: token, tag: "missed")
            let resumed = try await WSTestClient.connect(port: b, token: token)
            try await resumed.send(["type": "subscribe", "id": "2", "channel": channel, "since": first.last!.cursor])
            _ = try await resumed.reply("subscribed")
            #expect(try await resumed.messages(40).map(\.seq) == Array(11...50))
            _ = try await Self.publish(ports: [a], channel: channel, count: 5, workers: 1, token: token, tag: "live")
            #expect(try await resumed.messages(5).map(\.seq) == Array(51...55))
            await resumed.close()

            // The same key on A and on B: one message.
            let onA = try await HTTPTestClient.publish(port: a, channel: channel, body: ["x": 1], token: token, idempotencyKey: "once")
            let onB = try await HTTPTestClient.publish(port: b, channel: channel, body: ["x": 1], token: token, idempotencyKey: "once")
            #expect(onA.status == 201 && onB.status == 200)
            #expect(onB.headers.first(name: "Idempotent-Replayed") == "true")
            // Both at once, on both instances.
            async let racedA = HTTPTestClient.publish(port: a, channel: channel, body: ["y": 1], token: token, idempotencyKey: "race")
            async let racedB = HTTPTestClient.publish(port: b, channel: channel, body: ["y": 1], token: token, idempotencyKey: "race")
            let raced = try await [racedA, racedB]
            #expect(Set(raced.map(\.status)) == [200, 201])
            let history = try await HTTPTestClient.request(.GET, port: a, "/v1/channels/\(channel)/messages?limit=1000", token: token)
            #expect((history.json["messages"] as! [[String: Any]]).count == 57)
        }
    }
}

/// Migrations are applied once even when several instances start at the same moment.
struct MigrationTests {
    @Test func instancesStartingTogetherApplyEachMigrationOnce() async throws {
        let postgres = try await PostgresServer.start()
        do {
            let gateways = try await withThrowingTaskGroup(of: TestGateway.self) { group in
                for i in 0..<4 {
                    group.addTask {
                        try await TestGateway.start { config in
                            config.databaseURL = postgres.url
                            config.singleInstance = true  // the test's own choice: no Redis, only migrations matter
                            config.instanceId = "boot-\(i)"
                        }
                    }
                }
                var started: [TestGateway] = []
                for try await gateway in group { started.append(gateway) }
                return started
            }
            #expect(gateways.count == 4)
            let (status, output) = try await TestServices.run(postgres.binDir + "/psql", [
                "-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-At",
                "-c", "SELECT count(*), count(DISTINCT version) FROM schema_migrations",
            ])
            #expect(status == 0)
            // Every migration applied exactly once: as many rows as distinct versions (and at least one).
            let counts = output.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "|").compactMap { Int($0) }
            #expect(counts.count == 2 && counts[0] == counts[1] && counts[0] >= 2, "\(output)")
            // And they work: a publish on one is read on another.
            let token = try await gateways[0].token()
            #expect(try await HTTPTestClient.publish(port: gateways[0].port, channel: "topic:boot", body: ["ok": true], token: token).status == 201)
            let read = try await HTTPTestClient.request(.GET, port: gateways[3].port, "/v1/channels/topic:boot/messages", token: token)
            #expect((read.json["messages"] as? [Any])?.count == 1)
            for gateway in gateways { await gateway.stop() }
            await postgres.stop()
        } catch {
            await postgres.stop()
            throw error
        }
    }
}
