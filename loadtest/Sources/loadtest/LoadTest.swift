import ArgumentParser
import Auth
import Foundation
import NIOCore
import NIOPosix

/// `loadtest`: drives one or more gateway instances with subscribers on every transport and publishers, and
/// proves the ordering guarantees while measuring: per channel, every subscriber must see seq contiguous
/// from where it started, no duplicate, the same (seq → id) mapping as everyone else, and every acked
/// message. Exit status 1 on any violation, 2 when the run itself failed.
@main
struct LoadTest: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "loadtest",
        abstract: "Load-test gateway instances and check multi-instance ordering, loss and duplicates; benchmark fan-out.",
        subcommands: [Mixed.self, Fanout.self],
        defaultSubcommand: Mixed.self)
}

/// The default: the mixed-transport, multi-instance ordering load test.
struct Mixed: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Load-test gateway instances and check multi-instance ordering, loss and duplicates (the default).")

    @Option(name: .customLong("url"), help: "A gateway instance (repeat for several): http://127.0.0.1:8081") var urls: [String] = ["http://127.0.0.1:8080"]
    @Option(help: "Subscribers, spread over the URLs and transports.") var subscribers = 100
    @Option(help: "Transport weights, e.g. ws=3,sse=1,poll=1.") var transports = "ws=1,sse=1,poll=1"
    @Option(help: "Publishers (WebSocket connections), spread over the URLs.") var publishers = 4
    @Option(help: "Total publish rate in messages/s (0: as fast as acks allow).") var rate = 200.0
    @Option(help: "Channels (topic:lt-<run>-<n>).") var channels = 10
    @Option(help: "Message body size in bytes (padding).") var size = 200
    @Option(help: "Seconds of publishing.") var duration = 10.0
    @Option(help: "Stop after this many messages in total (0: no limit).") var count = 0
    @Option(help: "Seconds over which subscribers connect.") var ramp = 1.0
    @Option(help: "Seconds to wait for deliveries after publishing stopped.") var drain = 15.0
    @Option(help: "Bearer token for every virtual user (needs publish rights on topics).") var token: String?
    @Option(help: "HS256 secret: mint a token per virtual user instead (default GATEWAY_JWT_SECRET).") var secret: String?
    @Flag(help: "Subscribers disconnect at random and resume with their cursor on another URL.") var churn = false
    @Option(help: "With --churn: mean seconds between a subscriber's reconnections.") var churnEvery = 2.0
    @Option(help: "Write every figure as JSON to this file.") var json: String?
    @Option(help: "Client event loop threads.") var threads = System.coreCount

    func run() async throws {
        let endpoints = urls.compactMap(Endpoint.init(url:))
        guard endpoints.count == urls.count, !endpoints.isEmpty else { throw ValidationError("--url must be http://host:port") }
        let weights = try Self.parseWeights(transports)
        let verifier: TokenVerifier?
        if token == nil {
            guard let secret = secret ?? ProcessInfo.processInfo.environment["GATEWAY_JWT_SECRET"] else {
                throw ValidationError("give --token or --secret (or GATEWAY_JWT_SECRET)")
            }
            verifier = await TokenVerifier(hs256Secret: secret)
        } else {
            verifier = nil
        }
        let fixedToken = token
        let tokens = TokenSource { name in
            if let fixedToken { return fixedToken }
            return try await verifier!.mint(sub: name, roles: ["service"], ttl: 24 * 3600)
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        let plan = Plan(endpoints: endpoints, weights: weights, subscribers: subscribers, publishers: publishers, rate: rate,
                        channels: (0..<max(1, channels)).map { "topic:lt-\(Self.runId)-\($0)" }, size: size, duration: duration,
                        count: count, ramp: ramp, drain: drain, churn: churn, churnEvery: churnEvery)
        let runner = Runner(plan: plan, tokens: tokens, group: group)
        let report = await runner.run()
        try? await group.shutdownGracefully()
        print(report.summary(plan))
        if let json { try report.json(plan).write(toFile: json, atomically: true, encoding: .utf8) }
        if report.failed { throw ExitCode(2) }
        if report.snapshot.totalViolations > 0 { throw ExitCode(1) }
    }

    static let runId = String(UInt32.random(in: 0...UInt32.max), radix: 36)

    static func parseWeights(_ text: String) throws -> [(Transport, Int)] {
        var out: [(Transport, Int)] = []
        for part in text.split(separator: ",") {
            let kv = part.split(separator: "=")
            guard let transport = Transport(rawValue: String(kv[0])) else { throw ValidationError("unknown transport \(kv[0]) (ws, sse, poll)") }
            let weight = kv.count > 1 ? Int(kv[1]) : 1
            guard let weight, weight >= 0 else { throw ValidationError("bad weight in \(part)") }
            if weight > 0 { out.append((transport, weight)) }
        }
        guard !out.isEmpty else { throw ValidationError("--transports names no transport") }
        return out
    }
}

enum Transport: String, Sendable { case ws, sse, poll }

struct TokenSource: Sendable {
    let make: @Sendable (String) async throws -> String
    init(_ make: @escaping @Sendable (String) async throws -> String) { self.make = make }
}

struct Plan: Sendable {
    let endpoints: [Endpoint]
    let weights: [(Transport, Int)]
    let subscribers: Int
    let publishers: Int
    let rate: Double
    let channels: [String]
    let size: Int
    let duration: Double
    let count: Int
    let ramp: Double
    let drain: Double
    let churn: Bool
    let churnEvery: Double

    /// Subscriber i's transport, by the weights (deterministic, so the mix is exact).
    func transport(_ i: Int) -> Transport {
        let total = weights.reduce(0) { $0 + $1.1 }
        var slot = i % total
        for (transport, weight) in weights {
            if slot < weight { return transport }
            slot -= weight
        }
        return weights[0].0
    }
}
