import ChatDomain
@testable import Fanout
import NIOCore
import Testing

/// The Hub's per-channel bus subscription, without sockets: every event in every state, and the races of
/// the old callback-driven bus as model-checked interleavings against a simulated Redis.
struct BusSubscriptionStateMachineTests {
    typealias M = BusSubscriptionStateMachine
    typealias S = M.State

    static let states: [S] = [.initialized, .subscribing(subscribers: 0), .subscribing(subscribers: 2), .live(subscribers: 1),
                              .live(subscribers: 2), .unsubscribing(subscribers: 0), .unsubscribing(subscribers: 1),
                              .storePolling(subscribers: 1), .storePolling(subscribers: 2)]

    enum Event: CaseIterable { case addUp, addDown, remove, subscribeConfirmed, subscribeFailed, unsubscribeConfirmedUp, unsubscribeConfirmedDown, busLost, busRestored }

    static func apply(_ event: Event, to machine: inout M) -> M.Action {
        switch event {
        case .addUp: machine.subscriberAdded(busUp: true)
        case .addDown: machine.subscriberAdded(busUp: false)
        case .remove: machine.subscriberRemoved()
        case .subscribeConfirmed: machine.subscribeConfirmed()
        case .subscribeFailed: machine.subscribeFailed()
        case .unsubscribeConfirmedUp: machine.unsubscribeConfirmed(busUp: true)
        case .unsubscribeConfirmedDown: machine.unsubscribeConfirmed(busUp: false)
        case .busLost: machine.busLost()
        case .busRestored: machine.busRestored()
        }
    }

    /// The whole transition table: (state, event) → (next state, action).
    static func expected(_ state: S, _ event: Event) -> (S, M.Action) {
        switch (state, event) {
        case (.initialized, .addUp): (.subscribing(subscribers: 1), .subscribe)
        case (.initialized, .addDown): (.storePolling(subscribers: 1), .readStore)
        case (.subscribing(let n), .addUp), (.subscribing(let n), .addDown): (.subscribing(subscribers: n + 1), .none)
        case (.live(let n), .addUp), (.live(let n), .addDown): (.live(subscribers: n + 1), .none)
        case (.unsubscribing(let n), .addUp), (.unsubscribing(let n), .addDown): (.unsubscribing(subscribers: n + 1), .none)
        case (.storePolling(let n), .addUp), (.storePolling(let n), .addDown): (.storePolling(subscribers: n + 1), .none)

        case (.initialized, .remove): (.initialized, .none)
        case (.subscribing(let n), .remove): (.subscribing(subscribers: max(0, n - 1)), .none)
        case (.live(1), .remove): (.unsubscribing(subscribers: 0), .unsubscribe)
        case (.live(let n), .remove): (.live(subscribers: n - 1), .none)
        case (.unsubscribing(let n), .remove): (.unsubscribing(subscribers: max(0, n - 1)), .none)
        case (.storePolling(1), .remove): (.initialized, .release)
        case (.storePolling(let n), .remove): (.storePolling(subscribers: n - 1), .none)

        case (.subscribing(0), .subscribeConfirmed): (.unsubscribing(subscribers: 0), .unsubscribe)
        case (.subscribing(let n), .subscribeConfirmed): (.live(subscribers: n), .readStore)
        case (_, .subscribeConfirmed): (state, .none)

        case (.subscribing(0), .subscribeFailed): (.initialized, .release)
        case (.subscribing(let n), .subscribeFailed): (.storePolling(subscribers: n), .readStore)
        case (_, .subscribeFailed): (state, .none)

        case (.unsubscribing(0), .unsubscribeConfirmedUp), (.unsubscribing(0), .unsubscribeConfirmedDown): (.initialized, .release)
        case (.unsubscribing(let n), .unsubscribeConfirmedUp): (.subscribing(subscribers: n), .subscribe)
        case (.unsubscribing(let n), .unsubscribeConfirmedDown): (.storePolling(subscribers: n), .readStore)
        case (_, .unsubscribeConfirmedUp), (_, .unsubscribeConfirmedDown): (state, .none)

        case (.subscribing(0), .busLost), (.unsubscribing(0), .busLost): (.initialized, .release)
        case (.subscribing(let n), .busLost), (.live(let n), .busLost), (.unsubscribing(let n), .busLost): (.storePolling(subscribers: n), .readStore)
        case (_, .busLost): (state, .none)

        case (.storePolling(let n), .busRestored): (.subscribing(subscribers: n), .subscribe)
        case (_, .busRestored): (state, .none)
        }
    }

