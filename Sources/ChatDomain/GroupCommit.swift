import NIOConcurrencyHelpers
import NIOCore

/// The queue in front of a store's appends: whatever arrives while a transaction runs is committed by the
/// next one (group commit), and no caller is answered before its transaction committed. One transaction at
/// a time (larger batches measured faster than more transactions in flight, on both stores). Bounded: past
/// `maxPending` waiting appends, new ones are refused with `503 STORE_UNAVAILABLE`.
///
/// A caller hands over a request with the function that takes its answer: no task per append. One task
/// commits batch after batch while there are appends waiting and ends when there are none; answers come on
/// its thread (a caller on another event loop hops back itself), a refusal at once on the caller's. Given an
/// event loop (`commit(on:)`), that task runs there: its store calls resume on the loop where the store's
/// connections already live, instead of waking one of Swift's task threads for each.
public final class GroupCommit: Sendable {
    public typealias Outcome = Result<AppendResult, ApiError>
    /// Commits a batch, returning one outcome per request, in order.
    public typealias CommitBatch = @Sendable ([AppendRequest]) async -> [Outcome]
    /// Takes one append's outcome.
    public typealias Answer = @Sendable (Outcome) -> Void

    private struct State {
        var pending = CircularBuffer<(AppendRequest, Answer)>()
        /// Requests in the running transaction.
        var committing = 0
        /// Whether the committing task runs (it clears this when it finds nothing waiting).
        var running = false
        var observer: CommitObserver?
        /// Where the committing task runs (nil: Swift's global executor).
        var executor: LoopTaskExecutor?
    }

    private let maxPending: Int
    private let maxBatch: Int
    private let commitBatch: CommitBatch
    private let state = NIOLockedValueBox(State())

    public init(maxPending: Int = 20_000, maxBatch: Int = 512, commit: @escaping CommitBatch) {
        self.maxPending = maxPending
        self.maxBatch = max(1, maxBatch)
        self.commitBatch = commit
    }

    /// Runs the committing task on `loop` (an instance's event loop, where the store's connections and the
    /// publishers' answers live): no thread hand-off per batch between Swift's task threads and the loop.
    public func commit(on loop: any EventLoop) {
        state.withLockedValue { $0.executor = LoopTaskExecutor(loop: loop) }
    }

    /// The executor the committing task prefers (a store's commit runs its own tasks there too).
    public var executor: LoopTaskExecutor? { state.withLockedValue { $0.executor } }

    /// Hears of every batch's newly stored messages, in commit order, before any of its publishers is answered.
    public func setObserver(_ observer: @escaping CommitObserver) {
        state.withLockedValue { $0.observer = observer }
    }

    /// Queues `request`; `answer` gets its outcome once its transaction committed or failed.
    public func append(_ request: AppendRequest, then answer: @escaping Answer) {
        enum Queued { case refused, queued, startCommitting(LoopTaskExecutor?) }
        let queued = state.withLockedValue { state -> Queued in
            guard state.pending.count < maxPending else { return .refused }
            state.pending.append((request, answer))
            if state.running { return .queued }
            state.running = true
            return .startCommitting(state.executor)
        }
        switch queued {
        case .refused: answer(.failure(ApiError(.storeUnavailable, "too many publishes waiting for the store")))
        case .queued: break
        case .startCommitting(let executor): Task(executorPreference: executor) { await self.commitWhileWaiting() }
        }
    }

    public func append(_ request: AppendRequest) async throws(ApiError) -> AppendResult {
        try await withCheckedContinuation { waiter in append(request) { waiter.resume(returning: $0) } }.get()
    }

    private func commitWhileWaiting() async {
        while let batch = nextBatch() {
            let outcomes = await commitBatch(batch.map(\.0))
            // Committed messages go to the bus before any publisher of the batch hears back.
            let stored = outcomes.compactMap { outcome -> Message? in
                if case .success(let result) = outcome, !result.replayed { return result.message }
                return nil
            }
            if !stored.isEmpty, let observer = state.withLockedValue({ $0.observer }) { observer(stored) }
            for ((_, answer), outcome) in zip(batch, outcomes) { answer(outcome) }
        }
    }

    /// The next batch, or nil (and the task ends) when nothing waits.
    private func nextBatch() -> [(AppendRequest, Answer)]? {
        state.withLockedValue { state in
            let count = min(maxBatch, state.pending.count)
            state.committing = count
            guard count > 0 else {
                state.running = false
                return nil
            }
            var batch: [(AppendRequest, Answer)] = []
            batch.reserveCapacity(count)
            for _ in 0..<count { batch.append(state.pending.removeFirst()) }
            return batch
        }
    }

    /// Appends waiting for their commit or in the running transaction (for shutdown).
    public var waiting: Int { state.withLockedValue { $0.pending.count + $0.committing } }
}

/// A weak reference that can be captured by a `@Sendable` closure made before the referent exists.
final class WeakBox<T: AnyObject>: @unchecked Sendable {  // set once during init, read afterwards
    weak var value: T?
    init() {}
}

/// A task executor that runs jobs on a NIO event loop (one `execute` per job).
public final class LoopTaskExecutor: TaskExecutor {
    public let loop: any EventLoop

    public init(loop: any EventLoop) { self.loop = loop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
