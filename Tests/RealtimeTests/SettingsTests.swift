import Configuration
import Foundation
@testable import Gateway
import Testing

/// Settings through swift-configuration: one table (`GatewayConfig.settings`) that is exactly what is read and
/// what `gateway serve --help` lists; flags over the environment over a JSON file; a bad value from any source
/// stops the start naming the setting.
@Suite(.serialized) struct SettingsTests {
    @Test func theTableIsExactlyWhatIsRead() throws {
        let reader = SettingsReader(ConfigReader(provider: InMemoryProvider(values: [:])))
        _ = try GatewayConfig.read(reader)
        let table = Set(GatewayConfig.settings.map(\.name))
        #expect(table.count == GatewayConfig.settings.count, "a setting listed twice")
        #expect(reader.asked.subtracting(table).isEmpty, "read but not in the table: \(reader.asked.subtracting(table).sorted())")
        #expect(table.subtracting(reader.asked) == ["GATEWAY_CONFIG_FILE"], "in the table but never read: \(table.subtracting(reader.asked).sorted())")
    }

    @Test func helpListsEverySetting() async throws {
        let (status, help) = try await TestServices.run(GatewayProcess.binary, ["serve", "--help"], environment: ["PATH": "/usr/bin:/bin"])
        #expect(status == 0)
        for setting in GatewayConfig.settings { #expect(help.contains(setting.name + " (default: "), "\(setting.name) missing from --help") }
    }

    static func file(_ json: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gw-settings-\(UUID().uuidString).json").path
        try json.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func flagsWinOverTheEnvironmentWhichWinsOverTheFile() async throws {
        let port = TestServices.freePort()
        let dataDir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-settings-\(UUID().uuidString)").path
        // The secret and the port only in the file (nested and dotted keys, a number); the instance name in all three.
        let path = try Self.file("""
            {"gateway": {"port": \(port), "instance": {"id": "from-file"}, "data": {"dir": "\(dataDir)"}}, "gateway.jwt.secret": "\(TestGateway.secret)"}
            """)
        defer { try? FileManager.default.removeItem(atPath: path); try? FileManager.default.removeItem(atPath: dataDir) }
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("gw-settings-\(UUID().uuidString).log").path
        defer { try? FileManager.default.removeItem(atPath: log) }
        let process = try TestServices.spawn(GatewayProcess.binary, ["serve", "--set", "GATEWAY_INSTANCE_ID=from-flag"],
                                             environment: ["GATEWAY_CONFIG_FILE": path, "GATEWAY_INSTANCE_ID": "from-env", "PATH": "/usr/bin:/bin"], log: log)
        defer { TestServices.forget(process) }
        do {
            try await eventually("the gateway configured by its file answers") {
                guard process.isRunning else { throw ServiceError(description: "exited: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")") }
                return (try? await HTTPTestClient.request(.GET, port: port, "/readyz"))?.status == 200
            }
            let metrics = try await HTTPTestClient.request(.GET, port: port, "/metrics").body
            #expect(metrics.contains("instance=\"from-flag\""))
            #expect(!metrics.contains("from-env") && !metrics.contains("from-file"))
        } catch {
            await process.terminate(SIGKILL)
            throw error
        }
        await process.terminate(SIGTERM)
        #expect(await process.exitStatus() == 0)

        // Without the flag, the environment wins over the file.
        let envPort = TestServices.freePort()
        let second = try TestServices.spawn(GatewayProcess.binary, ["serve", "--port", String(envPort)],
                                            environment: ["GATEWAY_CONFIG_FILE": path, "GATEWAY_INSTANCE_ID": "from-env", "PATH": "/usr/bin:/bin"], log: log)
        defer { TestServices.forget(second) }
        try await eventually("second start") {
            guard second.isRunning else { throw ServiceError(description: "exited") }
            return (try? await HTTPTestClient.request(.GET, port: envPort, "/readyz"))?.status == 200
        }
        #expect(try await HTTPTestClient.request(.GET, port: envPort, "/metrics").body.contains("instance=\"from-env\""))
        await second.terminate(SIGTERM)
    }

    @Test(arguments: [
        ("{\"gateway\": {\"port\": \"http\"}, \"gateway.jwt.secret\": \"\(TestGateway.secret)\"}", [String](), "GATEWAY_PORT"),
        ("{\"gateway.prot\": 8080, \"gateway.jwt.secret\": \"\(TestGateway.secret)\"}", [], "GATEWAY_CONFIG_FILE"),
        ("[1, 2]", [], "GATEWAY_CONFIG_FILE"),
        ("{\"gateway.jwt.secret\": \"\(TestGateway.secret)\"}", ["--set", "GATEWAY_NOPE=1"], "GATEWAY_NOPE"),
        ("{\"gateway.jwt.secret\": \"\(TestGateway.secret)\"}", ["--set", "GATEWAY_DRAIN_TIMEOUT_S=0"], "GATEWAY_DRAIN_TIMEOUT_S"),
    ]) func aBadValueFromAnySourceIsRefusedNamingIt(_ json: String, _ arguments: [String], _ setting: String) async throws {
        let path = try Self.file(json)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (status, output) = try await TestServices.run(GatewayProcess.binary, ["serve"] + arguments,
                                                          environment: ["GATEWAY_CONFIG_FILE": path, "PATH": "/usr/bin:/bin"], timeout: 60)
        #expect(status == 2, "\(output)")
        let lines = output.split(separator: "\n").filter { $0.contains("configuration error") }
        #expect(lines.count == 1 && lines[0].contains("configuration error: \(setting):"), "\(output)")
    }
}
