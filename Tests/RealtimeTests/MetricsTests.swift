import Foundation
import Gateway
import Testing

/// `/metrics` (swift-metrics through swift-prometheus): after a scripted workload on two instances sharing a real
/// Postgres and a real Redis, every counter, gauge and histogram count the workload touches has moved by
/// exactly what it did — on the instance where it happened, and not on the other one.
@Suite(.serialized) struct MetricsTests {
    /// Every sample of `/metrics`, by its series (`name{labels}` without the instance label).
    static func samples(port: Int) async throws -> [String: Double] {
        let text = try await HTTPTestClient.request(.GET, port: port, "/metrics").body
        var out: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            // `instance="gw-0",` or `{instance="gw-0"}` removed: the series of the test's tables below.
            let series = String(line[..<space])
                .replacingOccurrences(of: #"instance="[^"]*",?"#, with: "", options: .regularExpression)
                .replacingOccurrences(of: "{}", with: "")
            out[series] = value
        }
        return out
    }

    /// What moved between two scrapes (series absent before count from 0).
    static func moved(_ before: [String: Double], _ after: [String: Double]) -> [String: Double] {
        var out: [String: Double] = [:]
        for (series, value) in after where value != before[series, default: 0] { out[series] = value - before[series, default: 0] }
        return out
    }

