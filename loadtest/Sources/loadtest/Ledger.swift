import Foundation
import Histogram
import NIOConcurrencyHelpers

/// What every virtual client reports to: per channel, the one (seq → message id) mapping every subscriber
/// must agree on, the acked publishes, the violations found, and the latency histograms.
final class Ledger: Sendable {
    enum Violation: String, CaseIterable, Sendable {
        case gap, duplicate, reorder, mismatch, missing
    }

    private struct State {
        var idBySeq: [String: [Int64: String]] = [:]
        var acked: [String: Set<Int64>] = [:]
        var counts: [Violation: Int] = [:]
        var examples: [String] = []
        var delivery = Histogram<UInt64>.latencyMicros
        var ack = Histogram<UInt64>.latencyMicros
        var sent = 0
        var received = 0
        var connections = 0
        var reconnects = 0
        var errors: [String] = []
    }
    private let state = NIOLockedValueBox(State())

    func violation(_ kind: Violation, _ detail: String) {
        state.withLockedValue { s in
            s.counts[kind, default: 0] += 1
            if s.examples.count < 20 { s.examples.append("\(kind.rawValue): \(detail)") }
        }
    }

    /// Records `id` as `seq` of `channel`; returns the id seen before for that seq when it differs.
    private static func conflict(_ s: inout State, _ channel: String, _ seq: Int64, _ id: String) -> String? {
        if let known = s.idBySeq[channel]?[seq] { return known == id ? nil : known }
        s.idBySeq[channel, default: [:]][seq] = id
        return nil
    }

    /// A message a subscriber received: checks the id against every other subscriber's, records latency.
    func delivered(channel: String, seq: Int64, id: String, latencyMicros: UInt64?) {
        let conflict: String? = state.withLockedValue { s in
            s.received += 1
            if let latencyMicros { _ = s.delivery.record(min(latencyMicros, 60_000_000)) }
            return Self.conflict(&s, channel, seq, id)
        }
        if let conflict { violation(.mismatch, "\(channel) seq \(seq) is \(id) here and \(conflict) elsewhere") }
    }

    func acked(channel: String, seq: Int64, id: String, latencyMicros: UInt64) {
        let conflict: String? = state.withLockedValue { s in
            _ = s.ack.record(min(latencyMicros, 60_000_000))
            s.acked[channel, default: []].insert(seq)
            return Self.conflict(&s, channel, seq, id)
        }
        if let conflict { violation(.mismatch, "\(channel) seq \(seq) was acked as \(id) but delivered as \(conflict)") }
    }

    func sent() { state.withLockedValue { $0.sent += 1 } }
    func connected(_ delta: Int) { state.withLockedValue { $0.connections += delta } }
    func reconnected() { state.withLockedValue { $0.reconnects += 1 } }
    func error(_ text: String) { state.withLockedValue { if $0.errors.count < 20 { $0.errors.append(text) } } }

    func ackedSeqs(_ channel: String) -> Set<Int64> { state.withLockedValue { $0.acked[channel] ?? [] } }
    func maxAcked(_ channel: String) -> Int64 { state.withLockedValue { $0.acked[channel]?.max() ?? 0 } }

    struct Snapshot {
        var sent: Int
        var received: Int
        var connections: Int
        var reconnects: Int
        var violations: [Violation: Int]
        var examples: [String]
        var errors: [String]
        var delivery: Histogram<UInt64>
        var ack: Histogram<UInt64>
        var totalViolations: Int { violations.values.reduce(0, +) }
    }

    func snapshot() -> Snapshot {
        state.withLockedValue { s in
            Snapshot(sent: s.sent, received: s.received, connections: s.connections, reconnects: s.reconnects, violations: s.counts,
                     examples: s.examples, errors: s.errors, delivery: s.delivery, ack: s.ack)
        }
    }
}

/// One subscriber's view of one channel: contiguous from the position it started after, across reconnects.
struct Track {
    let channel: String
    /// The position the subscription started after (from `subscribed`, the first SSE `id:`, or the head).
    let start: Int64
    private(set) var last: Int64

    init(channel: String, start: Int64) {
        self.channel = channel
        self.start = start
        self.last = start
    }

    /// Checks one delivery; returns false for a duplicate or an older message (not counted as progress).
    mutating func see(_ seq: Int64, ledger: Ledger, who: String) -> Bool {
        if seq == last + 1 {
            last = seq
            return true
        }
        if seq <= last {
            ledger.violation(seq == last ? .duplicate : .reorder, "\(who) on \(channel): got \(seq) after \(last)")
            return false
        }
        ledger.violation(.gap, "\(who) on \(channel): got \(seq) after \(last) (missing \(last + 1)…\(seq - 1))")
        last = seq
        return true
    }

    /// After the drain: every acked message after the start must have been delivered.
    func checkComplete(_ ledger: Ledger, who: String) {
        let missing = ledger.ackedSeqs(channel).filter { $0 > last }.count
        if missing > 0 { ledger.violation(.missing, "\(who) on \(channel): \(missing) acked messages after \(last) never arrived") }
    }
}

/// The seq a cursor names. Cursors are opaque to clients; this tool is ours and knows their form.
func seq(ofCursor cursor: String) -> Int64? {
    cursor.split(separator: ".").first.flatMap { Int64($0) }
}

func nowNanos() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

extension Histogram where Count == UInt64 {
    /// Latencies in µs, up to a minute, three significant digits (every latency the tools report).
    static var latencyMicros: Self { Histogram(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three) }
}
