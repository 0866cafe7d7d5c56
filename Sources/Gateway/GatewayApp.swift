import Auth
import ChatDomain
import Fanout
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Wire

/// What every connection of an instance shares: config, token verification, the channel service, the Hub,
/// and the registry of live streams (for shutdown).
public final class GatewayApp: Sendable {
    public let config: GatewayConfig
    public let verifier: TokenVerifier
    public let channels: ChannelService
    public let threads: ThreadService
    public let revocations: Revocations
    public let hub: Hub
    let bus: any Bus
    let rateLimiter: RateLimiter
    let faults: FaultInjector
    public let store: any Store
    public let logger: Logger
    /// The Redis bus in cluster fan-out, for readiness.
    public let redis: RedisBus?
    let streams = StreamRegistry()
    /// Member removals already acted on (by id), see `apply(_: [MemberRemoval])`.
    let appliedRemovals = NIOLockedValueBox<[String: MemberRemoval]>([:])
    let metrics: GatewayMetrics
    /// Live streams per user, and open connections per client IP (the caps of `GatewayConfig`).
    let streamsPerUser = ConnectionCounts()
    let connectionsPerIP = ConnectionCounts()
    /// The store reads of waiting long-polls, shared per position.
    let pageReads: SharedPageReads
    /// The browser client and the demo page.
    let assets: BrowserAssets
    /// Who is subscribed where, cluster-wide.
    let presence: Presence
    /// The sessions subscribed to each channel on this instance (WebSocket and SSE), for ephemeral events.
    let channelSessions = ChannelSessions()
    /// Set once the instance drains (SIGTERM): readiness answers 503 and new sessions are shut at once.
    private let draining = NIOLockedValueBox(false)
    /// When each (user, thread) last had a `typing` relayed.
    let typingRelayed = NIOLockedValueBox<[String: ContinuousClock.Instant]>([:])
    /// The membership gate's store reads, shared by the thread's local subscribers.
    let removalLookups: RemovalLookups
    /// Each event loop's connection timers (pings, token expiry, SSE keepalives).
    let timers: ConnectionTimers

    init(config: GatewayConfig, verifier: TokenVerifier, channels: ChannelService, threads: ThreadService, revocations: Revocations,
         hub: Hub, bus: any Bus, redis: RedisBus?, presenceLists: (any PresenceLists)? = nil, metrics: GatewayMetrics, loops: [any EventLoop],
         logger: Logger) {
        self.redis = redis
        self.timers = ConnectionTimers(loops: loops)
        self.threads = threads
        self.revocations = revocations
        self.bus = bus
        self.rateLimiter = RateLimiter(rate: config.publishRate, burst: config.publishBurst)
        self.faults = FaultInjector(config.testFault.flatMap(TestFault.init))
        if let fault = config.testFault { logger.warning("TEST FAULT INJECTION ON: \(fault) — deliveries are broken on purpose") }
        self.config = config
        self.verifier = verifier
        self.channels = channels
        self.hub = hub
        self.store = channels.store
        self.removalLookups = RemovalLookups(store: channels.store)
        self.logger = logger
        self.pageReads = SharedPageReads(channels: channels, metrics: metrics)
        self.assets = BrowserAssets(directory: config.assetsDir, logger: logger)
        self.metrics = metrics
        self.presence = Presence(settings: config.presence, lists: presenceLists, metrics: metrics) { [bus] event in bus.publishControl(event) }
        if !config.testRefuse.isEmpty { logger.warning("TEST SWITCH ON: refusing \(config.testRefuse.sorted()) as a proxy might") }
    }

    var isDraining: Bool { draining.withLockedValue { $0 } }

    func startDraining() {
        draining.withLockedValue { $0 = true }
        metrics.draining.record(1)
    }

    /// Verifies a bearer token; every failure is `401 UNAUTHENTICATED` with its reason.
    func authenticate(_ token: String?) async throws(ApiError) -> Actor {
        guard let token, !token.isEmpty else {
            metrics.authFailed(.missing)
            throw ApiError(.unauthenticated, AuthFailure.missing.reason)
        }
        do {
            return try await verifier.verify(token)
        } catch {
            metrics.authFailed(error)
            throw ApiError(error == .revoked ? .tokenRevoked : .unauthenticated, error.reason)
        }
    }

