import Foundation
import NIOCore

/// Something with a timer in `LoopTimers`: told on its event loop when the timer is due.
protocol LoopTimerOwner: AnyObject {
    func timerFired()
}

/// One event loop's connection timers (WebSocket pings, token expiry, SSE keepalives): a `TimerWheel` of
/// one-second ticks driven by a single repeated task on the loop, instead of a scheduled task per timer.
/// A timer fires within about a second after its deadline, never before it. Only used on its loop.
final class LoopTimers {
    let eventLoop: any EventLoop
    private var wheel: TimerWheel
    /// Each token's owner, held until the timer fires or is cancelled (owners cancel theirs when they close).
    private var owners: [(any LoopTimerOwner)?] = []
    private var ticking: RepeatedTask?

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
        self.wheel = TimerWheel(now: Self.tick(NIODeadline.now()))
    }

    /// Ticks are whole seconds of the monotonic clock.
    static func tick(_ time: NIODeadline) -> Int64 { Int64(time.uptimeNanoseconds / 1_000_000_000) }

    /// Timers pending (for tests and metrics).
    var count: Int { wheel.count }
    /// The tick processed last.
    var currentTick: Int64 { wheel.now }

    /// A timer `delay` (rounded to whole seconds, at least one) after the tick being processed: for intervals
    /// such as pings, where a second either way does not matter but a second added each round would. Ticks run
    /// a fraction of a second after the clock's whole second, so counting from the clock would add one.
    func schedule(_ owner: any LoopTimerOwner, in delay: TimeAmount) -> TimerWheel.Token {
        startTicking()
        let seconds = max(1, (delay.nanoseconds + 500_000_000) / 1_000_000_000)
        return schedule(owner, atTick: wheel.now + seconds)
    }

    /// A timer at the wall-clock `date` (a token's `exp`), never before it.
    func schedule(_ owner: any LoopTimerOwner, at date: Date) -> TimerWheel.Token {
        let nanos = max(0, date.timeIntervalSinceNow) * 1e9
        return schedule(owner, at: NIODeadline.now() + .nanoseconds(Int64(min(nanos, 1e18))))
    }

    /// A timer at `deadline`, never before it: the first whole second at or after it.
    func schedule(_ owner: any LoopTimerOwner, at deadline: NIODeadline) -> TimerWheel.Token {
        let nanos = deadline.uptimeNanoseconds
        return schedule(owner, atTick: Int64(nanos / 1_000_000_000) + (nanos % 1_000_000_000 == 0 ? 0 : 1))
    }

    private func schedule(_ owner: any LoopTimerOwner, atTick tick: Int64) -> TimerWheel.Token {
        eventLoop.preconditionInEventLoop()
        let token = wheel.schedule(at: tick)
        if Int(token.index) == owners.count { owners.append(owner) } else { owners[Int(token.index)] = owner }
        startTicking()
        return token
    }

    func cancel(_ token: TimerWheel.Token?) {
        guard let token else { return }
        eventLoop.preconditionInEventLoop()
        if wheel.cancel(token) { owners[Int(token.index)] = nil }
    }

    /// Fires what is due by `time` (the repeated task passes the clock's now).
    func advance(to time: NIODeadline) {
        for token in wheel.advance(to: Self.tick(time)) {
            let owner = owners[Int(token.index)]
            owners[Int(token.index)] = nil
            owner?.timerFired()
        }
    }

    private func startTicking() {
        guard ticking == nil else { return }
        // The wheel's clock is the tick at its creation until it ticks: bring it to now (with nothing in it, so
        // nothing fires from inside a `schedule`).
        if wheel.count == 0 { advance(to: .now()) }
        // Holds this object until `stop()` (or the loop's end).
        ticking = eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
            self.advance(to: .now())
        }
    }

    func stop() {
        ticking?.cancel()
        ticking = nil
    }
}

/// Every event loop's `LoopTimers`, made once for the instance's loops.
final class ConnectionTimers: @unchecked Sendable {  // the dictionary never changes after init; each LoopTimers is used on its loop only
    private let perLoop: [ObjectIdentifier: LoopTimers]

    init(loops: [any EventLoop]) {
        perLoop = Dictionary(uniqueKeysWithValues: loops.map { (ObjectIdentifier($0), LoopTimers(eventLoop: $0)) })
    }

    /// The timers of `loop`, one of the instance's loops.
    func on(_ loop: any EventLoop) -> LoopTimers {
        guard let timers = perLoop[ObjectIdentifier(loop)] else { preconditionFailure("not one of the instance's event loops") }
        return timers
    }

    func stop() {
        for timers in perLoop.values { timers.eventLoop.execute { timers.stop() } }
    }
}
