import Foundation
import Histogram
import NIOConcurrencyHelpers
import NIOCore
import Wire

/// Runs one load test: subscribers first (ramped), then publishers for the duration, then a drain until
/// every subscriber caught up with the last acked message of its channel (or the drain time is over).
final class Runner: Sendable {
    let plan: Plan
    let tokens: TokenSource
    let group: any EventLoopGroup
    let ledger = Ledger()
    private let stopping = NIOLockedValueBox(false)
    private let publishingDone = NIOLockedValueBox(false)
    /// Subscriber i's current position (for the drain), and a way to close its connection.
    private let progress: NIOLockedValueBox<[Int64?]>
    private let closers = NIOLockedValueBox<[Int: @Sendable () async -> Void]>([:])
    private let ready = NIOLockedValueBox(0)

    init(plan: Plan, tokens: TokenSource, group: any EventLoopGroup) {
        self.plan = plan
        self.tokens = tokens
        self.group = group
        self.progress = NIOLockedValueBox([Int64?](repeating: nil, count: plan.subscribers))
    }

    var isStopping: Bool { stopping.withLockedValue { $0 } }

    func run() async -> Report {
        let started = Date()
        let printer = Task { await self.printProgress(started) }
        let subscribers = (0..<plan.subscribers).map { i in Task { await self.subscriber(i) } }
        // Publishing starts once every subscriber is subscribed (or gave up).
        let readyBy = Date().addingTimeInterval(plan.ramp + 30)
        while ready.withLockedValue({ $0 }) < plan.subscribers && Date() < readyBy { try? await Task.sleep(for: .milliseconds(50)) }
        let publishStart = Date()
        let loadBefore = MachineLoad.sample()
        await withTaskGroup(of: Void.self) { group in
            for p in 0..<plan.publishers { group.addTask { await self.publisher(p) } }
        }
        let publishSeconds = Date().timeIntervalSince(publishStart)
        let load = loadBefore.flatMap { before in MachineLoad.sample().map { MachineLoad.between(before, $0) } }
        publishingDone.withLockedValue { $0 = true }
        let drainBy = Date().addingTimeInterval(plan.drain)
        while Date() < drainBy && !caughtUp() { try? await Task.sleep(for: .milliseconds(50)) }
        stopping.withLockedValue { $0 = true }
        for close in closers.withLockedValue({ Array($0.values) }) { await close() }
        var tracks: [(Int, Track)] = []
        for (i, task) in subscribers.enumerated() { if let track = await task.value { tracks.append((i, track)) } }
        printer.cancel()
        for (i, track) in tracks { track.checkComplete(ledger, who: "subscriber \(i) (\(plan.transport(i).rawValue))") }
        return Report(snapshot: ledger.snapshot(), seconds: Date().timeIntervalSince(started), publishSeconds: publishSeconds,
                      subscribed: tracks.count, load: load)
    }

    private func caughtUp() -> Bool {
        let positions = progress.withLockedValue { $0 }
        for (i, position) in positions.enumerated() {
            guard let position else { continue }
            if position < ledger.maxAcked(plan.channels[i % plan.channels.count]) { return false }
        }
        return true
    }

    // MARK: subscribers

    private enum End { case closed, stopped }

