import ChatDomain
import NIOCore

/// Where a subscription's messages go: one client connection. Every call is made on the connection's
/// event loop.
public protocol SubscriptionSink: AnyObject {
    /// Queues one encoded message (not flushed).
    func write(_ bytes: ByteBuffer, message: Message)
    /// Flushes what was queued; the future completes when it reached the socket.
    func flush() -> EventLoopFuture<Void>
    /// Whether the connection's send buffer is under its budget.
    var isWritable: Bool { get }
    /// The client fell further behind than its budget while live.
    func slowConsumer()
    /// The store could not be read for the catch-up.
    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError)
    /// The subscription reached the end set by `end(after:)` (a member removed from a thread).
    func subscriptionEnded(_ channel: ChannelName)
}

/// One client's subscription to one channel: registers with the Hub first (live messages are held), reads
/// the store after the start position (page by page, each page written before the next is read), then
/// hands over to live delivery with no gap and no duplicate — the `GaplessSequencer` decides.
public final class Subscription: HubSubscriber, @unchecked Sendable {  // mutable state is only touched on `eventLoop`
    public static let catchUpPage = 100

    public let channel: ChannelName
    public let eventLoop: any EventLoop
    public let format: WireFormat?
    private let hub: Hub
    private weak var sink: (any SubscriptionSink)?
    private var sequencer: GaplessSequencer<EncodedMessage>
    private var reading = false
    private var begun = false
    /// Set by `end(after:)`: nothing after this seq is delivered, and the subscription ends once it is reached.
    private var limit: Int64?
    public private(set) var isCancelled = false

    public init(channel: ChannelName, eventLoop: any EventLoop, format: WireFormat, hub: Hub, sink: any SubscriptionSink, heldLimit: Int = 1024) {
        self.channel = channel
        self.eventLoop = eventLoop
        self.format = format
        self.hub = hub
        self.sink = sink
        self.sequencer = GaplessSequencer(capacity: heldLimit)
    }

    /// The last seq handed to the sink.
    public var lastDelivered: Int64 { sequencer.last }

    /// Step 1: register with the Hub; live messages are held from now on.
    public func register() {
        hub.subscribe(channel, self)
    }

    /// Step 2, once the start position is known (and the client told): catch up after it, then go live.
    public func begin(after position: Int64) {
        eventLoop.preconditionInEventLoop()
        begun = true
        perform(sequencer.begin(after: position))
        checkLimit()
    }

    /// Delivers every message up to `seq` (reading the store for any the bus lost), none after it, then
    /// ends and tells the sink. For a member removed from a thread: `seq` is the head at the removal.
    public func end(after seq: Int64) {
        eventLoop.preconditionInEventLoop()
        guard !isCancelled else { return }
        limit = min(limit ?? seq, seq)
        guard begun else { return }
        if !checkLimit() { hubSynced(upTo: seq) }
    }

    /// Ends the subscription when its limit is reached; true when it ended.
    @discardableResult
    private func checkLimit() -> Bool {
        guard let limit, begun, !isCancelled, sequencer.last >= limit else { return false }
        cancel()
        sink?.subscriptionEnded(channel)
        return true
    }

    public func cancel() {
        guard !isCancelled else { return }
        isCancelled = true
        hub.unsubscribe(channel, self)
    }

    public func hubDelivered(_ messages: [EncodedMessage]) {
        guard !isCancelled, let sink else { return }
        if !sequencer.isReading && !sink.isWritable {
            sink.slowConsumer()
            return
        }
        var wrote = false
        for message in messages {
            // Past the end: never written (`end(after:)` already asked the store for anything missing before it).
            if let limit, message.message.seq > limit { continue }
            if sequencer.acceptNext(message) {
                // The per-message, per-subscriber path: the shared bytes, no allocation.
                if let format, let bytes = message.bytes(format) {
                    sink.write(bytes, message: message.message)
                    wrote = true
                    continue
                }
                wrote = write([message], to: sink) || wrote
                continue
            }
            let step = sequencer.receive(message)
            wrote = write(step.deliver, to: sink) || wrote
            if let after = step.readAfter { read(after: after) }
        }
        if wrote { _ = sink.flush() }
        checkLimit()
    }

    public func hubSynced(upTo seq: Int64) {
        guard !isCancelled, sequencer.last < seq else { return }
        let step = sequencer.poll()
        if let after = step.readAfter { read(after: after) }
    }

    private func write(_ messages: [EncodedMessage], to sink: any SubscriptionSink) -> Bool {
        guard let format else { return false }
        var wrote = false
        for message in messages where limit.map({ message.message.seq <= $0 }) ?? true {
            wrote = true
            let bytes = message.bytes(format) ?? hub.encoder(message.message, format)
            sink.write(bytes, message: message.message)
        }
        return wrote
    }

    private func perform(_ step: GaplessSequencer<EncodedMessage>.Step) {
        guard !isCancelled, let sink else { return }
        let wrote = write(step.deliver, to: sink)
        let flushed = wrote ? sink.flush() : eventLoop.makeSucceededVoidFuture()
        if checkLimit() { return }
        if let after = step.readAfter {
            // Pace the catch-up: read the next page only once this one reached the socket.
            flushed.whenComplete { [weak self] _ in self?.read(after: after) }
        }
    }

    private func read(after: Int64) {
        guard !reading, !isCancelled else { return }
        reading = true
        let store = hub.store
        let channel = self.channel
        let loop = eventLoop
        let format = self.format.map { Set([$0]) } ?? []
        let encoder = hub.encoder
        Task {
            let result: Result<Page, ApiError>
            do throws(ApiError) {
                result = .success(try await store.messages(in: channel, after: after, limit: Self.catchUpPage))
            } catch {
                result = .failure(error)
            }
            let encoded = (try? result.get())?.messages.map { EncodedMessage($0, formats: format, encoder: encoder) }
            loop.execute {
                self.reading = false
                guard !self.isCancelled else { return }
                switch result {
                case .failure(let error):
                    self.sink?.subscriptionFailed(self.channel, error)
                case .success(let page):
                    let step = self.sequencer.readCompleted(encoded ?? [], hasMore: page.hasMore)
                    if page.messages.isEmpty && step.readAfter != nil {
                        loop.scheduleTask(in: .milliseconds(20)) { self.perform(step) }
                    } else {
                        self.perform(step)
                    }
                }
            }
        }
    }
}
