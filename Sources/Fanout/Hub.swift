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

/// A message with its encodings for the formats its receivers use. A class: the fan-out hands the same
/// instance to every subscriber, so passing it on costs one reference count, not one per string it holds.
public final class EncodedMessage: Sendable, Sequenced {
    public let message: Message
    private let encoded: [ByteBuffer?]

    public init(_ message: Message, formats: Set<WireFormat>, encoder: MessageEncoder) {
        self.message = message
        var encoded = [ByteBuffer?](repeating: nil, count: WireFormat.allCases.count)
        for format in formats { encoded[format.rawValue] = encoder(message, format) }
        self.encoded = encoded
    }

    public var seq: Int64 { message.seq }
    public var membershipEpoch: Int64 { message.membershipEpoch }

    public func bytes(_ format: WireFormat) -> ByteBuffer? { encoded[format.rawValue] }
}

/// Consecutive messages of one channel (`seq` n, n+1, …) handed to every local subscriber at once. With more
/// than one, their frames are also joined into one buffer per format, once: a subscriber that takes them
/// all writes that buffer, one write for the batch.
public final class EncodedBatch: Sendable {
    public let messages: [EncodedMessage]
    private let joined: [ByteBuffer?]
    /// The highest membership epoch among the messages.
    public let membershipEpoch: Int64

    public init(_ messages: [EncodedMessage], formats: Set<WireFormat>) {
        self.messages = messages
        self.membershipEpoch = messages.reduce(0) { max($0, $1.membershipEpoch) }
        var joined = [ByteBuffer?](repeating: nil, count: WireFormat.allCases.count)
        let consecutive = messages.count > 1 && zip(messages, messages.dropFirst()).allSatisfy { $1.seq == $0.seq + 1 }
        if consecutive {
            for format in formats {
                let size = messages.reduce(0) { $0 + ($1.bytes(format)?.readableBytes ?? 0) }
                var buffer = ByteBuffer()
                buffer.reserveCapacity(size)
                for message in messages { if let bytes = message.bytes(format) { buffer.writeImmutableBuffer(bytes) } }
                joined[format.rawValue] = buffer
            }
        }
        self.joined = joined
    }

    public var first: Int64 { messages.first?.seq ?? 0 }
    public var last: Int64 { messages.last?.seq ?? 0 }

    /// Every message's frame in one buffer (consecutive batches of two or more only).
    public func joined(_ format: WireFormat) -> ByteBuffer? { joined[format.rawValue] }
}

/// A local receiver of a channel's live messages. `hubDelivered` is called on `eventLoop`, with messages in
/// `seq` order.
public protocol HubSubscriber: AnyObject, Sendable {
    var eventLoop: any EventLoop { get }
    /// `nil` for receivers that only need to know that something arrived (long-poll).
    var format: WireFormat? { get }
    func hubDelivered(_ batch: EncodedBatch)
    /// The Hub cannot deliver the channel's next messages (the retention deleted them): end with `error`.
    func hubFailed(_ error: ApiError)
    /// The channel has reached at least `seq`: a subscriber behind it reads the store (it may have read the
    /// store before the Hub knew of it, or the bus may have lost messages).
    func hubSynced(upTo seq: Int64)
}

extension HubSubscriber {
    /// Receivers that read the store themselves (long-poll) learn of it there.
    public func hubFailed(_ error: ApiError) {}
}

/// The local subscribers of every channel on this instance. Each channel lives on one home event loop
/// (by hash), where its state is touched without locks: a `BusSubscriptionStateMachine` decides when to
/// subscribe, unsubscribe and poll the store; a `GaplessSequencer` orders the channel's live messages
/// (repairing gaps from the store, once per instance rather than once per subscriber); each message is
/// encoded once per format and handed over with one hop per event loop that has subscribers.
///
/// One ticker checks channel heads against the store in one batched query: every `pollInterval` for
/// channels the bus cannot serve (down, or refused), every `reconcileInterval` for live ones, so a quiet
/// channel whose last message the bus lost still gets it.
public final class Hub: Sendable {
    public struct Configuration: Sendable {
        public var pollInterval: TimeAmount = .milliseconds(200)
        public var reconcileInterval: TimeAmount = .seconds(5)
        /// How long a channel's live messages may wait to be handed out together (0: at once). A batch costs
        /// each subscriber one write (one syscall) instead of one per message: CPU traded for latency.
        public var writeDelay: TimeAmount = .zero
        public init() {}
    }