    private func subscriber(_ i: Int) async -> Track? {
        if plan.ramp > 0 { try? await Task.sleep(for: .seconds(plan.ramp * Double(i) / Double(max(1, plan.subscribers)))) }
        let channel = plan.channels[i % plan.channels.count]
        let transport = plan.transport(i)
        var endpoint = i % plan.endpoints.count
        var track: Track?
        var cursor: String?
        var failures = 0
        var counted = false
        defer { if !counted { ready.withLockedValue { $0 += 1 } } }
        let token: String
        do { token = try await tokens.make("lt-sub-\(i)") } catch { ledger.error("token: \(error)"); return nil }
        while !isStopping {
            let who = "subscriber \(i) (\(transport.rawValue) via \(plan.endpoints[endpoint]))"
            do {
                let onReady: @Sendable () -> Void = { [ready] in ready.withLockedValue { $0 += 1 } }
                let end: End
                switch transport {
                case .ws: end = try await webSocket(i, plan.endpoints[endpoint], token, channel, &track, &cursor, who, counted ? nil : onReady)
                case .sse: end = try await serverSentEvents(i, plan.endpoints[endpoint], token, channel, &track, &cursor, who, counted ? nil : onReady)
                case .poll: end = try await longPoll(i, plan.endpoints[endpoint], token, channel, &track, &cursor, who, counted ? nil : onReady)
                }
                counted = counted || track != nil
                failures = 0
                if end == .stopped || isStopping { break }
            } catch {
                counted = counted || track != nil
                if isStopping { break }
                ledger.error("\(who): \(error)")
                failures += 1
                if failures > 20 { ledger.error("\(who): giving up after 20 failures: \(error)"); break }
                try? await Task.sleep(for: .milliseconds(100 * failures))
            }
            // Reconnect (churn, or the connection dropped) on another instance, from the cursor.
            ledger.reconnected()
            endpoint = (endpoint + 1) % plan.endpoints.count
        }
        closers.withLockedValue { _ = $0.removeValue(forKey: i) }
        return track
    }

    /// Seconds until this connection is dropped on purpose (`--churn`), exponentially distributed.
    private func churnDelay() -> Double? {
        guard plan.churn else { return nil }
        return -log(Double.random(in: 0.0001..<1)) * plan.churnEvery
    }

    private func register(_ i: Int, _ close: @escaping @Sendable () async -> Void) -> Task<Void, Never>? {
        closers.withLockedValue { $0[i] = close }
        guard let delay = churnDelay() else { return nil }
        return Task {
            try? await Task.sleep(for: .seconds(delay))
            if !Task.isCancelled { await close() }
        }
    }

    /// Handles one delivered message object; returns its cursor.
    private func deliver(_ message: WireMessage, _ i: Int, _ track: inout Track?, who: String) -> String? {
        deliver(Delivery(message), i, &track, who: who)
    }

    private func deliver(_ message: Delivery, _ i: Int, _ track: inout Track?, who: String) -> String? {
        guard var current = track else { return nil }
        let (seq, id) = (message.seq, message.id)
        var latency: UInt64?
        if let t = message.body.t { latency = (nowNanos() &- UInt64(clamping: t)) / 1000 }
        if current.see(seq, ledger: ledger, who: who) {
            ledger.delivered(channel: current.channel, seq: seq, id: id, latencyMicros: latency)
        }
        track = current
        progress.withLockedValue { $0[i] = current.last }
        return message.cursor
    }

    private func begin(_ i: Int, _ track: inout Track?, channel: String, at cursor: String, who: String, _ onReady: (@Sendable () -> Void)?) {
        guard let position = seq(ofCursor: cursor) else { return }
        if let current = track {
            if position != current.last { ledger.violation(.gap, "\(who): resumed at \(position), expected \(current.last)") }
        } else {
            track = Track(channel: channel, start: position)
            progress.withLockedValue { $0[i] = position }
        }
        onReady?()
    }

    private func webSocket(_ i: Int, _ endpoint: Endpoint, _ token: String, _ channel: String, _ track: inout Track?, _ cursor: inout String?,
                           _ who: String, _ onReady: (@Sendable () -> Void)?) async throws -> End {
        // Deliveries are checked on the connection's event loop as they arrive (`take`); a reply that is not taken
        // (an error, an unsubscribe) is recorded and ends the connection; the task waits for the end.
        let live = NIOLockedValueBox(Live(track: track, cursor: cursor))
        defer { (track, cursor) = live.withLockedValue { ($0.track, $0.cursor) } }
        let subscribe = ClientCommand.subscribe(id: .string("s"), channel: channel, since: cursor).text
        let ws = try await LiveSocket.connect(endpoint, token: token, first: subscribe, group: group, take: { [self] frame in
            take(frame, i, live, channel: channel, who: who, onReady)
        }, other: { [ledger] text in ledger.error("\(who): \(text.prefix(300))") })
        ledger.connected(1)
        defer { ledger.connected(-1) }
        let churn = register(i) { ws.close() }
        defer { churn?.cancel() }
        await ws.closed()
        if let code = ws.closeCode, code != 1000, code != 1001, code != 1005 { ledger.error("\(who): closed with \(code)") }
        return isStopping ? .stopped : .closed
    }

