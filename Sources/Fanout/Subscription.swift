import ChatDomain
import NIOCore

/// Where a subscription's messages go: one client connection. Every call is made on the connection's
/// event loop.
public protocol SubscriptionSink: AnyObject {
    /// Queues encoded messages (not flushed); `promise`, when given, completes once the bytes reached the
    /// socket (how catch-up pages are paced).
    func write(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>?)
    /// Flushes what was queued.
    func flush()
    /// Whether the connection's queue is under its send budget (kept by the connection as NIO reports
    /// changes: read for every delivery, so it must be a stored value, not a walk to the socket).
    var isWritable: Bool { get }
    /// The client fell further behind than its budget (live, or while catching up).
    func slowConsumer()
    /// The store could not be read for the catch-up.
    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError)
    /// The subscription reached the end set by `end(after:)` (a member removed from a thread).
    func subscriptionEnded(_ channel: ChannelName)
}

/// One client's subscription to one channel: registers with the Hub first (live messages are held), reads
/// the store after the start position (page by page, each page written before the next is read), then
/// hands over to live delivery with no gap and no duplicate. The decisions are the
/// `SubscriptionStateMachine`'s; this class only carries them out.
/// The lowest head among this stream's member's removals from its thread at one of `epochs`, or nil.
public typealias MembershipCheck = @Sendable (_ epochs: ClosedRange<Int64>) async throws(ApiError) -> Int64?

public final class Subscription: HubSubscriber, @unchecked Sendable {  // mutable state is only touched on `eventLoop`
    public static let catchUpPage = 1000

    public let channel: ChannelName
    public let eventLoop: any EventLoop
    public let format: WireFormat?
    private let hub: Hub
    private weak var sink: (any SubscriptionSink)?
    private var machine: SubscriptionStateMachine<EncodedMessage>
    private var failure: ApiError?
    /// Catch-up pages hold about one send budget: sized from the last page's messages.
    private var pageLimit: Int
    /// The catch-up page written before the last one (its reaching the socket lets the next read start).
    private var previousPage: EventLoopFuture<Void>?
    private var membershipCheck: MembershipCheck?

    /// `largestMessage`: the most one message may take, which sizes the first page (before the channel's
    /// message size is known) so that it holds no more than one budget.
    public init(channel: ChannelName, eventLoop: any EventLoop, format: WireFormat, hub: Hub, sink: any SubscriptionSink,
                budget: Int, largestMessage: Int, heldLimit: Int = 1024) {
        self.pageLimit = SubscriptionStateMachine<EncodedMessage>.pageLimit(budget: budget, averageBytes: largestMessage, maximum: Self.catchUpPage)
        self.channel = channel
        self.eventLoop = eventLoop
        self.format = format
        self.hub = hub
        self.sink = sink
        self.machine = SubscriptionStateMachine(heldLimit: heldLimit, budget: budget)
    }

    /// The last seq handed to the sink.
    public var lastDelivered: Int64 { machine.lastDelivered }
    public var isCancelled: Bool { machine.isEnded }
    public var phase: SubscriptionStateMachine<EncodedMessage>.Phase { machine.phase }

    /// Step 1: register with the Hub; live messages are held from now on.
    public func register() {
        hub.subscribe(channel, self)
    }

    /// Step 2, once the start position is known (and the client told): catch up after it, then go live.
    /// A member's stream of a thread passes the membership epoch its permission was read at, and how to ask
    /// the store for a removal at a later one.
    /// `head`: the channel's newest message as read after this subscription registered with the Hub (nil when
    /// not known). With nothing after `position` then, the catch-up read would find nothing the Hub does not
    /// deliver: it is skipped, as if it had come back empty (a live subscribe costs no store read).
    public func begin(after position: Int64, head: Int64? = nil, membershipEpoch: Int64? = nil, check: MembershipCheck? = nil) {
        eventLoop.preconditionInEventLoop()
        membershipCheck = check
        var actions = machine.begin(after: position, membershipEpoch: check == nil ? nil : membershipEpoch)
        guard head == position, actions.read == position else { return perform(actions) }
        actions.read = nil
        perform(actions)
        perform(machine.readCompleted([], hasMore: false))
    }

    /// Delivers every message up to `seq` (reading the store for any the bus lost), none after it, then
    /// ends and tells the sink. For a member removed from a thread: `seq` is the head at the removal.
    public func end(after seq: Int64) {
        eventLoop.preconditionInEventLoop()
        perform(machine.end(after: seq))
    }

    public func cancel() {
        if machine.cancel() { hub.unsubscribe(channel, self) }
    }

    public func hubDelivered(_ batch: EncodedBatch) {
        guard !machine.isEnded, let sink else { return }
        let writable = sink.isWritable
        // The per-subscriber path: the shared bytes, no allocation. A batch taken whole is one write.
        if let format, let joined = batch.joined(format),
           machine.acceptLiveRun(first: batch.first, last: batch.last, membershipEpoch: batch.membershipEpoch, writable: writable) {
            sink.write(joined, promise: nil)
            sink.flush()
            hub.metrics.delivered[format.rawValue].increment(by: batch.messages.count)
            return
        }
        let messages = batch.messages
        var wrote = 0
        for index in messages.indices {
            let message = messages[index]
            if let format, let bytes = message.bytes(format), machine.acceptLive(message, writable: writable) {
                sink.write(bytes, promise: nil)
                wrote += 1
                continue
            }
            let format = self.format
            if let format, wrote > 0 { hub.metrics.delivered[format.rawValue].increment(by: wrote) }
            let actions = machine.liveReceived(Array(messages[index...]), writable: writable,
                                               bytes: { format.flatMap($0.bytes)?.readableBytes ?? $0.message.body.utf8.count })
            perform(actions, flushing: wrote > 0)
            return
        }
        if let format, wrote > 0 {
            sink.flush()
            hub.metrics.delivered[format.rawValue].increment(by: wrote)
        }
    }

