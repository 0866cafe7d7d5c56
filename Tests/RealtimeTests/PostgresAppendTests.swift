import ChatDomain
import Foundation
import Logging
import Testing

/// The Postgres append (one `gateway_append` call per batch) against a real server, where a second writer —
/// another instance, here a psql session — holds a transaction open at the moment it matters.
@Suite(.serialized)
struct PostgresAppendTests {
    /// A psql session fed line by line: a transaction another instance would hold open.
    final class Session: @unchecked Sendable {  // driven by one test task
        let process = Process()
        let input = Pipe()
        let output = Pipe()

        init(postgres: PostgresServer) throws {
            process.executableURL = URL(fileURLWithPath: postgres.binDir + "/psql")
            process.arguments = ["-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-At", "-v", "ON_ERROR_STOP=1"]
            process.standardInput = input
            process.standardOutput = output
            process.standardError = output
            try process.run()
        }

        func send(_ sql: String) throws { try input.fileHandleForWriting.write(contentsOf: Data((sql + "\n").utf8)) }

        /// Reads output until a line equals `marker` (psql echoes it with `\echo`).
        func waitFor(_ marker: String) throws -> String {
            var seen = ""
            while !seen.split(separator: "\n").contains(Substring(marker)) {
                let chunk = output.fileHandleForReading.availableData
                if chunk.isEmpty { throw ServiceError(description: "psql ended before \(marker): \(seen)") }
                seen += String(decoding: chunk, as: UTF8.self)
            }
            return seen
        }

        /// Commits the session's transaction and ends the session.
        func commitAndClose() throws {
            try send("COMMIT;\n\\echo committed")
            _ = try waitFor("committed")
            close()
        }

        func close() {
            try? input.fileHandleForWriting.close()
            process.waitUntilExit()
        }
    }

    /// A real Postgres and one gateway on it (no Redis: only the store matters here), stopped afterwards.
    static func withGateway(_ body: (PostgresServer, TestGateway) async throws -> Void) async throws {
        let postgres = try await PostgresServer.start()
        let gateway: TestGateway
        do {
            gateway = try await TestGateway.start { config in
                config.databaseURL = postgres.url
                config.singleInstance = true
            }
        } catch {
            await postgres.stop()
            throw error
        }
        do {
            try await body(postgres, gateway)
        } catch {
            await gateway.stop()
            await postgres.stop()
            throw error
        }
        await gateway.stop()
        await postgres.stop()
    }

    /// Whether a `gateway_append` call comes to wait for a lock (another transaction's) within about 5 s.
    static func anAppendWaitsForALock(_ postgres: PostgresServer) async throws -> Bool {
        for _ in 0..<200 {
            let (_, output) = try await TestServices.run(postgres.binDir + "/psql", [
                "-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-At", "-c",
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%gateway_append%'",
            ])
            if output.trimmingCharacters(in: .whitespacesAndNewlines) == "1" { return true }
            try await Task.sleep(for: .milliseconds(25))
        }
        return false
    }

