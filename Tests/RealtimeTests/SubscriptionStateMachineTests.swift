@testable import Fanout
import Testing

/// A client's subscription, without sockets: catch-up → live → ended, the send budget in every phase
/// (the old driver never ended a subscriber that stopped reading during catch-up), the end set by a member
/// removal, and random schedules checked against the store's order.
struct SubscriptionStateMachineTests {
    struct Item: Sequenced, Equatable { let seq: Int64 }
    typealias M = SubscriptionStateMachine<Item>
    static func items(_ range: ClosedRange<Int64>) -> [Item] { range.map(Item.init) }
    static func size(_ item: Item) -> Int { 100 }

    @Test func catchesUpPageByPacedPageThenGoesLive() {
        var m = M(budget: 10_000)
        #expect(m.phase == .registered)
        let begin = m.begin(after: 3)
        #expect(begin.read == 3 && begin.write.isEmpty)
        #expect(m.phase == .catchingUp)
        let page = m.readCompleted(Self.items(4...5), hasMore: true)
        // The next page waits until this one reached the socket.
        #expect(page.write == Self.items(4...5) && page.read == nil && page.readWhenFlushed == 5)
        let started = m.startDeferredRead()
        #expect(started)
        let last = m.readCompleted(Self.items(6...6), hasMore: false)
        #expect(last.write == Self.items(6...6) && last.readWhenFlushed == nil && last.read == nil)
        #expect(m.phase == .live)
        let fast = m.acceptLive(Item(seq: 7), writable: true)
        #expect(fast && m.lastDelivered == 7)
        // A gap while live: held, the store read, back to live.
        let gapFast = m.acceptLive(Item(seq: 9), writable: true)
        #expect(!gapFast)
        let gap = m.liveReceived([Item(seq: 9)], writable: true, bytes: Self.size)
        #expect(gap.read == 7 && gap.write.isEmpty && m.phase == .catchingUp && m.heldBytes == 100)
        let filled = m.readCompleted(Self.items(8...9), hasMore: false)
        #expect(filled.write == Self.items(8...9) && m.phase == .live && m.heldBytes == 0)
    }

    @Test func liveMessageWhileOverTheBudgetEndsAsSlowConsumer() {
        var m = M(budget: 1000)
        _ = m.begin(after: 0)
        _ = m.readCompleted([], hasMore: false)
        let fast = m.acceptLive(Item(seq: 1), writable: false)
        #expect(!fast)
        let actions = m.liveReceived([Item(seq: 1)], writable: false, bytes: Self.size)
        #expect(actions.end == .slowConsumer && actions.write.isEmpty)
        #expect(m.phase == .ended(.slowConsumer))
        #expect(m.liveReceived([Item(seq: 2)], writable: true, bytes: Self.size).isEmpty)
    }

    /// The race of the issue: a client stops reading mid catch-up (the page never leaves its queue) while the
    /// channel moves on. Once what is held for it passes the budget it is ended like a live slow consumer.
    @Test func clientThatStopsReadingMidCatchUpEndsOnceHeldAndQueuedPassTheBudget() {
        var m = M(budget: 1000)
        _ = m.begin(after: 0)
        _ = m.readCompleted(Self.items(1...5), hasMore: true)  // written; the client reads none of it
        var ended: M.End?
        var seq: Int64 = 100
        while ended == nil && seq < 200 {
            seq += 1
            ended = m.liveReceived([Item(seq: seq)], writable: false, bytes: Self.size).end
        }
        #expect(ended == .slowConsumer)
        #expect(seq == 111, "11 × 100 held passes 1000")
        // A client that keeps reading (nothing queued) while a few messages are held is not ended.
        var reader = M(budget: 1000)
        _ = reader.begin(after: 0)
        for s in Int64(100)...Int64(105) {
            #expect(reader.liveReceived([Item(seq: s)], writable: true, bytes: Self.size).end == nil)
        }
        let done = reader.readCompleted(Self.items(1...105), hasMore: false)
        #expect(done.write.count == 105 && reader.phase == .live && reader.heldBytes == 0)
    }

