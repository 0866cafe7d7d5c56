import ChatDomain

/// Anything with a position in its channel.
public protocol Sequenced {
    var seq: Int64 { get }
    /// The thread's membership epoch at the element's commit (see `Message.membershipEpoch`).
    var membershipEpoch: Int64 { get }
}

extension Sequenced {
    public var membershipEpoch: Int64 { 0 }
}

extension Message: Sequenced {}

/// The gap rule and the catch-up → live switch-over, as a pure state machine (no I/O, no clock).
///
/// It remembers the last `seq` it handed on. A live element at or below it is a duplicate and dropped; the
/// next one is delivered; a later one means a gap, so the element is held and the caller is told to read
/// the store after `last`. While such a read is outstanding every live element is held (at most `capacity`
/// of them; past that they are dropped and read from the store instead, so memory stays bounded). When
/// the read completes, the rows and then the held elements are delivered in order, and if a hole is left,
/// the caller is told to read again.
///
/// A new subscription starts in `reading` with its position unknown: live elements are held from the
/// moment it registers; `begin(after:)` fixes the position once it is known (the client's cursor or the
/// channel's head), and the caller then reads the store after it.
public struct GaplessSequencer<Element: Sequenced> {
    /// What the caller must do: hand `deliver` on, in order, then read the store after `readAfter`.
    public struct Step {
        public var deliver: [Element]
        public var readAfter: Int64?

        public static var none: Step { Step(deliver: [], readAfter: nil) }
    }

    public private(set) var last: Int64
    public private(set) var isReading: Bool
    private var held: [Element] = []
    /// The highest seq dropped from `held` because it was full; the store must be read past it.
    private var droppedUpTo: Int64 = 0
    private var positioned: Bool
    public let capacity: Int

    /// A sequencer whose position is not known yet (see `begin(after:)`).
    public init(capacity: Int = 1024) {
        self.capacity = max(1, capacity)
        self.last = 0
        self.isReading = true
        self.positioned = false
    }

    /// A sequencer that is live after `last`.
    public init(liveAfter last: Int64, capacity: Int = 1024) {
        self.capacity = max(1, capacity)
        self.last = last
        self.isReading = false
        self.positioned = true
    }

    public var heldCount: Int { held.count }

    /// Fixes the position of a new sequencer. The caller then reads the store after `last`.
    public mutating func begin(after position: Int64) -> Step {
        precondition(!positioned, "begin(after:) called twice")
        positioned = true
        last = position
        held.removeAll { $0.seq <= position }
        return Step(deliver: [], readAfter: position)
    }

    /// The common case without allocating: live, and `element` is the next one. Then `last` moves to it and
    /// the caller hands it on; otherwise nothing changes and the caller uses `receive`.
    public mutating func acceptNext(_ element: Element) -> Bool {
        guard !isReading, element.seq == last + 1 else { return false }
        last = element.seq
        return true
    }

    /// `acceptNext` for the consecutive run `first`…`last` at once: true (and `last` is the new position) when
    /// the run starts exactly after the position and nothing is being read.
    public mutating func acceptRun(first: Int64, last: Int64) -> Bool {
        guard !isReading, first == self.last + 1, last >= first else { return false }
        self.last = last
        return true
    }

    /// A live element arrived.
    public mutating func receive(_ element: Element) -> Step {
        if positioned && element.seq <= last { return .none }
        if !isReading {
            if element.seq == last + 1 {
                last = element.seq
                return Step(deliver: [element], readAfter: nil)
            }
            isReading = true
            hold(element)
            return Step(deliver: [], readAfter: last)
        }
        hold(element)
        return .none
    }

    /// Reads the store after `last` although no gap was seen: the bus may have lost messages (it was down,
    /// or the channel's subscription was not active yet). Nothing to do while a read is outstanding.
    public mutating func poll() -> Step {
        guard positioned, !isReading else { return .none }
        isReading = true
        return Step(deliver: [], readAfter: last)
    }

    /// A store read after `last` returned `rows` (ascending); `hasMore` when it stopped at its limit.
    public mutating func readCompleted(_ rows: [Element], hasMore: Bool) -> Step {
        precondition(isReading && positioned, "readCompleted without a read")
        var out: [Element] = []
        for row in rows where row.seq == last + 1 {
            out.append(row)
            last = row.seq
        }
        if hasMore { return Step(deliver: out, readAfter: last) }
        held.removeAll { $0.seq <= last }
        var taken = 0
        while taken < held.count, held[taken].seq == last + 1 {
            out.append(held[taken])
            last = held[taken].seq
            taken += 1
        }
        held.removeFirst(taken)
        if !held.isEmpty || droppedUpTo > last {
            return Step(deliver: out, readAfter: last)
        }
        isReading = false
        droppedUpTo = 0
        return Step(deliver: out, readAfter: nil)
    }

    /// Holds `element` in seq order, once, within `capacity`.
    private mutating func hold(_ element: Element) {
        var index = held.count
        while index > 0 && held[index - 1].seq > element.seq { index -= 1 }
        if index > 0 && held[index - 1].seq == element.seq { return }
        held.insert(element, at: index)
        if held.count > capacity {
            let dropped = held.removeLast()
            droppedUpTo = max(droppedUpTo, dropped.seq)
        }
    }
}

extension GaplessSequencer.Step: Sendable where Element: Sendable {}