    /// A WebSocket subscriber's position, shared by its task and its connection's event loop.
    private struct Live {
        var track: Track?
        var cursor: String?
    }

    /// One text message of a WebSocket subscriber, on its event loop: a delivery or the `subscribed` reply is
    /// taken (true); an error or an unsubscribe is not (false: it is recorded and the connection ends).
    private func take(_ frame: ByteBufferView, _ i: Int, _ live: NIOLockedValueBox<Live>, channel: String, who: String,
                      _ onReady: (@Sendable () -> Void)?) -> Bool {
        func record(_ message: Delivery) {
            live.withLockedValue { s in if let next = deliver(message, i, &s.track, who: who) { s.cursor = next } }
        }
        // Messages (nearly every frame) in one pass; anything else as a reply.
        if let message = Delivery.scan(frame) {
            record(message)
            return true
        }
        guard let reply = try? ServerReply.decode(String(decoding: frame, as: UTF8.self)) else { return true }
        switch reply {
        case .message(_, let raw):
            if let message = try? raw.decode(WireMessage.self) { record(Delivery(message)) }
        case .subscribed(_, _, let position):
            live.withLockedValue { s in
                begin(i, &s.track, channel: channel, at: position, who: who, onReady)
                if s.cursor == nil { s.cursor = position }
            }
        case .error, .unsubscribed:
            return false
        default:
            break
        }
        return true
    }

    private func serverSentEvents(_ i: Int, _ endpoint: Endpoint, _ token: String, _ channel: String, _ track: inout Track?,
                                  _ cursor: inout String?, _ who: String, _ onReady: (@Sendable () -> Void)?) async throws -> End {
        let stream = try await HTTPStream.open(endpoint, "/v1/channels/\(channel)/events", token: token,
                                               headers: [("Accept", "text/event-stream")] + (cursor.map { [("Last-Event-ID", $0)] } ?? []), group: group)
        guard stream.status == 200 else {
            let body = try await stream.body()
            throw ClientError(description: "\(who): SSE answered \(stream.status): \(body.prefix(200))")
        }
        ledger.connected(1)
        defer { ledger.connected(-1) }
        let churn = register(i) { await stream.close() }
        defer { churn?.cancel() }
        var opened = false
        let decoder = JSONDecoder()
        while let event = try await stream.nextEvent() {
            if !opened, event.data == nil, let id = event.id {
                opened = true
                begin(i, &track, channel: channel, at: id, who: who, onReady)
                if cursor == nil { cursor = id }
                continue
            }
            guard event.event == "message", let data = event.data,
                  let message = try? decoder.decode(Delivery.self, from: Data(data.utf8)) else { continue }
            if let next = deliver(message, i, &track, who: who) { cursor = next }
        }
        return isStopping ? .stopped : .closed
    }

    private func longPoll(_ i: Int, _ endpoint: Endpoint, _ token: String, _ channel: String, _ track: inout Track?, _ cursor: inout String?,
                          _ who: String, _ onReady: (@Sendable () -> Void)?) async throws -> End {
        if cursor == nil {
            let head = try await HTTPStream.open(endpoint, "/v1/channels/\(channel)/messages?limit=1", token: token, group: group)
            let body = try await head.body()
            guard head.status == 200, let position = (try? JSONDecoder().decode(MessagePage.self, from: Data(body.utf8)))?.cursor else {
                throw ClientError(description: "\(who): history answered \(head.status)")
            }
            begin(i, &track, channel: channel, at: position, who: who, onReady)
            cursor = position
        } else if track != nil {
            onReady?()
        }
        let until = churnDelay().map { Date().addingTimeInterval($0) }
        // One kept-alive connection for the polls, as a browser keeps one (a new one if the server closed it).
        var connection: HTTPStream?
        do {
            let end = try await pollLoop(endpoint, token, channel, &track, &cursor, &connection, who, until: until, i)
            await connection?.close()
            return end
        } catch {
            await connection?.close()
            throw error
        }
    }

