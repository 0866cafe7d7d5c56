import Foundation

/// How busy the machine and the tester were while publishing, from `/proc`: on a machine shared by the
/// instances, their stores and the tester, latencies say more about the machine than about the gateway once
/// its cores have no idle time left; the report says so.
struct MachineLoad: Sendable, Equatable {
    /// Jiffies of all cores (the `cpu` line of `/proc/stat`): every field, and idle + iowait.
    var total: UInt64
    var idle: UInt64
    /// The tester's own CPU seconds (utime + stime).
    var tester: Double
    var at: Date

    static func sample() -> MachineLoad? {
        guard let stat = try? String(contentsOfFile: "/proc/stat", encoding: .utf8), let line = stat.split(separator: "\n").first,
              let (total, idle) = parse(cpuLine: line) else { return nil }
        return MachineLoad(total: total, idle: idle, tester: Fanout.cpuSeconds([getpid()]), at: Date())
    }

    /// `cpu  user nice system idle iowait irq softirq steal …` → (sum of the fields, idle + iowait).
    static func parse(cpuLine: Substring) -> (UInt64, UInt64)? {
        let fields = cpuLine.split(separator: " ")
        guard fields.first == "cpu", fields.count >= 5 else { return nil }
        let values = fields.dropFirst().compactMap { UInt64($0) }
        guard values.count == fields.count - 1 else { return nil }
        return (values.reduce(0, +), values[3] + (values.count > 4 ? values[4] : 0))
    }

    /// Between two samples: the share of all cores that was busy (0…1) and the tester's share of one core.
    static func between(_ start: MachineLoad, _ end: MachineLoad) -> (busy: Double, tester: Double) {
        let total = Double(end.total &- start.total)
        let idle = Double(end.idle &- start.idle)
        let seconds = end.at.timeIntervalSince(start.at)
        return (total > 0 ? max(0, min(1, 1 - idle / total)) : 0, seconds > 0 ? (end.tester - start.tester) / seconds : 0)
    }
}
