import ChatDomain
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// How a subscriber wants messages on the wire. The Hub encodes each message once per format in use and
/// shares the bytes with every subscriber of that format.
public enum WireFormat: Int, Sendable, CaseIterable {
    case webSocket = 0
    case serverSentEvents = 1
    /// WebSocket frames for connections that negotiated permessage-deflate (compressed once, shared).
    case webSocketDeflate = 2
    /// The same for clients that limited the server's window (compressed with a 512-byte window).
    case webSocketDeflateSmallWindow = 3
}

/// Encodes one message for one wire format (supplied by the Gateway, which owns the transports).
public typealias MessageEncoder = @Sendable (Message, WireFormat) -> ByteBuffer

/// A message with its encodings for the formats its receivers use.
public struct EncodedMessage: Sendable, Sequenced {
    public let message: Message
    private let encoded: [ByteBuffer?]

    public init(_ message: Message, formats: Set<WireFormat>, encoder: MessageEncoder) {
        self.message = message
        var encoded = [ByteBuffer?](repeating: nil, count: WireFormat.allCases.count)
        for format in formats { encoded[format.rawValue] = encoder(message, format) }
        self.encoded = encoded
    }

    public var seq: Int64 { message.seq }

    public func bytes(_ format: WireFormat) -> ByteBuffer? { encoded[format.rawValue] }
}

/// A local receiver of a channel's live messages. `hubDelivered` is called on `eventLoop`, with messages in
/// `seq` order.
public protocol HubSubscriber: AnyObject, Sendable {
    var eventLoop: any EventLoop { get }
    /// `nil` for receivers that only need to know that something arrived (long-poll).
    var format: WireFormat? { get }
    func hubDelivered(_ messages: [EncodedMessage])
    /// The channel has reached at least `seq`: a subscriber behind it reads the store (it may have read the
    /// store before the Hub knew of it, or the bus may have lost messages).
    func hubSynced(upTo seq: Int64)
}

/// The local subscribers of every channel on this instance. Each channel lives on one home event loop
/// (by hash), where its state is touched without locks: the Hub orders the channel's live messages with a
/// `GaplessSequencer` (repairing gaps from the store, once per instance rather than once per subscriber),
/// encodes each message once per format, and hops once per event loop that has subscribers.
public final class Hub: Sendable {
    private let shards: [HubShard]
    let store: any Store
    let bus: any Bus
    let encoder: MessageEncoder
    let logger: Logger
    private let storeReadHook = NIOLockedValueBox<(@Sendable (ChannelName) async -> Void)?>(nil)

    /// Runs after the Hub read messages from the store and before it delivers them. The gateway uses it to
    /// learn of member removals first (through the store as well), so that a message read after a removal
    /// committed never reaches the removed member, even when the bus lost the removal's broadcast.
    public func setStoreReadHook(_ hook: @escaping @Sendable (ChannelName) async -> Void) {
        storeReadHook.withLockedValue { $0 = hook }
    }

    func afterStoreRead(_ channel: ChannelName) async {
        await storeReadHook.withLockedValue { $0 }?(channel)
    }

    public init(loops: [any EventLoop], store: any Store, bus: any Bus, encoder: @escaping MessageEncoder, logger: Logger) {
        precondition(!loops.isEmpty)
        self.store = store
        self.bus = bus
        self.encoder = encoder
        self.logger = logger
        self.shards = loops.map { HubShard(loop: $0) }
        bus.setReceiver({ [weak self] messages in self?.receive(messages) },
                        availability: { [weak self] up in self?.busAvailability(up) })
    }

    /// While the bus is down every channel polls the store; when it is back, each reads once more.
    private func busAvailability(_ up: Bool) {
        for shard in shards {
            shard.loop.execute { shard.setPolling(!up, hub: self) }
        }
    }

    private func shard(for channel: ChannelName) -> HubShard {
        shards[Int(UInt(bitPattern: channel.hashValue) % UInt(shards.count))]
    }

    public func subscribe(_ channel: ChannelName, _ subscriber: any HubSubscriber) {
        let shard = shard(for: channel)
        shard.loop.execute { shard.add(subscriber, to: channel, hub: self) }
    }

