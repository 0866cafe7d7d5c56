/// The queue in front of a store's appends: whatever arrives while a transaction runs is committed by the
/// next one (group commit), and no caller is answered before its transaction committed. Bounded: past
/// `maxPending` waiting appends, new ones are refused with `503 STORE_UNAVAILABLE`.
public actor GroupCommit {
    public typealias Outcome = Result<AppendResult, ApiError>
    /// Commits a batch, returning one outcome per request, in order.
    public typealias CommitBatch = @Sendable ([AppendRequest]) async -> [Outcome]

    private let maxPending: Int
    private let maxBatch: Int
    private let commitBatch: CommitBatch
    private var observer: CommitObserver?
    private var pending: [(AppendRequest, CheckedContinuation<Outcome, Never>)] = []
    private var committing = false

    public init(maxPending: Int = 20_000, maxBatch: Int = 512, commit: @escaping CommitBatch) {
        self.maxPending = maxPending
        self.maxBatch = maxBatch
        self.commitBatch = commit
    }

    public func setObserver(_ observer: @escaping CommitObserver) {
        self.observer = observer
    }

    public func append(_ request: AppendRequest) async throws(ApiError) -> AppendResult {
        guard pending.count < maxPending else {
            throw ApiError(.storeUnavailable, "too many publishes waiting for the store")
        }
        let outcome = await withCheckedContinuation { waiter in
            pending.append((request, waiter))
            if !committing {
                committing = true
                Task { await self.drain() }
            }
        }
        return try outcome.get()
    }

    private func drain() async {
        while !pending.isEmpty {
            let batch = Array(pending.prefix(maxBatch))
            pending.removeFirst(batch.count)
            let outcomes = await commitBatch(batch.map(\.0))
            // Committed messages go to the bus in seq order, before any publisher hears back.
            let stored = outcomes.compactMap { outcome -> Message? in
                if case .success(let result) = outcome, !result.replayed { return result.message }
                return nil
            }
            if !stored.isEmpty { observer?(stored) }
            for ((_, waiter), outcome) in zip(batch, outcomes) { waiter.resume(returning: outcome) }
        }
        committing = false
    }

    /// Publishes waiting for their commit (for shutdown).
    public var waiting: Int { pending.count + (committing ? 1 : 0) }
}

/// A weak reference that can be captured by a `@Sendable` closure made before the referent exists.
final class WeakBox<T: AnyObject>: @unchecked Sendable {  // set once during init, read afterwards
    weak var value: T?
    init() {}
}
