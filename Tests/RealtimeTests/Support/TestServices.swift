import Foundation
import NIOConcurrencyHelpers
import NIOSSL

/// Real Postgres and Redis servers for one test: on loopback, on free ports, in temporary folders, stopped
/// by the test that started them (by PID). Postgres refuses to run as root, so as root it runs as the
/// `postgres` user (setpriv, which execs: the PID is the server's own).
enum TestServices {
    static let root = "/tmp/gw-test-services"

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    static func canConnect(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
    }

    static var isRoot: Bool { getuid() == 0 }

    /// Arguments to run `path`; as root and `asPostgres`, as the postgres user through setpriv (which execs).
    static func command(_ path: String, _ arguments: [String], asPostgres: Bool) -> (String, [String]) {
        asPostgres && isRoot
            ? ("/usr/bin/setpriv", ["--reuid=postgres", "--regid=postgres", "--init-groups", path] + arguments)
            : (path, arguments)
    }

    /// Runs a command to completion; returns its exit status and output.
    @discardableResult
    /// Runs a command to its end. `timeout`: past it the process is killed and the run fails (a command that
    /// should have exited, such as a refused start, must not outlive the test).
    static func run(_ path: String, _ arguments: [String], asPostgres: Bool = false, environment: [String: String]? = nil,
                    timeout: Double? = nil) async throws -> (Int32, String) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("gw-run-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let (executable, args) = command(path, arguments, asPostgres: asPostgres)
        let process = try ChildProcess(executable, args, environment: environment, output: output)
        let status: Int32
        if let timeout {
            do {
                status = try await within(timeout, "\(path) to exit") { await process.exitStatus() }
            } catch {
                kill(process.pid, SIGKILL)
                _ = await process.exitStatus()
                throw error
            }
        } else {
            status = await process.exitStatus()
        }
        return (status, (try? String(contentsOfFile: output, encoding: .utf8)) ?? "")
    }

    /// Starts a long-running server, its PID recorded so that `make test` can stop it if the run dies.
    static func spawn(_ path: String, _ arguments: [String], asPostgres: Bool = false, environment: [String: String]? = nil,
                      log: String) throws -> ChildProcess {
        let (executable, args) = command(path, arguments, asPostgres: asPostgres)
        let process = try ChildProcess(executable, args, environment: environment, output: log)
        try? "\(process.pid)\n".write(toFile: root + "/pids/\(process.pid)", atomically: true, encoding: .utf8)
        return process
    }

    static func forget(_ process: ChildProcess) {
        try? FileManager.default.removeItem(atPath: root + "/pids/\(process.pid)")
    }

    static func prepareRoot() throws {
        try FileManager.default.createDirectory(atPath: root + "/pids", withIntermediateDirectories: true)
        chmod(root, 0o777)
    }
}

struct ServiceError: Error, CustomStringConvertible {
    let description: String
}

/// A throwaway Postgres cluster (initdb into a temporary folder, loopback, a free port).
final class PostgresServer: @unchecked Sendable {  // used from one test task; stop() is idempotent
    let port: Int
    let dataDir: String
    let binDir: String
    private var process: ChildProcess?

    var url: String { "postgres://postgres@127.0.0.1:\(port)/gateway" }

