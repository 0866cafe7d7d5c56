import ChatDomain
import Foundation
@testable import Gateway
import NIOConcurrencyHelpers
@testable import Fanout
import NIOCore
import Testing

/// The membership gate of a member's stream of a thread, without sockets: an element committed at a later
/// membership epoch than the stream's permission waits (with everything after it) until the store says whether
/// this member was removed at one of those epochs. A removal and the next message travel separately, so the
/// message may come first; the gate makes the cut the removal's head whatever the order.
struct MembershipGateTests {
    struct Item: Sequenced, Equatable {
        let seq: Int64
        let membershipEpoch: Int64
    }
    typealias M = SubscriptionStateMachine<Item>
    static func size(_ item: Item) -> Int { 100 }

    /// Live at 1 with permission epoch 0; 1 and 2 were committed at epoch 0, 3… at epoch 1.
    static func live() -> M {
        var m = M(budget: 1 << 20)
        _ = m.begin(after: 0, membershipEpoch: 0)
        _ = m.readCompleted([Item(seq: 1, membershipEpoch: 0)], hasMore: false)
        return m
    }

    @Test func aLaterEpochWaitsForTheStoreAndGoesOnWhenThisMemberWasNotRemoved() {
        var m = Self.live()
        let accepted1 = m.acceptLive(Item(seq: 2, membershipEpoch: 0), writable: true)
        #expect(accepted1)
        // The fast paths refuse what the gate must see.
        let accepted2 = m.acceptLive(Item(seq: 3, membershipEpoch: 1), writable: true)
        #expect(!accepted2)
        let accepted3 = m.acceptLiveRun(first: 3, last: 4, membershipEpoch: 1, writable: true)
        #expect(!accepted3)
        let held = m.liveReceived([Item(seq: 3, membershipEpoch: 1), Item(seq: 4, membershipEpoch: 1)], writable: true, bytes: Self.size)
        #expect(held.write.isEmpty && held.checkMembership == 1...1 && held.end == nil)
        // While the check is out, nothing passes, not even an element of the verified epoch.
        let accepted4 = m.acceptLive(Item(seq: 5, membershipEpoch: 1), writable: true)
        #expect(!accepted4)
        let more = m.liveReceived([Item(seq: 5, membershipEpoch: 2)], writable: true, bytes: Self.size)
        #expect(more.isEmpty)
        // No removal at epoch 1: 3 and 4 go; 5 came at epoch 2, so it waits for a second check.
        let answered = m.membershipChecked(removedAt: nil)
        #expect(answered.write.map(\.seq) == [3, 4] && answered.checkMembership == 2...2)
        let again = m.membershipChecked(removedAt: nil)
        #expect(again.write.map(\.seq) == [5] && again.checkMembership == nil && m.phase == .live)
        let accepted5 = m.acceptLive(Item(seq: 6, membershipEpoch: 2), writable: true)
        #expect(accepted5)
    }

    @Test func aRemovalFoundByTheCheckCutsAtItsHead() {
        var m = Self.live()
        let held = m.liveReceived([Item(seq: 2, membershipEpoch: 0), Item(seq: 3, membershipEpoch: 1), Item(seq: 4, membershipEpoch: 1)],
                                  writable: true, bytes: Self.size)
        #expect(held.write.map(\.seq) == [2] && held.checkMembership == 1...1)
        // Removed at head 2: 3 and 4 were committed after the removal and are never written.
        let cut = m.membershipChecked(removedAt: 2)
        #expect(cut.write.isEmpty && cut.end == .limitReached && m.phase == .ended(.limitReached))
        #expect(m.liveReceived([Item(seq: 5, membershipEpoch: 1)], writable: true, bytes: Self.size).isEmpty)
    }

    @Test func aRemovalHeadPastWhatArrivedIsReadUpTo() {
        var m = Self.live()
        // 2 and 3 were lost on the bus; 4 (epoch 1) arrives: the gap is read first, and the read's rows pass the gate too.
        let gap = m.liveReceived([Item(seq: 4, membershipEpoch: 1)], writable: true, bytes: Self.size)
        #expect(gap.read == 1)
        let read = m.readCompleted([Item(seq: 2, membershipEpoch: 0), Item(seq: 3, membershipEpoch: 0), Item(seq: 4, membershipEpoch: 1)], hasMore: false)
        #expect(read.write.map(\.seq) == [2, 3] && read.checkMembership == 1...1 && read.end == nil)
        // The removal was at head 3 (4 came after it).
        let cut = m.membershipChecked(removedAt: 3)
        #expect(cut.write.isEmpty && cut.end == .limitReached)
    }

    @Test func theRemovalsBroadcastDuringACheckWaitsForTheCheck() {
        var m = Self.live()
        let held = m.liveReceived([Item(seq: 2, membershipEpoch: 1), Item(seq: 3, membershipEpoch: 1)], writable: true, bytes: Self.size)
        #expect(held.checkMembership == 1...1)
        // The broadcast of a removal at head 2 arrives: 2 is still waiting, so nothing ends yet.
        #expect(m.end(after: 2).isEmpty && m.phase == .live)
        let answered = m.membershipChecked(removedAt: nil)  // the store knows of no removal at epoch 1 (pruned, say)
        #expect(answered.write.map(\.seq) == [2] && answered.end == .limitReached)
    }