    private let shards: [HubShard]
    let store: any Store
    let bus: any Bus
    let encoder: MessageEncoder
    let logger: Logger
    let configuration: Configuration
    private let storeReadHook = NIOLockedValueBox<(@Sendable (ChannelName) async -> Void)?>(nil)
    private let ticker = NIOLockedValueBox<RepeatedTask?>(nil)
    /// Set by `stop()`: nothing is scheduled on the event loops afterwards.
    let stopped = NIOLockedValueBox(false)
    /// Counters, gauges and the publish→deliver histogram (lock-free handles).
    public let metrics: FanoutMetrics

    /// Runs after the Hub read messages from the store and before it delivers them. The gateway uses it to
    /// learn of member removals first (through the store as well), so that a message read after a removal
    /// committed never reaches the removed member, even when the bus lost the removal's broadcast.
    public func setStoreReadHook(_ hook: @escaping @Sendable (ChannelName) async -> Void) {
        storeReadHook.withLockedValue { $0 = hook }
    }

    func afterStoreRead(_ channel: ChannelName) async {
        await storeReadHook.withLockedValue { $0 }?(channel)
    }

    public init(loops: [any EventLoop], store: any Store, bus: any Bus, encoder: @escaping MessageEncoder,
                configuration: Configuration = .init(), metrics: FanoutMetrics = .none, logger: Logger) {
        precondition(!loops.isEmpty)
        self.metrics = metrics
        self.store = store
        self.bus = bus
        self.encoder = encoder
        self.logger = logger
        self.configuration = configuration
        self.shards = loops.map { HubShard(loop: $0) }
        bus.setEvents(BusEvents(
            received: { [weak self] messages in self?.receive(messages) },
            subscribed: { [weak self] channel in self?.onShard(of: channel) { $0.busConfirmed(channel, subscribed: true, hub: $1) } },
            unsubscribed: { [weak self] channel in self?.onShard(of: channel) { $0.busConfirmed(channel, subscribed: false, hub: $1) } },
            availability: { [weak self] up in self?.onEveryShard { $0.setBus(up: up, hub: $1) } },
            syncRequested: { [weak self] in self?.onEveryShard { $0.syncAll(hub: $1) } }))
        let ticks = max(1, Int(configuration.reconcileInterval.nanoseconds / max(1, configuration.pollInterval.nanoseconds)))
        let state = NIOLockedValueBox((tick: 0, inFlight: false))
        ticker.withLockedValue {
            $0 = loops[0].scheduleRepeatedTask(initialDelay: configuration.pollInterval, delay: configuration.pollInterval) { [weak self] _ in
                let (tick, busy) = state.withLockedValue { s -> (Int, Bool) in
                    if s.inFlight { return (s.tick, true) }
                    s.tick += 1
                    s.inFlight = true
                    return (s.tick, false)
                }
                guard !busy, let self else { return }
                self.checkHeads(reconcile: tick % ticks == 0) { state.withLockedValue { $0.inFlight = false } }
            }
        }
    }

    /// Stops the ticker; events that still arrive are ignored.
    public func stop() {
        stopped.withLockedValue { $0 = true }
        ticker.withLockedValue { $0?.cancel() }
    }

    private func onShard(of channel: ChannelName, _ body: @escaping @Sendable (HubShard, Hub) -> Void) {
        guard !stopped.withLockedValue({ $0 }) else { return }
        let shard = shard(for: channel)
        shard.loop.execute { body(shard, self) }
    }

    private func onEveryShard(_ body: @escaping @Sendable (HubShard, Hub) -> Void) {
        guard !stopped.withLockedValue({ $0 }) else { return }
        for shard in shards { shard.loop.execute { body(shard, self) } }
    }

