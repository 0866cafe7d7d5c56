import Auth
import ChatDomain
import Fanout
import Configuration
import Foundation
import Logging
import NIOCore

/// Everything an instance is started with. Environment variables of PROTOCOL.md §8 first, flags on top
/// (see `GatewayMain`).
public struct GatewayConfig: Sendable {
    public var host = "127.0.0.1"
    public var port = 8080
    public var dataDir = "./data"
    public var jwtSecret: String?
    /// Public keys for RS256 / ES256 (a JWKS file, re-read on SIGHUP).
    public var jwksFile: String?
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    public var jwtLeeway: TimeInterval = 30
    /// Publishes per second per user (token bucket refill; 0 = unlimited) and the bucket's size.
    public var publishRate: Double = 50
    public var publishBurst: Double = 100
    /// Roles the publish rate limit does not apply to (backend services, operators).
    public var rateLimitExemptRoles: Set<String> = ["service", "admin"]
    /// Test-only fault injection (`GATEWAY_TEST_FAULT=drop:1000` or `swap:1000`), see `TestFault`.
    public var testFault: String?
    /// A WebSocket client refused this many publishes in a row is closed with 4029.
    public var rateLimitStrikes = 200
    /// How long a revocation is kept: longer than any token's lifetime.
    public var revocationRetention: Duration = .seconds(30 * 24 * 3600)
    /// How often revocations are re-read from the store (in case the bus lost one).
    public var revocationRefresh: Duration = .seconds(2)
    public var echo = false
    /// The demo page at `/` and its token endpoint `POST /demo/token` (`GATEWAY_DEMO=1`; `make run` turns it on).
    /// Development only: anyone who reaches it may act as any user.
    public var demo = false
    /// Where the browser client and demo page are read from (`GATEWAY_ASSETS_DIR`; default: beside the binary).
    public var assetsDir: String?
    /// Presence: tick (events coalesced per tick), heartbeat and TTL of each instance's list
    /// (`GATEWAY_PRESENCE_TTL_MS`), members per answer or event.
    var presence = Presence.Settings()
    /// At most one `typing` relayed per user and thread per interval (`GATEWAY_TYPING_INTERVAL_MS`, 1 s).
    public var typingInterval: Duration = .seconds(1)
    /// Test only (`GATEWAY_TEST_REFUSE=ws,sse`): refuse WebSocket upgrades (426) and/or event streams (503), as a
    /// proxy might, so that browser clients' fallbacks can be tested.
    public var testRefuse: Set<String> = []
    public var instanceId: String?
    public var logLevel: Logger.Level = .info
    /// `json` (one object per line, for log pipelines) or `text` (swift-log's stream format, for people).
    public var logFormat: LogFormat = .json
    public enum LogFormat: String, Sendable { case json, text }
    /// Largest canonical `body` of a message, in bytes.
    public var bodyLimit = 64 * 1024
    /// The most message bytes in one history or long-poll page (`GATEWAY_PAGE_BYTES`); a page cut by size
    /// says `has_more`.
    public var pageBytes = 4 * 1024 * 1024
    /// Bytes queued for one connection before it counts as a slow consumer.
    public var sendBudget = 1024 * 1024
    /// Kernel send buffer per connection, capped so that a slow consumer shows in NIO's queue.
    public var socketSendBuffer = 128 * 1024
    public var maxSubscriptionsPerConnection = 128
    /// Browser origins allowed (`GATEWAY_ALLOWED_ORIGINS`, comma-separated `scheme://host[:port]`, or `*`): a
    /// request with another `Origin` is refused 403 (WebSocket handshakes included), and answers to the listed
    /// ones carry CORS headers (preflights answered). Empty: any origin may connect, no CORS headers. Requests
    /// without an `Origin` (non-browser clients) are not affected.
    public var allowedOrigins: Set<String> = []
    /// Requests per second one HTTP connection may make (keep-alive and pipelining), and its burst.
    public var connectionRequestRate: Double = 100
    public var connectionRequestBurst: Double = 200
    /// Commands per second one WebSocket may send (any type), and its burst; 0 is unlimited. Over it a command
    /// gets a `429 RATE_LIMITED` error reply; `rateLimitStrikes` refusals in a row close with 4029.
    public var wsCommandRate: Double = 100
    public var wsCommandBurst: Double = 200
    /// permessage-deflate for WebSocket clients that offer it (GATEWAY_WS_DEFLATE=0 turns it off).
    public var permessageDeflate = true
    /// HTTP limits: request-target length, header count, and header bytes (name + value).
    public var maxURILength = 8 * 1024
    public var maxHeaderCount = 100
    public var maxHeaderBytes = 16 * 1024
    /// A connection that sends nothing for this long while no answer is pending is closed (slow or stalled
    /// requests and WebSocket handshakes, idle keep-alive connections).
    public var requestIdleSeconds: Int64 = 10
    /// Absolute deadlines, however the bytes trickle in (slowloris): a request's head must be complete this
    /// long after its first byte, and its body this long after the head. Past either: 408 and closed.
    public var headerDeadlineSeconds: Int64 = 10
    public var bodyDeadlineSeconds: Int64 = 30
    /// Open connections per client IP (any transport, idle keep-alives included); past it a connection is
    /// answered 429 and closed. 0: no cap.
    public var maxConnectionsPerIP = 1000
    /// Live streams (WebSockets, SSE streams, long-polls) per user (`sub`) on one instance; past it the new one
    /// is refused: 429 for SSE and long-poll, an error reply then close 1008 on a WebSocket. 0: no cap.
    public var maxStreamsPerUser = 100
    public var keepaliveSeconds: Int64 = 15
    public var wsPingSeconds: Int64 = 20
    public var eventLoops = System.coreCount
    /// How often a channel with live subscribers compares its delivered head with the store's while the bus
    /// is up (one batched query per instance), so a last message the bus lost arrives within this bound.
    public var reconcileInterval: TimeAmount = .seconds(5)
    /// How long a channel's live messages may wait to go out together (`GATEWAY_WRITE_DELAY_MS`, 0–100; 0: at
    /// once): each subscriber then gets a batch in one write. Latency traded for CPU under load.
    public var writeDelay: TimeAmount = .zero
    /// How long start-up waits for the Postgres store (connect, TLS, migrations) before it gives up naming
    /// `DATABASE_URL` (`GATEWAY_STORE_START_TIMEOUT_S`).
    public var storeStartTimeout: Duration = .seconds(30)
    /// How often channels are read from the store while the bus is down.
    public var storePollInterval: TimeAmount = .milliseconds(200)
    /// Redis heartbeat: a PING every interval; unanswered for the timeout, the connection counts as stalled
    /// and the bus as down (noticed within interval + timeout + 0.5 s: 3 s by default).
    public var redisPingInterval: TimeAmount = .seconds(1)
    public var redisPingTimeout: TimeAmount = .milliseconds(1500)
    /// Readiness canary: published to this instance's own Redis channel every interval; `/readyz` fails once
    /// the newest one that came back is older than the max age (a silent pub/sub stall).
    public var canary = BusCanary.Configuration()
    /// Drain (SIGTERM, SIGINT): how long readiness answers 503 while the listener still accepts (for a load
    /// balancer to notice; default 0), and how long connections get to finish before they are closed (10 s).
    public var drainGrace: Duration = .zero
    public var drainTimeout: Duration = .seconds(10)
    public var topics: [String: TopicRule] = [:]
    /// Retention of every `thread:` channel (`GATEWAY_THREAD_RETENTION="max_count=… max_age=…"`; default: keep all).
    public var threadRetention = Retention()
    /// How often retention runs (each run deletes in batches of `retentionBatch` rows).
    public var retentionInterval: Duration = .seconds(60)
    public var retentionBatch = 1000
    /// How long a publish's request id is remembered (PROTOCOL.md §2: 24 hours).
    public var idempotencyWindow: Duration = .seconds(24 * 3600)
    /// Set: cluster store (Postgres). Unset: SQLite under `dataDir`.
    public var databaseURL: String?
    /// Set: fan-out through Redis pub/sub. Unset: in-process. `redis://[user:password@]host:port` or `rediss://…`
    /// (TLS; `?cacert=/path/ca.pem` names the CA to trust, else the system's).
    public var redisURL: String?
    /// The key every bus message and control event is authenticated with (HMAC-SHA256), the same on every
    /// instance of a cluster (`GATEWAY_CLUSTER_KEY`, at least 32 bytes). Unset, it is derived from
    /// `jwtSecret`; with neither, `REDIS_URL` is refused.
    public var clusterKey: String?
    /// Postgres without Redis is refused unless this says it is one instance (`GATEWAY_SINGLE_INSTANCE=1`).
    public var singleInstance = false
    /// Appends as a named prepared statement, parsed and planned once per Postgres connection
    /// (`GATEWAY_PG_PREPARED_STATEMENTS`; off for a pooler that does not keep them, e.g. PgBouncer in
    /// transaction mode before 1.21; the store also turns it off by itself when the server loses one).
    public var postgresPreparedStatements = true
    /// When both are set the listener speaks TLS only (https, wss); both files are read again on SIGHUP.
    public var tlsCertificateFile: String?
    public var tlsKeyFile: String?
    /// When set, a token's `aud` must contain it (`GATEWAY_JWT_AUDIENCE`; strongly advised with a JWKS).
    public var jwtAudience: String?
    /// When set, a token's `iss` must equal it (`GATEWAY_JWT_ISSUER`; strongly advised with a JWKS).
    public var jwtIssuer: String?

