import ChatDomain
import Logging
import NIOHTTP1

/// One request as a route handler sees it: the request, the path parameters its route template named, and
/// a logger that carries the request id.
struct RequestContext: Sendable {
    let request: HTTPRequest
    let parameters: [String: String]
    /// The route template that matched (for logs and metrics), e.g. `/v1/channels/{channel}/messages`.
    let route: String

    var requestId: String { request.requestId }
    /// Carries the request id: every line logged for the request goes through it.
    var logger: Logger { request.logger }
    subscript(_ name: String) -> String { parameters[name] ?? "" }
}

/// What a route does.
enum RouteAction: Sendable {
    /// Answers at once, on the event loop (nothing to wait for).
    case immediate(@Sendable (GatewayApp, RequestContext) -> HTTPResponse)
    /// Answers after work off the event loop (store, token checks).
    case work(@Sendable (GatewayApp, RequestContext) async throws(ApiError) -> HTTPResponse)
    case longPoll
    case eventStream
    /// `/v1/ws` or `/v1/echo` reached as plain HTTP: the upgrade was refused, say why.
    case refusedUpgrade(echo: Bool)

    /// A whole answer (not a stream): `HEAD` gets it too, without the body (RFC 9110 §9.3.2).
    var answersHead: Bool {
        switch self {
        case .immediate, .work: true
        case .longPoll, .eventStream, .refusedUpgrade: false
        }
    }
}

/// The routes of PROTOCOL.md §4 as templates (`{name}` matches one path segment), matched in order.
struct RouteTable: Sendable {
    struct Route: Sendable {
        let method: HTTPMethod?
        let template: String
        let segments: [String]
        let action: RouteAction
        /// A `GET` route with a whole answer.
        var answersHead: Bool { method == .GET && action.answersHead }

        /// `method` nil: any method (the action tells).
        init(_ method: HTTPMethod?, _ template: String, _ action: RouteAction) {
            self.method = method
            self.template = template
            self.segments = template.split(separator: "/").map(String.init)
            self.action = action
        }

        func parameters(of path: [String]) -> [String: String]? {
            guard path.count == segments.count else { return nil }
            var parameters: [String: String] = [:]
            for (segment, part) in zip(segments, path) {
                if segment.hasPrefix("{") && segment.hasSuffix("}") {
                    parameters[String(segment.dropFirst().dropLast())] = part
                } else if segment != part {
                    return nil
                }
            }
            return parameters
        }
    }

    enum Match {
        case route(Route, [String: String])
        /// The path names a route, not with this method.
        case methodNotAllowed
        case notFound
    }

    let routes: [Route]

    func match(_ method: HTTPMethod, _ path: [String]) -> Match {
        var pathMatched = false
        for route in routes {
            guard let parameters = route.parameters(of: path) else { continue }
            pathMatched = true
            if route.method == nil || route.method == method || (method == .HEAD && route.answersHead) { return .route(route, parameters) }
        }
        return pathMatched ? .methodNotAllowed : .notFound
    }

    /// The methods `path` answers (empty: no such path), for `Allow` and CORS preflights.
    func methods(for path: [String]) -> [HTTPMethod] {
        routes.filter { $0.parameters(of: path) != nil }.flatMap { route -> [HTTPMethod] in
            guard let method = route.method else { return [] }
            return route.answersHead ? [method, .HEAD] : [method]
        }
    }

    /// The `Allow` value of `path` (its methods and `OPTIONS`); nil when no route has that path.
    func allow(for path: [String]) -> String? {
        let methods = methods(for: path)
        return methods.isEmpty ? nil : (methods.map(\.rawValue) + ["OPTIONS"]).joined(separator: ", ")
    }

    /// The gateway's routes.
    static let gateway = RouteTable(routes: [
        Route(.GET, "/healthz", .immediate { _, _ in .json(.ok, "{\"status\":\"ok\"}") }),
        Route(.GET, "/readyz", .work { app, _ throws(ApiError) in try await Routes.readiness(app) }),
        Route(.GET, "/metrics", .immediate { app, _ in
            var response = HTTPResponse.json(.ok, app.metrics.text())
            response.contentType = "text/plain; version=0.0.4"
            return response
        }),
        Route(.POST, "/v1/channels/{channel}/messages", .work { app, c throws(ApiError) in try await Routes.publish(app, c.request, channel: c["channel"]) }),
        Route(.GET, "/v1/channels/{channel}/messages", .work { app, c throws(ApiError) in try await Routes.history(app, c.request, channel: c["channel"]) }),
        Route(.GET, "/v1/channels/{channel}/poll", .longPoll),
        Route(.GET, "/v1/channels/{channel}/presence", .work { app, c throws(ApiError) in
            let actor = try await app.authenticate(c.request.bearerToken)
            let channel = try await app.channels.authorize(actor, .subscribe, c["channel"])
            return .json(.ok, try await app.presence.json(of: channel))
        }),
        Route(.GET, "/v1/channels/{channel}/events", .eventStream),
        Route(.POST, "/v1/threads", .work { app, c throws(ApiError) in try await Routes.createThread(app, c.request) }),
        Route(.GET, "/v1/threads", .work { app, c throws(ApiError) in try await Routes.listThreads(app, c.request) }),
        Route(.GET, "/v1/threads/{thread}", .work { app, c throws(ApiError) in try await Routes.getThread(app, c.request, id: c["thread"]) }),
        Route(.POST, "/v1/threads/{thread}/members", .work { app, c throws(ApiError) in try await Routes.addMember(app, c.request, thread: c["thread"]) }),
        Route(.DELETE, "/v1/threads/{thread}/members/{user}", .work { app, c throws(ApiError) in
            try await Routes.removeMember(app, c.request, thread: c["thread"], user: c["user"])
        }),
        Route(.PUT, "/v1/threads/{thread}/read", .work { app, c throws(ApiError) in try await Routes.markRead(app, c.request, thread: c["thread"]) }),
        Route(.POST, "/v1/sessions/revoke", .work { app, c throws(ApiError) in try await Routes.revoke(app, c.request) }),
        Route(.GET, "/client.js", .immediate { app, c in
            BrowserAssets.response(app.assets.clientJS, contentType: "text/javascript; charset=utf-8", requestId: c.request.requestId)
        }),
        Route(.GET, "/client.d.ts", .immediate { app, c in
            BrowserAssets.response(app.assets.clientTypes, contentType: "application/typescript; charset=utf-8", requestId: c.request.requestId)
        }),
        Route(.GET, "/", .immediate { app, c in
            app.config.demo
                ? BrowserAssets.response(app.assets.demoPage, contentType: "text/html; charset=utf-8", requestId: c.request.requestId)
                : .error(ApiError(.notFound, "the demo page is off (GATEWAY_DEMO=1)"), requestId: c.request.requestId)
        }),
        Route(.POST, "/demo/token", .work { app, c throws(ApiError) in try await Routes.demoToken(app, c.request) }),
        Route(.GET, "/v1/ws", .refusedUpgrade(echo: false)),
        Route(.GET, "/v1/echo", .refusedUpgrade(echo: true)),
    ])
}
