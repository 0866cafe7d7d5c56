import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A WebSocket client on a bare NIO channel: it writes the handshake and frames itself and collects every
/// byte the server sends (NIO's client upgrader can lose bytes that arrive right behind the 101). With
/// `reading: false` it reads nothing until `readToEnd` (a tiny receive buffer, reading off).
final class RawWebSocketClient: @unchecked Sendable {  // used from one test task
    let channel: any Channel
    private let collected = NIOLockedValueBox<[UInt8]>([])
    private let closed: EventLoopPromise<Void>

    init(port: Int, token: String, reading: Bool = true) async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let closed = loop.makePromise(of: Void.self)
        let collected = self.collected
        channel = try await ClientBootstrap(group: loop)
            .channelOption(ChannelOptions.socketOption(.so_rcvbuf), value: reading ? 128 * 1024 : 4096)
            .channelOption(ChannelOptions.autoRead, value: reading)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Collector(collected)) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        self.closed = closed
        channel.closeFuture.cascade(to: closed)
        let request = "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer \(token)\r\n\r\n"
        try await channel.writeAndFlush(ByteBuffer(string: request))
    }

    final class Collector: ChannelInboundHandler, @unchecked Sendable {  // on the channel's loop
        typealias InboundIn = ByteBuffer
        let collected: NIOLockedValueBox<[UInt8]>
        init(_ collected: NIOLockedValueBox<[UInt8]>) { self.collected = collected }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = Array(unwrapInboundIn(data).readableBytesView)
            collected.withLockedValue { $0 += bytes }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    /// A masked text frame.
    static func frame(_ text: String) -> ByteBuffer {
        let payload = Array(text.utf8)
        precondition(payload.count < 126)
        let mask: [UInt8] = [1, 2, 3, 4]
        var buffer = ByteBuffer()
        buffer.writeBytes([0x81, 0x80 | UInt8(payload.count)] + mask)
        buffer.writeBytes(payload.enumerated().map { $0.element ^ mask[$0.offset % 4] })
        return buffer
    }

    /// Writes `count` ping commands, `batch` per write; stops early if the server closed.
    func sendPings(_ count: Int, batch: Int = 1000) async {
        var sent = 0
        while sent < count {
            var buffer = ByteBuffer()
            for i in sent..<min(count, sent + batch) { var f = Self.frame("{\"type\":\"ping\",\"id\":\"\(i)\"}"); buffer.writeBuffer(&f) }
            sent += batch
            do { try await channel.writeAndFlush(buffer) } catch { return }
        }
    }

    /// Starts reading; returns everything the server sent once it closed the connection.
    func readToEnd(timeout: Double = 60) async throws -> [UInt8] {
        _ = try await channel.setOption(ChannelOptions.autoRead, value: true).get()
        channel.read()
        let closed = self.closed
        try await within(timeout, "server closes") { try? await closed.futureResult.get() }
        return collected.withLockedValue { $0 }
    }

    /// Closes the connection (no close handshake).
    func close() async {
        try? await channel.close()
    }

    /// Everything received so far.
    var received: [UInt8] { collected.withLockedValue { $0 } }

    /// Sends one text frame.
    func send(_ text: String) async throws {
        try await channel.writeAndFlush(Self.frame(text))
    }

    /// Server frames after the 101: (opcode, payload).
    static func frames(_ bytes: [UInt8]) -> [(UInt8, [UInt8])] {
        guard let end = bytes.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return [] }
        var out: [(UInt8, [UInt8])] = []
        var i = end
        while i + 2 <= bytes.count {
            let opcode = bytes[i] & 0x0F
            var length = Int(bytes[i + 1] & 0x7F)
            var start = i + 2
            if length == 126 { guard start + 2 <= bytes.count else { break }; length = Int(bytes[start]) << 8 | Int(bytes[start + 1]); start += 2 }
            if length == 127 { break }
            guard start + length <= bytes.count else { break }
            out.append((opcode, Array(bytes[start..<start + length])))
            i = start + length
        }
        return out
    }

    static func closeCode(_ frames: [(UInt8, [UInt8])]) -> UInt16? {
        guard let close = frames.first(where: { $0.0 == 0x8 }), close.1.count >= 2 else { return nil }
        return UInt16(close.1[0]) << 8 | UInt16(close.1[1])
    }
}

