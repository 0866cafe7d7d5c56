import ChatDomain
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Fan-out across instances through Redis pub/sub. RESP is encoded and parsed by hiredis; SwiftNIO does the
/// non-blocking socket I/O. Two connections, each driven by a `RedisConnectionStateMachine`: one publishes
/// every committed message (`PUBLISH gw:<channel>`), one holds the SUBSCRIBEs the Hub asks for. Local
/// subscribers get a publish at once (not through Redis); the copy that comes back is a duplicate the Hub
/// drops. The bus counts as down until the subscriber connection answered its first PING, and again as soon
/// as it is lost or stalls.
public final class RedisBus: Bus {
    public static let prefix = "gw:"
    /// A message here tells every instance to read all its channels from the store once: an instance whose
    /// publishing connection dropped (or that dropped PUBLISHes) may have lost messages, so it sends this
    /// once it is ready again.
    static let syncChannel = "gw:_sync"
    /// Revocations and member removals (JSON text), for every instance.
    static let controlChannel = "gw:_control"

    private let logger: Logger
    private let events = NIOLockedValueBox<BusEvents?>(nil)
    private let controlReceiver = NIOLockedValueBox<(@Sendable (String) -> Void)?>(nil)
    private let available = NIOLockedValueBox(false)
    private let counters = NIOLockedValueBox(Counters())
    private let subscriber: RedisConnectionDriver
    private let publisher: RedisConnectionDriver

    public struct Counters: Sendable {
        /// Times the subscriber connection was lost (closed, refused, or stalled).
        public var subscriberLost = 0
        /// Heartbeats that went unanswered (a stalled server or path).
        public var stalls = 0
        /// PUBLISHes not sent (connection not ready, not writable, or too much unanswered).
        public var droppedPublishes = 0
    }

    public init(host: String, port: Int, group: any EventLoopGroup, configuration: RedisConnectionStateMachine.Configuration = .init(),
                logger: Logger) {
        self.logger = logger
        let loop = group.next()
        subscriber = RedisConnectionDriver(
            host: host, port: port, loop: loop, logger: logger,
            machine: RedisConnectionStateMachine(role: .subscriber(internalChannels: [Self.syncChannel, Self.controlChannel]), configuration: configuration))
        publisher = RedisConnectionDriver(
            host: host, port: port, loop: group.next(), logger: logger,
            machine: RedisConnectionStateMachine(role: .publisher(syncChannel: Self.syncChannel), configuration: configuration))
        subscriber.onAction = { [weak self] action in self?.subscriberAction(action) }
        subscriber.onMessage = { [weak self] name, payload in self?.subscriberMessage(name, payload) }
        subscriber.onStall = { [weak self] in self?.counters.withLockedValue { $0.stalls += 1 } }
        publisher.onStall = { [weak self] in self?.counters.withLockedValue { $0.stalls += 1 } }
    }

    /// Parses `redis://host:port`.
    public static func endpoint(from url: String) -> (host: String, port: Int)? {
        guard url.hasPrefix("redis://") else { return nil }
        var rest = url.dropFirst("redis://".count)
        if let at = rest.lastIndex(of: "@") { rest = rest[rest.index(after: at)...] }
        if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
        let parts = rest.split(separator: ":")
        guard let host = parts.first.map(String.init), !host.isEmpty else { return nil }
        let port = parts.count > 1 ? Int(parts[1]) : 6379
        guard let port else { return nil }
        return (host, port)
    }

    public func start() {
        subscriber.start()
        publisher.start()
    }

    /// Closes both connections; nothing is reported afterwards (the event loops may be shutting down).
    public func stop() {
        events.withLockedValue { $0 = nil }
        subscriber.stop()
        publisher.stop()
    }

    /// The subscriber connection answered its handshake and its last heartbeat is not overdue.
    public var isAvailable: Bool { available.withLockedValue { $0 } }

    public var counterValues: Counters {
        var values = counters.withLockedValue { $0 }
        values.droppedPublishes = publisher.droppedPublishes
        return values
    }

    // MARK: Bus

    public func publish(_ messages: [Message]) {
        events.withLockedValue { $0 }?.received(messages)
        var command = ByteBuffer()
        for message in messages {
            RESPCommand.encode([Array("PUBLISH".utf8), Array((Self.prefix + message.channel.rawValue).utf8),
                                Array(MessageWire.encode(message).readableBytesView)], into: &command)
        }
        publisher.publish(command, count: messages.count)
    }

    /// Test only: the next `count` messages are not PUBLISHed, and nothing notices (as if Redis lost them
    /// after accepting them) — what the reconcile is for.
    public func testLoseNextPublishes(_ count: Int) {
        publisher.loseSilently(count)
    }

    public func subscribe(_ channels: [ChannelName]) {
        subscriber.subscribe(channels.map { Self.prefix + $0.rawValue })
    }

