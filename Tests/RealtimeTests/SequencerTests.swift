import ChatDomain
@testable import Fanout
import Testing

/// The switch-over and gap rule, checked against a model of the world: the store commits messages 1…N
/// in order; every message committed after the subscriber registered reaches it live once or more, in any
/// order; store reads see what is committed when they run; the subscriber's position (the client's cursor)
/// is fixed at some point. In every interleaving the subscriber must deliver exactly cursor+1…N, in order.
struct SequencerTests {
    struct Item: Sequenced, Equatable { let seq: Int64 }

    struct World {
        let n: Int
        let cursor: Int64
        let page: Int
        let copies: [Int]
        var committed: Int
        var inflight: [Int64] = []
        var sequencer: GaplessSequencer<Item>
        var begun = false
        var readAfter: Int64?
        /// Rows a read has fetched but not yet handed back.
        var fetched: (rows: [Item], hasMore: Bool)?
        var output: [Int64] = []
        /// Store polls the driver may make without a gap (bus down, or the Hub's sync hint).
        var polls = 0

        mutating func apply(_ step: GaplessSequencer<Item>.Step) {
            output += step.deliver.map(\.seq)
            if let after = step.readAfter {
                precondition(readAfter == nil && fetched == nil, "a second read while one is outstanding")
                readAfter = after
            }
        }

        enum Event { case commit, arrive(Int64), begin, fetch, complete, poll }

        var events: [Event] {
            var out: [Event] = []
            if committed < n { out.append(.commit) }
            for seq in Set(inflight).sorted() { out.append(.arrive(seq)) }
            if !begun { out.append(.begin) }
            if readAfter != nil && fetched == nil { out.append(.fetch) }
            if fetched != nil { out.append(.complete) }
            if polls > 0 && begun { out.append(.poll) }
            return out
        }

        mutating func perform(_ event: Event) {
            switch event {
            case .commit:
                committed += 1
                inflight += Array(repeating: Int64(committed), count: copies[committed - 1])
            case .arrive(let seq):
                inflight.remove(at: inflight.firstIndex(of: seq)!)
                apply(sequencer.receive(Item(seq: seq)))
            case .begin:
                begun = true
                apply(sequencer.begin(after: cursor))
            case .fetch:
                let after = Int(readAfter!)
                let upTo = min(committed, after + page)
                fetched = (rows: after < upTo ? (after + 1...upTo).map { Item(seq: Int64($0)) } : [], hasMore: committed > upTo)
            case .poll:
                polls -= 1
                apply(sequencer.poll())
            case .complete:
                let (rows, hasMore) = fetched!
                fetched = nil
                readAfter = nil
                apply(sequencer.readCompleted(rows, hasMore: hasMore))
            }
        }
    }

    /// Explores every interleaving (depth first; the sequencer is a value, so each branch copies it).
    static func explore(_ world: World, leaves: inout Int) {
        let events = world.events
        if events.isEmpty {
            leaves += 1
            let expected = world.cursor < Int64(world.n) ? Array(world.cursor + 1...Int64(world.n)) : []
            if world.output != expected || world.sequencer.isReading {
                Issue.record("cursor \(world.cursor), copies \(world.copies), page \(world.page): delivered \(world.output)")
            }
            return
        }
        for event in events {
            var next = world
            next.perform(event)
            // A read that found nothing new because the store lags is retried by the driver; in the model the
            // retry is just another fetch later, which the exploration covers.
            explore(next, leaves: &leaves)
        }
    }

    @Test(arguments: [1, 2])
    func everyInterleavingDeliversEachSeqOnceInOrder(page: Int) {
        var leaves = 0
        let n = 3
        for alreadyCommitted in 0...n {
            for cursor in 0...alreadyCommitted {
                // Each message live once, each twice, and a mix (duplicates around a single delivery).
                for copies in [[1, 1, 1], [2, 2, 2], [2, 1, 2]] {
                    for capacity in [1, 8] {
                        let world = World(n: n, cursor: Int64(cursor), page: page, copies: copies, committed: alreadyCommitted,
                                          sequencer: GaplessSequencer(capacity: capacity))
                        Self.explore(world, leaves: &leaves)
                    }
                }
            }
        }
        #expect(leaves > 1_000)
    }

