import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// `body`'s result, or `DeadlinePassed` once `limit` has passed (`body` is then cancelled; this returns when it
/// has ended). A store call that hangs (a stalled Postgres, a start that never connects, a drain that never
/// ends) fails instead. The deadline is an entry in `DeadlineWatch`, checked every 100 ms on one event loop —
/// not a sleeping task with a timer of its own per call: every Postgres batch and read runs under one, and a
/// timer per call cost a wake-up of libdispatch's timer thread each (~8 % of an instance's CPU at 500 msgs/s).
public func withDeadline<T: Sendable>(_ limit: Duration, on executor: (any TaskExecutor)? = nil,
                                      _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let work = Task(executorPreference: executor) { try await body() }
    let passed = NIOLockedValueBox(false)
    let entry = DeadlineWatch.shared.add(at: .now() + .nanoseconds(limit.nanoseconds)) {
        passed.withLockedValue { $0 = true }
        work.cancel()
    }
    defer { DeadlineWatch.shared.remove(entry) }
    return try await withTaskCancellationHandler {
        do {
            return try await work.value
        } catch {
            if passed.withLockedValue({ $0 }) { throw DeadlinePassed() }
            throw error
        }
    } onCancel: {
        work.cancel()
    }
}

public struct DeadlinePassed: Error {
    public init() {}
}

/// The deadlines of the calls in flight under `withDeadline`, expired by one repeated task (every 100 ms, so a
/// deadline fires up to 100 ms late, never early). Entries leave when their call ends: the table holds only
/// what is in flight.
final class DeadlineWatch: Sendable {
    static let shared = DeadlineWatch(loop: MultiThreadedEventLoopGroup.singleton.any())
    static let interval = TimeAmount.milliseconds(100)

    private struct Entry {
        let at: NIODeadline
        let expire: @Sendable () -> Void
    }
    private struct State {
        var next = 0
        var entries: [Int: Entry] = [:]
        var ticking = false
    }
    private let state = NIOLockedValueBox(State())
    private let loop: any EventLoop

    init(loop: any EventLoop) {
        self.loop = loop
    }

    /// Calls `expire` once `deadline` has passed, unless removed before.
    func add(at deadline: NIODeadline, _ expire: @escaping @Sendable () -> Void) -> Int {
        let (id, start) = state.withLockedValue { s -> (Int, Bool) in
            s.next += 1
            s.entries[s.next] = Entry(at: deadline, expire: expire)
            defer { s.ticking = true }
            return (s.next, !s.ticking)
        }
        if start {
            loop.scheduleRepeatedTask(initialDelay: Self.interval, delay: Self.interval) { [weak self] _ in self?.expireDue() }
        }
        return id
    }

    func remove(_ id: Int) {
        state.withLockedValue { _ = $0.entries.removeValue(forKey: id) }
    }

    /// Calls in flight (tests).
    var count: Int { state.withLockedValue { $0.entries.count } }

    private func expireDue() {
        let now = NIODeadline.now()
        let due = state.withLockedValue { s -> [Entry] in
            let due = s.entries.filter { $0.value.at <= now }
            for id in due.keys { s.entries[id] = nil }
            return Array(due.values)
        }
        for entry in due { entry.expire() }
    }
}
