@testable import ChatDomain
import Foundation
import NIOCore
import NIOPosix
import Testing
import Wire

/// Bounds per client: absolute deadlines for a request's head and body, connections per IP, live streams per
/// user, and the store reads of waiting long-polls shared per position.
@Suite(.serialized) struct ConnectionLimitTests {
    /// Writes `bytes` one at a time, `every` apart (each well inside the idle timeout), then reads until the
    /// server closes; returns what it answered.
    static func trickle(port: Int, _ bytes: String, every: TimeAmount) async throws -> String {
        try await within(40, "trickle") {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
                }
            return try await channel.executeThenClose { inbound, outbound in
                let writer = Task {
                    // `.zero`: all at once (100,000 one-byte writes took longer than the head's deadline on a loaded machine).
                    guard every > .zero else { return try await outbound.write(ByteBuffer(string: bytes)) }
                    for byte in bytes.utf8 {
                        try await outbound.write(ByteBuffer(bytes: [byte]))
                        try await Task.sleep(nanoseconds: UInt64(every.nanoseconds))
                    }
                }
                defer { writer.cancel() }
                var received: [UInt8] = []
                do { for try await chunk in inbound { received += chunk.readableBytesView } } catch {}
                return String(decoding: received, as: UTF8.self)
            }
        }
    }

    @Test func aHeadOrABodyTrickledPastItsDeadlineIs408AndClosed() async throws {
        try await withTestGateway(configure: {
            $0.headerDeadlineSeconds = 2
            $0.bodyDeadlineSeconds = 2
            $0.requestIdleSeconds = 10
        }) { gateway in
            // 30 bytes of head, one every 400 ms: 12 s to complete, the idle timer never fires.
            let head = try await Self.trickle(port: gateway.port, "GET /healthz HTTP/1.1\r\nX-Slow: " + String(repeating: "a", count: 20), every: .milliseconds(400))
            #expect(head.hasPrefix("HTTP/1.1 408"), "\(head.prefix(200))")
            #expect(head.contains("\"code\":\"REQUEST_TIMEOUT\""))
            // A complete head, then a body of 20 bytes trickled the same way.
            let token = try await gateway.token()
            let body = try await Self.trickle(port: gateway.port, "POST /v1/channels/topic:slow/messages HTTP/1.1\r\nAuthorization: Bearer \(token)\r\n"
                                              + "Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"body\":{\"a\":\"bcde\"}}", every: .milliseconds(400))
            #expect(body.hasPrefix("HTTP/1.1 408"), "\(body.prefix(200))")
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/topic:slow/messages", token: token)
            #expect((history.json["messages"] as? [Any])?.isEmpty == true, "nothing stored")
            try await HardeningTests.expectServing(gateway.port)
        }
    }

    @Test func connectionsPastThePerIPCapAre429WithTheEnvelope() async throws {
        try await withTestGateway(configure: { $0.maxConnectionsPerIP = 3; $0.requestIdleSeconds = 30 }) { gateway in
            let token = try await gateway.token("carol", roles: [])
            var open: [SSETestClient] = []
            for _ in 0..<3 { open.append(try await SSETestClient.connect(port: gateway.port, channel: "topic:ip", token: token)) }
            #expect(open.allSatisfy { $0.status == 200 })
            let refused = try await HTTPTestClient.request(.GET, port: gateway.port, "/healthz")
            #expect(refused.status == 429)
            #expect(refused.json["code"] as? String == "RATE_LIMITED")
            #expect(refused.json["requestId"] is String)
            await open.removeLast().close()
            try await eventually("a connection is free again") {
                (try? await HTTPTestClient.request(.GET, port: gateway.port, "/healthz").status) == 200
            }
            for stream in open { await stream.close() }
        }
    }

    @Test func streamsPastThePerUserCapAreRefusedOnEveryTransport() async throws {
        try await withTestGateway(configure: { $0.maxStreamsPerUser = 2 }) { gateway in
            let bob = try await gateway.token("bob", roles: [])
            var streams: [SSETestClient] = []
            for _ in 0..<2 { streams.append(try await SSETestClient.connect(port: gateway.port, channel: "topic:user", token: bob)) }
            #expect(streams.allSatisfy { $0.status == 200 })
            let third = try await SSETestClient.connect(port: gateway.port, channel: "topic:user", token: bob)
            #expect(third.status == 429)
            await third.close()
            let poll = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/topic:user/poll?timeout=0", token: bob)
            #expect(poll.status == 429)
            #expect(poll.json["code"] as? String == "RATE_LIMITED")
            // A WebSocket: the upgrade happens, then an error reply with the envelope and close 1008.
            let ws = try await RawWebSocketClient(port: gateway.port, token: bob)
            let frames = RawWebSocketClient.frames(try await ws.readToEnd(timeout: 20))
            #expect(RawWebSocketClient.closeCode(frames) == 1008)
            let reply = frames.first { $0.0 == 0x1 }.flatMap { try? ServerReply.decode(String(decoding: $0.1, as: UTF8.self)) }
            if case .error(_, let error)? = reply { #expect(error.envelope.code == "RATE_LIMITED") } else { Issue.record("no error reply: \(String(describing: reply))") }
            // Another user is not affected; a stream closed frees its place.
            let alice = try await SSETestClient.connect(port: gateway.port, channel: "topic:user", token: try await gateway.token("alice", roles: []))
            #expect(alice.status == 200)
            await alice.close()
            await streams.removeLast().close()
            try await eventually("bob has a free stream again") {
                let again = try await SSETestClient.connect(port: gateway.port, channel: "topic:user", token: bob)
                defer { Task { await again.close() } }
                return again.status == 200
            }
            for stream in streams { await stream.close() }
        }
    }

    /// Long-polls at the channel's head wait without reading the store, and the message that wakes them is
    /// their answer as the Hub delivered it (the same message the store holds): 40 polls and a message cost
    /// next to no store reads (only a poll still opening when the message commits reads, and those share).
    @Test func longPollsAtTheHeadAnswerFromTheHubWithoutReadingTheStore() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let channel = "topic:shared"
            let start = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/messages", token: token)
            let since = try #require(start.json["cursor"] as? String)
            let waiting = 40
            let store = try #require(gateway.server.app.store as? SQLiteStore)
            // One poll that answers at once (timeout 0) reads the channel's head and floor into memory.
            #expect(try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/poll?since=\(since)&timeout=0", token: token).status == 200)
            let queriesBefore = store.readerQueries.withLockedValue { $0 }
            let readsBefore = try await gateway.metric("gateway_poll_store_reads_total", label: "read=\"started\"")
                + gateway.metric("gateway_poll_store_reads_total", label: "read=\"joined\"")
            let polls = Task {
                try await withThrowingTaskGroup(of: MessagePage.self) { group in
                    for _ in 0..<waiting {
                        group.addTask {
                            let answer = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/poll?since=\(since)&timeout=30", token: token)
                            return try JSONDecoder().decode(MessagePage.self, from: Data(answer.body.utf8))
                        }
                    }
                    var answers: [MessagePage] = []
                    for try await answer in group { answers.append(answer) }
                    return answers
                }
            }
            try await eventually("every poll waits") { try await gateway.metric("gateway_connections", label: "transport=\"poll\"") == waiting }
            // Opening 40 polls at the head reads nothing: the bounds come from memory (KnownBounds; 40 reads
            // without). What may remain is the Hub's own read when its entry for the channel starts (one per
            // entry: this one's, and the warm-up poll's if it was still under way), not one per poll.
            let openingQueries = store.readerQueries.withLockedValue { $0 } - queriesBefore
            #expect(openingQueries <= 2, "\(openingQueries) store reads to open \(waiting) polls at the head")
            let published = try await HTTPTestClient.request(.POST, port: gateway.port, "/v1/channels/\(channel)/messages", body: "{\"body\":{\"n\":1}}", token: token)
            #expect(published.status == 201)
            let answers = try await polls.value
            #expect(answers.count == waiting)
            let stored = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/messages?since=\(since)", token: token)
            let history = try JSONDecoder().decode(MessagePage.self, from: Data(stored.body.utf8))
            for answer in answers {
                #expect(answer.messages.map(\.seq) == [1], "\(answer)")
                #expect(answer.messages == history.messages && answer.cursor == history.cursor && !answer.hasMore, "the stored message, as stored")
            }
            let reads = try await gateway.metric("gateway_poll_store_reads_total", label: "read=\"started\"")
                + gateway.metric("gateway_poll_store_reads_total", label: "read=\"joined\"") - readsBefore
            #expect(reads < waiting / 2, "\(reads) store reads for \(waiting) polls at the head and one message")
        }
    }
}