    /// `authenticate` without waiting, for a token verified before; nil when it needs `authenticate`.
    func authenticateKnown(_ token: String?) throws(ApiError) -> Actor? {
        guard let token, !token.isEmpty else { return nil }
        do {
            return try verifier.verifyKnown(token)
        } catch {
            metrics.authFailed(error)
            throw ApiError(error == .revoked ? .tokenRevoked : .unauthenticated, error.reason)
        }
    }

    static func newRequestId() -> String { RequestIds.next() }

    /// A client's `X-Request-Id` if it is reasonable (printable ASCII, ≤ 128 bytes), else a new one.
    static func requestId(from header: String?) -> String {
        if let header, !header.isEmpty, header.utf8.count <= 128, header.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) {
            return header
        }
        return newRequestId()
    }
}

/// Live streams that must be told when the instance shuts down, a token is revoked, or a member removed.
protocol LiveStream: AnyObject, Sendable {
    /// Ends the stream for shutdown (WebSocket close 1001, SSE and long-poll end).
    func shutdown()
    /// Ends the stream if its token is covered (WebSocket close 4003, SSE end, long-poll 401).
    func revoke(_ revocation: Revocation)
    /// `user` left `channel`'s thread at `head`: their subscription delivers up to it, then ends.
    func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64)
}

final class StreamRegistry: Sendable {
    private let streams = NIOLockedValueBox<[ObjectIdentifier: any LiveStream]>([:])

    func add(_ stream: any LiveStream) { streams.withLockedValue { $0[ObjectIdentifier(stream)] = stream } }
    func remove(_ stream: any LiveStream) { _ = streams.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(stream)) } }
    func all() -> [any LiveStream] { streams.withLockedValue { Array($0.values) } }
    func count(where predicate: (any LiveStream) -> Bool) -> Int { streams.withLockedValue { $0.values.filter(predicate).count } }
    var count: Int { streams.withLockedValue { $0.count } }
}

/// The sessions holding a subscription to each channel on this instance: who gets a channel's ephemeral
/// events (`typing`) without looking at every live stream.
final class ChannelSessions: Sendable {
    private let sessions = NIOLockedValueBox<[String: [ObjectIdentifier: WeakSession]]>([:])

    func add(_ channel: ChannelName, _ session: SessionDriver) {
        sessions.withLockedValue { $0[channel.rawValue, default: [:]][ObjectIdentifier(session)] = WeakSession(session: session) }
    }

    func remove(_ channel: ChannelName, _ session: SessionDriver) {
        sessions.withLockedValue { all in
            all[channel.rawValue]?[ObjectIdentifier(session)] = nil
            if all[channel.rawValue]?.isEmpty == true { all[channel.rawValue] = nil }
        }
    }

    func of(_ channel: ChannelName) -> [SessionDriver] {
        sessions.withLockedValue { ($0[channel.rawValue] ?? [:]).values.compactMap(\.session) }
    }

    struct WeakSession: @unchecked Sendable {  // read under the lock
        weak var session: SessionDriver?
    }
}

/// How many of something each key holds now (streams per user, connections per IP).
final class ConnectionCounts: Sendable {
    private let counts = NIOLockedValueBox<[String: Int]>([:])

    /// Counts one more for `key`; returns the count with it.
    func add(_ key: String) -> Int { counts.withLockedValue { $0[key, default: 0] += 1; return $0[key]! } }

    func remove(_ key: String) {
        counts.withLockedValue { counts in
            let left = (counts[key] ?? 1) - 1
            counts[key] = left > 0 ? left : nil
        }
    }
}

extension GatewayApp {
    /// A publish from any transport: the rate limit first (nothing over it is stored), then the channel
    /// service; the outcome is counted.
    func publish(_ actor: Actor, to channel: String, body: JSONValue?, requestId: String?) async -> Result<AppendResult, ApiError> {
        await withCheckedContinuation { waiter in publish(actor, to: channel, body: body, requestId: requestId) { waiter.resume(returning: $0) } }
    }

    /// `publish` without waiting (`ChannelService.publish(…then:)`): `answer` gets the outcome on the committing
    /// task's thread, or at once for a refusal.
    func publish(_ actor: Actor, to channel: String, body: JSONValue?, requestId: String?,
                 then answer: @escaping @Sendable (Result<AppendResult, ApiError>) -> Void) {
        let outcome: @Sendable (Result<AppendResult, ApiError>) -> Void = { outcome in
            self.record(outcome)
            answer(outcome)
        }
        if let refused = rateLimited(actor) { return outcome(.failure(refused)) }
        do throws(ApiError) {
            try channels.publish(actor, to: channel, body: body, requestId: requestId, then: outcome)
        } catch {
            outcome(.failure(error))
        }
    }

