import Auth
import ChatDomain
import Fanout
import NIOCore
import NIOHTTP1
import Wire

/// `GET /v1/channels/{channel}/events`: Server-Sent Events (PROTOCOL.md §5), a thin transport of a
/// `ClientSession` with one subscription. Resumes after `Last-Event-ID`, else `since`; `history=N` starts N
/// messages back; neither is live only. Until the session has opened the subscription nothing is written,
/// so a refusal is an ordinary error response; then the stream opens with a comment, `retry:` and an `id:`
/// naming the position it continues after, sends a comment every keepalive interval, and ends at the
/// token's expiry, a revocation or a removal.
final class EventStream: SubscriptionSink, SessionTransport, ConnectionBoundStream, LoopTimerOwner, @unchecked Sendable {  // state only touched on the connection's event loop
    /// Where the stream starts, from the request (checked by the session when it opens).
    static func start(_ request: HTTPRequest) throws(ApiError) -> ChannelService.StreamStart {
        if let resume = request.headers.first(name: "last-event-id") ?? request.query["since"] {
            return .since(String(Substring(resume).trimmingSpaces))
        }
        let history = try request.intParameter("history", default: 0, range: 0...ChannelService.maxPageSize)
        return history > 0 ? .history(history) : .live
    }

    /// `Last-Event-ID` (or `since`) as a cursor of `channel`, surrounding spaces ignored.
    static func resumeCursor(_ text: String, for channel: ChannelName) throws(ApiError) -> Cursor {
        try Cursor(parsing: String(Substring(text).trimmingSpaces), for: channel)
    }

    private let app: GatewayApp
    private let context: ChannelHandlerContext
    /// Below NIO's HTTP encoder: where the pre-framed message chunks go (straight to the socket).
    private let chunks: ChannelHandlerContext
    private var requestId: String { driver.log.requestId }
    private var driver: SessionDriver!
    /// Answers the request when the stream is refused before it opened (let go once it opened: it holds the request).
    private var refuse: ((ApiError) -> Void)?
    private var subscription: Subscription?
    private var opened = false
    /// The next keepalive comment in the loop's timer wheel.
    private var keepalive: TimerWheel.Token?
    private let timers: LoopTimers
    private var ended = false
    /// Only with a test fault (`swap`): a message delivered after the next one.
    private var heldForFault: ByteBuffer?
    /// `Access-Control-Allow-Origin` for a page of an allowed origin (nil: none), see `HTTPRequest.allowOrigin`.
    private let allowOrigin: String?
    /// False for an HTTP/1.0 client: the stream goes unchunked (RFC 9112 §6.1) and ends with the connection.
    private let chunked: Bool

    init(app: GatewayApp, actor: Actor, context: ChannelHandlerContext, request: HTTPRequest, refuse: @escaping (ApiError) -> Void) {
        self.app = app
        self.context = context
        self.chunks = (try? context.pipeline.syncOperations.context(handlerType: HTTPResponseEncoder.self)) ?? context
        self.refuse = refuse
        self.timers = app.timers.on(context.eventLoop)
        self.allowOrigin = request.allowOrigin
        self.chunked = request.version.major > 1 || (request.version.major == 1 && request.version.minor >= 1)
        self.driver = SessionDriver(app: app, actor: actor, kind: .serverSentEvents, eventLoop: context.eventLoop, log: request.log, transport: self)
        self.writable = context.channel.isWritable
    }

    func run(channel name: String, from start: ChannelService.StreamStart) {
        driver.start()
        driver.open(name, from: start, permission: .subscribe)
    }

    // MARK: SessionTransport

