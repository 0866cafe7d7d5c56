/// One client's subscription to one channel as a value type: registered (live messages held, position
/// unknown) → catching up (store pages, then the held messages) → live → ended. `Subscription` feeds it
/// events and carries out its actions; the ordering itself is the `GaplessSequencer`'s.
///
/// The send budget applies in every phase. Live, a message that arrives while the connection's queue is
/// over the budget (not writable) ends the subscription as a slow consumer. Catching up (or repairing a
/// gap), live messages are held for the client; once what is held passes the budget the subscription ends
/// the same way, so a client that stops reading mid catch-up while its channel moves on is not kept. The
/// catch-up itself is paced (the next page is read only once the previous one reached the socket, and a
/// page holds about a quarter of the budget), so what a connection holds stays within about two budgets:
/// the queue and the held messages.
///
/// A member's stream of a thread is gated by the thread's membership epoch (its count of removals). It opens
/// knowing the epoch its permission was read at; an element committed at a later epoch may come after a
/// removal of this member that has not reached this instance yet (a removal and a later message travel
/// separately), so it and everything after it wait while the driver asks the store (`checkMembership`)
/// whether this member was removed at one of those epochs. No: deliver on. Yes, at head h: deliver up to h,
/// then end — so nothing committed after the removal is delivered, whatever order things arrived in.
public struct SubscriptionStateMachine<Element: Sequenced> {
    public enum Phase: Sendable, Equatable {
        case registered
        case catchingUp
        case live
        case ended(End)
    }

    public enum End: Sendable, Equatable {
        /// The end set by `end(after:)` was reached (a member removed from a thread).
        case limitReached
        /// The connection passed its send budget.
        case slowConsumer
        /// The store could not be read.
        case storeFailed
        case cancelled
    }

    /// What the driver does, in this order: write `write` and flush; read the store after `read` at once, or
    /// after `readWhenFlushed` once the writes reached the socket; ask the store for a removal of this member
    /// at one of the epochs `checkMembership` (answer with `membershipChecked`); then end if `end` is set.
    public struct Actions {
        public var write: [Element] = []
        public var read: Int64?
        public var readWhenFlushed: Int64?
        public var checkMembership: ClosedRange<Int64>?
        public var end: End?

        public init(write: [Element] = [], read: Int64? = nil, readWhenFlushed: Int64? = nil, checkMembership: ClosedRange<Int64>? = nil,
                    end: End? = nil) {
            self.write = write
            self.read = read
            self.readWhenFlushed = readWhenFlushed
            self.checkMembership = checkMembership
            self.end = end
        }

        public var isEmpty: Bool { write.isEmpty && read == nil && readWhenFlushed == nil && checkMembership == nil && end == nil }
    }

    /// The membership gate of a member's stream of a thread.
    private struct Gate {
        /// No removal of this member up to this epoch ends the stream.
        var verified: Int64
        /// A check of the epochs up to this one is out; `pending` waits for it.
        var checking: Int64?
        /// Elements handed on by the sequencer, in order, not yet written.
        var pending: [Element] = []
    }

    private var sequencer: GaplessSequencer<Element>
    public private(set) var isEnded = false
    private var endReason: End?
    private var begun = false
    private var readInFlight = false
    /// The highest seq the channel is known to have reached (Hub hints): read on until it is delivered.
    private var syncedTo: Int64 = 0
    /// Nothing after this seq is delivered; the subscription ends once it is reached.
    private var limit: Int64?
    /// Bytes of live messages held while a read is outstanding.
    public private(set) var heldBytes = 0
    public let budget: Int
    private let heldLimit: Int
    private var gate: Gate?

    public init(heldLimit: Int = 1024, budget: Int) {
        self.sequencer = GaplessSequencer(capacity: heldLimit)
        self.heldLimit = heldLimit
        self.budget = budget
    }

    public var phase: Phase {
        if let endReason { return .ended(endReason) }
        if !begun { return .registered }
        return sequencer.isReading ? .catchingUp : .live
    }

    /// The last seq handed to the driver for writing.
    public var lastDelivered: Int64 { sequencer.last }