    @Test func everyEventInEveryState() {
        for state in Self.states {
            for event in Event.allCases {
                var machine = M(state: state)
                let action = Self.apply(event, to: &machine)
                let (next, expectedAction) = Self.expected(state, event)
                #expect(machine.state == next, "\(state) + \(event)")
                #expect(action == expectedAction, "\(state) + \(event)")
            }
        }
    }

    @Test func ticksAndHeadChecks() {
        for state in Self.states {
            let machine = M(state: state)
            let polling: Bool = if case .storePolling = state { true } else { false }
            let live: Bool = if case .live = state { true } else { false }
            #expect(machine.pollTick() == (polling ? .checkHead : .none), "\(state)")
            #expect(machine.reconcileTick() == (live ? .checkHead : .none), "\(state)")
            // A head past what was delivered is read, in the states that deliver; nothing otherwise.
            #expect(machine.headRead(7, delivered: 5) == (polling || live ? .readStore : .none), "\(state)")
            #expect(machine.headRead(5, delivered: 5) == .none, "\(state)")
        }
    }

    /// Redis as the bus sees it: processes commands in order, answers each in order.
    struct SimulatedRedis {
        var subscribed = false
        var inFlight: [Bool] = []  // true: SUBSCRIBE, false: UNSUBSCRIBE, in send order
        mutating func send(_ subscribe: Bool) { inFlight.append(subscribe) }
        /// Processes the oldest command; returns which kind of reply it produced.
        mutating func answer() -> Bool? {
            guard !inFlight.isEmpty else { return nil }
            let command = inFlight.removeFirst()
            subscribed = command
            return command
        }
    }

