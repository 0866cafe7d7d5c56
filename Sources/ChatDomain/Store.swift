/// What a publisher asks the store to append.
public struct AppendRequest: Sendable {
    public let channel: ChannelName
    public let sender: String
    public let requestId: String?
    /// Canonical JSON text of the body.
    public let body: String
    /// The sender must be a member of the channel's thread when the append commits: checked in its
    /// transaction, after any removal committed before it; refused with `403 FORBIDDEN`, storing nothing.
    public let senderMustBeMember: Bool

    public init(channel: ChannelName, sender: String, requestId: String?, body: String, senderMustBeMember: Bool = false) {
        precondition(!senderMustBeMember || channel.isThread, "only a thread has members")
        self.channel = channel
        self.sender = sender
        self.requestId = requestId
        self.body = body
        self.senderMustBeMember = senderMustBeMember
    }
}

extension AppendRequest {
    /// The answer when `senderMustBeMember` and the sender is not a member at the commit.
    var notAMember: GroupCommit.Outcome { .failure(.notAllowed(.publish, on: channel)) }

    /// The answer to this request when its request id already named `original`: a replay of it, or
    /// `409 IDEMPOTENCY_CONFLICT` when the body differs (both stores, within a batch or across batches).
    func replay(_ original: Message) -> GroupCommit.Outcome {
        guard original.body == body else {
            return .failure(ApiError(.idempotencyConflict, "this request id was used with a different body",
                                     details: ["request_id": requestId ?? "", "message_id": original.id]))
        }
        return .success(AppendResult(message: original, replayed: true))
    }
}

public struct AppendResult: Sendable {
    public let message: Message
    /// True when the request id repeated an earlier publish: nothing new was stored.
    public let replayed: Bool
}

/// A page of a channel, ascending by `seq`.
public struct Page: Sendable {
    public let messages: [Message]
    /// More messages exist past the page in the direction read (after it for `after`, before it for
    /// `before` and `latest`).
    public let hasMore: Bool

    public init(messages: [Message], hasMore: Bool) {
        self.messages = messages
        self.hasMore = hasMore
    }
}

/// The durable, ordered store of messages. Order is decided here, once: `seq` is gapless per channel and
/// `created_at` strictly increases with it.
public protocol Store: ThreadStore {
    /// Appends, commits, and only then returns. Committed messages are handed to the commit observer in
    /// `seq` order before the call returns.
    func append(_ request: AppendRequest) async throws(ApiError) -> AppendResult
    /// Messages with `seq > after`, ascending, at most `limit`.
    func messages(in channel: ChannelName, after: Int64, limit: Int) async throws(ApiError) -> Page
    /// Messages with `seq < before`, the `limit` nearest, ascending.
    func messages(in channel: ChannelName, before: Int64, limit: Int) async throws(ApiError) -> Page
    /// The seq of the last message of the channel; 0 when empty.
    func head(of channel: ChannelName) async throws(ApiError) -> Int64
    /// The heads of many channels in one query (the Hub's store polling and reconcile); channels without a
    /// message are absent or 0.
    func heads(of channels: [ChannelName]) async throws(ApiError) -> [String: Int64]
    /// The queue of appends in front of the store (group commit).
    var appends: GroupCommit { get }
    /// Where committed batches go (the bus), in commit order.
    func setCommitObserver(_ observer: @escaping CommitObserver) async
    /// Deletes the rows that cannot matter any more (run periodically): request ids older than the
    /// idempotency window, revocations past their `until` (no token they cover is still valid), member
    /// removals older than `removalWindow` (every instance has read them long before).
    func pruneExpired() async throws
    /// Applies `retention` to `channel`: raises the channel's floor (the newest seq no longer kept) to what
    /// the limits allow, then deletes the messages at or below it, `batch` rows per statement. Returns the
    /// rows deleted. Reads after a position below the floor fail with `CURSOR_EXPIRED` from then on: a reader
    /// never gets a page with a hole in it.
    func trim(_ channel: ChannelName, retention: Retention, batch: Int) async throws(ApiError) -> Int
    /// The channel's head and its floor (the newest seq no longer kept; 0: every message is), read together
    /// (one statement): where a stream may start.
    func bounds(of channel: ChannelName) async throws(ApiError) -> (head: Int64, floor: Int64)
    /// `bounds` when the store knows them without a read (the embedded store, see `KnownBounds`); else nil.
    func knownBounds(of channel: ChannelName) -> (head: Int64, floor: Int64)?
    /// Every channel whose name starts with `prefix` (retention of `thread:` channels).
    func channels(withPrefix prefix: String) async throws(ApiError) -> [ChannelName]
    /// Whether the store answers (readiness).
    func ping() async -> Bool
    func close() async
}

extension Store {
    public func knownBounds(of channel: ChannelName) -> (head: Int64, floor: Int64)? { nil }
}

/// Receives every committed batch of messages, in commit order, exactly once per commit.
public typealias CommitObserver = @Sendable ([Message]) -> Void