    @Test func messagesBeforeTheStartAreHeldAndCount() {
        var m = M(budget: 250)
        #expect(m.liveReceived([Item(seq: 4)], writable: true, bytes: Self.size).isEmpty)
        #expect(m.liveReceived([Item(seq: 5)], writable: true, bytes: Self.size).isEmpty)
        #expect(m.heldBytes == 200)
        let begin = m.begin(after: 2)
        #expect(begin.read == 2)
        let done = m.readCompleted(Self.items(3...4), hasMore: false)
        #expect(done.write == Self.items(3...5) && m.phase == .live)
        var full = M(budget: 250)
        _ = full.liveReceived(Self.items(4...5), writable: true, bytes: Self.size)
        #expect(full.liveReceived([Item(seq: 6)], writable: true, bytes: Self.size).end == .slowConsumer, "300 held passes 250")
    }

    @Test func aSyncHintDuringAReadIsReadAfterIt() {
        var m = M(budget: 10_000)
        _ = m.begin(after: 0)
        #expect(m.synced(upTo: 5).isEmpty, "a read is in flight: no second one")
        let page = m.readCompleted(Self.items(1...2), hasMore: false)
        // The store showed 2, the channel is known to have 5: read on.
        #expect(page.write == Self.items(1...2) && page.readWhenFlushed == 2)
        let started = m.startDeferredRead()
        #expect(started)
        let rest = m.readCompleted(Self.items(3...5), hasMore: false)
        #expect(rest.write == Self.items(3...5) && rest.readWhenFlushed == nil && m.phase == .live)
        #expect(m.synced(upTo: 5).isEmpty)
    }

    @Test func endAfterDeliversUpToTheLimitThenEnds() {
        var m = M(budget: 10_000)
        _ = m.begin(after: 0)
        _ = m.readCompleted(Self.items(1...5), hasMore: false)
        let end = m.end(after: 7)
        #expect(end.read == 5 && end.end == nil)
        let done = m.readCompleted(Self.items(6...8), hasMore: false)
        #expect(done.write == Self.items(6...7) && done.end == .limitReached)
        #expect(m.phase == .ended(.limitReached))
        var atHead = M(budget: 10_000)
        _ = atHead.begin(after: 0)
        _ = atHead.readCompleted(Self.items(1...3), hasMore: false)
        #expect(atHead.end(after: 3).end == .limitReached)
        // Set before the start: nothing after it is delivered.
        var early = M(budget: 10_000)
        _ = early.end(after: 2)
        _ = early.begin(after: 0)
        #expect(early.readCompleted(Self.items(1...4), hasMore: false).write == Self.items(1...2))
        #expect(early.phase == .ended(.limitReached))
        // A live message past the limit is never accepted.
        var live = M(budget: 10_000)
        _ = live.begin(after: 0)
        _ = live.readCompleted([], hasMore: false)
        _ = live.end(after: 1)
        _ = live.readCompleted([], hasMore: false)
        let past = live.acceptLive(Item(seq: 2), writable: true)
        #expect(!past)
    }

    @Test func storeFailureAndCancelEnd() {
        var m = M(budget: 10_000)
        _ = m.begin(after: 0)
        #expect(m.readFailed().end == .storeFailed)
        var c = M(budget: 10_000)
        _ = c.begin(after: 0)
        let cancelled = c.cancel()
        let again = c.cancel()
        #expect(cancelled && !again && c.phase == .ended(.cancelled))
        #expect(c.readCompleted(Self.items(1...3), hasMore: false).isEmpty)
        let started = c.startDeferredRead()
        #expect(!started)
    }

    enum Event: CaseIterable { case begin, liveNext, liveGap, liveUnwritable, synced, readDone, readFailed, endAfter, cancel }