    /// A publish over the user's rate (roles in `rateLimitExemptRoles` are never limited), counted.
    private func rateLimited(_ actor: Actor) -> ApiError? {
        guard actor.roles.isDisjoint(with: config.rateLimitExemptRoles), let wait = rateLimiter.take(actor.sub) else { return nil }
        metrics.count(.rateLimited)
        return ApiError(.rateLimited, "publish rate limit exceeded", retryAfter: wait)
    }

    /// Counts the outcome of a publish for `/metrics`.
    func record(_ result: Result<AppendResult, ApiError>) {
        switch result {
        case .success(let appended) where !appended.replayed: metrics.count(.published)
        case .failure(let error) where error.code == .storeUnavailable: metrics.count(.storeErrors)
        default: break
        }
    }
}

extension GatewayApp {
    /// One retention run: every topic with limits, and every thread when threads have limits. Failures are
    /// logged and counted; the next run retries.
    func applyRetention() async {
        var work: [(ChannelName, Retention)] = []
        for (name, rule) in config.topics where rule.maxCount != nil || rule.maxAge != nil {
            if let channel = try? ChannelName(parsing: "topic:" + name) { work.append((channel, Retention(maxCount: rule.maxCount, maxAge: rule.maxAge))) }
        }
        if !config.threadRetention.keepsEverything {
            do {
                for channel in try await store.channels(withPrefix: "thread:") { work.append((channel, config.threadRetention)) }
            } catch {
                metrics.count(.retentionFailures)
                logger.warning("retention could not list the threads", metadata: ["error": "\(error.message)"])
            }
        }
        for (channel, retention) in work {
            do {
                let deleted = try await store.trim(channel, retention: retention, batch: config.retentionBatch)
                if deleted > 0 {
                    metrics.count(.retentionDeleted, deleted)
                    logger.info("retention deleted messages", metadata: ["channel": "\(channel)", "deleted": "\(deleted)"])
                }
            } catch {
                metrics.count(.retentionFailures)
                logger.warning("retention failed", metadata: ["channel": "\(channel)", "error": "\(error.message)"])
            }
        }
    }
}

/// New request ids, one per request that brings none: random-looking version-4 UUIDs made without a system call
/// each (16 random bytes from the kernel per id were a measurable share of a long-poll's cost).
/// The second half is 62 bits of a counter run through a bijection of 62-bit numbers (an odd multiplier and
/// xor-shifts, keyed by a random offset): distinct for the process's first 2^62 ids; the first half, random
/// bits drawn once per process mixed with the second. Request ids name requests in logs; nothing relies on
/// them being unpredictable.
enum RequestIds {
    private static let seed: (high: UInt64, offset: UInt64) = {
        var rng = SystemRandomNumberGenerator()
        return (rng.next(), rng.next())
    }()
    private static let counter = NIOLockedValueBox<UInt64>(0)

    static func next() -> String {
        let n = counter.withLockedValue { count -> UInt64 in
            count &+= 1
            return count
        }
        return format(count: n)
    }

    static func format(count: UInt64) -> String {
        let low = scramble(count &+ seed.offset)
        // The first half varies too (mixed from the second), so that ids read apart at a glance in a log.
        let high = ((seed.high ^ (low &* 0x9E37_79B9_7F4A_7C15)) & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000
        return UUIDText.format(high: high, low: low | 0x8000_0000_0000_0000)
    }

    /// A bijection of the 62-bit numbers (each step is one: xor with a right shift, multiplication by an odd
    /// number modulo 2^62).
    static func scramble(_ value: UInt64) -> UInt64 {
        var x = value & mask62
        x ^= x >> shifts.0
        x = (x &* multipliers.0) & mask62
        x ^= x >> shifts.1
        x = (x &* multipliers.1) & mask62
        x ^= x >> shifts.2
        return x
    }

    static let mask62: UInt64 = (1 << 62) - 1
    static let multipliers: (UInt64, UInt64) = (0x7FB5_D329_728E_A185, 0x81DA_DEF4_BC2D_D44D)
    static let shifts = (31, 27, 33)
}
