import Auth
import SQLiteNIO

/// Threads, members, read cursors and revocations in the embedded store. Writes go through their own
/// connection (`directory`): SQLite's write lock orders them with the message commits, and they never land
/// inside a message batch's transaction.
extension SQLiteStore {
    static let threadMigration = """
        CREATE TABLE threads (id TEXT PRIMARY KEY, title TEXT NOT NULL, creator TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE thread_members (thread_id TEXT NOT NULL, user_id TEXT NOT NULL, added_at INTEGER NOT NULL,
            PRIMARY KEY (thread_id, user_id)) WITHOUT ROWID;
        CREATE INDEX thread_members_user ON thread_members (user_id, thread_id);
        CREATE TABLE read_cursors (thread_id TEXT NOT NULL, user_id TEXT NOT NULL, seq INTEGER NOT NULL,
            PRIMARY KEY (thread_id, user_id)) WITHOUT ROWID;
        CREATE TABLE revocations (kind TEXT NOT NULL, value TEXT NOT NULL, at INTEGER NOT NULL, until INTEGER NOT NULL,
            PRIMARY KEY (kind, value)) WITHOUT ROWID
        """

    static let removalMigration = """
        CREATE TABLE member_removals (id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, user_id TEXT NOT NULL, head INTEGER NOT NULL,
            at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE INDEX member_removals_at ON member_removals (at)
        """

    /// Each thread channel counts its removals (`channels.member_epoch`); every message keeps the count at its
    /// commit, and every removal the count it set.
    static let membershipEpochMigration = """
        ALTER TABLE channels ADD COLUMN member_epoch INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN member_epoch INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE member_removals ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX member_removals_epoch ON member_removals (thread_id, epoch)
        """

