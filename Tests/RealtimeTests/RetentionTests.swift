import Auth
@testable import ChatDomain
import Logging
import Foundation
import Gateway
import NIOConcurrencyHelpers
import Testing

/// Retention: a topic limited to 100 messages, given 1,000 while readers read, keeps the last 100; a reader
/// resuming from an older cursor gets `410 CURSOR_EXPIRED` naming the oldest position; a live subscriber and
/// catch-up readers paging through history while rows are deleted never see a gap. On both stores.
@Suite(.serialized) struct RetentionTests {
    static func configure(_ config: inout GatewayConfig) {
        config.topics["kept"] = TopicRule(maxCount: 100)
        config.retentionInterval = .milliseconds(100)
        config.retentionBatch = 64
    }

    @Test func embeddedKeepsTheLast100AndNeverShowsAGap() async throws {
        try await withTestGateway(configure: Self.configure) { gateway in
            try await Self.scenario(port: gateway.port, token: try await gateway.token("svc", roles: ["service"]))
        }
    }

    @Test func postgresKeepsTheLast100AndNeverShowsAGap() async throws {
        try await withCluster(instances: 1, configure: { Self.configure(&$0) }) { cluster in
            try await Self.scenario(port: cluster.ports[0], token: try await cluster.token())
        }
    }

