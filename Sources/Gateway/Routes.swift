import Auth
import ChatDomain
import Foundation
import NIOCore
import NIOHTTP1
import Wire

/// The REST endpoints of the channel API (PROTOCOL.md §4).
enum Routes {
    /// `/readyz`: 200 when the store (and Redis, if configured) answer; else 503 naming what failed.
    static func readiness(_ app: GatewayApp) async throws(ApiError) -> HTTPResponse {
        guard !app.isDraining else { throw ApiError(.shuttingDown, "the instance is draining") }
        let store = await app.store.ping()
        // The bus counts as working when its subscriber connection is up and the newest canary came back in time.
        let canary = app.redis?.canaryState
        let redis = app.redis.map { $0.isAvailable && canary?.healthy == true }
        var body = "{\"status\":\"\(store && redis != false ? "ok" : "unavailable")\",\"store\":\"\(store ? "ok" : "failed")\""
        if let redis { body += ",\"redis\":\"\(redis ? "ok" : "failed")\"" }
        if let canary { body += ",\"canary_age_ms\":" + (canary.age.map { String($0.milliseconds) } ?? "null") }
        body += "}"
        return .json(store && redis != false ? .ok : .serviceUnavailable, body)
    }

    static func publish(_ app: GatewayApp, _ request: HTTPRequest, channel: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseValue(request.body.readableBytesView)
        var requestId = request.headers.first(name: "idempotency-key")
        if requestId == nil, let fromBody = object["request_id"], fromBody != .null {
            guard let text = fromBody.stringValue else { throw ApiError(.badRequest, "request_id must be a string") }
            requestId = text
        }
        let result = try await app.publish(actor, to: channel, body: object["body"], requestId: requestId).get()
        let body = "{\"message\":" + result.message.json + "}"
        if result.replayed { return .json(.ok, body, headers: [("Idempotent-Replayed", "true")]) }
        return .json(.created, body)
    }

    static func history(_ app: GatewayApp, _ request: HTTPRequest, channel name: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let channel = try await app.channels.authorize(actor, .read, name)
        let limit = try request.intParameter("limit", default: 100, range: 1...ChannelService.maxPageSize)
        let query: ChannelService.HistoryQuery
        switch (request.query["since"], request.query["before"]) {
        case (.some, .some):
            throw ApiError(.badRequest, "give since or before, not both")
        case (.some(let since), nil):
            query = .since(try Cursor(parsing: since, for: channel))
        case (nil, .some(let before)):
            query = .before(try Cursor(parsing: before, for: channel))
        case (nil, nil):
            query = .latest
        }
        let history = try await app.channels.history(channel, query, limit: limit)
        return page(history.messages, cursor: history.cursor, hasMore: history.hasMore)
    }

    // MARK: threads

    static func createThread(_ app: GatewayApp, _ request: HTTPRequest) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseObject(request.body.readableBytesView)
        let thread = try await app.threads.create(actor, title: object["title"], members: object["members"])
        return .json(.created, "{\"thread\":\(thread.json)}")
    }

    static func listThreads(_ app: GatewayApp, _ request: HTTPRequest) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let summaries = try await app.threads.list(actor)
        return .json(.ok, "{\"threads\":[" + summaries.map(ThreadService.summaryJSON).joined(separator: ",") + "]}")
    }

    static func getThread(_ app: GatewayApp, _ request: HTTPRequest, id: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let thread = try await app.threads.authorized(actor, .view, id)
        return .json(.ok, "{\"thread\":\(thread.json)}")
    }

    static func addMember(_ app: GatewayApp, _ request: HTTPRequest, thread id: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseObject(request.body.readableBytesView)
        let thread = try await app.threads.addMember(actor, thread: id, user: object["user"])
        return .json(.ok, "{\"thread\":\(thread.json)}")
    }

    static func removeMember(_ app: GatewayApp, _ request: HTTPRequest, thread id: String, user: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        try await app.removeMember(actor, thread: id, user: user)
        return .json(.ok, "{\"removed\":\(JSONText.quoted(user))}")
    }

    static func markRead(_ app: GatewayApp, _ request: HTTPRequest, thread id: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseObject(request.body.readableBytesView)
        let (cursor, unread) = try await app.threads.markRead(actor, thread: id, cursor: object["cursor"])
        return .json(.ok, "{\"cursor\":\"\(cursor)\",\"unread\":\(unread)}")
    }

    /// `POST /demo/token` `{"sub", "roles", "ttl"}` → `{"token"}`: the demo page's way to act as any user.
    /// Only with `GATEWAY_DEMO=1` (`make run`): whoever reaches it gets any token but `admin`.
    static func demoToken(_ app: GatewayApp, _ request: HTTPRequest) async throws(ApiError) -> HTTPResponse {
        guard app.config.demo else { throw ApiError(.notFound, "the demo is off (GATEWAY_DEMO=1)") }
        let object = try JSONText.parseObject(request.body.readableBytesView)
        guard let sub = object["sub"] as? String, (1...64).contains(sub.utf8.count),
              sub.unicodeScalars.allSatisfy({ CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0) })
        else { throw ApiError(.badRequest, "sub must be 1…64 letters, digits, '.', '_' or '-'") }
        let roles = (object["roles"] as? [Any] ?? []).compactMap { $0 as? String }.filter { $0 != "admin" }
        let ttl = (object["ttl"] as? NSNumber)?.doubleValue ?? 3600
        guard (1...86400).contains(ttl) else { throw ApiError(.badRequest, "ttl must be 1…86400 seconds") }
        do {
            let token = try await app.verifier.mint(sub: sub, roles: roles, ttl: ttl)
            return .json(.ok, "{\"token\":\(JSONText.quoted(token))}")
        } catch {
            throw ApiError(.notFound, "the demo needs GATEWAY_JWT_SECRET")
        }
    }

    static func revoke(_ app: GatewayApp, _ request: HTTPRequest) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseObject(request.body.readableBytesView)
        let revocation = try await app.revoke(actor, object)
        return .json(.ok, "{\"revoked\":{\"\(revocation.kind.rawValue)\":\(JSONText.quoted(revocation.value))}}")
    }

    /// A history or long-poll answer, in pieces: the messages' own pre-encoded texts are written one by one,
    /// never joined into one string (a page is capped in bytes, `GATEWAY_PAGE_BYTES`, and not copied again).
    static func page(_ messages: [Message], cursor: String, hasMore: Bool) -> HTTPResponse {
        var parts: [String] = []
        parts.reserveCapacity(messages.count + 2)
        parts.append("{\"messages\":[")
        for (i, message) in messages.enumerated() { parts.append(i == 0 ? message.json : "," + message.json) }
        parts.append("],\"cursor\":\"" + cursor + "\",\"has_more\":" + (hasMore ? "true" : "false") + "}")
        return HTTPResponse(status: .ok, parts: parts)
    }
}
