import Foundation
import NIOCore
import NIOPosix

/// The frames a WebSocket server sends (RFC 6455 §5.2: unmasked), cut whole out of the bytes as they arrive,
/// without NIO's frame decoder and its per-frame allocations: the load generator must stay lighter than what
/// it measures.
struct ServerFrameReader {
    struct Frame {
        let fin: Bool
        let opcode: UInt8
        /// A slice of the bytes read; valid to keep, but keeping it keeps the read buffer.
        let payload: ByteBuffer
    }

    enum Failure: Error, CustomStringConvertible {
        case masked, tooLarge(UInt64)
        var description: String {
            switch self {
            case .masked: "the server sent a masked frame"
            case .tooLarge(let length): "the server sent a frame of \(length) bytes"
            }
        }
    }

    static let maxPayload: UInt64 = 1 << 24
    /// The start of a frame whose rest has not arrived yet (a copy: the read buffer goes back to NIO).
    private var pending: ByteBuffer?

    /// Hands each whole frame in what came before plus `bytes` to `body`, in order; keeps an incomplete rest.
    mutating func read(_ bytes: inout ByteBuffer, _ body: (Frame) throws -> Void) throws {
        if var kept = pending {
            kept.writeBuffer(&bytes)
            bytes = kept
            pending = nil
        }
        while let frame = try Self.cut(&bytes) { try body(frame) }
        if bytes.readableBytes > 0 { pending = ByteBuffer(bytes.readableBytesView) }
    }

    /// The first whole frame of `bytes` (moved past), or nil when it has not all arrived.
    static func cut(_ bytes: inout ByteBuffer) throws -> Frame? {
        let start = bytes.readerIndex
        guard let first = bytes.getInteger(at: start, as: UInt8.self), let second = bytes.getInteger(at: start + 1, as: UInt8.self) else { return nil }
        guard second & 0x80 == 0 else { throw Failure.masked }
        var header = 2
        var length = UInt64(second & 0x7F)
        if length == 126 {
            guard let extended = bytes.getInteger(at: start + 2, as: UInt16.self) else { return nil }
            (header, length) = (4, UInt64(extended))
        } else if length == 127 {
            guard let extended = bytes.getInteger(at: start + 2, as: UInt64.self) else { return nil }
            (header, length) = (10, extended)
        }
        guard length <= maxPayload else { throw Failure.tooLarge(length) }
        guard bytes.readableBytes >= header + Int(length) else { return nil }
        bytes.moveReaderIndex(forwardBy: header)
        let payload = bytes.readSlice(length: Int(length))!
        return Frame(fin: first & 0x80 != 0, opcode: first & 0x0F, payload: payload)
    }

    /// A client frame (RFC 6455 §5.3: masked with a random key) with `fin` set.
    static func clientFrame(opcode: UInt8, _ payload: ByteBufferView) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(payload.count + 14)
        buffer.writeInteger(0x80 | opcode)
        if payload.count < 126 {
            buffer.writeInteger(UInt8(0x80 | payload.count))
        } else if payload.count <= 0xFFFF {
            buffer.writeInteger(UInt8(0x80 | 126))
            buffer.writeInteger(UInt16(payload.count))
        } else {
            buffer.writeInteger(UInt8(0x80 | 127))
            buffer.writeInteger(UInt64(payload.count))
        }
        let key = (0..<4).map { _ in UInt8.random(in: 0...255) }
        buffer.writeBytes(key)
        buffer.writeBytes(payload.enumerated().map { $0.element ^ key[$0.offset & 3] })
        return buffer
    }

    static func clientText(_ text: String) -> ByteBuffer {
        clientFrame(opcode: 0x1, ByteBuffer(string: text).readableBytesView)
    }
}

/// A subscriber's WebSocket, lean: the handshake and a first command written at once, then the server's
/// frames read in place on the event loop. Every whole text message goes to `take`; one it does not take
/// (an error, an unsubscribe) goes to `other` and ends the connection. Pings are answered; a close frame is
/// echoed and ends the connection (its code in `closeCode`).
final class LiveSocket: ChannelInboundHandler, @unchecked Sendable {  // state only touched on the channel's loop
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let take: (ByteBufferView) -> Bool
    private let other: (String) -> Void
    private let opened: EventLoopPromise<Void>
    private var head = ResponseHead()
    private var upgraded = false
    private var reader = ServerFrameReader()
    private var fragments: ByteBuffer?
    private var ended = false
    /// The code of the server's close frame (1005 when it had none); read once the channel closed.
    private(set) var closeCode: UInt16?
    private var channel: (any Channel)!  // set by `connect` before it returns

