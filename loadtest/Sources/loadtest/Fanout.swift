import ArgumentParser
import Auth
import Foundation
import Histogram
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// `loadtest fanout`: the benchmark of one channel's fan-out — N WebSocket or SSE subscribers on one channel,
/// one publisher at a fixed rate, against the gateway or (for comparison, same harness) Nchan. The clients
/// only count frames or events (no JSON parsing, so that they are not the limit) and the server processes'
/// CPU time is read from `/proc` over the publishing window: server CPU µs per delivery. With `--idle` it
/// publishes nothing and reports the server's resident memory per subscribed connection. Prints one `RESULT`
/// line.
struct Fanout: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fanout",
        abstract: "Fan-out benchmark: N WebSocket subscribers on one channel, server CPU per delivery (gateway or Nchan).")

    enum Target: String, ExpressibleByArgument { case gateway, nchan }
    enum Kind: String, ExpressibleByArgument { case ws, sse, poll }

    @Option(help: "gateway (/v1/ws + subscribe, REST publish) or nchan (/sub/<ch>, POST /pub/<ch>).") var target = Target.gateway
    @Option(name: .customLong("server"), help: "Server URL (repeat: subscribers spread over them; the publisher uses the first).") var urls: [String] = []
    @Option(help: "Subscribers.") var subscribers = 1000
    @Option(help: "Messages per second.") var rate = 100.0
    @Option(help: "Seconds of publishing.") var duration = 10.0
    @Option(help: "Body bytes (about).") var size = 100
    @Option(help: "HS256 secret to mint tokens (gateway; default GATEWAY_JWT_SECRET).") var secret: String?
    @Option(help: "Comma-separated pids of the server's processes, whose CPU time is measured.") var pids = ""
    @Option(help: "Client event loop threads.") var threads = 1
    @Option(help: "ws, sse or poll (long-poll) subscribers.") var transport = Kind.ws
    @Flag(help: "Connect and subscribe, publish nothing: report the server's RSS per connection.") var idle = false
    @Option(help: "Catch-up: subscribe (gateway, WebSocket) from this cursor, publish nothing, and time the arrival of --count messages.") var since: String?
    @Option(help: "With --since: the messages stored after the cursor.") var count = 100_000
    @Option(help: "The channel (default: a new one).") var channel: String?
    @Flag(help: "Gateway: each subscriber its own user (its own line in the channel's presence list).") var distinctUsers = false
    @Flag(help: "Gateway: subscribe with presence (join/leave events); implies --distinct-users.") var presence = false
    @Option(help: "Channels: subscriber i on channel i mod N; the messages go to the channels in turn.") var channels = 1
    @Option(help: "Publisher connections, spread over the servers, sharing the rate.") var publishers = 1
    @Flag(help: "Stamp each message with its send time: publish→deliver (WebSocket subscribers) and publish→ack percentiles.") var latency = false

    func run() async throws {
        let endpoints = urls.compactMap(Endpoint.init(url:))
        guard !endpoints.isEmpty, endpoints.count == urls.count else { throw ValidationError("give --server http://host:port") }
        let serverPids = pids.split(separator: ",").compactMap { Int32($0) }
        var minted = ""
        if target == .gateway {
            guard let secret = secret ?? ProcessInfo.processInfo.environment["GATEWAY_JWT_SECRET"] else { throw ValidationError("give --secret") }
            minted = try await TokenVerifier(hs256Secret: secret).mint(sub: "fanout", roles: ["service"], ttl: 3600)
        }
        let token = minted
        var userTokens: [String] = []
        if presence || distinctUsers, target == .gateway, let secret = secret ?? ProcessInfo.processInfo.environment["GATEWAY_JWT_SECRET"] {
            let verifier = await TokenVerifier(hs256Secret: secret)
            for i in 0..<subscribers { userTokens.append(try await verifier.mint(sub: "fanout-\(i)", roles: ["service"], ttl: 3600)) }
        }
        let channel = self.channel ?? "fanout\(UInt32.random(in: 0...UInt32.max))"
        guard channels >= 1, publishers >= 1 else { throw ValidationError("--channels and --publishers: at least 1") }
        guard !latency || transport == .ws else { throw ValidationError("--latency: WebSocket subscribers only") }
        let names = channels == 1 ? [channel] : (0..<channels).map { "\(channel)x\($0)" }
        if let since {
            return try await catchUp(endpoints[0], channel: channel, since: since, token: token)
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        // With --latency: one recorder per client loop, written only there.
        var recorders: [ObjectIdentifier: LatencyRecorder] = [:]
        if latency { for loop in group.makeIterator() { recorders[ObjectIdentifier(loop)] = LatencyRecorder() } }

        // Subscribers, connected a few hundred at a time.
        var counters: [any DeliveryCounter] = []
        var connections: [any Channel] = []
        let (target, subscribers, kind, presence) = (self.target, self.subscribers, self.transport, self.presence)
        let rssBefore = Self.residentBytes(serverPids)
        let joinCPUBefore = Self.cpuSeconds(serverPids)
        for batch in stride(from: 0, to: subscribers, by: 200) {
            let made = try await withThrowingTaskGroup(of: ((any DeliveryCounter), any Channel).self) { tasks in
                for i in batch..<min(subscribers, batch + 200) {
                    let endpoint = endpoints[i % endpoints.count]
                    let subscriberToken = userTokens.isEmpty ? token : userTokens[i]
                    let (name, loop) = (names[i % names.count], group.next())
                    let recorder = recorders[ObjectIdentifier(loop)]
                    tasks.addTask {
                        try await Self.subscribe(endpoint, target: target, kind: kind, channel: name, token: subscriberToken, group: loop,
                                                 presence: presence, stamps: recorder)
                    }
                }
                return try await tasks.reduce(into: []) { $0.append($1) }
            }
            counters += made.map(\.0)
            connections += made.map(\.1)
        }
        for counter in counters { try await counter.ready.futureResult.get() }
        try await Task.sleep(for: .milliseconds(500))
        if idle {
            try await Task.sleep(for: .seconds(2))
            let joinCPU = Self.cpuSeconds(serverPids) - joinCPUBefore
            let events = try await Self.total(counters)
            print(String(format: "%d subscribers (%@) joined one channel%@: server CPU %.3f s (%.0f µs per subscriber, connection and subscribe included), %d frames received after the subscribe replies",
                         subscribers, presence || distinctUsers ? "distinct users" : "one user", presence ? ", each watching its presence" : "", joinCPU,
                         joinCPU / Double(subscribers) * 1e6, events))
            print("RESULT joins=\(subscribers) watching=\(presence) join_cpu_s=\(String(format: "%.3f", joinCPU)) frames=\(events)")
            let perConnection = Double(Self.residentBytes(serverPids) - rssBefore) / Double(subscribers)
            print(String(format: "%@ idle %@ subscribers: %d, server RSS %.0f bytes per connection", target.rawValue, kind.rawValue, subscribers, perConnection))
            print("RESULT target=\(target.rawValue) transport=\(kind.rawValue) subscribers=\(subscribers) rss_bytes_per_connection=\(Int(perConnection))")
            for connection in connections { connection.close(promise: nil) }
            try? await group.shutdownGracefully()
            return
        }

        var publishing: [Publisher] = []
        for p in 0..<publishers {
            publishing.append(try await Publisher.connect(endpoints[p % endpoints.count], target: target, channels: names, index: p, of: publishers,
                                                          token: token, size: size, stamped: latency, group: group))
        }
        // Message n (publisher n mod P's) goes to channel n mod C, which subscriber i listens to when i mod C matches.
        let each = Int(rate / Double(publishers) * duration)
        let expected = (0..<(each * publishers)).reduce(0) { total, n in
            total + subscribers / names.count + (n % names.count < subscribers % names.count ? 1 : 0)
        }
        let cpuBefore = Self.cpuTimes(serverPids)
        let clientBefore = Self.ownCPUSeconds()
        let start = NIODeadline.now()
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for publisher in publishing { tasks.addTask { try await publisher.publish(count: each, rate: rate / Double(self.publishers)) } }
            try await tasks.waitForAll()
        }
        // Until every delivery arrived, or 10 s more.
        var delivered = 0
        let drainEnd = NIODeadline.now() + .seconds(10)
        repeat {
            try await Task.sleep(for: .milliseconds(100))
            delivered = try await Self.total(counters)
        } while delivered < expected && NIODeadline.now() < drainEnd
        let elapsed = Double((NIODeadline.now() - start).nanoseconds) / 1e9
        let cpuAfter = Self.cpuTimes(serverPids)
        let systemCPU = cpuAfter.system - cpuBefore.system
        let cpu = cpuAfter.user - cpuBefore.user + systemCPU
        let clientCPU = Self.ownCPUSeconds() - clientBefore
        let acked = publishing.reduce(0) { $0 + $1.acked.withLockedValue { $0 } }
        var deliver = Histogram<UInt64>.latencyMicros, ack = Histogram<UInt64>.latencyMicros
        for loop in group.makeIterator() {
            if let recorder = recorders[ObjectIdentifier(loop)] { deliver.add(try await loop.submit { recorder.histogram }.get()) }
        }
        for publisher in publishing { ack.add(publisher.ackLatency.withLockedValue { $0.recorder.histogram }) }
        for connection in connections { connection.close(promise: nil) }
        for publisher in publishing { try? await publisher.channel.close() }
        try? await group.shutdownGracefully()

        let perDelivery = delivered > 0 ? cpu / Double(delivered) * 1e6 : 0
        let systemPerDelivery = delivered > 0 ? systemCPU / Double(delivered) * 1e6 : 0
        print(String(format: "%@ fan-out, %d %@ subscribers, %.0f msgs/s for %.0f s: %d of %d deliveries (%d publishes acked), %.0f deliveries/s; server CPU %.2f s = %.2f µs/delivery (in the kernel %.2f); load generator CPU %.2f s (%.0f%% of one core)",
                     target.rawValue, subscribers, kind == .ws ? "WebSocket" : kind == .sse ? "SSE" : "long-poll", rate, duration, delivered, expected, acked, Double(delivered) / elapsed, cpu, perDelivery,
                     systemPerDelivery, clientCPU, clientCPU / elapsed * 100))
        print("RESULT target=\(target.rawValue) transport=\(kind.rawValue) subscribers=\(subscribers) deliveries=\(delivered) expected=\(expected) per_s=\(Int(Double(delivered) / elapsed)) cpu_us_per_delivery=\(String(format: "%.3f", perDelivery)) sys_us_per_delivery=\(String(format: "%.3f", systemPerDelivery)) client_cpu_share=\(String(format: "%.2f", clientCPU / elapsed))")
        if latency {
            func ms(_ h: Histogram<UInt64>, _ p: Double) -> String { String(format: "%.2f", Double(h.valueAtPercentile(p)) / 1000) }
            print("  publish → deliver (ms): p50 \(ms(deliver, 50))  p99 \(ms(deliver, 99))  max \(ms(deliver, 100))  (\(deliver.totalCount) deliveries)")
            print("  publish → ack (ms):     p50 \(ms(ack, 50))  p99 \(ms(ack, 99))  max \(ms(ack, 100))  (\(ack.totalCount) publishes)")
            print("RESULT target=\(target.rawValue) deliver_p50_ms=\(ms(deliver, 50)) deliver_p99_ms=\(ms(deliver, 99)) ack_p50_ms=\(ms(ack, 50)) ack_p99_ms=\(ms(ack, 99))")
        }
        if delivered < expected { throw ExitCode(1) }
    }

    /// One WebSocket subscriber from `since`: the time from the subscribe to the last of `count` messages.
    func catchUp(_ endpoint: Endpoint, channel: String, since: String, token: String) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let serverPids = pids.split(separator: ",").compactMap { Int32($0) }
        let cpuBefore = Self.cpuSeconds(serverPids)
        let start = NIODeadline.now()
        let (counter, connection) = try await Self.subscribe(endpoint, target: .gateway, kind: .ws, channel: channel, token: token, group: group,
                                                             since: since)
        var received = 0
        let deadline = NIODeadline.now() + .seconds(120)
        while received < count && NIODeadline.now() < deadline {
            try await Task.sleep(for: .milliseconds(5))
            received = try await Self.total([counter])
        }
        let seconds = Double((NIODeadline.now() - start).nanoseconds) / 1e9
        let cpu = Self.cpuSeconds(serverPids) - cpuBefore
        try? await connection.close()
        try? await group.shutdownGracefully()
        print(String(format: "gateway catch-up: %d of %d stored messages to one WebSocket client in %.2f s = %.0f msgs/s (server CPU %.2f s)",
                     received, count, seconds, Double(received) / seconds, cpu))
        print("RESULT target=gateway catch_up_messages=\(received) catch_up_per_s=\(Int(Double(received) / seconds))")
        if received < count { throw ExitCode(1) }
    }

    static func total(_ counters: [any DeliveryCounter]) async throws -> Int {
        var sum = 0
        for counter in counters { sum += try await counter.loop.submit { counter.frames }.get() }
        return sum
    }

    /// utime + stime of the processes (from `/proc/PID/stat`), in seconds.
    static func cpuSeconds(_ pids: [Int32]) -> Double {
        let times = cpuTimes(pids)
        return times.user + times.system
    }

    /// utime and stime (the kernel's time on the processes' behalf: their system calls, and on loopback the
    /// receiving side's TCP that a send runs) of the processes, in seconds.
    static func cpuTimes(_ pids: [Int32]) -> (user: Double, system: Double) {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        var total = (user: 0.0, system: 0.0)
        for pid in pids {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // After the command: state(0) … utime(11) stime(12).
            if fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) {
                total.user += user / ticks
                total.system += system / ticks
            }
        }
        return total
    }

    /// VmRSS of the processes, summed, in bytes.
    static func residentBytes(_ pids: [Int32]) -> Int {
        pids.reduce(0) { total, pid in
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
            return total + (line.flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? 0) * 1024
        }
    }

    static func ownCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }

    static func subscribe(_ endpoint: Endpoint, target: Target, kind: Kind, channel: String, token: String,
                          group: any EventLoopGroup, since: String? = nil, presence: Bool = false,
                          stamps: LatencyRecorder? = nil) async throws -> ((any DeliveryCounter), any Channel) {
        let loop = group.next()
        if kind == .poll {
            let counter = PollCounter(loop: loop, target: target, endpoint: endpoint, channel: channel, token: token)
            let connection = try await ClientBootstrap(group: loop)
                .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(counter) } }
                .connect(host: endpoint.host, port: endpoint.port).get()
            return (counter, connection)
        }
        if kind == .sse {
            let counter = EventCounter(loop: loop)
            let connection = try await ClientBootstrap(group: loop)
                .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(counter) } }
                .connect(host: endpoint.host, port: endpoint.port).get()
            let path = target == .gateway ? "/v1/channels/topic:\(channel)/events" : "/sub/\(channel)"
            let auth = target == .gateway ? "Authorization: Bearer \(token)\r\n" : ""
            try await connection.writeAndFlush(ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: \(endpoint)\r\nAccept: text/event-stream\r\n\(auth)\r\n"))
            return (counter, connection)
        }
        let counter = FrameCounter(loop: loop, waitForReply: target == .gateway, stamps: stamps)
        let connection = try await ClientBootstrap(group: loop)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(counter) } }
            .connect(host: endpoint.host, port: endpoint.port).get()
        let path = target == .gateway ? "/v1/ws" : "/sub/\(channel)"
        var request = "GET \(path) HTTP/1.1\r\nHost: \(endpoint)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        if target == .gateway { request += "Authorization: Bearer \(token)\r\n" }
        var bytes = ByteBuffer(string: request + "\r\n")
        if target == .gateway {
            let from = (since.map { ",\"since\":\"\($0)\"" } ?? "") + (presence ? ",\"presence\":true" : "")
            bytes.writeImmutableBuffer(ServerFrameReader.clientText("{\"type\":\"subscribe\",\"channel\":\"topic:\(channel)\"\(from)}"))
        }
        try await connection.writeAndFlush(bytes)
        return (counter, connection)
    }
}

