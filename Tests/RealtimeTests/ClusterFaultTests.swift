import Foundation
import Testing

/// Redis and Postgres going away, and an instance killed, while messages flow.
@Suite(.serialized) struct ClusterFaultTests {
    /// When acks came, readable while the publisher runs (to check that a fault overlapped the traffic).
    final class AckTimes: @unchecked Sendable {  // guarded by `lock`
        private let lock = NSLock()
        private var times: [Date] = []
        func add() { lock.lock(); times.append(Date()); lock.unlock() }
        func count(between start: Date, and end: Date) -> Int {
            lock.lock(); defer { lock.unlock() }
            return times.filter { $0 >= start && $0 <= end }.count
        }
    }

    /// Publishes `count` messages one after another (alternating instances), `pause` between them; returns acks.
    static func steadyPublish(ports: [Int], channel: String, count: Int, token: String, pause: Duration = .milliseconds(10),
                              times: AckTimes? = nil) async throws -> [Received] {
        var acked: [Received] = []
        for i in 0..<count {
            let response = try await HTTPTestClient.publish(port: ports[i % ports.count], channel: channel, body: ["i": i], token: token)
            guard response.status == 201, let message = response.json["message"] as? [String: Any] else {
                throw ServiceError(description: "publish \(i) answered \(response.status): \(response.body)")
            }
            acked.append(Received(message))
            times?.add()
            try await Task.sleep(for: pause)
        }
        return acked
    }

    /// A fault's start and end, set by the task that causes it.
    final class FaultWindow: @unchecked Sendable {  // guarded by `lock`
        private let lock = NSLock()
        private var start: Date?
        private var end: Date?
        func began() { lock.lock(); start = Date(); lock.unlock() }
        func ended() { lock.lock(); end = Date(); lock.unlock() }
        var interval: (Date, Date)? { lock.lock(); defer { lock.unlock() }; return start.flatMap { s in end.map { (s, $0) } } }
    }

    static func subscribers(_ cluster: Cluster, channel: String, token: String) async throws -> [WSTestClient] {
        var out: [WSTestClient] = []
        for port in cluster.ports {
            let ws = try await WSTestClient.connect(port: port, token: token)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            out.append(ws)
        }
        return out
    }

