import Auth
import Foundation

/// Chat threads (PROTOCOL.md §4): create, list with unread counts, get, add and remove members, read
/// cursors. Every check goes through `Policy.can`.
public final class ThreadService: Sendable {
    public let store: any Store
    public let policy: Policy
    public static let maxTitleBytes = 200
    public static let maxMembers = 1000
    public static let maxUserBytes = 200

    /// Where additions and removals are announced (each member's `user:` channel).
    public let feed: UserFeed?

    public init(store: any Store, policy: Policy, feed: UserFeed? = nil) {
        self.store = store
        self.policy = policy
        self.feed = feed
    }

    static func validUser(_ value: Any?) throws(ApiError) -> String {
        guard let user = value as? String, !user.isEmpty, user.utf8.count <= maxUserBytes else {
            throw ApiError(.badRequest, "a user is a string of 1 to \(maxUserBytes) bytes")
        }
        return user
    }

    /// `{"title", "members"}`; the caller becomes a member.
    public func create(_ actor: Actor, title: Any?, members: Any?) async throws(ApiError) -> ChatThread {
        guard let title = title as? String, title.utf8.count <= Self.maxTitleBytes else {
            throw ApiError(.badRequest, "title must be a string of at most \(Self.maxTitleBytes) bytes")
        }
        var users: [String] = []
        if let members, !(members is NSNull) {
            guard let list = members as? [Any], list.count <= Self.maxMembers else {
                throw ApiError(.badRequest, "members must be an array of at most \(Self.maxMembers) users")
            }
            for item in list { users.append(try Self.validUser(item)) }
        }
        let now = Timestamp.nowMicros()
        let all = Array(Set(users + [actor.sub])).sorted()
        let thread = ChatThread(id: UUIDv7.make(micros: now), title: title, creator: actor.sub, createdAtMicros: now, members: all)
        try await store.createThread(thread)
        for user in all where user != actor.sub { try await feed?.threadAdded(thread, user: user, by: actor.sub) }
        return thread
    }

    /// The thread if it exists and `actor` may do `action` on it; 404 for a thread that does not exist, 403
    /// for one the actor may not touch.
    public func authorized(_ actor: Actor, _ action: Action, _ id: String) async throws(ApiError) -> ChatThread {
        let id = id.lowercased()
        guard ChannelName.isUUID(id), let thread = try await store.thread(id) else {
            throw ApiError(.notFound, "no such thread", details: ["thread": id])
        }
        guard policy.can(actor, action, .thread(id: id, isMember: thread.members.contains(actor.sub))) else {
            throw ApiError(.forbidden, "not allowed to \(action.rawValue) in this thread", details: ["thread": id])
        }
        return thread
    }

    public func list(_ actor: Actor) async throws(ApiError) -> [ThreadSummary] {
        try await store.threads(of: actor.sub)
    }

    public func addMember(_ actor: Actor, thread id: String, user: Any?) async throws(ApiError) -> ChatThread {
        let user = try Self.validUser(user)
        var thread = try await authorized(actor, .addMember, id)
        if try await store.addMember(user, to: thread.id) {
            thread.members.append(user)
            try await feed?.threadAdded(thread, user: user, by: actor.sub)
        }
        return thread
    }

    /// Removes `user`; returns the recorded removal (with the channel head at that moment).
    public func removeMember(_ actor: Actor, thread id: String, user: String) async throws(ApiError) -> MemberRemoval {
        let id = id.lowercased()
        guard ChannelName.isUUID(id), let thread = try await store.thread(id) else {
            throw ApiError(.notFound, "no such thread", details: ["thread": id])
        }
        guard policy.can(actor, .removeMember, .threadMember(thread: id, user: user, creator: thread.creator)) else {
            throw ApiError(.forbidden, "only the member themself, the thread's creator or an admin may remove a member", details: ["thread": id])
        }
        guard let removal = try await store.removeMember(user, from: id) else {
            throw ApiError(.notFound, "not a member of this thread", details: ["thread": id, "user": user])
        }
        try await feed?.threadRemoved(id, user: user, by: actor.sub)
        return removal
    }

    /// Moves the caller's read cursor forward (never back); returns the cursor in force and the unread count.
    public func markRead(_ actor: Actor, thread id: String, cursor text: Any?) async throws(ApiError) -> (cursor: String, unread: Int64) {
        let thread = try await authorized(actor, .moveReadCursor, id)
        guard let text = text as? String else { throw ApiError(.invalidCursor, "cursor must be a cursor string") }
        let cursor = try Cursor(parsing: text, for: thread.channel)
        let head = try await store.head(of: thread.channel)
        guard cursor.seq <= head else { throw ApiError(.invalidCursor, "cursor is past the end of the channel") }
        let (seq, unread) = try await store.moveReadCursor(of: actor.sub, in: thread.id, to: cursor.seq)
        return (Cursor.text(channel: thread.channel, seq: seq), unread)
    }

    public static func summaryJSON(_ summary: ThreadSummary) -> String {
        var thread = summary.thread.json
        thread.removeLast()
        return thread + ",\"last_message\":\(summary.lastMessage?.json ?? "null"),\"unread\":\(summary.unread),"
            + "\"read_cursor\":\"\(Cursor.text(channel: summary.thread.channel, seq: summary.readSeq))\"}"
    }
}
