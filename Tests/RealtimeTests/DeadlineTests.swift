@testable import ChatDomain
import NIOConcurrencyHelpers
import Testing

/// `withDeadline`: the body's result or its own error when it ends in time; `DeadlinePassed` (and the body
/// cancelled) when it does not; the caller's cancellation reaches the body; nothing stays in the watch.
@Suite(.serialized) struct DeadlineTests {
    @Test func inTimeTheBodysResultOrErrorComesBack() async throws {
        let before = DeadlineWatch.shared.count
        #expect(try await withDeadline(.seconds(5)) { 42 } == 42)
        struct Refused: Error {}
        await #expect(throws: Refused.self) { try await withDeadline(.seconds(5)) { () async throws -> Int in throw Refused() } }
        #expect(DeadlineWatch.shared.count == before)
    }

    @Test func aBodyPastTheDeadlineIsCancelledAndDeadlinePassedThrown() async throws {
        let before = DeadlineWatch.shared.count
        let sawCancel = NIOLockedValueBox(false)
        await #expect(throws: DeadlinePassed.self) {
            try await withDeadline(.milliseconds(200)) {
                do {
                    try await Task.sleep(for: .seconds(30))
                } catch {
                    sawCancel.withLockedValue { $0 = true }
                    throw error
                }
            }
        }
        #expect(sawCancel.withLockedValue { $0 })
        #expect(DeadlineWatch.shared.count == before)
    }

    @Test func cancellingTheCallerCancelsTheBody() async throws {
        let sawCancel = NIOLockedValueBox(false)
        let started = NIOLockedValueBox(false)
        let caller = Task {
            try await withDeadline(.seconds(60)) {
                started.withLockedValue { $0 = true }
                do {
                    try await Task.sleep(for: .seconds(30))
                } catch {
                    sawCancel.withLockedValue { $0 = true }
                    throw error
                }
            }
        }
        while !started.withLockedValue({ $0 }) { await Task.yield() }
        caller.cancel()
        let result = await caller.result
        #expect(throws: CancellationError.self) { try result.get() }
        #expect(sawCancel.withLockedValue { $0 })
    }
}
