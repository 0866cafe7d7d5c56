import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

/// Raw bytes over a real socket: what a hostile or broken client may send.
enum RawClient {
    /// Writes `bytes`, then reads until the answer contains `marker` (or, without one, until the server
    /// closes the connection); returns the bytes.
    static func read(port: Int, _ bytes: String, until marker: [UInt8]? = nil, timeout: Double = 20) async throws -> [UInt8] {
        try await within(timeout, "raw read") {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
                }
            return try await channel.executeThenClose { inbound, outbound in
                try await outbound.write(ByteBuffer(string: bytes))
                var received: [UInt8] = []
                for try await chunk in inbound {
                    received += chunk.readableBytesView
                    if let marker, received.firstRange(of: marker) != nil { break }
                }
                return received
            }
        }
    }

    /// Writes `bytes`, then reads until the server closes the connection; returns what it sent back.
    static func exchange(port: Int, _ bytes: String, timeout: Double = 20) async throws -> String {
        String(decoding: try await read(port: port, bytes, timeout: timeout), as: UTF8.self)
    }
}

@Suite(.serialized) struct HardeningTests {

    static func expectServing(_ port: Int) async throws {
        #expect(try await HTTPTestClient.request(.GET, port: port, "/healthz").status == 200)
    }

    @Test func oversizedTargetsAndHeadersGetTheEnvelopeAndTheGatewayKeepsServing() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let long = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:a/messages?x=" + String(repeating: "a", count: 9000), token: token)
            #expect(long.status == 414)
            #expect(long.json["code"] as? String == "URI_TOO_LONG")
            let many = try await HTTPTestClient.request(.GET, port: port, "/healthz", headers: (0..<101).map { ("X-H\($0)", "v") })
            #expect(many.status == 431)
            #expect(many.json["code"] as? String == "HEADERS_TOO_LARGE")
            let big = try await HTTPTestClient.request(.GET, port: port, "/healthz", headers: (0..<20).map { ("X-Big\($0)", String(repeating: "b", count: 1000)) })
            #expect(big.status == 431)
            try await Self.expectServing(port)
        }
    }

    @Test func wrongContentTypeDeepNestingAndHugeNumbersAreRefusedAndNothingIsStored() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let path = "/v1/channels/topic:hostile/messages"
            let text = try await HTTPTestClient.request(.POST, port: port, path, headers: [("Content-Type", "text/plain")], body: "{\"body\":{}}", token: token)
            #expect(text.status == 415)
            #expect(text.json["code"] as? String == "UNSUPPORTED_MEDIA_TYPE")
            let form = try await HTTPTestClient.request(.POST, port: port, path, headers: [("Content-Type", "application/x-www-form-urlencoded")], body: "{\"body\":{}}", token: token)
            #expect(form.status == 415)
            let deep = "{\"body\":{\"a\":" + String(repeating: "[", count: 50_000) + String(repeating: "]", count: 50_000) + "}}"
            let nested = try await HTTPTestClient.request(.POST, port: port, path, headers: [("Content-Type", "application/json")], body: deep, token: token)
            #expect(nested.status == 400)
            #expect(nested.json["code"] as? String == "BAD_REQUEST")
            for number in ["1e400", "-1e400", "123456789012345678901234567890123456789"] {
                let answer = try await HTTPTestClient.request(.POST, port: port, path, headers: [("Content-Type", "application/json")],
                                                              body: "{\"body\":{\"n\":\(number)}}", token: token)
                #expect(answer.status == 400 || answer.status == 201, "\(number): \(answer.body)")
                if answer.status == 201 { #expect(answer.json["message"] != nil) }
            }
            let bad = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic%ZZ/messages", token: token)
            #expect(bad.status == 400)
            // Over WebSocket: an error reply, the connection stays.
            let ws = try await WSTestClient.connect(port: port, token: token)
            try await ws.send("{\"type\":\"ping\",\"x\":" + String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000) + "}")
            #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "BAD_REQUEST")
            try await ws.send(["type": "ping", "id": "alive"])
            #expect(try await ws.reply("pong")["id"] as? String == "alive")
            await ws.close()
            // Only the huge-number publishes that were accepted are stored; none of the refused ones.
            let history = try await HTTPTestClient.request(.GET, port: port, path, token: token)
            let stored = (history.json["messages"] as? [[String: Any]]) ?? []
            #expect(stored.allSatisfy { ($0["body"] as? [String: Any])?["n"] != nil })
            try await Self.expectServing(port)
        }
    }

    @Test func stalledRequestsAndHandshakesAreClosedWhileOthersAreServed() async throws {
        try await withTestGateway(configure: { $0.requestIdleSeconds = 1 }) { gateway in
            let port = gateway.port
            // Half a request head, then silence: closed without an answer.
            async let stalled = RawClient.exchange(port: port, "GET /healthz HTTP/1.1\r\nHost: x\r\n")
            async let handshake = RawClient.exchange(port: port, "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            async let silent = RawClient.exchange(port: port, "")
            try await Self.expectServing(port)
            #expect(try await stalled == "")
            #expect(try await handshake == "")
            #expect(try await silent == "")
            try await Self.expectServing(port)
        }
    }

    @Test func originsOutsideTheAllowedListAreRefused() async throws {
        try await withTestGateway(configure: { $0.allowedOrigins = ["https://chat.example"] }) { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let upgrade = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]
            let evil = try await HTTPTestClient.request(.GET, port: port, "/v1/ws", headers: upgrade + [("Origin", "https://evil.example")], token: token)
            #expect(evil.status == 403)
            #expect(evil.json["code"] as? String == "FORBIDDEN")
            let sse = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:o/events", headers: [("Origin", "https://evil.example")], token: token)
            #expect(sse.status == 403)
            let good = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:o/messages", headers: [("Origin", "https://chat.example")], token: token)
            #expect(good.status == 200)
            // Non-browser clients send no Origin and are not affected.
            let ws = try await WSTestClient.connect(port: port, token: token)
            await ws.close()
        }
    }

    @Test func aConnectionMakingTooManyRequestsGets429AndIsClosed() async throws {
        try await withTestGateway(configure: { $0.connectionRequestRate = 1; $0.connectionRequestBurst = 3 }) { gateway in
            let requests = String(repeating: "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", count: 6)
            let raw = try await RawClient.exchange(port: gateway.port, requests)
            let statuses = raw.components(separatedBy: "HTTP/1.1 ").dropFirst().map { Int($0.prefix(3)) ?? 0 }
            #expect(statuses == [200, 200, 200, 429], "\(raw)")
            #expect(raw.contains("RATE_LIMITED"))
            // Other connections are not affected.
            try await Self.expectServing(gateway.port)
        }
    }

    @Test func badHandshakesGetTheRightStatus() async throws {
        try await withTestGateway(configure: { $0.echo = true }) { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let base = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
            let key = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            let cases: [([(String, String)], Int, String)] = [
                (base + [key, ("Sec-WebSocket-Version", "8")], 426, "UPGRADE_REQUIRED"),
                (base + [("Sec-WebSocket-Version", "13")], 400, "BAD_REQUEST"),
                (base + [("Sec-WebSocket-Key", "c2hvcnQ="), ("Sec-WebSocket-Version", "13")], 400, "BAD_REQUEST"),
                ([("Upgrade", "websocket"), ("Connection", "keep-alive"), key, ("Sec-WebSocket-Version", "13")], 400, "BAD_REQUEST"),
                ([], 426, "UPGRADE_REQUIRED"),
            ]
            for path in ["/v1/ws", "/v1/echo"] {
                for (headers, status, code) in cases {
                    let answer = try await HTTPTestClient.request(.GET, port: port, path, headers: headers, token: token)
                    #expect(answer.status == status, "\(path) \(headers): \(answer.body)")
                    #expect(answer.json["code"] as? String == code)
                    if status == 426 { #expect(answer.headers.first(name: "Sec-WebSocket-Version") == "13") }
                }
                // A handshake is a GET (RFC 6455 §4.1): the same headers on another method are not upgraded.
                for method in [HTTPMethod.POST, .PUT] {
                    let answer = try await HTTPTestClient.request(method, port: port, path, headers: base + [key, ("Sec-WebSocket-Version", "13")],
                                                                  body: "", token: token)
                    #expect(answer.status == 405, "\(method) \(path): \(answer.status) \(answer.body)")
                    #expect(answer.json["code"] as? String == "METHOD_NOT_ALLOWED")
                    #expect(answer.headers.first(name: "Allow") == "GET, OPTIONS")
                }
            }
            try await Self.expectServing(port)
        }
    }

    /// RFC 9110 §9.3.2: `HEAD` of a whole answer gets what `GET` gets (status, headers, `Content-Length`)
    /// without the body, so a load balancer's `HEAD /healthz` works; a stream (events, poll, WebSocket) is
    /// refused with 405 and an `Allow` without HEAD.
    @Test func headIsAnsweredAsGetWithoutTheBody() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            // Pipelined on one connection: the HEAD answer carries no body, so the GET answer after it parses.
            let raw = try await RawClient.exchange(port: port,
                "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            let answers = Array(raw.components(separatedBy: "HTTP/1.1 ")[1...])
            #expect(answers.map { $0.prefix(3) } == ["200", "200"], "\(raw)")
            #expect(answers.first?.contains("Content-Length: 15\r\n") == true && answers.first?.hasSuffix("\r\n\r\n") == true, "\(raw)")
            #expect(answers.last?.hasSuffix("\r\n\r\n{\"status\":\"ok\"}") == true, "\(raw)")
            let history = try await RawClient.exchange(port: port,
                "HEAD /v1/channels/topic:a/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\n\r\n")
            #expect(history.hasPrefix("HTTP/1.1 200 ") && history.hasSuffix("\r\n\r\n"), "\(history)")
            let anonymous = try await RawClient.exchange(port: port, "HEAD /v1/threads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            #expect(anonymous.hasPrefix("HTTP/1.1 401 ") && anonymous.hasSuffix("\r\n\r\n"), "\(anonymous)")
            for path in ["/v1/channels/topic:a/events", "/v1/channels/topic:a/poll", "/v1/ws"] {
                let answer = try await RawClient.exchange(port: port,
                    "HEAD \(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nConnection: close\r\n\r\n")
                #expect(answer.hasPrefix("HTTP/1.1 405 ") && answer.contains("\r\nAllow: GET, OPTIONS\r\n"), "\(path): \(answer)")
            }
            let options = try await HTTPTestClient.request(.OPTIONS, port: port, "/readyz")
            #expect(options.headers.first(name: "Allow") == "GET, HEAD, OPTIONS")
            let post = try await HTTPTestClient.request(.POST, port: port, "/healthz", body: "")
            #expect(post.status == 405 && post.headers.first(name: "Allow") == "GET, HEAD, OPTIONS")
        }
    }

    /// RFC 9112 §6.1: no chunked body to an HTTP/1.0 client; its event stream is the bytes up to the close.
    @Test func anEventStreamToAnHTTP10ClientIsNotChunked() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            #expect(try await HTTPTestClient.publish(port: gateway.port, channel: "topic:old", body: ["n": 1], token: token).status == 201)
            let bytes = try await RawClient.read(port: gateway.port,
                "GET /v1/channels/topic:old/events?history=1 HTTP/1.0\r\nAuthorization: Bearer \(token)\r\nAccept: text/event-stream\r\n\r\n",
                until: Array("}}\n\n".utf8))
            let text = String(decoding: bytes, as: UTF8.self)
            let parts = text.components(separatedBy: "\r\n\r\n")
            let head = parts[0].lowercased()
            #expect(head.hasPrefix("http/1.0 200 ") && head.contains("\r\nconnection: close") && !head.contains("transfer-encoding"), "\(text)")
            let body = parts.dropFirst().joined(separator: "\r\n\r\n")
            #expect(body.hasPrefix(": stream open\nretry: 2000\nid: ") && body.contains("\n\nid: 1.") && body.contains("event: message\ndata: {"), "\(text)")
        }
    }

    /// An open event stream's connection takes no other request (the request parsing leaves it, keeping the idle
    /// stream small): what the client sends afterwards — a request, garbage — is read and dropped, and the stream
    /// goes on.
    @Test func bytesAfterAnEventStreamOpensAreDroppedAndTheStreamGoesOn() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let text = try await within(20, "event stream") { () async throws -> String in
                let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connect(host: "127.0.0.1", port: gateway.port) { channel in
                        channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
                    }
                return try await channel.executeThenClose { inbound, outbound in
                    try await outbound.write(ByteBuffer(string: "GET /v1/channels/topic:after/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\n\r\n"))
                    var received: [UInt8] = []
                    var sentMore = false
                    for try await chunk in inbound {
                        received += chunk.readableBytesView
                        if !sentMore, received.firstRange(of: Array(": stream open".utf8)) != nil {
                            sentMore = true
                            try await outbound.write(ByteBuffer(string: "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\u{0}\u{1}not http at all\r\n\r\n"))
                            #expect(try await HTTPTestClient.publish(port: gateway.port, channel: "topic:after", body: ["n": 1], token: token).status == 201)
                        }
                        if received.firstRange(of: Array("\"n\":1}}".utf8)) != nil { break }
                    }
                    return String(decoding: received, as: UTF8.self)
                }
            }
            #expect(text.components(separatedBy: "HTTP/1.1 ").count == 2, "one response only: \(text)")
            #expect(text.contains("event: message\ndata: {"), "\(text)")
            try await Self.expectServing(gateway.port)
        }
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
        try await withTestGateway { gateway in
            let raw = try await RawClient.exchange(port: gateway.port,
                "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            let statuses = raw.components(separatedBy: "HTTP/1.1 ").dropFirst().map { Int($0.prefix(3)) ?? 0 }
            #expect(statuses == [200, 404, 200], "\(raw)")
        }
    }
}

