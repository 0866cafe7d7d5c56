import ChatDomain
import Foundation
@testable import Gateway
import NIOCore
import NIOWebSocket
import Testing

/// RFC 7692 permessage-deflate: negotiation, both directions over a real socket, one compressed frame shared
/// by every subscriber, and what it saves.
struct DeflateTests {
    @Test func negotiationPicksAnOfferItCanHonour() {
        #expect(PermessageDeflate.negotiate(nil) == nil)
        #expect(PermessageDeflate.negotiate("x-webkit-deflate-frame") == nil)
        #expect(PermessageDeflate.negotiate("permessage-deflate")?.responseHeader == "permessage-deflate; server_no_context_takeover")
        #expect(PermessageDeflate.negotiate("permessage-deflate; client_max_window_bits")?.clientNoContextTakeover == false)
        #expect(PermessageDeflate.negotiate("permessage-deflate; client_no_context_takeover")?.responseHeader
                == "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        // A limited server window is honoured (with the shared small window); 8 bits cannot be, the next offer is taken.
        let limited = PermessageDeflate.negotiate("permessage-deflate; server_max_window_bits=10")
        #expect(limited?.responseHeader == "permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
        #expect(limited?.windowBits == 9)
        #expect(PermessageDeflate.negotiate("permessage-deflate; server_max_window_bits=8, permessage-deflate; client_no_context_takeover")?
                    .clientNoContextTakeover == true)
        #expect(PermessageDeflate.negotiate("permessage-deflate; server_max_window_bits=8") == nil)
        // Unknown or repeated parameters make an offer invalid.
        #expect(PermessageDeflate.negotiate("permessage-deflate; foo=1") == nil)
        #expect(PermessageDeflate.negotiate("permessage-deflate; client_no_context_takeover; client_no_context_takeover") == nil)
    }

    @Test func compressedMessagesRoundTripAndAZipBombIsRefused() throws {
        let text = String(repeating: "{\"text\":\"hello, hello, hello\"}", count: 40)
        let compressed = try #require(PermessageDeflate.compress(ByteBuffer(string: text)))
        #expect(compressed.readableBytes < text.utf8.count / 5)
        let agreement = PermessageDeflate.Agreement(clientNoContextTakeover: false)
        var framing = WebSocketFraming(maxMessageBytes: 10_000, inflater: DeflateInflater(agreement))
        let key = WebSocketMaskingKey.random()
        var masked = compressed
        masked.webSocketMask(key)
        #expect(framing.receive(WebSocketFrame(fin: true, rsv1: true, opcode: .text, maskKey: key, data: masked)) == .text(text))
        // Decompressing past the message limit fails with 1009, however small the compressed frame.
        let bomb = try #require(PermessageDeflate.compress(ByteBuffer(string: String(repeating: "a", count: 50_000))))
        var bombFrame = bomb
        bombFrame.webSocketMask(key)
        #expect(framing.receive(WebSocketFrame(fin: true, rsv1: true, opcode: .text, maskKey: key, data: bombFrame)) == .fail(code: 1009, reason: "message too big"))
        // Without the extension, RSV1 is a protocol error.
        var plain = WebSocketFraming(maxMessageBytes: 10_000)
        #expect(plain.receive(WebSocketFrame(fin: true, rsv1: true, opcode: .text, maskKey: key, data: masked)) == .fail(code: 1002, reason: "reserved bits set"))
    }

    @Test func subscribersShareOneCompressedFrameAndCompressedCommandsWork() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let channel = "topic:deflate"
            let a = try await WSTestClient.connect(port: port, token: token, extensions: "permessage-deflate; client_max_window_bits")
            let b = try await WSTestClient.connect(port: port, token: token, extensions: "permessage-deflate")
            let plain = try await WSTestClient.connect(port: port, token: token)
            let small = try await WSTestClient.connect(port: port, token: token, extensions: "permessage-deflate; server_max_window_bits=10")
            #expect(a.extensions == "permessage-deflate; server_no_context_takeover")
            #expect(small.extensions == "permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
            #expect(plain.extensions == nil)
            for client in [a, b, plain, small] {
                try await client.send(["type": "subscribe", "id": "s", "channel": channel])
                _ = try await client.reply("subscribed")
            }
            // A compressed publish command is understood and acked.
            let text = String(repeating: "the quick brown fox jumps over the lazy dog. ", count: 20)
            let publisher = try await WSTestClient.connect(port: port, token: token, extensions: "permessage-deflate")
            try await publisher.sendCompressed(jsonText(["type": "publish", "id": "p", "channel": channel, "body": ["text": text]]))
            #expect(try await publisher.reply("ack")["id"] as? String == "p")
            #expect(publisher.compressedFrames == 0, "a short reply goes uncompressed")
            await publisher.close()
            for client in [a, b, plain, small] {
                let received = try await client.messages(1)
                #expect((received.first?.object["body"] as? [String: Any])?["text"] as? String == text)
            }
            #expect(a.compressedFrames == 1 && b.compressedFrames == 1 && small.compressedFrames == 1 && plain.compressedFrames == 0)
            // The same bytes for both: compressed once, shared.
            #expect(a.lastCompressedPayload == b.lastCompressedPayload)
            for client in [a, b, plain, small] { await client.close() }
        }
    }

    @Test func bandwidthOfTenThousandChatMessagesWithAndWithoutDeflate() throws {
        var plain = 0
        var deflated = 0
        let words = ["hey", "are", "you", "coming", "to", "the", "standup", "today", "I", "think", "we", "should", "ship", "it", "after", "lunch", "ok", "sounds", "good", "👍"]
        var random = SplitMix(seed: 7692)
        let channel = try ChannelName(parsing: "thread:0193a6c4-5a1e-7c3b-9f00-2a6f4e1d9b10")
        for i in 0..<10_000 {
            let text = (0..<Int.random(in: 4...30, using: &random)).map { _ in words.randomElement(using: &random)! }.joined(separator: " ")
            let message = Message(id: UUIDv7.make(), channel: channel, seq: Int64(i + 1), createdAtMicros: Timestamp.nowMicros(), sender: "alice",
                                  requestId: nil, body: jsonText(["text": text, "client_msg_id": UUID().uuidString.lowercased()]))
            plain += WireEncoding.encoder(message, .webSocket).readableBytes
            deflated += WireEncoding.encoder(message, .webSocketDeflate).readableBytes
        }
        print("bandwidth: 10,000 chat messages as WebSocket frames: \(plain) bytes plain, \(deflated) bytes with permessage-deflate (\(deflated * 100 / plain)%)")
        #expect(deflated < plain)
    }
}
