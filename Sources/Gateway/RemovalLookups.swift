import ChatDomain
import NIOConcurrencyHelpers

/// The store reads behind the membership gate of thread streams (`SubscriptionStateMachine`), one at a time
/// per thread and epoch range: a message after a removal reaches every local subscriber of the thread at
/// once, and each asks whether its member was removed; they share one read instead of one each.
final class RemovalLookups: Sendable {
    private struct Key: Hashable {
        let thread: String
        let epochs: ClosedRange<Int64>
    }

    typealias Read = @Sendable (_ thread: String, _ epochs: ClosedRange<Int64>) async throws(ApiError) -> [String: Int64]

    private let read: Read
    private let running = NIOLockedValueBox<(tasks: [Key: Task<[String: Int64], any Error>], reads: Int, joins: Int)>(([:], 0, 0))

    init(read: @escaping Read) {
        self.read = read
    }

    convenience init(store: any Store) {
        self.init { thread, epochs throws(ApiError) in try await store.removalHeads(from: thread, epochs: epochs) }
    }

    /// For each user removed from `thread` at one of `epochs`, the lowest removal head.
    func heads(from thread: String, epochs: ClosedRange<Int64>) async throws(ApiError) -> [String: Int64] {
        let key = Key(thread: thread, epochs: epochs)
        let read = self.read
        let task = running.withLockedValue { running in
            if let task = running.tasks[key] {
                running.joins += 1
                return task
            }
            let task = Task { () throws -> [String: Int64] in try await read(thread, epochs) }
            running.tasks[key] = task
            running.reads += 1
            return task
        }
        let result = await task.result
        // Finished: a later question reads the store afresh (nothing is cached past the read itself).
        running.withLockedValue { if $0.tasks[key] == task { $0.tasks[key] = nil } }
        switch result {
        case .success(let heads): return heads
        case .failure(let error): throw error as? ApiError ?? ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    /// Store reads started, and questions that joined one already running (for tests).
    var counts: (reads: Int, joins: Int) { running.withLockedValue { ($0.reads, $0.joins) } }
}
