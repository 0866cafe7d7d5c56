import ChatDomain
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// Fan-out across instances through Redis pub/sub. RESP is encoded and parsed by hiredis; SwiftNIO does the
/// non-blocking socket I/O. Two connections, each driven by a `RedisConnectionStateMachine`: one publishes
/// every committed message (`PUBLISH gw:<channel>`), one holds the SUBSCRIBEs the Hub asks for. Local
/// subscribers get a publish at once (not through Redis); the copy that comes back is a duplicate the Hub
/// drops. The bus counts as down until the subscriber connection answered its first PING, and again as soon
/// as it is lost or stalls. Every payload is sealed with the cluster key (`BusSeal`); one that does not
/// verify is dropped and counted.
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
        /// Payloads dropped because their seal did not verify (missing, forged, or moved between channels).
        public var sealFailures = 0
    }

    private let seal: BusSeal
    /// Readiness: a canary to a channel of this instance's own, through the whole pub/sub path.
    private let canary: NIOLockedValueBox<BusCanary>
    private let canaryChannel = "gw:_canary:" + UUID().uuidString.lowercased()
    private let canaryLoop: any EventLoop
    private let canaryTicker = NIOLockedValueBox<RepeatedTask?>(nil)

    /// `endpoint` from `REDIS_URL` (credentials and TLS included); `seal` with the cluster key. Throws when
    /// the TLS settings cannot be used (a CA file that cannot be read).
    private let metrics: FanoutMetrics

    public init(endpoint: RedisEndpoint, seal: BusSeal, group: any EventLoopGroup,
                configuration: RedisConnectionStateMachine.Configuration = .init(), canary: BusCanary.Configuration = .init(),
                metrics: FanoutMetrics = .none, logger: Logger) throws {
        self.logger = logger
        self.canary = NIOLockedValueBox(BusCanary(configuration: canary))
        self.metrics = metrics
        self.seal = seal
        var configuration = configuration
        configuration.credentials = endpoint.credentials
        let tls = try endpoint.tlsContext()
        let loop = group.next()
        canaryLoop = loop
        subscriber = RedisConnectionDriver(
            endpoint: endpoint, tls: tls, seal: seal, loop: loop, logger: logger,
            machine: RedisConnectionStateMachine(role: .subscriber(internalChannels: [Self.syncChannel, Self.controlChannel, canaryChannel]),
                                                 configuration: configuration))
        publisher = RedisConnectionDriver(
            endpoint: endpoint, tls: tls, seal: seal, loop: group.next(), logger: logger,
            machine: RedisConnectionStateMachine(role: .publisher(syncChannel: Self.syncChannel), configuration: configuration))
        subscriber.onAction = { [weak self] action in self?.subscriberAction(action) }
        subscriber.onMessage = { [weak self] name, payload in self?.subscriberMessage(name, payload) }
        subscriber.onStall = { [weak self] in self?.stalled() }
        publisher.onStall = { [weak self] in self?.stalled() }
        publisher.onDroppedPublishes = { metrics.busDroppedPublishes.increment(by: $0) }
        metrics.busUp.record(0)
    }

    private func stalled() {
        counters.withLockedValue { $0.stalls += 1 }
        metrics.busStalls.increment()
    }

    public func start() {
        subscriber.start()
        publisher.start()
        let interval = canary.withLockedValue { $0.configuration.interval }
        let tick = TimeAmount.nanoseconds(max(10_000_000, interval.nanoseconds / 4))
        canaryTicker.withLockedValue {
            $0 = canaryLoop.scheduleRepeatedTask(initialDelay: .zero, delay: tick) { [weak self] _ in self?.canaryTick() }
        }
    }

    private func canaryTick() {
        guard case .send(let number) = canary.withLockedValue({ $0.tick(now: .now) }) else { return }
        let name = Array(canaryChannel.utf8)
        var command = ByteBuffer()
        RESPCommand.encode([Array("PUBLISH".utf8), name, seal.seal(Array(String(number).utf8), channel: name)], into: &command)
        publisher.publish(command, count: 1)
        metrics.canariesSent.increment()
        let age = canary.withLockedValue { $0.age(now: .now) }
        metrics.canaryAge.record(age.map { Double($0.nanoseconds) / 1e9 } ?? -1)
    }

    /// The newest canary's age, and whether it is within the bound (false before the first came back).
    public var canaryState: (age: Duration?, healthy: Bool) {
        canary.withLockedValue { ($0.age(now: .now), $0.isHealthy(now: .now)) }
    }

    /// Closes both connections; nothing is reported afterwards (the event loops may be shutting down).
    public func stop() {
        canaryTicker.withLockedValue { $0?.cancel() }
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
            let name = Array((Self.prefix + message.channel.rawValue).utf8)
            RESPCommand.encode([Array("PUBLISH".utf8), name, seal.seal(MessageWire.encode(message).readableBytesView, channel: name)], into: &command)
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
        let name = Array(Self.controlChannel.utf8)
        var command = ByteBuffer()
        RESPCommand.encode([Array("PUBLISH".utf8), name, seal.seal(Array(payload.utf8), channel: name)], into: &command)
        publisher.publish(command, count: 1)
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
            metrics.busUp.record(1)
            metrics.busConnects.increment()
            logger.info("redis subscriptions active")
            events?.availability(true)
        case .reportDown:
            available.withLockedValue { $0 = false }
            counters.withLockedValue { $0.subscriberLost += 1 }
            metrics.busUp.record(0)
            metrics.busDisconnects.increment()
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

    private func subscriberMessage(_ name: ByteBuffer, _ sealed: ByteBuffer) {
        guard let payload = seal.open(sealed, channel: name) else {
            let failures = counters.withLockedValue { $0.sealFailures += 1; return $0.sealFailures }
            metrics.busSealFailures.increment()
            if failures & (failures - 1) == 0 {  // the 1st, 2nd, 4th, 8th…: visible without flooding the log
                logger.warning("dropped a bus payload whose seal does not verify (wrong or missing GATEWAY_CLUSTER_KEY, or forged)",
                               metadata: ["redis_channel": "\(String(buffer: name))", "failures": "\(failures)"])
            }
            return
        }
        let events = self.events.withLockedValue { $0 }
        if name.readableBytesView.elementsEqual(canaryChannel.utf8) {
            if let number = UInt64(String(buffer: payload)) {
                canary.withLockedValue { $0.received(number, now: .now) }
                metrics.canariesReceived.increment()
            }
        } else if name.readableBytesView.elementsEqual(Self.syncChannel.utf8) {
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
    private let endpoint: RedisEndpoint
    private let tls: NIOSSLContext?
    private let seal: BusSeal
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
    /// PUBLISHes dropped (how many).
    var onDroppedPublishes: (@Sendable (Int) -> Void)?
    /// `.commands` role: the reply to the oldest command in flight; and the connection went (their replies never come).
    var onReply: ((RESPValue) -> Void)?
    var onConnectionLost: (() -> Void)?
    /// The reply being classified (handed to `onReply` when the machine says it answers a command).
    private var lastReply: RESPValue = .null

    init(endpoint: RedisEndpoint, tls: NIOSSLContext?, seal: BusSeal, loop: any EventLoop, logger: Logger, machine: RedisConnectionStateMachine) {
        self.endpoint = endpoint
        self.tls = tls
        self.seal = seal
        self.loop = loop
        self.logger = logger
        self.machine = machine
    }

    var droppedPublishes: Int { dropped.withLockedValue { $0 } }

    private var role: String {
        switch machine.role {
        case .subscriber: return "subscriber"
        case .publisher: return "publisher"
        case .commands: return "commands"
        }
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
                self.onDroppedPublishes?(count)
                return
            }
            channel.writeAndFlush(commands, promise: nil)
        }
    }

    /// `.commands` role, on `loop`: writes `count` pre-encoded commands if the machine allows it.
    func sendCommands(_ commands: ByteBuffer, count: Int) -> Bool {
        loop.preconditionInEventLoop()
        guard let channel, machine.command(count: count, bytes: commands.readableBytes, writable: channel.isWritable) else { return false }
        channel.writeAndFlush(commands, promise: nil)
        return true
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
                for command in commands { encode(command, into: &buffer) }
                channel.writeAndFlush(buffer, promise: nil)
            case .close:
                channel?.close(promise: nil)
            case .commandAnswered:
                onReply?(lastReply)
            default:
                onAction?(action)
            }
        }
    }

    func encode(_ command: RedisConnectionStateMachine.Command, into buffer: inout ByteBuffer) {
        switch command {
        case .auth(let credentials):
            RESPCommand.encode([Array("AUTH".utf8)] + (credentials.user.map { [Array($0.utf8)] } ?? []) + [Array(credentials.password.utf8)], into: &buffer)
        case .ping: RESPCommand.encode([Array("PING".utf8)], into: &buffer)
        case .subscribe(let names): RESPCommand.encode([Array("SUBSCRIBE".utf8)] + names.map { Array($0.utf8) }, into: &buffer)
        case .unsubscribe(let names): RESPCommand.encode([Array("UNSUBSCRIBE".utf8)] + names.map { Array($0.utf8) }, into: &buffer)
        case .publish(let channel, let payload):
            let name = Array(channel.utf8)
            RESPCommand.encode([Array("PUBLISH".utf8), name, seal.seal(Array(payload.utf8), channel: name)], into: &buffer)
        }
    }

    private func connect() {
        let isSubscriber = role == "subscriber"
        let (tls, host) = (self.tls, endpoint.host)
        ClientBootstrap(group: loop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
            .channelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 512 * 1024, high: 4 * 1024 * 1024))
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        // A name is checked against the certificate and sent as SNI; an address is checked only.
                        let name = RedisEndpoint.isIPAddress(host) ? nil : host
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: name))
                    }
                    try channel.pipeline.syncOperations.addHandler(RESPHandler { [weak self] reply in
                        self?.received(reply, subscriber: isSubscriber)
                    })
                }
            }
            .connect(host: endpoint.host, port: endpoint.port)
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
                        self.onConnectionLost?()
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
        lastReply = reply
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
        case .status(let status): classified = status == "PONG" ? .pong : status == "OK" ? .ok : .other
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