    private func pollLoop(_ endpoint: Endpoint, _ token: String, _ channel: String, _ track: inout Track?, _ cursor: inout String?,
                          _ connection: inout HTTPStream?, _ who: String, until: Date?, _ i: Int) async throws -> End {
        while !isStopping {
            if let until, Date() > until { return .closed }
            let uri = "/v1/channels/\(channel)/poll?since=\(cursor!)&timeout=2&limit=500"
            func poll(on stream: HTTPStream) async throws -> (status: Int, body: String) {
                try await stream.get(uri, token: token, keepAlive: true)
                return (stream.status, try await stream.body())
            }
            let answer: (status: Int, body: String)
            if let current = connection, let reused = try? await poll(on: current) {
                answer = reused
            } else {
                // No connection yet, or the server closed the kept-alive one (idle timeout): a new one.
                if let stale = connection { await stale.close() }
                let fresh = try await HTTPStream.connect(endpoint, group: group)
                connection = fresh
                answer = try await poll(on: fresh)
            }
            let (status, body) = answer
            guard status == 200, let page = try? JSONDecoder().decode(MessagePage.self, from: Data(body.utf8)) else {
                throw ClientError(description: "\(who): poll answered \(status): \(body.prefix(200))")
            }
            for message in page.messages {
                if let next = deliver(message, i, &track, who: who) { cursor = next }
            }
            cursor = page.cursor
        }
        return .stopped
    }

    // MARK: publishers

    private func publisher(_ p: Int) async {
        let endpoint = plan.endpoints[p % plan.endpoints.count]
        let who = "publisher \(p) via \(endpoint)"
        let sends = PacedPublishes(plan: plan, index: p, ledger: ledger, who: who)
        do {
            sends.socket = try await LiveSocket.connect(endpoint, token: try await tokens.make("lt-pub-\(p)"), first: nil, group: group,
                                                        take: { sends.answered($0) }, other: { [ledger] text in ledger.error("\(who): \(text.prefix(300))") })
        } catch {
            ledger.error("\(who): \(error)")
            return
        }
        let unanswered = await sends.run()
        if unanswered > 0 { ledger.error("\(who): \(unanswered) publishes never answered") }
        sends.socket.close()
    }

    // MARK: progress

    private func printProgress(_ started: Date) async {
        guard isatty(STDOUT_FILENO) == 1 else { return }
        var last = ledger.snapshot()
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(1))
            let now = ledger.snapshot()
            let p99 = Double(now.delivery.valueAtPercentile(99)) / 1000
            let line = String(format: "\r[%5.1fs] connections %d  sent %d/s  received %d/s  violations %d  p99 %.1f ms   ",
                              Date().timeIntervalSince(started), now.connections, now.sent - last.sent, now.received - last.received,
                              now.totalViolations, p99)
            FileHandle.standardOutput.write(Data(line.utf8))
            last = now
        }
        FileHandle.standardOutput.write(Data("\n".utf8))
    }
}

/// What the ledger checks of a delivered message (PROTOCOL.md §1 fields, and the publisher's send time `t`
/// from the body), decoded without building the rest of the body: the load generator must not be the limit.
struct Delivery: Decodable, Sendable {
    let id: String
    let channel: String
    let seq: Int64
    let cursor: String
    let body: Body

    struct Body: Decodable, Sendable {
        let t: Int64?
    }

    init(id: String, channel: String, seq: Int64, cursor: String, t: Int64?) {
        (self.id, self.channel, self.seq, self.cursor, self.body) = (id, channel, seq, cursor, Body(t: t))
    }

