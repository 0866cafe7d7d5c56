import Foundation
@testable import Gateway
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOWebSocket

/// A WebSocket client over a real socket (NIO's client upgrader); frames are masked as RFC 6455 requires
/// unless a test says otherwise.
final class WSTestClient: @unchecked Sendable {  // used from one test task at a time
    enum Upgrade: Sendable {
        case websocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, extensions: String?)
        case refused
    }
    /// The server's `Sec-WebSocket-Extensions` answer, and an inflater when it agreed permessage-deflate.
    private(set) var extensions: String?
    private var inflater: DeflateInflater?
    /// Compressed (RSV1) frames received, and the raw payload of the last one.
    private(set) var compressedFrames = 0
    private(set) var lastCompressedPayload: ByteBuffer?

    private let channel: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>
    private var iterator: NIOAsyncChannelInboundStream<WebSocketFrame>.AsyncIterator
    /// Set once the server sent a close frame.
    private(set) var closeCode: UInt16?
    private var fragments: ByteBuffer?

    static func connect(port: Int, token: String?, path: String = "/v1/ws", extensions offer: String? = nil,
                        headers extra: [(String, String)] = [], tls: NIOSSLContext? = nil) async throws -> WSTestClient {
        let upgrade: EventLoopFuture<Upgrade> = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.addTestTLS(tls)
                    let upgrader = NIOTypedWebSocketClientUpgrader<Upgrade>(maxFrameSize: 1 << 24, upgradePipelineHandler: { channel, response in
                        channel.eventLoop.makeCompletedFuture {
                            .websocket(try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(wrappingChannelSynchronously: channel),
                                       extensions: response.headers.first(name: "sec-websocket-extensions"))
                        }
                    })
                    var headers = HTTPHeaders()
                    headers.add(name: "Host", value: "127.0.0.1:\(port)")
                    if let token { headers.add(name: "Authorization", value: "Bearer \(token)") }
                    if let offer { headers.add(name: "Sec-WebSocket-Extensions", value: offer) }
                    for (name, value) in extra { headers.add(name: name, value: value) }
                    let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)
                    let config = NIOTypedHTTPClientUpgradeConfiguration<Upgrade>(
                        upgradeRequestHead: head, upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in channel.eventLoop.makeSucceededFuture(.refused) })
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: .init(upgradeConfiguration: config))
                }
            }
        switch try await upgrade.get() {
        case .websocket(let channel, let extensions):
            let client = WSTestClient(channel: channel)
            client.extensions = extensions
            client.inflater = PermessageDeflate.negotiate(extensions).map(DeflateInflater.init)
            return client
        case .refused: throw WSRefused()
        }
    }

    struct WSRefused: Error {}

    private init(channel: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) {
        self.channel = channel
        self.iterator = channel.inbound.makeAsyncIterator()
    }

    func sendFrame(_ frame: WebSocketFrame) async throws {
        try await channel.outbound.write(frame)
    }

    func send(_ text: String) async throws {
        try await sendFrame(WebSocketFrame(fin: true, opcode: .text, maskKey: .random(), data: ByteBuffer(string: text)))
    }

    /// A text message compressed with permessage-deflate (RSV1 set).
    func sendCompressed(_ text: String) async throws {
        let payload = PermessageDeflate.compress(ByteBuffer(string: text))!
        try await sendFrame(WebSocketFrame(fin: true, rsv1: true, opcode: .text, maskKey: .random(), data: payload))
    }

    func send(_ object: [String: Any]) async throws {
        try await send(jsonText(object))
    }

    /// The next complete text message (pings are answered, pongs skipped); nil once the server closed.
    func nextText() async throws -> String? {
        while closeCode == nil {
            guard let frame = try await iterator.next() else { return nil }
            switch frame.opcode {
            case .text where frame.rsv1:
                guard let inflater else { throw WSRefused() }
                compressedFrames += 1
                lastCompressedPayload = frame.unmaskedData
                return String(buffer: try inflater.inflate(frame.unmaskedData, limit: 1 << 24))
            case .text, .continuation:
                var data = frame.unmaskedData
                if frame.fin && fragments == nil { return String(buffer: data) }
                var buffer = fragments ?? ByteBuffer()
                buffer.writeBuffer(&data)
                if frame.fin {
                    fragments = nil
                    return String(buffer: buffer)
                }
                fragments = buffer
            case .ping:
                try await sendFrame(WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData))
            case .connectionClose:
                var data = frame.unmaskedData
                closeCode = data.readInteger(as: UInt16.self) ?? 1005
                // As RFC 6455 §5.5.1 asks: the close is answered (the server then closes the TCP connection).
                var reply = ByteBuffer()
                if let code = closeCode, code != 1005 { reply.writeInteger(code) }
                try? await sendFrame(WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: reply))
                return nil
            default:
                continue
            }
        }
        return nil
    }

    /// The next JSON object from the server.
    func next(timeout: Double = 30) async throws -> [String: Any]? {
        nonisolated(unsafe) let client = self
        let text = try await within(timeout, "WebSocket message") { try await client.nextText() }
        return text.map { json($0) }
    }

    /// Reads until a reply of `type` (skipping channel messages); fails on close.
    func reply(_ type: String, timeout: Double = 30) async throws -> [String: Any] {
        while let object = try await next(timeout: timeout) {
            if object["type"] as? String == type { return object }
            if object["type"] as? String == "error" && type != "error" { return object }
        }
        throw WSRefused()
    }

    /// Reads until the server closes; returns the close code.
    func waitForClose(timeout: Double = 30) async throws -> UInt16? {
        nonisolated(unsafe) let client = self
        return try await within(timeout, "WebSocket close") {
            while try await client.nextText() != nil {}
            return client.closeCode
        }
    }

    /// Collects `count` channel messages (the `message` objects), skipping replies.
    /// The seqs of the messages read until an `unsubscribed` (or the end of the connection), and its reason.
    func seqsUntilUnsubscribed(timeout: Double = 20) async throws -> (seqs: [Int64], reason: String?) {
        var seqs: [Int64] = []
        while let object = try await next(timeout: timeout) {
            if object["type"] as? String == "message" { seqs.append(Received(object["message"] as! [String: Any]).seq) }
            if object["type"] as? String == "unsubscribed" { return (seqs, object["reason"] as? String) }
        }
        return (seqs, nil)
    }

    func messages(_ count: Int, timeout: Double = 60) async throws -> [Received] {
        nonisolated(unsafe) let client = self
        let texts = try await within(timeout, "WebSocket messages") {
            var out: [String] = []
            while out.count < count, let text = try await client.nextText() {
                if json(text)["type"] as? String == "message" { out.append(text) }
            }
            return out
        }
        return texts.compactMap { (json($0)["message"] as? [String: Any]).map(Received.init) }
    }

    /// Reads `count` channel messages keeping only their seqs (for large volumes).
    func messageSeqs(_ count: Int, timeout: Double = 120) async throws -> [Int64] {
        nonisolated(unsafe) let client = self
        return try await within(timeout, "WebSocket messages") {
            var out: [Int64] = []
            while out.count < count, let text = try await client.nextText() {
                guard text.hasPrefix("{\"type\":\"message\"") else { continue }
                if let range = text.range(of: "\"seq\":"), let end = text[range.upperBound...].firstIndex(of: ",") {
                    out.append(Int64(text[range.upperBound..<end]) ?? -1)
                }
            }
            return out
        }
    }

    func close() async {
        channel.outbound.finish()
        try? await channel.channel.close()
    }

    deinit {
        channel.outbound.finish()
        channel.channel.close(promise: nil)
    }
}