    /// The start position is known (the client's cursor, or the head): catch up after it. `membershipEpoch`:
    /// for a member's stream of a thread, the epoch its permission was read at (nil: no removal ends it).
    public mutating func begin(after position: Int64, membershipEpoch: Int64? = nil) -> Actions {
        guard !isEnded, !begun else { return Actions() }
        begun = true
        gate = membershipEpoch.map { Gate(verified: $0) }
        var actions = gated(from(sequencer.begin(after: position)))
        if actions.read != nil && !startRead() { actions.read = nil }
        if reachedLimit() { actions.end = finish(.limitReached) }
        return actions
    }

    /// The common case without allocating: live, in order, within the limit, the budget and the verified
    /// membership epoch. Then the driver writes `element` itself; otherwise it calls `liveReceived`.
    public mutating func acceptLive(_ element: Element, writable: Bool) -> Bool {
        guard !isEnded, writable, limit.map({ element.seq <= $0 }) ?? true, passesGate(element.membershipEpoch) else { return false }
        return sequencer.acceptNext(element)
    }

    /// The same for a run of consecutive elements `first`…`last` taken as a whole (a batch written at once);
    /// `membershipEpoch` is the highest among them.
    public mutating func acceptLiveRun(first: Int64, last: Int64, membershipEpoch: Int64 = 0, writable: Bool) -> Bool {
        guard !isEnded, writable, limit.map({ last <= $0 }) ?? true, passesGate(membershipEpoch) else { return false }
        return sequencer.acceptRun(first: first, last: last)
    }

    /// Live messages from the Hub. `bytes` is what one costs held.
    public mutating func liveReceived(_ elements: [Element], writable: Bool, bytes: (Element) -> Int) -> Actions {
        guard !isEnded else { return Actions() }
        if begun && !sequencer.isReading && !writable {
            return Actions(end: finish(.slowConsumer))
        }
        var actions = Actions()
        for element in elements {
            if let limit, element.seq > limit { continue }
            let wasReading = !begun || sequencer.isReading
            let step = from(sequencer.receive(element))
            actions.write += step.write
            if let after = step.read { actions.read = after }
            if wasReading || sequencer.isReading, step.write.isEmpty, element.seq > sequencer.last {
                heldBytes += bytes(element)
            }
        }
        actions = gated(actions)
        if actions.end != nil { return actions }
        if actions.read != nil && !startRead() { actions.read = nil }
        if reachedLimit() {
            actions.end = finish(.limitReached)
        } else if heldBytes > budget {
            actions.end = finish(.slowConsumer)
        }
        return actions
    }

    /// The channel has reached at least `seq` (the Hub read its head, or the bus was down).
    public mutating func synced(upTo seq: Int64) -> Actions {
        guard !isEnded else { return Actions() }
        syncedTo = max(syncedTo, seq)
        guard begun, sequencer.last < seq else { return Actions() }
        var actions = gated(from(sequencer.poll()))
        if actions.read != nil && !startRead() { actions.read = nil }
        return actions
    }

    /// A store read (asked for by `read` or `readWhenFlushed`) returned.
    public mutating func readCompleted(_ rows: [Element], hasMore: Bool) -> Actions {
        guard readInFlight else { return Actions() }  // no read was asked for: nothing to complete
        readInFlight = false
        guard !isEnded else { return Actions() }
        var actions = from(sequencer.readCompleted(rows, hasMore: hasMore))
        if !sequencer.isReading {
            heldBytes = 0
            if sequencer.last < syncedTo {
                // The channel is known to be further on than the store showed this read.
                actions = merge(actions, from(sequencer.poll()))
            }
        }
        if let after = actions.read {
            // Catch-up pages are paced by the socket.
            actions.read = nil
            actions.readWhenFlushed = after
        }
        actions = gated(actions)
        if actions.end != nil { return actions }
        if reachedLimit() { actions.end = finish(.limitReached) }
        return actions
    }

    /// The store answered a `checkMembership`: `removedAt` is the head of this member's removal at one of
    /// those epochs (the lowest, if several), or nil when there was none.
    public mutating func membershipChecked(removedAt head: Int64?) -> Actions {
        guard !isEnded, var gate, let through = gate.checking else { return Actions() }
        let pending = gate.pending
        gate.pending = []
        gate.checking = nil
        if let head {
            limit = min(limit ?? head, head)
        } else {
            gate.verified = through
        }
        self.gate = gate
        var actions = Actions(write: limit.map { limit in pending.filter { $0.seq <= limit } } ?? pending)
        if head == nil { actions = gated(actions) }  // some came with a later epoch still
        if actions.end != nil { return actions }
        if reachedLimit() {
            actions.end = finish(.limitReached)
        } else if let limit {
            // The end is further on than what arrived: read on up to it.
            actions = merge(actions, synced(upTo: limit))
        }
        return actions
    }

