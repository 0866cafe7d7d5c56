import NIOCore

/// One Redis connection's life as a value type: connecting → handshaking (AUTH when configured, then PING
/// sent) → ready (PONG seen) → lost → reconnect after a backoff with jitter. An AUTH the server refuses is
/// an error reply like any other: the connection closes and is tried again after the backoff. `RedisBus` feeds it events and carries out the actions.
///
/// - Replies are matched to requests in the order the requests were sent (Redis answers in order on a
///   connection); a reply that does not match what is expected next closes the connection.
/// - Heartbeat: a PING every `pingInterval`; a PING unanswered for `pingTimeout` means the server or the
///   path to it stalled (a stopped process, a half-open connection): the connection is closed and the bus
///   reported down. With the defaults (tick 250 ms, interval 1 s, timeout 1.5 s) a stall is noticed within
///   3 s of the last answer.
/// - Down at start counts as down: until the first PONG the bus has never been reported up, and the first
///   failure reports it down.
/// - The publishing side is bounded: a PUBLISH is sent only while the connection is ready, writable, and
///   has less than `maxInFlightBytes` unanswered; anything else is dropped and remembered, and once the
///   connection is ready again it announces the loss (`PUBLISH gw:_sync`) so that every instance reads its
///   channels from the store.
public struct RedisConnectionStateMachine: Sendable {
    public enum Role: Sendable, Equatable {
        /// Holds SUBSCRIBEs; `internalChannels` are subscribed at every connect and never reported.
        case subscriber(internalChannels: [String])
        /// Sends PUBLISHes; `syncChannel` is where a loss is announced.
        case publisher(syncChannel: String)
        /// Sends commands whose replies go back to their callers (presence lists): any reply answers one.
        case commands
    }

    public struct Configuration: Sendable {
        public var pingInterval: TimeAmount = .seconds(1)
        public var pingTimeout: TimeAmount = .milliseconds(1500)
        public var backoffBase: TimeAmount = .milliseconds(100)
        public var backoffMax: TimeAmount = .seconds(2)
        public var maxInFlightBytes = 8 * 1024 * 1024
        /// Sent as `AUTH [user] password` first on every connection (Redis ACL user, or `requirepass`).
        public var credentials: Credentials?
        public init() {}
    }

    public struct Credentials: Sendable, Equatable {
        public var user: String?
        public var password: String
        public init(user: String?, password: String) {
            self.user = user
            self.password = password
        }
    }

    public enum Command: Sendable, Equatable {
        case auth(Credentials)
        case ping
        case subscribe([String])
        case unsubscribe([String])
        case publish(channel: String, payload: String)
    }

    /// A reply, classified by the driver.
    public enum Reply: Sendable, Equatable {
        case pong
        /// `+OK` (the answer to AUTH).
        case ok
        case subscribed(String)
        case unsubscribed(String)
        /// The answer to a PUBLISH (the number of receivers).
        case integer
        case error(String)
        /// Anything else (a stray status, an unexpected shape).
        case other
    }

    public enum Action: Sendable, Equatable {
        case connect
        case scheduleReconnect(TimeAmount)
        case send([Command])
        /// Close the connection (stalled, or it broke the protocol); `connectionClosed` follows.
        case close
        case reportUp
        case reportDown
        case subscribeConfirmed(String)
        case unsubscribeConfirmed(String)
        /// The reply just received answers the oldest command in flight (`.commands` role).
        case commandAnswered
    }

    public enum State: Sendable, Equatable {
        case idle
        case connecting(attempt: Int)
        case handshaking
        case ready
        case waitingToReconnect(attempt: Int)
        case stopped
    }

    enum Expected: Sendable, Equatable {
        case ok
        case pong
        case subscribed(String)
        case unsubscribed(String)
        case published(bytes: Int)
        /// A command's reply, whatever it is (an error reply included: it is the caller's).
        case reply(bytes: Int)
    }

    public let role: Role
    public let configuration: Configuration
    public private(set) var state: State = .idle
    private var expected = CircularBuffer<Expected>()
    private var pingSentAt: NIODeadline?
    private var lastPingAt: NIODeadline = .uptimeNanoseconds(0)
    /// What the bus was last reported as: nil before the first report (then it counts as down).
    private var reportedUp: Bool?
    public private(set) var inFlightBytes = 0
    /// PUBLISHes were dropped or may have been lost with a connection: announce it once ready.
    public private(set) var lostPublishes = false
    public private(set) var droppedPublishes = 0

    public init(role: Role, configuration: Configuration = .init()) {
        self.role = role
        self.configuration = configuration
    }

    public var isReady: Bool { state == .ready }
    public var outstandingReplies: Int { expected.count }

    public mutating func start() -> [Action] {
        guard state == .idle else { return [] }
        state = .connecting(attempt: 0)
        return [.connect]
    }

    public mutating func stop() -> [Action] {
        let wasOpen = state == .handshaking || state == .ready
        state = .stopped
        expected.removeAll()
        return wasOpen ? [.close] : []
    }

    /// The TCP connection is up: handshake.
    public mutating func connected(now: NIODeadline) -> [Action] {
        guard case .connecting = state else { return [] }
        state = .handshaking
        expected.removeAll()
        inFlightBytes = 0
        var commands: [Command] = []
        if let credentials = configuration.credentials {
            commands.append(.auth(credentials))
            expected.append(.ok)
        }
        if case .subscriber(let internalChannels) = role, !internalChannels.isEmpty {
            commands.append(.subscribe(internalChannels))
            for name in internalChannels { expected.append(.subscribed(name)) }
        }
        commands.append(.ping)
        expected.append(.pong)
        pingSentAt = now
        lastPingAt = now
        return [.send(commands)]
    }

