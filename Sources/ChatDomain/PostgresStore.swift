import Foundation
import Logging
import NIOConcurrencyHelpers
import PostgresNIO

/// The cluster store: Postgres shared by every instance. Order is decided by the channel's row: an append
/// batch locks it (`INSERT … ON CONFLICT DO UPDATE … RETURNING`), takes the next `seq` values and
/// `created_at = greatest(now, last_created_at + 1 µs)`, inserts the messages and commits, so commit order is
/// `seq` order on every instance. Concurrent appends of this instance are committed together (group commit).
public final class PostgresStore: Store {
    private static let migrationLock: Int64 = 0x6761_7465_7761_79  // "gateway"

    let client: PostgresClient
    let logger: Logger
    /// How long a request id is remembered (PROTOCOL.md: 24 hours), in microseconds.
    private let idempotencyWindow: Int64
    public let appends: GroupCommit
    /// Whether an append batch runs as the named prepared statement `AppendStatement` (parsed and planned once
    /// per connection) rather than an unnamed one parsed and planned per batch. Switched off by configuration,
    /// or by itself the first time the server does not know the statement or knows it already: a connection
    /// pooler between (PgBouncer in transaction mode before 1.21, or without `max_prepared_statements`) hands
    /// the statement's later executions to other server connections.
    private let preparedAppends: NIOLockedValueBox<Bool>

    /// Parses `postgres://user:pass@host:port/db[?sslmode=…&sslrootcert=…]` into a client configuration. TLS as
    /// libpq reads it: `disable`; `prefer` (the default: TLS when the server offers it, unverified);
    /// `require` (TLS, unverified unless `sslrootcert` is given, then as `verify-ca`); `verify-ca` (the chain
    /// checked against `sslrootcert`, else the system's CAs); `verify-full` (and the host name or address).
    /// Nil for a URL that is not one, an unknown `sslmode`, or a CA file that cannot be read.
    public static func configuration(from url: String) -> PostgresClient.Configuration? {
        guard let components = URLComponents(string: url), ["postgres", "postgresql"].contains(components.scheme ?? ""),
              let host = components.host, let user = components.user
        else { return nil }
        let query = Dictionary((components.queryItems ?? []).map { ($0.name, $0.value ?? "") }) { $1 }
        let rootCertificate = query["sslrootcert"].flatMap { $0.isEmpty ? nil : $0 }
        var tlsConfiguration = TLSConfiguration.makeClientConfiguration()
        if let rootCertificate {
            guard FileManager.default.isReadableFile(atPath: rootCertificate) else { return nil }
            tlsConfiguration.trustRoots = .file(rootCertificate)
        }
        let tls: PostgresClient.Configuration.TLS
        switch query["sslmode"] ?? "prefer" {
        case "disable":
            tls = .disable
        case "allow", "prefer":
            tlsConfiguration.certificateVerification = .none
            tls = .prefer(tlsConfiguration)
        case "require" where rootCertificate == nil:
            tlsConfiguration.certificateVerification = .none
            tls = .require(tlsConfiguration)
        case "require", "verify-ca":
            tlsConfiguration.certificateVerification = .noHostnameVerification
            tls = .require(tlsConfiguration)
        case "verify-full":
            tlsConfiguration.certificateVerification = .fullVerification
            tls = .require(tlsConfiguration)
        default:
            return nil
        }
        let database = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : nil
        var config = PostgresClient.Configuration(host: host, port: components.port ?? 5432, username: user, password: components.password,
                                                  database: database?.isEmpty == false ? database : nil, tls: tls)
        config.options.maximumConnections = 16
        config.options.connectTimeout = .seconds(3)
        // postgres-nio's pool schedules a keep-alive timer, and an idle timer for a connection above the
        // minimum, each time a connection goes back to it (a child task sleeping on a timer, cancelled at the
        // next lease): two tasks and two timers per query. Measured at 500 msgs/s over 3 instances: 40 % fewer
        // context switches, 10–15 % less CPU without them. Two connections stay open; a dead one is found by
        // its next query (which fails within the store's deadline, as it would between keep-alives too) and the
        // Hub's reconcile queries the store every few seconds anyway.
        config.options.minimumConnections = 2
        config.options.keepAliveBehavior = nil
        return config
    }

