// `make bench`: throughput figures of the store's group commit and of the fan-out encoding, printed with
// ratios. Not a test: nothing here asserts a number.
import Auth
import ChatDomain
import Fanout
import Wire
import Foundation
import Logging
import NIOCore
import PostgresNIO
import ServiceLifecycle

/// How many `publish(publisher, n)` calls succeed in `seconds`, each of `publishers` calling it one at a time.
func measureRate(publishers: Int, seconds: Double, _ publish: @escaping @Sendable (_ publisher: Int, _ n: Int) async -> Bool) async -> (count: Int, rate: Double) {
    let deadline = Date().addingTimeInterval(seconds)
    let start = Date()
    let count = await withTaskGroup(of: Int.self) { group in
        for p in 0..<publishers {
            group.addTask {
                var done = 0
                while Date() < deadline {
                    if await publish(p, done) { done += 1 }
                }
                return done
            }
        }
        return await group.reduce(0, +)
    }
    return (count, Double(count) / Date().timeIntervalSince(start))
}

func measure(_ store: any Store, publishers: Int, seconds: Double, channels: Int) async -> (count: Int, rate: Double) {
    let names = (0..<channels).map { try! ChannelName(parsing: "topic:bench-\($0)") }
    return await measureRate(publishers: publishers, seconds: seconds) { p, n in
        let request = AppendRequest(channel: names[p % channels], sender: "bench", requestId: nil,
                                    body: "{\"p\":\(p),\"n\":\(n),\"text\":\"a chat-sized message body of about a hundred bytes......\"}")
        return (try? await store.append(request)) != nil
    }
}

/// Members publishing to chat threads through `ChannelService.publish` (the permission, then the append): each
/// publisher a member of its thread, `threads` threads, one publish at a time per publisher.
func measureThreadPublishes(_ store: any Store, publishers: Int, seconds: Double, threads: Int) async throws -> (count: Int, rate: Double) {
    let service = ChannelService(store: store, policy: Policy(), bodyLimit: 64 * 1024)
    var ids: [String] = []
    for t in 0..<threads {
        let id = UUID().uuidString.lowercased()
        let members = (0..<publishers).filter { $0 % threads == t }.map { "member-\($0)" }
        try await store.createThread(ChatThread(id: id, title: "bench \(t)", creator: members.first ?? "member-0", createdAtMicros: Timestamp.nowMicros(),
                                                members: members))
        ids.append(id)
    }
    let channels = ids.map { "thread:" + $0 }
    let actors = (0..<publishers).map { Actor(sub: "member-\($0)", roles: [], expiresAt: Date().addingTimeInterval(3600)) }
    return await measureRate(publishers: publishers, seconds: seconds) { p, n in
        let body = JSONValue.object(["p": .number(Double(p)), "n": .number(Double(n)), "text": .string("a chat-sized message body of about a hundred bytes.....")])
        return (try? await service.publish(actors[p], to: channels[p % threads], body: body, requestId: nil)) != nil
    }
}

var logger = Logger(label: "bench")
logger.logLevel = .error
let env = ProcessInfo.processInfo.environment

// `BENCH_FILL_DIR=D BENCH_FILL_COUNT=N BENCH_FILL_CHANNEL=C`: only store N messages in channel C of the embedded
// store in D (what a gateway started on D then serves), through group commit, and exit — the catch-up bench.
if let fillDir = env["BENCH_FILL_DIR"] {
    let count = Int(env["BENCH_FILL_COUNT"] ?? "100000") ?? 100_000
    let channel = try ChannelName(parsing: env["BENCH_FILL_CHANNEL"] ?? "topic:catchup")
    let store = try await SQLiteStore.open(path: fillDir + "/gateway.sqlite", logger: logger)
    let started = Date()
    await withTaskGroup(of: Void.self) { group in
        for p in 0..<256 {
            group.addTask {
                for n in stride(from: p, to: count, by: 256) {
                    let body = "{\"n\":\(n),\"text\":\"a chat-sized message body of about a hundred bytes......................\"}"
                    _ = try? await store.append(AppendRequest(channel: channel, sender: "bench", requestId: nil, body: body))
                }
            }
        }
    }
    print(String(format: "stored %d messages in %@ in %.1f s", count, channel.rawValue, Date().timeIntervalSince(started)))
    await store.close()
    exit(0)
}
let seconds = Double(env["BENCH_SECONDS"] ?? "5") ?? 5
var results: [(String, Double)] = []