    public func unsubscribe(_ channels: [ChannelName]) {
        subscriber.unsubscribe(channels.map { Self.prefix + $0.rawValue })
    }

    public func setEvents(_ events: BusEvents) {
        self.events.withLockedValue { $0 = events }
        // Down until the subscriber connection is ready (also when Redis never answers).
        events.availability(isAvailable)
    }

    public func publishControl(_ payload: String) {
        controlReceiver.withLockedValue { $0 }?(payload)
        publisher.publish(RESPCommand.encode(["PUBLISH", Self.controlChannel, payload]), count: 1)
    }

    public func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void) {
        controlReceiver.withLockedValue { $0 = receiver }
    }

    // MARK: subscriber events

    private func channel(_ name: String) -> ChannelName? {
        guard name.hasPrefix(Self.prefix) else { return nil }
        return try? ChannelName(parsing: String(name.dropFirst(Self.prefix.count)))
    }

    private func subscriberAction(_ action: RedisConnectionStateMachine.Action) {
        let events = self.events.withLockedValue { $0 }
        switch action {
        case .reportUp:
            available.withLockedValue { $0 = true }
            logger.info("redis subscriptions active")
            events?.availability(true)
        case .reportDown:
            available.withLockedValue { $0 = false }
            counters.withLockedValue { $0.subscriberLost += 1 }
            logger.warning("redis subscriber connection down; polling the store until it is back")
            events?.availability(false)
        case .subscribeConfirmed(let name):
            if let channel = channel(name) { events?.subscribed(channel) }
        case .unsubscribeConfirmed(let name):
            if let channel = channel(name) { events?.unsubscribed(channel) }
        default:
            break
        }
    }

    private func subscriberMessage(_ name: ByteBuffer, _ payload: ByteBuffer) {
        let events = self.events.withLockedValue { $0 }
        if name.readableBytesView.elementsEqual(Self.syncChannel.utf8) {
            events?.syncRequested()
        } else if name.readableBytesView.elementsEqual(Self.controlChannel.utf8) {
            controlReceiver.withLockedValue { $0 }?(String(buffer: payload))
        } else if let message = MessageWire.decode(payload) {
            events?.received([message])
        }
    }
}

/// Carries out one connection's `RedisConnectionStateMachine` on one event loop: connects, writes the
/// commands, classifies replies, runs the heartbeat tick and the reconnect timer.
final class RedisConnectionDriver: @unchecked Sendable {  // mutable state is only touched on `loop`
    static let tickInterval = TimeAmount.milliseconds(250)

    let loop: any EventLoop
    private let host: String
    private let port: Int
    private let logger: Logger
    private var machine: RedisConnectionStateMachine
    private var channel: (any Channel)?
    private var ticker: RepeatedTask?
    private var reconnect: Scheduled<Void>?
    private let dropped = NIOLockedValueBox(0)
    /// Test only, see `RedisBus.testLoseNextPublishes` (on `loop`, like the rest).
    private var toLoseSilently = 0
    /// Set before `start`, then only read.
    var onAction: (@Sendable (RedisConnectionStateMachine.Action) -> Void)?
    var onMessage: (@Sendable (ByteBuffer, ByteBuffer) -> Void)?
    var onStall: (@Sendable () -> Void)?

    init(host: String, port: Int, loop: any EventLoop, logger: Logger, machine: RedisConnectionStateMachine) {
        self.host = host
        self.port = port
        self.loop = loop
        self.logger = logger
        self.machine = machine
    }

    var droppedPublishes: Int { dropped.withLockedValue { $0 } }

    private var role: String {
        if case .subscriber = machine.role { return "subscriber" }
        return "publisher"
    }

    func start() {
        loop.execute {
            self.ticker = self.loop.scheduleRepeatedTask(initialDelay: Self.tickInterval, delay: Self.tickInterval) { [weak self] _ in
                guard let self else { return }
                let actions = self.machine.tick(now: .now())
                if actions.contains(.close) {
                    self.logger.warning("redis heartbeat unanswered; closing the connection", metadata: ["role": "\(self.role)"])
                    self.onStall?()
                }
                self.perform(actions)
            }
            self.perform(self.machine.start())
        }
    }

    func stop() {
        loop.execute {
            self.ticker?.cancel()
            self.reconnect?.cancel()
            self.perform(self.machine.stop())
        }
    }

    func subscribe(_ names: [String]) {
        loop.execute { self.perform(self.machine.subscribe(names)) }
    }

    func unsubscribe(_ names: [String]) {
        loop.execute { self.perform(self.machine.unsubscribe(names)) }
    }

