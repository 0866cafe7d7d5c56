import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// A minimal HTTP/1.1 client over a real socket (one connection per request).
struct HTTPTestResponse: Sendable {
    let status: Int
    let headers: HTTPHeaders
    let body: String

    var json: [String: Any] { RealtimeTests.json(body) }
}

enum HTTPTestClient {
    /// `tls`: speak HTTPS with this client context (it says which CAs are trusted).
    static func request(_ method: HTTPMethod, port: Int, _ uri: String, headers: [(String, String)] = [], body: String? = nil,
                        token: String? = nil, tls: NIOSSLContext? = nil) async throws -> HTTPTestResponse {
        try await within(30, "\(method) \(uri)") {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.addTestTLS(tls)
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                    }
                }
            return try await channel.executeThenClose { inbound, outbound in
                var head = HTTPRequestHead(version: .http1_1, method: method, uri: uri)
                head.headers.add(name: "Host", value: "127.0.0.1:\(port)")
                if !headers.contains(where: { $0.0.lowercased() == "connection" }) { head.headers.add(name: "Connection", value: "close") }
                if let token { head.headers.add(name: "Authorization", value: "Bearer \(token)") }
                for (name, value) in headers { head.headers.add(name: name, value: value) }
                if let body { head.headers.add(name: "Content-Length", value: String(body.utf8.count)) }
                // A server may answer (and close) before the whole request is written, as an HTTP server
                // refusing an oversized body does: read the answer anyway.
                do {
                    try await outbound.write(.head(head))
                    if let body { try await outbound.write(.body(.byteBuffer(ByteBuffer(string: body)))) }
                    try await outbound.write(.end(nil))
                } catch {}
                var status = 0
                var headers = HTTPHeaders()
                var collected = ByteBuffer()
                for try await part in inbound {
                    switch part {
                    case .head(let h):
                        status = Int(h.status.code)
                        headers = h.headers
                    case .body(var chunk):
                        collected.writeBuffer(&chunk)
                    case .end:
                        return HTTPTestResponse(status: status, headers: headers, body: String(buffer: collected))
                    }
                }
                return HTTPTestResponse(status: status, headers: headers, body: String(buffer: collected))
            }
        }
    }

    /// Long-polls `channel` from its very start until `count` messages arrived (from the start, not from "now":
    /// publishers may already be running). Bounded, so that a loss shows as a failure, not as a hang.
    static func longPoll(port: Int, channel: String, token: String, count: Int, timeout: Double = 240) async throws -> [Received] {
        try await within(timeout, "long-poll of \(count) messages") {
            var cursor = try await zeroCursor(port: port, channel: channel, token: token)
            var received: [Received] = []
            while received.count < count {
                try Task.checkCancellation()
                let answer = try await request(.GET, port: port, "/v1/channels/\(channel)/poll?since=\(cursor)&timeout=20&limit=37", token: token)
                guard answer.status == 200 else { throw ServiceError(description: "poll answered \(answer.status): \(answer.body)") }
                cursor = answer.json["cursor"] as! String
                for m in answer.json["messages"] as! [[String: Any]] { received.append(Received(m)) }
            }
            return received
        }
    }

    /// The position before the first message (`0.<hash>`), from an empty-page history answer.
    /// Every message after `since`, page by page (pages are capped in bytes as well as in count).
    static func allMessages(port: Int, channel: String, since: String, token: String) async throws -> [Received] {
        var out: [Received] = []
        var cursor = since
        while true {
            let page = try await request(.GET, port: port, "/v1/channels/\(channel)/messages?since=\(cursor)&limit=1000", token: token)
            guard page.status == 200 else { throw ServiceError(description: "history answered \(page.status)") }
            out += (page.json["messages"] as? [[String: Any]] ?? []).map(Received.init)
            cursor = page.json["cursor"] as? String ?? cursor
            if page.json["has_more"] as? Bool != true { return out }
        }
    }

    /// One sample of `/metrics` (first sample of the metric's name).
    static func metric(_ name: String, port: Int, label: String? = nil, tls: NIOSSLContext? = nil) async throws -> Int {
        let text = try await request(.GET, port: port, "/metrics", tls: tls).body
        for line in text.split(separator: "\n") where line.hasPrefix(name + "{") || line.hasPrefix(name + " ") {
            if let label, !line.contains(label) { continue }
            return Int(Double(line.split(separator: " ").last ?? "") ?? 0)
        }
        return 0
    }

    static func zeroCursor(port: Int, channel: String, token: String) async throws -> String {
        let latest = try await request(.GET, port: port, "/v1/channels/\(channel)/messages?limit=1", token: token)
        let cursor = latest.json["cursor"] as! String
        return "0." + cursor.split(separator: ".")[1]
    }

    /// Publishes `body` over REST; returns the response.
    static func publish(port: Int, channel: String, body: [String: Any], token: String, idempotencyKey: String? = nil) async throws -> HTTPTestResponse {
        var headers: [(String, String)] = [("Content-Type", "application/json")]
        if let idempotencyKey { headers.append(("Idempotency-Key", idempotencyKey)) }
        return try await request(.POST, port: port, "/v1/channels/\(channel)/messages", headers: headers, body: jsonText(["body": body]), token: token)
    }
}