    @Test func aFailedCheckEndsTheStreamAndAnUngatedStreamIgnoresEpochs() {
        var m = Self.live()
        let held = m.liveReceived([Item(seq: 2, membershipEpoch: 1)], writable: true, bytes: Self.size)
        #expect(held.checkMembership == 1...1)
        #expect(m.membershipCheckFailed().end == .storeFailed)
        var topic = M(budget: 1 << 20)
        _ = topic.begin(after: 0)
        _ = topic.readCompleted([], hasMore: false)
        let accepted6 = topic.acceptLive(Item(seq: 1, membershipEpoch: 7), writable: true)
        #expect(accepted6)
        #expect(topic.liveReceived([Item(seq: 2, membershipEpoch: 9)], writable: true, bytes: Self.size).write.map(\.seq) == [2])
        #expect(topic.membershipCheckFailed().isEmpty)
    }

    @Test func whatWaitsIsBounded() {
        var m = M(heldLimit: 4, budget: 1 << 20)
        _ = m.begin(after: 0, membershipEpoch: 0)
        _ = m.readCompleted([], hasMore: false)
        var end: M.End?
        for seq in Int64(1)...10 where end == nil {
            end = m.liveReceived([Item(seq: seq, membershipEpoch: 1)], writable: true, bytes: Self.size).end
        }
        #expect(end == .slowConsumer)
    }

    /// Random schedules: a member's stream from `cursor`, the member removed at head `h` (epoch 1; every
    /// later message has epoch 1), messages arriving live in any order (some twice, some never), reads,
    /// sync hints, the store's answer to a check at any moment, and the removal's broadcast at any moment or
    /// never. The client gets exactly cursor+1…h, in order, and nothing after.
    @Test func randomSchedulesNeverDeliverPastTheRemoval() {
        var rng = SplitMix(seed: 11)
        for _ in 0..<3000 {
            let n = Int(rng.next() % 20) + 1
            let h = Int64(rng.next() % UInt64(n + 1))
            let cursor = Int64(rng.next() % UInt64(h + 1))
            let page = Int(rng.next() % 4) + 1
            let broadcast = rng.next() % 2 == 0
            var m = M(heldLimit: 64, budget: 1 << 30)
            func item(_ seq: Int64) -> Item { Item(seq: seq, membershipEpoch: seq > h ? 1 : 0) }
            var committed = Int(cursor)
            var inflight: [Int64] = []
            var read: Int64?
            var deferred: Int64?
            var check: ClosedRange<Int64>?
            var broadcastSent = false
            var output: [Int64] = []
            var ended: M.End?
            func apply(_ a: M.Actions) {
                output += a.write.map(\.seq)
                if let r = a.read { read = r }
                if let r = a.readWhenFlushed { deferred = r }
                if let c = a.checkMembership { check = c }
                if let e = a.end { ended = e }
            }
            apply(m.begin(after: cursor, membershipEpoch: 0))
            var steps = 0
            while steps < 500 && ended == nil {
                steps += 1
                var events: [Int] = []
                if committed < n { events.append(0) }
                if !inflight.isEmpty { events.append(1) }
                if read != nil { events.append(2) }
                if deferred != nil { events.append(3) }
                if check != nil { events.append(4) }
                if broadcast && !broadcastSent && committed >= Int(h) { events.append(5) }
                events.append(6)
                switch events[Int(rng.next() % UInt64(events.count))] {
                case 0:
                    committed += 1
                    for _ in 0..<(Int(rng.next() % 3)) { inflight.append(Int64(committed)) }
                case 1:
                    let seq = inflight.remove(at: Int(rng.next() % UInt64(inflight.count)))
                    if m.acceptLive(item(seq), writable: true) { output.append(seq) } else {
                        apply(m.liveReceived([item(seq)], writable: true, bytes: Self.size))
                    }
                case 2:
                    let after = Int(read!)
                    read = nil
                    let upTo = min(committed, after + page)
                    apply(m.readCompleted(after < upTo ? (Int64(after + 1)...Int64(upTo)).map(item) : [], hasMore: committed > upTo))
                case 3:
                    let after = deferred!
                    deferred = nil
                    if m.startDeferredRead() { read = after }
                case 4:
                    let epochs = check!
                    check = nil
                    apply(m.membershipChecked(removedAt: epochs.contains(1) ? h : nil))
                case 5:
                    broadcastSent = true
                    apply(m.end(after: h))
                default:
                    apply(m.synced(upTo: Int64(committed)))
                }
            }
            // Then everything left: the rest committed, what is in flight arrives, reads and checks answered, the
            // Hub's last sync hint (and the broadcast, if it is sent at all).
            committed = n
            var hinted = false
            while ended == nil {
                if let seq = inflight.popLast() {
                    if m.acceptLive(item(seq), writable: true) { output.append(seq) } else {
                        apply(m.liveReceived([item(seq)], writable: true, bytes: Self.size))
                    }
                } else if let r = deferred {
                    deferred = nil
                    if m.startDeferredRead() { read = r }
                } else if let r = read {
                    read = nil
                    let upTo = min(n, Int(r) + page)
                    apply(m.readCompleted(Int(r) < upTo ? (r + 1...Int64(upTo)).map(item) : [], hasMore: n > upTo))
                } else if let epochs = check {
                    check = nil
                    apply(m.membershipChecked(removedAt: epochs.contains(1) ? h : nil))
                } else if broadcast && !broadcastSent {
                    broadcastSent = true
                    apply(m.end(after: h))
                } else if !hinted {
                    hinted = true
                    apply(m.synced(upTo: Int64(n)))
                } else {
                    break
                }
            }
            let expected = cursor < h ? Array(cursor + 1...h) : []
            // Ended at the removal once anything after it reached the stream, or the broadcast did.
            let expectedEnd: M.End? = (Int64(n) > h || broadcast) ? .limitReached : nil
            if output != expected || ended != expectedEnd {
                Issue.record("n \(n) h \(h) cursor \(cursor) page \(page) broadcast \(broadcast): delivered \(output), end \(String(describing: ended))")
            }
        }
    }
}