    /// Writes pre-encoded PUBLISH commands if the machine allows it; otherwise they are dropped (and the loss
    /// announced later).
    func publish(_ commands: ByteBuffer, count: Int) {
        loop.execute {
            if self.toLoseSilently > 0 {
                self.toLoseSilently -= count
                return
            }
            let writable = self.channel?.isWritable ?? false
            guard self.machine.publish(count: count, bytes: commands.readableBytes, writable: writable), let channel = self.channel else {
                self.dropped.withLockedValue { $0 += count }
                return
            }
            channel.writeAndFlush(commands, promise: nil)
        }
    }

    func loseSilently(_ count: Int) {
        loop.execute { self.toLoseSilently += count }
    }

    private func perform(_ actions: [RedisConnectionStateMachine.Action]) {
        for action in actions {
            switch action {
            case .connect: connect()
            case .scheduleReconnect(let delay):
                reconnect = loop.scheduleTask(in: delay) { self.perform(self.machine.reconnectTimerFired()) }
            case .send(let commands):
                guard let channel else { break }
                var buffer = channel.allocator.buffer(capacity: 64)
                for command in commands { Self.encode(command, into: &buffer) }
                channel.writeAndFlush(buffer, promise: nil)
            case .close:
                channel?.close(promise: nil)
            default:
                onAction?(action)
            }
        }
    }

    static func encode(_ command: RedisConnectionStateMachine.Command, into buffer: inout ByteBuffer) {
        switch command {
        case .ping: RESPCommand.encode([Array("PING".utf8)], into: &buffer)
        case .subscribe(let names): RESPCommand.encode([Array("SUBSCRIBE".utf8)] + names.map { Array($0.utf8) }, into: &buffer)
        case .unsubscribe(let names): RESPCommand.encode([Array("UNSUBSCRIBE".utf8)] + names.map { Array($0.utf8) }, into: &buffer)
        case .publish(let channel, let payload): RESPCommand.encode([Array("PUBLISH".utf8), Array(channel.utf8), Array(payload.utf8)], into: &buffer)
        }
    }

    private func connect() {
        let isSubscriber = role == "subscriber"
        ClientBootstrap(group: loop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
            .channelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 512 * 1024, high: 4 * 1024 * 1024))
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RESPHandler { [weak self] reply in
                        self?.received(reply, subscriber: isSubscriber)
                    })
                }
            }
            .connect(host: host, port: port)
            .whenComplete { result in
                self.loop.preconditionInEventLoop()
                switch result {
                case .success(let channel):
                    if self.machine.state == .stopped {
                        channel.close(promise: nil)
                        return
                    }
                    self.channel = channel
                    channel.closeFuture.whenComplete { _ in
                        guard self.channel === channel else { return }
                        self.channel = nil
                        self.logger.info("redis connection closed", metadata: ["role": "\(self.role)"])
                        self.perform(self.machine.connectionClosed(random: .random(in: 0..<1)))
                    }
                    self.logger.info("redis connected", metadata: ["role": "\(self.role)"])
                    self.perform(self.machine.connected(now: .now()))
                case .failure(let error):
                    self.logger.debug("redis connect failed", metadata: ["role": "\(self.role)", "error": "\(error)"])
                    self.perform(self.machine.connectFailed(random: .random(in: 0..<1)))
                }
            }
    }

    private func received(_ reply: RESPValue, subscriber: Bool) {
        let classified: RedisConnectionStateMachine.Reply
        switch reply {
        case .array(let parts):
            guard case .string(let kind)? = parts.first else {
                classified = .other
                break
            }
            if subscriber, parts.count == 3, kind.readableBytesView.elementsEqual("message".utf8),
               case .string(let name) = parts[1], case .string(let payload) = parts[2] {
                onMessage?(name, payload)  // the hot path: not a reply to a request
                return
            }
            switch String(buffer: kind) {
            case "subscribe" where parts.count >= 2:
                if case .string(let name) = parts[1] { classified = .subscribed(String(buffer: name)) } else { classified = .other }
            case "unsubscribe" where parts.count >= 2:
                if case .string(let name) = parts[1] { classified = .unsubscribed(String(buffer: name)) } else { classified = .other }
            case "pong": classified = .pong
            default: classified = .other
            }
        case .status(let status): classified = status == "PONG" ? .pong : .other
        case .integer: classified = .integer
        case .error(let message):
            logger.warning("redis answered an error", metadata: ["role": "\(role)", "error": "\(message)"])
            classified = .error(message)
        default: classified = .other
        }
        perform(machine.received(classified))
    }
}

/// Parses RESP replies (hiredis) from a Redis connection and hands each to `onReply`; writes pre-encoded
/// commands.
final class RESPHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let parser = RESPParser()
    private let onReply: (RESPValue) -> Void

    init(onReply: @escaping (RESPValue) -> Void) {
        self.onReply = onReply
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            try parser.feed(unwrapInboundIn(data))
            while let reply = try parser.next() { onReply(reply) }
        } catch {
            context.close(promise: nil)
        }
    }
}