    /// The connection pool for `url`. It is a swift-service-lifecycle `Service`: run it in the instance's
    /// `ServiceGroup` before opening the store.
    /// `group`: the event loops its connections live on — an instance passes its own, so that a commit's
    /// answer is read on a thread the instance already keeps busy (default: NIO's shared singleton group).
    public static func makeClient(url: String, group: (any EventLoopGroup)? = nil, logger: Logger) throws -> PostgresClient {
        guard let config = configuration(from: url) else { throw PostgresStoreError("DATABASE_URL must be postgres://user:pass@host:port/db[?sslmode=…&sslrootcert=…]") }
        guard let group else { return PostgresClient(configuration: config, backgroundLogger: logger) }
        return PostgresClient(configuration: config, eventLoopGroup: group, backgroundLogger: logger)
    }

    /// Applies the migrations (once, even when several instances start together) through a running client.
    /// `preparedStatements`: appends as a named prepared statement (see `preparedAppends`).
    public static func open(client: PostgresClient, maxPending: Int = 20_000, idempotencyWindow: Duration = .seconds(24 * 3600),
                            preparedStatements: Bool = true, logger: Logger) async throws -> PostgresStore {
        let store = PostgresStore(client: client, maxPending: maxPending, idempotencyWindow: idempotencyWindow,
                                  preparedStatements: preparedStatements, logger: logger)
        try await store.migrate()
        // Pruning is housekeeping: a failure here is logged, and what matters (migrations, revocations) fails on its own.
        do { try await store.pruneExpired() } catch { logger.warning("pruning expired rows failed", metadata: ["error": "\(String(reflecting: error))"]) }
        return store
    }

    private init(client: PostgresClient, maxPending: Int, idempotencyWindow: Duration, preparedStatements: Bool, logger: Logger) {
        self.client = client
        self.logger = logger
        self.preparedAppends = NIOLockedValueBox(preparedStatements)
        let window = idempotencyWindow.components.seconds * 1_000_000 + idempotencyWindow.components.attoseconds / 1_000_000_000_000
        self.idempotencyWindow = window
        let box = WeakBox<PostgresStore>()
        // One batch in flight: what arrives meanwhile makes the next batch larger. Measured here (3 instances,
        // 2,000 publishes/s): ack p50 7.9 ms with 1 in flight, 14 with 2, 19 with 4, and Postgres used 20 % less
        // CPU; 256 publishers on one instance: 26,262 appends/s with 1, 24,390 with 2, 22,652 with 4.
        self.appends = GroupCommit(maxPending: maxPending) { requests in
            guard let store = box.value else { return requests.map { _ in .failure(ApiError(.storeUnavailable, "the store is closed")) } }
            return await store.commit(requests, window: window)
        }
        box.value = self
    }

    public func setCommitObserver(_ observer: @escaping CommitObserver) async {
        appends.setObserver(observer)
    }

    // MARK: migrations

    static let migrations: [String] = [
        """
        CREATE TABLE channels (name TEXT PRIMARY KEY, last_seq BIGINT NOT NULL, last_created_at BIGINT NOT NULL);
        CREATE TABLE messages (
            channel TEXT NOT NULL, seq BIGINT NOT NULL, id UUID NOT NULL, created_at BIGINT NOT NULL,
            sender TEXT NOT NULL, request_id TEXT, body TEXT NOT NULL, PRIMARY KEY (channel, seq));
        CREATE INDEX messages_channel_order ON messages (channel, created_at, id);
        CREATE TABLE idempotency (
            channel TEXT NOT NULL, sender TEXT NOT NULL, request_id TEXT NOT NULL, seq BIGINT NOT NULL,
            created_at BIGINT NOT NULL, PRIMARY KEY (channel, sender, request_id));
        CREATE INDEX idempotency_created_at ON idempotency (created_at)
        """,
        threadMigration,
        removalMigration,
        "ALTER TABLE channels ADD COLUMN floor_seq BIGINT NOT NULL DEFAULT 0",
        membershipEpochMigration,
        appendFunction,
        appendFunction,
        appendFunction,
    ]

