@testable import ChatDomain
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

/// `GroupCommit`, with a commit function the test holds open: one transaction at a time, what arrives meanwhile
/// goes into the next (at most `maxBatch`), in order; the observer hears a batch's new messages before any of
/// its publishers is answered (replays and failures not); past `maxPending` an append is refused at once and
/// never stored; after an idle moment the next append is committed again.
@Suite struct GroupCommitTests {
    /// A store whose transactions end when the test says so.
    final class HeldCommits: Sendable {
        /// Each transaction's bodies, in the order they began.
        let batches = NIOLockedValueBox<[[String]]>([])
        private let held = NIOLockedValueBox<[CheckedContinuation<Void, Never>]>([])
        /// What happened, in order: "observed a,b" and "answered a".
        let log = NIOLockedValueBox<[String]>([])

        func commit(_ batch: [AppendRequest]) async -> [GroupCommit.Outcome] {
            batches.withLockedValue { $0.append(batch.map(\.body)) }
            await withCheckedContinuation { waiter in held.withLockedValue { $0.append(waiter) } }
            return batch.enumerated().map { index, request in
                switch request.requestId {
                case "fails": return .failure(ApiError(.storeUnavailable, "refused by the test"))
                case let replay: return .success(AppendResult(message: Message(
                    id: "m-\(request.body)", channel: request.channel, seq: Int64(index + 1), createdAtMicros: 0, sender: request.sender,
                    requestId: request.requestId, body: request.body), replayed: replay == "replay"))
                }
            }
        }

        /// Ends the running transaction (once it has begun).
        func finishRunning() async throws {
            try await eventually("a transaction to be running") { self.held.withLockedValue { !$0.isEmpty } }
            held.withLockedValue { $0.removeFirst() }.resume()
        }

        /// Appends `body` and waits until its transaction runs (what comes next waits for the one after).
        func appendFirst(_ commits: GroupCommit, _ body: String) async throws {
            append(commits, body)
            try await eventually("the first transaction") { self.batches.withLockedValue { $0.count == 1 } }
        }

        func append(_ commits: GroupCommit, _ body: String, requestId: String? = nil) {
            commits.append(AppendRequest(channel: try! ChannelName(parsing: "topic:gc"), sender: "u", requestId: requestId, body: body)) { outcome in
                let text: String
                switch outcome {
                case .success(let result): text = result.message.body
                case .failure(let error): text = "\(body) \(error.code.rawValue)"
                }
                self.log.withLockedValue { $0.append("answered \(text)") }
            }
        }
    }

    static func make(_ store: HeldCommits, maxPending: Int = 100, maxBatch: Int = 3) -> GroupCommit {
        let commits = GroupCommit(maxPending: maxPending, maxBatch: maxBatch) { await store.commit($0) }
        commits.setObserver { messages in store.log.withLockedValue { $0.append("observed " + messages.map(\.body).joined(separator: ",")) } }
        return commits
    }

    @Test func whatArrivesDuringATransactionIsCommittedByTheNextInOrder() async throws {
        let store = HeldCommits()
        let commits = Self.make(store)
        try await store.appendFirst(commits, "a")
        for body in ["b", "c", "d", "e"] { store.append(commits, body) }
        #expect(commits.waiting == 5)
        try await store.finishRunning()
        try await store.finishRunning()
        try await store.finishRunning()
        try await eventually("every answer") { store.log.withLockedValue { $0.count == 8 } }
        #expect(store.batches.withLockedValue { $0 } == [["a"], ["b", "c", "d"], ["e"]])
        #expect(store.log.withLockedValue { $0 } == [
            "observed a", "answered a",
            "observed b,c,d", "answered b", "answered c", "answered d",
            "observed e", "answered e",
        ])
        #expect(commits.waiting == 0)

        // Idle, then one more: committed by a transaction of its own.
        store.append(commits, "f")
        try await store.finishRunning()
        try await eventually("f answered") { store.log.withLockedValue { $0.last == "answered f" } }
        #expect(store.batches.withLockedValue { $0.last } == ["f"])
    }

    @Test func replaysAndFailuresAreAnsweredButNotObserved() async throws {
        let store = HeldCommits()
        let commits = Self.make(store, maxBatch: 10)
        try await store.appendFirst(commits, "first")
        store.append(commits, "new")
        store.append(commits, "again", requestId: "replay")
        store.append(commits, "lost", requestId: "fails")
        try await store.finishRunning()
        try await store.finishRunning()
        try await eventually("every answer") { store.log.withLockedValue { $0.count == 6 } }
        #expect(store.log.withLockedValue { $0 } == [
            "observed first", "answered first",
            "observed new", "answered new", "answered again", "answered lost STORE_UNAVAILABLE",
        ])
    }

    @Test func pastMaxPendingAnAppendIsRefusedAtOnceAndNeverStored() async throws {
        let store = HeldCommits()
        let commits = Self.make(store, maxPending: 2)
        try await store.appendFirst(commits, "a")
        store.append(commits, "b")
        store.append(commits, "c")
        store.append(commits, "d")
        // Refused before `append` returned: the answer is already there.
        #expect(store.log.withLockedValue { $0 } == ["answered d STORE_UNAVAILABLE"])
        #expect(commits.waiting == 3)
        try await store.finishRunning()
        try await store.finishRunning()
        try await eventually("every answer") { store.log.withLockedValue { $0.count == 6 } }
        #expect(store.batches.withLockedValue { $0 } == [["a"], ["b", "c"]])
        #expect(store.log.withLockedValue { $0 } == [
            "answered d STORE_UNAVAILABLE", "observed a", "answered a", "observed b,c", "answered b", "answered c",
        ])
    }

    /// Given an event loop, the committing task runs there — the commit function, a `withDeadline` under it
    /// (what the Postgres store's commit does) and the answers: no hand-off to Swift's task threads per batch.
    @Test func theCommittingTaskRunsOnTheLoopItIsGiven() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let seen = NIOLockedValueBox<[String]>([])
        let made = NIOLockedValueBox<GroupCommit?>(nil)
        let commits = GroupCommit { batch in
            let onLoop = loop.inEventLoop
            let executor = made.withLockedValue { $0 }?.executor
            let underDeadline = (try? await withDeadline(.seconds(5), on: executor) { loop.inEventLoop }) ?? false
            seen.withLockedValue { $0.append("commit \(onLoop), deadline \(underDeadline)") }
            return batch.map { .failure(ApiError(.storeUnavailable, "\($0.body)")) }
        }
        made.withLockedValue { $0 = commits }
        commits.commit(on: loop)
        for round in 0..<2 {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                commits.append(AppendRequest(channel: try! ChannelName(parsing: "topic:gc"), sender: "u", requestId: nil, body: "\(round)")) { _ in
                    seen.withLockedValue { $0.append("answered \(loop.inEventLoop)") }
                    done.resume()
                }
            }
        }
        #expect(seen.withLockedValue { $0 } == ["commit true, deadline true", "answered true", "commit true, deadline true", "answered true"])
        try await group.shutdownGracefully()
    }
}
