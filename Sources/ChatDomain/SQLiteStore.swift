import Foundation
import Logging
import NIOCore
import NIOPosix
import SQLiteNIO

/// The embedded store: one SQLite file in WAL mode. All appends go through this actor, which commits
/// whatever has queued up while the previous transaction ran as one transaction (group commit): one fsync
/// for many publishes, and no publisher is answered before its transaction committed.
public actor SQLiteStore: Store {
    private static let maxBatch = 512

    private let writer: SQLiteConnection
    nonisolated let reader: SQLiteConnection
    /// Thread, member, read-cursor and revocation writes (see SQLiteStore+Threads).
    nonisolated let directory: SQLiteConnection
    /// The directory connection's write transactions, one at a time.
    nonisolated let directoryWrites = SerialAccess()
    nonisolated let logger: Logger
    /// How long a request id is remembered (PROTOCOL.md: 24 hours).
    private let idempotencyWindow: Int64
    public nonisolated let appends: GroupCommit

    private struct Head { var seq: Int64; var createdAt: Int64 }
    private var heads: [ChannelName: Head] = [:]

    public static func open(path: String, maxPending: Int = 20_000, idempotencyWindow: Duration = .seconds(24 * 3600), logger: Logger) async throws -> SQLiteStore {
        let loop = MultiThreadedEventLoopGroup.singleton.any()
        let writer = try await SQLiteConnection.open(storage: .file(path: path), threadPool: .singleton, logger: logger, on: loop)
        _ = try await writer.query("PRAGMA journal_mode=WAL")
        _ = try await writer.query("PRAGMA synchronous=FULL")
        _ = try await writer.query("PRAGMA busy_timeout=5000")
        try await Self.migrate(writer)
        let reader = try await SQLiteConnection.open(storage: .file(path: path), threadPool: .singleton, logger: logger, on: loop)
        let directory = try await SQLiteConnection.open(storage: .file(path: path), threadPool: .singleton, logger: logger, on: loop)
        _ = try await directory.query("PRAGMA synchronous=FULL")
        _ = try await directory.query("PRAGMA busy_timeout=5000")
        let store = SQLiteStore(writer: writer, reader: reader, directory: directory, maxPending: maxPending, idempotencyWindow: idempotencyWindow, logger: logger)
        // Pruning is housekeeping: a failure here is logged, and what matters (migrations, revocations) fails on its own.
        do { try await store.pruneExpired() } catch { logger.warning("pruning expired rows failed", metadata: ["error": "\(String(reflecting: error))"]) }
        return store
    }

    private init(writer: SQLiteConnection, reader: SQLiteConnection, directory: SQLiteConnection, maxPending: Int, idempotencyWindow: Duration, logger: Logger) {
        self.writer = writer
        self.reader = reader
        self.directory = directory
        self.logger = logger
        self.idempotencyWindow = idempotencyWindow.components.seconds * 1_000_000 + idempotencyWindow.components.attoseconds / 1_000_000_000_000
        let box = WeakBox<SQLiteStore>()
        self.appends = GroupCommit(maxPending: maxPending) { requests in
            guard let store = box.value else { return requests.map { _ in .failure(ApiError(.storeUnavailable, "the store is closed")) } }
            return await store.commit(requests)
        }
        box.value = self
    }

    public nonisolated func setCommitObserver(_ observer: @escaping CommitObserver) async {
        await appends.setObserver(observer)
    }

    static let migrations: [String] = [
        """
        CREATE TABLE channels (name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, last_created_at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE messages (
            channel TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, created_at INTEGER NOT NULL,
            sender TEXT NOT NULL, request_id TEXT, body TEXT NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID;
        CREATE TABLE idempotency (
            channel TEXT NOT NULL, sender TEXT NOT NULL, request_id TEXT NOT NULL, seq INTEGER NOT NULL,
            created_at INTEGER NOT NULL, PRIMARY KEY (channel, sender, request_id)) WITHOUT ROWID;
        CREATE INDEX idempotency_created_at ON idempotency (created_at);
        """,
        threadMigration,
        removalMigration,
        "ALTER TABLE channels ADD COLUMN floor_seq INTEGER NOT NULL DEFAULT 0",
        membershipEpochMigration,
    ]

    /// Applies the migrations past `PRAGMA user_version`, each in its own transaction.
    static func migrate(_ db: SQLiteConnection) async throws {
        let version = try await db.query("PRAGMA user_version").first?.column("user_version")?.integer ?? 0
        for (index, script) in migrations.enumerated() where index >= version {
            _ = try await db.query("BEGIN IMMEDIATE")
            do {
                for statement in script.split(separator: ";") where !statement.allSatisfy(\.isWhitespace) {
                    _ = try await db.query(String(statement))
                }
                _ = try await db.query("PRAGMA user_version = \(index + 1)")
                _ = try await db.query("COMMIT")
            } catch {
                _ = try? await db.query("ROLLBACK")
                throw error
            }
        }
    }

    public func pruneExpired() async throws {
        let now = Timestamp.nowMicros()
        _ = try await writer.query("DELETE FROM idempotency WHERE created_at < ?", [.integer(Int(now - idempotencyWindow))])
        try await write { db in
            _ = try await db.query("DELETE FROM revocations WHERE until <= ?", [.integer(Int(now / 1_000_000))])
            _ = try await db.query("DELETE FROM member_removals WHERE at < ?", [.integer(Int(now - removalWindowMicros))])
        }
    }

    // MARK: append (one transaction per batch)

    public nonisolated func append(_ request: AppendRequest) async throws(ApiError) -> AppendResult {
        try await appends.append(request)
    }

    private enum Outcome { case stored(Message), replayed(Message), failed(ApiError) }

    private func commit(_ batch: [AppendRequest]) async -> [GroupCommit.Outcome] {
        var outcomes: [Outcome] = []
        outcomes.reserveCapacity(batch.count)
        var touched: [ChannelName: Head] = [:]
        var epochs: [ChannelName: Int64] = [:]
        do {
            _ = try await writer.query("BEGIN IMMEDIATE")
            let now = Timestamp.nowMicros()
            for request in batch {
                outcomes.append(try await appendInTransaction(request, now: now, touched: &touched, epochs: &epochs))
            }
            for (channel, head) in touched {
                _ = try await writer.query(
                    "INSERT INTO channels (name, last_seq, last_created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET last_seq = excluded.last_seq, last_created_at = excluded.last_created_at",
                    [.text(channel.rawValue), .integer(Int(head.seq)), .integer(Int(head.createdAt))])
            }
            _ = try await writer.query("COMMIT")
        } catch {
            logger.error("store commit failed", metadata: ["error": "\(error)"])
            _ = try? await writer.query("ROLLBACK")
            for channel in touched.keys { heads[channel] = nil }
            let failure = ApiError(.storeUnavailable, "the store did not commit the message")
            return batch.map { _ in .failure(failure) }
        }
        for (channel, head) in touched { heads[channel] = head }
        return outcomes.map { outcome in
            switch outcome {
            case .stored(let m): .success(AppendResult(message: m, replayed: false))
            case .replayed(let m): .success(AppendResult(message: m, replayed: true))
            case .failed(let e): .failure(e)
            }
        }
    }

    private func appendInTransaction(_ request: AppendRequest, now: Int64, touched: inout [ChannelName: Head],
                                     epochs: inout [ChannelName: Int64]) async throws -> Outcome {
        let channel = request.channel
        if let requestId = request.requestId {
            let rows = try await writer.query(
                """
                SELECT i.seq AS key_seq, m.id, m.seq, m.created_at, m.sender, m.request_id, m.body FROM idempotency i
                LEFT JOIN messages m ON m.channel = i.channel AND m.seq = i.seq
                WHERE i.channel = ? AND i.sender = ? AND i.request_id = ? AND i.created_at >= ?
                """,
                [.text(channel.rawValue), .text(request.sender), .text(requestId), .integer(Int(now - idempotencyWindow))])
            if let row = rows.first {
                guard row.column("id")?.string != nil else { return .failed(Retention.replayOfRemoved(requestId, seq: Int64(row.column("key_seq")?.integer ?? 0))) }
                let original = Self.message(from: row, channel: channel)
                if original.body == request.body { return .replayed(original) }
                return .failed(ApiError(.idempotencyConflict, "this request id was used with a different body",
                                        details: ["request_id": requestId, "message_id": original.id]))
            }
        }
        var head: Head
        if let known = touched[channel] ?? heads[channel] {
            head = known
        } else {
            let rows = try await writer.query("SELECT last_seq, last_created_at FROM channels WHERE name = ?", [.text(channel.rawValue)])
            head = Head(seq: Int64(rows.first?.column("last_seq")?.integer ?? 0), createdAt: Int64(rows.first?.column("last_created_at")?.integer ?? 0))
        }
        // A thread's membership epoch, read in this transaction (removals write it on the directory connection).
        var epoch: Int64 = 0
        if case .thread = channel.kind {
            if let known = epochs[channel] {
                epoch = known
            } else {
                let rows = try await writer.query("SELECT member_epoch FROM channels WHERE name = ?", [.text(channel.rawValue)])
                epoch = Int64(rows.first?.column("member_epoch")?.integer ?? 0)
                epochs[channel] = epoch
            }
        }
        head.seq += 1
        head.createdAt = max(now, head.createdAt + 1)
        let id = UUIDv7.make(micros: head.createdAt)
        _ = try await writer.query(
            "INSERT INTO messages (channel, seq, id, created_at, sender, request_id, body, member_epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [.text(channel.rawValue), .integer(Int(head.seq)), .text(id), .integer(Int(head.createdAt)), .text(request.sender),
             request.requestId.map { .text($0) } ?? .null, .text(request.body), .integer(Int(epoch))])
        if let requestId = request.requestId {
            _ = try await writer.query(
                "INSERT OR REPLACE INTO idempotency (channel, sender, request_id, seq, created_at) VALUES (?, ?, ?, ?, ?)",
                [.text(channel.rawValue), .text(request.sender), .text(requestId), .integer(Int(head.seq)), .integer(Int(now))])
        }
        touched[channel] = head
        return .stored(Message(id: id, channel: channel, seq: head.seq, createdAtMicros: head.createdAt, sender: request.sender,
                               requestId: request.requestId, body: request.body, membershipEpoch: epoch))
    }

    // MARK: reads (on a second connection, so they never wait behind a commit)

    private static let columns = "id, seq, created_at, sender, request_id, body, member_epoch"

    static func message(from row: SQLiteRow, channel: ChannelName) -> Message {
        Message(id: row.column("id")?.string ?? "", channel: channel, seq: Int64(row.column("seq")?.integer ?? 0),
                createdAtMicros: Int64(row.column("created_at")?.integer ?? 0), sender: row.column("sender")?.string ?? "",
                requestId: row.column("request_id")?.string, body: row.column("body")?.string ?? "{}",
                membershipEpoch: Int64(row.column("member_epoch")?.integer ?? 0))
    }

    private nonisolated func read(_ sql: String, _ binds: [SQLiteData]) async throws(ApiError) -> [SQLiteRow] {
        do {
            return try await reader.query(sql, binds)
        } catch {
            logger.error("store read failed", metadata: ["error": "\(error)"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public nonisolated func messages(in channel: ChannelName, after: Int64, limit: Int) async throws(ApiError) -> Page {
        // The channel's floor and the rows in one statement (one snapshot), as on Postgres: a trim raises the
        // floor before it deletes, so a page with a hole in it is never answered. One statement, not two: every
        // subscribe, catch-up page and long-poll reads here.
        let rows = try await read("""
            SELECT c.floor_seq, m.id, m.seq, m.created_at, m.sender, m.request_id, m.body, m.member_epoch
            FROM channels c LEFT JOIN messages m ON m.channel = c.name AND m.seq > ?
            WHERE c.name = ? ORDER BY m.seq LIMIT ?
            """, [.integer(Int(after)), .text(channel.rawValue), .integer(limit + 1)])
        let floor = Int64(rows.first?.column("floor_seq")?.integer ?? 0)
        guard after >= floor else { throw Retention.expired(channel, after: after, floor: floor) }
        let found = rows.filter { $0.column("id")?.string != nil }
        let messages = found.prefix(limit).map { Self.message(from: $0, channel: channel) }
        return Page(messages: messages, hasMore: found.count > limit)
    }

    public nonisolated func bounds(of channel: ChannelName) async throws(ApiError) -> (head: Int64, floor: Int64) {
        let rows = try await read("SELECT last_seq, floor_seq FROM channels WHERE name = ?", [.text(channel.rawValue)])
        return (Int64(rows.first?.column("last_seq")?.integer ?? 0), Int64(rows.first?.column("floor_seq")?.integer ?? 0))
    }

    public nonisolated func channels(withPrefix prefix: String) async throws(ApiError) -> [ChannelName] {
        let rows = try await read("SELECT name FROM channels WHERE substr(name, 1, ?) = ?", [.integer(prefix.utf8.count), .text(prefix)])
        return rows.compactMap { $0.column("name")?.string.flatMap { try? ChannelName(parsing: $0) } }
    }

    public nonisolated func trim(_ channel: ChannelName, retention: Retention, batch: Int) async throws(ApiError) -> Int {
        guard !retention.keepsEverything else { return 0 }
        let name = SQLiteData.text(channel.rawValue)
        let ageCutoff = retention.ageCutoffMicros(now: Timestamp.nowMicros())
        let maxCount = retention.maxCount ?? -1
        // The floor first (its own transaction), then the rows under it, a batch per transaction.
        let (floor, lowest) = try await write { db -> (Int64, Int64) in
            _ = try await db.query(
                """
                UPDATE channels SET floor_seq = max(floor_seq,
                    CASE WHEN ?2 >= 0 THEN max(0, last_seq - ?2) ELSE 0 END,
                    coalesce((SELECT max(seq) FROM messages WHERE channel = ?1 AND created_at < ?3), 0))
                WHERE name = ?1
                """, [name, .integer(maxCount), .integer(Int(ageCutoff))])
            let floor = Int64(try await db.query("SELECT floor_seq FROM channels WHERE name = ?", [name]).first?.column("floor_seq")?.integer ?? 0)
            let lowest = Int64(try await db.query("SELECT min(seq) AS s FROM messages WHERE channel = ?", [name]).first?.column("s")?.integer ?? 0)
            return (floor, lowest)
        }
        var deleted = 0
        var from = lowest - 1
        while from < floor {
            let (start, to) = (from, min(floor, from + Int64(batch)))
            deleted += try await write { db -> Int in
                _ = try await db.query("DELETE FROM messages WHERE channel = ? AND seq > ? AND seq <= ?", [name, .integer(Int(start)), .integer(Int(to))])
                return Int(try await db.query("SELECT changes() AS n").first?.column("n")?.integer ?? 0)
            }
            from = to
        }
        return deleted
    }

    public nonisolated func messages(in channel: ChannelName, before: Int64, limit: Int) async throws(ApiError) -> Page {
        let rows = try await read("SELECT \(Self.columns) FROM messages WHERE channel = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                                  [.text(channel.rawValue), .integer(Int(before)), .integer(limit + 1)])
        let messages = rows.prefix(limit).reversed().map { Self.message(from: $0, channel: channel) }
        return Page(messages: messages, hasMore: rows.count > limit)
    }

    public nonisolated func head(of channel: ChannelName) async throws(ApiError) -> Int64 {
        let rows = try await read("SELECT last_seq FROM channels WHERE name = ?", [.text(channel.rawValue)])
        return Int64(rows.first?.column("last_seq")?.integer ?? 0)
    }

    public nonisolated func heads(of channels: [ChannelName]) async throws(ApiError) -> [String: Int64] {
        var heads: [String: Int64] = [:]
        // SQLite's default limit on bound parameters is 999 (32,766 since 3.32): stay well under it.
        var start = 0
        while start < channels.count {
            let chunk = channels[start..<min(start + 500, channels.count)]
            start += chunk.count
            let marks = Array(repeating: "?", count: chunk.count).joined(separator: ",")
            let rows = try await read("SELECT name, last_seq FROM channels WHERE name IN (\(marks))", chunk.map { .text($0.rawValue) })
            for row in rows {
                if let name = row.column("name")?.string { heads[name] = Int64(row.column("last_seq")?.integer ?? 0) }
            }
        }
        return heads
    }

    public nonisolated func ping() async -> Bool {
        (try? await reader.query("SELECT 1")) != nil
    }

    public func close() async {
        try? await reader.close()
        try? await directory.close()
        try? await writer.close()
    }
}
