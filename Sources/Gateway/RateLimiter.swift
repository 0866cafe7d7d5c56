import Foundation
import NIOConcurrencyHelpers

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