    public func unsubscribe(_ channel: ChannelName, _ subscriber: any HubSubscriber) {
        let shard = shard(for: channel)
        shard.loop.execute { shard.remove(subscriber, from: channel, hub: self) }
    }

    /// Messages from the bus, in any order, possibly duplicated.
    public func receive(_ messages: [Message]) {
        if shards.count == 1 {
            let shard = shards[0]
            shard.loop.execute { shard.receive(messages, hub: self) }
            return
        }
        var perShard = [[Message]](repeating: [], count: shards.count)
        for message in messages {
            perShard[Int(UInt(bitPattern: message.channel.hashValue) % UInt(shards.count))].append(message)
        }
        for (index, batch) in perShard.enumerated() where !batch.isEmpty {
            let shard = shards[index]
            shard.loop.execute { shard.receive(batch, hub: self) }
        }
    }

    /// How many channels have local subscribers (for metrics and tests).
    public func channelCount() async -> Int {
        var total = 0
        for shard in shards {
            total += (try? await shard.loop.submit { shard.channels.count }.get()) ?? 0
        }
        return total
    }
}

/// The channels homed on one event loop. Only touched on `loop`.
final class HubShard: @unchecked Sendable {  // every member is only used on `loop` (asserted)
    let loop: any EventLoop
    var channels: [ChannelName: ChannelEntry] = [:]
    private var pollTask: RepeatedTask?
    static let pollInterval = TimeAmount.milliseconds(200)

    init(loop: any EventLoop) { self.loop = loop }

    func setPolling(_ on: Bool, hub: Hub) {
        loop.preconditionInEventLoop()
        pollTask?.cancel()
        pollTask = nil
        if on {
            pollTask = loop.scheduleRepeatedTask(initialDelay: Self.pollInterval, delay: Self.pollInterval) { [weak self] _ in
                self?.pollAll(hub: hub)
            }
        }
        pollAll(hub: hub)
    }

    private func pollAll(hub: Hub) {
        for (channel, entry) in channels where entry.begun {
            perform(entry.sequencer.poll(), channel, entry, hub: hub)
        }
    }

    final class LoopGroup {
        let loop: any EventLoop
        var subscribers: [ObjectIdentifier: any HubSubscriber] = [:]
        init(loop: any EventLoop) { self.loop = loop }
    }

    final class ChannelEntry: @unchecked Sendable {  // only touched on the shard's loop
        var sequencer = GaplessSequencer<Message>(capacity: 4096)
        var groups: [ObjectIdentifier: LoopGroup] = [:]
        var formatCounts = [Int](repeating: 0, count: WireFormat.allCases.count)
        var count = 0
        var readInFlight = false
        var closed = false
        /// The channel's position is known (the Hub read its head once the bus subscription was active).
        var begun = false

        var formats: Set<WireFormat> {
            Set(WireFormat.allCases.filter { formatCounts[$0.rawValue] > 0 })
        }
    }

    func add(_ subscriber: any HubSubscriber, to channel: ChannelName, hub: Hub) {
        loop.preconditionInEventLoop()
        let entry: ChannelEntry
        if let existing = channels[channel] {
            entry = existing
        } else {
            entry = ChannelEntry()
            channels[channel] = entry
            let loop = self.loop
            hub.bus.subscribe(channel) {
                loop.execute {
                    guard !entry.closed else { return }
                    self.startFromHead(channel, entry, hub: hub)
                }
            }
        }
        let loopID = ObjectIdentifier(subscriber.eventLoop)
        let group = entry.groups[loopID] ?? LoopGroup(loop: subscriber.eventLoop)
        entry.groups[loopID] = group
        if group.subscribers.updateValue(subscriber, forKey: ObjectIdentifier(subscriber)) == nil {
            entry.count += 1
            if let format = subscriber.format { entry.formatCounts[format.rawValue] += 1 }
        }
        if entry.begun {
            // The subscriber may have read the store before it was registered here.
            let last = entry.sequencer.last
            subscriber.eventLoop.execute { subscriber.hubSynced(upTo: last) }
        }
    }