    @Test func countersAndHistogramsMoveByExactlyTheWorkload() async throws {
        try await withCluster(instances: 2, configure: { config in
            config.reconcileInterval = .seconds(3600)  // only the bus and gap repair deliver here
            config.publishBurst = 2
            config.publishRate = 0.001
        }) { cluster in
            let (a, b) = (cluster.gateways[0], cluster.gateways[1])
            let channel = "topic:metered"
            let service = try await cluster.token()
            let reader = try await cluster.token("reader", roles: [])
            // Both buses up before the first scrape.
            try await eventually("both instances' Redis bus up") {
                let (upA, upB) = (try await a.metric("gateway_redis_up"), try await b.metric("gateway_redis_up"))
                return upA == 1 && upB == 1
            }
            let beforeA = try await Self.samples(port: a.port)
            let beforeB = try await Self.samples(port: b.port)
            // Each bus came up once, and nothing polls the store while it is up.
            for before in [beforeA, beforeB] {
                #expect(before["gateway_redis_connects_total"] == 1 && before["gateway_redis_disconnects_total", default: 0] == 0)
                #expect(before["gateway_fanout_polling"] == 0)
            }

            // On B: three WebSocket subscribers and one SSE stream, live.
            var sockets: [WSTestClient] = []
            for i in 0..<3 {
                let ws = try await WSTestClient.connect(port: b.port, token: reader)
                try await ws.send(["type": "subscribe", "id": "s\(i)", "channel": channel])
                _ = try await ws.reply("subscribed")
                sockets.append(ws)
            }
            let sse = try await SSETestClient.connect(port: b.port, channel: channel, token: reader)
            #expect(sse.status == 200)
            _ = try await sse.guardedNextEvent()  // the opening `id:` line: registered
            let open = try await Self.moved(beforeB, Self.samples(port: b.port))
            #expect(open["gateway_connections{transport=\"ws\"}"] == 3)
            #expect(open["gateway_connections{transport=\"sse\"}"] == 1)
            #expect(open["gateway_subscriptions"] == 4)
            #expect(open["gateway_channels"] == 1)

            // On A: 10 publishes over REST; then one whose PUBLISH Redis "loses", and one more (B repairs the gap).
            for i in 0..<10 {
                #expect(try await HTTPTestClient.publish(port: a.port, channel: channel, body: ["i": i], token: service).status == 201)
            }
            a.server.app.redis?.testLoseNextPublishes(1)
            for i in 10..<12 {
                #expect(try await HTTPTestClient.publish(port: a.port, channel: channel, body: ["i": i], token: service).status == 201)
            }
            for ws in sockets { #expect(try await ws.messageSeqs(12) == Array(1...12)) }
            #expect(try await sse.messages(12).map(\.seq) == Array(1...12))

            // A long-poll on B from the 9th message's cursor: answers 3 at once.
            let history = try await HTTPTestClient.request(.GET, port: b.port, "/v1/channels/\(channel)/messages?limit=4", token: reader)
            let ninth = try #require((history.json["messages"] as? [[String: Any]])?.first?["cursor"] as? String)
            let poll = try await HTTPTestClient.request(.GET, port: b.port, "/v1/channels/\(channel)/poll?since=\(ninth)&timeout=5", token: reader)
            #expect((poll.json["messages"] as? [[String: Any]])?.count == 3)

            // Refusals on A: no token, a bad signature, an expired token; a user over the publish rate.
            #expect(try await HTTPTestClient.request(.GET, port: a.port, "/v1/channels/\(channel)/messages").status == 401)
            #expect(try await HTTPTestClient.request(.GET, port: a.port, "/v1/channels/\(channel)/messages", token: service + "x").status == 401)
            let expired = try await a.token("late", roles: [], ttl: -120)
            #expect(try await HTTPTestClient.request(.GET, port: a.port, "/v1/channels/\(channel)/messages", token: expired).status == 401)
            var statuses: [Int] = []
            for i in 0..<4 { statuses.append(try await HTTPTestClient.publish(port: a.port, channel: channel, body: ["i": i], token: reader).status) }
            #expect(statuses == [403, 403, 429, 429])  // the first two spend the burst (and are refused by the policy)

            let movedA = try await Self.moved(beforeA, Self.samples(port: a.port))
            let movedB = try await Self.moved(beforeB, Self.samples(port: b.port))
            let expectedA: [String: Double] = [
                "gateway_messages_published_total": 12,
                "gateway_store_append_seconds_count": 12,
                "gateway_auth_failures_total{reason=\"missing\"}": 1,
                "gateway_auth_failures_total{reason=\"bad_signature\"}": 1,
                "gateway_auth_failures_total{reason=\"expired\"}": 1,
                "gateway_rate_limited_total": 2,
                "gateway_redis_dropped_publishes_total": 0,
                "gateway_store_head_checks_total{reason=\"poll\"}": 0,
                "gateway_redis_connects_total": 0,
            ]
            for (series, value) in expectedA { #expect(movedA[series, default: 0] == value, "A: \(series)") }
            let expectedB: [String: Double] = [
                "gateway_messages_published_total": 0,
                "gateway_store_append_seconds_count": 0,
                "gateway_messages_delivered_total{transport=\"ws\"}": 36,
                "gateway_messages_delivered_total{transport=\"sse\"}": 12,
                "gateway_messages_delivered_total{transport=\"poll\"}": 3,
                "gateway_publish_to_deliver_seconds_count": 12,
                "gateway_gap_repairs_total": 1,
                "gateway_reconcile_repairs_total": 0,
                "gateway_store_head_checks_total{reason=\"poll\"}": 0,
                "gateway_store_head_checks_total{reason=\"reconcile\"}": 0,
                "gateway_redis_disconnects_total": 0,
                "gateway_auth_failures_total{reason=\"missing\"}": 0,
                "gateway_rate_limited_total": 0,
            ]
            for (series, value) in expectedB { #expect(movedB[series, default: 0] == value, "B: \(series)") }
            // Nothing was handed out on A: it has no subscriber.
            #expect(movedA["gateway_publish_to_deliver_seconds_count", default: 0] == 0)
            #expect(movedA["gateway_messages_delivered_total{transport=\"ws\"}", default: 0] == 0)
            // The histogram's buckets are cumulative and end at its count.
            let after = try await Self.samples(port: b.port)
            #expect(after["gateway_publish_to_deliver_seconds_bucket{le=\"+Inf\"}"] == after["gateway_publish_to_deliver_seconds_count"])

            // Every connection closed: the gauges are back where they started.
            for ws in sockets { await ws.close() }
            await sse.close()
            try await eventually("B's gauges back to where they were") {
                let now = try await Self.moved(beforeB, Self.samples(port: b.port))
                return now["gateway_connections{transport=\"ws\"}", default: 0] == 0 && now["gateway_connections{transport=\"sse\"}", default: 0] == 0
                    && now["gateway_subscriptions", default: 0] == 0 && now["gateway_channels", default: 0] == 0
            }
            print("metrics moved on A: \(movedA.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
            print("metrics moved on B: \(movedB.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
        }
    }
}
