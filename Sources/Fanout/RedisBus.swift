import ChatDomain
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Fan-out across instances through Redis pub/sub. RESP is encoded and parsed by hiredis; SwiftNIO does the
/// non-blocking socket I/O. Two connections: one publishes every committed message (`PUBLISH gw:<channel>`),
/// one holds the SUBSCRIBEs of the channels this instance has local subscribers for. Both reconnect with
/// backoff; after a reconnect the channels are subscribed again and the Hub reads each from the store.
/// Local subscribers get a publish at once (not through Redis); the copy that comes back is a duplicate the
/// Hub drops.
public final class RedisBus: Bus {
    public static let prefix = "gw:"
    /// A message here tells every instance to read all its channels from the store once: an instance whose
    /// publishing connection dropped may have lost PUBLISHes in it, so it sends this after reconnecting.
    static let syncChannel = "gw:_sync"
    /// Revocations and member removals (JSON text), for every instance.
    static let controlChannel = "gw:_control"
    private let host: String
    private let port: Int
    private let group: any EventLoopGroup
    private let logger: Logger
    private let state = NIOLockedValueBox(State())

    struct State {
        var receiver: (@Sendable ([Message]) -> Void)?
        var controlReceiver: (@Sendable (String) -> Void)?
        var availability: (@Sendable (Bool) -> Void)?
        var channels: Set<String> = []
        /// Waiting for Redis to confirm a SUBSCRIBE.
        var pendingActive: [String: [@Sendable () -> Void]] = [:]
        var publisher: (any Channel)?
        var subscriber: (any Channel)?
        var subscriberReady = false
        var stopped = false
    }

    public init(host: String, port: Int, group: any EventLoopGroup, logger: Logger) {
        self.host = host
        self.port = port
        self.group = group
        self.logger = logger
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
        Task { await self.maintain(subscriber: false) }
        Task { await self.maintain(subscriber: true) }
    }

    public func stop() {
        let channels = state.withLockedValue { state -> [any Channel] in
            state.stopped = true
            return [state.publisher, state.subscriber].compactMap { $0 }
        }
        for channel in channels { channel.close(promise: nil) }
    }

    public var isAvailable: Bool { state.withLockedValue { $0.subscriberReady } }

    // MARK: Bus

    public func publish(_ messages: [Message]) {
        let (receiver, publisher) = state.withLockedValue { ($0.receiver, $0.publisher) }
        receiver?(messages)
        guard let publisher else { return }
        publisher.eventLoop.execute {
            for message in messages {
                var command = ByteBuffer()
                RESPCommand.encode([Array("PUBLISH".utf8), Array((Self.prefix + message.channel.rawValue).utf8),
                                    Array(MessageWire.encode(message).readableBytesView)], into: &command)
                publisher.write(command, promise: nil)
            }
            publisher.flush()
        }
    }

    public func subscribe(_ channel: ChannelName, active: @escaping @Sendable () -> Void) {
        let name = Self.prefix + channel.rawValue
        let subscriber = state.withLockedValue { state -> (any Channel)? in
            state.channels.insert(name)
            guard state.subscriberReady, let subscriber = state.subscriber else { return nil }
            state.pendingActive[name, default: []].append(active)
            return subscriber
        }
        guard let subscriber else {
            active()  // The bus is down: the Hub polls the store until it is back.
            return
        }
        subscriber.writeAndFlush(RESPCommand.encode(["SUBSCRIBE", name]), promise: nil)
    }

    public func unsubscribe(_ channel: ChannelName) {
        let name = Self.prefix + channel.rawValue
        let subscriber = state.withLockedValue { state -> (any Channel)? in
            state.channels.remove(name)
            return state.subscriberReady ? state.subscriber : nil
        }
        subscriber?.writeAndFlush(RESPCommand.encode(["UNSUBSCRIBE", name]), promise: nil)
    }

    public func setReceiver(_ receiver: @escaping @Sendable ([Message]) -> Void, availability: @escaping @Sendable (Bool) -> Void) {
        state.withLockedValue {
            $0.receiver = receiver
            $0.availability = availability
        }
    }

    public func publishControl(_ payload: String) {
        let (receiver, publisher) = state.withLockedValue { ($0.controlReceiver, $0.publisher) }
        receiver?(payload)
        guard let publisher else { return }
        publisher.writeAndFlush(RESPCommand.encode(["PUBLISH", Self.controlChannel, payload]), promise: nil)
    }

