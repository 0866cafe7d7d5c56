import Foundation
import Logging

/// Writes each user's personal channel `user:<sub>` (durable and ordered like any channel): `thread_added` and
/// `thread_removed` when the user joins or leaves a thread, and `unread` with the new count when one of their
/// threads gets a message from someone else.
///
/// Additions and removals are written before the thread API answers. Unread events are written after the
/// message's ack, by one worker: messages of one thread that arrive while it works are announced together
/// (each member once, with the count after all of them), and at most `maxPendingThreads` threads wait —
/// past it the oldest waiting thread's announcement is dropped and counted (its counts stay right in
/// `GET /v1/threads`).
public final class UserFeed: Sendable {
    public static let sender = "gateway"
    public static let maxPendingThreads = 10_000

    private let store: any Store
    private let logger: Logger
    private let work: FeedWork

    public init(store: any Store, logger: Logger) {
        self.store = store
        self.logger = logger
        self.work = FeedWork()
    }

    /// Appends `body` (a JSON object's text) to `user`'s channel; a user whose sub cannot name one is skipped.
    func post(to user: String, _ body: String) async throws(ApiError) {
        guard let channel = ChannelName(user: user) else { return }
        _ = try await store.append(AppendRequest(channel: channel, sender: Self.sender, requestId: nil, body: body))
    }

    func threadAdded(_ thread: ChatThread, user: String, by actor: String) async throws(ApiError) {
        try await post(to: user, "{\"by\":\(JSONText.quoted(actor)),\"thread\":\(JSONText.quoted(thread.id)),\"title\":\(JSONText.quoted(thread.title)),\"type\":\"thread_added\"}")
    }

    func threadRemoved(_ thread: String, user: String, by actor: String) async throws(ApiError) {
        try await post(to: user, "{\"by\":\(JSONText.quoted(actor)),\"thread\":\(JSONText.quoted(thread)),\"type\":\"thread_removed\"}")
    }

    /// A message was committed in `thread` by `sender`: every other member hears of the new unread count.
    public func messagePosted(in thread: String, by sender: String, message: Message) {
        guard sender != Self.sender else { return }
        let start = work.add(thread: thread, sender: sender, message: message)
        guard start else { return }
        Task { await self.drain() }
    }

    /// Announces waiting threads until none is left (one worker at a time).
    private func drain() async {
        while let (thread, batch) = work.next() {
            do {
                for (user, unread) in try await store.unreadCounts(in: thread, excluding: "") {
                    // Only messages from someone else concern a member.
                    guard let last = batch.lastBySomeoneOtherThan(user) else { continue }
                    try await post(to: user, "{\"message_id\":\(JSONText.quoted(last.id)),\"seq\":\(last.seq),\"thread\":\(JSONText.quoted(thread)),\"type\":\"unread\",\"unread\":\(unread)}")
                }
            } catch {
                logger.warning("could not announce unread counts", metadata: ["thread": "\(thread)", "error": "\(error)"])
            }
        }
    }

    /// Threads dropped from the waiting list (over `maxPendingThreads`).
    public var droppedAnnouncements: Int { work.dropped }
}

/// The messages of one thread waiting to be announced: the last one of each sender.
struct FeedBatch: Sendable {
    var lastBySender: [String: Message] = [:]

    func lastBySomeoneOtherThan(_ user: String) -> Message? {
        lastBySender.filter { $0.key != user }.values.max { $0.seq < $1.seq }
    }
}

/// The waiting threads, in arrival order, and whether the worker runs.
final class FeedWork: @unchecked Sendable {  // guarded by `lock`
    private let lock = NSLock()
    private var order: [String] = []
    private var batches: [String: FeedBatch] = [:]
    private var running = false
    private(set) var droppedCount = 0

    var dropped: Int { lock.withLock { droppedCount } }

    /// Adds a message; true when the caller must start the worker.
    func add(thread: String, sender: String, message: Message) -> Bool {
        lock.withLock {
            if batches[thread] == nil {
                if order.count >= UserFeed.maxPendingThreads {
                    batches[order.removeFirst()] = nil
                    droppedCount += 1
                }
                order.append(thread)
                batches[thread] = FeedBatch()
            }
            batches[thread]!.lastBySender[sender] = message
            if running { return false }
            running = true
            return true
        }
    }

    /// The next waiting thread; nil (and the worker stops) when none is left.
    func next() -> (String, FeedBatch)? {
        lock.withLock {
            guard !order.isEmpty else {
                running = false
                return nil
            }
            let thread = order.removeFirst()
            return (thread, batches.removeValue(forKey: thread)!)
        }
    }
}
