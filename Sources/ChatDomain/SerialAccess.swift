import Foundation

/// Runs bodies one at a time, in arrival order, across their suspension points: what one SQLite connection's
/// transactions need (an actor alone would let a second `BEGIN` in at the first one's `await`). Waiting is
/// bounded by the callers (requests and the periodic work), each waiting once.
final class SerialAccess: @unchecked Sendable {  // `busy` and `waiters` are only touched under `lock`
    private let lock = NSLock()
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func run<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        await acquire()
        defer { release() }
        return try await body()
    }

    private func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            lock.lock()
            if busy {
                waiters.append(continuation)
                lock.unlock()
            } else {
                busy = true
                lock.unlock()
                continuation.resume()
            }
        }
    }

    private func release() {
        lock.lock()
        if waiters.isEmpty {
            busy = false
            lock.unlock()
        } else {
            let next = waiters.removeFirst()
            lock.unlock()
            next.resume()
        }
    }
}
