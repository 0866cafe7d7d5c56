/// Many deadlines at a coarse resolution (ticks, one second in `LoopTimers`) as a hashed timing wheel: a
/// timer is one slot entry and one table row, scheduling and cancelling are O(1), and advancing a tick visits
/// one slot. A connection's timers (its ping, its token's expiry, an SSE keepalive) cost a few dozen bytes
/// here instead of a scheduled task, its closure and a heap entry each on the event loop.
///
/// A timer fires at the first tick at or after its deadline, never before. A value type: the caller owns the
/// clock and what a timer stands for (`Token`s index its own table).
struct TimerWheel {
    /// A timer: its row, and the row's use (a token kept after its timer fired names nothing, even once the
    /// row is reused).
    struct Token: Hashable {
        var index: Int32
        var generation: UInt32
    }

    private struct Entry {
        var deadline: Int64
        var generation: UInt32
        /// Where the token sits: `slots[slot][position]`; slot -1 while the row is free.
        var slot: Int32
        var position: Int32
    }

    private var slots: [[Int32]]
    private var entries: [Entry] = []
    private var free: [Int32] = []
    /// The last tick advanced to: everything due at or before it has fired.
    private(set) var now: Int64

    init(slotCount: Int = 64, now: Int64) {
        precondition(slotCount > 0)
        slots = Array(repeating: [], count: slotCount)
        self.now = now
    }

    /// Timers scheduled and not yet fired or cancelled.
    private(set) var count = 0

    /// A timer at tick `deadline` (one at or before `now` fires at the next `advance`).
    mutating func schedule(at deadline: Int64) -> Token {
        let index: Int32
        if let reused = free.popLast() {
            index = reused
        } else {
            index = Int32(entries.count)
            entries.append(Entry(deadline: 0, generation: 0, slot: -1, position: 0))
        }
        let due = max(deadline, now + 1)
        let slot = Int(UInt64(bitPattern: due) % UInt64(slots.count))
        let generation = entries[Int(index)].generation &+ 1
        entries[Int(index)] = Entry(deadline: due, generation: generation, slot: Int32(slot), position: Int32(slots[slot].count))
        slots[slot].append(index)
        count += 1
        return Token(index: index, generation: generation)
    }

    /// Removes a pending timer; false (nothing changed) for a token already fired or cancelled.
    @discardableResult
    mutating func cancel(_ token: Token) -> Bool {
        let index = Int(token.index)
        guard index < entries.count, entries[index].generation == token.generation, entries[index].slot >= 0 else { return false }
        remove(token.index)
        free.append(token.index)
        return true
    }

    /// Moves the wheel to `tick` and returns the timers due by then, in deadline order within each slot visit;
    /// their tokens are free again (a periodic timer schedules itself anew).
    mutating func advance(to tick: Int64) -> [Token] {
        guard tick > now else { return [] }
        var due: [Int32] = []
        // Every slot at most once: a gap longer than the wheel visits each slot, and each entry checks its deadline.
        let last = min(tick, now + Int64(slots.count))
        var t = now + 1
        while t <= last {
            let slot = Int(UInt64(bitPattern: t) % UInt64(slots.count))
            var i = 0
            while i < slots[slot].count {
                let token = slots[slot][i]
                if entries[Int(token)].deadline <= tick {
                    remove(token)  // the last entry moves into position i: look at i again
                    due.append(token)
                } else {
                    i += 1
                }
            }
            t += 1
        }
        now = tick
        due.sort { entries[Int($0)].deadline < entries[Int($1)].deadline }
        free.append(contentsOf: due)
        return due.map { Token(index: $0, generation: entries[Int($0)].generation) }
    }

    private mutating func remove(_ token: Int32) {
        let entry = entries[Int(token)]
        let slot = Int(entry.slot), position = Int(entry.position)
        let moved = slots[slot].removeLast()
        if moved != token {
            slots[slot][position] = moved
            entries[Int(moved)].position = Int32(position)
        }
        entries[Int(token)].slot = -1
        count -= 1
        if slots[slot].isEmpty && slots[slot].capacity > 64 { slots[slot] = [] }  // a burst's capacity is given back
    }
}
