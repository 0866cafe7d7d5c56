/// `body`'s result, or `DeadlinePassed` once `limit` has passed (`body` is then cancelled). A store call that
/// hangs (a stalled Postgres, a start that never connects, a drain that never ends) fails instead.
public func withDeadline<T: Sendable>(_ limit: Duration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let result = first else { throw DeadlinePassed() }
        return result
    }
}

public struct DeadlinePassed: Error {
    public init() {}
}