    /// Random interleavings of subscribers joining and leaving, Redis answering, and the bus going down and
    /// up. Whenever the machine says `live`, Redis really holds the subscription (the old bus matched
    /// replies by channel name, so subscribe → unsubscribe → subscribe could go live on the first reply
    /// and then lose the subscription to the UNSUBSCRIBE); when everyone left and every reply came, nothing
    /// is subscribed; never two requests outstanding.
    @Test func liveOnlyWhileRedisHoldsTheSubscription() {
        var random = SplitMix(seed: 10)
        for _ in 0..<2_000 {
            var machine = M()
            var redis = SimulatedRedis()
            var busUp = true
            var subscribers = 0
            func carry(_ action: M.Action) {
                switch action {
                case .subscribe: if busUp { redis.send(true) }
                case .unsubscribe: if busUp { redis.send(false) }
                default: break
                }
                #expect(redis.inFlight.count <= 1, "two requests outstanding for one channel")
            }
            for _ in 0..<40 {
                let roll = Int.random(in: 0..<10, using: &random)
                switch roll {
                case 0, 1, 2:
                    subscribers += 1
                    carry(machine.subscriberAdded(busUp: busUp))
                case 3, 4:
                    guard subscribers > 0 else { break }
                    subscribers -= 1
                    carry(machine.subscriberRemoved())
                case 5, 6, 7:
                    if let reply = redis.answer() {
                        carry(reply ? machine.subscribeConfirmed() : machine.unsubscribeConfirmed(busUp: busUp))
                    }
                case 8 where busUp:
                    busUp = false
                    redis = SimulatedRedis()  // a new connection holds nothing
                    carry(machine.busLost())
                case 9 where !busUp:
                    busUp = true
                    carry(machine.busRestored())
                default:
                    break
                }
                if case .live = machine.state { #expect(redis.subscribed && redis.inFlight.isEmpty) }
                #expect(machine.subscribers == subscribers)
            }
            // Drain: every reply arrives.
            while busUp, let reply = redis.answer() {
                carry(reply ? machine.subscribeConfirmed() : machine.unsubscribeConfirmed(busUp: busUp))
            }
            if busUp {
                #expect(redis.subscribed == (subscribers > 0))
                if subscribers > 0 { #expect(machine.state == .live(subscribers: subscribers)) } else { #expect(machine.state == .initialized) }
            } else {
                #expect(subscribers == 0 ? machine.state == .initialized : machine.state == .storePolling(subscribers: subscribers))
            }
        }
    }
}

/// The Redis connection's life, without sockets: handshake, reply matching, heartbeat, backoff, the bounded
/// publishing side.
struct RedisConnectionStateMachineTests {
    typealias R = RedisConnectionStateMachine
    static let internalChannels = ["gw:_sync", "gw:_control"]
    static let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)

    static func readySubscriber() -> R {
        var machine = R(role: .subscriber(internalChannels: internalChannels))
        _ = machine.start()
        _ = machine.connected(now: t0)
        _ = machine.received(.subscribed("gw:_sync"))
        _ = machine.received(.subscribed("gw:_control"))
        _ = machine.received(.pong)
        return machine
    }

    @Test func downAtStartIsReportedDown() {
        var machine = R(role: .subscriber(internalChannels: Self.internalChannels))
        do { let r = machine.start(); #expect(r == [.connect]) }
        let actions = machine.connectFailed(random: 0)
        #expect(actions.first == .reportDown, "the first failure reports the bus down, although it was never up")
        #expect(machine.state == .waitingToReconnect(attempt: 1))
        // Later failures do not report again.
        do { let r = machine.reconnectTimerFired(); #expect(r == [.connect]) }
        do { let r = machine.connectFailed(random: 0).contains(.reportDown); #expect(!r) }
    }

    @Test func handshakeSubscribesInternalChannelsAndIsReadyOnlyAfterThePong() {
        var machine = R(role: .subscriber(internalChannels: Self.internalChannels))
        _ = machine.start()
        do { let r = machine.connected(now: Self.t0); #expect(r == [.send([.subscribe(Self.internalChannels), .ping])]) }
        #expect(!machine.isReady)
        // A channel the Hub asks for before the PONG is not sent (the Hub has not been told the bus is up;
        // it subscribes everything when it is).
        do { let r = machine.subscribe(["gw:topic:a"]); #expect(r == []) }
        do { let r = machine.received(.subscribed("gw:_sync")); #expect(r == []) }
        do { let r = machine.received(.subscribed("gw:_control")); #expect(r == []) }
        do { let r = machine.received(.pong); #expect(r == [.reportUp]) }
        #expect(machine.isReady)
        do { let r = machine.subscribe(["gw:topic:a"]); #expect(r == [.send([.subscribe(["gw:topic:a"])])]) }
        do { let r = machine.received(.subscribed("gw:topic:a")); #expect(r == [.subscribeConfirmed("gw:topic:a")]) }
    }

    @Test func repliesAreMatchedToRequestsInOrder() {
        var machine = Self.readySubscriber()
        _ = machine.subscribe(["gw:a", "gw:b"])
        _ = machine.unsubscribe(["gw:a"])
        do { let r = machine.received(.subscribed("gw:a")); #expect(r == [.subscribeConfirmed("gw:a")]) }
        do { let r = machine.received(.subscribed("gw:b")); #expect(r == [.subscribeConfirmed("gw:b")]) }
        do { let r = machine.received(.unsubscribed("gw:a")); #expect(r == [.unsubscribeConfirmed("gw:a")]) }
        #expect(machine.outstandingReplies == 0)
        // Out of order, unexpected or an error reply: the connection's state is unknown, so it is closed.
        var other = Self.readySubscriber()
        _ = other.subscribe(["gw:a", "gw:b"])
        do { let r = other.received(.subscribed("gw:b")); #expect(r == [.close]) }
        var third = Self.readySubscriber()
        do { let r = third.received(.subscribed("gw:x")); #expect(r == [.close]) }
        var fourth = Self.readySubscriber()
        _ = fourth.subscribe(["gw:a"])
        do { let r = fourth.received(.error("NOPERM")); #expect(r == [.close]) }
    }

    /// AUTH goes first when the URL has credentials; a refusal is an error reply like any other: closed, retried.
    @Test func authenticatesFirstAndARefusalCloses() {
        var config = RedisConnectionStateMachine.Configuration()
        let credentials = RedisConnectionStateMachine.Credentials(user: "gw", password: "secret")
        config.credentials = credentials
        var machine = R(role: .publisher(syncChannel: "gw:_sync"), configuration: config)
        _ = machine.start()
        do { let r = machine.connected(now: Self.t0); #expect(r == [.send([.auth(credentials), .ping])]) }
        do { let r = machine.received(.ok); #expect(r == []) }
        do { let r = machine.received(.pong); #expect(r == [.reportUp]) }
        var refused = R(role: .publisher(syncChannel: "gw:_sync"), configuration: config)
        _ = refused.start()
        _ = refused.connected(now: Self.t0)
        do { let r = refused.received(.error("WRONGPASS invalid username-password pair")); #expect(r == [.close]) }
        #expect(!refused.isReady)
    }

    /// The `.commands` role (presence lists): any reply answers the oldest command, an error reply included
    /// (it is the caller's, the connection stays); nothing is accepted while not ready or over the bound.
    @Test func commandsAreAnsweredInOrderByAnyReply() {
        var config = RedisConnectionStateMachine.Configuration()
        config.maxInFlightBytes = 100
        var machine = R(role: .commands, configuration: config)
        _ = machine.start()
        do { let r = machine.command(count: 1, bytes: 10, writable: true); #expect(!r, "not connected") }
        _ = machine.connected(now: Self.t0)
        do { let r = machine.command(count: 1, bytes: 10, writable: true); #expect(!r, "handshake not answered") }
        _ = machine.received(.pong)
        do { let r = machine.command(count: 3, bytes: 30, writable: true); #expect(r) }
        do { let r = machine.command(count: 1, bytes: 10, writable: false); #expect(!r, "not writable") }
        do { let r = machine.command(count: 8, bytes: 80, writable: true); #expect(!r, "over the bound") }
        do { let r = machine.received(.integer); #expect(r == [.commandAnswered]) }
        do { let r = machine.received(.error("WRONGTYPE")); #expect(r == [.commandAnswered]) }
        do { let r = machine.received(.other); #expect(r == [.commandAnswered]) }
        #expect(machine.outstandingReplies == 0 && machine.inFlightBytes == 0 && machine.isReady)
        // A heartbeat between commands is matched as a heartbeat.
        do { let r = machine.command(count: 1, bytes: 10, writable: true); #expect(r) }
        _ = machine.tick(now: Self.t0 + .seconds(2))
        do { let r = machine.received(.other); #expect(r == [.commandAnswered]) }
        do { let r = machine.received(.pong); #expect(r == []) }
        // Lost with commands in flight: forgotten (the driver fails their callers), no publish loss announced.
        do { let r = machine.command(count: 2, bytes: 20, writable: true); #expect(r) }
        let lost = machine.connectionClosed(random: 0)
        #expect(lost.contains(.reportDown) && machine.outstandingReplies == 0 && !machine.lostPublishes)
    }

    /// A stalled server (SIGSTOP, a half-open connection) answers nothing; the heartbeat notices within 3 s
    /// of the last answer, at any phase of the tick.
    @Test func unansweredHeartbeatClosesWithinThreeSeconds() {
        for offset in stride(from: 0, to: 250, by: 25) {
            var machine = Self.readySubscriber()
            let lastAnswer = Self.t0 + .milliseconds(Int64(offset))
            var now = Self.t0
            var closedAt: NIODeadline?
            while closedAt == nil && now < Self.t0 + .seconds(10) {
                now = now + RedisConnectionDriver.tickInterval
                let actions = machine.tick(now: now)
                if actions.contains(.close) { closedAt = now }
                // Answered until `lastAnswer`, then silence.
                if now <= lastAnswer, actions.contains(.send([.ping])) { _ = machine.received(.pong) }
            }
            let closed = try! #require(closedAt)
            #expect(closed - lastAnswer <= .seconds(3), "stall noticed \(closed - lastAnswer) after the last answer")
            let after = machine.connectionClosed(random: 0)
            #expect(after.first == .reportDown)
        }
        // Answered heartbeats never close.
        var machine = Self.readySubscriber()
        var now = Self.t0
        for _ in 0..<100 {
            now = now + RedisConnectionDriver.tickInterval
            let actions = machine.tick(now: now)
            #expect(!actions.contains(.close))
            if actions.contains(.send([.ping])) { _ = machine.received(.pong) }
        }
    }

    @Test func handshakeThatNeverAnswersTimesOut() {
        var machine = R(role: .subscriber(internalChannels: Self.internalChannels))
        _ = machine.start()
        _ = machine.connected(now: Self.t0)
        do { let r = machine.tick(now: Self.t0 + .seconds(1)); #expect(r == []) }
        do { let r = machine.tick(now: Self.t0 + .milliseconds(1500)); #expect(r == [.close]) }
        do { let r = machine.connectionClosed(random: 0).first; #expect(r == .reportDown) }
    }

    @Test func backoffGrowsIsCappedAndJittered() {
        let machine = R(role: .publisher(syncChannel: "gw:_sync"))
        #expect(machine.backoff(attempt: 0, random: 1) == .milliseconds(100))
        #expect(machine.backoff(attempt: 0, random: 0) == .milliseconds(50))
        #expect(machine.backoff(attempt: 3, random: 1) == .milliseconds(800))
        #expect(machine.backoff(attempt: 10, random: 1) == .seconds(2))
        #expect(machine.backoff(attempt: 50, random: 0.5) == .milliseconds(1500))
        // The attempt count grows with each failure and resets after a connection.
        var m = R(role: .publisher(syncChannel: "gw:_sync"))
        _ = m.start()
        var delays: [TimeAmount] = []
        for _ in 0..<6 {
            for action in m.connectFailed(random: 1) { if case .scheduleReconnect(let d) = action { delays.append(d) } }
            _ = m.reconnectTimerFired()
        }
        #expect(delays == [.milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(1600), .seconds(2), .seconds(2)])
    }

    @Test func publishingIsBoundedAndALossIsAnnounced() {
        var machine = R(role: .publisher(syncChannel: "gw:_sync"))
        _ = machine.start()
        // Not connected yet: dropped, remembered.
        do { let r = machine.publish(count: 1, bytes: 100, writable: true); #expect(!r) }
        #expect(machine.lostPublishes)
        do { let r = machine.connected(now: Self.t0); #expect(r == [.send([.ping])]) }
        do { let r = machine.received(.pong); #expect(r == [.reportUp, .send([.publish(channel: "gw:_sync", payload: "1")])]) }
        #expect(!machine.lostPublishes)
        _ = machine.received(.integer)  // the announcement's answer
        // Ready: sent, counted until answered; not writable or over the cap: dropped.
        do { let r = machine.publish(count: 2, bytes: 1000, writable: true); #expect(r) }
        #expect(machine.inFlightBytes == 1000)
        do { let r = machine.publish(count: 1, bytes: 10, writable: false); #expect(!r) }
        do { let r = machine.publish(count: 1, bytes: machine.configuration.maxInFlightBytes, writable: true); #expect(!r) }
        #expect(machine.droppedPublishes == 3)
        _ = machine.received(.integer)
        _ = machine.received(.integer)
        #expect(machine.inFlightBytes == 0)
        // Publishes unanswered when the connection dies may be lost: announced after the reconnect.
        var lost = R(role: .publisher(syncChannel: "gw:_sync"))
        _ = lost.start()
        _ = lost.connected(now: Self.t0)
        _ = lost.received(.pong)
        do { let r = lost.publish(count: 1, bytes: 10, writable: true); #expect(r) }
        _ = lost.connectionClosed(random: 0)
        #expect(lost.lostPublishes)
        _ = lost.reconnectTimerFired()
        _ = lost.connected(now: Self.t0)
        do { let r = lost.received(.pong); #expect(r == [.reportUp, .send([.publish(channel: "gw:_sync", payload: "1")])]) }
    }

    @Test func stopReportsNothingAfterwards() {
        var machine = Self.readySubscriber()
        do { let r = machine.stop(); #expect(r == [.close]) }
        do { let r = machine.connectionClosed(random: 0); #expect(r == []) }
        do { let r = machine.tick(now: Self.t0 + .seconds(10)); #expect(r == []) }
        do { let r = machine.connectFailed(random: 0); #expect(r == []) }
    }

    enum Event: CaseIterable { case start, connected, connectFailed, closed, timer, pong, subscribeReply, subscribe, publish, tickQuiet, tickLate, stop }

    /// A subscriber machine brought to `state` by the events that lead there.
    static func machine(in state: R.State) -> R {
        var m = R(role: .subscriber(internalChannels: []))
        switch state {
        case .idle: break
        case .connecting: _ = m.start()
        case .handshaking: _ = m.start(); _ = m.connected(now: t0)
        case .ready: _ = m.start(); _ = m.connected(now: t0); _ = m.received(.pong)
        case .waitingToReconnect: _ = m.start(); _ = m.connectFailed(random: 0)
        case .stopped: _ = m.stop()
        }
        return m
    }

    /// Every event in every state: the next state, and whether the bus is reported down, and the
    /// connection closed.
    @Test func everyEventInEveryState() {
        let states: [R.State] = [.idle, .connecting(attempt: 0), .handshaking, .ready, .waitingToReconnect(attempt: 1), .stopped]
        for state in states {
            for event in Event.allCases {
                var m = Self.machine(in: state)
                let actions: [R.Action]
                switch event {
                case .start: actions = m.start()
                case .connected: actions = m.connected(now: Self.t0)
                case .connectFailed: actions = m.connectFailed(random: 0)
                case .closed: actions = m.connectionClosed(random: 0)
                case .timer: actions = m.reconnectTimerFired()
                case .pong: actions = m.received(.pong)
                case .subscribeReply: actions = m.received(.subscribed("gw:x"))
                case .subscribe: actions = m.subscribe(["gw:x"])
                case .publish: actions = m.publish(count: 1, bytes: 10, writable: true) ? [.send([])] : []
                case .tickQuiet: actions = m.tick(now: Self.t0 + .milliseconds(250))
                case .tickLate: actions = m.tick(now: Self.t0 + .seconds(2))
                case .stop: actions = m.stop()
                }
                let expected: (R.State, [R.Action])
                switch (state, event) {
                case (.idle, .start): expected = (.connecting(attempt: 0), [.connect])
                case (.connecting, .connected): expected = (.handshaking, [.send([.ping])])
                case (.connecting, .connectFailed): expected = (.waitingToReconnect(attempt: 1), [.reportDown, .scheduleReconnect(.milliseconds(100))])
                case (.waitingToReconnect(let n), .timer): expected = (.connecting(attempt: n), [.connect])
                case (.handshaking, .closed): expected = (.waitingToReconnect(attempt: 0), [.reportDown, .scheduleReconnect(.milliseconds(50))])
                case (.ready, .closed): expected = (.waitingToReconnect(attempt: 0), [.reportDown, .scheduleReconnect(.milliseconds(50))])
                case (.handshaking, .pong): expected = (.ready, [.reportUp])
                case (.handshaking, .subscribeReply), (.ready, .subscribeReply), (.ready, .pong): expected = (state, [.close])
                case (.ready, .subscribe): expected = (.ready, [.send([.subscribe(["gw:x"])])])
                case (.ready, .publish): expected = (.ready, [.send([])])
                case (.handshaking, .tickLate): expected = (.handshaking, [.close])
                case (.ready, .tickLate): expected = (.ready, [.send([.ping])])
                case (.handshaking, .stop), (.ready, .stop): expected = (.stopped, [.close])
                case (_, .stop): expected = (.stopped, [])
                default: expected = (state, [])
                }
                #expect(m.state == expected.0, "\(state) + \(event)")
                #expect(actions == expected.1, "\(state) + \(event)")
            }
        }
    }

    /// The first race of the issue, end to end between the two machines: the bus reconnects, a channel's
    /// first subscriber arrives between the connect and the PONG; it must be SUBSCRIBEd once the bus is up.
    @Test func channelFirstSubscribedBeforeThePongIsSubscribedAfterIt() {
        var redis = R(role: .subscriber(internalChannels: Self.internalChannels))
        var channel = BusSubscriptionStateMachine()
        var busUp = false
        var sent: [R.Command] = []
        func run(_ actions: [R.Action]) {
            for action in actions {
                switch action {
                case .send(let commands): sent += commands
                case .reportUp:
                    busUp = true
                    if channel.busRestored() == .subscribe { run(redis.subscribe(["gw:topic:a"])) }
                case .reportDown:
                    busUp = false
                    _ = channel.busLost()
                default: break
                }
            }
        }
        run(redis.start())
        run(redis.connectFailed(random: 0))
        run(redis.reconnectTimerFired())
        run(redis.connected(now: Self.t0))
        // Between the connect and the PONG:
        do { let r = channel.subscriberAdded(busUp: busUp); #expect(r == .readStore) }
        run(redis.received(.subscribed("gw:_sync")))
        run(redis.received(.subscribed("gw:_control")))
        run(redis.received(.pong))
        #expect(sent.last == .subscribe(["gw:topic:a"]))
        #expect(channel.state == .subscribing(subscribers: 1))
        do { let r = redis.received(.subscribed("gw:topic:a")); #expect(r == [.subscribeConfirmed("gw:topic:a")]) }
        do { let r = channel.subscribeConfirmed(); #expect(r == .readStore) }
    }
}
