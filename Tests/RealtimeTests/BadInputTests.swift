import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket
import Testing

/// Every kind of bad input gets its documented reply, and nothing is stored.
@Suite(.serialized) struct BadInputTests {
    static func errorCode(_ reply: [String: Any]) -> String? {
        (reply["error"] as? [String: Any])?["code"] as? String
    }

    static func expectEnvelope(_ response: HTTPTestResponse, status: Int, code: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(response.status == status, "status", sourceLocation: sourceLocation)
        let body = response.json
        #expect(body["code"] as? String == code, "code in \(response.body)", sourceLocation: sourceLocation)
        #expect(body["message"] is String, sourceLocation: sourceLocation)
        #expect(body["details"] is [String: Any], sourceLocation: sourceLocation)
        #expect(body["requestId"] as? String == response.headers.first(name: "X-Request-Id"), sourceLocation: sourceLocation)
    }

    @Test func webSocketCommandsGetErrorRepliesAndTheConnectionStaysOpen() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let ws = try await WSTestClient.connect(port: port, token: token)

            try await ws.send("{not json")
            #expect(Self.errorCode(try await ws.reply("error")) == "BAD_REQUEST")
            try await ws.send(["type": "dance", "id": "1"])
            let unknown = try await ws.reply("error")
            #expect(Self.errorCode(unknown) == "UNKNOWN_COMMAND")
            #expect(unknown["id"] as? String == "1")
            try await ws.send(["type": "subscribe", "id": "2", "channel": "room:1"])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_CHANNEL")
            try await ws.send(["type": "publish", "id": "3", "channel": "topic:UPPER", "body": ["a": 1]])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_CHANNEL")
            try await ws.send(["type": "subscribe", "id": "4", "channel": "topic:bad", "since": "garbage"])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_CURSOR")
            // A well-formed cursor of another channel.
            let other = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:other/messages", token: token)
            let otherCursor = other.json["cursor"] as! String
            try await ws.send(["type": "subscribe", "id": "5", "channel": "topic:bad", "since": otherCursor])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_CURSOR")
            // A cursor past the channel's end.
            let ahead = otherCursor.replacingOccurrences(of: "0.", with: "99.")
            try await ws.send(["type": "subscribe", "id": "5b", "channel": "topic:other", "since": ahead])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_CURSOR")
            try await ws.send(["type": "publish", "id": "6", "channel": "topic:bad", "body": ["big": String(repeating: "x", count: 70_000)]])
            #expect(Self.errorCode(try await ws.reply("error")) == "PAYLOAD_TOO_LARGE")
            try await ws.send(["type": "publish", "id": "7", "channel": "topic:bad", "body": "not an object"])
            #expect(Self.errorCode(try await ws.reply("error")) == "INVALID_BODY")
            // An id the reply could not carry back is refused (the publish stores nothing), not dropped.
            try await ws.send(["type": "publish", "id": ["a": 1], "channel": "topic:bad", "body": ["a": 1]])
            let badId = try await ws.reply("error")
            #expect(Self.errorCode(badId) == "BAD_REQUEST" && badId["id"] == nil, "\(badId)")
            try await ws.send(["type": "publish", "id": true, "channel": "topic:bad", "body": ["a": 1]])
            #expect(Self.errorCode(try await ws.reply("error")) == "BAD_REQUEST")
            try await ws.send(["type": "ping", "id": "8"])
            let pong = try await ws.reply("pong")
            #expect(pong["id"] as? String == "8")

            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:bad/messages", token: token)
            #expect((history.json["messages"] as? [Any])?.isEmpty == true)
            await ws.close()
        }
    }

    @Test func invalidUTF8ClosesWith1007() async throws {
        try await withTestGateway { gateway in
            let ws = try await WSTestClient.connect(port: gateway.port, token: try await gateway.token())
            try await ws.sendFrame(WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: ByteBuffer(bytes: [0x7B, 0xFF, 0xFE, 0x7D])))
            #expect(try await ws.waitForClose() == 1007)
        }
    }

    /// Fail fast within a frame (RFC 6455 §8.1): the first part of a text frame with an invalid byte in it is
    /// enough for close 1007 — the rest of the frame never comes.
    @Test func invalidUTF8InAFrameStillArrivingClosesWith1007() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let key: [UInt8] = [0x11, 0x22, 0x33, 0x44]
            let payload = Array("{\"type\":\"ping\",\"id\":\"".utf8) + [0xC0, 0xAF]  // an overlong '/': never UTF-8
            // A text frame announcing 200 bytes, of which only the first few are sent.
            let frame = [0x81, 0x80 | 126, 0, 200] + key + payload.enumerated().map { $0.element ^ key[$0.offset % 4] }
            let handshake = "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer \(token)\r\n\r\n"
            let answer = try await within(20, "the close") {
                let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connect(host: "127.0.0.1", port: gateway.port) { channel in
                        channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
                    }
                return try await channel.executeThenClose { inbound, outbound in
                    try await outbound.write(ByteBuffer(string: handshake))
                    try await outbound.write(ByteBuffer(bytes: frame))
                    var received: [UInt8] = []
                    do { for try await chunk in inbound { received += chunk.readableBytesView } } catch {}
                    return received
                }
            }
            let head = String(decoding: answer, as: UTF8.self)
            #expect(head.hasPrefix("HTTP/1.1 101"), "\(head.prefix(200))")
            // After the 101's head: the close frame, code 1007.
            let end = try #require(answer.firstRange(of: Array("\r\n\r\n".utf8)))
            let close = Array(answer[end.upperBound...])
            #expect(close.count >= 4 && close[0] == 0x88 && Int(close[2]) << 8 | Int(close[3]) == 1007, "\(close)")
        }
    }

    @Test func protocolViolationsClose() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let unmasked = try await WSTestClient.connect(port: gateway.port, token: token)
            try await unmasked.sendFrame(WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: "{\"type\":\"ping\"}")))
            #expect(try await unmasked.waitForClose() == 1002)

            let tooBig = try await WSTestClient.connect(port: gateway.port, token: token)
            try await tooBig.send(String(repeating: "x", count: gateway.server.app.config.maxMessageBytes + 1))
            #expect(try await tooBig.waitForClose() == 1009)

            // The gateway still serves other clients.
            let fine = try await WSTestClient.connect(port: gateway.port, token: token)
            try await fine.send(["type": "ping", "id": "ok"])
            #expect(try await fine.reply("pong")["id"] as? String == "ok")
            await fine.close()
        }
    }

    /// What NIO's HTTP decoder cannot parse gets `400 BAD_REQUEST` (too large a head: `431`) with the envelope and a request id, like every
    /// error (NIO's own handler answered with an empty body), then the connection closes; a good request before it
    /// on the same connection is answered first, and a broken publish stores nothing.
    @Test func malformedHTTPIsAnsweredWithTheEnvelope() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let path = "/v1/channels/topic:unparsed/messages"
            func expectEnvelope400(_ raw: String, _ what: String, status: Int = 400, code: String = "BAD_REQUEST") throws {
                let answer = try #require(raw.range(of: "HTTP/1.1 \(status)").map { raw[$0.lowerBound...] }, "\(what): \(raw.prefix(300))")
                let parts = answer.components(separatedBy: "\r\n\r\n")
                let headers = parts[0].split(separator: "\r\n").dropFirst().map { $0.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) } }
                let requestId = headers.first { $0[0].lowercased() == "x-request-id" }?[1]
                let body = try #require(try JSONSerialization.jsonObject(with: Data(parts.dropFirst().joined(separator: "\r\n\r\n").utf8)) as? [String: Any],
                                        "\(what): \(answer.prefix(300))")
                #expect(body["code"] as? String == code, "\(what)")
                #expect(body["message"] is String && body["details"] is [String: Any], "\(what)")
                #expect(requestId != nil && body["requestId"] as? String == requestId, "\(what)")
                #expect(headers.contains { $0[0].lowercased() == "connection" && $0[1] == "close" }, "\(what)")
            }
            let cases = [
                ("a header line without a colon", "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"),
                ("a malformed Content-Length", "POST \(path) HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
                ("a broken chunk", "POST \(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(token)\r\nContent-Type: application/json\r\n"
                    + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"bod\r\nZZ\r\n"),
                ("a garbage request line", "BLAH\r\n\r\n"),
            ]
            for (what, request) in cases {
                try expectEnvelope400(try await ConnectionLimitTests.trickle(port: gateway.port, request, every: .zero), what)
            }
            // Header fields past the decoder's own bound: 431, as past the configured limit.
            try expectEnvelope400(try await ConnectionLimitTests.trickle(port: gateway.port, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                                                                          + String(repeating: "a", count: 100_000) + "\r\n\r\n", every: .zero),
                                  "100 KB of header", status: 431, code: "HEADERS_TOO_LARGE")
            // A good request, then a malformed one on the same kept-alive connection: 200 first, then the 400.
            let both = try await ConnectionLimitTests.trickle(port: gateway.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nBad\r\n\r\n", every: .zero)
            #expect(both.hasPrefix("HTTP/1.1 200"), "\(both.prefix(200))")
            try expectEnvelope400(both, "after a good request")
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, path, token: token)
            #expect((history.json["messages"] as? [Any])?.isEmpty == true, "nothing stored")
            try await HardeningTests.expectServing(gateway.port)
        }
    }

    @Test func httpErrorsUseTheEnvelopeAndStoreNothing() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let channel = "topic:http-bad"
            let path = "/v1/channels/\(channel)/messages"

            Self.expectEnvelope(try await HTTPTestClient.request(.POST, port: port, path, body: "{oops", token: token), status: 400, code: "BAD_REQUEST")
            Self.expectEnvelope(try await HTTPTestClient.request(.POST, port: port, path, body: "{\"body\": 5}", token: token), status: 400, code: "INVALID_BODY")
            Self.expectEnvelope(try await HTTPTestClient.publish(port: port, channel: "nope", body: ["a": 1], token: token), status: 400, code: "INVALID_CHANNEL")
            Self.expectEnvelope(try await HTTPTestClient.publish(port: port, channel: "thread:not-a-uuid", body: ["a": 1], token: token), status: 400, code: "INVALID_CHANNEL")
            Self.expectEnvelope(try await HTTPTestClient.publish(port: port, channel: channel, body: ["big": String(repeating: "y", count: 70_000)], token: token),
                                status: 413, code: "PAYLOAD_TOO_LARGE")
            let huge = "{\"body\":{\"x\":\"" + String(repeating: "z", count: gateway.server.app.config.maxMessageBytes) + "\"}}"
            Self.expectEnvelope(try await HTTPTestClient.request(.POST, port: port, path, body: huge, token: token), status: 413, code: "PAYLOAD_TOO_LARGE")
            Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, path + "?since=12", token: token), status: 400, code: "INVALID_CURSOR")
            let otherCursor = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:elsewhere/messages", token: token).json["cursor"] as! String
            Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, path + "?since=\(otherCursor)", token: token), status: 400, code: "INVALID_CURSOR")
            Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?since=\(otherCursor)&timeout=1", token: token),
                                status: 400, code: "INVALID_CURSOR")
            let sse = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/events", headers: [("Last-Event-ID", "bogus")], token: token)
            Self.expectEnvelope(sse, status: 400, code: "INVALID_CURSOR")
            Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, path + "?limit=0", token: token), status: 400, code: "BAD_REQUEST")
            Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, "/v1/nothing", token: token), status: 404, code: "NOT_FOUND")

            // Tokens: missing, malformed, badly signed, expired — on REST, SSE, long-poll and the WebSocket upgrade.
            let expired = try await gateway.token(ttl: -120)
            let forged = token.dropLast(4) + "AAAA"
            for bad in [nil, "not.a.jwt", String(forged), expired] {
                Self.expectEnvelope(try await HTTPTestClient.publish(port: port, channel: channel, body: ["a": 1], token: bad ?? ""), status: 401, code: "UNAUTHENTICATED")
                Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/events", token: bad), status: 401, code: "UNAUTHENTICATED")
                Self.expectEnvelope(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll", token: bad), status: 401, code: "UNAUTHENTICATED")
                let upgrade = try await HTTPTestClient.request(.GET, port: port, "/v1/ws", headers: [
                    ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
                ], token: bad)
                Self.expectEnvelope(upgrade, status: 401, code: "UNAUTHENTICATED")
                await #expect(throws: WSTestClient.WSRefused.self) { _ = try await WSTestClient.connect(port: port, token: bad) }
            }
            // A topic publish without the service or admin role.
            Self.expectEnvelope(try await HTTPTestClient.publish(port: port, channel: channel, body: ["a": 1], token: try await gateway.token("bob", roles: [])),
                                status: 403, code: "FORBIDDEN")

            let history = try await HTTPTestClient.request(.GET, port: port, path, token: token)
            #expect(history.status == 200)
            #expect((history.json["messages"] as? [Any])?.isEmpty == true)
            #expect(history.json["cursor"] as? String != nil)
        }
    }
}
