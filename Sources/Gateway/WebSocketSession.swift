import Auth
import ChatDomain
import Fanout
import NIOCore
import Wire

/// `/v1/ws`: the command protocol of PROTOCOL.md §6 over one authenticated WebSocket — a thin transport of a
/// `ClientSession` (through its `SessionDriver`): frames in, replies and subscriptions out.
final class WebSocketSession: WebSocketConnection, SubscriptionSink, SessionTransport, @unchecked Sendable {  // state only touched on the channel's event loop
    private let app: GatewayApp
    private var requestId: String { driver.log.requestId }
    private var driver: SessionDriver!
    private var subscriptions = SmallMap<ChannelName, Subscription>()
    private var ended = false
    /// Only with a test fault (`swap`): a message delivered after the next one.
    private var heldForFault: ByteBuffer?

    init(app: GatewayApp, actor: Actor, log: RequestLog, eventLoop: any EventLoop, deflate: PermessageDeflate.Agreement? = nil) {
        self.app = app
        super.init(maxMessageBytes: app.config.maxMessageBytes, pingInterval: .seconds(app.config.wsPingSeconds),
                   timers: app.timers.on(eventLoop), deflate: deflate)
        self.driver = SessionDriver(app: app, actor: actor, kind: .webSocket, eventLoop: eventLoop, log: log, transport: self)
    }

    /// The 101 is out: the session joins the live streams (and looks for a revocation that came before).
    override func upgradeCompleted() {
        driver.log.answered(.switchingProtocols, route: "/v1/ws")
        driver.start()
    }

    override func connectionEnded() {
        guard !ended else { return }
        ended = true
        driver.logger.info("websocket closed", metadata: ["code": "\(closeCode.map(String.init) ?? "-")"])
        driver.connectionClosed()
    }

    /// Every byte a connection queues counts against its send budget, replies too: a reply (or pong) that
    /// finds the queue over the budget means the client is not reading what it asks for.
    override func admitReply() -> Bool {
        guard context != nil, !writable else { return true }
        driver.sendRefused()
        return false
    }

    override func handleBinary(_ data: ByteBuffer) { driver.receivedBinary() }
    override func handleText(_ text: String) { driver.received(text) }

    // MARK: SessionTransport

    func deliver(_ reply: ServerReply) { send(reply.json) }

    func fail(_ id: CommandID?, _ error: ApiError) {
        deliver(.error(id: id, ServerReply.ServerError(error.envelope(requestId: requestId))))
    }

    func register(_ channel: ChannelName) {
        guard let context else { return }
        let format: WireFormat = deflate.map { $0.windowBits < 15 ? .webSocketDeflateSmallWindow : .webSocketDeflate } ?? .webSocket
        let subscription = Subscription(channel: channel, eventLoop: context.eventLoop, format: format, hub: app.hub, sink: self,
                                        budget: app.config.sendBudget, largestMessage: app.config.bodyLimit)
        subscriptions[channel] = subscription
        subscription.register()
    }

    func begin(_ channel: ChannelName, after: Int64, head: Int64?, membershipEpoch: Int64?) {
        subscriptions[channel]?.begin(after: after, head: head, membershipEpoch: membershipEpoch, check: membershipEpoch == nil ? nil : driver.membershipCheck(channel))
    }
    func cancel(_ channel: ChannelName) { subscriptions.removeValue(forKey: channel)?.cancel() }
    func end(_ channel: ChannelName, after: Int64) { subscriptions[channel]?.end(after: after) }
    func close(_ reason: ClientSession.Close) { close(code: reason.code, reason: reason.reason) }

    func setReading(_ on: Bool) {
        context?.channel.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in }
    }

    // MARK: SubscriptionSink

    func write(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>?) {
        guard !closing else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        guard app.faults.fault != nil else { return writeFrame(bytes, promise: promise) }
        var promise = promise
        app.faults.write(bytes, held: &heldForFault) { writeFrame($0, promise: promise); promise = nil }
        promise?.succeed()
    }

    func flush() { flushFrames() }

    var isWritable: Bool { writable && context != nil }

    func slowConsumer() { driver.sendRefused() }

    func subscriptionEnded(_ channel: ChannelName) { driver.subscriptionEnded(channel, reason: "forbidden") }

    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError) {
        // The retention deleted what the subscription had not delivered yet: the client resumes from the oldest position.
        driver.subscriptionEnded(channel, reason: error.code == .cursorExpired ? "cursor_expired" : "store_unavailable")
    }
}
