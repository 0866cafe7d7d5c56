/// The queue in front of a store's appends: whatever arrives while a transaction runs is committed by the
/// next one (group commit), and no caller is answered before its transaction committed. Bounded: past
/// `maxPending` waiting appends, new ones are refused with `503 STORE_UNAVAILABLE`.
public actor GroupCommit {
    public typealias Outcome = Result<AppendResult, ApiError>
    /// Commits a batch, returning one outcome per request, in order.
    public typealias CommitBatch = @Sendable ([AppendRequest]) async -> [Outcome]

    private let maxPending: Int
    private let maxBatch: Int
    private let maxInFlight: Int
    private let commitBatch: CommitBatch
    private var observer: CommitObserver?
    private var pending: [(AppendRequest, CheckedContinuation<Outcome, Never>)] = []
    private var inFlight = 0

    /// `maxInFlight` transactions may run at once. Both stores use 1 (larger batches measured faster on
    /// Postgres too); more stays correct there, since its row locks keep each channel's order whatever the
    /// interleaving.
    public init(maxPending: Int = 20_000, maxBatch: Int = 512, maxInFlight: Int = 1, commit: @escaping CommitBatch) {
        self.maxPending = maxPending
        self.maxBatch = maxBatch
        self.maxInFlight = max(1, maxInFlight)
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
            startBatches()
        }
        return try outcome.get()
    }

    private func startBatches() {
        while inFlight < maxInFlight && !pending.isEmpty {
            let batch = Array(pending.prefix(maxBatch))
            pending.removeFirst(batch.count)
            inFlight += 1
            let commitBatch = self.commitBatch
            Task {
                let outcomes = await commitBatch(batch.map(\.0))
                self.finish(batch, outcomes)
            }
        }
    }

    private func finish(_ batch: [(AppendRequest, CheckedContinuation<Outcome, Never>)], _ outcomes: [Outcome]) {
        // Committed messages go to the bus before any publisher of the batch hears back.
        let stored = outcomes.compactMap { outcome -> Message? in
            if case .success(let result) = outcome, !result.replayed { return result.message }
            return nil
        }
        if !stored.isEmpty { observer?(stored) }
        for ((_, waiter), outcome) in zip(batch, outcomes) { waiter.resume(returning: outcome) }
        inFlight -= 1
        startBatches()
    }

    /// Publishes waiting for their commit or in a transaction (for shutdown).
    public var waiting: Int { pending.count + inFlight }
}

/// A weak reference that can be captured by a `@Sendable` closure made before the referent exists.
final class WeakBox<T: AnyObject>: @unchecked Sendable {  // set once during init, read afterwards
    weak var value: T?
    init() {}
}
