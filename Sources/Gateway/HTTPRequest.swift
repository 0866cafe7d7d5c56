import ChatDomain
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// One HTTP request as the routes see it.
struct HTTPRequest: Sendable {
    let method: HTTPMethod
    let path: [String]
    let query: [String: String]
    let headers: HTTPHeaders
    let body: ByteBuffer
    let keepAlive: Bool
    /// HTTP/1.0 or 1.1: a 1.0 client reads no chunked body (RFC 9112 §6.1), so a stream to it ends with the connection.
    let version: HTTPVersion
    /// What its log lines need (a connection that outlives the request keeps this, not the request).
    let log: RequestLog
    /// `Access-Control-Allow-Origin` for the answer: the request's `Origin` when `GATEWAY_ALLOWED_ORIGINS` lists
    /// it, `*` when it is `*`, else nil (no CORS headers).
    let allowOrigin: String?
    var requestId: String { log.requestId }
    /// Every line logged for this request carries its id (`request-id` metadata).
    var logger: Logger { log.logger }

    /// `app`: the instance's logger, to which the request's id is added, and its allowed origins.
    init(head: HTTPRequestHead, body: ByteBuffer, app: GatewayApp) {
        let receivedAt = NIODeadline.now()
        self.method = head.method
        let uri = head.uri
        (self.path, self.query) = Self.target(uri)
        self.headers = head.headers
        self.body = body
        self.keepAlive = head.isKeepAlive
        self.version = head.version
        self.log = RequestLog(requestId: GatewayApp.requestId(from: head.headers.first(name: "x-request-id")), method: head.method,
                              target: RequestLog.masked(uri), receivedAt: receivedAt, base: app.logger,
                              traceparent: RequestLog.traceparent(head.headers.first(name: "traceparent")))
        self.allowOrigin = app.config.corsOrigin(for: head.headers.first(name: "origin"))
    }

    /// The request target's path segments and query parameters, percent-decoded (`+` is a space in the query;
    /// the first of a repeated name wins; text that does not decode to UTF-8 is kept as it came).
    static func target(_ uri: String) -> (path: [String], query: [String: String]) {
        // Split on bytes ('?', '/', '&', '=' are ASCII, so every cut is a character boundary): the request
        // target is read for every request, and `Character`-level searching and splitting cost more than the rest.
        let pathPart: Substring
        let queryPart: Substring?
        if let q = uri.utf8.firstIndex(of: UInt8(ascii: "?")) {
            pathPart = uri[..<q]
            queryPart = uri[uri.utf8.index(after: q)...]
        } else {
            pathPart = Substring(uri)
            queryPart = nil
        }
        let path = pathPart.utf8.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true).map {
            let segment = Substring($0)
            return PercentDecoding.decode(segment, plusAsSpace: false) ?? String(segment)
        }
        var query: [String: String] = [:]
        for pair in queryPart?.utf8.split(separator: UInt8(ascii: "&")) ?? [] {
            let equals = pair.firstIndex(of: UInt8(ascii: "="))
            let name = Substring(pair[..<(equals ?? pair.endIndex)])
            let key = PercentDecoding.decode(name, plusAsSpace: true) ?? String(name)
            var value = ""
            if let equals {
                let text = Substring(pair[pair.index(after: equals)...])
                value = PercentDecoding.decode(text, plusAsSpace: true) ?? String(text)
            }
            if query[key] == nil { query[key] = value }
        }
        return (path, query)
    }

    /// The CORS headers of an answer to this request (none unless its origin is allowed by name or by `*`).
    var corsHeaders: [(String, String)] { Self.corsHeaders(allowOrigin: allowOrigin) }

    /// The CORS headers for an answer to a page of `allowOrigin` (nil: none).
    static func corsHeaders(allowOrigin: String?) -> [(String, String)] {
        guard let allowOrigin else { return [] }
        var headers = [("Access-Control-Allow-Origin", allowOrigin),
                       ("Access-Control-Expose-Headers", "X-Request-Id, Idempotent-Replayed, Retry-After")]
        if allowOrigin != "*" { headers.append(("Vary", "Origin")) }
        return headers
    }

    func logAnswered(_ status: HTTPResponseStatus, route: String?) { log.answered(status, route: route) }

    /// `Authorization: Bearer …`, else `?access_token=`.
    var bearerToken: String? {
        if let auth = headers.first(name: "authorization") {
            let parts = auth.split(separator: " ", maxSplits: 1)
            if parts.count == 2, parts[0].lowercased() == "bearer" { return String(parts[1].trimmingSpaces) }
            return ""
        }
        return query["access_token"]
    }

    /// An integer query parameter within `range`, or `BAD_REQUEST`.
    func intParameter(_ name: String, default value: Int, range: ClosedRange<Int>) throws(ApiError) -> Int {
        guard let text = query[name] else { return value }
        guard let n = Int(text), range.contains(n) else {
            throw ApiError(.badRequest, "\(name) must be an integer in \(range.lowerBound)...\(range.upperBound)", details: ["parameter": name])
        }
        return n
    }
}

