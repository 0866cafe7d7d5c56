@testable import Gateway
import NIOCore
import NIOPosix
import Testing

/// `TimerWheel`: every timer fires once, at the first tick at or after its deadline and never before;
/// cancelled ones never; stale tokens name nothing.
struct TimerWheelTests {
    @Test func timersFireAtTheirTick_neverEarly_inDeadlineOrder_againstAReferenceModel() {
        var random = SplitMix(seed: 11)
        for _ in 0..<200 {
            var wheel = TimerWheel(slotCount: Int.random(in: 1...16, using: &random), now: 1_000)
            var pending: [TimerWheel.Token: Int64] = [:]  // the model: token → deadline
            var now: Int64 = 1_000
            for _ in 0..<300 {
                switch Int.random(in: 0..<10, using: &random) {
                case 0..<5:
                    // Deadlines in the past, near, and many wheel turns away.
                    let deadline = now + Int64.random(in: -3...(Int.random(in: 0..<4, using: &random) == 0 ? 200 : 20), using: &random)
                    let token = wheel.schedule(at: deadline)
                    #expect(pending[token] == nil)
                    pending[token] = max(deadline, now + 1)
                case 5..<7:
                    if let token = pending.keys.randomElement(using: &random) {
                        let cancelled = wheel.cancel(token)
                        pending[token] = nil
                        let again = wheel.cancel(token)
                        #expect(cancelled && !again, "cancelled once, not twice")
                    }
                default:
                    // Steps of one tick, and gaps longer than the wheel.
                    let to = now + Int64.random(in: 0...(Int.random(in: 0..<5, using: &random) == 0 ? 50 : 2), using: &random)
                    let fired = wheel.advance(to: to)
                    let expected = pending.filter { $0.value <= to }
                    #expect(Set(fired) == Set(expected.keys), "fired exactly what was due by \(to)")
                    #expect(fired.count == expected.count, "each once")
                    #expect(fired.map { pending[$0]! } == fired.map { pending[$0]! }.sorted(), "in deadline order")
                    for token in fired {
                        pending[token] = nil
                        let cancelled = wheel.cancel(token)
                        #expect(!cancelled, "a fired token names nothing")
                    }
                    now = max(now, to)
                }
                #expect(wheel.count == pending.count)
            }
        }
    }

    @Test func aReusedRowIsNotCancelledThroughAnOldToken() {
        var wheel = TimerWheel(slotCount: 8, now: 0)
        let old = wheel.schedule(at: 5)
        let first = wheel.advance(to: 5)
        #expect(first == [old])
        let new = wheel.schedule(at: 9)
        #expect(new.index == old.index && new != old, "the row is reused under a new generation")
        let cancelled = wheel.cancel(old)
        #expect(!cancelled)
        let second = wheel.advance(to: 9)
        #expect(second == [new])
    }
}

/// `LoopTimers`: a timer fires at the first whole second of the clock at or after its deadline — not a
/// nanosecond early, at most a second late.
struct LoopTimersTests {
    final class Owner: LoopTimerOwner {
        var fired = 0
        func timerFired() { fired += 1 }
    }

    @Test func aTimerFiresAtItsDeadlineNeverBefore_andACancelledOneNever() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        try await loop.submit {
            let timers = LoopTimers(eventLoop: loop)
            defer { timers.stop() }
            var clock = NIODeadline.now()  // the test's clock, moved forward by each case (as time would)
            for offset: Int64 in [1_000_000_000, 1_500_000_000, 2_000_000_001, 90_000_000_000] {
                let owner = Owner(), cancelled = Owner()
                let deadline = clock + .nanoseconds(offset)
                _ = timers.schedule(owner, at: deadline)
                let token = timers.schedule(cancelled, at: deadline)
                timers.advance(to: deadline - .nanoseconds(1))
                #expect(owner.fired == 0, "fired before its deadline (\(offset) ns ahead)")
                timers.cancel(token)
                timers.advance(to: deadline + .seconds(1))
                #expect(owner.fired == 1 && cancelled.fired == 0)
                timers.advance(to: deadline + .seconds(200))
                #expect(owner.fired == 1, "once")
                clock = deadline + .seconds(200)
            }
            #expect(timers.count == 0)
        }.get()
    }

    final class Periodic: LoopTimerOwner {
        let timers: LoopTimers
        var firedAt: [Int64] = []
        init(_ timers: LoopTimers) { self.timers = timers }
        func timerFired() {
            firedAt.append(timers.currentTick)
            _ = timers.schedule(self, in: .seconds(20))
        }
    }

    /// An interval timer that schedules itself again when it fires keeps its period: 20 s, not 21.
    @Test func anIntervalTimerKeepsItsPeriod() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        try await loop.submit {
            let timers = LoopTimers(eventLoop: loop)
            defer { timers.stop() }
            let periodic = Periodic(timers)
            _ = timers.schedule(periodic, in: .seconds(20))
            let start = timers.currentTick
            for second in 1...100 { timers.advance(to: .uptimeNanoseconds(UInt64(start + Int64(second)) * 1_000_000_000 + 700_000_000)) }
            #expect(periodic.firedAt == [start + 20, start + 40, start + 60, start + 80, start + 100])
        }.get()
    }
}