    @Test func redisKilledAndRestartedWhilePublishing() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let channel = "topic:redis-restart"
            let count = 300
            let sockets = try await Self.subscribers(cluster, channel: channel, token: token)
            let ports = cluster.ports
            let redis = cluster.redis
            let times = AckTimes()
            let window = FaultWindow()
            try await withThrowingTaskGroup(of: [Received].self) { group in
                for ws in sockets { group.addTask { try await ws.messages(count, timeout: 120) } }
                group.addTask { try await Self.steadyPublish(ports: ports, channel: channel, count: count, token: token, times: times) }
                group.addTask {
                    try await Task.sleep(for: .milliseconds(700))
                    await redis.kill9()
                    window.began()
                    try await Task.sleep(for: .milliseconds(300))
                    try await redis.startProcess()
                    window.ended()
                    return []
                }
                for try await received in group where !received.isEmpty {
                    #expect(received.map(\.seq) == Array(1...Int64(count)))
                }
            }
            // The fault overlapped the traffic: messages were acked while Redis was gone.
            let during = window.interval.map { times.count(between: $0.0, and: $0.1) } ?? 0
            #expect(during > 0, "no publish was acked while Redis was down")
            // Live delivery through Redis is back without any client action.
            for port in ports {
                try await eventually("redis subscriptions back") {
                    try await HTTPTestClient.request(.GET, port: port, "/readyz").status == 200
                }
            }
            // Each instance's bus went down once (the kill) and came up twice (the start, the reconnect).
            for gateway in cluster.gateways {
                #expect(try await gateway.metric("gateway_redis_disconnects_total") == 1)
                #expect(try await gateway.metric("gateway_redis_connects_total") == 2)
                #expect(try await gateway.metric("gateway_redis_up") == 1)
            }
            _ = try await Self.steadyPublish(ports: [ports[0]], channel: channel, count: 3, token: token)
            for ws in sockets { #expect(try await ws.messages(3).map(\.seq) == [301, 302, 303]) }
            for ws in sockets { await ws.close() }
        }
    }

    /// Redis drops the connections instances publish on (not the subscribers'): PUBLISHes in flight are lost
    /// without any subscriber seeing Redis go down. The publishing instance tells the others to read the
    /// store when it reconnects, so the last messages arrive even though nothing is published after them.
    @Test func lostPublishesAreFoundWithoutALaterMessage() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let channel = "topic:lost-publish"
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            let ws = try await WSTestClient.connect(port: b, token: token)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            let redisPort = cluster.redis.port
            let count = 60
            let killer = Task { () -> Int in
                var killed = 0
                for _ in 0..<20 {
                    // CLIENT KILL TYPE normal answers how many connections it closed.
                    if let (_, output) = try? await TestServices.run("/usr/bin/redis-cli", ["-p", String(redisPort), "CLIENT", "KILL", "TYPE", "normal"]) {
                        killed += Int(output.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ").last ?? "") ?? 0
                    }
                    try await Task.sleep(for: .milliseconds(15))
                }
                return killed
            }
            let acked = try await Self.steadyPublish(ports: [a], channel: channel, count: count, token: token, pause: .milliseconds(5))
            let killed = try await killer.value
            #expect(killed > 0, "CLIENT KILL never closed a publishing connection")
            #expect(acked.map(\.seq) == Array(1...Int64(count)))
            #expect(try await ws.messages(count, timeout: 60).map(\.seq) == Array(1...Int64(count)))
            await ws.close()
        }
    }

    @Test func redisDownForFiveSecondsFallsBackToTheStore() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let channel = "topic:redis-down"
            let count = 400
            let sockets = try await Self.subscribers(cluster, channel: channel, token: token)
            let sse = try await SSETestClient.connect(port: cluster.ports[1], channel: channel, token: token)
            _ = try await sse.guardedNextEvent()
            let ports = cluster.ports
            let redis = cluster.redis
            let times = AckTimes()
            let window = FaultWindow()
            try await withThrowingTaskGroup(of: [Received].self) { group in
                for ws in sockets { group.addTask { try await ws.messages(count, timeout: 120) } }
                group.addTask { try await sse.messages(count, timeout: 120) }
                group.addTask { try await Self.steadyPublish(ports: ports, channel: channel, count: count, token: token, pause: .milliseconds(20), times: times) }
                group.addTask {
                    try await Task.sleep(for: .milliseconds(500))
                    await redis.kill9()
                    window.began()
                    try await eventually("readyz names redis") {
                        let ready = try await HTTPTestClient.request(.GET, port: ports[0], "/readyz")
                        return ready.status == 503 && ready.json["redis"] as? String == "failed" && ready.json["store"] as? String == "ok"
                    }
                    try await Task.sleep(for: .seconds(5))
                    window.ended()
                    try await redis.startProcess()
                    return []
                }
                var receivers = 0
                for try await received in group where !received.isEmpty {
                    receivers += 1
                    #expect(received.map(\.seq) == Array(1...Int64(count)))
                }
                #expect(receivers == 4)  // three subscribers and the publisher's acks
            }
            let during = window.interval.map { times.count(between: $0.0, and: $0.1) } ?? 0
            #expect(during > 50, "only \(during) publishes were acked while Redis was down")
            for ws in sockets { await ws.close() }
            await sse.close()
        }
    }

    @Test func postgresStoppedGives503AndNothingAckedIsLost() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let channel = "topic:pg-down"
            let port = cluster.ports[0]
            var acked = try await ClusterFaultTests.steadyPublish(ports: cluster.ports, channel: channel, count: 20, token: token, pause: .zero)

            await cluster.postgres.stopProcess()
            let refused = try await HTTPTestClient.publish(port: port, channel: channel, body: ["during": "outage"], token: token)
            #expect(refused.status == 503)
            #expect(refused.json["code"] as? String == "STORE_UNAVAILABLE")
            let read = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token)
            #expect(read.status == 503)
            #expect((try await HTTPTestClient.request(.GET, port: port, "/readyz")).json["store"] as? String == "failed")

            try await cluster.postgres.startProcess()
            // The same instance recovers by itself.
            var recovered = false
            for _ in 0..<300 where !recovered {
                let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["after": "outage"], token: token)
                if response.status == 201, let message = response.json["message"] as? [String: Any] {
                    acked.append(Received(message))
                    recovered = true
                } else {
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
            #expect(recovered)
            let history = try await HTTPTestClient.request(.GET, port: cluster.ports[1], "/v1/channels/\(channel)/messages?limit=1000", token: token)
            let stored = (history.json["messages"] as! [[String: Any]]).map(Received.init)
            #expect(stored.map(\.seq) == Array(1...Int64(stored.count)))
            #expect(Set(acked.map(\.id)).isSubset(of: Set(stored.map(\.id))))
            #expect(!stored.contains { $0.json.contains("outage\"}") && $0.json.contains("during") })
        }
    }

    @Test func instanceKilledMidStreamClientsResumeElsewhere() async throws {
        try await withCluster(instances: 1) { cluster in
            let token = try await cluster.token()
            let channel = "topic:kill9"
            // A separate gateway process, so that it can be killed -9.
            try await withStarted({
                try await GatewayProcess.start(environment: [
                    "DATABASE_URL": cluster.postgres.url, "REDIS_URL": cluster.redis.url, "GATEWAY_INSTANCE_ID": "victim",
                ])
            }, stop: { await $0.kill9() }) { victim in
                let victimPort = victim.port

                let ws = try await WSTestClient.connect(port: victimPort, token: token)
                try await ws.send(["type": "subscribe", "id": "1", "channel": channel])
                _ = try await ws.reply("subscribed")
                let sse = try await SSETestClient.connect(port: victimPort, channel: channel, token: token)
                _ = try await sse.guardedNextEvent()
                let survivor = cluster.ports[0]
                let total = 300
                let publishing = Task { try await ClusterFaultTests.steadyPublish(ports: [survivor], channel: channel, count: total, token: token, pause: .milliseconds(5)) }

                let wsBefore = try await ws.messages(50)
                let sseBefore = try await sse.messages(50)
                await victim.kill9()
                // Whatever else arrived before the socket died counts too.
                var wsSeen = wsBefore
                while let more = try? await ws.messages(1, timeout: 5), let m = more.first { wsSeen.append(m) }
                var sseSeen = sseBefore
                while let more = try? await sse.messages(1, timeout: 5), let m = more.first { sseSeen.append(m) }

                let ws2 = try await WSTestClient.connect(port: survivor, token: token)
                try await ws2.send(["type": "subscribe", "id": "2", "channel": channel, "since": wsSeen.last!.cursor])
                _ = try await ws2.reply("subscribed")
                let sse2 = try await SSETestClient.connect(port: survivor, channel: channel, token: token, lastEventID: sseSeen.last!.cursor)
                wsSeen += try await ws2.messages(total - wsSeen.count, timeout: 120)
                sseSeen += try await sse2.messages(total - sseSeen.count, timeout: 120)
                _ = try await publishing.value
                #expect(wsSeen.map(\.seq) == Array(1...Int64(total)))
                #expect(sseSeen.map(\.seq) == Array(1...Int64(total)))
                await ws2.close()
                await sse2.close()
            }
        }
    }
}
