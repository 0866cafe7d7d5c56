import Auth
import ChatDomain
import Fanout
import NIOCore
import NIOHTTP1

/// `GET /v1/channels/{channel}/events`: Server-Sent Events (PROTOCOL.md §5). Resumes after
/// `Last-Event-ID`, else `since`; `history=N` starts N messages back; neither is live only. The stream opens
/// with a comment, `retry:` and an `id:` naming the position it continues after, then sends a comment every
/// keepalive interval, and ends at the token's expiry.
final class EventStream: SubscriptionSink, ConnectionBoundStream, LiveStream, @unchecked Sendable {  // state only touched on the connection's event loop
    struct Start: Sendable {
        let channel: ChannelName
        let position: Int64
        let expiresIn: TimeAmount
        let actor: Actor
        /// When the permission checks began (µs, this instance's clock).
        let checkedAt: Int64
    }

    static func prepare(_ app: GatewayApp, _ request: HTTPRequest, channel name: String) async throws(ApiError) -> Start {
        let checkedAt = Timestamp.nowMicros()
        let actor = try await app.authenticate(request.bearerToken)
        let channel = try await app.channels.authorize(actor, .subscribe, name)
        let resume = request.headers.first(name: "last-event-id") ?? request.query["since"]
        let cursor = try resume.map { (text) throws(ApiError) in try resumeCursor(text, for: channel) }
        let history = try request.intParameter("history", default: 0, range: 0...ChannelService.maxPageSize)
        let head = try await app.store.head(of: channel)
        var position = try app.channels.position(of: cursor, in: channel, head: head)
        if cursor == nil { position = max(0, head - Int64(history)) }
        let expiresIn = TimeAmount.milliseconds(max(0, Int64(actor.expiresAt.timeIntervalSinceNow * 1000)))
        return Start(channel: channel, position: position, expiresIn: expiresIn, actor: actor, checkedAt: checkedAt)
    }

    /// `Last-Event-ID` (or `since`) as a cursor of `channel`, surrounding spaces ignored.
    static func resumeCursor(_ text: String, for channel: ChannelName) throws(ApiError) -> Cursor {
        try Cursor(parsing: text.trimmingCharacters(in: .whitespaces), for: channel)
    }

    private let app: GatewayApp
    private let start: Start
    private let context: ChannelHandlerContext
    private let requestId: String
    private var subscription: Subscription?
    private var keepalive: RepeatedTask?
    private var expiry: Scheduled<Void>?
    private var ended = false
    /// Only with a test fault (`swap`): a message delivered after the next one.
    private var heldForFault: ByteBuffer?

    init(app: GatewayApp, start: Start, context: ChannelHandlerContext, requestId: String) {
        self.app = app
        self.start = start
        self.context = context
        self.requestId = requestId
    }

    func open() {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/event-stream")
        headers.add(name: "Cache-Control", value: "no-cache")
        headers.add(name: "X-Accel-Buffering", value: "no")
        headers.add(name: "X-Request-Id", value: requestId)
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
        writeText(": stream open\nretry: 2000\nid: \(Cursor.text(channel: start.channel, seq: start.position))\n\n")
        context.flush()
        app.streams.add(self)
        app.counters.add("sse_streams")
        let subscription = Subscription(channel: start.channel, eventLoop: context.eventLoop, format: .serverSentEvents, hub: app.hub, sink: self,
                                        budget: app.config.sendBudget, largestMessage: app.config.bodyLimit)
        self.subscription = subscription
        subscription.register()
        subscription.begin(after: start.position)
        // Registered now: a revocation or removal from here on finds this stream. One that came between the
        // checks and here did not, so look for it.
        if app.revocations.isRevoked(start.actor) { return end() }
        if let head = app.removal(of: start.actor.sub, from: start.channel, appliedSince: start.checkedAt) { subscription.end(after: head) }
        let interval = TimeAmount.seconds(app.config.keepaliveSeconds)
        keepalive = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
            guard let self, !self.ended else { return }
            self.writeText(": keepalive\n\n")
            self.context.flush()
        }
        expiry = context.eventLoop.scheduleTask(in: start.expiresIn) { [weak self] in self?.end() }
    }

    private func writeText(_ text: String) {
        var buffer = context.channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(buffer))), promise: nil)
    }

    // MARK: SubscriptionSink

    func write(_ bytes: ByteBuffer, message: Message, promise: EventLoopPromise<Void>?) {
        guard !ended else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        var promise = promise
        app.faults.write(bytes, held: &heldForFault) {
            context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer($0))), promise: promise)
            promise = nil
        }
        promise?.succeed()
    }

    func flush() {
        context.flush()
    }

    var isWritable: Bool { context.channel.isWritable }


    func slowConsumer() {
        guard !ended else { return }
        app.counters.add("slow_consumer_closes")
        app.logger.info("closing slow SSE consumer", metadata: ["request-id": "\(requestId)", "channel": "\(start.channel)"])
        stop()
        context.close(promise: nil)
    }

    func subscriptionEnded(_ channel: ChannelName) {
        end()
    }

    func revoke(_ revocation: Revocation) {
        guard revocation.covers(start.actor) else { return }
        context.eventLoop.execute { self.end() }
    }

    func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64) {
        guard user == start.actor.sub, channel == start.channel else { return }
        context.eventLoop.execute { self.subscription?.end(after: head) }
    }

    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError) {
        app.logger.warning("SSE catch-up failed", metadata: ["request-id": "\(requestId)", "error": "\(error.message)"])
        end()
    }

    // MARK: lifecycle


    /// Ends the response cleanly (token expiry, shutdown, store failure) and closes the connection.
    private func end() {
        guard !ended else { return }
        stop()
        let channel = context.channel
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func stop() {
        ended = true
        keepalive?.cancel()
        expiry?.cancel()
        subscription?.cancel()
        app.streams.remove(self)
    }

    func connectionClosed() {
        guard !ended else { return }
        stop()
    }

    func shutdown() {
        context.eventLoop.execute { self.end() }
    }
}
