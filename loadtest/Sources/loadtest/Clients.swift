import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// `http://host:port` → where to connect.
struct Endpoint: Sendable, CustomStringConvertible {
    let host: String
    let port: Int
    var description: String { "\(host):\(port)" }

    init?(url: String) {
        guard let components = URLComponents(string: url), components.scheme == "http", let host = components.host else { return nil }
        self.host = host
        self.port = components.port ?? 80
    }
}

struct ClientError: Error, CustomStringConvertible {
    let description: String
}

/// An HTTP/1.1 connection: a streaming response (SSE), or whole ones one after another (history,
/// long-polls on a kept-alive connection, as a browser would).
final class HTTPStream: @unchecked Sendable {  // used by one task at a time
    private(set) var status = 0
    private let channel: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>
    private var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    private let endpoint: Endpoint
    private var keepAlive = false
    private var pending = ""

    static func connect(_ endpoint: Endpoint, group: any EventLoopGroup) async throws -> HTTPStream {
        let channel = try await ClientBootstrap(group: group)
            .connect(host: endpoint.host, port: endpoint.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                }
            }
        return HTTPStream(channel: channel, endpoint: endpoint)
    }

    /// One GET on a new connection, closed after its response.
    static func open(_ endpoint: Endpoint, _ uri: String, token: String, headers extra: [(String, String)] = [],
                     group: any EventLoopGroup) async throws -> HTTPStream {
        let stream = try await connect(endpoint, group: group)
        try await stream.get(uri, token: token, headers: extra, keepAlive: false)
        return stream
    }

    private init(channel: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>, endpoint: Endpoint) {
        self.channel = channel
        self.iterator = channel.inbound.makeAsyncIterator()
        self.endpoint = endpoint
    }

    /// Sends a GET and reads the response head (`status`); read the body with `body()` before the next one.
    func get(_ uri: String, token: String, headers extra: [(String, String)] = [], keepAlive: Bool) async throws {
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: uri)
        head.headers.add(name: "Host", value: endpoint.description)
        head.headers.add(name: "Authorization", value: "Bearer \(token)")
        if !keepAlive { head.headers.add(name: "Connection", value: "close") }
        for (name, value) in extra { head.headers.add(name: name, value: value) }
        self.keepAlive = keepAlive
        try await channel.outbound.write(.head(head))
        try await channel.outbound.write(.end(nil))
        guard case .head(let response)? = try await iterator.next() else { throw ClientError(description: "no response from \(endpoint)") }
        status = Int(response.status.code)
    }

    /// The rest of the body (the connection is closed afterwards unless the request kept it alive).
    func body() async throws -> String {
        var out = ByteBuffer()
        defer { if !keepAlive { channel.outbound.finish() } }
        while let part = try await iterator.next() {
            switch part {
            case .body(var chunk): out.writeBuffer(&chunk)
            case .end: return String(buffer: out)
            case .head: continue
            }
        }
        throw ClientError(description: "\(endpoint) closed the connection mid-response")
    }

    struct Event {
        var id: String?
        var event: String?
        var data: String?
    }

    /// The next SSE event with a field (comments skipped); nil when the stream ended.
    func nextEvent() async throws -> Event? {
        while true {
            if let range = pending.range(of: "\n\n") {
                let block = pending[..<range.lowerBound]
                pending.removeSubrange(..<range.upperBound)
                var event = Event()
                var hasField = false
                for line in block.split(separator: "\n") where !line.hasPrefix(":") {
                    let parts = line.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
                    var value = parts.count > 1 ? String(parts[1]) : ""
                    if value.hasPrefix(" ") { value.removeFirst() }
                    switch parts[0] {
                    case "id": event.id = value; hasField = true
                    case "event": event.event = value; hasField = true
                    case "data": event.data = value; hasField = true
                    default: break
                    }
                }
                if hasField { return event }
                continue
            }
            switch try await iterator.next() {
            case .body(let chunk)?: pending += String(buffer: chunk)
            case .end?, nil: return nil
            case .head?: continue
            }
        }
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