    public func hubFailed(_ error: ApiError) {
        guard !machine.isEnded else { return }
        failure = error
        perform(machine.channelFailed())
    }

    public func hubSynced(upTo seq: Int64) {
        perform(machine.synced(upTo: seq))
    }

    private func perform(_ actions: SubscriptionStateMachine<EncodedMessage>.Actions, flushing: Bool = false) {
        guard let sink else { return }
        var written: EventLoopFuture<Void>?
        if let format, !actions.write.isEmpty || flushing {
            // Pacing: the next page is read once the page before this one reached the socket (not merely the
            // queue), so a client that reads keeps the queue short, and one that stops reading stops the catch-up.
            let promise = actions.readWhenFlushed != nil && !actions.write.isEmpty ? eventLoop.makePromise(of: Void.self) : nil
            if actions.write.count > 1 {
                // A catch-up page or a repaired gap: the frames joined into one buffer, one write (a thousand
                // separate writes cost NIO a pending-write entry and its reference counting each).
                var size = 0
                for message in actions.write { size += message.bytes(format)?.readableBytes ?? 0 }
                var joined = ByteBuffer()
                joined.reserveCapacity(size)
                for message in actions.write {
                    var bytes = message.bytes(format) ?? hub.encoder(message.message, format)
                    joined.writeBuffer(&bytes)
                }
                sink.write(joined, promise: promise)
            } else if let message = actions.write.first {
                sink.write(message.bytes(format) ?? hub.encoder(message.message, format), promise: promise)
            }
            sink.flush()
            if !actions.write.isEmpty { hub.metrics.delivered[format.rawValue].increment(by: actions.write.count) }
            written = promise?.futureResult
        }
        if let after = actions.read { read(after: after) }
        if let after = actions.readWhenFlushed {
            // Pace the catch-up: a client that stops reading stops it.
            let next: @Sendable () -> Void = { [weak self] in
                guard let self, self.machine.startDeferredRead() else { return }
                self.read(after: after)
            }
            if let written {
                // One page of lookahead: the next page is read while this one is on its way, once the page
                // before it reached the socket (at most two pages, about half the budget, are queued).
                let gate = previousPage
                previousPage = written
                if let gate { gate.whenComplete { _ in next() } } else { next() }
            } else {
                // Nothing new came back although more was expected (the store lagging what was received).
                eventLoop.scheduleTask(in: .milliseconds(20)) { next() }
            }
        }
        if let epochs = actions.checkMembership, actions.end == nil { checkMembership(epochs) }
        guard let end = actions.end else { return }
        hub.unsubscribe(channel, self)
        switch end {
        case .limitReached: sink.subscriptionEnded(channel)
        case .slowConsumer: sink.slowConsumer()
        case .storeFailed: sink.subscriptionFailed(channel, failure ?? ApiError(.storeUnavailable, "the store did not answer"))
        case .cancelled: break
        }
    }

    private func checkMembership(_ epochs: ClosedRange<Int64>) {
        guard let check = membershipCheck else { return perform(machine.membershipChecked(removedAt: nil)) }
        let loop = eventLoop
        Task {
            let result: Result<Int64?, ApiError>
            do throws(ApiError) { result = .success(try await check(epochs)) } catch { result = .failure(error) }
            loop.execute {
                switch result {
                case .success(let head): self.perform(self.machine.membershipChecked(removedAt: head))
                case .failure(let error):
                    self.failure = error
                    self.perform(self.machine.membershipCheckFailed())
                }
            }
        }
    }

    private func read(after: Int64) {
        let store = hub.store
        let channel = self.channel
        let loop = eventLoop
        let format = self.format.map { Set([$0]) } ?? []
        let encoder = hub.encoder
        let limit = pageLimit
        hub.metrics.catchUpReads.increment()
        Task {
            let result: Result<Page, ApiError>
            do throws(ApiError) {
                result = .success(try await store.messages(in: channel, after: after, limit: limit))
            } catch {
                result = .failure(error)
            }
            let encoded = (try? result.get())?.messages.map { EncodedMessage($0, formats: format, encoder: encoder) }
            loop.execute {
                switch result {
                case .failure(let error):
                    self.failure = error
                    self.perform(self.machine.readFailed())
                case .success(let page):
                    if let encoded, !encoded.isEmpty, let format = self.format {
                        let bytes = encoded.reduce(0) { $0 + ($1.bytes(format)?.readableBytes ?? 0) }
                        self.pageLimit = SubscriptionStateMachine<EncodedMessage>.pageLimit(budget: self.machine.budget, averageBytes: bytes / encoded.count,
                                                                                            maximum: Self.catchUpPage)
                    }
                    self.perform(self.machine.readCompleted(encoded ?? [], hasMore: page.hasMore))
                }
            }
        }
    }
}