    /// The store could not answer a `checkMembership`.
    public mutating func membershipCheckFailed() -> Actions {
        guard !isEnded, gate?.checking != nil else { return Actions() }
        return Actions(end: finish(.storeFailed))
    }

    /// The driver is about to start the read of a `readWhenFlushed`; false when it must not (ended).
    public mutating func startDeferredRead() -> Bool { startRead() }

    public mutating func readFailed() -> Actions {
        guard readInFlight else { return Actions() }
        readInFlight = false
        guard !isEnded else { return Actions() }
        return Actions(end: finish(.storeFailed))
    }

    /// The channel's next messages cannot be delivered any more (the retention deleted them before this
    /// instance did): end, whatever was in flight.
    public mutating func channelFailed() -> Actions {
        guard !isEnded else { return Actions() }
        readInFlight = false
        return Actions(end: finish(.storeFailed))
    }

    /// Delivers every message up to `seq` (reading the store for any the bus lost), none after it, then ends.
    public mutating func end(after seq: Int64) -> Actions {
        guard !isEnded else { return Actions() }
        limit = min(limit ?? seq, seq)
        guard begun else { return Actions() }
        if reachedLimit() { return Actions(end: finish(.limitReached)) }
        return synced(upTo: seq)
    }

    public mutating func cancel() -> Bool {
        guard !isEnded else { return false }
        _ = finish(.cancelled)
        return true
    }

    /// How many messages the next catch-up page may hold: about a quarter of the send budget, so that a
    /// page and the replies around it fit in the budget of a client that reads.
    public static func pageLimit(budget: Int, averageBytes: Int, maximum: Int) -> Int {
        max(1, min(maximum, budget / 4 / max(1, averageBytes)))
    }

    // MARK: helpers

    private mutating func startRead() -> Bool {
        guard !isEnded, !readInFlight else { return false }
        readInFlight = true
        return true
    }

    private func from(_ step: GaplessSequencer<Element>.Step) -> Actions {
        Actions(write: limit.map { limit in step.deliver.filter { $0.seq <= limit } } ?? step.deliver, read: step.readAfter)
    }

    private func merge(_ a: Actions, _ b: Actions) -> Actions {
        Actions(write: a.write + b.write, read: b.read ?? a.read, readWhenFlushed: a.readWhenFlushed ?? b.readWhenFlushed, end: a.end ?? b.end)
    }

    private func reachedLimit() -> Bool {
        // While a membership check is out, the elements up to `sequencer.last` are not all written yet.
        guard let limit, begun, !isEnded, gate?.checking == nil else { return false }
        return sequencer.last >= limit
    }

    private func passesGate(_ epoch: Int64) -> Bool {
        guard let gate else { return true }
        return gate.checking == nil && epoch <= gate.verified
    }

    /// Holds back, from `actions.write`, the first element with an epoch past the verified one and every
    /// element after it, and asks for the check (or adds to what waits for the check that is out).
    private mutating func gated(_ actions: Actions) -> Actions {
        guard var gate, !actions.write.isEmpty else { return actions }
        var out = actions
        if gate.checking != nil {
            gate.pending += actions.write
            out.write = []
        } else if let index = actions.write.firstIndex(where: { $0.membershipEpoch > gate.verified }) {
            gate.pending = Array(actions.write[index...])
            out.write = Array(actions.write[..<index])
            let through = gate.pending.reduce(gate.verified) { max($0, $1.membershipEpoch) }
            gate.checking = through
            out.checkMembership = (gate.verified + 1)...through
        }
        let overflow = gate.pending.count > heldLimit
        self.gate = gate
        // What waits is bounded like what the sequencer holds: past it, the client reconnects and resumes.
        if overflow { out.end = finish(.slowConsumer) }
        return out
    }

    private mutating func finish(_ reason: End) -> End {
        isEnded = true
        endReason = reason
        return reason
    }
}