    public init() {}

    /// Largest WebSocket message or HTTP request body: room for a body at its limit with JSON escaping.
    public var maxMessageBytes: Int { bodyLimit * 4 + 16 * 1024 }

    public var instanceName: String { instanceId ?? "\(host):\(port)" }

    /// Whether a request with this `Origin` header may proceed (no list, or `*` in it: any).
    public func allows(origin: String?) -> Bool {
        guard let origin, !allowedOrigins.isEmpty, !allowedOrigins.contains("*") else { return true }
        return allowedOrigins.contains(origin.lowercased())
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`: `*` when the list holds `*`, the
    /// origin when the list names it, else nil (no list: no CORS headers, so browsers keep other origins' pages
    /// from reading answers).
    public func corsOrigin(for origin: String?) -> String? {
        guard let origin, !allowedOrigins.isEmpty else { return nil }
        if allowedOrigins.contains("*") { return "*" }
        return allowedOrigins.contains(origin.lowercased()) ? origin : nil
    }

    /// Reads every setting (see `GatewayConfig.settings`) through `e`. A setting that is set but malformed (not a
    /// number, out of range, a topics rule that does not parse, a file that cannot be read) fails with an error
    /// naming it: never a silent default.
    static func read(_ e: SettingsReader) throws(ConfigError) -> GatewayConfig {
        var c = GatewayConfig()
        if let v = e.text("GATEWAY_HOST") { c.host = v }
        if let v = try e.int("GATEWAY_PORT", 0...65535) { c.port = v }
        if let v = try e.int("GATEWAY_THREADS", 1...1024) { c.eventLoops = v }
        if let v = e.text("GATEWAY_DATA_DIR") { c.dataDir = v }
        c.jwtSecret = e.text("GATEWAY_JWT_SECRET")
        c.jwksFile = e.text("GATEWAY_JWKS_FILE")
        c.jwtAudience = e.text("GATEWAY_JWT_AUDIENCE")
        c.jwtIssuer = e.text("GATEWAY_JWT_ISSUER")
        if let v = try e.double("GATEWAY_JWT_LEEWAY", 0...3600) { c.jwtLeeway = v }
        if let v = try e.double("GATEWAY_PUBLISH_RATE", 0...1e9) { c.publishRate = v }
        if let v = try e.double("GATEWAY_PUBLISH_BURST", 1...1e9) { c.publishBurst = v }
        c.testFault = e.text("GATEWAY_TEST_FAULT")
        if let v = e.text("GATEWAY_RATE_EXEMPT_ROLES") { c.rateLimitExemptRoles = Set(v.split(separator: ",").map(String.init)) }
        if let v = e.text("GATEWAY_TOPICS") {
            do { c.topics.merge(try TopicRule.parse(v)) { $1 } } catch { throw ConfigError("GATEWAY_TOPICS", "\(error)") }
        }
        if let path = e.text("GATEWAY_TOPICS_FILE") {
            let text: String
            do { text = try String(contentsOfFile: path, encoding: .utf8) } catch { throw ConfigError("GATEWAY_TOPICS_FILE", "cannot read \(path)") }
            do { c.topics.merge(try TopicRule.parse(text)) { $1 } } catch { throw ConfigError("GATEWAY_TOPICS_FILE", "\(path): \(error)") }
        }
        if let v = e.text("GATEWAY_THREAD_RETENTION") {
            let rule: TopicRule?
            do { rule = try TopicRule.parse("threads " + v)["threads"] } catch { throw ConfigError("GATEWAY_THREAD_RETENTION", "\(error)") }
            guard let rule, rule.subscribe == nil, rule.publish == nil else {
                throw ConfigError("GATEWAY_THREAD_RETENTION", "expected max_count=N and/or max_age=D (s, m, h, d)")
            }
            c.threadRetention = Retention(maxCount: rule.maxCount, maxAge: rule.maxAge)
        }
        if let v = try e.int("GATEWAY_RETENTION_INTERVAL_MS", 100...86_400_000) { c.retentionInterval = .milliseconds(v) }
        if let v = try e.flag("GATEWAY_ECHO") { c.echo = v }
        if let v = try e.flag("GATEWAY_DEMO") { c.demo = v }
        c.assetsDir = e.text("GATEWAY_ASSETS_DIR")
        if let v = e.text("GATEWAY_TEST_REFUSE") {
            c.testRefuse = Set(v.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
            guard c.testRefuse.isSubset(of: ["ws", "sse"]) else { throw ConfigError("GATEWAY_TEST_REFUSE", "expected ws, sse or both, got \"\(v)\"") }
        }
        c.instanceId = e.text("GATEWAY_INSTANCE_ID")
        if let v = e.text("GATEWAY_LOG_FORMAT") {
            guard let format = LogFormat(rawValue: v) else { throw ConfigError("GATEWAY_LOG_FORMAT", "expected json or text, got \"\(v)\"") }
            c.logFormat = format
        }
        if let v = e.text("GATEWAY_LOG_LEVEL") {
            guard let level = Logger.Level(rawValue: v) else { throw ConfigError("GATEWAY_LOG_LEVEL", "expected trace, debug, info, notice, warning, error or critical, got \"\(v)\"") }
            c.logLevel = level
        }
        if let v = try e.int("GATEWAY_BODY_LIMIT", 1...(16 << 20)) { c.bodyLimit = v }
        if let v = e.text("GATEWAY_ALLOWED_ORIGINS") {
            c.allowedOrigins = Set(v.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty })
        }
        if let v = try e.double("GATEWAY_CONNECTION_REQUEST_RATE", 0...1e9) { c.connectionRequestRate = v }
        if let v = try e.double("GATEWAY_WS_COMMAND_RATE", 0...1e9) { c.wsCommandRate = v }
        if let v = try e.double("GATEWAY_WS_COMMAND_BURST", 1...1e9) { c.wsCommandBurst = v }
        if let v = try e.flag("GATEWAY_WS_DEFLATE") { c.permessageDeflate = v }
        if let v = try e.int("GATEWAY_REQUEST_IDLE_SECONDS", 1...86400) { c.requestIdleSeconds = Int64(v) }
        if let v = try e.int("GATEWAY_HEADER_DEADLINE_SECONDS", 1...86400) { c.headerDeadlineSeconds = Int64(v) }
        if let v = try e.int("GATEWAY_BODY_DEADLINE_SECONDS", 1...86400) { c.bodyDeadlineSeconds = Int64(v) }
        if let v = try e.int("GATEWAY_MAX_CONNECTIONS_PER_IP", 0...Int(Int32.max)) { c.maxConnectionsPerIP = v }
        if let v = try e.int("GATEWAY_MAX_STREAMS_PER_USER", 0...Int(Int32.max)) { c.maxStreamsPerUser = v }
        if let v = try e.int("GATEWAY_PAGE_BYTES", 1024...(1 << 30)) { c.pageBytes = v }
        if let v = try e.int("GATEWAY_SEND_BUDGET", 1024...(1 << 30)) { c.sendBudget = v }
        if let v = try e.int("GATEWAY_WRITE_DELAY_MS", 0...100) { c.writeDelay = .milliseconds(Int64(v)) }
        if let v = try e.int("GATEWAY_RECONCILE_MS", 1...3_600_000) { c.reconcileInterval = .milliseconds(Int64(v)) }
        if let v = try e.int("GATEWAY_PRESENCE_TTL_MS", 500...600_000) {
            c.presence.ttl = .milliseconds(v)
            c.presence.heartbeat = .milliseconds(max(100, v / 3))
        }
        if let v = try e.int("GATEWAY_TYPING_INTERVAL_MS", 0...60_000) { c.typingInterval = .milliseconds(v) }
        if let v = try e.int("GATEWAY_STORE_START_TIMEOUT_S", 1...3600) { c.storeStartTimeout = .seconds(v) }
        if let v = try e.int("GATEWAY_STORE_POLL_MS", 1...3_600_000) { c.storePollInterval = .milliseconds(Int64(v)) }
        if let v = try e.int("GATEWAY_REDIS_PING_MS", 1...3_600_000) { c.redisPingInterval = .milliseconds(Int64(v)) }
        if let v = try e.int("GATEWAY_REDIS_PING_TIMEOUT_MS", 1...3_600_000) { c.redisPingTimeout = .milliseconds(Int64(v)) }
        if let v = try e.int("GATEWAY_CANARY_INTERVAL_MS", 10...600_000) { c.canary.interval = .milliseconds(v) }
        if let v = try e.int("GATEWAY_CANARY_MAX_AGE_MS", 100...3_600_000) { c.canary.maxAge = .milliseconds(v) }
        if let v = try e.int("GATEWAY_DRAIN_GRACE_MS", 0...600_000) { c.drainGrace = .milliseconds(v) }
        if let v = try e.int("GATEWAY_DRAIN_TIMEOUT_S", 1...3600) { c.drainTimeout = .seconds(v) }
        c.databaseURL = e.text("DATABASE_URL")
        c.redisURL = e.text("REDIS_URL")
        c.clusterKey = e.text("GATEWAY_CLUSTER_KEY")
        if let v = try e.flag("GATEWAY_SINGLE_INSTANCE") { c.singleInstance = v }
        if let v = try e.flag("GATEWAY_PG_PREPARED_STATEMENTS") { c.postgresPreparedStatements = v }
        c.tlsCertificateFile = e.text("GATEWAY_TLS_CERT")
        c.tlsKeyFile = e.text("GATEWAY_TLS_KEY")
        return c
    }

    /// The checks no single setting can make: refuses (naming the setting) a missing or short secret, a store
    /// and bus that do not go together, a cluster bus without its key, half a TLS configuration.
    public func validate() throws(ConfigError) {
        guard jwtSecret != nil || jwksFile != nil else {
            throw ConfigError("GATEWAY_JWT_SECRET", "no HS256 secret and no GATEWAY_JWKS_FILE: set one (make run generates a development secret)")
        }
        if let jwtSecret, jwtSecret.utf8.count < 32 { throw ConfigError("GATEWAY_JWT_SECRET", "must be at least 32 bytes") }
        guard canary.maxAge > canary.interval else {
            throw ConfigError("GATEWAY_CANARY_MAX_AGE_MS", "must be longer than GATEWAY_CANARY_INTERVAL_MS (else readiness fails between two canaries)")
        }
        if redisURL != nil, databaseURL == nil {
            throw ConfigError("REDIS_URL", "set without DATABASE_URL: instances sharing a Redis need the shared Postgres store (each SQLite file would number seqs on its own)")
        }
        if databaseURL != nil, redisURL == nil, !singleInstance {
            throw ConfigError("DATABASE_URL", "set without REDIS_URL: other instances' messages would not reach this one's subscribers live; set REDIS_URL, or GATEWAY_SINGLE_INSTANCE=1 for one instance on Postgres")
        }
        if redisURL != nil {
            guard clusterKey != nil || jwtSecret != nil else {
                throw ConfigError("GATEWAY_CLUSTER_KEY", "required with REDIS_URL when there is no GATEWAY_JWT_SECRET: every bus message is authenticated with it")
            }
            if let clusterKey, clusterKey.utf8.count < 32 { throw ConfigError("GATEWAY_CLUSTER_KEY", "must be at least 32 bytes") }
        }
        if (tlsCertificateFile == nil) != (tlsKeyFile == nil) {
            throw ConfigError(tlsCertificateFile == nil ? "GATEWAY_TLS_CERT" : "GATEWAY_TLS_KEY", "GATEWAY_TLS_CERT and GATEWAY_TLS_KEY go together")
        }
    }
}

/// A setting that stops the gateway from starting: its name and what is wrong with it.
public struct ConfigError: Error, CustomStringConvertible {
    public let setting: String
    public let problem: String
    public init(_ setting: String, _ problem: String) {
        self.setting = setting
        self.problem = problem
    }
    public var description: String { "configuration error: \(setting): \(problem)" }
}

/// Typed reads of environment variables: unset or empty is nil, anything else must parse.
/// The settings by name (`GATEWAY_PORT`), read through swift-configuration's `ConfigReader`: the key of a
/// name is its lowercased words joined by dots (`gateway.port`), which the environment provider maps back to
/// `GATEWAY_PORT` and a JSON file spells `{"gateway.port": 8080}` or `{"gateway": {"port": 8080}}`. Strings,
/// numbers and booleans are all read as text and checked here, so that every source fails the same way.
final class SettingsReader {
    let config: ConfigReader
    /// The names asked for (which must all be in `GatewayConfig.settings`).
    private(set) var asked: Set<String> = []

    init(_ config: ConfigReader) { self.config = config }

    static func key(_ name: String) -> ConfigKey { ConfigKey(name.lowercased().split(separator: "_").map(String.init)) }

    func text(_ name: String) -> String? {
        asked.insert(name)
        let key = Self.key(name)
        let value = config.string(forKey: key) ?? config.int(forKey: key).map(String.init) ?? config.double(forKey: key).map { "\($0)" }
            ?? config.bool(forKey: key).map { $0 ? "1" : "0" }
        guard let value, !value.isEmpty else { return nil }
        return value
    }

    func int(_ name: String, _ range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let v = text(name) else { return nil }
        guard let n = Int(v.trimmingCharacters(in: .whitespaces)), range.contains(n) else {
            throw ConfigError(name, "expected a whole number in \(range.lowerBound)...\(range.upperBound), got \"\(v)\"")
        }
        return n
    }

    func double(_ name: String, _ range: ClosedRange<Double>) throws(ConfigError) -> Double? {
        guard let v = text(name) else { return nil }
        guard let n = Double(v.trimmingCharacters(in: .whitespaces)), range.contains(n) else {
            throw ConfigError(name, "expected a number in \(range.lowerBound)...\(range.upperBound), got \"\(v)\"")
        }
        return n
    }

    func flag(_ name: String) throws(ConfigError) -> Bool? {
        guard let v = text(name) else { return nil }
        switch v.lowercased() {
        case "1", "true", "yes", "on": return true
        case "0", "false", "no", "off": return false
        default: throw ConfigError(name, "expected 1 or 0, got \"\(v)\"")
        }
    }
}