/// A request's identity for its log lines: small enough for a WebSocket or SSE stream to keep for its whole
/// life. The instance's logger is shared; the `request-id` metadata is added only when a line is logged.
struct RequestLog: Sendable {
    let requestId: String
    let method: HTTPMethod
    /// The request target with every `access_token` value masked, at most 256 bytes.
    let target: String
    let receivedAt: NIODeadline
    let base: Logger
    /// The W3C `traceparent` of the request, when it sent a well-formed one (logged with every line, with its
    /// trace id on its own for searching).
    var traceparent: String? = nil

    var logger: Logger {
        var logger = base
        logger[metadataKey: "request_id"] = "\(requestId)"
        if let traceparent {
            logger[metadataKey: "traceparent"] = "\(traceparent)"
            logger[metadataKey: "trace_id"] = "\(traceparent.split(separator: "-")[1])"
        }
        return logger
    }

    /// `header` if it is a W3C trace context `traceparent` (version 00–fe, a non-zero 32-hex trace id, a
    /// non-zero 16-hex parent id, 2-hex flags), else nil (ignored, as the recommendation asks).
    static func traceparent(_ header: String?) -> String? {
        guard let header else { return nil }
        let parts = Substring(header).trimmingSpaces.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[0] != "ff" || parts.count == 4 else { return nil }
        let hex = { (s: Substring, n: Int) in s.utf8.count == n && s.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) } }
        guard hex(parts[0], 2), parts[0] != "ff", hex(parts[1], 32), hex(parts[2], 16), hex(parts[3], 2),
              parts[1].contains(where: { $0 != "0" }), parts[2].contains(where: { $0 != "0" }),
              parts[0] != "00" || parts.count == 4 else { return nil }
        return parts[0...3].joined(separator: "-")
    }

    /// The access log line of a request answered with `status` (info): method, route template, the target
    /// with any token masked, status and duration.
    func answered(_ status: HTTPResponseStatus, route: String?) {
        // The access log is usually off (level warning and up): then no logger with the request's metadata is made.
        guard base.logLevel <= .info else { return }
        let micros = (NIODeadline.now() - receivedAt).nanoseconds / 1000
        logger.info("request", metadata: ["method": "\(method.rawValue)", "route": "\(route ?? "-")", "target": "\(target)",
                                          "status": "\(status.code)", "duration_ms": "\(Double(micros) / 1000)"])
    }

    /// `uri` with the value of every `access_token` query parameter replaced by `***` (any spelling of the name
    /// that decodes to it), cut to 256 bytes.
    static func masked(_ uri: String) -> String {
        var out = uri
        // Most targets name no token: nothing to look at unless the query has the name or an escape.
        if let q = uri.utf8.firstIndex(of: UInt8(ascii: "?")),
           uri.utf8[q...].contains(where: { $0 == UInt8(ascii: "%") || $0 == UInt8(ascii: "+") }) || uri.utf8[q...].containsBytes(of: "access_token") {
            let pairs = uri[uri.index(after: q)...].split(separator: "&", omittingEmptySubsequences: false).map { pair -> String in
                let name = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)[0]
                let decoded = PercentDecoding.decode(name, plusAsSpace: true) ?? String(name)
                return decoded == "access_token" ? "\(name)=***" : String(pair)
            }
            out = String(uri[..<q]) + "?" + pairs.joined(separator: "&")
        }
        return out.utf8.count <= 256 ? out : String(decoding: out.utf8.prefix(256), as: UTF8.self) + "…"
    }
}

/// A complete (non-streaming) answer.
struct HTTPResponse: Sendable {
    var status: HTTPResponseStatus
    var headers: [(String, String)] = []
    /// The body, as pieces written one after the other (one piece for most answers).
    var parts: [String]
    var contentType = "application/json"

    init(status: HTTPResponseStatus, headers: [(String, String)] = [], body: String) {
        self.init(status: status, headers: headers, parts: [body])
    }

    init(status: HTTPResponseStatus, headers: [(String, String)] = [], parts: [String]) {
        self.status = status
        self.headers = headers
        self.parts = parts
    }

    var bodyBytes: Int { parts.reduce(0) { $0 + $1.utf8.count } }

    static func json(_ status: HTTPResponseStatus, _ body: String, headers: [(String, String)] = []) -> HTTPResponse {
        HTTPResponse(status: status, headers: headers, body: body)
    }

    static func error(_ error: ApiError, requestId: String) -> HTTPResponse {
        var headers: [(String, String)] = []
        if let retry = error.retryAfter { headers.append(("Retry-After", String(retry))) }
        if error.code == .upgradeRequired { headers.append(("Sec-WebSocket-Version", "13")) }
        return HTTPResponse(status: HTTPResponseStatus(statusCode: error.status), headers: headers, body: error.envelopeJSON(requestId: requestId))
    }
}

extension Collection where Element == UInt8 {
    /// Whether the UTF-8 of `text` occurs in these bytes.
    func containsBytes(of text: StaticString) -> Bool {
        text.withUTF8Buffer { needle in
            guard let first = needle.first, count >= needle.count else { return needle.isEmpty }
            var start = startIndex
            while let found = self[start...].firstIndex(of: first) {
                if self[found...].starts(with: needle) { return true }
                start = index(after: found)
            }
            return false
        }
    }
}