/// The status line and headers of a server's answer, gathered across reads.
struct ResponseHead {
    enum Outcome { case incomplete, accepted, refused(String) }
    private var bytes = ByteBuffer()

    /// Takes `input` until the head is complete; then `input` holds what came after it. `status`: the code
    /// that accepts (e.g. "101").
    mutating func take(_ input: inout ByteBuffer, status: String) -> Outcome {
        bytes.writeBuffer(&input)
        guard let end = bytes.readableBytesView.firstRange(of: Array("\r\n\r\n".utf8)) else { return .incomplete }
        let line = String(decoding: bytes.readableBytesView.prefix(12), as: UTF8.self)
        guard line.hasPrefix("HTTP/1.1 \(status)") else { return .refused(line) }
        bytes.moveReaderIndex(to: end.upperBound)
        input = bytes
        bytes = ByteBuffer()
        return .accepted
    }
}

/// A subscriber connection that counts what it receives (read on its loop).
protocol DeliveryCounter: AnyObject, Sendable {
    var loop: any EventLoop { get }
    /// Succeeded once the subscription is in place.
    var ready: EventLoopPromise<Void> { get }
    var frames: Int { get }
}

/// Counts the SSE events (`data:` lines) of a stream after a `200`, carrying a few bytes across reads.
final class EventCounter: ChannelInboundHandler, DeliveryCounter, @unchecked Sendable {  // state only touched on `loop`
    typealias InboundIn = ByteBuffer
    let loop: any EventLoop
    let ready: EventLoopPromise<Void>
    private(set) var frames = 0
    private var head = ResponseHead()
    private var started = false
    private var tail: [UInt8] = []
    private static let needle = Array("\ndata:".utf8)

