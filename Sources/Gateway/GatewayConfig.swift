import Auth
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
    public var instanceId: String?
    public var logLevel: Logger.Level = .info
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
    /// Browser origins allowed to open WebSockets and event streams (`GATEWAY_ALLOWED_ORIGINS`, comma-separated
    /// `scheme://host[:port]`); empty: any. Requests without an `Origin` (non-browser clients) are not affected.
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
    /// How often channels are read from the store while the bus is down.
    public var storePollInterval: TimeAmount = .milliseconds(200)
    /// Redis heartbeat: a PING every interval; unanswered for the timeout, the connection counts as stalled
    /// and the bus as down (noticed within interval + timeout + 0.5 s: 3 s by default).
    public var redisPingInterval: TimeAmount = .seconds(1)
    public var redisPingTimeout: TimeAmount = .milliseconds(1500)
    public var topics: [String: TopicRule] = [:]
    /// How long a publish's request id is remembered (PROTOCOL.md §2: 24 hours).
    public var idempotencyWindow: Duration = .seconds(24 * 3600)
    /// Set: cluster store (Postgres). Unset: SQLite under `dataDir`.
    public var databaseURL: String?
    /// Set: fan-out through Redis pub/sub. Unset: in-process.
    public var redisURL: String?

    public init() {}

    /// Largest WebSocket message or HTTP request body: room for a body at its limit with JSON escaping.
    public var maxMessageBytes: Int { bodyLimit * 4 + 16 * 1024 }

    public var instanceName: String { instanceId ?? "\(host):\(port)" }

    /// Whether a request with this `Origin` header may proceed.
    public func allows(origin: String?) -> Bool {
        guard let origin, !allowedOrigins.isEmpty else { return true }
        return allowedOrigins.contains(origin.lowercased())
    }

    /// Reads the `GATEWAY_*` variables.
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) -> GatewayConfig {
        var c = GatewayConfig()
        if let v = env["GATEWAY_HOST"], !v.isEmpty { c.host = v }
        if let v = env["GATEWAY_PORT"], let p = Int(v) { c.port = p }
        if let v = env["GATEWAY_DATA_DIR"], !v.isEmpty { c.dataDir = v }
        if let v = env["GATEWAY_JWT_SECRET"], !v.isEmpty { c.jwtSecret = v }
        if let v = env["GATEWAY_JWKS_FILE"], !v.isEmpty { c.jwksFile = v }
        if let v = env["GATEWAY_JWT_LEEWAY"], let n = Double(v) { c.jwtLeeway = n }
        if let v = env["GATEWAY_PUBLISH_RATE"], let n = Double(v) { c.publishRate = n }
        if let v = env["GATEWAY_PUBLISH_BURST"], let n = Double(v) { c.publishBurst = n }
        if let v = env["GATEWAY_TEST_FAULT"], !v.isEmpty { c.testFault = v }
        if let v = env["GATEWAY_RATE_EXEMPT_ROLES"] { c.rateLimitExemptRoles = Set(v.split(separator: ",").map(String.init)) }
        if let v = env["GATEWAY_TOPICS"], let rules = try? TopicRule.parse(v) { c.topics.merge(rules) { $1 } }
        if let v = env["GATEWAY_TOPICS_FILE"], let text = try? String(contentsOfFile: v, encoding: .utf8), let rules = try? TopicRule.parse(text) {
            c.topics.merge(rules) { $1 }
        }
        if let v = env["GATEWAY_ECHO"] { c.echo = v == "1" || v == "true" }
        if let v = env["GATEWAY_INSTANCE_ID"], !v.isEmpty { c.instanceId = v }
        if let v = env["GATEWAY_LOG_LEVEL"], let level = Logger.Level(rawValue: v == "warning" ? "warning" : v) { c.logLevel = level }
        if let v = env["GATEWAY_BODY_LIMIT"], let n = Int(v) { c.bodyLimit = n }
        if let v = env["GATEWAY_ALLOWED_ORIGINS"] {
            c.allowedOrigins = Set(v.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty })
        }
        if let v = env["GATEWAY_CONNECTION_REQUEST_RATE"], let n = Double(v) { c.connectionRequestRate = n }
        if let v = env["GATEWAY_WS_COMMAND_RATE"], let n = Double(v), n >= 0 { c.wsCommandRate = n }
        if let v = env["GATEWAY_WS_COMMAND_BURST"], let n = Double(v), n >= 1 { c.wsCommandBurst = n }
        if let v = env["GATEWAY_WS_DEFLATE"] { c.permessageDeflate = !(v == "0" || v == "false") }
        if let v = env["GATEWAY_REQUEST_IDLE_SECONDS"], let n = Int64(v), n > 0 { c.requestIdleSeconds = n }
        if let v = env["GATEWAY_HEADER_DEADLINE_SECONDS"], let n = Int64(v), n > 0 { c.headerDeadlineSeconds = n }
        if let v = env["GATEWAY_BODY_DEADLINE_SECONDS"], let n = Int64(v), n > 0 { c.bodyDeadlineSeconds = n }
        if let v = env["GATEWAY_MAX_CONNECTIONS_PER_IP"], let n = Int(v), n >= 0 { c.maxConnectionsPerIP = n }
        if let v = env["GATEWAY_MAX_STREAMS_PER_USER"], let n = Int(v), n >= 0 { c.maxStreamsPerUser = n }
        if let v = env["GATEWAY_PAGE_BYTES"], let n = Int(v), n > 0 { c.pageBytes = n }
        if let v = env["GATEWAY_SEND_BUDGET"], let n = Int(v) { c.sendBudget = n }
        if let v = env["GATEWAY_WRITE_DELAY_MS"], let n = Int64(v), (0...100).contains(n) { c.writeDelay = .milliseconds(n) }
        if let v = env["GATEWAY_RECONCILE_MS"], let n = Int64(v), n > 0 { c.reconcileInterval = .milliseconds(n) }
        if let v = env["GATEWAY_STORE_POLL_MS"], let n = Int64(v), n > 0 { c.storePollInterval = .milliseconds(n) }
        if let v = env["GATEWAY_REDIS_PING_MS"], let n = Int64(v), n > 0 { c.redisPingInterval = .milliseconds(n) }
        if let v = env["GATEWAY_REDIS_PING_TIMEOUT_MS"], let n = Int64(v), n > 0 { c.redisPingTimeout = .milliseconds(n) }
        if let v = env["DATABASE_URL"], !v.isEmpty { c.databaseURL = v }
        if let v = env["REDIS_URL"], !v.isEmpty { c.redisURL = v }
        return c
    }
}
