import ChatDomain
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The transport half of a server WebSocket: reads frames from the connection's bytes
/// (`WebSocketFrameReader`), applies `WebSocketFraming`, answers pings, pings the client every interval and
/// drops it after two unanswered pings, and runs the close handshake. Outbound frames are written as
/// ready-made bytes, and a broadcast frame encoded once is written to every connection as is. Subclasses
/// handle complete messages.
///
/// NIO's frame decoder and encoder handlers are never added (`WebSocketUpgrader`): this handler reads and
/// writes bytes itself, and an idle connection holds no decoder buffer or handler.
class WebSocketConnection: ChannelInboundHandler, RemovableChannelHandler, LoopTimerOwner {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var reader: WebSocketFrameReader
    private var framing: WebSocketFraming
    private let pingInterval: TimeAmount
    /// The loop's timer wheel, and this connection's next ping in it.
    private let timers: LoopTimers
    private var pingTimer: TimerWheel.Token?
    private var unansweredPings = 0
    private var forcedClose: Scheduled<Void>?
    /// Set once a close frame was sent: nothing but the peer's close is read after it.
    private(set) var closing = false
    /// The close code sent (or the peer's, when it closed first); nil while open or when dropped without one.
    private(set) var closeCode: UInt16?
    var context: ChannelHandlerContext?
    /// The channel's writability as NIO last reported it (its queue under the send budget): read for every
    /// delivery and reply, so kept here rather than asked of the channel each time.
    private(set) var writable = true
    /// Where frame bytes are written: this handler's context (set while it is in the pipeline).
    private var output: ChannelHandlerContext?

    /// Replies made while a read batch is processed (pongs, errors, answers that need no I/O), written as one
    /// buffer when the batch ends: a flood of small commands costs one write per batch, not one per reply.
    private var outbox: ByteBuffer?
    private var inReadBatch = false
    static let outboxChunk = 16 * 1024
    /// Frames written before NIO finished the upgrade would be lost: a close asked for then waits for it.
    private var upgraded = false
    private var closeAfterUpgrade: (code: UInt16, reason: String, drop: Bool)?

    /// permessage-deflate, when the handshake agreed it.
    let deflate: PermessageDeflate.Agreement?

    init(maxMessageBytes: Int, pingInterval: TimeAmount, timers: LoopTimers, deflate: PermessageDeflate.Agreement? = nil) {
        self.timers = timers
        self.reader = WebSocketFrameReader(maxFrameBytes: maxMessageBytes)
        self.framing = WebSocketFraming(maxMessageBytes: maxMessageBytes, inflater: deflate.map(DeflateInflater.init))
        self.pingInterval = pingInterval
        self.deflate = deflate
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.writable = context.channel.isWritable
        self.output = context
        pingTimer = timers.schedule(self, in: pingInterval)
    }

