import Auth
import CoreMetrics
import Fanout
import Prometheus

/// The instance's metrics: swift-metrics handles backed by a Prometheus registry of its own (several instances
/// in one process — the tests — do not mix), exposed at `/metrics`. Every handle updates with atomics: no
/// lock is shared on the delivery path, and a scrape reads the registry without touching any connection.
final class GatewayMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    private let instance: (String, String)

    /// Counters of things that happen, each one series (see `Event`).
    private let events: [CoreMetrics.Counter]
    /// Live streams by transport (`SessionDriver.Kind`).
    private let connections: [SessionDriver.Kind: Meter]
    /// Messages handed to connections by long-poll answers (WebSocket and SSE are counted by the Hub's subscriptions).
    let polledMessages: CoreMetrics.Counter
    /// Refused tokens by reason.
    private let authFailures: [String: CoreMetrics.Counter]
    /// 1 while the instance drains (readiness answers 503 SHUTTING_DOWN).
    let draining: Recorder
    let fanout: FanoutMetrics
    let storeAppend: CoreMetrics.Timer

    /// Things counted at `/metrics` (name, help, labels besides `instance`).
    enum Event: Int, CaseIterable {
        case published, storeErrors, rateLimited, slowConsumerCloses, revocations
        case jwksReloadOK, jwksReloadFailed, tlsReloadOK, tlsReloadFailed
        case presenceWrites, presenceWriteBytes, presenceReads, presenceEvents, typingReceived, typingThrottled
        case pollReadsStarted, pollReadsJoined, retentionDeleted, retentionFailures

        var series: (name: String, help: String, labels: [(String, String)]) {
            switch self {
            case .published: ("gateway_messages_published_total", "Messages committed through this instance.", [])
            case .storeErrors: ("gateway_store_errors_total", "Publishes answered 503 because the store failed.", [])
            case .rateLimited: ("gateway_rate_limited_total", "Publishes and commands refused by a rate limit.", [])
            case .slowConsumerCloses: ("gateway_slow_consumer_closes_total", "Connections closed for passing their send budget.", [])
            case .revocations: ("gateway_revocations_total", "Revocations applied on this instance.", [])
            case .jwksReloadOK: ("gateway_jwks_reloads_total", "JWKS file reloads (SIGHUP) by result.", [("result", "ok")])
            case .jwksReloadFailed: ("gateway_jwks_reloads_total", "JWKS file reloads (SIGHUP) by result.", [("result", "failed")])
            case .tlsReloadOK: ("gateway_tls_reloads_total", "TLS certificate reloads (SIGHUP) by result.", [("result", "ok")])
            case .tlsReloadFailed: ("gateway_tls_reloads_total", "TLS certificate reloads (SIGHUP) by result.", [("result", "failed")])
            case .presenceWrites: ("gateway_presence_writes_total", "Writes of this instance's presence entries to Redis (changes and heartbeats).", [])
            case .presenceWriteBytes: ("gateway_presence_write_bytes_total", "Bytes of those writes.", [])
            case .presenceReads: ("gateway_presence_reads_total", "Presence lists read from Redis (queries, and watched channels that changed).", [])
            case .presenceEvents: ("gateway_presence_events_total", "join and leave events handed to watching sessions.", [])
            case .typingReceived: ("gateway_typing_total", "typing events received from the bus, and typing commands not relayed.", [("result", "received")])
            case .typingThrottled: ("gateway_typing_total", "typing events received from the bus, and typing commands not relayed.", [("result", "throttled")])
            case .pollReadsStarted: ("gateway_poll_store_reads_total", "Store reads of waiting long-polls, started or joined (shared).", [("read", "started")])
            case .pollReadsJoined: ("gateway_poll_store_reads_total", "Store reads of waiting long-polls, started or joined (shared).", [("read", "joined")])
            case .retentionDeleted: ("gateway_retention_deleted_total", "Messages deleted by the channels' retention limits.", [])
            case .retentionFailures: ("gateway_retention_failures_total", "Retention runs of a channel that failed (retried at the next run).", [])
            }
        }
    }

    /// Metric label of each refusal reason.
    static func label(_ failure: AuthFailure) -> String {
        switch failure {
        case .missing: "missing"
        case .malformed: "malformed"
        case .badSignature: "bad_signature"
        case .expired: "expired"
        case .notYetValid: "not_yet_valid"
        case .missingClaim: "missing_claim"
        case .unsupportedAlgorithm: "unsupported_algorithm"
        case .revoked: "revoked"
        case .wrongAudience: "wrong_audience"
        case .wrongIssuer: "wrong_issuer"
        }
    }

    init(instance name: String) {
        let registry = self.registry
        var factory = PrometheusMetricsFactory(registry: registry)
        // Sub-millisecond hand-outs on one machine, seconds when a bus or a store stalls.
        let latency: [Duration] = [.microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
                                   .milliseconds(20), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
                                   .milliseconds(2500), .seconds(5), .seconds(10)]
        factory.defaultDurationHistogramBuckets = latency
        self.factory = factory
        let instance = ("instance", name)
        self.instance = instance
        // A series' whole name is its `metricName` (no unit suffix is appended: the names carry theirs).
        func named(_ name: String, _ help: String) -> MetricNameDescriptor { MetricNameDescriptor(metricName: name, unitName: "", helpText: help) }
        func counter(_ name: String, _ help: String, _ labels: [(String, String)] = []) -> CoreMetrics.Counter {
            let labels = [instance] + labels
            return CoreMetrics.Counter(label: name, dimensions: labels, handler: registry.makeCounter(descriptor: named(name, help), labels: labels), factory: factory)
        }
        func meter(_ name: String, _ help: String, _ labels: [(String, String)] = []) -> Meter {
            let labels = [instance] + labels
            return Meter(label: name, dimensions: labels, handler: registry.makeGauge(descriptor: named(name, help), labels: labels), factory: factory)
        }
        func gauge(_ name: String, _ help: String) -> Recorder {
            Recorder(label: name, dimensions: [instance], aggregate: false, handler: registry.makeGauge(descriptor: named(name, help), labels: [instance]), factory: factory)
        }
        func timer(_ name: String, _ help: String) -> CoreMetrics.Timer {
            CoreMetrics.Timer(label: name, dimensions: [instance],
                              handler: registry.makeDurationHistogram(descriptor: named(name, help), labels: [instance], buckets: latency), factory: factory)
        }
        events = Event.allCases.map { counter($0.series.name, $0.series.help, $0.series.labels) }
        let transports: [SessionDriver.Kind] = [.webSocket, .serverSentEvents, .longPoll]
        connections = Dictionary(uniqueKeysWithValues: transports.map {
            ($0, meter("gateway_connections", "Live streams by transport.", [("transport", $0.rawValue)]))
        })
        let deliveredHelp = "Messages handed to client connections, by transport (catch-up and live)."
        let ws = counter("gateway_messages_delivered_total", deliveredHelp, [("transport", "ws")])
        let sse = counter("gateway_messages_delivered_total", deliveredHelp, [("transport", "sse")])
        polledMessages = counter("gateway_messages_delivered_total", deliveredHelp, [("transport", "poll")])
        let reasons: [AuthFailure] = [.missing, .malformed, .badSignature, .expired, .notYetValid, .missingClaim(""), .unsupportedAlgorithm,
                                      .revoked, .wrongAudience, .wrongIssuer]
        authFailures = Dictionary(uniqueKeysWithValues: reasons.map {
            (Self.label($0), counter("gateway_auth_failures_total", "Tokens refused, by reason.", [("reason", Self.label($0))]))
        })
        draining = gauge("gateway_draining", "1 once the instance started draining (SIGTERM): readiness answers 503.")
        storeAppend = timer("gateway_store_append_seconds", "From a publish handed to the store to its commit (queue and transaction).")
        let reconcileHelp = "Batched reads of channel heads: polling while the bus is down, and the periodic reconcile."
        fanout = FanoutMetrics(
            delivered: WireFormat.allCases.map { $0 == .serverSentEvents ? sse : ws },
            publishToDeliver: timer("gateway_publish_to_deliver_seconds",
                                    "From a message's created_at (the store's clock) to its hand-out to this instance's subscribers, once per message."),
            subscriptions: meter("gateway_subscriptions", "Live subscriptions (WebSocket and SSE) on this instance."),
            channels: meter("gateway_channels", "Channels with at least one local subscriber."),
            gapRepairs: counter("gateway_gap_repairs_total", "Gaps in seq seen on live messages, filled from the store before anything later."),
            pollHeadChecks: counter("gateway_store_head_checks_total", reconcileHelp, [("reason", "poll")]),
            reconcileHeadChecks: counter("gateway_store_head_checks_total", reconcileHelp, [("reason", "reconcile")]),
            reconcileRepairs: counter("gateway_reconcile_repairs_total", "Channels a reconcile found behind the store while the bus was up."),
            polling: gauge("gateway_fanout_polling", "1 while the Hub polls the store because the bus is down."),
            batches: counter("gateway_fanout_batches_total", "Batches of live messages handed to local subscribers (each one write per subscriber)."),
            batchedMessages: counter("gateway_fanout_batched_messages_total", "Live messages in those batches."),
            busUp: gauge("gateway_redis_up", "1 when the Redis subscriber connection is active."),
            busConnects: counter("gateway_redis_connects_total", "Times the Redis bus came up (the first start and every reconnect)."),
            busDisconnects: counter("gateway_redis_disconnects_total", "Times the Redis bus went down (refused, closed, or stalled)."),
            busStalls: counter("gateway_redis_stalls_total", "Redis heartbeats that went unanswered."),
            busDroppedPublishes: counter("gateway_redis_dropped_publishes_total", "PUBLISHes not sent to Redis (left to the store fallback)."),
            busSealFailures: counter("gateway_bus_seal_failures_total", "Bus payloads dropped because their MAC (cluster key) did not verify."),
            canariesSent: counter("gateway_canaries_total", "Readiness canaries published to the bus, and come back.", [("direction", "sent")]),
            canariesReceived: counter("gateway_canaries_total", "Readiness canaries published to the bus, and come back.", [("direction", "received")]),
            canaryAge: gauge("gateway_canary_age_seconds", "Since the newest readiness canary came back over the bus (-1: none yet), at the last send."),
            catchUpReads: counter("gateway_catch_up_reads_total", "Store reads of WebSocket and SSE subscriptions catching up (pages); a subscribe at the channel's head reads none."))
    }

    func count(_ event: Event, _ n: Int = 1) { events[event.rawValue].increment(by: n) }

    func authFailed(_ failure: AuthFailure) { authFailures[Self.label(failure)]?.increment() }

    func connectionOpened(_ kind: SessionDriver.Kind) { connections[kind]?.increment() }
    func connectionClosed(_ kind: SessionDriver.Kind) { connections[kind]?.decrement() }

    /// The Prometheus text exposition.
    func text() -> String { registry.emitToString() }
}
