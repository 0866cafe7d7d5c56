import Foundation
import Histogram

struct Report {
    let snapshot: Ledger.Snapshot
    let seconds: Double
    let publishSeconds: Double
    let subscribed: Int
    /// While publishing: the share of all cores busy, and the tester's share of one core (nil off Linux).
    var load: (busy: Double, tester: Double)? = nil

    /// The run itself failed (nothing published, or clients could not connect): not a verdict on ordering.
    var failed: Bool { snapshot.sent == 0 || subscribed == 0 }

    static let percentiles: [(String, Double)] = [("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9)]

    func latency(_ h: Histogram<UInt64>) -> [(String, Double)] {
        guard h.totalCount > 0 else { return [] }
        return Self.percentiles.map { ($0.0, Double(h.valueAtPercentile($0.1)) / 1000) } + [("max", Double(h.max) / 1000)]
    }

    func summary(_ plan: Plan) -> String {
        let s = snapshot
        var out = """
            loadtest: \(plan.endpoints.count) instance(s), \(plan.subscribers) subscribers (\(plan.weights.map { "\($0.0.rawValue)=\($0.1)" }.joined(separator: ","))), \
            \(plan.publishers) publishers, \(plan.channels.count) channels, \(plan.size)-byte bodies\(plan.churn ? ", churn" : "")
              published \(s.sent) in \(String(format: "%.1f", publishSeconds)) s (\(Int(Double(s.sent) / max(publishSeconds, 0.001)))/s), \
            acked \(s.ack.totalCount), deliveries \(s.received) (\(Int(Double(s.received) / max(seconds, 0.001)))/s over \(String(format: "%.1f", seconds)) s), \
            reconnects \(s.reconnects)
              publish → deliver (ms): \(latency(s.delivery).map { "\($0.0) \(String(format: "%.2f", $0.1))" }.joined(separator: "  "))
              publish → ack (ms):     \(latency(s.ack).map { "\($0.0) \(String(format: "%.2f", $0.1))" }.joined(separator: "  "))
              violations: \(s.totalViolations)
            """
        if s.totalViolations > 0 {
            out += " (" + Ledger.Violation.allCases.compactMap { k in s.violations[k].map { "\(k.rawValue) \($0)" } }.joined(separator: ", ") + ")"
            for example in s.examples { out += "\n    " + example }
        }
        if !s.errors.isEmpty { out += "\n  errors:\n" + s.errors.map { "    " + $0 }.joined(separator: "\n") }
        if let load {
            out += "\n  machine while publishing: all cores \(Int((load.busy * 100).rounded())) % busy, the tester \(Int((load.tester * 100).rounded())) % of one core"
            if load.busy >= 0.9 { out += " (no idle time left: the machine, not only the gateway, sets these latencies)" }
        }
        return out
    }

    func json(_ plan: Plan) -> String {
        let s = snapshot
        func histogram(_ h: Histogram<UInt64>) -> [String: Any] {
            var out: [String: Any] = ["count": h.totalCount]
            for (name, value) in latency(h) { out[name + "_ms"] = value }
            return out
        }
        var violations: [String: Any] = ["total": s.totalViolations]
        for kind in Ledger.Violation.allCases { violations[kind.rawValue] = s.violations[kind] ?? 0 }
        let object: [String: Any] = [
            "instances": plan.endpoints.map(\.description), "subscribers": plan.subscribers, "subscribed": subscribed,
            "publishers": plan.publishers, "channels": plan.channels.count, "size": plan.size, "churn": plan.churn,
            "seconds": seconds, "publish_seconds": publishSeconds, "published": s.sent, "acked": s.ack.totalCount,
            "deliveries": s.received, "deliveries_per_second": Double(s.received) / max(seconds, 0.001), "reconnects": s.reconnects,
            "delivery_latency": histogram(s.delivery), "ack_latency": histogram(s.ack),
            "violations": violations, "examples": s.examples, "errors": s.errors,
            "machine_busy_share": load?.busy ?? -1, "tester_core_share": load?.tester ?? -1,
        ]
        return String(decoding: (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])) ?? Data(), as: UTF8.self)
    }
}
