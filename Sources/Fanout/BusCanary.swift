/// The readiness canary of a Redis bus, as a value type: every `interval` the bus publishes a numbered canary
/// to a channel only this instance subscribes to, and notes when each comes back. A PING answered on one
/// connection does not prove delivery; a canary that went out on the publishing connection and came back on
/// the subscribing one does. The bus is healthy while the last canary came back less than `maxAge` ago.
public struct BusCanary: Sendable {
    public struct Configuration: Sendable {
        public var interval: Duration = .seconds(1)
        public var maxAge: Duration = .seconds(5)
        public init() {}
    }

    public enum Action: Equatable, Sendable {
        case send(UInt64)
        case none
    }

    public let configuration: Configuration
    private var next: UInt64 = 1
    private var lastSent: ContinuousClock.Instant?
    /// Canaries out, by number (at most `outstandingLimit`: the oldest are forgotten).
    private var outstanding: [(number: UInt64, sentAt: ContinuousClock.Instant)] = []
    static let outstandingLimit = 64
    /// When the newest canary came back, and its round trip.
    public private(set) var lastReturn: ContinuousClock.Instant?
    public private(set) var lastRoundTrip: Duration?

    public init(configuration: Configuration = .init()) {
        self.configuration = configuration
    }

    /// The ticker: sends the next canary once `interval` passed since the last one.
    public mutating func tick(now: ContinuousClock.Instant) -> Action {
        if let lastSent, now - lastSent < configuration.interval { return .none }
        lastSent = now
        let number = next
        next += 1
        outstanding.append((number, now))
        if outstanding.count > Self.outstandingLimit { outstanding.removeFirst(outstanding.count - Self.outstandingLimit) }
        return .send(number)
    }

    /// A canary came back (a number never sent, or already back, changes nothing).
    public mutating func received(_ number: UInt64, now: ContinuousClock.Instant) {
        guard let index = outstanding.firstIndex(where: { $0.number == number }) else { return }
        let sentAt = outstanding[index].sentAt
        // Older ones still out are lost or late (forgotten: coming back later, they change nothing).
        outstanding.removeFirst(index + 1)
        lastReturn = now
        lastRoundTrip = now - sentAt
    }

    /// Since the newest canary came back (nil: none yet).
    public func age(now: ContinuousClock.Instant) -> Duration? {
        lastReturn.map { now - $0 }
    }

    public func isHealthy(now: ContinuousClock.Instant) -> Bool {
        guard let age = age(now: now) else { return false }
        return age <= configuration.maxAge
    }
}