    /// Runs `body` in one write transaction on the directory connection, one transaction at a time (two
    /// callers must not interleave their statements on the one connection).
    nonisolated func write<T: Sendable>(_ body: @Sendable (SQLiteConnection) async throws -> T) async throws(ApiError) -> T {
        let db = directory
        do {
            return try await directoryWrites.run {
                _ = try await db.query("BEGIN IMMEDIATE")
                do {
                    let result = try await body(db)
                    _ = try await db.query("COMMIT")
                    return result
                } catch {
                    _ = try? await db.query("ROLLBACK")
                    throw error
                }
            }
        } catch let error as ApiError {
            throw error
        } catch {
            logger.error("store write failed", metadata: ["error": "\(error)"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    private nonisolated func query(_ sql: String, _ binds: [SQLiteData]) async throws(ApiError) -> [SQLiteRow] {
        do {
            return try await reader.query(sql, binds)
        } catch {
            logger.error("store read failed", metadata: ["error": "\(error)"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public nonisolated func createThread(_ thread: ChatThread) async throws(ApiError) {
        try await write { db in
            _ = try await db.query("INSERT INTO threads (id, title, creator, created_at) VALUES (?, ?, ?, ?)",
                                   [.text(thread.id), .text(thread.title), .text(thread.creator), .integer(Int(thread.createdAtMicros))])
            for member in thread.members {
                _ = try await db.query("INSERT OR IGNORE INTO thread_members (thread_id, user_id, added_at) VALUES (?, ?, ?)",
                                       [.text(thread.id), .text(member), .integer(Int(thread.createdAtMicros))])
            }
        }
    }

    public nonisolated func thread(_ id: String) async throws(ApiError) -> ChatThread? {
        guard let row = try await query("SELECT title, creator, created_at FROM threads WHERE id = ?", [.text(id)]).first else { return nil }
        let members = try await query("SELECT user_id FROM thread_members WHERE thread_id = ? ORDER BY user_id", [.text(id)])
        return ChatThread(id: id, title: row.column("title")?.string ?? "", creator: row.column("creator")?.string ?? "",
                          createdAtMicros: Int64(row.column("created_at")?.integer ?? 0),
                          members: members.compactMap { $0.column("user_id")?.string })
    }

    public nonisolated func threads(of user: String) async throws(ApiError) -> [ThreadSummary] {
        let rows = try await query("""
            SELECT t.id, t.title, t.creator, t.created_at, COALESCE(r.seq, 0) AS read_seq,
                (SELECT count(*) FROM messages m WHERE m.channel = 'thread:' || t.id AND m.seq > COALESCE(r.seq, 0) AND m.sender <> ?1) AS unread
            FROM thread_members tm JOIN threads t ON t.id = tm.thread_id
            LEFT JOIN read_cursors r ON r.thread_id = t.id AND r.user_id = ?1
            WHERE tm.user_id = ?1 ORDER BY t.created_at, t.id
            """, [.text(user)])
        var out: [ThreadSummary] = []
        for row in rows {
            let id = row.column("id")?.string ?? ""
            let members = try await query("SELECT user_id FROM thread_members WHERE thread_id = ? ORDER BY user_id", [.text(id)])
            let thread = ChatThread(id: id, title: row.column("title")?.string ?? "", creator: row.column("creator")?.string ?? "",
                                    createdAtMicros: Int64(row.column("created_at")?.integer ?? 0),
                                    members: members.compactMap { $0.column("user_id")?.string })
            let last = try await messages(in: thread.channel, before: Int64.max, limit: 1).messages.first
            out.append(ThreadSummary(thread: thread, lastMessage: last, readSeq: Int64(row.column("read_seq")?.integer ?? 0),
                                     unread: Int64(row.column("unread")?.integer ?? 0)))
        }
        return out
    }

    public nonisolated func unreadCounts(in thread: String, excluding: String) async throws(ApiError) -> [(user: String, unread: Int64)] {
        let rows = try await query("""
            SELECT tm.user_id AS user_id,
                (SELECT count(*) FROM messages m WHERE m.channel = 'thread:' || tm.thread_id AND m.seq > COALESCE(r.seq, 0) AND m.sender <> tm.user_id) AS unread
            FROM thread_members tm LEFT JOIN read_cursors r ON r.thread_id = tm.thread_id AND r.user_id = tm.user_id
            WHERE tm.thread_id = ?1 AND tm.user_id <> ?2 ORDER BY tm.user_id
            """, [.text(thread), .text(excluding)])
        return rows.map { ($0.column("user_id")?.string ?? "", Int64($0.column("unread")?.integer ?? 0)) }
    }

    public nonisolated func addMember(_ user: String, to thread: String) async throws(ApiError) -> Bool {
        try await write { db in
            let before = try await db.query("SELECT 1 FROM thread_members WHERE thread_id = ? AND user_id = ?", [.text(thread), .text(user)])
            guard before.isEmpty else { return false }
            _ = try await db.query("INSERT INTO thread_members (thread_id, user_id, added_at) VALUES (?, ?, ?)",
                                   [.text(thread), .text(user), .integer(Int(Timestamp.nowMicros()))])
            return true
        }
    }

    public nonisolated func removeMember(_ user: String, from thread: String) async throws(ApiError) -> MemberRemoval? {
        try await write { db in
            let before = try await db.query("SELECT 1 FROM thread_members WHERE thread_id = ? AND user_id = ?", [.text(thread), .text(user)])
            guard !before.isEmpty else { return nil }
            _ = try await db.query("DELETE FROM thread_members WHERE thread_id = ? AND user_id = ?", [.text(thread), .text(user)])
            // The write lock is held: no message commits between this read and the removal's commit (each one is
            // before it, with a lower epoch, or after it, with this epoch or later).
            _ = try await db.query("""
                INSERT INTO channels (name, last_seq, last_created_at, member_epoch) VALUES (?, 0, 0, 1)
                ON CONFLICT(name) DO UPDATE SET member_epoch = member_epoch + 1
                """, [.text("thread:" + thread)])
            let rows = try await db.query("SELECT last_seq, member_epoch FROM channels WHERE name = ?", [.text("thread:" + thread)])
            let now = Timestamp.nowMicros()
            let removal = MemberRemoval(id: UUIDv7.make(micros: now), thread: thread, user: user,
                                        head: Int64(rows.first?.column("last_seq")?.integer ?? 0), atMicros: now,
                                        epoch: Int64(rows.first?.column("member_epoch")?.integer ?? 0))
            _ = try await db.query("INSERT INTO member_removals (id, thread_id, user_id, head, at, epoch) VALUES (?, ?, ?, ?, ?, ?)",
                                   [.text(removal.id), .text(thread), .text(user), .integer(Int(removal.head)), .integer(Int(now)),
                                    .integer(Int(removal.epoch))])
            return removal
        }
    }

    public nonisolated func memberRemovals(since atMicros: Int64) async throws(ApiError) -> [MemberRemoval] {
        try await query("SELECT id, thread_id, user_id, head, at, epoch FROM member_removals WHERE at >= ? ORDER BY at", [.integer(Int(atMicros))]).map { row in
            MemberRemoval(id: row.column("id")?.string ?? "", thread: row.column("thread_id")?.string ?? "", user: row.column("user_id")?.string ?? "",
                          head: Int64(row.column("head")?.integer ?? 0), atMicros: Int64(row.column("at")?.integer ?? 0),
                          epoch: Int64(row.column("epoch")?.integer ?? 0))
        }
    }

    public nonisolated func membership(of user: String, in thread: String) async throws(ApiError) -> (isMember: Bool, epoch: Int64) {
        let rows = try await query("""
            SELECT EXISTS (SELECT 1 FROM thread_members WHERE thread_id = ?1 AND user_id = ?2) AS member,
                   COALESCE((SELECT member_epoch FROM channels WHERE name = 'thread:' || ?1), 0) AS epoch
            """, [.text(thread), .text(user)])
        return (rows.first?.column("member")?.integer == 1, Int64(rows.first?.column("epoch")?.integer ?? 0))
    }

    public nonisolated func removalHeads(from thread: String, epochs: ClosedRange<Int64>) async throws(ApiError) -> [String: Int64] {
        let rows = try await query("""
            SELECT user_id, min(head) AS head FROM member_removals WHERE thread_id = ? AND epoch BETWEEN ? AND ? GROUP BY user_id
            """, [.text(thread), .integer(Int(epochs.lowerBound)), .integer(Int(epochs.upperBound))])
        var heads: [String: Int64] = [:]
        for row in rows {
            if let user = row.column("user_id")?.string, let head = row.column("head")?.integer { heads[user] = Int64(head) }
        }
        return heads
    }

    public nonisolated func moveReadCursor(of user: String, in thread: String, to seq: Int64) async throws(ApiError) -> (seq: Int64, unread: Int64) {
        try await write { db in
            _ = try await db.query("""
                INSERT INTO read_cursors (thread_id, user_id, seq) VALUES (?1, ?2, ?3)
                ON CONFLICT (thread_id, user_id) DO UPDATE SET seq = max(seq, excluded.seq)
                """, [.text(thread), .text(user), .integer(Int(seq))])
            let rows = try await db.query("""
                SELECT r.seq, (SELECT count(*) FROM messages m WHERE m.channel = 'thread:' || ?1 AND m.seq > r.seq AND m.sender <> ?2) AS unread
                FROM read_cursors r WHERE r.thread_id = ?1 AND r.user_id = ?2
                """, [.text(thread), .text(user)])
            return (Int64(rows.first?.column("seq")?.integer ?? 0), Int64(rows.first?.column("unread")?.integer ?? 0))
        }
    }

    public nonisolated func revoke(_ revocation: Revocation) async throws(ApiError) {
        try await write { db in
            _ = try await db.query("""
                INSERT INTO revocations (kind, value, at, until) VALUES (?, ?, ?, ?)
                ON CONFLICT (kind, value) DO UPDATE SET at = max(at, excluded.at), until = max(until, excluded.until)
                """, [.text(revocation.kind.rawValue), .text(revocation.value), .integer(Int(revocation.at)), .integer(Int(revocation.until))])
        }
    }

    public nonisolated func revocations(now: Int64) async throws(ApiError) -> [Revocation] {
        try await query("SELECT kind, value, at, until FROM revocations WHERE until > ?", [.integer(Int(now))]).compactMap { row in
            Self.revocation(kind: row.column("kind")?.string ?? "", value: row.column("value")?.string ?? "",
                            at: Int64(row.column("at")?.integer ?? 0), until: Int64(row.column("until")?.integer ?? 0))
        }
    }
}