/// The bus carries the epoch (wire version 2); a version-1 message from an instance not yet upgraded still
/// decodes, with epoch 0.
struct MessageWireEpochTests {
    @Test func theEpochCrossesTheBusAndVersionOneStillDecodes() throws {
        let channel = try ChannelName(parsing: "thread:6f1c2a9e-1b2c-4d3e-8f00-0123456789ab")
        let message = Message(id: UUIDv7.make(), channel: channel, seq: 42, createdAtMicros: 1_700_000_000_000_000, sender: "alice",
                              requestId: "k1", body: "{\"x\":1}", membershipEpoch: 3)
        let decoded = try #require(MessageWire.decode(MessageWire.encode(message)))
        #expect(decoded == message && decoded.json == message.json && decoded.membershipEpoch == 3)
        // Version 1: the same fields without the epoch.
        var v1 = MessageWire.encode(message)
        var bytes = Array(v1.readableBytesView)
        bytes.removeSubrange(17..<25)  // version (1) + seq (8) + created_at (8), then the epoch's 8 bytes
        bytes[0] = 1
        v1 = ByteBuffer(bytes: bytes)
        let old = try #require(MessageWire.decode(v1))
        #expect(old == message && old.membershipEpoch == 0 && old.json == message.json)
        bytes[0] = 3
        #expect(MessageWire.decode(ByteBuffer(bytes: bytes)) == nil)
    }
}

/// The gate's store reads: the local subscribers of a thread asking at once share one read; a question after
/// it finished reads again (nothing is cached); a failure reaches everyone who asked.
struct RemovalLookupsTests {
    /// A read that waits until the test lets it answer.
    final class HeldRead: @unchecked Sendable {  // guarded by `lock`
        private let lock = NSLock()
        private var waiting: [CheckedContinuation<Void, Never>] = []
        private var open = false
        func wait() async {
            await withCheckedContinuation { continuation in
                lock.lock()
                if open { lock.unlock(); continuation.resume() } else { waiting.append(continuation); lock.unlock() }
            }
        }
        func release() {
            lock.lock()
            open = true
            let all = waiting
            waiting = []
            lock.unlock()
            for continuation in all { continuation.resume() }
        }
    }

    @Test func subscribersAskingAtOnceShareOneRead() async throws {
        let held = HeldRead()
        let fail = NIOLockedValueBox(false)
        let lookups = RemovalLookups { thread, epochs throws(ApiError) in
            await held.wait()
            if fail.withLockedValue({ $0 }) { throw ApiError(.storeUnavailable, "down") }
            return thread == "t" && epochs == 1...2 ? ["bob": 7] : [:]
        }
        let askers = (0..<10).map { i in Task { try await lookups.heads(from: "t", epochs: 1...2)[i == 0 ? "bob" : "carol"] } }
        try await eventually("nine joined the first one's read") { lookups.counts == (reads: 1, joins: 9) }
        held.release()
        var answers: [Int64?] = []
        for asker in askers { answers.append(try await asker.value) }
        #expect(answers == [7] + Array(repeating: nil, count: 9))
        #expect(lookups.counts == (reads: 1, joins: 9))
        // Finished: the next question reads again, and another range is another read.
        #expect(try await lookups.heads(from: "t", epochs: 1...2) == ["bob": 7])
        #expect(try await lookups.heads(from: "t", epochs: 3...3) == [:])
        #expect(lookups.counts == (reads: 3, joins: 9))
        fail.withLockedValue { $0 = true }
        await #expect(throws: ApiError.self) { try await lookups.heads(from: "t", epochs: 1...2) }
    }
}
