import CoreMetrics

/// The fan-out's swift-metrics handles, made by the gateway (with its Prometheus registry) and handed to the
/// Hub and the Redis bus. Every handle is lock-free to update (the backend's atomics): the delivery path
/// counts without a shared lock. The default does nothing (unit tests, `bench`).
public struct FanoutMetrics: Sendable {
    /// Messages handed to a subscriber's connection, by wire format (index `WireFormat.rawValue`).
    public var delivered: [CoreMetrics.Counter]
    /// From a message's `created_at` to its hand-out to this instance's subscribers (once per message and
    /// instance, live messages only).
    public var publishToDeliver: CoreMetrics.Timer
    /// Live subscriptions registered with the Hub, and channels with at least one of them.
    public var subscriptions: Meter
    public var channels: Meter
    /// Gaps in `seq` seen on live messages, each repaired from the store before anything later went out.
    public var gapRepairs: CoreMetrics.Counter
    /// Store reads of subscriptions catching up (a subscribe at the channel's head reads nothing).
    public var catchUpReads: CoreMetrics.Counter
    /// Batched head reads: polling while the bus is down, and the periodic reconcile.
    public var pollHeadChecks: CoreMetrics.Counter
    public var reconcileHeadChecks: CoreMetrics.Counter
    /// Channels a reconcile found behind the store while the bus was up.
    public var reconcileRepairs: CoreMetrics.Counter
    /// 1 while the Hub polls the store because the bus is down.
    public var polling: Recorder
    /// Live batches handed to local subscribers, and the messages in them.
    public var batches: CoreMetrics.Counter
    public var batchedMessages: CoreMetrics.Counter
    /// The Redis bus: whether it is up, times it came up and went down, unanswered heartbeats, PUBLISHes
    /// dropped (left to the store fallback), payloads whose MAC did not verify.
    public var busUp: Recorder
    public var busConnects: CoreMetrics.Counter
    public var busDisconnects: CoreMetrics.Counter
    public var busStalls: CoreMetrics.Counter
    public var busDroppedPublishes: CoreMetrics.Counter
    public var busSealFailures: CoreMetrics.Counter
    /// Readiness canaries sent and come back, and the age of the newest return in seconds (-1: none yet).
    public var canariesSent: CoreMetrics.Counter
    public var canariesReceived: CoreMetrics.Counter
    public var canaryAge: Recorder

    public init(delivered: [CoreMetrics.Counter], publishToDeliver: CoreMetrics.Timer, subscriptions: Meter, channels: Meter,
                gapRepairs: CoreMetrics.Counter, pollHeadChecks: CoreMetrics.Counter, reconcileHeadChecks: CoreMetrics.Counter,
                reconcileRepairs: CoreMetrics.Counter, polling: Recorder, batches: CoreMetrics.Counter, batchedMessages: CoreMetrics.Counter,
                busUp: Recorder, busConnects: CoreMetrics.Counter, busDisconnects: CoreMetrics.Counter, busStalls: CoreMetrics.Counter,
                busDroppedPublishes: CoreMetrics.Counter, busSealFailures: CoreMetrics.Counter,
                canariesSent: CoreMetrics.Counter, canariesReceived: CoreMetrics.Counter, canaryAge: Recorder, catchUpReads: CoreMetrics.Counter) {
        self.catchUpReads = catchUpReads
        self.canariesSent = canariesSent
        self.canariesReceived = canariesReceived
        self.canaryAge = canaryAge
        precondition(delivered.count == WireFormat.allCases.count)
        self.delivered = delivered
        self.publishToDeliver = publishToDeliver
        self.subscriptions = subscriptions
        self.channels = channels
        self.gapRepairs = gapRepairs
        self.pollHeadChecks = pollHeadChecks
        self.reconcileHeadChecks = reconcileHeadChecks
        self.reconcileRepairs = reconcileRepairs
        self.polling = polling
        self.batches = batches
        self.batchedMessages = batchedMessages
        self.busUp = busUp
        self.busConnects = busConnects
        self.busDisconnects = busDisconnects
        self.busStalls = busStalls
        self.busDroppedPublishes = busDroppedPublishes
        self.busSealFailures = busSealFailures
    }

    /// Handles that record nothing.
    public static var none: FanoutMetrics {
        let noop = NOOPMetricsHandler.instance
        func counter() -> CoreMetrics.Counter { CoreMetrics.Counter(label: "", dimensions: [], handler: noop, factory: noop) }
        func meter() -> Meter { Meter(label: "", dimensions: [], handler: noop, factory: noop) }
        func gauge() -> Recorder { Recorder(label: "", dimensions: [], aggregate: false, factory: noop) }
        return FanoutMetrics(delivered: WireFormat.allCases.map { _ in counter() }, publishToDeliver: CoreMetrics.Timer(label: "", dimensions: [], handler: noop, factory: noop),
                             subscriptions: meter(), channels: meter(), gapRepairs: counter(), pollHeadChecks: counter(), reconcileHeadChecks: counter(),
                             reconcileRepairs: counter(), polling: gauge(), batches: counter(), batchedMessages: counter(), busUp: gauge(),
                             busConnects: counter(), busDisconnects: counter(), busStalls: counter(), busDroppedPublishes: counter(), busSealFailures: counter(),
                             canariesSent: counter(), canariesReceived: counter(), canaryAge: gauge(), catchUpReads: counter())
    }
}
