import Auth

/// A chat thread: its channel is `thread:<id>`.
public struct ChatThread: Sendable, Equatable {
    public let id: String
    public let title: String
    public let creator: String
    public let createdAtMicros: Int64
    public var members: [String]

    public init(id: String, title: String, creator: String, createdAtMicros: Int64, members: [String]) {
        self.id = id
        self.title = title
        self.creator = creator
        self.createdAtMicros = createdAtMicros
        self.members = members
    }

    public var channel: ChannelName { ChannelName(thread: id) }

    public var json: String {
        "{\"id\":\(JSONText.quoted(id)),\"title\":\(JSONText.quoted(title)),\"creator\":\(JSONText.quoted(creator)),"
            + "\"created_at\":\"\(Timestamp.iso8601(micros: createdAtMicros))\",\"members\":[\(members.sorted().map(JSONText.quoted).joined(separator: ","))]}"
    }
}

/// One entry of `GET /v1/threads`: the thread, its last message, the caller's read position and unread count.
public struct ThreadSummary: Sendable {
    public let thread: ChatThread
    public let lastMessage: Message?
    public let readSeq: Int64
    public let unread: Int64
}

/// A member's removal from a thread: the channel's head at that moment is the cut for their live streams.
/// Kept for an hour, so that instances that missed the broadcast (Redis down) still act on it.
public struct MemberRemoval: Sendable, Equatable {
    public let id: String
    public let thread: String
    public let user: String
    public let head: Int64
    public let atMicros: Int64
    /// The thread's membership epoch this removal set (its removals so far, this one included).
    public let epoch: Int64

    public init(id: String, thread: String, user: String, head: Int64, atMicros: Int64, epoch: Int64 = 0) {
        self.epoch = epoch
        self.id = id
        self.thread = thread
        self.user = user
        self.head = head
        self.atMicros = atMicros
    }
}

/// Threads, memberships, read cursors and revocations: the rest of what the store keeps durably.
public protocol ThreadStore: Sendable {
    func createThread(_ thread: ChatThread) async throws(ApiError)
    /// The thread with its members; nil when it does not exist.
    func thread(_ id: String) async throws(ApiError) -> ChatThread?
    /// Whether `user` is a member, and the thread's membership epoch, read together (one snapshot): a stream
    /// opened on this answer must stop at any removal with a later epoch.
    func membership(of user: String, in thread: String) async throws(ApiError) -> (isMember: Bool, epoch: Int64)
    /// The removals from `thread` with an epoch in `epochs`: for each user removed, the lowest head (removals
    /// are kept for a day).
    func removalHeads(from thread: String, epochs: ClosedRange<Int64>) async throws(ApiError) -> [String: Int64]
    /// Threads `user` is a member of, oldest first.
    func threads(of user: String) async throws(ApiError) -> [ThreadSummary]
    /// False when `user` was a member already.
    func addMember(_ user: String, to thread: String) async throws(ApiError) -> Bool
    /// Removes `user` and records the removal with the thread channel's head at that moment (every message
    /// up to it was committed before the removal, every later one after); nil when `user` was not a member.
    func removeMember(_ user: String, from thread: String) async throws(ApiError) -> MemberRemoval?
    /// Removals recorded at or after `atMicros` (pruning forgets them after a day).
    func memberRemovals(since atMicros: Int64) async throws(ApiError) -> [MemberRemoval]
    /// Moves `user`'s read cursor to `seq` if that is forward; returns the cursor and the unread count.
    func moveReadCursor(of user: String, in thread: String, to seq: Int64) async throws(ApiError) -> (seq: Int64, unread: Int64)
    /// Every member of `thread` but `excluding`, with their unread count (messages after their read cursor
    /// sent by others), by user.
    func unreadCounts(in thread: String, excluding: String) async throws(ApiError) -> [(user: String, unread: Int64)]
    /// Stores a revocation (keeping the later `at` and `until` of a repeated one).
    func revoke(_ revocation: Revocation) async throws(ApiError)
    /// Every revocation still in force at `now` (seconds).
    func revocations(now: Int64) async throws(ApiError) -> [Revocation]
}

extension ThreadStore {
    /// Rows of `revocations` to values (kind text as stored).
    static func revocation(kind: String, value: String, at: Int64, until: Int64) -> Revocation? {
        Revocation.Kind(rawValue: kind).map { Revocation(kind: $0, value: value, at: at, until: until) }
    }
}