    /// A machine brought to `phase` (a read is outstanding while catching up).
    static func machine(in phase: M.Phase) -> M {
        var m = M(budget: 10_000)
        switch phase {
        case .registered: break
        case .catchingUp: _ = m.begin(after: 2)
        case .live: _ = m.begin(after: 2); _ = m.readCompleted([], hasMore: false)
        case .ended: _ = m.cancel()
        }
        return m
    }

    /// Every event in every phase: the phase after it and what the driver is told.
    @Test func everyEventInEveryPhase() {
        for phase in [M.Phase.registered, .catchingUp, .live, .ended(.cancelled)] {
            for event in Event.allCases {
                var m = Self.machine(in: phase)
                let a: M.Actions
                switch event {
                case .begin: a = m.begin(after: 2)
                case .liveNext: a = m.liveReceived([Item(seq: 3)], writable: true, bytes: Self.size)
                case .liveGap: a = m.liveReceived([Item(seq: 5)], writable: true, bytes: Self.size)
                case .liveUnwritable: a = m.liveReceived([Item(seq: 3)], writable: false, bytes: Self.size)
                case .synced: a = m.synced(upTo: 4)
                case .readDone: a = m.readCompleted(Self.items(3...4), hasMore: false)
                case .readFailed: a = m.readFailed()
                case .endAfter: a = m.end(after: 2)
                case .cancel: a = M.Actions(end: m.cancel() ? .cancelled : nil)
                }
                let summary = (m.phase, a.write.map(\.seq), a.read, a.readWhenFlushed, a.end)
                let expected: (M.Phase, [Int64], Int64?, Int64?, M.End?)
                switch (phase, event) {
                case (.ended, _): expected = (phase, [], nil, nil, nil)
                case (_, .cancel): expected = (.ended(.cancelled), [], nil, nil, .cancelled)
                case (.catchingUp, .readFailed): expected = (.ended(.storeFailed), [], nil, nil, .storeFailed)
                case (_, .readFailed): expected = (phase, [], nil, nil, nil)  // no read was asked for
                case (.registered, .begin): expected = (.catchingUp, [], 2, nil, nil)
                case (.registered, .liveNext), (.registered, .liveGap), (.registered, .liveUnwritable): expected = (.registered, [], nil, nil, nil)
                case (.registered, .readDone): expected = (.registered, [], nil, nil, nil)
                case (.registered, _): expected = (.registered, [], nil, nil, nil)
                case (.catchingUp, .readDone): expected = (.live, [3, 4], nil, nil, nil)
                case (.catchingUp, .endAfter): expected = (.ended(.limitReached), [], nil, nil, .limitReached)
                case (.catchingUp, _): expected = (.catchingUp, [], nil, nil, nil)
                case (.live, .liveNext): expected = (.live, [3], nil, nil, nil)
                case (.live, .liveGap): expected = (.catchingUp, [], 2, nil, nil)
                case (.live, .liveUnwritable): expected = (.ended(.slowConsumer), [], nil, nil, .slowConsumer)
                case (.live, .synced): expected = (.catchingUp, [], 2, nil, nil)
                case (.live, .endAfter): expected = (.ended(.limitReached), [], nil, nil, .limitReached)
                case (.live, _): expected = (.live, [], nil, nil, nil)
                }
                #expect(summary.0 == expected.0 && summary.1 == expected.1 && summary.2 == expected.2 && summary.3 == expected.3 && summary.4 == expected.4,
                        "\(phase) + \(event): \(summary)")
            }
        }
    }

    @Test func pagesHoldAQuarterOfTheBudget() {
        #expect(M.pageLimit(budget: 1 << 20, averageBytes: 64 * 1024, maximum: 100) == 4)
        #expect(M.pageLimit(budget: 1 << 20, averageBytes: 300, maximum: 100) == 100)
        #expect(M.pageLimit(budget: 1000, averageBytes: 5000, maximum: 100) == 1)
        #expect(M.pageLimit(budget: 1000, averageBytes: 0, maximum: 100) == 100)
    }

    /// Random schedules of commits, live arrivals (duplicated, reordered), sync hints, reads and flushes:
    /// the client gets exactly cursor+1…N, in order, and the subscription is live at the end.
    @Test func randomSchedulesDeliverEachSeqOnceInOrder() {
        var rng = SplitMix(seed: 7)
        for _ in 0..<3000 {
            let n = Int(rng.next() % 30) + 1
            var committed = Int(rng.next() % UInt64(n + 1))
            let cursor = Int64(rng.next() % UInt64(committed + 1))
            let page = Int(rng.next() % 4) + 1
            var m = M(heldLimit: Int(rng.next() % 5) + 1, budget: 1 << 30)
            var inflight: [Int64] = []
            var begun = false
            var read: Int64?
            var deferred: Int64?
            var output: [Int64] = []
            var hints = Int(rng.next() % 3)
            func apply(_ a: M.Actions) {
                output += a.write.map(\.seq)
                if let r = a.read { precondition(read == nil && deferred == nil); read = r }
                if let r = a.readWhenFlushed { precondition(read == nil && deferred == nil); deferred = r }
                #expect(a.end == nil)
            }
            var steps = 0
            while steps < 2000 {
                steps += 1
                var events: [Int] = []
                if committed < n { events.append(0) }
                if !inflight.isEmpty { events.append(1) }
                if !begun { events.append(2) }
                if read != nil { events.append(3) }
                if deferred != nil { events.append(4) }
                if hints > 0 && begun { events.append(5) }
                if committed > 0 { events.append(6) }
                if events.isEmpty { break }
                switch events[Int(rng.next() % UInt64(events.count))] {
                case 0:
                    committed += 1
                    for _ in 0..<(Int(rng.next() % 3)) { inflight.append(Int64(committed)) }
                case 1:
                    let seq = inflight.remove(at: Int(rng.next() % UInt64(inflight.count)))
                    if m.acceptLive(Item(seq: seq), writable: true) { output.append(seq) } else {
                        apply(m.liveReceived([Item(seq: seq)], writable: true, bytes: Self.size))
                    }
                case 2:
                    begun = true
                    apply(m.begin(after: cursor))
                case 3:
                    let after = Int(read!)
                    read = nil
                    let upTo = min(committed, after + page)
                    apply(m.readCompleted(after < upTo ? Self.items(Int64(after + 1)...Int64(upTo)) : [], hasMore: committed > upTo))
                case 4:
                    let after = deferred!
                    deferred = nil
                    if m.startDeferredRead() { read = after }
                case 6:
                    // A batch of consecutive messages, as the Hub hands them out: taken whole when it runs on
                    // from the position (Subscription's fast path), else one by one.
                    let first = Int64(rng.next() % UInt64(committed)) + 1
                    let last = min(Int64(committed), first + Int64(rng.next() % 4))
                    if m.acceptLiveRun(first: first, last: last, writable: true) {
                        output += Array(first...last)
                    } else {
                        for seq in first...last {
                            if m.acceptLive(Item(seq: seq), writable: true) { output.append(seq) } else {
                                apply(m.liveReceived([Item(seq: seq)], writable: true, bytes: Self.size))
                            }
                        }
                    }
                default:
                    hints -= 1
                    apply(m.synced(upTo: Int64(committed)))
                }
            }
            // Messages committed but never sent live (none lost here: every commit has ≥ 0 copies, so a
            // quiet end relies on the Hub's sync hint, given once more at the end as the Hub does).
            apply(m.synced(upTo: Int64(committed)))
            while read != nil || deferred != nil {
                if let r = deferred { deferred = nil; if m.startDeferredRead() { read = r } }
                if let r = read {
                    read = nil
                    let upTo = min(committed, Int(r) + page)
                    apply(m.readCompleted(Int(r) < upTo ? Self.items(r + 1...Int64(upTo)) : [], hasMore: committed > upTo))
                }
            }
            let expected = cursor < Int64(committed) ? Array(cursor + 1...Int64(committed)) : []
            if output != expected || m.phase != .live {
                Issue.record("n \(n) cursor \(cursor) page \(page): delivered \(output), phase \(m.phase)")
            }
        }
    }
}