    /// An instance that fell behind the retention (the bus lost what it had not delivered, and the retention
    /// deleted it before the instance repaired the gap) cannot deliver it any more: its subscribers are told
    /// (`unsubscribed` with reason `cursor_expired`; an SSE stream ends), never handed a silent gap. They
    /// resume from the oldest position, and the channel goes on live on that instance.
    @Test func anInstanceTheRetentionOvertookEndsItsSubscriptionsInsteadOfSkipping() async throws {
        try await withCluster(instances: 2, configure: { config in
            config.topics["short"] = TopicRule(maxCount: 5)
            config.retentionInterval = .seconds(600)
            config.reconcileInterval = .seconds(600)
        }) { cluster in
            let token = try await cluster.token()
            let channel = "topic:short"
            let (a, b) = (cluster.ports[0], cluster.ports[1])
            let ws = try await BusEdgeTests.subscribe(port: b, channel: channel, token: token)
            let sse = try await SSETestClient.connect(port: b, channel: channel, token: token)
            _ = try await sse.guardedNextEvent()
            try await eventually("B's channel live on the bus") { await BusEdgeTests.busState(cluster.gateways[1], channel) == .live(subscribers: 2) }
            for i in 0..<3 { #expect(try await HTTPTestClient.publish(port: a, channel: channel, body: ["i": i], token: token).status == 201) }
            let early = try await ws.messages(3)
            #expect(early.map(\.seq) == [1, 2, 3])
            // B hears nothing of 4…13, and the retention keeps only 9…13 before B learns of them.
            cluster.gateways[0].server.app.redis?.testLoseNextPublishes(10)
            for i in 3..<13 { #expect(try await HTTPTestClient.publish(port: a, channel: channel, body: ["i": i], token: token).status == 201) }
            let deleted = try await cluster.gateways[0].server.app.store.trim(try ChannelName(parsing: channel), retention: Retention(maxCount: 5), batch: 100)
            #expect(deleted == 8)
            // 14 reaches B: the gap 4…13 cannot be filled any more.
            #expect(try await HTTPTestClient.publish(port: a, channel: channel, body: ["i": 13], token: token).status == 201)
            let (later, reason) = try await ws.seqsUntilUnsubscribed()
            #expect(later.isEmpty, "a message after a gap: \(later)")
            #expect(reason == "cursor_expired")
            #expect(try await sse.seqsUntilEnd() == [1, 2, 3] && sse.ended)
            // The client resumes: from its cursor, 410 naming the oldest position; from there, 9…14, then live.
            try await ws.send(["type": "subscribe", "id": "again", "channel": channel, "since": early.last!.cursor])
            let refused = try await ws.reply("error")["error"] as? [String: Any]
            #expect(refused?["code"] as? String == "CURSOR_EXPIRED")
            let oldest = (refused?["details"] as? [String: Any])?["oldest_cursor"] as? String ?? ""
            try await ws.send(["type": "subscribe", "id": "resume", "channel": channel, "since": oldest])
            _ = try await ws.reply("subscribed")
            #expect(try await ws.messages(6).map(\.seq) == [9, 10, 11, 12, 13, 14])
            #expect(try await HTTPTestClient.publish(port: a, channel: channel, body: ["i": 14], token: token).status == 201)
            #expect(try await ws.messages(1).map(\.seq) == [15])
            await ws.close()
        }
    }

    /// A reader paging from `cursor` until it has seq `last`: every page continues the one before, or the answer is
    /// 410 and the reader goes on from the oldest position it names. Returns the seqs read and the restarts.
    static func pageThrough(port: Int, channel: String, from cursor: String, until last: Int64, pause: Duration, token: String) async throws -> (seqs: [Int64], restarts: Int) {
        var cursor = cursor
        var seqs: [Int64] = []
        var restarts = 0
        var expected: Int64? = Int64(cursor.split(separator: ".")[0]).map { $0 + 1 }
        while seqs.last ?? 0 < last {
            let page = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(cursor)&limit=37", token: token)
            if page.status == 410 {
                #expect(page.json["code"] as? String == "CURSOR_EXPIRED")
                let details = try #require(page.json["details"] as? [String: Any])
                cursor = try #require(details["oldest_cursor"] as? String)
                expected = Int64(try #require(details["first_seq"] as? String))
                restarts += 1
                continue
            }
            #expect(page.status == 200, "\(page.status) \(page.body)")
            for message in page.json["messages"] as? [[String: Any]] ?? [] {
                let seq = try #require(message["seq"] as? Int64)
                #expect(seq == expected, "a gap: \(expected ?? -1) expected, \(seq) read")
                expected = seq + 1
                seqs.append(seq)
            }
            cursor = page.json["cursor"] as? String ?? cursor
            try await Task.sleep(for: max(pause, .milliseconds(5)))
        }
        return (seqs, restarts)
    }

    static func scenario(port: Int, token: String) async throws {
        let channel = "topic:kept"
        let zero = try await HTTPTestClient.zeroCursor(port: port, channel: channel, token: token)
        // A live subscriber from the start, reading all along.
        let live = try await WSTestClient.connect(port: port, token: token)
        try await live.send(["type": "subscribe", "id": "live", "channel": channel])
        _ = try await live.reply("subscribed")
        let liveSeqs = Task { try await live.messageSeqs(1000, timeout: 120) }
        // Catch-up readers from the very start, paging while the retention deletes under them.
        let readers = [Duration.zero, .milliseconds(50), .milliseconds(300)].map { pause in
            Task { try await pageThrough(port: port, channel: channel, from: zero, until: 1000, pause: pause, token: token) }
        }

        let acked = try await ClusterTests.publish(ports: [port], channel: channel, count: 1000, workers: 4, token: token, tag: "kept")
        #expect(acked.count == 1000)

        #expect(try await liveSeqs.value == Array(1...1000), "the live subscriber saw every message, in order")
        var restarts = 0
        for reader in readers {
            let (seqs, restartsOfReader) = try await reader.value
            print("reader: \(seqs.count) read, first \(seqs.first ?? -1), \(restartsOfReader) restarts")
            restarts += restartsOfReader
            #expect(seqs.last == 1000)
        }

        // The retention catches up: exactly the last 100 are kept.
        try await eventually("only the last 100 kept", timeout: 30) {
            let latest = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?limit=1000", token: token)
            return (latest.json["messages"] as? [[String: Any]])?.compactMap { $0["seq"] as? Int64 } == Array(901...1000)
        }
        // A reader resuming from an older cursor: 410 naming the oldest position; from there, 901…1000.
        let old = "500." + zero.split(separator: ".")[1]
        let expired = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(old)", token: token)
        #expect(expired.status == 410 && expired.json["code"] as? String == "CURSOR_EXPIRED")
        let details = try #require(expired.json["details"] as? [String: Any])
        #expect(details["first_seq"] as? String == "901")
        let oldest = try #require(details["oldest_cursor"] as? String)
        let resumed = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(oldest)&limit=1000", token: token)
        #expect((resumed.json["messages"] as? [[String: Any]])?.compactMap { $0["seq"] as? Int64 } == Array(901...1000))
        // The same on the other transports: a WebSocket subscribe, an SSE resume, a long-poll.
        let ws = try await WSTestClient.connect(port: port, token: token)
        try await ws.send(["type": "subscribe", "id": "old", "channel": channel, "since": old])
        let refused = try await ws.reply("subscribed")
        #expect(refused["type"] as? String == "error" && (refused["error"] as? [String: Any])?["code"] as? String == "CURSOR_EXPIRED")
        await ws.close()
        let sse = try await SSETestClient.connect(port: port, channel: channel, token: token, lastEventID: old)
        #expect(sse.status == 410)
        await sse.close()
        let poll = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?since=\(old)&timeout=1", token: token)
        #expect(poll.status == 410)
        // Nothing was lost that was kept: a fresh subscriber asking for more history than is kept gets what is
        // kept, 901…1000 (its `subscribed` cursor is the floor), over WebSocket and SSE.
        let fresh = try await WSTestClient.connect(port: port, token: token)
        try await fresh.send(["type": "subscribe", "id": "h", "channel": channel, "history": 500])
        let subscribed = try await fresh.reply("subscribed")
        #expect((subscribed["cursor"] as? String)?.hasPrefix("900.") == true, "\(subscribed)")
        #expect(try await fresh.messages(100).map(\.seq) == Array(901...1000))
        await fresh.close()
        let history = try await SSETestClient.connect(port: port, channel: channel, token: token, query: "history=500")
        #expect(try await history.messages(100).map(\.seq) == Array(901...1000))
        await history.close()
        #expect(try await HTTPTestClient.metric("gateway_retention_deleted_total", port: port) == 900)
        await live.close()
        print("retention: 1,000 published, the last 100 kept (900 deleted in batches of 64 every 100 ms, while publishing); live subscriber 1…1000 with no gap; 3 catch-up readers never saw a gap (\(restarts) restarts from the oldest position after 410)")
    }
}

/// The rows that cannot matter any more are deleted: request ids out of their window, revocations past their end.
@Suite struct PruningTests {
    @Test func expiredRequestIdsAndRevocationsArePrunedAndLiveOnesKept() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gw-prune-\(UUID().uuidString).sqlite").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try await SQLiteStore.open(path: path, idempotencyWindow: .milliseconds(200), logger: Logger(label: "test-store"))
        let channel = try ChannelName(parsing: "topic:pruned")
        _ = try await store.append(AppendRequest(channel: channel, sender: "svc", requestId: "old", body: "{}"))
        let now = Int64(Date().timeIntervalSince1970)
        try await store.revoke(Revocation(kind: .sub, value: "gone", at: now - 100, until: now - 1))
        try await store.revoke(Revocation(kind: .sub, value: "kept", at: now, until: now + 3600))
        try await Task.sleep(for: .milliseconds(300))
        _ = try await store.append(AppendRequest(channel: channel, sender: "svc", requestId: "fresh", body: "{}"))
        func count(_ sql: String) async throws -> Int { try await store.reader.query(sql).first?.column("n")?.integer ?? -1 }
        #expect(try await count("SELECT count(*) AS n FROM idempotency") == 2)
        #expect(try await count("SELECT count(*) AS n FROM revocations") == 2)
        try await store.pruneExpired()
        #expect(try await count("SELECT count(*) AS n FROM idempotency") == 1, "the request id out of its window is deleted, the fresh one kept")
        #expect(try await count("SELECT count(*) AS n FROM revocations") == 1, "the revocation past its end is deleted")
        #expect(try await store.revocations(now: now).map(\.value) == ["kept"])
        // The messages themselves are not touched by pruning.
        #expect(try await store.messages(in: channel, after: 0, limit: 10).messages.count == 2)
        await store.close()
    }
}

/// The embedded store's directory connection runs one write transaction at a time: concurrent thread writes
/// (and retention's trims) never interleave their statements on it.
@Suite struct DirectoryWriteTests {
    @Test func concurrentThreadWritesAndTrimsAllSucceed() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gw-serial-\(UUID().uuidString).sqlite").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test-store"))
        let channel = try ChannelName(parsing: "topic:trimmed")
        for i in 0..<50 { _ = try await store.append(AppendRequest(channel: channel, sender: "svc", requestId: nil, body: "{\"i\":\(i)}")) }
        let failures = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<40 {
                group.addTask {
                    do {
                        if i % 4 == 0 {
                            _ = try await store.trim(channel, retention: Retention(maxCount: 40 - i / 4), batch: 3)
                        } else {
                            try await store.createThread(ChatThread(id: UUID().uuidString.lowercased(), title: "t\(i)", creator: "ann",
                                                                    createdAtMicros: Timestamp.nowMicros(), members: ["ann", "bob", "carol"]))
                        }
                        return 0
                    } catch {
                        return 1
                    }
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(failures == 0)
        #expect(try await store.threads(of: "bob").count == 30)
        await store.close()
    }
}