    private func shard(for channel: ChannelName) -> HubShard {
        shards[Int(UInt(bitPattern: channel.hashValue) % UInt(shards.count))]
    }

    public func subscribe(_ channel: ChannelName, _ subscriber: any HubSubscriber) {
        forSubscriber(subscriber, onShard: channel) { $0.add(subscriber, to: channel, hub: $1) }
    }

    public func unsubscribe(_ channel: ChannelName, _ subscriber: any HubSubscriber) {
        forSubscriber(subscriber, onShard: channel) { $0.remove(subscriber, from: channel, hub: $1) }
    }

    /// A subscriber's change, made at once when the subscriber calls on the channel's home loop (a task queued
    /// there costs an allocation, a lock and a trip through the loop: a measurable share of a long-poll). Safe
    /// because the Hub never calls a subscriber from inside its own work (every callback is a task on the
    /// subscriber's loop), and a subscriber calls only on its own loop, so its changes keep their order.
    private func forSubscriber(_ subscriber: any HubSubscriber, onShard channel: ChannelName,
                               _ body: @escaping @Sendable (HubShard, Hub) -> Void) {
        let shard = shard(for: channel)
        guard shard.loop.inEventLoop, subscriber.eventLoop === shard.loop else { return onShard(of: channel, body) }
        guard !stopped.withLockedValue({ $0 }) else { return }
        body(shard, self)
    }

    /// Messages from the bus, in any order, possibly duplicated.
    public func receive(_ messages: [Message]) {
        guard !stopped.withLockedValue({ $0 }) else { return }
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

    /// One tick: ask every shard which channels need their head checked, read those heads in one query,
    /// and hand each shard its answers.
    private func checkHeads(reconcile: Bool, done: @escaping @Sendable () -> Void) {
        // Gathered with `execute`, not `submit`: a loop that shuts down meanwhile drops the closure, where a
        // promise of `submit` would be left uncompleted.
        let gathered = NIOLockedValueBox((left: shards.count, channels: [ChannelName]()))
        for shard in shards {
            shard.loop.execute {
                let mine = shard.channelsToCheck(reconcile: reconcile)
                let all = gathered.withLockedValue { g -> [ChannelName]? in
                    g.channels += mine
                    g.left -= 1
                    return g.left == 0 ? g.channels : nil
                }
                guard let all else { return }
                guard !all.isEmpty else { return done() }
                self.readHeads(all, reconcile: reconcile, done: done)
            }
        }
    }

    private func readHeads(_ channels: [ChannelName], reconcile: Bool, done: @escaping @Sendable () -> Void) {
        Task {
            defer { done() }
            let heads: [String: Int64]
            do {
                heads = try await self.store.heads(of: channels)
            } catch {
                self.logger.warning("hub could not read channel heads", metadata: ["error": "\(error)"])
                return
            }
            (reconcile ? self.metrics.reconcileHeadChecks : self.metrics.pollHeadChecks).increment()
            self.onEveryShard { $0.headsRead(heads, hub: $1) }
        }
    }

    /// How many channels have local subscribers (for metrics and tests).
    public func channelCount() async -> Int {
        var total = 0
        for shard in shards {
            total += (try? await shard.loop.submit { shard.channels.values.filter { $0.bus.subscribers > 0 }.count }.get()) ?? 0
        }
        return total
    }

    /// Each channel's bus-subscription state (for tests and diagnostics).
    public func busStates() async -> [String: BusSubscriptionStateMachine.State] {
        var out: [String: BusSubscriptionStateMachine.State] = [:]
        for shard in shards {
            let states = (try? await shard.loop.submit { shard.channels.map { ($0.key.rawValue, $0.value.bus.state) } }.get()) ?? []
            for (name, state) in states { out[name] = state }
        }
        return out
    }
}

/// The channels homed on one event loop. Only touched on `loop`.
final class HubShard: @unchecked Sendable {  // every member is only used on `loop` (asserted)
    let loop: any EventLoop
    var channels: [ChannelName: ChannelEntry] = [:]
    /// What the bus last said of itself (a bus starts down).
    private var busUp = false

    init(loop: any EventLoop) { self.loop = loop }