    /// Connects, upgrades to `/v1/ws` with `token` and sends `first`; returns once the server answered `101`.
    static func connect(_ endpoint: Endpoint, token: String, first: String?, group: any EventLoopGroup,
                        take: @escaping (ByteBufferView) -> Bool, other: @escaping (String) -> Void) async throws -> LiveSocket {
        let loop = group.next()
        let socket = LiveSocket(opened: loop.makePromise(), take: take, other: other)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(socket) } }
                .connect(host: endpoint.host, port: endpoint.port).get()
        } catch {
            socket.opened.fail(error)
            throw error
        }
        socket.channel = channel
        let key = Data((0..<16).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        var bytes = ByteBuffer(string: "GET /v1/ws HTTP/1.1\r\nHost: \(endpoint)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer \(token)\r\n\r\n")
        if let first { bytes.writeImmutableBuffer(ServerFrameReader.clientText(first)) }
        try await channel.writeAndFlush(bytes)
        try await socket.opened.futureResult.get()
        return socket
    }

    private init(opened: EventLoopPromise<Void>, take: @escaping (ByteBufferView) -> Bool, other: @escaping (String) -> Void) {
        (self.opened, self.take, self.other) = (opened, take, other)
    }

    /// Waits until the connection ended.
    func closed() async { try? await channel.closeFuture.get() }

    func close() { channel.close(promise: nil) }

    var eventLoop: any EventLoop { channel.eventLoop }
    var closeFuture: EventLoopFuture<Void> { channel.closeFuture }
    var isOpen: Bool { channel.isActive }

    /// A text message, written now and sent at the next `flush` (on the channel's loop).
    func write(_ text: String) { channel.write(ServerFrameReader.clientText(text), promise: nil) }

    func flush() { channel.flush() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard !ended else { return }
        if !upgraded {
            switch head.take(&bytes, status: "101") {
            case .incomplete: return
            case .refused(let status):
                end(context, ClientError(description: "the WebSocket upgrade was refused: \(status)"))
                return
            case .accepted:
                upgraded = true
                opened.succeed()
            }
        }
        do {
            try reader.read(&bytes) { frame in if !ended { receive(frame, context) } }
        } catch {
            other("\(error)")
            end(context, error)
        }
    }

    private func receive(_ frame: ServerFrameReader.Frame, _ context: ChannelHandlerContext) {
        switch frame.opcode {
        case 0x1 where frame.fin && fragments == nil:
            message(frame.payload, context)
        case 0x1, 0x0:
            var payload = frame.payload
            fragments = fragments ?? ByteBuffer()
            fragments!.writeBuffer(&payload)
            if frame.fin, let whole = fragments {
                fragments = nil
                message(whole, context)
            }
        case 0x9:
            context.writeAndFlush(wrapOutboundOut(ServerFrameReader.clientFrame(opcode: 0xA, frame.payload.readableBytesView)), promise: nil)
        case 0x8:
            closeCode = frame.payload.getInteger(at: frame.payload.readerIndex, as: UInt16.self) ?? 1005
            let echo = ServerFrameReader.clientFrame(opcode: 0x8, frame.payload.readableBytesView.prefix(2))
            ended = true
            context.writeAndFlush(wrapOutboundOut(echo), promise: nil)
            context.close(promise: nil)
        default:
            break
        }
    }

    private func message(_ payload: ByteBuffer, _ context: ChannelHandlerContext) {
        guard !take(payload.readableBytesView) else { return }
        other(String(buffer: payload))
        end(context, nil)
    }

    private func end(_ context: ChannelHandlerContext, _ error: (any Error)?) {
        ended = true
        opened.fail(error ?? ClientError(description: "the connection ended"))
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { end(context, error) }

    func channelInactive(context: ChannelHandlerContext) {
        opened.fail(ClientError(description: "the connection closed before the WebSocket upgrade"))
        context.fireChannelInactive()
    }
}
