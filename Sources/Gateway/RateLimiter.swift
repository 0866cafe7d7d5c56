import Foundation
import NIOConcurrencyHelpers
import NIOCore

/// One connection's rate (requests, WebSocket commands): `rate` tokens a second up to `burst`; rate 0 is
/// unlimited. Touched on the connection's event loop only.
struct TokenBucket {
    let rate: Double
    let burst: Double
    private var tokens: Double
    private var updated = NIODeadline.now()

    init(rate: Double, burst: Double) {
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = max(1, burst)
    }

    /// Takes one token; false when over the rate.
    mutating func take(now: NIODeadline = .now()) -> Bool {
        guard rate > 0 else { return true }
        tokens = min(burst, tokens + Double((now - updated).nanoseconds) / 1e9 * rate)
        updated = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}

/// Per-user publish rate limit: a token bucket per `sub` (per instance), `rate` tokens a second up to
/// `burst`. Buckets that are full again are dropped, so memory follows the users publishing right now.
final class RateLimiter: Sendable {
    private struct Bucket {
        var tokens: Double
        var updated: Double
    }
    private let rate: Double
    private let burst: Double
    private let buckets = NIOLockedValueBox<[String: Bucket]>([:])
    private static let sweepAbove = 10_000

    init(rate: Double, burst: Double) {
        self.rate = rate
        self.burst = max(1, burst)
    }

    var isEnabled: Bool { rate > 0 }

    /// Takes one token for `user`: nil when allowed, else the seconds until one is available.
    func take(_ user: String, now: Double = ProcessInfo.processInfo.systemUptime) -> Int? {
        guard rate > 0 else { return nil }
        return buckets.withLockedValue { buckets in
            var bucket = buckets[user] ?? Bucket(tokens: burst, updated: now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            defer {
                buckets[user] = bucket
                if buckets.count > Self.sweepAbove {
                    buckets = buckets.filter { $0.value.tokens + (now - $0.value.updated) * rate < burst }
                }
            }
            if bucket.tokens >= 1 {
                bucket.tokens -= 1
                return nil
            }
            return max(1, Int(((1 - bucket.tokens) / rate).rounded(.up)))
        }
    }
}