    /// Longer channels with random schedules (seeded, so a failure repeats).
    @Test func randomSchedulesOnLongerChannels() {
        var rng = SplitMix(seed: 42)
        for _ in 0..<3000 {
            let n = Int(rng.next() % 40) + 1
            let alreadyCommitted = Int(rng.next() % UInt64(n + 1))
            let cursor = Int64(rng.next() % UInt64(alreadyCommitted + 1))
            let copies = (0..<n).map { _ in Int(rng.next() % 3) + 1 }
            var world = World(n: n, cursor: cursor, page: Int(rng.next() % 5) + 1, copies: copies, committed: alreadyCommitted,
                              sequencer: GaplessSequencer(capacity: Int(rng.next() % 6) + 1))
            world.polls = Int(rng.next() % 4)
            while case let events = world.events, !events.isEmpty {
                world.perform(events[Int(rng.next() % UInt64(events.count))])
            }
            if world.output != (cursor < Int64(n) ? Array(cursor + 1...Int64(n)) : []) {
                Issue.record("n \(n) cursor \(cursor): delivered \(world.output)")
            }
        }
    }

    /// Messages the bus never delivered (it was down) are found by polling the store.
    @Test func pollingFindsWhatTheBusLost() {
        var s = GaplessSequencer<Item>(liveAfter: 3)
        #expect(s.poll().readAfter == 3)
        #expect(s.poll().readAfter == nil)
        let step = s.readCompleted([Item(seq: 4), Item(seq: 5)], hasMore: false)
        #expect(step.deliver.map(\.seq) == [4, 5] && !s.isReading)
        #expect(s.receive(Item(seq: 5)).deliver.isEmpty)
        #expect(s.receive(Item(seq: 6)).deliver.map(\.seq) == [6])
    }

    @Test func acceptNextIsReceiveWithoutTheStep() {
        var s = GaplessSequencer<Item>(liveAfter: 5)
        let next = s.acceptNext(Item(seq: 6))
        #expect(next && s.last == 6)
        let duplicate = s.acceptNext(Item(seq: 6))
        let gap = s.acceptNext(Item(seq: 8))
        #expect(!duplicate && !gap && s.last == 6 && !s.isReading)
        var reading = GaplessSequencer<Item>()
        let beforePosition = reading.acceptNext(Item(seq: 1))
        #expect(!beforePosition)
    }

    @Test func acceptRunTakesOnlyARunRightAfterThePosition() {
        var s = GaplessSequencer<Item>(liveAfter: 5)
        let run = s.acceptRun(first: 6, last: 9)
        #expect(run && s.last == 9)
        let overlapping = s.acceptRun(first: 8, last: 11)
        let gap = s.acceptRun(first: 11, last: 12)
        let backwards = s.acceptRun(first: 10, last: 9)
        #expect(!overlapping && !gap && !backwards && s.last == 9 && !s.isReading)
        var reading = GaplessSequencer<Item>()
        let beforePosition = reading.acceptRun(first: 1, last: 2)
        #expect(!beforePosition)
    }

    @Test func liveSequencerDropsDuplicatesAndAsksForTheGap() {
        var s = GaplessSequencer<Item>(liveAfter: 5)
        #expect(s.receive(Item(seq: 5)).deliver.isEmpty)
        #expect(s.receive(Item(seq: 6)).deliver.map(\.seq) == [6])
        let gap = s.receive(Item(seq: 9))
        #expect(gap.deliver.isEmpty && gap.readAfter == 6)
        #expect(s.receive(Item(seq: 8)).readAfter == nil)
        let filled = s.readCompleted([Item(seq: 7), Item(seq: 8), Item(seq: 9)], hasMore: false)
        #expect(filled.deliver.map(\.seq) == [7, 8, 9] && filled.readAfter == nil)
        #expect(s.receive(Item(seq: 10)).deliver.map(\.seq) == [10])
    }

    @Test func heldMessagesStayBoundedAndAreReadBack() {
        var s = GaplessSequencer<Item>(capacity: 3)
        for seq in 1...100 { _ = s.receive(Item(seq: Int64(seq))) }
        #expect(s.heldCount <= 3)
        #expect(s.begin(after: 0).readAfter == 0)
        var step = s.readCompleted((1...50).map { Item(seq: Int64($0)) }, hasMore: true)
        #expect(step.readAfter == 50)
        step = s.readCompleted((51...100).map { Item(seq: Int64($0)) }, hasMore: false)
        #expect(step.readAfter == nil && s.last == 100 && !s.isReading)
    }
}

/// A small seeded generator, so random tests repeat.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