    func deliver(_ reply: ServerReply) {
        if case .unsubscribed = reply { return end() }
        guard case .subscribed(_, _, let cursor) = reply, !opened, !ended else { return }
        opened = true
        refuse = nil
        // The request is over, and no other follows on this connection: its idle timer (re-armed every few
        // seconds per connection), deadlines, checks and parsing have nothing left to watch.
        Self.dropRequestParsing(context.pipeline.syncOperations)
        driver.log.answered(.ok, route: "/v1/channels/{channel}/events")
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/event-stream")
        headers.add(name: "Cache-Control", value: "no-cache")
        headers.add(name: "X-Accel-Buffering", value: "no")
        headers.add(name: "X-Request-Id", value: requestId)
        for (name, value) in HTTPRequest.corsHeaders(allowOrigin: allowOrigin) { headers.add(name: name, value: value) }
        // NIO frames a 1.1 answer without a length as chunked, a 1.0 one as the bytes until the close.
        if !chunked { headers.add(name: "Connection", value: "close") }
        let version: HTTPVersion = chunked ? .http1_1 : .http1_0
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: version, status: .ok, headers: headers))), promise: nil)
        writeText(": stream open\nretry: 2000\nid: \(cursor)\n\n")
        context.flush()
        keepalive = timers.schedule(self, in: .seconds(app.config.keepaliveSeconds))
    }

    /// The keepalive comment, then the next one.
    func timerFired() {
        keepalive = nil
        guard !ended else { return }
        writeText(": keepalive\n\n")
        context.flush()
        keepalive = timers.schedule(self, in: .seconds(app.config.keepaliveSeconds))
    }

    func fail(_ id: CommandID?, _ error: ApiError) {
        guard !ended else { return }
        if opened {
            driver.logger.warning("SSE stream failed", metadata: ["error": "\(error.message)"])
            return end()
        }
        stop()
        refuse?(error)
    }

    func register(_ channel: ChannelName) {
        let subscription = Subscription(channel: channel, eventLoop: context.eventLoop, format: .serverSentEvents, hub: app.hub, sink: self,
                                        budget: app.config.sendBudget, largestMessage: app.config.bodyLimit)
        self.subscription = subscription
        subscription.register()
    }

    func begin(_ channel: ChannelName, after: Int64, head: Int64?, membershipEpoch: Int64?) {
        subscription?.begin(after: after, head: head, membershipEpoch: membershipEpoch, check: membershipEpoch == nil ? nil : driver.membershipCheck(channel))
    }
    func cancel(_ channel: ChannelName) {
        subscription?.cancel()
        subscription = nil
    }
    func end(_ channel: ChannelName, after: Int64) { subscription?.end(after: after) }

    func close(_ reason: ClientSession.Close) {
        guard !ended else { return }
        switch reason {
        case .slowConsumer:
            stop()
            context.close(promise: nil)
        case .revoked where !opened:
            fail(nil, ApiError(.tokenRevoked, AuthFailure.revoked.reason))
        case .tokenExpired where !opened:
            fail(nil, ApiError(.unauthenticated, AuthFailure.expired.reason))
        default:
            end()
        }
    }

    func setReading(_ on: Bool) {}

    private func writeText(_ text: String) {
        var buffer = context.channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(buffer))), promise: nil)
    }

    /// Once the stream is open no request follows on its connection (it ends with the stream): the handlers
    /// that parse and check requests leave, and whatever the client still sends is read and dropped.
    static func dropRequestParsing(_ sync: ChannelPipeline.SynchronousOperations) {
        guard let decoder = try? sync.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self) else { return }
        do { try sync.addHandler(DiscardInbound(), position: .after(decoder)) } catch { return }
        _ = sync.removeHandler(decoder)
        sync.removeIfPresent(HTTPServerPipelineHandler.self)
        sync.removeRequestHandling()
    }

    // MARK: SubscriptionSink

    func write(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>?) {
        guard !ended else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        guard app.faults.fault != nil else { return send(bytes, promise: promise) }
        var promise = promise
        app.faults.write(bytes, held: &heldForFault) {
            send($0, promise: promise)
            promise = nil
        }
        promise?.succeed()
    }

    /// Pre-framed chunks go below NIO's encoder as they are; to an HTTP/1.0 client, their payloads.
    private func send(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>?) {
        guard !chunked else { return chunks.write(NIOAny(bytes), promise: promise) }
        chunks.write(NIOAny(WireEncoding.unchunked(bytes) ?? bytes), promise: promise)
    }

    /// From below NIO's encoder too: no handler above it holds writes back, and a flush from the handler's own
    /// context passed through each of them (~4 % of an SSE delivery's CPU).
    func flush() { chunks.flush() }

    var isWritable: Bool { writable }

    /// The connection's writability as NIO last reported it (through `HTTPHandler`).
    private var writable = true
    func writabilityChanged(_ writable: Bool) { self.writable = writable }

    func slowConsumer() { driver.sendRefused() }

    func subscriptionEnded(_ channel: ChannelName) { driver.subscriptionEnded(channel, reason: "forbidden") }

    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError) { driver.subscriptionEnded(channel, reason: "store_unavailable") }

    // MARK: lifecycle

    /// Ends the response cleanly (token expiry, shutdown, revocation, removal, store failure) and closes the connection.
    private func end() {
        guard !ended else { return }
        stop()
        let channel = context.channel
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func stop() {
        ended = true
        timers.cancel(keepalive)
        keepalive = nil
        driver.connectionClosed()
    }

    func connectionClosed() {
        guard !ended else { return }
        stop()
    }
}

/// Reads and drops what arrives (a stream's connection after its request).
final class DiscardInbound: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}
