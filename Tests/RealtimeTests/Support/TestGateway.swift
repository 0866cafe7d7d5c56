import Auth
import Foundation
import Gateway
import Logging
import Testing

/// A real gateway instance on a free loopback port with its own data folder, for one test.
final class TestGateway: Sendable {
    static let secret = "test-secret-test-secret-test-secret-0123456789"
    /// The cluster key of tests that set one (others derive it from `secret`, as PROTOCOL.md §8's settings do).
    static let clusterKey = "test-cluster-key-test-cluster-key-0123456789"
    let server: GatewayServer
    let dataDir: String
    let verifier: TokenVerifier

    var port: Int { server.port }

    static func start(_ configure: (inout GatewayConfig) -> Void = { _ in }) async throws -> TestGateway {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-test-\(UUID().uuidString)").path
        var config = GatewayConfig()
        config.host = "127.0.0.1"
        config.port = 0
        config.dataDir = dir
        config.jwtSecret = secret
        config.eventLoops = 2
        configure(&config)
        var logger = Logger(label: "test-gateway")
        logger.logLevel = ProcessInfo.processInfo.environment["TEST_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .warning
        let server = try await GatewayServer.start(config: config, logger: logger)
        return TestGateway(server: server, dataDir: dir, verifier: await TokenVerifier(hs256Secret: secret))
    }

    private init(server: GatewayServer, dataDir: String, verifier: TokenVerifier) {
        self.server = server
        self.dataDir = dataDir
        self.verifier = verifier
    }

    func token(_ sub: String = "alice", roles: [String] = ["admin"], ttl: TimeInterval = 3600) async throws -> String {
        try await verifier.mint(sub: sub, roles: roles, ttl: ttl)
    }

    /// A token for any gateway started with the test secret.
    static func token(_ sub: String = "alice", roles: [String] = ["admin"], ttl: TimeInterval = 3600) async throws -> String {
        try await TokenVerifier(hs256Secret: secret).mint(sub: sub, roles: roles, ttl: ttl)
    }

    /// One sample of `/metrics` (first sample of the metric's name).
    func metric(_ name: String, label: String? = nil) async throws -> Int {
        try await HTTPTestClient.metric(name, port: port, label: label)
    }

    /// Stops the instance; a shutdown that does not finish fails the test instead of holding the run.
    func stop() async {
        let server = self.server
        do {
            try await within(60, "gateway shutdown") { await server.shutdown() }
        } catch {
            Issue.record("gateway shutdown did not finish: \(error)")
        }
        try? FileManager.default.removeItem(atPath: dataDir)
    }
}

/// Runs `body` with what `start` made and `stop`s it afterwards, whether `body` succeeded or threw.
func withStarted<Resource, T>(_ start: () async throws -> Resource, stop: (Resource) async -> Void,
                              _ body: (Resource) async throws -> T) async throws -> T {
    let resource = try await start()
    do {
        let result = try await body(resource)
        await stop(resource)
        return result
    } catch {
        await stop(resource)
        throw error
    }
}

/// Runs `body` with a fresh gateway and stops it afterwards, whether `body` succeeded or threw.
func withTestGateway<T>(configure: (inout GatewayConfig) -> Void = { _ in }, _ body: (TestGateway) async throws -> T) async throws -> T {
    try await withStarted({ try await TestGateway.start(configure) }, stop: { await $0.stop() }, body)
}

struct TimedOut: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out: \(what)" }
}

/// Guards a test against hanging (never a timing assertion: the limit is far above any expected time).
/// The body runs in its own task, so even a body that ignores cancellation cannot hold the test.
func within<T: Sendable>(_ seconds: Double, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let once = ResumeOnce<T>()
    return try await withCheckedThrowingContinuation { continuation in
        once.set(continuation)
        let work = Task {
            do { once.resume(.success(try await body())) } catch { once.resume(.failure(error)) }
        }
        Task {
            try? await Task.sleep(for: .seconds(seconds))
            if once.resume(.failure(TimedOut(what: what))) { work.cancel() }
        }
    }
}

final class ResumeOnce<T: Sendable>: @unchecked Sendable {  // guarded by `lock`
    private let lock = NSLock()
    private var continuation: CheckedContinuation<T, any Error>?

    func set(_ continuation: CheckedContinuation<T, any Error>) {
        lock.lock()
        self.continuation = continuation
        lock.unlock()
    }

    @discardableResult
    func resume(_ result: Result<T, any Error>) -> Bool {
        lock.lock()
        let continuation = self.continuation
        self.continuation = nil
        lock.unlock()
        continuation?.resume(with: result)
        return continuation != nil
    }
}

/// Polls `condition` until it holds (a hang guard, not a timing assertion).
func eventually(_ what: String, timeout: Double = 20, _ condition: @Sendable () async throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw TimedOut(what: what)
}

/// A parsed JSON object from text.
func json(_ text: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
}

func jsonText(_ object: Any) -> String {
    String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
}

/// One message as a client received it.
struct Received: Sendable, Equatable {
    let channel: String
    let seq: Int64
    let id: String
    let cursor: String
    let json: String

    init(_ object: [String: Any]) {
        channel = object["channel"] as? String ?? ""
        seq = (object["seq"] as? NSNumber)?.int64Value ?? -1
        id = object["id"] as? String ?? ""
        cursor = object["cursor"] as? String ?? ""
        json = jsonText(object)
    }

    var object: [String: Any] { RealtimeTests.json(json) }
}
