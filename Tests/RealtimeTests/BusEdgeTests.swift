import Fanout
import Foundation
import Gateway
import Testing

/// The edges of Redis's life with real Postgres and Redis: down when the instances start, stalled with its
/// connections open (SIGSTOP), and a message the bus loses silently in a quiet channel. In each, every acked
/// message reaches a subscriber on another instance, and the delivery lag is printed (not asserted).
@Suite(.serialized) struct BusEdgeTests {
    /// Publishes `count` messages on `port`, `pause` apart; returns each ack with the time it came.
    static func publishTimed(port: Int, channel: String, from first: Int, count: Int, token: String,
                             pause: Duration = .milliseconds(20)) async throws -> [Int64: Date] {
        var acked: [Int64: Date] = [:]
        for i in first..<(first + count) {
            let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i], token: token)
            guard response.status == 201, let message = response.json["message"] as? [String: Any] else {
                throw ServiceError(description: "publish \(i) answered \(response.status): \(response.body)")
            }
            acked[Received(message).seq] = Date()
            try await Task.sleep(for: pause)
        }
        return acked
    }

    /// Reads `count` messages one at a time, with the time each arrived.
    static func receiveTimed(_ ws: WSTestClient, count: Int, timeout: Double = 30) async throws -> [(seq: Int64, at: Date)] {
        var out: [(Int64, Date)] = []
        for _ in 0..<count {
            let message = try await ws.messages(1, timeout: timeout)
            guard let seq = message.first?.seq else { throw TimedOut(what: "message \(out.count + 1) of \(count)") }
            out.append((seq, Date()))
        }
        return out
    }

    /// Worst and median of arrival − ack, in milliseconds (an arrival before its ack counts as 0).
    static func lag(_ received: [(seq: Int64, at: Date)], acked: [Int64: Date]) -> (median: Int, max: Int) {
        let lags = received.compactMap { r in acked[r.seq].map { max(0, Int(r.at.timeIntervalSince($0) * 1000)) } }.sorted()
        guard !lags.isEmpty else { return (0, 0) }
        return (lags[lags.count / 2], lags.last!)
    }

    /// Publishes `count` messages on `port` while `ws` receives them; expects seqs from+1…from+count, returns the lag.
    static func publishAndReceive(_ ws: WSTestClient, port: Int, channel: String, from: Int, count: Int, token: String) async throws -> (median: Int, max: Int) {
        async let receiving = receiveTimed(ws, count: count)
        let acked = try await publishTimed(port: port, channel: channel, from: from, count: count, token: token)
        let received = try await receiving
        #expect(received.map(\.seq) == Array(Int64(from + 1)...Int64(from + count)))
        return lag(received, acked: acked)
    }

    static func subscribe(port: Int, channel: String, token: String) async throws -> WSTestClient {
        let ws = try await WSTestClient.connect(port: port, token: token)
        try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
        _ = try await ws.reply("subscribed")
        return ws
    }

    static func busState(_ gateway: TestGateway, _ channel: String) async -> BusSubscriptionStateMachine.State? {
        await gateway.server.app.hub.busStates()[channel]
    }

    @Test func redisDownWhenInstancesStartDeliversThroughTheStoreThenThroughRedis() async throws {
        try await withCluster(instances: 2, redisRunning: false) { cluster in
            let token = try await cluster.token()
            let channel = "topic:redis-down-at-start"
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            // The instance serves, and says what is down.
            let ready = try await HTTPTestClient.request(.GET, port: b, "/readyz")
            #expect(ready.status == 503)
            #expect(ready.json["redis"] as? String == "failed")
            #expect(ready.json["store"] as? String == "ok")

            let ws = try await Self.subscribe(port: b, channel: channel, token: token)
            #expect(await Self.busState(cluster.gateways[1], channel) == .storePolling(subscribers: 1))
            // The metrics say so: polling, the bus not up, never connected.
            for gateway in cluster.gateways {
                #expect(try await gateway.metric("gateway_fanout_polling") == 1)
                #expect(try await gateway.metric("gateway_redis_up") == 0)
                #expect(try await gateway.metric("gateway_redis_connects_total") == 0)
            }
            let down = try await Self.publishAndReceive(ws, port: a, channel: channel, from: 0, count: 20, token: token)
            print("redis down at start: 20 messages from A to B through the store, lag median \(down.median) ms, max \(down.max) ms")

            try await cluster.redis.startProcess()
            try await eventually("both instances ready once Redis answers") {
                for port in [a, b] where try await HTTPTestClient.request(.GET, port: port, "/readyz").status != 200 { return false }
                return true
            }
            try await eventually("B's channel live on the bus") { await Self.busState(cluster.gateways[1], channel) == .live(subscribers: 1) }
            for gateway in cluster.gateways {
                #expect(try await gateway.metric("gateway_fanout_polling") == 0)
                #expect(try await gateway.metric("gateway_redis_up") == 1)
                #expect(try await gateway.metric("gateway_redis_connects_total") == 1)
            }
            let up = try await Self.publishAndReceive(ws, port: a, channel: channel, from: 20, count: 20, token: token)
            print("redis down at start, then up: 20 more through Redis, lag median \(up.median) ms, max \(up.max) ms")
            await ws.close()
        }
    }

    /// What a reader task has received so far, readable from the test while it runs.
    final class Collected: @unchecked Sendable {  // guarded by `lock`
        private let lock = NSLock()
        private var items: [(seq: Int64, at: Date)] = []
        func append(_ seq: Int64) { lock.lock(); items.append((seq, Date())); lock.unlock() }
        var all: [(seq: Int64, at: Date)] { lock.lock(); defer { lock.unlock() }; return items }
    }

    static func collect(_ ws: WSTestClient, count: Int, into collected: Collected) async throws {
        for _ in 0..<count {
            guard let seq = try await ws.messages(1, timeout: 60).first?.seq else { throw TimedOut(what: "message") }
            collected.append(seq)
        }
    }

    @Test func redisStalledMidStreamIsNoticedAndTheStoreServesUntilItAnswers() async throws {
        try await withCluster(instances: 2) { cluster in
            let token = try await cluster.token()
            let channel = "topic:redis-stalled"
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            let ws = try await Self.subscribe(port: b, channel: channel, token: token)
            let local = try await Self.subscribe(port: a, channel: channel, token: token)
            try await eventually("B's channel live on the bus") { await Self.busState(cluster.gateways[1], channel) == .live(subscribers: 1) }

            let onB = Collected()
            let reader = Task { try await Self.collect(ws, count: 190, into: onB) }
            async let receivingLocal = local.messages(190, timeout: 90)
            var acked = try await Self.publishTimed(port: a, channel: channel, from: 0, count: 20, token: token)
            cluster.redis.signal(SIGSTOP)
            let stalledAt = Date()
            do {
                let during = try await Self.publishTimed(port: a, channel: channel, from: 20, count: 150, token: token)
                acked.merge(during) { $1 }
                // While Redis is still stopped: B noticed (readiness names Redis, the channel polls the store) and
                // everything acked has reached B.
                try await eventually("B's readiness names the stalled Redis", timeout: 30) {
                    let ready = try await HTTPTestClient.request(.GET, port: b, "/readyz")
                    return ready.status == 503 && ready.json["redis"] as? String == "failed"
                }
                #expect(await Self.busState(cluster.gateways[1], channel) == .storePolling(subscribers: 1))
                try await eventually("B got every message acked during the stall, Redis still stopped", timeout: 30) { onB.all.count >= 170 }
            } catch {
                cluster.redis.signal(SIGCONT)
                throw error
            }
            let stallEnd = Date()
            cluster.redis.signal(SIGCONT)
            try await eventually("B ready again after SIGCONT", timeout: 30) {
                try await HTTPTestClient.request(.GET, port: b, "/readyz").status == 200
            }
            try await eventually("B's channel live on the bus again", timeout: 30) {
                await Self.busState(cluster.gateways[1], channel) == .live(subscribers: 1)
            }
            let after = try await Self.publishTimed(port: a, channel: channel, from: 170, count: 20, token: token)
            acked.merge(after) { $1 }
            try await reader.value
            let received = onB.all
            #expect(received.map(\.seq) == Array(1...190))
            #expect(try await receivingLocal.map(\.seq) == Array(1...190))
            let stalled = received.filter { $0.seq > 20 && $0.seq <= 170 }
            let lag = Self.lag(stalled, acked: acked)
            let firstDuring = stalled.first.map { Int($0.at.timeIntervalSince(stalledAt) * 1000) } ?? -1
            print("redis stalled (SIGSTOP for \(Int(stallEnd.timeIntervalSince(stalledAt) * 1000)) ms): 150 messages acked meanwhile reached B before SIGCONT, lag median \(lag.median) ms, max \(lag.max) ms; first one \(firstDuring) ms after the stall began")
            let afterLag = Self.lag(received.filter { $0.seq > 170 }, acked: acked)
            print("redis resumed (SIGCONT): 20 more through Redis, lag median \(afterLag.median) ms, max \(afterLag.max) ms")
            let counters = cluster.gateways[1].server.app.redis?.counterValues
            #expect((counters?.stalls ?? 0) >= 1)
            await ws.close()
            await local.close()
        }
    }

    @Test func lastMessageLostByTheBusInAQuietChannelArrivesByTheReconcile() async throws {
        try await withCluster(instances: 2, configure: { $0.reconcileInterval = .seconds(1) }) { cluster in
            let token = try await cluster.token()
            let channel = "topic:lost-last"
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            let ws = try await Self.subscribe(port: b, channel: channel, token: token)
            try await eventually("B's channel live on the bus") { await Self.busState(cluster.gateways[1], channel) == .live(subscribers: 1) }
            async let first = ws.messages(3, timeout: 30)
            _ = try await Self.publishTimed(port: a, channel: channel, from: 0, count: 3, token: token)
            #expect(try await first.map(\.seq) == [1, 2, 3])

            // Redis loses the next PUBLISH and nobody notices; nothing is published after it.
            cluster.gateways[0].server.app.redis?.testLoseNextPublishes(1)
            let repairsBefore = try await cluster.gateways[1].metric("gateway_reconcile_repairs_total")
            async let last = Self.receiveTimed(ws, count: 1, timeout: 20)
            let acked = try await Self.publishTimed(port: a, channel: channel, from: 3, count: 1, token: token, pause: .zero)
            let received = try await last
            #expect(received.map(\.seq) == [4])
            // Exactly one repair: the one that found 4 (the counter moves just after the delivery, so wait for
            // it), and none after it in the next two reconciles.
            try await eventually("the repair counted") { try await cluster.gateways[1].metric("gateway_reconcile_repairs_total") == repairsBefore + 1 }
            try await Task.sleep(for: .milliseconds(2_500))
            #expect(try await cluster.gateways[1].metric("gateway_reconcile_repairs_total") == repairsBefore + 1)
            print("lost last message: reached B \(Self.lag(received, acked: acked).max) ms after its ack (reconcile every 1 s)")
            await ws.close()
        }
    }
}