    init(loop: any EventLoop) {
        self.loop = loop
        self.ready = loop.makePromise()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if !started {
            switch head.take(&bytes, status: "200") {
            case .incomplete: return
            case .refused(let status):
                ready.fail(ClientError(description: "stream refused: \(status)"))
                context.close(promise: nil)
                return
            case .accepted:
                started = true
                ready.succeed()
            }
        }
        // The needle may straddle two reads: scan the last few bytes of the previous read with this one.
        var joined = ByteBuffer(bytes: tail)
        joined.writeBuffer(&bytes)
        let n = Self.needle
        frames += joined.withUnsafeReadableBytes { raw -> Int in
            var found = 0
            var i = 0
            while i + n.count <= raw.count {
                if raw[i] == 0x0A && raw[i + 1] == 0x64 && raw[i + 2] == 0x61 && raw[i + 3] == 0x74 && raw[i + 4] == 0x61 && raw[i + 5] == 0x3A {
                    found += 1
                    i += n.count
                } else {
                    i += 1
                }
            }
            return found
        }
        tail = Array(joined.readableBytesView.suffix(n.count - 1))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        ready.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        ready.fail(ClientError(description: "connection closed"))
    }
}

/// A long-poll subscriber: one keep-alive connection, one request at a time, the next sent as soon as an answer
/// arrived. Gateway: it first reads the channel's position (a history request), then polls from the cursor of
/// each answer, counting the messages in it (`"seq":`). Nchan: each answer is one message; the next request
/// carries its `Last-Modified` and `Etag` (Nchan's long-poll protocol).
final class PollCounter: ChannelInboundHandler, DeliveryCounter, @unchecked Sendable {  // state only touched on `loop`
    typealias InboundIn = ByteBuffer
    let loop: any EventLoop
    let ready: EventLoopPromise<Void>
    private(set) var frames = 0
    private let target: Fanout.Target
    private let endpoint: Endpoint
    private let channel: String
    private let token: String
    private var cursor: String?
    private var lastModified: String?
    private var etag: String?
    private var input = ByteBuffer()
    private static let seqNeedle = Array("\"seq\":".utf8)
    private static let cursorNeedle = Array("\"cursor\":\"".utf8)