    final class LoopGroup {
        let loop: any EventLoop
        var subscribers: [ObjectIdentifier: any HubSubscriber] = [:]
        init(loop: any EventLoop) { self.loop = loop }
    }

    final class ChannelEntry: @unchecked Sendable {  // only touched on the shard's loop
        var bus = BusSubscriptionStateMachine()
        var sequencer = GaplessSequencer<Message>(capacity: 4096)
        var groups: [ObjectIdentifier: LoopGroup] = [:]
        var formatCounts = [Int](repeating: 0, count: WireFormat.allCases.count)
        var readInFlight = false
        /// A store read was asked for while one was in flight (which may have read too early): read again after it.
        var rereadRequested = false
        /// Forgotten by the shard: reads still in flight are ignored.
        var closed = false
        /// With a write delay: messages waiting to be handed out, and whether their hand-out is scheduled.
        var delayed: [Message] = []
        var delayScheduled = false
        /// The channel's position is known (the Hub read its head once).
        var begun = false

        var formats: Set<WireFormat> {
            Set(WireFormat.allCases.filter { formatCounts[$0.rawValue] > 0 })
        }
    }

    // MARK: events

    func add(_ subscriber: any HubSubscriber, to channel: ChannelName, hub: Hub) {
        loop.preconditionInEventLoop()
        let entry: ChannelEntry
        if let existing = channels[channel] {
            entry = existing
        } else {
            entry = ChannelEntry()
            channels[channel] = entry
        }
        let loopID = ObjectIdentifier(subscriber.eventLoop)
        let group = entry.groups[loopID] ?? LoopGroup(loop: subscriber.eventLoop)
        entry.groups[loopID] = group
        guard group.subscribers.updateValue(subscriber, forKey: ObjectIdentifier(subscriber)) == nil else { return }
        if let format = subscriber.format { entry.formatCounts[format.rawValue] += 1 }
        hub.metrics.subscriptions.increment()
        perform(entry.bus.subscriberAdded(busUp: busUp), channel, entry, hub: hub)
        if entry.bus.subscribers == 1 { hub.metrics.channels.increment() }
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
        if let format = subscriber.format { entry.formatCounts[format.rawValue] -= 1 }
        if group.subscribers.isEmpty { entry.groups[loopID] = nil }
        hub.metrics.subscriptions.decrement()
        perform(entry.bus.subscriberRemoved(), channel, entry, hub: hub)
        if entry.bus.subscribers == 0 { hub.metrics.channels.decrement() }
    }

    func busConfirmed(_ channel: ChannelName, subscribed: Bool, hub: Hub) {
        loop.preconditionInEventLoop()
        guard let entry = channels[channel] else { return }
        perform(subscribed ? entry.bus.subscribeConfirmed() : entry.bus.unsubscribeConfirmed(busUp: busUp), channel, entry, hub: hub)
    }

    /// The bus went down or came back: every channel moves at once; the SUBSCRIBEs go out in one request.
    func setBus(up: Bool, hub: Hub) {
        loop.preconditionInEventLoop()
        busUp = up
        hub.metrics.polling.record(up ? 0 : 1)
        var subscribe: [ChannelName] = []
        for (channel, entry) in channels {
            let action = up ? entry.bus.busRestored() : entry.bus.busLost()
            if action == .subscribe { subscribe.append(channel) } else { perform(action, channel, entry, hub: hub) }
        }
        if !subscribe.isEmpty { hub.bus.subscribe(subscribe) }
    }

    /// Another instance may have lost publishes: every channel with subscribers reads the store once.
    func syncAll(hub: Hub) {
        loop.preconditionInEventLoop()
        for (channel, entry) in channels where entry.bus.subscribers > 0 && entry.begun {
            perform(entry.sequencer.poll(), channel, entry, hub: hub)
        }
    }

    /// The channels whose head the ticker should read now.
    func channelsToCheck(reconcile: Bool) -> [ChannelName] {
        loop.preconditionInEventLoop()
        var out: [ChannelName] = []
        for (channel, entry) in channels where entry.begun && !entry.readInFlight {
            if entry.bus.pollTick() == .checkHead || (reconcile && entry.bus.reconcileTick() == .checkHead) { out.append(channel) }
        }
        return out
    }