    /// Versioned migrations in `schema_migrations`, under an advisory lock so that instances starting at
    /// once apply each exactly once.
    func migrate() async throws {
        try await client.withTransaction(logger: logger) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(Self.migrationLock))", logger: logger)
            try await connection.query("CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())", logger: logger)
            var applied: Set<Int> = []
            for try await version in try await connection.query("SELECT version FROM schema_migrations", logger: logger).decode(Int.self) {
                applied.insert(version)
            }
            for (index, script) in Self.migrations.enumerated() where !applied.contains(index + 1) {
                // A function's body has semicolons of its own: such a script is one statement.
                let statements = script.hasPrefix("CREATE OR REPLACE FUNCTION") ? [Substring(script)] : script.split(separator: ";")
                for statement in statements where !statement.allSatisfy(\.isWhitespace) {
                    try await connection.query(PostgresQuery(unsafeSQL: String(statement)), logger: logger)
                }
                try await connection.query("INSERT INTO schema_migrations (version) VALUES (\(index + 1))", logger: logger)
                logger.info("applied migration", metadata: ["version": "\(index + 1)"])
            }
        }
    }

    public func pruneExpired() async throws {
        let now = Timestamp.nowMicros()
        try await client.query("DELETE FROM idempotency WHERE created_at < \(now - idempotencyWindow)", logger: logger)
        try await client.query("DELETE FROM revocations WHERE until <= \(now / 1_000_000)", logger: logger)
        try await client.query("DELETE FROM member_removals WHERE at < \(now - removalWindowMicros)", logger: logger)
    }

    // MARK: append

    public func append(_ request: AppendRequest) async throws(ApiError) -> AppendResult {
        try await appends.append(request)
    }

    /// The SQLSTATE `gateway_append` raises when another instance took one of the batch's request ids while
    /// it ran: the whole batch rolled back, and runs again (the key is then a replay).
    static let keyTakenState = "GW409"

    /// What a server says when a named prepared statement is not on the connection an execution reached
    /// (`26000`, invalid_sql_statement_name), or is there already when it is prepared (`42P05`,
    /// duplicate_prepared_statement): a pooler moved the session. Both come before anything ran.
    static let statementLostStates: Set<String> = ["26000", "42P05"]

    /// Whether appends run as the named prepared statement (false after a pooler lost it).
    public var preparesAppends: Bool { preparedAppends.withLockedValue { $0 } }

    /// How long an operation may wait, mostly for a connection: postgres-nio's pool keeps a lease request
    /// waiting while the server is down, and a publisher must hear 503 instead.
    static let commitDeadline = Duration.seconds(5)
    static let readDeadline = Duration.seconds(5)

    private func commit(_ batch: [AppendRequest], window: Int64) async -> [GroupCommit.Outcome] {
        for attempt in 1...3 {
            let prepared = preparesAppends
            do {
                let client = self.client
                let logger = self.logger
                return try await withDeadline(Self.commitDeadline, on: appends.executor) {
                    try await Self.append(batch, window: window, prepared: prepared, on: client, logger: logger)
                }
            } catch let error as PSQLError where error.serverInfo?[.sqlState] == Self.keyTakenState {
                logger.debug("idempotency key raced with another instance; retrying the batch", metadata: ["attempt": "\(attempt)"])
            } catch let error as PSQLError where prepared && Self.statementLostStates.contains(error.serverInfo?[.sqlState] ?? "") {
                preparedAppends.withLockedValue { $0 = false }
                logger.warning("the server lost the append's prepared statement (a connection pooler between?): appends are no longer prepared; set GATEWAY_PG_PREPARED_STATEMENTS=0 to start that way",
                               metadata: ["error": "\(String(reflecting: error))"])
            } catch {
                logger.error("store commit failed", metadata: ["error": "\(String(reflecting: error))"])
                break
            }
        }
        let failure = ApiError(.storeUnavailable, "the store did not commit the message")
        return batch.map { _ in .failure(failure) }
    }

    /// One batch in one statement, so one round trip: `gateway_append` (migrations 6 and 7) does what a transaction
    /// of five statements did, and the channels' row locks are held only while the server runs it and commits.
    static func append(_ batch: [AppendRequest], window: Int64, prepared: Bool, on client: PostgresClient, logger: Logger)
        async throws -> [GroupCommit.Outcome] {
        let statement = AppendStatement(batch: batch, cutoff: Timestamp.nowMicros() - window)
        let rows = prepared
            ? try await client.execute(statement, logger: logger)
            : try await client.query(PostgresQuery(unsafeSQL: AppendStatement.sql, binds: try statement.makeBindings()), logger: logger)
                .decode(AppendStatement.Row.self)
        var outcomes = [GroupCommit.Outcome?](repeating: nil, count: batch.count)
        var stored: [Int: Message] = [:]
        var repeats: [(index: Int, of: Int)] = []
        for try await (position, kind, seq, id, createdAt, body, epoch) in rows {
            let index = position - 1
            guard batch.indices.contains(index) else { throw PostgresStoreError("gateway_append answered an unknown index") }
            let request = batch[index]
            switch (kind, id, createdAt) {
            case ("n", let id?, let createdAt?):  // stored now
                let message = Message(id: id, channel: request.channel, seq: seq, createdAtMicros: createdAt, sender: request.sender,
                                      requestId: request.requestId, body: request.body, membershipEpoch: epoch)
                stored[index] = message
                outcomes[index] = .success(AppendResult(message: message, replayed: false))
            case ("r", let id?, let createdAt?):  // the key was used before, within the window
                outcomes[index] = request.replay(Message(id: id, channel: request.channel, seq: seq, createdAtMicros: createdAt, sender: request.sender,
                                                 requestId: request.requestId, body: body ?? "{}"))
            case ("f", _, _):  // the sender is not a member of the thread
                outcomes[index] = request.notAMember
            case ("x", _, _):  // the key's message was removed by the retention
                outcomes[index] = .failure(Retention.replayOfRemoved(request.requestId ?? "", seq: seq))
            case ("d", _, _):  // the key came earlier in this batch: seq is that request's index
                repeats.append((index, Int(seq) - 1))
            default:
                throw PostgresStoreError("gateway_append answered kind \(kind)")
            }
        }
        for (index, first) in repeats {
            if let original = stored[first] { outcomes[index] = batch[index].replay(original) }
        }
        return outcomes.map { $0 ?? .failure(ApiError(.internalError, "append left without an outcome")) }
    }

    // MARK: reads

    private func read(_ query: PostgresQuery, channel: ChannelName) async throws(ApiError) -> [Message] {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.readDeadline) {
                var out: [Message] = []
                let rows = try await client.query(query, logger: logger)
                for try await (id, seq, createdAt, sender, requestId, body) in rows.decode((String, Int64, Int64, String, String?, String).self) {
                    out.append(Message(id: id, channel: channel, seq: seq, createdAtMicros: createdAt, sender: sender, requestId: requestId, body: body))
                }
                return out
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func messages(in channel: ChannelName, after: Int64, limit: Int) async throws(ApiError) -> Page {
        // The channel's floor and the rows in one statement (one snapshot): a trim raises the floor before it
        // deletes, so a page with a hole in it is never answered.
        let client = self.client
        let logger = self.logger
        let name = channel.rawValue
        let read: (floor: Int64, rows: [Message])
        do {
            read = try await withDeadline(Self.readDeadline) {
                var floor: Int64 = 0
                var out: [Message] = []
                let rows = try await client.query("""
                    SELECT c.floor_seq, m.id::text, m.seq, m.created_at, m.sender, m.request_id, m.body, m.member_epoch
                    FROM channels c LEFT JOIN LATERAL (
                        SELECT id, seq, created_at, sender, request_id, body, member_epoch FROM messages
                        WHERE channel = c.name AND seq > \(after) ORDER BY seq LIMIT \(limit + 1)) m ON true
                    WHERE c.name = \(name) ORDER BY m.seq
                    """, logger: logger)
                for try await (floorSeq, id, seq, createdAt, sender, requestId, body, epoch) in rows.decode((Int64, String?, Int64?, Int64?, String?, String?, String?, Int64?).self) {
                    floor = floorSeq
                    guard let id, let seq, let createdAt, let sender, let body else { continue }
                    out.append(Message(id: id, channel: channel, seq: seq, createdAtMicros: createdAt, sender: sender, requestId: requestId, body: body,
                                       membershipEpoch: epoch ?? 0))
                }
                return (floor, out)
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
        guard after >= read.floor else { throw Retention.expired(channel, after: after, floor: read.floor) }
        return Page(messages: Array(read.rows.prefix(limit)), hasMore: read.rows.count > limit)
    }

    public func bounds(of channel: ChannelName) async throws(ApiError) -> (head: Int64, floor: Int64) {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.readDeadline) {
                var bounds: (head: Int64, floor: Int64) = (0, 0)
                for try await (head, floor) in try await client.query("SELECT last_seq, floor_seq FROM channels WHERE name = \(channel.rawValue)",
                                                                      logger: logger).decode((Int64, Int64).self) {
                    bounds = (head, floor)
                }
                return bounds
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func channels(withPrefix prefix: String) async throws(ApiError) -> [ChannelName] {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.readDeadline) {
                var out: [ChannelName] = []
                for try await name in try await client.query("SELECT name FROM channels WHERE starts_with(name, \(prefix))", logger: logger).decode(String.self) {
                    if let channel = try? ChannelName(parsing: name) { out.append(channel) }
                }
                return out
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func trim(_ channel: ChannelName, retention: Retention, batch: Int) async throws(ApiError) -> Int {
        guard !retention.keepsEverything else { return 0 }
        let name = channel.rawValue
        let ageCutoff = retention.ageCutoffMicros(now: Timestamp.nowMicros())
        let maxCount = Int64(retention.maxCount ?? -1)
        // The floor first (committed on its own), then the rows under it, `batch` per statement.
        guard let floor = try await scalar("""
            UPDATE channels SET floor_seq = greatest(floor_seq,
                CASE WHEN \(maxCount) >= 0 THEN greatest(0, last_seq - \(maxCount)) ELSE 0 END,
                coalesce((SELECT max(seq) FROM messages WHERE channel = \(name) AND created_at < \(ageCutoff)), 0))
            WHERE name = \(name) RETURNING floor_seq
            """) else { return 0 }
        var from = (try await scalar("SELECT min(seq) FROM messages WHERE channel = \(name)") ?? floor + 1) - 1
        var deleted = 0
        while from < floor {
            let to = min(floor, from + Int64(batch))
            deleted += Int(try await scalar("""
                WITH gone AS (DELETE FROM messages WHERE channel = \(name) AND seq > \(from) AND seq <= \(to) RETURNING 1)
                SELECT count(*) FROM gone
                """) ?? 0)
            from = to
        }
        return deleted
    }

    /// The first column of the first row (nil: no row, or NULL).
    private func scalar(_ query: PostgresQuery) async throws(ApiError) -> Int64? {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.readDeadline) {
                var value: Int64?
                for try await v in try await client.query(query, logger: logger).decode(Int64?.self) { value = v }
                return value
            }
        } catch {
            logger.error("store query failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func messages(in channel: ChannelName, before: Int64, limit: Int) async throws(ApiError) -> Page {
        let rows = try await read("""
            SELECT id::text, seq, created_at, sender, request_id, body FROM messages
            WHERE channel = \(channel.rawValue) AND seq < \(before) ORDER BY seq DESC LIMIT \(limit + 1)
            """, channel: channel)
        return Page(messages: rows.prefix(limit).reversed(), hasMore: rows.count > limit)
    }

    public func heads(of channels: [ChannelName]) async throws(ApiError) -> [String: Int64] {
        guard !channels.isEmpty else { return [:] }
        let client = self.client
        let logger = self.logger
        let names = channels.map(\.rawValue)
        do {
            return try await withDeadline(Self.readDeadline) {
                var heads: [String: Int64] = [:]
                for try await (name, seq) in try await client.query("SELECT name, last_seq FROM channels WHERE name = ANY(\(names))", logger: logger).decode((String, Int64).self) {
                    heads[name] = seq
                }
                return heads
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func head(of channel: ChannelName) async throws(ApiError) -> Int64 {
        let client = self.client
        let logger = self.logger
        do {
            return try await withDeadline(Self.readDeadline) {
                var head: Int64 = 0
                for try await seq in try await client.query("SELECT last_seq FROM channels WHERE name = \(channel.rawValue)", logger: logger).decode(Int64.self) {
                    head = seq
                }
                return head
            }
        } catch {
            logger.error("store read failed", metadata: ["error": "\(String(reflecting: error))"])
            throw ApiError(.storeUnavailable, "the store did not answer")
        }
    }

    public func ping() async -> Bool {
        let client = self.client
        let logger = self.logger
        return (try? await withDeadline(.seconds(2)) { _ = try await client.query("SELECT 1", logger: logger) }) != nil
    }

    /// The client's lifecycle belongs to its service group; nothing to release here.
    public func close() async {}
}

public struct PostgresStoreError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
