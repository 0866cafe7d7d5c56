import Auth
import ChatDomain
import NIOCore
import NIOHTTP1

/// The REST endpoints of the channel API (PROTOCOL.md §4).
enum Routes {
    static func publish(_ app: GatewayApp, _ request: HTTPRequest, channel: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let object = try JSONText.parseObject(request.body.readableBytesView)
        var requestId = request.headers.first(name: "idempotency-key")
        if requestId == nil, let fromBody = object["request_id"] {
            guard let text = fromBody as? String else { throw ApiError(.badRequest, "request_id must be a string") }
            requestId = text
        }
        let outcome: Result<AppendResult, ApiError>
        do throws(ApiError) { outcome = .success(try await app.channels.publish(actor, to: channel, body: object["body"], requestId: requestId)) } catch { outcome = .failure(error) }
        app.record(outcome)
        let result = try outcome.get()
        let body = "{\"message\":" + result.message.json + "}"
        if result.replayed { return .json(.ok, body, headers: [("Idempotent-Replayed", "true")]) }
        return .json(.created, body)
    }

    static func history(_ app: GatewayApp, _ request: HTTPRequest, channel name: String) async throws(ApiError) -> HTTPResponse {
        let actor = try await app.authenticate(request.bearerToken)
        let channel = try app.channels.authorize(actor, .read, name)
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
        return .json(.ok, pageJSON(history.messages, cursor: history.cursor, hasMore: history.hasMore))
    }

    static func pageJSON(_ messages: [Message], cursor: String, hasMore: Bool) -> String {
        var out = "{\"messages\":["
        for (i, message) in messages.enumerated() {
            if i > 0 { out += "," }
            out += message.json
        }
        out += "],\"cursor\":\"" + cursor + "\",\"has_more\":" + (hasMore ? "true" : "false") + "}"
        return out
    }
}