print("== group commit: durable appends/s (\(seconds) s each, 8 channels) ==")
if let url = env["DATABASE_URL"] {
    let client = try PostgresStore.makeClient(url: url, logger: logger)
    let services = ServiceGroup(configuration: .init(services: [client], logger: logger))
    let running = Task { try? await services.run() }
    let store = try await PostgresStore.open(client: client, logger: logger)
    for publishers in [1, 16, 256] {
        let (count, rate) = await measure(store, publishers: publishers, seconds: seconds, channels: 8)
        print(String(format: "postgres  %4d publishers: %8.0f appends/s  (%d appends)", publishers, rate, count))
        results.append(("postgres-\(publishers)", rate))
    }
    for publishers in [1, 16] {
        let (count, rate) = try await measureThreadPublishes(store, publishers: publishers, seconds: seconds, threads: 8)
        print(String(format: "postgres  %4d members publishing to threads: %8.0f publishes/s  (%d publishes)", publishers, rate, count))
    }
    await services.triggerGracefulShutdown()
    await running.value
}
let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bench-\(UUID().uuidString)").path
try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
let sqlite = try await SQLiteStore.open(path: dir + "/bench.sqlite", logger: logger)
for publishers in [1, 16, 256] {
    let (count, rate) = await measure(sqlite, publishers: publishers, seconds: seconds, channels: 8)
    print(String(format: "sqlite    %4d publishers: %8.0f appends/s  (%d appends)", publishers, rate, count))
    results.append(("sqlite-\(publishers)", rate))
}
for publishers in [1, 16] {
    let (count, rate) = try await measureThreadPublishes(sqlite, publishers: publishers, seconds: seconds, threads: 8)
    print(String(format: "sqlite    %4d members publishing to threads: %8.0f publishes/s  (%d publishes)", publishers, rate, count))
}
await sqlite.close()
try? FileManager.default.removeItem(atPath: dir)
let byName = Dictionary(uniqueKeysWithValues: results)
for engine in ["postgres", "sqlite"] {
    if let one = byName["\(engine)-1"], let many = byName["\(engine)-256"] {
        print(String(format: "%@: 256 publishers / 1 publisher = %.1fx (group commit at work)", engine, many / one))
    }
}

print("\n== fan-out encoding: one message, encoded once, shared ==")
let channel = try! ChannelName(parsing: "topic:bench")
let message = Message(id: UUIDv7.make(), channel: channel, seq: 1, createdAtMicros: Timestamp.nowMicros(), sender: "bench", requestId: nil,
                      body: "{\"text\":\"a chat-sized message body of about a hundred bytes........................\"}")
let encoder: MessageEncoder = { message, _ in
    var buffer = ByteBuffer()
    buffer.writeString(message.json)
    return buffer
}
let n = 1_000_000
var t0 = Date()
var sink = 0
let shared = EncodedMessage(message, formats: [.webSocket], encoder: encoder)
for _ in 0..<n { sink &+= shared.bytes(.webSocket)!.readableBytes }
let sharedRate = Double(n) / Date().timeIntervalSince(t0)
t0 = Date()
for _ in 0..<(n / 10) { sink &+= encoder(message, .webSocket).readableBytes }
let perClientRate = Double(n / 10) / Date().timeIntervalSince(t0)
print(String(format: "shared buffer per subscriber: %.2f M/s; encoding per subscriber: %.2f M/s; ratio %.0fx (checksum %d)",
             sharedRate / 1e6, perClientRate / 1e6, sharedRate / perClientRate, sink % 7))

print("\n== store deadline: withDeadline (every Postgres batch and read runs under one) around a call that yields once ==")
func processCPUSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
let deadlineCalls = 200_000
let cpuBefore = processCPUSeconds()
let wallBefore = Date()
await withTaskGroup(of: Void.self) { group in
    for _ in 0..<16 {
        group.addTask { for _ in 0..<(deadlineCalls / 16) { _ = try? await withDeadline(.seconds(5)) { await Task.yield(); return 1 } } }
    }
}
print(String(format: "%d calls from 16 tasks: %.2f µs of CPU per call, %.0f calls/s", deadlineCalls,
             (processCPUSeconds() - cpuBefore) / Double(deadlineCalls) * 1e6, Double(deadlineCalls) / Date().timeIntervalSince(wallBefore)))
