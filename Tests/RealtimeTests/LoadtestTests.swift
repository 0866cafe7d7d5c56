import Foundation
import Gateway
import Testing

/// The `loadtest` tool against real gateways: clean on 3 instances (with and without churn), and it catches
/// a gateway that drops or reorders live messages (test-only fault injection).
@Suite(.serialized) struct LoadtestTests {
    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("loadtest").path
    }

    /// Runs loadtest to completion; returns its exit status, its JSON report and its output.
    static func run(_ arguments: [String]) async throws -> (Int32, [String: Any], String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-lt-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let process = try ChildProcess(binary, arguments + ["--secret", TestGateway.secret, "--json", dir + "/report.json"], output: dir + "/out.txt")
        let status = try await within(300, "loadtest run") { await process.exitStatus() }
        let output = (try? String(contentsOfFile: dir + "/out.txt", encoding: .utf8)) ?? ""
        let report = json((try? String(contentsOfFile: dir + "/report.json", encoding: .utf8)) ?? "")
        print(output)
        return (status, report, output)
    }

    static func violations(_ report: [String: Any]) -> [String: Int] {
        (report["violations"] as? [String: Any] ?? [:]).compactMapValues { ($0 as? NSNumber)?.intValue }
    }

    static let workload = ["--subscribers", "30", "--transports", "ws=2,sse=1,poll=1", "--publishers", "3", "--channels", "5",
                           "--duration", "3", "--rate", "300", "--ramp", "0.5", "--drain", "30"]

    @Test func cleanRunOnThreeInstancesReportsNoViolationAndTheLatencies() async throws {
        try await withCluster(instances: 3) { cluster in
            let urls = cluster.ports.flatMap { ["--url", "http://127.0.0.1:\($0)"] }
            let (status, report, output) = try await Self.run(urls + Self.workload)
            #expect(status == 0)
            #expect(Self.violations(report)["total"] == 0)
            let published = (report["published"] as? NSNumber)?.intValue ?? 0
            #expect(published > 500)
            // How busy the machine and the tester were while publishing (a run here keeps both cores partly busy).
            let busy = (report["machine_busy_share"] as? NSNumber)?.doubleValue ?? -1
            let tester = (report["tester_core_share"] as? NSNumber)?.doubleValue ?? -1
            #expect(busy > 0 && busy <= 1 && tester > 0 && tester < Double(ProcessInfo.processInfo.activeProcessorCount), "\(busy) \(tester)")
            #expect(output.contains("machine while publishing: all cores \(Int((busy * 100).rounded())) % busy"), "\(output)")
            #expect((report["acked"] as? NSNumber)?.intValue == published)
            // 30 subscribers over 5 channels: each message reaches 6 of them.
            #expect((report["deliveries"] as? NSNumber)?.intValue == published * 6)
            let latency = report["delivery_latency"] as? [String: Any] ?? [:]
            for key in ["p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"] { #expect(latency[key] is NSNumber, "\(key)") }
            #expect((report["ack_latency"] as? [String: Any])?["p99_ms"] is NSNumber)
        }
    }

    @Test func churnAcrossInstancesStillSeesEveryMessageExactlyOnce() async throws {
        try await withCluster(instances: 3) { cluster in
            let urls = cluster.ports.flatMap { ["--url", "http://127.0.0.1:\($0)"] }
            let (status, report, _) = try await Self.run(urls + Self.workload + ["--churn", "--churn-every", "0.7"])
            #expect(status == 0)
            #expect(Self.violations(report)["total"] == 0)
            #expect((report["reconnects"] as? NSNumber)?.intValue ?? 0 > 20)
            let published = (report["published"] as? NSNumber)?.intValue ?? 0
            #expect((report["deliveries"] as? NSNumber)?.intValue == published * 6)
        }
    }

    /// The tester's WebSocket clients answer the server's pings: with a ping every second (two unanswered
    /// close the connection), a run of several seconds keeps every connection, subscribers' and publisher's.
    @Test func webSocketClientsAnswerPingsAndKeepTheirConnections() async throws {
        try await withTestGateway(configure: { $0.wsPingSeconds = 1 }) { gateway in
            let (status, report, output) = try await Self.run([
                "--url", "http://127.0.0.1:\(gateway.port)", "--subscribers", "4", "--transports", "ws=1", "--publishers", "1",
                "--channels", "1", "--duration", "5", "--rate", "20", "--ramp", "0", "--drain", "5",
            ])
            #expect(status == 0, "\(output)")
            #expect((report["reconnects"] as? NSNumber)?.intValue == 0, "\(output)")
            #expect((report["errors"] as? [Any])?.isEmpty == true, "\(output)")
            let published = (report["published"] as? NSNumber)?.intValue ?? 0
            #expect(published > 50 && (report["deliveries"] as? NSNumber)?.intValue == published * 4)
        }
    }

    @Test(arguments: ["drop:50", "swap:50"])
    func aGatewayThatLosesOrReordersMessagesFailsTheRun(fault: String) async throws {
        try await withTestGateway(configure: { $0.testFault = fault }) { gateway in
            let (status, report, output) = try await Self.run([
                "--url", "http://127.0.0.1:\(gateway.port)", "--subscribers", "10", "--transports", "ws=1,sse=1", "--publishers", "2",
                "--channels", "2", "--duration", "2", "--rate", "200", "--ramp", "0", "--drain", "5",
            ])
            #expect(status == 1, "\(output)")
            let found = Self.violations(report)
            #expect(found["total"] ?? 0 > 0)
            if fault.hasPrefix("drop") { #expect(found["gap"] ?? 0 > 0, "\(found)") } else { #expect((found["reorder"] ?? 0) + (found["gap"] ?? 0) > 0, "\(found)") }
        }
    }
}