/// An SSE client over a real socket: yields each event as it arrives.
final class SSETestClient: @unchecked Sendable {  // used from one test task at a time
    struct Event: Sendable {
        var id: String?
        var event: String?
        var data: String?
    }

    let status: Int
    let headers: HTTPHeaders
    private var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    private let channel: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>
    private var pending = ""
    private(set) var comments: [String] = []
    private(set) var retry: String?
    private(set) var ended = false

    static func connect(port: Int, channel name: String, token: String, query: String = "", lastEventID: String? = nil,
                        headers extra: [(String, String)] = [], tls: NIOSSLContext? = nil) async throws -> SSETestClient {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.addTestTLS(tls)
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                }
            }
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/v1/channels/\(name)/events\(query.isEmpty ? "" : "?" + query)")
        head.headers.add(name: "Host", value: "127.0.0.1:\(port)")
        head.headers.add(name: "Accept", value: "text/event-stream")
        head.headers.add(name: "Authorization", value: "Bearer \(token)")
        if let lastEventID { head.headers.add(name: "Last-Event-ID", value: lastEventID) }
        for (name, value) in extra { head.headers.add(name: name, value: value) }
        try await channel.outbound.write(.head(head))
        try await channel.outbound.write(.end(nil))
        var iterator = channel.inbound.makeAsyncIterator()
        guard case .head(let responseHead)? = try await iterator.next() else { throw TimedOut(what: "SSE response head") }
        return SSETestClient(channel: channel, iterator: iterator, status: Int(responseHead.status.code), headers: responseHead.headers)
    }

    private init(channel: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>, iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator, status: Int, headers: HTTPHeaders) {
        self.channel = channel
        self.iterator = iterator
        self.status = status
        self.headers = headers
    }

    /// The next event block (an `id:`-only block included); nil when the stream ended.
    func nextEvent() async throws -> Event? {
        while true {
            if let range = pending.range(of: "\n\n") {
                let block = String(pending[..<range.lowerBound])
                pending.removeSubrange(..<range.upperBound)
                var event = Event()
                var hasField = false
                for line in block.split(separator: "\n", omittingEmptySubsequences: false) {
                    if line.hasPrefix(":") { comments.append(String(line)); continue }
                    let parts = line.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
                    let field = String(parts[0])
                    var value = parts.count > 1 ? String(parts[1]) : ""
                    if value.hasPrefix(" ") { value.removeFirst() }
                    switch field {
                    case "id": event.id = value; hasField = true
                    case "event": event.event = value; hasField = true
                    case "data": event.data = (event.data.map { $0 + "\n" } ?? "") + value; hasField = true
                    case "retry": retry = value
                    default: break
                    }
                }
                if hasField { return event }
                continue
            }
            guard !ended else { return nil }
            switch try await iterator.next() {
            case .body(let chunk)?: pending += String(buffer: chunk)
            case .end?, nil, .head?: ended = true
            }
        }
    }

    /// `nextEvent()` with a hang guard (events the test waits for one at a time).
    func guardedNextEvent(timeout: Double = 30) async throws -> Event? {
        nonisolated(unsafe) let client = self
        return try await within(timeout, "SSE event") { try await client.nextEvent() }
    }

    /// The seqs of the message events read until the stream ends.
    func seqsUntilEnd(timeout: Double = 20) async throws -> [Int64] {
        var seqs: [Int64] = []
        while let event = try await guardedNextEvent(timeout: timeout) {
            if event.event == "message", let data = event.data { seqs.append(Received(json(data)).seq) }
        }
        return seqs
    }

    /// Reads events until `count` messages have arrived; returns the message JSON objects.
    func messages(_ count: Int, timeout: Double = 60) async throws -> [Received] {
        nonisolated(unsafe) let client = self
        let texts = try await within(timeout, "SSE messages") {
            var out: [String] = []
            while out.count < count, let event = try await client.nextEvent() {
                if event.event == "message", let data = event.data { out.append(data) }
            }
            return out
        }
        return texts.map { Received(json($0)) }
    }

    func close() async {
        channel.outbound.finish()
        try? await channel.channel.close()
    }

    deinit {
        channel.outbound.finish()
        channel.channel.close(promise: nil)
    }
}

extension Channel {
    /// TLS first in a test client's pipeline (nil: plain TCP). Connections go to 127.0.0.1: the certificate is
    /// checked against that address (no SNI).
    func addTestTLS(_ context: NIOSSLContext?) throws {
        guard let context else { return }
        try pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
    }
}
