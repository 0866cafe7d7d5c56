import Auth
import Logging
import PostgresNIO

/// Threads, members, read cursors and revocations in the cluster store.
extension PostgresStore {
    static let threadMigration = """
        CREATE TABLE threads (id TEXT PRIMARY KEY, title TEXT NOT NULL, creator TEXT NOT NULL, created_at BIGINT NOT NULL);
        CREATE TABLE thread_members (thread_id TEXT NOT NULL REFERENCES threads (id), user_id TEXT NOT NULL, added_at BIGINT NOT NULL,
            PRIMARY KEY (thread_id, user_id));
        CREATE INDEX thread_members_user ON thread_members (user_id, thread_id);
        CREATE TABLE read_cursors (thread_id TEXT NOT NULL, user_id TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (thread_id, user_id));
        CREATE TABLE revocations (kind TEXT NOT NULL, value TEXT NOT NULL, at BIGINT NOT NULL, until BIGINT NOT NULL,
            PRIMARY KEY (kind, value))
        """

    static let removalMigration = """
        CREATE TABLE member_removals (id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, user_id TEXT NOT NULL, head BIGINT NOT NULL, at BIGINT NOT NULL);
        CREATE INDEX member_removals_at ON member_removals (at)
        """

    /// Each thread channel counts its removals (`channels.member_epoch`); every message keeps the count at its
    /// commit, and every removal the count it set.
    static let membershipEpochMigration = """
        ALTER TABLE channels ADD COLUMN member_epoch BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN member_epoch BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE member_removals ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
        CREATE INDEX member_removals_epoch ON member_removals (thread_id, epoch)
        """