    @Test func aRequestIdTakenByAnotherInstanceMidBatchIsAnsweredAsAReplayWithoutAHole() async throws {
        try await Self.withGateway { postgres, gateway in
            let token = try await gateway.token()
            let channel = "topic:held"
            // Another writer stores a message with alice's key "held" and keeps its transaction open: it holds
            // the channel's row and the key.
            let other = try Session(postgres: postgres)
            try other.send("""
                BEGIN;
                SELECT o_kind, o_seq FROM gateway_append(ARRAY['\(channel)'], ARRAY['alice'], ARRAY['held'], ARRAY['{"v":1}'], ARRAY[false], 0);
                \\echo held
                """)
            #expect(try other.waitFor("held").contains("n|1"))

            // The gateway's publish with the same key waits for that transaction...
            async let publish = HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["v": 1], token: token, idempotencyKey: "held")
            #expect(try await Self.anAppendWaitsForALock(postgres), "the gateway's append never waited for the other transaction")
            // ...which commits: the key is now the other writer's, so the gateway's batch rolls back and runs
            // again, and the publish is a replay of the message the other writer stored.
            try other.commitAndClose()
            let replayed = try await publish
            #expect(replayed.status == 200)
            #expect(replayed.headers.first(name: "Idempotent-Replayed") == "true")
            #expect((replayed.json["message"] as? [String: Any])?["seq"] as? Int == 1)

            // The rolled-back attempt left no hole: the next message is 2, and the channel holds exactly 1, 2.
            let next = try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["v": 2], token: token)
            #expect(next.status == 201 && (next.json["message"] as? [String: Any])?["seq"] as? Int == 2)
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/messages", token: token)
            #expect((history.json["messages"] as? [[String: Any]])?.compactMap { $0["seq"] as? Int } == [1, 2])
        }
    }

    @Test func oneBatchStoresFreshMessagesReplaysKnownKeysAndRepeatsWithinIt() async throws {
        try await Self.withGateway { postgres, gateway in
            let token = try await gateway.token()
            let first = try await HTTPTestClient.publish(port: gateway.port, channel: "topic:mix", body: ["n": 0], token: token, idempotencyKey: "k0")
            #expect(first.status == 201)
            let bob = try await gateway.token("bob", roles: [])
            let thread = try await ThreadClusterTests.createThread(port: gateway.port, token: bob, members: ["bob"])
            // One call, as one batch would be: a known key, a fresh one twice (the second with another body),
            // two messages without a key on two channels, and two publishes to a thread that need their sender
            // to be a member: bob's (stored) and alice's (refused; she is not one, and her key is not kept).
            let (status, output) = try await TestServices.run(postgres.binDir + "/psql", [
                "-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-At", "-c", """
                SELECT o_index, o_kind, o_seq, o_id IS NOT NULL, o_body FROM gateway_append(
                    ARRAY['topic:mix', 'topic:mix', 'topic:mix', 'topic:mix', 'topic:other', 'thread:\(thread)', 'thread:\(thread)'],
                    ARRAY['alice', 'alice', 'alice', 'alice', 'alice', 'alice', 'bob'],
                    ARRAY['k0', 'k1', 'k1', '', '', 'k2', ''], ARRAY['{"n":0}', '{"n":1}', '{"n":9}', '{"n":2}', '{"n":3}', '{"n":4}', '{"n":5}'],
                    ARRAY[false, false, false, false, false, true, true], 0) ORDER BY o_index
                """,
            ])
            #expect(status == 0)
            #expect(output.split(separator: "\n").map(String.init) == ["1|r|1|t|{\"n\":0}", "2|n|2|t|", "3|d|2|f|", "4|n|3|t|", "5|n|1|t|", "6|f|0|f|", "7|n|1|t|"],
                    "\(output)")
            let threadHistory = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/thread:\(thread)/messages", token: bob)
            #expect((threadHistory.json["messages"] as? [[String: Any]])?.map { "\($0["sender"] ?? "") \($0["seq"] ?? "")" } == ["bob 1"])
            let (_, keys) = try await TestServices.run(postgres.binDir + "/psql", [
                "-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-At", "-c",
                "SELECT count(*) FROM idempotency WHERE request_id = 'k2'",
            ])
            #expect(keys.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
            // The ids are UUIDv7 of each message's created_at.
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/topic:mix/messages", token: token)
            let messages = history.json["messages"] as? [[String: Any]] ?? []
            #expect(messages.compactMap { $0["seq"] as? Int } == [1, 2, 3])
            for message in messages {
                let id = (message["id"] as? String ?? "").replacingOccurrences(of: "-", with: "")
                let created = ISO8601DateFormatter.micros(message["created_at"] as? String ?? "")
                #expect(id.count == 32 && Array(id)[12] == "7" && "89ab".contains(Array(id)[16]), "\(id)")
                #expect(UInt64(id.prefix(12), radix: 16) == created.map { UInt64($0 / 1000) }, "\(id) \(message["created_at"] ?? "")")
            }
        }
    }

    /// A member's publish racing their removal on another instance: the removal (a psql session here, doing
    /// what `removeMember` does) has deleted the membership and holds its transaction open; the gateway's
    /// publish by that member waits for it, and once it commits the publish is refused (403) and nothing is
    /// stored — no message of a removed member lands after the removal's head.
    @Test func aPublishRacingTheSendersRemovalWaitsForItAndIsRefused() async throws {
        try await Self.withGateway { postgres, gateway in
            let bob = try await gateway.token("bob", roles: [])
            let carol = try await gateway.token("carol", roles: [])
            let thread = try await ThreadClusterTests.createThread(port: gateway.port, token: bob, members: ["bob", "carol"])
            let channel = "thread:\(thread)"
            #expect(try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["n": 1], token: carol).status == 201)

            let other = try Session(postgres: postgres)
            try other.send("""
                BEGIN;
                DELETE FROM thread_members WHERE thread_id = '\(thread)' AND user_id = 'carol';
                INSERT INTO channels AS c (name, last_seq, last_created_at, member_epoch) VALUES ('\(channel)', 0, 0, 1)
                    ON CONFLICT (name) DO UPDATE SET member_epoch = c.member_epoch + 1 RETURNING 'head', last_seq;
                \\echo removing
                """)
            #expect(try other.waitFor("removing").contains("head|1"))

            async let publish = HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["n": 2], token: carol)
            #expect(try await Self.anAppendWaitsForALock(postgres), "the publish never waited for the removal")
            try other.commitAndClose()
            let refused = try await publish
            #expect(refused.status == 403, "\(refused.body)")
            #expect(refused.json["code"] as? String == "FORBIDDEN")

            // Only carol's first message; bob's next one is 2 (no hole).
            #expect(try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["n": 3], token: bob).json["message"]
                .flatMap { ($0 as? [String: Any])?["seq"] as? Int } == 2)
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/messages", token: bob)
            #expect((history.json["messages"] as? [[String: Any]])?.map { "\($0["sender"] ?? "") \($0["seq"] ?? "")" } == ["carol 1", "bob 2"])
        }
    }
}