/// Where and how to reach Redis, from `REDIS_URL`: `redis://[[user]:password@]host[:port][/db]`, or `rediss://…`
/// for TLS (the server's certificate verified against the system's CAs, or the file named by `?cacert=`).
public struct RedisEndpoint: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var tls: Bool
    public var caFile: String?
    public var credentials: RedisConnectionStateMachine.Credentials?

    public init?(url: String) {
        guard let components = URLComponents(string: url), let scheme = components.scheme, ["redis", "rediss"].contains(scheme),
              let host = components.host, !host.isEmpty
        else { return nil }
        self.host = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
        port = components.port ?? 6379
        tls = scheme == "rediss"
        caFile = components.queryItems?.first { $0.name == "cacert" }?.value
        if let password = components.password, !password.isEmpty {
            let user = components.user.flatMap { $0.isEmpty ? nil : $0 }
            credentials = .init(user: user, password: password)
        } else {
            credentials = nil
        }
    }

    /// The TLS client context for `rediss://` (nil for `redis://`).
    func tlsContext() throws -> NIOSSLContext? {
        guard tls else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let caFile { configuration.trustRoots = .file(caFile) }
        return try NIOSSLContext(configuration: configuration)
    }

    static func isIPAddress(_ host: String) -> Bool {
        (try? SocketAddress(ipAddress: host, port: 0)) != nil
    }
}