    init(loop: any EventLoop, target: Fanout.Target, endpoint: Endpoint, channel: String, token: String) {
        self.loop = loop
        self.ready = loop.makePromise()
        self.target = target
        self.endpoint = endpoint
        self.channel = channel
        self.token = token
    }

    private var nextRequest: ByteBuffer {
        switch target {
        case .gateway:
            let path = cursor.map { "/v1/channels/topic:\(channel)/poll?since=\($0)&timeout=30&limit=100" } ?? "/v1/channels/topic:\(channel)/messages?limit=1"
            return ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: \(endpoint)\r\nAuthorization: Bearer \(token)\r\n\r\n")
        case .nchan:
            let since = (lastModified.map { "If-Modified-Since: \($0)\r\n" } ?? "") + (etag.map { "If-None-Match: \($0)\r\n" } ?? "")
            return ByteBuffer(string: "GET /sub/\(channel) HTTP/1.1\r\nHost: \(endpoint)\r\nAccept: */*\r\n\(since)\r\n")
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(NIOAny(nextRequest), promise: nil)
        // Nchan's first poll waits for the channel's first message: in place once sent.
        if target == .nchan { ready.succeed() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        input.writeBuffer(&bytes)
        while let (status, headers, body) = takeResponse() {
            guard status == 200 || status == 304 else {
                ready.fail(ClientError(description: "poll answered \(status)"))
                context.close(promise: nil)
                return
            }
            switch target {
            case .gateway:
                let text = Array(body.readableBytesView)
                if cursor != nil { frames += Self.occurrences(of: Self.seqNeedle, in: text) }
                guard let last = Self.lastString(after: Self.cursorNeedle, in: text) else {
                    ready.fail(ClientError(description: "no cursor in a poll answer"))
                    context.close(promise: nil)
                    return
                }
                if cursor == nil { ready.succeed() }
                cursor = last
            case .nchan:
                if status == 200 { frames += 1 }
                lastModified = headers["last-modified"] ?? lastModified
                etag = headers["etag"] ?? etag
            }
            context.writeAndFlush(NIOAny(nextRequest), promise: nil)
        }
    }

    /// One whole response (with a `Content-Length` body) from `input`, if it has arrived.
    private func takeResponse() -> (Int, [String: String], ByteBuffer)? {
        let view = input.readableBytesView
        guard let end = view.firstRange(of: Array("\r\n\r\n".utf8)) else { return nil }
        let head = String(decoding: view[view.startIndex..<end.lowerBound], as: UTF8.self)
        var lines = head.split(separator: "\r\n")
        guard !lines.isEmpty else { return nil }
        let status = Int(lines.removeFirst().split(separator: " ").dropFirst().first ?? "") ?? 0
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let length = Int(headers["content-length"] ?? "0") ?? 0
        let headLength = end.upperBound - view.startIndex
        guard input.readableBytes >= headLength + length else { return nil }
        input.moveReaderIndex(forwardBy: headLength)
        let body = input.readSlice(length: length) ?? ByteBuffer()
        input.discardReadBytes()
        return (status, headers, body)
    }

    private static func occurrences(of needle: [UInt8], in text: [UInt8]) -> Int {
        guard text.count >= needle.count else { return 0 }
        var found = 0
        var i = 0
        while i + needle.count <= text.count {
            if text[i] == needle[0] && text[i..<(i + needle.count)].elementsEqual(needle) { found += 1; i += needle.count } else { i += 1 }
        }
        return found
    }

    /// The string after the last `needle` (up to the next quote).
    private static func lastString(after needle: [UInt8], in text: [UInt8]) -> String? {
        guard text.count >= needle.count else { return nil }
        var i = text.count - needle.count
        while i >= 0 {
            if text[i..<(i + needle.count)].elementsEqual(needle) {
                let start = i + needle.count
                guard let quote = text[start...].firstIndex(of: UInt8(ascii: "\"")) else { return nil }
                return String(decoding: text[start..<quote], as: UTF8.self)
            }
            i -= 1
        }
        return nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        ready.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        ready.fail(ClientError(description: "connection closed"))
    }
}

/// Send-to-arrival times of stamped messages (µs): `"t":` and the send time (`NIODeadline` nanoseconds) in the
/// body. One per client loop, touched only there (or one per publisher, under its lock).
final class LatencyRecorder: @unchecked Sendable {
    var histogram = Histogram<UInt64>.latencyMicros
    private static let needle = Array("\"t\":".utf8)

    static func stamp(in bytes: some Collection<UInt8>) -> UInt64? {
        guard let found = bytes.firstRange(of: needle) else { return nil }
        var value: UInt64 = 0
        var any = false
        for byte in bytes[found.upperBound...] {
            guard byte >= 0x30 && byte <= 0x39 else { break }
            value = value &* 10 &+ UInt64(byte - 0x30)
            any = true
        }
        return any ? value : nil
    }

    func record(sentAt: UInt64, now: UInt64 = NIODeadline.now().uptimeNanoseconds) {
        _ = histogram.record(now > sentAt ? (now - sentAt) / 1000 : 0)
    }
}

/// Counts the text frames a server sends after its `101` (with `stamps`, records the send time in each payload).
final class FrameCounter: ChannelInboundHandler, DeliveryCounter, @unchecked Sendable {  // state only touched on `loop`
    typealias InboundIn = ByteBuffer
    let loop: any EventLoop
    let ready: EventLoopPromise<Void>
    private let waitForReply: Bool
    private var head = ResponseHead()
    private var upgraded = false
    private var reader = ServerFrameReader()
    private(set) var frames = 0
    private var readyDone = false
    private let stamps: LatencyRecorder?

    init(loop: any EventLoop, waitForReply: Bool, stamps: LatencyRecorder? = nil) {
        self.loop = loop
        self.ready = loop.makePromise()
        self.waitForReply = waitForReply
        self.stamps = stamps
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if !upgraded {
            switch head.take(&bytes, status: "101") {
            case .incomplete: return
            case .refused(let status):
                ready.fail(ClientError(description: "upgrade refused: \(status)"))
                context.close(promise: nil)
                return
            case .accepted:
                upgraded = true
                if !waitForReply { ready.succeed() }
            }
        }
        do {
            try reader.read(&bytes) { frame in
                guard frame.opcode == 0x1 else { return }
                if waitForReply && !readyDone {
                    readyDone = true  // the `subscribed` reply
                    ready.succeed()
                    return
                }
                frames += 1
                if let stamps, let sent = LatencyRecorder.stamp(in: frame.payload.readableBytesView) { stamps.record(sentAt: sent) }
            }
        } catch {
            errorCaught(context: context, error: error)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        ready.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        ready.fail(ClientError(description: "connection closed"))
    }
}

/// One HTTP/1.1 keep-alive connection that POSTs messages at a fixed rate (pipelined), counting 2xx answers.
/// Publisher `index` of `count` sends messages index, index + count, …; message n goes to channel n mod C.
/// With `stamped`, each body carries its send time and each answer's delay is recorded (answers come in order).
final class Publisher: ChannelInboundHandler, @unchecked Sendable {  // `pending` only touched on its loop
    typealias InboundIn = ByteBuffer
    let channel: any Channel
    let acked = NIOLockedValueBox(0)
    /// Send times of the requests not answered yet, and the answers' delays.
    let ackLatency = NIOLockedValueBox((sent: CircularBuffer<UInt64>(), recorder: LatencyRecorder()))
    private let request: (Int, UInt64?) -> ByteBuffer
    private let index: Int, count: Int
    private let stamped: Bool
    private var pending = ""

    private init(channel: any Channel, index: Int, count: Int, stamped: Bool, request: @escaping (Int, UInt64?) -> ByteBuffer) {
        self.channel = channel
        self.request = request
        self.index = index
        self.count = count
        self.stamped = stamped
    }

    static func connect(_ endpoint: Endpoint, target: Fanout.Target, channels names: [String], index: Int = 0, of count: Int = 1, token: String,
                        size: Int, stamped: Bool = false, group: any EventLoopGroup) async throws -> Publisher {
        let pad = String(repeating: "x", count: max(0, size - 40))
        let auth = target == .gateway ? "Authorization: Bearer \(token)\r\n" : ""
        let request: (Int, UInt64?) -> ByteBuffer = { n, sentAt in
            let name = names[n % names.count]
            let path = target == .gateway ? "/v1/channels/topic:\(name)/messages" : "/pub/\(name)"
            let fields = "\"n\":\(n),\"pad\":\"\(pad)\"" + (sentAt.map { ",\"t\":\($0)" } ?? "")
            let body = target == .gateway ? "{\"body\":{\(fields)}}" : "{\(fields)}"
            return ByteBuffer(string: "POST \(path) HTTP/1.1\r\nHost: \(endpoint)\r\n\(auth)Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        }
        let connection = try await ClientBootstrap(group: group)
            .connect(host: endpoint.host, port: endpoint.port).get()
        let publisher = Publisher(channel: connection, index: index, count: count, stamped: stamped, request: request)
        try await connection.pipeline.addHandler(publisher).get()
        return publisher
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        pending += String(buffer: unwrapInboundIn(data))
        var answered = 0
        while let range = pending.range(of: "HTTP/1.1 2") {
            answered += 1
            pending = String(pending[range.upperBound...])
        }
        if pending.count > 64 * 1024 { pending = String(pending.suffix(64)) }
        guard answered > 0 else { return }
        acked.withLockedValue { $0 += answered }
        if stamped {
            let now = NIODeadline.now().uptimeNanoseconds
            ackLatency.withLockedValue { state in
                for _ in 0..<answered {
                    guard let sent = state.sent.popFirst() else { break }
                    state.recorder.record(sentAt: sent, now: now)
                }
            }
        }
    }

    /// Sends `total` requests at `rate` a second, in 10 ms ticks.
    func publish(count total: Int, rate: Double) async throws {
        let start = NIODeadline.now()
        var sent = 0
        while sent < total {
            let elapsed = Double((NIODeadline.now() - start).nanoseconds) / 1e9
            let due = min(total, Int(elapsed * rate) + 1)
            if due > sent {
                var batch = ByteBuffer()
                let now = NIODeadline.now().uptimeNanoseconds
                for k in sent..<due { var one = request(k * count + index, stamped ? now : nil); batch.writeBuffer(&one) }
                if stamped { ackLatency.withLockedValue { for _ in sent..<due { $0.sent.append(now) } } }
                sent = due
                try await channel.writeAndFlush(batch)
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}