extension ISO8601DateFormatter {
    /// Microseconds since the epoch of `2026-11-21T22:30:00.123456Z`.
    static func micros(_ text: String) -> Int64? {
        guard text.count == 27, let dot = text.firstIndex(of: "."), let fraction = Int64(text[text.index(after: dot)...].dropLast()) else { return nil }
        let formatter = ISO8601DateFormatter()
        guard let seconds = formatter.date(from: String(text[..<dot]) + "Z") else { return nil }
        return Int64(seconds.timeIntervalSince1970) * 1_000_000 + fraction
    }
}

/// The embedded store commits a batch in a few multi-row statements: whatever batches concurrent appends
/// form, each request id stores one message, its repeats replay it (or conflict on another body), and seqs
/// stay gapless across channels.
struct SQLiteBatchAppendTests {
    @Test func concurrentAppendsWithRepeatedKeysStoreEachKeyOnceAndGaplessly() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-batch-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try await SQLiteStore.open(path: dir + "/gateway.sqlite", logger: Logger(label: "test"))
        let channels = try [ChannelName(parsing: "topic:batch-a"), ChannelName(parsing: "topic:batch-b")]
        // 10 keys used 5 times each with the same body and once with another; 40 appends without a key.
        var requests: [AppendRequest] = []
        for key in 0..<10 {
            for _ in 0..<5 { requests.append(AppendRequest(channel: channels[key % 2], sender: "alice", requestId: "k\(key)", body: "{\"k\":\(key)}")) }
            requests.append(AppendRequest(channel: channels[key % 2], sender: "alice", requestId: "k\(key)", body: "{\"other\":true}"))
        }
        for n in 0..<40 { requests.append(AppendRequest(channel: channels[n % 2], sender: "bob", requestId: nil, body: "{\"n\":\(n)}")) }
        requests.shuffle()
        // Half the keys are stored first, alone, so that later batches find them in the store; the other half
        // first meet each other within the concurrent batches.
        var results: [(AppendRequest, Result<AppendResult, ApiError>)] = []
        for key in stride(from: 0, to: 10, by: 2) {
            let request = AppendRequest(channel: channels[key % 2], sender: "alice", requestId: "k\(key)", body: "{\"k\":\(key)}")
            do throws(ApiError) {
                results.append((request, .success(try await store.append(request))))
            } catch {
                results.append((request, .failure(error)))
            }
        }
        results += await withTaskGroup(of: (AppendRequest, Result<AppendResult, ApiError>).self) { group in
            for request in requests {
                group.addTask {
                    do throws(ApiError) {
                        return (request, .success(try await store.append(request)))
                    } catch {
                        return (request, .failure(error))
                    }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        let stored: [Message] = results.compactMap { _, result -> Message? in
            guard case .success(let appended) = result, !appended.replayed else { return nil }
            return appended.message
        }
        #expect(stored.count == 10 + 40)
        for key in 0..<10 {
            let name = "k\(key)"
            let forKey = results.filter { $0.0.requestId == name }
            let original = stored.filter { $0.requestId == name }
            #expect(original.count == 1, "\(name): \(original.count) stored")
            guard let original = original.first else { continue }
            for (request, result) in forKey {
                switch result {
                case .success(let appended):  // the original itself, or a replay of it with the same body
                    #expect(appended.message.id == original.id && request.body == original.body)
                case .failure(let error):  // the same key with another body
                    #expect(error.code == ApiError.Code.idempotencyConflict && request.body != original.body, "\(error)")
                }
            }
        }
        // Gapless on each channel, and what is read back is what was acknowledged.
        for channel in channels {
            let page = try await store.messages(in: channel, after: 0, limit: 1000)
            let seqs: [Int64] = page.messages.map(\.seq)
            #expect(seqs == Array(1...Int64(seqs.count)))
            let read = Set(page.messages.map(\.id))
            let acknowledged = Set(stored.filter { $0.channel == channel }.map(\.id))
            #expect(read == acknowledged)
        }
        await store.close()
    }

    /// Members' publishes to a thread, checked by the embedded store's append: whatever batches concurrent
    /// appends form, a member's are stored (gapless) and a non-member's are refused with `403` and store
    /// nothing, their request ids included; after a removal the removed member's next publish is refused too,
    /// and a publish that needs no membership (the configuration allows it) is stored whoever sends it.
    @Test func appendsCheckTheSendersMembershipInTheirTransaction() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-members-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try await SQLiteStore.open(path: dir + "/gateway.sqlite", logger: Logger(label: "test"))
        let thread = UUID().uuidString.lowercased()
        try await store.createThread(ChatThread(id: thread, title: "t", creator: "bob", createdAtMicros: Timestamp.nowMicros(), members: ["bob", "carol"]))
        let channel = ChannelName(thread: thread)
        let requests = (0..<40).map { n in
            AppendRequest(channel: channel, sender: ["bob", "carol", "dave"][n % 3], requestId: "r\(n)", body: "{\"n\":\(n)}", senderMustBeMember: true)
        }
        let results = await withTaskGroup(of: (AppendRequest, Result<AppendResult, ApiError>).self) { group in
            for request in requests {
                group.addTask {
                    do throws(ApiError) { return (request, .success(try await store.append(request))) } catch { return (request, .failure(error)) }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        for (request, result) in results {
            switch (request.sender, result) {
            case ("dave", .failure(let error)): #expect(error.code == ApiError.Code.forbidden && error.status == 403, "\(error)")
            case ("dave", .success): Issue.record("a non-member's publish was stored")
            case (_, .success(let appended)): #expect(!appended.replayed && appended.message.body == request.body)
            case (_, .failure(let error)): Issue.record("a member's publish failed: \(error)")
            }
        }
        var page = try await store.messages(in: channel, after: 0, limit: 1000)
        #expect(page.messages.map(\.seq) == Array(1...27))
        #expect(!page.messages.contains { $0.sender == "dave" })

        // Dave's request ids were not kept: once he is a member, the same id stores a new message.
        _ = try await store.addMember("dave", to: thread)
        let retried = try await store.append(AppendRequest(channel: channel, sender: "dave", requestId: "r2", body: "{\"n\":2}", senderMustBeMember: true))
        #expect(!retried.replayed && retried.message.seq == 28)

        // Carol removed: her next publish is refused; the same without the membership requirement is stored.
        _ = try await store.removeMember("carol", from: thread)
        do throws(ApiError) {
            _ = try await store.append(AppendRequest(channel: channel, sender: "carol", requestId: nil, body: "{\"late\":true}", senderMustBeMember: true))
            Issue.record("a removed member's publish was stored")
        } catch {
            #expect(error.code == ApiError.Code.forbidden)
        }
        let unchecked = try await store.append(AppendRequest(channel: channel, sender: "carol", requestId: nil, body: "{\"late\":true}"))
        #expect(unchecked.message.seq == 29)
        page = try await store.messages(in: channel, after: 27, limit: 1000)
        #expect(page.messages.map(\.sender) == ["dave", "carol"])
        await store.close()
    }
}