    func remove(_ subscriber: any HubSubscriber, from channel: ChannelName, hub: Hub) {
        loop.preconditionInEventLoop()
        guard let entry = channels[channel] else { return }
        let loopID = ObjectIdentifier(subscriber.eventLoop)
        guard let group = entry.groups[loopID], group.subscribers.removeValue(forKey: ObjectIdentifier(subscriber)) != nil else { return }
        entry.count -= 1
        if let format = subscriber.format { entry.formatCounts[format.rawValue] -= 1 }
        if group.subscribers.isEmpty { entry.groups[loopID] = nil }
        if entry.count == 0 {
            entry.closed = true
            channels[channel] = nil
            hub.bus.unsubscribe(channel)
        }
    }

    /// A channel's first subscriber: learn where the channel is, then go live after it.
    private func startFromHead(_ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        entry.readInFlight = true
        let loop = self.loop
        Task {
            let head: Int64
            do {
                head = try await hub.store.head(of: channel)
            } catch {
                hub.logger.warning("hub could not read channel head; retrying", metadata: ["channel": "\(channel)"])
                try? await Task.sleep(for: .milliseconds(200))
                loop.execute {
                    guard !entry.closed else { return }
                    self.startFromHead(channel, entry, hub: hub)
                }
                return
            }
            loop.execute {
                entry.readInFlight = false
                guard !entry.closed else { return }
                entry.begun = true
                let step = entry.sequencer.begin(after: head)
                self.sync(entry, upTo: head)
                self.perform(step, channel, entry, hub: hub)
            }
        }
    }

    func receive(_ messages: [Message], hub: Hub) {
        loop.preconditionInEventLoop()
        var deliveries: [ChannelName: [Message]] = [:]
        for message in messages {
            guard let entry = channels[message.channel] else { continue }
            let step = entry.sequencer.receive(message)
            if !step.deliver.isEmpty { deliveries[message.channel, default: []].append(contentsOf: step.deliver) }
            if let after = step.readAfter { read(message.channel, entry, after: after, hub: hub) }
        }
        for (channel, batch) in deliveries {
            if let entry = channels[channel] { dispatch(batch, entry, hub: hub) }
        }
    }

    private func perform(_ step: GaplessSequencer<Message>.Step, _ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        if !step.deliver.isEmpty { dispatch(step.deliver, entry, hub: hub) }
        if let after = step.readAfter { read(channel, entry, after: after, hub: hub) }
    }

    /// Gap repair (and the first read after the head): read the store after `after`, once at a time.
    private func read(_ channel: ChannelName, _ entry: ChannelEntry, after: Int64, hub: Hub) {
        guard !entry.readInFlight else { return }
        entry.readInFlight = true
        let loop = self.loop
        Task {
            let page: Page?
            do {
                page = try await hub.store.messages(in: channel, after: after, limit: 1000)
                if page?.messages.isEmpty == false { await hub.afterStoreRead(channel) }
            } catch {
                page = nil
                hub.logger.warning("hub gap repair read failed; retrying", metadata: ["channel": "\(channel)"])
                try? await Task.sleep(for: .milliseconds(200))
            }
            loop.execute {
                entry.readInFlight = false
                guard !entry.closed else { return }
                guard let page else {
                    self.read(channel, entry, after: entry.sequencer.last, hub: hub)
                    return
                }
                let step = entry.sequencer.readCompleted(page.messages, hasMore: page.hasMore)
                if page.messages.isEmpty && step.readAfter != nil {
                    // The store has not caught up with what was received: try again shortly.
                    loop.scheduleTask(in: .milliseconds(20)) { self.perform(step, channel, entry, hub: hub) }
                } else {
                    self.perform(step, channel, entry, hub: hub)
                }
            }
        }
    }

    private func sync(_ entry: ChannelEntry, upTo seq: Int64) {
        for group in entry.groups.values {
            let subscribers = Array(group.subscribers.values)
            group.loop.execute {
                for subscriber in subscribers { subscriber.hubSynced(upTo: seq) }
            }
        }
    }

    /// Encodes once per format in use, then hops once per event loop.
    private func dispatch(_ messages: [Message], _ entry: ChannelEntry, hub: Hub) {
        let formats = entry.formats
        let encoded = messages.map { EncodedMessage($0, formats: formats, encoder: hub.encoder) }
        for group in entry.groups.values {
            let subscribers = Array(group.subscribers.values)
            group.loop.execute {
                for subscriber in subscribers { subscriber.hubDelivered(encoded) }
            }
        }
    }
}