    /// The fields read straight off a message frame in the server's layout
    /// (`{"type":"message","channel":"…","message":{"id":"…","channel":"…","seq":N,"cursor":"…",…,"body":{…}}}`);
    /// nil for anything else, which then goes through `JSONDecoder`. Foundation's decoder costs the load
    /// generator more than the server spends delivering the message.
    static func scan(_ bytes: ByteBufferView) -> Delivery? {
        bytes.withUnsafeBytes { raw -> Delivery? in
            var s = Scanner(raw)
            guard s.skip("{\"type\":\"message\",\"channel\":\""), let channel = s.string(), s.skip(",\"message\":{\"id\":\""),
                  let id = s.string(), s.skip(",\"channel\":\""), s.string() == channel, s.skip(",\"seq\":"), let seq = s.integer(),
                  s.skip(",\"cursor\":\""), let cursor = s.string(), s.find(",\"body\":{") else { return nil }
            // The publisher's send time: the body key "t" (a quote inside a string value is escaped, so `"t":` is a key).
            let t = s.find("\"t\":") ? s.integer() : nil
            return Delivery(id: id, channel: channel, seq: seq, cursor: cursor, t: t)
        }
    }

    /// Reads ASCII landmarks and plain (unescaped) strings and integers off raw bytes.
    struct Scanner {
        let bytes: UnsafeRawBufferPointer
        var index = 0
        init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

        /// Moves past `literal` if the bytes at the position are it.
        mutating func skip(_ literal: StaticString) -> Bool {
            let count = literal.utf8CodeUnitCount
            guard bytes.count - index >= count else { return false }
            let start = literal.utf8Start
            for k in 0..<count where bytes[index + k] != start[k] { return false }
            index += count
            return true
        }

        /// Up to the closing quote; nil for an escaped string.
        mutating func string() -> String? {
            var end = index
            while end < bytes.count, bytes[end] != UInt8(ascii: "\""), bytes[end] != UInt8(ascii: "\\") { end += 1 }
            guard end < bytes.count, bytes[end] == UInt8(ascii: "\"") else { return nil }
            let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[index..<end]), as: UTF8.self)
            index = end + 1
            return text
        }

        mutating func integer() -> Int64? {
            var value: Int64 = 0
            var digits = 0
            while index < bytes.count, bytes[index] >= 0x30, bytes[index] <= 0x39, digits < 18 {
                value = value * 10 + Int64(bytes[index] - 0x30)
                digits += 1
                index += 1
            }
            return digits > 0 ? value : nil
        }

        /// Moves past the next occurrence of `literal`.
        mutating func find(_ literal: StaticString) -> Bool {
            let first = literal.utf8Start[0]
            while index < bytes.count {
                if bytes[index] == first, skip(literal) { return true }
                index += 1
            }
            return false
        }
    }

    init(_ message: WireMessage) {
        id = message.id
        channel = message.channel
        seq = message.seq
        cursor = message.cursor
        if case .integer(let t) = message.body["t"] { body = Body(t: t) } else { body = Body(t: nil) }
    }
}

/// A reply to a publish, read in one pass: an `ack` with its message, or anything else (an error) by its type.
struct AckFrame: Decodable, Sendable {
    let type: String
    let id: String?
    let message: Delivery?

    /// An ack read straight off the frame in the server's layout
    /// (`{"type":"ack","id":"…","message":{"id":"…","channel":"…","seq":N,"cursor":"…",…}}`); nil for anything
    /// else, which then goes through `JSONDecoder`.
    static func scan(_ bytes: ByteBufferView) -> AckFrame? {
        bytes.withUnsafeBytes { raw -> AckFrame? in
            var s = Delivery.Scanner(raw)
            guard s.skip("{\"type\":\"ack\",\"id\":\""), let id = s.string(), s.skip(",\"message\":{\"id\":\""), let message = s.string(),
                  s.skip(",\"channel\":\""), let channel = s.string(), s.skip(",\"seq\":"), let seq = s.integer(),
                  s.skip(",\"cursor\":\""), let cursor = s.string() else { return nil }
            return AckFrame(type: "ack", id: id, message: Delivery(id: message, channel: channel, seq: seq, cursor: cursor, t: nil))
        }
    }

    init(type: String, id: String?, message: Delivery?) { (self.type, self.id, self.message) = (type, id, message) }
}