    public mutating func connectFailed(random: Double) -> [Action] {
        guard case .connecting(let attempt) = state else { return [] }
        return lost(attempt: attempt + 1, random: random)
    }

    /// The connection closed (by the server, the network, or a `.close` action).
    public mutating func connectionClosed(random: Double) -> [Action] {
        switch state {
        case .handshaking, .ready:
            return lost(attempt: 0, random: random)
        default:
            return []
        }
    }

    public mutating func reconnectTimerFired() -> [Action] {
        guard case .waitingToReconnect(let attempt) = state else { return [] }
        state = .connecting(attempt: attempt)
        return [.connect]
    }

    private mutating func lost(attempt: Int, random: Double) -> [Action] {
        if expected.contains(where: { if case .published = $0 { true } else { false } }) { lostPublishes = true }
        expected.removeAll()
        inFlightBytes = 0
        pingSentAt = nil
        state = .waitingToReconnect(attempt: attempt)
        var actions: [Action] = []
        if reportedUp != false {
            reportedUp = false
            actions.append(.reportDown)
        }
        actions.append(.scheduleReconnect(backoff(attempt: attempt, random: random)))
        return actions
    }

    /// Exponential backoff, capped, with jitter: a random point in the upper half of the step.
    func backoff(attempt: Int, random: Double) -> TimeAmount {
        let step = min(configuration.backoffMax.nanoseconds, configuration.backoffBase.nanoseconds << min(attempt, 20))
        let jitter = 0.5 + 0.5 * min(max(random, 0), 1)
        return .nanoseconds(Int64(Double(step) * jitter))
    }

    public mutating func received(_ reply: Reply) -> [Action] {
        guard state == .handshaking || state == .ready else { return [] }
        guard let next = expected.first else { return [.close] }
        switch (next, reply) {
        case (.ok, .ok):
            expected.removeFirst()
            return []
        case (.pong, .pong):
            expected.removeFirst()
            pingSentAt = nil
            guard state == .handshaking else { return [] }
            state = .ready
            var actions: [Action] = []
            if reportedUp != true {
                reportedUp = true
                actions.append(.reportUp)
            }
            if case .publisher(let sync) = role, lostPublishes {
                lostPublishes = false
                expected.append(.published(bytes: 0))
                actions.append(.send([.publish(channel: sync, payload: "1")]))
            }
            return actions
        case (.subscribed(let name), .subscribed(let got)) where name == got:
            expected.removeFirst()
            return isInternal(name) ? [] : [.subscribeConfirmed(name)]
        case (.unsubscribed(let name), .unsubscribed(let got)) where name == got:
            expected.removeFirst()
            return isInternal(name) ? [] : [.unsubscribeConfirmed(name)]
        case (.published(let bytes), .integer):
            expected.removeFirst()
            inFlightBytes -= bytes
            return []
        case (.reply(let bytes), _):
            expected.removeFirst()
            inFlightBytes -= bytes
            return [.commandAnswered]
        default:
            // An error reply or a reply out of order: the connection's state is unknown, start over.
            return [.close]
        }
    }

    private func isInternal(_ name: String) -> Bool {
        if case .subscriber(let internalChannels) = role { return internalChannels.contains(name) }
        return false
    }

    /// The Hub wants these channels (one request per channel outstanding, see `BusSubscriptionStateMachine`).
    /// Not ready: nothing is sent, the Hub was (or is about to be) told the bus is down and asks again
    /// when it is back.
    public mutating func subscribe(_ names: [String]) -> [Action] {
        guard state == .ready, !names.isEmpty else { return [] }
        for name in names { expected.append(.subscribed(name)) }
        return [.send([.subscribe(names)])]
    }

    public mutating func unsubscribe(_ names: [String]) -> [Action] {
        guard state == .ready, !names.isEmpty else { return [] }
        for name in names { expected.append(.unsubscribed(name)) }
        return [.send([.unsubscribe(names)])]
    }

    /// Whether `count` PUBLISHes of `bytes` in all may be written now; if so they are expected to be answered.
    /// A refusal is remembered and announced once the connection is ready again.
    public mutating func publish(count: Int, bytes: Int, writable: Bool) -> Bool {
        guard state == .ready, writable, inFlightBytes + bytes <= configuration.maxInFlightBytes else {
            lostPublishes = true
            droppedPublishes += count
            return false
        }
        let each = bytes / max(count, 1)
        for i in 0..<count { expected.append(.published(bytes: i == 0 ? bytes - each * (count - 1) : each)) }
        inFlightBytes += bytes
        return true
    }

    /// Whether `count` commands of `bytes` in all may be written now (`.commands` role); if so each expects one
    /// reply, handed back in order by `.commandAnswered`. Refused when not ready, not writable, or too much is
    /// unanswered: the caller fails them at once (nothing is queued).
    public mutating func command(count: Int, bytes: Int, writable: Bool) -> Bool {
        guard state == .ready, writable, count > 0, inFlightBytes + bytes <= configuration.maxInFlightBytes else { return false }
        let each = bytes / count
        for i in 0..<count { expected.append(.reply(bytes: i == 0 ? bytes - each * (count - 1) : each)) }
        inFlightBytes += bytes
        return true
    }

    /// Called every few hundred milliseconds: sends heartbeats and notices one that went unanswered.
    public mutating func tick(now: NIODeadline) -> [Action] {
        guard state == .handshaking || state == .ready else { return [] }
        if let sent = pingSentAt {
            return now - sent >= configuration.pingTimeout ? [.close] : []
        }
        guard state == .ready, now - lastPingAt >= configuration.pingInterval else { return [] }
        pingSentAt = now
        lastPingAt = now
        expected.append(.pong)
        return [.send([.ping])]
    }
}