    /// Runs `body` (one statement or a transaction) within the read deadline; failures are 503.
    private func run<T: Sendable>(_ body: @escaping @Sendable (PostgresClient, Logger) async throws -> T) async throws(ApiError) -> T {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.commitDeadline) { try await body(client, logger) }
        } catch {
            logger.error("store request failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func createThread(_ thread: ChatThread) async throws(ApiError) {
        try await run { client, logger in
            try await client.withTransaction(logger: logger) { db in
                try await db.query("INSERT INTO threads (id, title, creator, created_at) VALUES (\(thread.id), \(thread.title), \(thread.creator), \(thread.createdAtMicros))", logger: logger)
                try await db.query("""
                    INSERT INTO thread_members (thread_id, user_id, added_at)
                    SELECT \(thread.id), m, \(thread.createdAtMicros) FROM unnest(\(thread.members)::text[]) AS m ON CONFLICT DO NOTHING
                    """, logger: logger)
            }
        }
    }

    static func members(_ id: String, _ db: PostgresClient, _ logger: Logger) async throws -> [String] {
        var members: [String] = []
        for try await user in try await db.query("SELECT user_id FROM thread_members WHERE thread_id = \(id) ORDER BY user_id", logger: logger).decode(String.self) {
            members.append(user)
        }
        return members
    }

    public func thread(_ id: String) async throws(ApiError) -> ChatThread? {
        try await run { client, logger in
            var found: ChatThread?
            for try await (title, creator, createdAt) in try await client.query("SELECT title, creator, created_at FROM threads WHERE id = \(id)", logger: logger).decode((String, String, Int64).self) {
                found = ChatThread(id: id, title: title, creator: creator, createdAtMicros: createdAt, members: [])
            }
            found?.members = try await Self.members(id, client, logger)
            return found
        }
    }

    public func membership(of user: String, in thread: String) async throws(ApiError) -> (isMember: Bool, epoch: Int64) {
        try await run { client, logger in
            var answer = (isMember: false, epoch: Int64(0))
            for try await (member, epoch) in try await client.query("""
                SELECT EXISTS (SELECT 1 FROM thread_members WHERE thread_id = \(thread) AND user_id = \(user)),
                       COALESCE((SELECT member_epoch FROM channels WHERE name = \("thread:" + thread)), 0)
                """, logger: logger).decode((Bool, Int64).self) {
                answer = (member, epoch)
            }
            return answer
        }
    }

    public func removalHeads(from thread: String, epochs: ClosedRange<Int64>) async throws(ApiError) -> [String: Int64] {
        try await run { client, logger in
            var heads: [String: Int64] = [:]
            for try await (user, head) in try await client.query("""
                SELECT user_id, min(head) FROM member_removals
                WHERE thread_id = \(thread) AND epoch BETWEEN \(epochs.lowerBound) AND \(epochs.upperBound) GROUP BY user_id
                """, logger: logger).decode((String, Int64).self) {
                heads[user] = head
            }
            return heads
        }
    }

    public func threads(of user: String) async throws(ApiError) -> [ThreadSummary] {
        let rows = try await run { client, logger in
            var rows: [(ChatThread, Int64, Int64)] = []
            let query: PostgresQuery = """
                SELECT t.id, t.title, t.creator, t.created_at, COALESCE(r.seq, 0),
                    (SELECT count(*) FROM messages m WHERE m.channel = 'thread:' || t.id AND m.seq > COALESCE(r.seq, 0) AND m.sender <> \(user))
                FROM thread_members tm JOIN threads t ON t.id = tm.thread_id
                LEFT JOIN read_cursors r ON r.thread_id = t.id AND r.user_id = \(user)
                WHERE tm.user_id = \(user) ORDER BY t.created_at, t.id
                """
            for try await (id, title, creator, createdAt, readSeq, unread) in try await client.query(query, logger: logger).decode((String, String, String, Int64, Int64, Int64).self) {
                rows.append((ChatThread(id: id, title: title, creator: creator, createdAtMicros: createdAt, members: []), readSeq, unread))
            }
            for i in rows.indices { rows[i].0.members = try await Self.members(rows[i].0.id, client, logger) }
            return rows
        }
        var out: [ThreadSummary] = []
        for (thread, readSeq, unread) in rows {
            let last = try await messages(in: thread.channel, before: Int64.max, limit: 1).messages.first
            out.append(ThreadSummary(thread: thread, lastMessage: last, readSeq: readSeq, unread: unread))
        }
        return out
    }

    public func addMember(_ user: String, to thread: String) async throws(ApiError) -> Bool {
        try await run { client, logger in
            var added = false
            let now = Timestamp.nowMicros()
            for try await _ in try await client.query("""
                INSERT INTO thread_members (thread_id, user_id, added_at) VALUES (\(thread), \(user), \(now))
                ON CONFLICT DO NOTHING RETURNING 1
                """, logger: logger).decode(Int.self) {
                added = true
            }
            return added
        }
    }

    public func removeMember(_ user: String, from thread: String) async throws(ApiError) -> MemberRemoval? {
        try await run { client, logger in
            try await client.withTransaction(logger: logger) { db in
                var removed = false
                for try await _ in try await db.query("DELETE FROM thread_members WHERE thread_id = \(thread) AND user_id = \(user) RETURNING 1", logger: logger).decode(Int.self) {
                    removed = true
                }
                guard removed else { return nil }
                // Lock the channel's row as a publish does: every message is committed either before the
                // removal (seq ≤ the head read here, epoch below this one) or after it (with this epoch or later).
                var head: Int64 = 0
                var epoch: Int64 = 0
                let channel = "thread:" + thread
                for try await (seq, newEpoch) in try await db.query("""
                    INSERT INTO channels AS c (name, last_seq, last_created_at, member_epoch) VALUES (\(channel), 0, 0, 1)
                    ON CONFLICT (name) DO UPDATE SET member_epoch = c.member_epoch + 1 RETURNING last_seq, member_epoch
                    """, logger: logger).decode((Int64, Int64).self) {
                    (head, epoch) = (seq, newEpoch)
                }
                let now = Timestamp.nowMicros()
                let removal = MemberRemoval(id: UUIDv7.make(micros: now), thread: thread, user: user, head: head, atMicros: now, epoch: epoch)
                try await db.query("""
                    INSERT INTO member_removals (id, thread_id, user_id, head, at, epoch) VALUES (\(removal.id), \(thread), \(user), \(head), \(now), \(epoch))
                    """, logger: logger)
                return removal
            }
        }
    }

    public func memberRemovals(since atMicros: Int64) async throws(ApiError) -> [MemberRemoval] {
        try await run { client, logger in
            var out: [MemberRemoval] = []
            for try await (id, thread, user, head, at, epoch) in try await client.query(
                "SELECT id, thread_id, user_id, head, at, epoch FROM member_removals WHERE at >= \(atMicros) ORDER BY at", logger: logger
            ).decode((String, String, String, Int64, Int64, Int64).self) {
                out.append(MemberRemoval(id: id, thread: thread, user: user, head: head, atMicros: at, epoch: epoch))
            }
            return out
        }
    }

    public func unreadCounts(in thread: String, excluding: String) async throws(ApiError) -> [(user: String, unread: Int64)] {
        try await run { client, logger in
            var out: [(user: String, unread: Int64)] = []
            let query: PostgresQuery = """
                SELECT tm.user_id,
                    (SELECT count(*) FROM messages m WHERE m.channel = 'thread:' || tm.thread_id AND m.seq > COALESCE(r.seq, 0) AND m.sender <> tm.user_id)
                FROM thread_members tm LEFT JOIN read_cursors r ON r.thread_id = tm.thread_id AND r.user_id = tm.user_id
                WHERE tm.thread_id = \(thread) AND tm.user_id <> \(excluding) ORDER BY tm.user_id
                """
            for try await (user, unread) in try await client.query(query, logger: logger).decode((String, Int64).self) { out.append((user, unread)) }
            return out
        }
    }

    public func moveReadCursor(of user: String, in thread: String, to seq: Int64) async throws(ApiError) -> (seq: Int64, unread: Int64) {
        try await run { client, logger in
            var result: (Int64, Int64) = (0, 0)
            let channel = "thread:" + thread
            for try await (cursor, unread) in try await client.query("""
                WITH moved AS (
                    INSERT INTO read_cursors (thread_id, user_id, seq) VALUES (\(thread), \(user), \(seq))
                    ON CONFLICT (thread_id, user_id) DO UPDATE SET seq = GREATEST(read_cursors.seq, excluded.seq) RETURNING seq)
                SELECT moved.seq, (SELECT count(*) FROM messages m WHERE m.channel = \(channel) AND m.seq > moved.seq AND m.sender <> \(user)) FROM moved
                """, logger: logger).decode((Int64, Int64).self) {
                result = (cursor, unread)
            }
            return result
        }
    }

    public func revoke(_ revocation: Revocation) async throws(ApiError) {
        try await run { client, logger in
            try await client.query("""
                INSERT INTO revocations (kind, value, at, until) VALUES (\(revocation.kind.rawValue), \(revocation.value), \(revocation.at), \(revocation.until))
                ON CONFLICT (kind, value) DO UPDATE SET at = GREATEST(revocations.at, excluded.at), until = GREATEST(revocations.until, excluded.until)
                """, logger: logger)
        }
    }

    public func revocations(now: Int64) async throws(ApiError) -> [Revocation] {
        try await run { client, logger in
            var out: [Revocation] = []
            for try await (kind, value, at, until) in try await client.query("SELECT kind, value, at, until FROM revocations WHERE until > \(now)", logger: logger).decode((String, String, Int64, Int64).self) {
                if let r = Self.revocation(kind: kind, value: value, at: at, until: until) { out.append(r) }
            }
            return out
        }
    }
}