/// A body announced larger than the limit is refused from its `Content-Length`, before it is sent.
@Suite struct EarlyPayloadTooLargeTests {
    @Test func oversizedContentLengthIsAnswered413BeforeTheBodyIsSent() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            // Only the head: a server that waited for 100 MB of body would never answer (the idle timer would
            // close the connection without a response).
            let answer = try await RawClient.exchange(port: gateway.port, """
                POST /v1/channels/topic:big/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100000000\r\nAuthorization: Bearer \(token)\r\n\r\n
                """)
            #expect(answer.hasPrefix("HTTP/1.1 413"), "\(answer.prefix(200))")
            #expect(answer.contains("PAYLOAD_TOO_LARGE") && answer.lowercased().contains("connection: close"))
            #expect(try await HTTPTestClient.request(.GET, port: gateway.port, "/healthz").status == 200)
        }
    }
}

/// History and long-poll pages are capped in bytes as well as in messages, so serving a huge page costs a
/// bounded amount of memory; the client pages on with the cursor and loses nothing.
@Suite(.serialized) struct PageBytesTests {
    @Test func aThousandMessagesOf64KiBComeInCappedPagesAndTheGatewayStaysSmall() async throws {
        let cap = 4 * 1024 * 1024
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_PAGE_BYTES": String(cap)]) }, stop: { await $0.stop() }) { gateway in
            let port = gateway.port
            let token = try await TestGateway.token()
            let channel = "topic:big-pages"
            let pad = String(repeating: "p", count: 63 * 1024)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<4 {
                    group.addTask {
                        for i in stride(from: w, to: 1000, by: 4) {
                            let answer = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i, "pad": pad], token: token)
                            guard answer.status == 201 else { throw ServiceError(description: "publish answered \(answer.status)") }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let zero = try await HTTPTestClient.zeroCursor(port: port, channel: channel, token: token)
            let (first, growth) = try await gateway.residentGrowth {
                try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(zero)&limit=1000", token: token)
            }
            let firstPage = first.json["messages"] as? [[String: Any]] ?? []
            print("1,000 × 64 KiB history: first page \(firstPage.count) messages, \(first.body.utf8.count / 1024) KiB (cap \(cap / 1024) KiB); gateway RSS growth while serving it \(growth / 1024) KiB")
            #expect(first.status == 200)
            #expect(first.json["has_more"] as? Bool == true)
            #expect(firstPage.count > 0 && firstPage.count < 1000)
            #expect(first.body.utf8.count <= cap + 64 * 1024 + 1024)
            // About one cap each for the rows read, their messages, the page's text and its bytes, plus the
            // allocator's slack: 6 caps (uncapped, one such page grew the process by ~250 MiB).
            #expect(growth < 6 * cap, "RSS grew \(growth / 1024) KiB serving one page")
            // Paging on with the cursor gets every message once, in order; a long-poll is capped the same way.
            var seqs = firstPage.map { Received($0).seq }
            var cursor = first.json["cursor"] as? String ?? ""
            var hasMore = true
            while hasMore {
                let page = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(cursor)&limit=1000", token: token)
                seqs += (page.json["messages"] as? [[String: Any]] ?? []).map { Received($0).seq }
                cursor = page.json["cursor"] as? String ?? ""
                hasMore = page.json["has_more"] as? Bool ?? false
            }
            #expect(seqs == Array(1...1000))
            let poll = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?since=\(zero)&limit=1000&timeout=0", token: token)
            #expect((poll.json["messages"] as? [Any])?.count == firstPage.count && poll.json["has_more"] as? Bool == true,
                    "poll answered \(poll.status) with \((poll.json["messages"] as? [Any])?.count ?? -1) messages")
            // The latest page keeps the newest messages.
            let latest = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?limit=1000", token: token)
            let latestSeqs = (latest.json["messages"] as? [[String: Any]] ?? []).map { Received($0).seq }
            #expect(latestSeqs.last == 1000 && latestSeqs == Array((1001 - Int64(latestSeqs.count))...1000) && latest.json["has_more"] as? Bool == true)
        }
    }
}
