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
    /// What its log lines need (a connection that outlives the request keeps this, not the request).
    let log: RequestLog
    var requestId: String { log.requestId }
    /// Every line logged for this request carries its id (`request-id` metadata).
    var logger: Logger { log.logger }

    /// `logger`: the instance's logger, to which the request's id is added.
    init(head: HTTPRequestHead, body: ByteBuffer, logger: Logger) {
        let receivedAt = NIODeadline.now()
        self.method = head.method
        let uri = head.uri
        let pathPart: Substring
        let queryPart: Substring?
        if let q = uri.firstIndex(of: "?") {
            pathPart = uri[..<q]
            queryPart = uri[uri.index(after: q)...]
        } else {
            pathPart = Substring(uri)
            queryPart = nil
        }
        self.path = pathPart.split(separator: "/", omittingEmptySubsequences: true).map {
            String($0).removingPercentEncoding ?? String($0)
        }
        var query: [String: String] = [:]
        for pair in queryPart?.split(separator: "&") ?? [] {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(kv[0]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(kv[0])
            let value = kv.count > 1 ? (String(kv[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(kv[1])) : ""
            if query[key] == nil { query[key] = value }
        }
        self.query = query
        self.headers = head.headers
        self.body = body
        self.keepAlive = head.isKeepAlive
        self.log = RequestLog(requestId: GatewayApp.requestId(from: head.headers.first(name: "x-request-id")), method: head.method,
                              receivedAt: receivedAt, base: logger)
    }

    func logAnswered(_ status: HTTPResponseStatus, route: String?) { log.answered(status, route: route) }

    /// `Authorization: Bearer …`, else `?access_token=`.
    var bearerToken: String? {
        if let auth = headers.first(name: "authorization") {
            let parts = auth.split(separator: " ", maxSplits: 1)
            if parts.count == 2, parts[0].lowercased() == "bearer" { return String(parts[1]).trimmingCharacters(in: .whitespaces) }
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
    let receivedAt: NIODeadline
    let base: Logger

    var logger: Logger {
        var logger = base
        logger[metadataKey: "request-id"] = "\(requestId)"
        return logger
    }

    /// The access log line of a request answered with `status` (info): method, route template (never the
    /// target, whose query may hold a token), status and duration.
    func answered(_ status: HTTPResponseStatus, route: String?) {
        let micros = (NIODeadline.now() - receivedAt).nanoseconds / 1000
        logger.info("request", metadata: ["method": "\(method.rawValue)", "route": "\(route ?? "-")", "status": "\(status.code)",
                                          "duration_ms": "\(Double(micros) / 1000)"])
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