    public func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void) {
        state.withLockedValue { $0.controlReceiver = receiver }
    }

    // MARK: connections

    private func maintain(subscriber isSubscriber: Bool) async {
        var delay = Duration.milliseconds(100)
        var connectedBefore = false
        while !state.withLockedValue({ $0.stopped }) {
            do {
                let channel = try await ClientBootstrap(group: group)
                    .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
                    .connectTimeout(.seconds(2))
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(RESPHandler { [weak self] reply in
                                if isSubscriber { self?.subscriberReply(reply) }
                            })
                        }
                    }
                    .connect(host: host, port: port).get()
                let stopped = state.withLockedValue { state -> Bool in
                    if isSubscriber { state.subscriber = channel } else { state.publisher = channel }
                    return state.stopped
                }
                if stopped { channel.close(promise: nil) }
                if isSubscriber {
                    resubscribe(channel)
                } else if connectedBefore {
                    channel.writeAndFlush(RESPCommand.encode(["PUBLISH", Self.syncChannel, "1"]), promise: nil)
                }
                connectedBefore = true
                logger.info("redis connected", metadata: ["role": "\(isSubscriber ? "subscriber" : "publisher")"])
                delay = .milliseconds(100)
                try? await channel.closeFuture.get()
            } catch {
                logger.debug("redis connect failed", metadata: ["error": "\(error)"])
            }
            let (wasReady, stopped) = state.withLockedValue { state -> (Bool, Bool) in
                let ready = state.subscriberReady
                if isSubscriber {
                    state.subscriber = nil
                    state.subscriberReady = false
                } else {
                    state.publisher = nil
                }
                return (ready && isSubscriber, state.stopped)
            }
            // Stopped on purpose (shutdown): nobody is to poll, and the event loops may be gone.
            if stopped { return }
            if wasReady {
                logger.warning("redis subscriber connection lost; polling the store until it is back")
                state.withLockedValue { $0.availability }?(false)
            }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(2))
        }
    }

    /// After a (re)connect: subscribe to every channel, then PING; the PONG means every SUBSCRIBE is active.
    private func resubscribe(_ channel: any Channel) {
        let names = state.withLockedValue { Array($0.channels) } + [Self.syncChannel, Self.controlChannel]
        var command = ByteBuffer()
        RESPCommand.encode([Array("SUBSCRIBE".utf8)] + names.map { Array($0.utf8) }, into: &command)
        RESPCommand.encode([Array("PING".utf8)], into: &command)
        channel.writeAndFlush(command, promise: nil)
    }

    private func subscriberReply(_ reply: RESPValue) {
        guard case .array(let parts) = reply, case .string(let kindBytes)? = parts.first else {
            if case .status("PONG") = reply { becameReady() }
            return
        }
        switch String(buffer: kindBytes) {
        case "message":
            guard parts.count == 3, case .string(let nameBytes) = parts[1], case .string(let payload) = parts[2] else { return }
            if String(buffer: nameBytes) == Self.syncChannel {
                // Another instance may have lost publishes: every channel reads the store once.
                state.withLockedValue { $0.availability }?(true)
                return
            }
            if String(buffer: nameBytes) == Self.controlChannel {
                state.withLockedValue { $0.controlReceiver }?(String(buffer: payload))
                return
            }
            guard let message = MessageWire.decode(payload) else { return }
            state.withLockedValue { $0.receiver }?([message])
        case "subscribe":
            guard parts.count >= 2, case .string(let nameBytes) = parts[1] else { return }
            let callbacks = state.withLockedValue { $0.pendingActive.removeValue(forKey: String(buffer: nameBytes)) } ?? []
            for callback in callbacks { callback() }
        case "pong":
            becameReady()
        default:
            break
        }
    }

    private func becameReady() {
        let (wasReady, availability, pending) = state.withLockedValue { state in
            let was = state.subscriberReady
            state.subscriberReady = true
            let pending = state.pendingActive
            state.pendingActive = [:]
            return (was, state.availability, pending)
        }
        for callbacks in pending.values { callbacks.forEach { $0() } }
        if !wasReady {
            logger.info("redis subscriptions active")
            availability?(true)
        }
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