/// One publisher's sends, run on its connection's event loop (no task woken per message): message n at
/// `start + n · interval` (back to back when the rate is unlimited), at most 256 unanswered; each answer is
/// matched to its send time. Its state is only touched on that loop.
final class PacedPublishes: @unchecked Sendable {
    private let plan: Plan
    private let index: Int
    private let ledger: Ledger
    private let who: String
    /// Set once connected, before `run`.
    var socket: LiveSocket!
    private var sentAt: [Int: UInt64] = [:]
    private var n = 0
    private var start: UInt64 = 0
    private var end: UInt64 = 0
    private var done: EventLoopPromise<Void>?
    /// At the cap of unanswered publishes: the next answer resumes the sending.
    private var waitingForRoom = false
    private let interval: Double
    private let count: Int
    private let pad: String
    /// `{"type":"publish","channel":"…","id":"` per channel, written once.
    private let heads: [String]

    init(plan: Plan, index: Int, ledger: Ledger, who: String) {
        (self.plan, self.index, self.ledger, self.who) = (plan, index, ledger, who)
        interval = plan.rate > 0 ? Double(plan.publishers) / plan.rate : 0
        count = plan.count > 0 ? (plan.count + plan.publishers - 1 - index) / plan.publishers : Int.max
        pad = String(repeating: "x", count: max(0, plan.size - 60))
        heads = plan.channels.map { channel in
            var head = "{\"type\":\"publish\",\"channel\":"
            WireText.appendString(channel, to: &head)
            return head + ",\"id\":\""
        }
    }

    /// Publishes for the plan's duration (or count), then waits up to 30 s for the answers; returns how many
    /// never came.
    func run() async -> Int {
        let loop = socket.eventLoop
        let sent = loop.makePromise(of: Void.self)
        loop.execute {
            self.done = sent
            self.start = nowNanos()
            self.end = self.start + UInt64(self.plan.duration * 1e9)
            self.socket.closeFuture.whenComplete { _ in
                guard let done = self.done else { return }
                self.ledger.error("\(self.who): the connection closed while publishing")
                self.done = nil
                done.succeed()
            }
            self.tick()
        }
        try? await sent.futureResult.get()
        let answeredBy = Date().addingTimeInterval(30)
        while Date() < answeredBy, (try? await loop.submit({ !self.sentAt.isEmpty }).get()) ?? false {
            try? await Task.sleep(for: .milliseconds(10))
        }
        return (try? await loop.submit { self.sentAt.count }.get()) ?? 0
    }

    /// Sends what is due; comes back when the next one is (or an answer makes room).
    private func tick() {
        var wrote = false
        defer { if wrote { socket.flush() } }
        while true {
            let now = nowNanos()
            guard now < end, n < count, socket.isOpen else {
                done?.succeed()
                done = nil
                return
            }
            let due = start + UInt64(Double(n) * interval * 1e9)
            if due > now {
                socket.eventLoop.scheduleTask(in: .nanoseconds(Int64(due - now))) { self.tick() }
                return
            }
            if sentAt.count >= 256 {
                waitingForRoom = true  // an answer calls back
                return
            }
            let channel = (index + n * plan.publishers) % plan.channels.count
            sentAt[n] = now
            socket.write(heads[channel] + "\(n)\",\"body\":{\"t\":\(now),\"p\":\(index),\"n\":\(n),\"pad\":\"\(pad)\"}}")
            wrote = true
            ledger.sent()
            n += 1
        }
    }

    /// A text message on the publisher's connection (on its loop): an ack, or an error, for a publish.
    func answered(_ frame: ByteBufferView) -> Bool {
        let reply = AckFrame.scan(frame) ?? (try? JSONDecoder().decode(AckFrame.self, from: Data(frame)))
        guard let reply, let text = reply.id, let n = Int(text), let sent = sentAt.removeValue(forKey: n) else { return true }
        if reply.type == "ack", let message = reply.message {
            ledger.acked(channel: message.channel, seq: message.seq, id: message.id, latencyMicros: (nowNanos() &- sent) / 1000)
        } else {
            ledger.error("\(who): \(String(decoding: frame, as: UTF8.self).prefix(300))")
        }
        if waitingForRoom {
            waitingForRoom = false
            tick()
        }
        return true
    }
}