    func headsRead(_ heads: [String: Int64], hub: Hub) {
        loop.preconditionInEventLoop()
        for (channel, entry) in channels where entry.begun {
            guard let head = heads[channel.rawValue] else { continue }
            if entry.bus.headRead(head, delivered: entry.sequencer.last) == .readStore {
                if case .live = entry.bus.state {
                    hub.metrics.reconcileRepairs.increment()
                    hub.logger.info("reconcile found a channel behind the store", metadata: ["channel": "\(channel)", "delivered": "\(entry.sequencer.last)", "head": "\(head)"])
                }
                readStore(channel, entry, hub: hub)
            }
        }
    }

    func receive(_ messages: [Message], hub: Hub) {
        loop.preconditionInEventLoop()
        var deliveries: [ChannelName: [Message]] = [:]
        for message in messages {
            // Before the position is known, the sequencer holds what arrives.
            guard let entry = channels[message.channel] else { continue }
            let step = entry.sequencer.receive(message)
            if !step.deliver.isEmpty { deliveries[message.channel, default: []].append(contentsOf: step.deliver) }
            if let after = step.readAfter {
                hub.metrics.gapRepairs.increment()
                read(message.channel, entry, after: after, hub: hub)
            }
        }
        for (channel, batch) in deliveries {
            if let entry = channels[channel] { dispatch(batch, entry, hub: hub) }
        }
    }

    // MARK: actions

    private func perform(_ action: BusSubscriptionStateMachine.Action, _ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        switch action {
        case .none, .checkHead: break
        case .subscribe: hub.bus.subscribe([channel])
        case .unsubscribe: hub.bus.unsubscribe([channel])
        case .readStore: readStore(channel, entry, hub: hub)
        case .release:
            entry.closed = true
            channels[channel] = nil
        }
    }

    /// Reads the store after what was delivered: the channel's head first if its position is not known yet.
    private func readStore(_ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        if entry.begun {
            if entry.readInFlight { entry.rereadRequested = true }
            perform(entry.sequencer.poll(), channel, entry, hub: hub)
        } else if !entry.readInFlight {
            startFromHead(channel, entry, hub: hub)
        }
    }

    /// A channel's first read: learn where the channel is, then go on after it.
    private func startFromHead(_ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        entry.readInFlight = true
        let loop = self.loop
        Task {
            let head: Int64?
            do {
                head = try await hub.store.head(of: channel)
            } catch {
                hub.logger.warning("hub could not read channel head; retrying", metadata: ["channel": "\(channel)"])
                head = nil
            }
            guard !hub.stopped.withLockedValue({ $0 }) else { return }
            loop.execute {
                entry.readInFlight = false
                guard !entry.closed else { return }
                guard let head else {
                    loop.scheduleTask(in: hub.configuration.pollInterval) { if !entry.closed && !entry.begun { self.startFromHead(channel, entry, hub: hub) } }
                    return
                }
                entry.begun = true
                let step = entry.sequencer.begin(after: head)
                self.sync(entry, upTo: head)
                self.perform(step, channel, entry, hub: hub)
            }
        }
    }

    private func perform(_ step: GaplessSequencer<Message>.Step, _ channel: ChannelName, _ entry: ChannelEntry, hub: Hub) {
        if !step.deliver.isEmpty { dispatch(step.deliver, entry, hub: hub) }
        if let after = step.readAfter { read(channel, entry, after: after, hub: hub) }
    }