    /// The ping timer: ping, and schedule the next.
    func timerFired() {
        pingTimer = nil
        guard context != nil, !closing else { return }
        sendPing()
        if context != nil { pingTimer = timers.schedule(self, in: pingInterval) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        stopTimers()
        self.context = nil
        self.output = nil
    }

    /// Queues frame bytes; `promise` completes once they reached the socket.
    func writeFrame(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>? = nil) {
        guard let output else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        output.write(NIOAny(bytes), promise: promise)
    }

    func flushFrames() {
        output?.flush()
    }

    func writeAndFlushFrame(_ bytes: ByteBuffer) -> EventLoopFuture<Void>? {
        guard let output else { return nil }
        let promise = output.eventLoop.makePromise(of: Void.self)
        output.writeAndFlush(NIOAny(bytes), promise: promise)
        return promise.futureResult
    }

    /// NIO's upgrade handler fires this once the 101 is out and the HTTP handlers are gone: only from now
    /// on do frames reach the client.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let upgrade = event as? HTTPServerUpgradeEvents, case .upgradeComplete = upgrade {
            upgraded = true
            if let (code, reason, drop) = closeAfterUpgrade {
                closeAfterUpgrade = nil
                close(code: code, reason: reason, drop: drop)
            } else {
                upgradeCompleted()
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        stopTimers()
        connectionEnded()
        context.fireChannelInactive()
    }

    private func stopTimers() {
        timers.cancel(pingTimer)
        pingTimer = nil
        forcedClose?.cancel()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inReadBatch = false
        flushOutbox()
        context.fireChannelReadComplete()
    }

    private func flushOutbox() {
        guard let bytes = outbox else { return }
        outbox = nil
        writeFrame(bytes)
        flushFrames()
    }

    /// Appends a frame to the batch's outbox, or writes it at once outside a read batch.
    private func reply(_ opcode: WireEncoding.Opcode, _ write: (inout ByteBuffer) -> Void, length: Int) {
        if inReadBatch {
            // In chunks of a fixed capacity (a buffer that grew would hold up to twice its bytes), written as
            // each fills, so that the connection's queue (and its writability) sees them within a batch too.
            if let out = outbox, out.writableBytes < length + 10 { flushOutbox() }
            var out = outbox ?? WireEncoding.allocator.buffer(capacity: max(Self.outboxChunk, length + 10))
            WireEncoding.writeHeader(opcode, length: length, into: &out)
            write(&out)
            outbox = out
            return
        }
        var out = WireEncoding.allocator.buffer(capacity: length + 10)
        WireEncoding.writeHeader(opcode, length: length, into: &out)
        write(&out)
        writeFrame(out)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        inReadBatch = true
        reader.append(unwrapInboundIn(data))
        while true {
            switch reader.next() {
            case .frame(let frame): receive(frame, context: context)
            case .needMore:
                // A text frame cut by the read: what of it is here is checked for UTF-8 now (fail fast).
                if !closing, let (head, payload) = reader.partialFrame(),
                   case .fail(let code, let reason) = framing.receivePartial(head, payload: payload) {
                    fail(code: code, reason: reason, context: context)
                }
                return
            case .fail(let code, let reason):
                // The byte stream cannot be followed any further: send the close frame, then drop the connection.
                fail(code: code, reason: reason, context: context)
                return
            }
        }
    }

    private func receive(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        let event = framing.receive(frame)
        if closing {
            if case .close = event { context.close(promise: nil) }
            return
        }
        switch event {
        case .text(let text): handleText(text)
        case .binary(let data): handleBinary(data)
        case .ping(var payload):
            guard admitReply() else { return }
            reply(.pong, { $0.writeBuffer(&payload) }, length: payload.readableBytes)
            if !inReadBatch { flushFrames() }
        case .pong:
            unansweredPings = 0
        case .close(let code):
            closing = true
            closeCode = code ?? 1005
            connectionEnded()
            flushOutbox()
            let closeReply = code.map { WireEncoding.closeFrame(code: $0) } ?? WireEncoding.frame(.close, payload: ByteBuffer())
            let channel = context.channel
            writeAndFlushFrame(closeReply)?.whenComplete { _ in channel.close(promise: nil) }
        case .fail(let code, let reason):
            // RFC 6455 §7.1.7: a failed connection is closed once the close frame is out, without waiting for the peer.
            close(code: code, reason: reason, drop: true)
        case .none:
            break
        }
    }

    private func fail(code: UInt16, reason: String, context: ChannelHandlerContext) {
        guard !closing else { return context.close(promise: nil) }
        close(code: code, reason: reason, drop: true)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Sends a text frame (not flushed when `flush` is false).
    func send(_ text: String, flush: Bool = true) {
        guard context != nil, !closing, admitReply() else { return }
        reply(.text, { $0.writeString(text) }, length: text.utf8.count)
        if flush && !inReadBatch { flushFrames() }
    }

    /// Starts the close handshake with `code`; the connection is dropped if the peer does not answer within
    /// 10 seconds (a peer that stopped reading never will), or as soon as the close frame is out with `drop`
    /// (its bytes cannot be read any further).
    func close(code: UInt16, reason: String = "", drop: Bool = false) {
        guard let context, !closing else { return }
        guard upgraded else {
            if closeAfterUpgrade == nil { closeAfterUpgrade = (code, reason, drop) }
            return
        }
        closing = true
        closeCode = code
        connectionEnded()
        flushOutbox()  // what was answered before the close goes before it
        let sent = writeAndFlushFrame(WireEncoding.closeFrame(code: code, reason: reason))
        if drop {
            let channel = context.channel
            sent?.whenComplete { _ in channel.close(promise: nil) }
            return
        }
        // Reading may have been paused (a drain answering the publishes it read): the peer's close must be read.
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        forcedClose = context.eventLoop.scheduleTask(in: .seconds(10)) { [channel = context.channel] in channel.close(promise: nil) }
    }

    private func sendPing() {
        guard let context, !closing else { return }
        if unansweredPings >= 2 {
            context.close(promise: nil)
            return
        }
        unansweredPings += 1
        _ = writeAndFlushFrame(WireEncoding.frame(.ping, payload: ByteBuffer()))
    }

    // MARK: for subclasses

    func handleText(_ text: String) {}
    /// The upgrade finished: the connection may write.
    func upgradeCompleted() {}
    /// Whether a reply (a command's answer, a pong) may be queued now; false when the connection is closed for it.
    func admitReply() -> Bool { true }
    func handleBinary(_ data: ByteBuffer) {}
    /// The connection is closing or closed: release subscriptions and timers. Called at most twice.
    func connectionEnded() {}
}

/// The WebSocket upgrade: NIO's upgrader checks the handshake and writes the `101` (its
/// `buildUpgradeResponse`), and the connection's pipeline gets only the `WebSocketConnection` made by
/// `handler`, which reads and writes frames itself: no NIO frame decoder or encoder stays per connection.
struct WebSocketUpgrader: HTTPServerProtocolUpgrader, Sendable {
    let handshake: NIOWebSocketServerUpgrader
    let handler: @Sendable (any Channel) throws -> WebSocketConnection

    var supportedProtocol: String { handshake.supportedProtocol }
    var requiredUpgradeHeaders: [String] { handshake.requiredUpgradeHeaders }

    func buildUpgradeResponse(channel: any Channel, upgradeRequest: HTTPRequestHead,
                              initialResponseHeaders: HTTPHeaders) -> EventLoopFuture<HTTPHeaders> {
        handshake.buildUpgradeResponse(channel: channel, upgradeRequest: upgradeRequest, initialResponseHeaders: initialResponseHeaders)
    }

    func upgrade(context: ChannelHandlerContext, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<Void> {
        let channel = context.channel
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(try handler(channel))
        }
    }
}

/// `/v1/echo` (only with echo enabled): echoes every message, for the Autobahn conformance suite.
final class EchoSession: WebSocketConnection {
    override func handleText(_ text: String) {
        guard deflate != nil else { return send(text) }
        guard !closing else { return }
        _ = writeAndFlushFrame(WireEncoding.deflateFrame(.text, payload: ByteBuffer(string: text), windowBits: deflate!.windowBits))
    }

    override func handleBinary(_ data: ByteBuffer) {
        guard !closing else { return }
        _ = writeAndFlushFrame(deflate.map { WireEncoding.deflateFrame(.binary, payload: data, windowBits: $0.windowBits) } ?? WireEncoding.frame(.binary, payload: data))
    }
}