    static func findBinDir() throws -> String {
        let base = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: base)) ?? []).compactMap(Int.init).sorted()
        guard let version = versions.last else { throw ServiceError(description: "postgresql is not installed (make test installs it)") }
        return "\(base)/\(version)/bin"
    }

    /// `configure`: runs on the new cluster's data folder before the server starts (certificates, pg_hba.conf);
    /// `arguments`: more `postgres` flags (`-c ssl=on`, …).
    static func start(arguments: [String] = [], configure: (String) async throws -> Void = { _ in }) async throws -> PostgresServer {
        try TestServices.prepareRoot()
        let binDir = try findBinDir()
        let dataDir = TestServices.root + "/pg-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true)
        if TestServices.isRoot { _ = try await TestServices.run("/bin/chown", ["postgres:postgres", dataDir]) }
        let (status, output) = try await TestServices.run(binDir + "/initdb", ["-D", dataDir + "/data", "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"], asPostgres: true)
        guard status == 0 else { throw ServiceError(description: "initdb failed: \(output)") }
        try await configure(dataDir + "/data")
        let server = PostgresServer(port: TestServices.freePort(), dataDir: dataDir, binDir: binDir, arguments: arguments)
        try await server.startProcess()
        let (created, createOutput) = try await TestServices.run(binDir + "/psql", ["-h", "127.0.0.1", "-p", String(server.port), "-U", "postgres", "-c", "CREATE DATABASE gateway"])
        guard created == 0 else { throw ServiceError(description: "createdb failed: \(createOutput)") }
        return server
    }

    private let arguments: [String]

    private init(port: Int, dataDir: String, binDir: String, arguments: [String]) {
        self.port = port
        self.dataDir = dataDir
        self.binDir = binDir
        self.arguments = arguments
    }

    /// Starts (or starts again) the server on the same port and data.
    func startProcess() async throws {
        process = try TestServices.spawn(binDir + "/postgres", [
            "-D", dataDir + "/data", "-p", String(port), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=" + dataDir,
            "-c", "max_connections=200", "-c", "shared_buffers=64MB",
        ] + arguments, asPostgres: true, log: dataDir + "/postgres.log")
        for _ in 0..<200 {
            let (status, _) = try await TestServices.run(binDir + "/pg_isready", ["-h", "127.0.0.1", "-p", String(port), "-U", "postgres"])
            if status == 0 { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ServiceError(description: "postgres did not start: \((try? String(contentsOfFile: dataDir + "/postgres.log", encoding: .utf8)) ?? "")")
    }

    /// Stops the server (fast shutdown: open connections are cut), keeping its data.
    func stopProcess() async {
        guard let process else { return }
        await process.terminate(SIGINT)
        TestServices.forget(process)
        self.process = nil
    }

    func stop() async {
        await stopProcess()
        try? FileManager.default.removeItem(atPath: dataDir)
    }
}

/// A redis-server on loopback with no persistence.
final class RedisServer: @unchecked Sendable {  // used from one test task; stop() is idempotent
    let port: Int
    private var process: ChildProcess?
    private let logPath: String

    var url: String { "redis://127.0.0.1:\(port)" }

    /// `arguments`: more `redis-server` flags; with `tlsPort` set the server listens with TLS there and not in
    /// plain text (`url` is then `rediss://`).
    static func start(arguments: [String] = [], tls: Bool = false) async throws -> RedisServer {
        let server = try reserve()
        server.arguments = arguments
        server.tls = tls
        try await server.startProcess()
        return server
    }

    private var arguments: [String] = []
    private var tls = false

    /// A free port for a server that is not started yet (`startProcess` starts it): Redis down at start.
    static func reserve() throws -> RedisServer {
        try TestServices.prepareRoot()
        return RedisServer(port: TestServices.freePort())
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a stalled Redis keeps its connections open and
    /// answers nothing.
    func signal(_ signal: Int32) {
        if let process { kill(process.pid, signal) }
    }

    private init(port: Int) {
        self.port = port
        self.logPath = TestServices.root + "/redis-\(port).log"
    }

    func startProcess() async throws {
        let path = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let path else { throw ServiceError(description: "redis-server is not installed (make test installs it)") }
        let listen = tls ? ["--port", "0", "--tls-port", String(port)] : ["--port", String(port)]
        process = try TestServices.spawn(path, listen + ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"] + arguments, log: logPath)
        for _ in 0..<200 {
            if TestServices.canConnect(port: port) { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw ServiceError(description: "redis did not start")
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    func kill9() async {
        guard let process else { return }
        await process.terminate(SIGKILL)
        TestServices.forget(process)
        self.process = nil
    }

    func stop() async {
        await kill9()
        try? FileManager.default.removeItem(atPath: logPath)
    }
}

/// The `gateway` executable in its own process (for what must be observed or killed from outside: its
/// memory, kill -9).
final class GatewayProcess: @unchecked Sendable {  // used from one test task
    let port: Int
    let process: ChildProcess
    let dataDir: String

    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("gateway").path
    }

    /// `log`: where the process's standard output and error go.
    /// `tls`: the listener speaks TLS (set `GATEWAY_TLS_CERT`/`KEY` in `environment`); readiness is asked with it.
    static func start(environment: [String: String] = [:], log: String = "/dev/null", tls: NIOSSLContext? = nil) async throws -> GatewayProcess {
        let port = TestServices.freePort()
        let dataDir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-proc-\(UUID().uuidString)").path
        let process = try TestServices.spawn(binary, ["serve"], environment:
            ["GATEWAY_PORT": String(port), "GATEWAY_JWT_SECRET": TestGateway.secret, "GATEWAY_DATA_DIR": dataDir,
             "GATEWAY_LOG_LEVEL": "error"].merging(environment) { $1 }, log: log)
        let gateway = GatewayProcess(port: port, process: process, dataDir: dataDir)
        do {
            try await eventually("gateway process ready") {
                guard process.isRunning else { throw ServiceError(description: "gateway process exited") }
                return (try? await HTTPTestClient.request(.GET, port: port, "/readyz", tls: tls))?.status == 200
            }
        } catch {
            await gateway.kill9()
            throw error
        }
        return gateway
    }

    private init(port: Int, process: ChildProcess, dataDir: String) {
        self.port = port
        self.process = process
        self.dataDir = dataDir
    }

    /// Resident memory of the gateway process.
    var residentBytes: Int { memory("VmRSS") }

    /// One field of `/proc/PID/status` in bytes (`VmRSS`, `RssAnon`: the heap and stacks, `RssFile`: mapped code).
    func memory(_ field: String) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(process.pid)/status", encoding: .utf8)) ?? ""
        for line in status.split(separator: "\n") where line.hasPrefix(field + ":") {
            return (Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0) * 1024
        }
        return 0
    }

    /// One sample of `/metrics` (first sample of the metric's name).
    func metric(_ name: String) async throws -> Int {
        try await HTTPTestClient.metric(name, port: port)
    }

    /// Runs `body` while sampling the process's resident memory (`field` of `/proc/PID/status`, every 5 ms);
    /// returns its result and the peak growth.
    func residentGrowth<T: Sendable>(of field: String = "VmRSS", during body: () async throws -> T) async throws -> (T, Int) {
        let before = memory(field)
        let peak = NIOLockedValueBox(before)
        let sampler = Task {
            while !Task.isCancelled {
                let now = self.memory(field)
                peak.withLockedValue { $0 = max($0, now) }
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
        defer { sampler.cancel() }
        let result = try await body()
        return (result, peak.withLockedValue { $0 } - before)
    }

    func kill9() async {
        await process.terminate(SIGKILL)
        TestServices.forget(process)
        try? FileManager.default.removeItem(atPath: dataDir)
    }

    func stop() async {
        await process.terminate(SIGTERM)
        TestServices.forget(process)
        try? FileManager.default.removeItem(atPath: dataDir)
    }
}
