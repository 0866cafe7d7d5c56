import Foundation
import Logging
import NIOConcurrencyHelpers
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
    /// Heads and floors for opening streams without a read (see `KnownBounds`).
    nonisolated let known = KnownBounds()
    /// Statements run on the reader connection (tests count them).
    nonisolated let readerQueries = NIOLockedValueBox(0)

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
        appends.setObserver(observer)
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

    private struct Key: Hashable { let channel: ChannelName, sender: String, requestId: String }
    /// What a request id used within the window names: its message, or the seq of one the retention removed.
    private enum Known { case message(Message), removed(Int64) }

    /// Rows per multi-row statement: 8 columns each stays far under SQLite's bound-parameter limit.
    private static let rowsPerStatement = 100

    /// One transaction per batch, in a few statements whatever its size (each statement is a hop to the
    /// thread pool and back): the known request ids in one read, the heads and epochs of the batch's channels
    /// not yet cached in one, then one multi-row insert of messages, of keys and of heads per 100 rows.
    private func commit(_ batch: [AppendRequest]) async -> [GroupCommit.Outcome] {
        var outcomes = [GroupCommit.Outcome?](repeating: nil, count: batch.count)
        var touched: [ChannelName: Head] = [:]
        do {
            _ = try await writer.query("BEGIN IMMEDIATE")
            let now = Timestamp.nowMicros()
            // Members' publishes to threads: the membership read in this transaction, so after any removal
            // committed before it (removals take the same write lock).
            let refused = try await nonMembers(in: batch)
            let known = try await knownKeys(of: batch, since: now - idempotencyWindow)
            var fresh: [Int] = []
            var firstInBatch: [Key: Int] = [:]
            var repeats: [(index: Int, of: Int)] = []
            for (index, request) in batch.enumerated() {
                if refused.contains(index) {
                    outcomes[index] = request.notAMember
                    continue
                }
                guard let requestId = request.requestId else {
                    fresh.append(index)
                    continue
                }
                let key = Key(channel: request.channel, sender: request.sender, requestId: requestId)
                switch known[key] {
                case .message(let original)?: outcomes[index] = request.replay(original)
                case .removed(let seq)?: outcomes[index] = .failure(Retention.replayOfRemoved(requestId, seq: seq))
                case nil:
                    if let first = firstInBatch[key] {
                        repeats.append((index, first))
                    } else {
                        firstInBatch[key] = index
                        fresh.append(index)
                    }
                }
            }
            // Heads of channels not cached yet, and every thread's membership epoch, read in this transaction
            // (removals write the epoch on the directory connection).
            let channels = Set(fresh.map { batch[$0].channel })
            let unread = channels.filter { heads[$0] == nil || $0.isThread }
            let byName = Dictionary(uniqueKeysWithValues: unread.map { ($0.rawValue, $0) })
            var epochs: [ChannelName: Int64] = [:]
            for chunk in Array(unread).chunked(Self.rowsPerStatement * 8) {
                let marks = Array(repeating: "?", count: chunk.count).joined(separator: ",")
                let rows = try await writer.query("SELECT name, last_seq, last_created_at, member_epoch FROM channels WHERE name IN (\(marks))",
                                                  chunk.map { .text($0.rawValue) })
                for row in rows {
                    guard let name = row.column("name")?.string, let channel = byName[name] else { continue }
                    if heads[channel] == nil {
                        touched[channel] = Head(seq: Int64(row.column("last_seq")?.integer ?? 0), createdAt: Int64(row.column("last_created_at")?.integer ?? 0))
                    }
                    epochs[channel] = Int64(row.column("member_epoch")?.integer ?? 0)
                }
            }
            var stored: [Int: Message] = [:]
            var messages: [Message] = []
            messages.reserveCapacity(fresh.count)
            for index in fresh {
                let request = batch[index]
                var head = touched[request.channel] ?? heads[request.channel] ?? Head(seq: 0, createdAt: 0)
                head.seq += 1
                head.createdAt = max(now, head.createdAt + 1)
                touched[request.channel] = head
                let message = Message(id: UUIDv7.make(micros: head.createdAt), channel: request.channel, seq: head.seq, createdAtMicros: head.createdAt,
                                      sender: request.sender, requestId: request.requestId, body: request.body,
                                      membershipEpoch: request.channel.isThread ? epochs[request.channel] ?? 0 : 0)
                stored[index] = message
                messages.append(message)
                outcomes[index] = .success(AppendResult(message: message, replayed: false))
            }
            for chunk in messages.chunked(Self.rowsPerStatement) {
                _ = try await writer.query(
                    "INSERT INTO messages (channel, seq, id, created_at, sender, request_id, body, member_epoch) VALUES "
                        + Array(repeating: "(?, ?, ?, ?, ?, ?, ?, ?)", count: chunk.count).joined(separator: ","),
                    chunk.flatMap { m -> [SQLiteData] in
                        [.text(m.channel.rawValue), .integer(Int(m.seq)), .text(m.id), .integer(Int(m.createdAtMicros)), .text(m.sender),
                         m.requestId.map { .text($0) } ?? .null, .text(m.body), .integer(Int(m.membershipEpoch))]
                    })
            }
            for chunk in messages.filter({ $0.requestId != nil }).chunked(Self.rowsPerStatement) {
                _ = try await writer.query(
                    "INSERT OR REPLACE INTO idempotency (channel, sender, request_id, seq, created_at) VALUES "
                        + Array(repeating: "(?, ?, ?, ?, ?)", count: chunk.count).joined(separator: ","),
                    chunk.flatMap { m -> [SQLiteData] in
                        [.text(m.channel.rawValue), .text(m.sender), .text(m.requestId!), .integer(Int(m.seq)), .integer(Int(now))]
                    })
            }
            for chunk in Array(touched).chunked(Self.rowsPerStatement) {  // only the batch's channels are in it
                _ = try await writer.query(
                    "INSERT INTO channels (name, last_seq, last_created_at) VALUES "
                        + Array(repeating: "(?, ?, ?)", count: chunk.count).joined(separator: ",")
                        + " ON CONFLICT(name) DO UPDATE SET last_seq = excluded.last_seq, last_created_at = excluded.last_created_at",
                    chunk.flatMap { [.text($0.key.rawValue), .integer(Int($0.value.seq)), .integer(Int($0.value.createdAt))] })
            }
            _ = try await writer.query("COMMIT")
            for (index, first) in repeats {
                if let original = stored[first] { outcomes[index] = batch[index].replay(original) }
            }
        } catch {
            logger.error("store commit failed", metadata: ["error": "\(error)"])
            _ = try? await writer.query("ROLLBACK")
            let failure = ApiError(.storeUnavailable, "the store did not commit the message")
            return batch.map { _ in .failure(failure) }
        }
        for (channel, head) in touched { heads[channel] = head }
        // Before the observer (the Hub) hears of these messages: a stream opened at a head read from memory
        // must not miss one.
        known.committed(touched.lazy.map { ($0.key, $0.value.seq) })
        return outcomes.map { $0 ?? .failure(ApiError(.internalError, "append left without an outcome")) }
    }

    /// The indices of `batch`'s requests whose sender must be, and is not, a member of the thread, in one read
    /// per 100.
    private func nonMembers(in batch: [AppendRequest]) async throws -> Set<Int> {
        struct Pair: Hashable { let thread: String, user: String }
        var asked: [Pair: [Int]] = [:]
        for (index, request) in batch.enumerated() where request.senderMustBeMember {
            guard case .thread(let thread) = request.channel.kind else { continue }
            asked[Pair(thread: thread, user: request.sender), default: []].append(index)
        }
        guard !asked.isEmpty else { return [] }
        var members: Set<Pair> = []
        for chunk in Array(asked.keys).chunked(Self.rowsPerStatement) {
            let rows = try await writer.query(
                "SELECT thread_id, user_id FROM thread_members WHERE (thread_id, user_id) IN (VALUES "
                    + Array(repeating: "(?, ?)", count: chunk.count).joined(separator: ",") + ")",
                chunk.flatMap { [SQLiteData.text($0.thread), .text($0.user)] })
            for row in rows {
                if let thread = row.column("thread_id")?.string, let user = row.column("user_id")?.string { members.insert(Pair(thread: thread, user: user)) }
            }
        }
        return Set(asked.filter { !members.contains($0.key) }.values.joined())
    }

    /// The request ids of `batch` used within the window (since `cutoff`), in one read per 100.
    private func knownKeys(of batch: [AppendRequest], since cutoff: Int64) async throws -> [Key: Known] {
        var known: [Key: Known] = [:]
        let keys = Set(batch.compactMap { request in request.requestId.map { Key(channel: request.channel, sender: request.sender, requestId: $0) } })
        let byName = Dictionary(keys.map { ($0.channel.rawValue, $0.channel) }) { first, _ in first }
        for chunk in Array(keys).chunked(Self.rowsPerStatement) {
            let rows = try await writer.query(
                """
                WITH k(channel, sender, request_id) AS (VALUES \(Array(repeating: "(?, ?, ?)", count: chunk.count).joined(separator: ",")))
                SELECT i.channel AS key_channel, i.sender AS key_sender, i.request_id AS key_request, i.seq AS key_seq,
                       m.id, m.seq, m.created_at, m.sender, m.request_id, m.body, m.member_epoch
                FROM k JOIN idempotency i ON i.channel = k.channel AND i.sender = k.sender AND i.request_id = k.request_id
                LEFT JOIN messages m ON m.channel = i.channel AND m.seq = i.seq
                WHERE i.created_at >= ?
                """,
                chunk.flatMap { [.text($0.channel.rawValue), .text($0.sender), .text($0.requestId)] } + [.integer(Int(cutoff))])
            for row in rows {
                guard let name = row.column("key_channel")?.string, let channel = byName[name],
                      let sender = row.column("key_sender")?.string, let requestId = row.column("key_request")?.string else { continue }
                let key = Key(channel: channel, sender: sender, requestId: requestId)
                known[key] = row.column("id")?.string == nil
                    ? .removed(Int64(row.column("key_seq")?.integer ?? 0))
                    : .message(Self.message(from: row, channel: channel))
            }
        }
        return known
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
        try await onReader { try await reader.query(sql, binds) }
    }

    /// One statement on the reader connection: counted, and a failure logged and answered `STORE_UNAVAILABLE`.
    private nonisolated func onReader<T>(_ statement: () async throws -> T) async throws(ApiError) -> T {
        readerQueries.withLockedValue { $0 += 1 }
        do {
            return try await statement()
        } catch {
            logger.error("store read failed", metadata: ["error": "\(error)"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public nonisolated func messages(in channel: ChannelName, after: Int64, limit: Int) async throws(ApiError) -> Page {
        // The channel's floor and the rows in one statement (one snapshot), as on Postgres: a trim raises the
        // floor before it deletes, so a page with a hole in it is never answered. One statement, not two: every
        // subscribe, catch-up page and long-poll reads here.
        // Rows are decoded as SQLite steps them (on its thread, by position): a catch-up page of 1,000 is neither
        // held as rows nor looked up by column name.
        let page = PageRows(limit: limit, channel: channel)
        try await onReader {
            try await reader.query("""
                SELECT c.floor_seq, m.id, m.seq, m.created_at, m.sender, m.request_id, m.body, m.member_epoch
                FROM channels c LEFT JOIN messages m ON m.channel = c.name AND m.seq > ?
                WHERE c.name = ? ORDER BY m.seq LIMIT ?
                """, [.integer(Int(after)), .text(channel.rawValue), .integer(limit + 1)]) { page.add($0) }
        }
        guard after >= page.floor else { throw Retention.expired(channel, after: after, floor: page.floor) }
        return Page(messages: page.messages, hasMore: page.found > limit)
    }

    /// The rows of `messages(in:after:limit:)` as they arrive: `floor_seq`, then the message's columns in
    /// `columns` order (NULL when the channel has none after the cursor).
    private final class PageRows: @unchecked Sendable {
        // @unchecked: one thread at a time touches it — the store's thread while the statement steps, then the
        // caller once `query` has returned (its completion orders the two).
        let limit: Int
        let channel: ChannelName
        var floor: Int64 = 0
        var found = 0
        var messages: [Message] = []

        init(limit: Int, channel: ChannelName) {
            self.limit = limit
            self.channel = channel
            messages.reserveCapacity(min(limit, 1024))
        }

        func add(_ row: SQLiteRow) {
            let c = row.columns
            floor = Int64(c[0].data.integer ?? 0)
            guard let id = c[1].data.string else { return }
            found += 1
            guard found <= limit else { return }
            messages.append(Message(id: id, channel: channel, seq: Int64(c[2].data.integer ?? 0), createdAtMicros: Int64(c[3].data.integer ?? 0),
                                    sender: c[4].data.string ?? "", requestId: c[5].data.string, body: c[6].data.string ?? "{}",
                                    membershipEpoch: Int64(c[7].data.integer ?? 0)))
        }
    }

    public nonisolated func knownBounds(of channel: ChannelName) -> (head: Int64, floor: Int64)? { known.bounds(of: channel) }

    public nonisolated func bounds(of channel: ChannelName) async throws(ApiError) -> (head: Int64, floor: Int64) {
        if let bounds = known.bounds(of: channel) { return bounds }
        let rows = try await read("SELECT last_seq, floor_seq FROM channels WHERE name = ?", [.text(channel.rawValue)])
        let (head, floor) = (Int64(rows.first?.column("last_seq")?.integer ?? 0), Int64(rows.first?.column("floor_seq")?.integer ?? 0))
        known.read(channel, head: head, floor: floor)
        return known.bounds(of: channel) ?? (head, floor)
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
        known.floorRaised(channel, to: floor)
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
        if let head = known.head(of: channel) { return head }
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

extension Array {
    /// The array in consecutive slices of at most `size` elements.
    func chunked(_ size: Int) -> [ArraySlice<Element>] {
        stride(from: 0, to: count, by: size).map { self[$0..<Swift.min($0 + size, count)] }
    }
}