    /// Gap repair, polls and reconciles: read the store after `after`, once at a time.
    private func read(_ channel: ChannelName, _ entry: ChannelEntry, after: Int64, hub: Hub) {
        guard !entry.readInFlight else { return }
        entry.readInFlight = true
        let loop = self.loop
        Task {
            let page: Page?
            var expired: ApiError?
            do {
                page = try await hub.store.messages(in: channel, after: after, limit: 1000)
                if page?.messages.isEmpty == false {
                    await hub.afterStoreRead(channel)
                }
            } catch {
                page = nil
                if let error = error as? ApiError, error.code == .cursorExpired {
                    expired = error
                } else {
                    hub.logger.warning("hub store read failed; retrying", metadata: ["channel": "\(channel)"])
                }
            }
            guard !hub.stopped.withLockedValue({ $0 }) else { return }
            loop.execute {
                entry.readInFlight = false
                guard !entry.closed else { return }
                if let expired {
                    self.retentionOvertook(channel, entry, expired, hub: hub)
                    return
                }
                guard let page else {
                    loop.scheduleTask(in: hub.configuration.pollInterval) {
                        if !entry.closed { self.read(channel, entry, after: entry.sequencer.last, hub: hub) }
                    }
                    return
                }
                let step = entry.sequencer.readCompleted(page.messages, hasMore: page.hasMore)
                if page.messages.isEmpty && step.readAfter != nil {
                    // The store has not caught up with what was received: try again shortly.
                    loop.scheduleTask(in: .milliseconds(20)) { if !entry.closed { self.perform(step, channel, entry, hub: hub) } }
                } else {
                    self.perform(step, channel, entry, hub: hub)
                    if entry.rereadRequested && !entry.readInFlight {
                        entry.rereadRequested = false
                        self.perform(entry.sequencer.poll(), channel, entry, hub: hub)
                    }
                }
            }
        }
    }

    /// The retention deleted messages this instance had not delivered yet (it fell that far behind): its
    /// subscribers cannot get them, so each is told (`CURSOR_EXPIRED`, never a silent gap) and ended; the
    /// channel starts again from its head for whoever subscribes next.
    private func retentionOvertook(_ channel: ChannelName, _ entry: ChannelEntry, _ error: ApiError, hub: Hub) {
        hub.logger.warning("retention deleted messages not yet delivered here; ending the channel's subscriptions",
                           metadata: ["channel": "\(channel)", "delivered": "\(entry.sequencer.last)"])
        for group in entry.groups.values {
            let subscribers = Array(group.subscribers.values)
            group.loop.execute { for subscriber in subscribers { subscriber.hubFailed(error) } }
        }
        entry.begun = false
        entry.sequencer = GaplessSequencer<Message>(capacity: 4096)
        startFromHead(channel, entry, hub: hub)
    }

    private func sync(_ entry: ChannelEntry, upTo seq: Int64) {
        for group in entry.groups.values {
            let subscribers = Array(group.subscribers.values)
            group.loop.execute {
                for subscriber in subscribers { subscriber.hubSynced(upTo: seq) }
            }
        }
    }

    /// Encodes once per format in use (and joins a batch's frames once), then hops once per event loop. With
    /// a write delay, messages wait up to that long on the channel's loop to go out together.
    private func dispatch(_ messages: [Message], _ entry: ChannelEntry, hub: Hub) {
        let delay = hub.configuration.writeDelay
        guard delay.nanoseconds > 0 else { return handOut(messages, entry, hub: hub) }
        entry.delayed += messages
        guard !entry.delayScheduled else { return }
        entry.delayScheduled = true
        loop.scheduleTask(in: delay) {
            entry.delayScheduled = false
            let batch = entry.delayed
            entry.delayed = []
            if !entry.closed { self.handOut(batch, entry, hub: hub) }
        }
    }

    private func handOut(_ messages: [Message], _ entry: ChannelEntry, hub: Hub) {
        hub.metrics.batches.increment()
        hub.metrics.batchedMessages.increment(by: messages.count)
        // Publish → hand-out, once per message on this instance (the store's clock wrote `created_at`).
        let now = Timestamp.nowMicros()
        for message in messages { hub.metrics.publishToDeliver.recordMicroseconds(max(0, now - message.createdAtMicros)) }
        let formats = entry.formats
        let batch = EncodedBatch(messages.map { EncodedMessage($0, formats: formats, encoder: hub.encoder) }, formats: formats)
        for group in entry.groups.values {
            let subscribers = Array(group.subscribers.values)
            group.loop.execute {
                for subscriber in subscribers { subscriber.hubDelivered(batch) }
            }
        }
    }
}
