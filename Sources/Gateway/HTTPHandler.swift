import Auth
import ChatDomain
import Fanout
import Foundation
import NIOCore
import NIOHTTP1

/// The last of the HTTP handlers (`RequestReader` → `RequestGate` → this): routes a complete, admitted request
/// through the route table to its REST answer, long-poll or SSE stream. One request at a time (NIO's
/// pipelining handler queues the next); a WebSocket upgrade never reaches it unless it was refused.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequest
    typealias OutboundOut = HTTPServerResponsePart

    private let app: GatewayApp
    /// A request is being answered (the work, or the stream, is in progress).
    private var responding = false
    /// The SSE stream or long-poll wait in progress, ended when the connection goes.
    private var live: (any ConnectionBoundStream)?
    /// The template of the route being answered (for the access log line).
    private var routeTemplate: String?

    init(app: GatewayApp) {
        self.app = app
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        responding = true
        routeTemplate = nil
        route(context: context, request: unwrapInboundIn(data))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, live == nil, !responding {
            // Nothing pending for the client: a stalled request, a slow handshake, or an idle keep-alive.
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        live?.writabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        live?.connectionClosed()
        live = nil
        context.fireChannelInactive()
    }

    // MARK: routing

    private func route(context: ChannelHandlerContext, request: HTTPRequest) {
        if request.method == .OPTIONS { return answerOptions(context: context, request: request) }
        switch RouteTable.gateway.match(request.method, request.path) {
        case .notFound:
            write(context: context, response: .error(ApiError(.notFound, "no such route"), requestId: request.requestId), request: request)
        case .methodNotAllowed:
            // RFC 9110 §15.5.6: a 405 names the methods the path answers.
            var response = HTTPResponse.error(ApiError(.methodNotAllowed, "method not allowed"), requestId: request.requestId)
            if let allow = RouteTable.gateway.allow(for: request.path) { response.headers.append(("Allow", allow)) }
            write(context: context, response: response, request: request)
        case .route(let route, let parameters):
            routeTemplate = route.template
            let request = RequestContext(request: request, parameters: parameters, route: route.template)
            let app = self.app
            switch route.action {
            case .immediate(let answer):
                write(context: context, response: answer(app, request), request: request.request)
            case .work(let work):
                respond(context: context, request: request.request) { () async throws(ApiError) -> HTTPResponse in try await work(app, request) }
            case .longPoll:
                startLongPoll(context: context, request: request.request, channel: request["channel"])
            case .eventStream:
                startEventStream(context: context, request: request.request, channel: request["channel"])
            case .refusedUpgrade(let echo):
                refusedUpgrade(context: context, request: request.request, echo: echo)
            }
        }
    }

    /// `OPTIONS`: the methods of the path (`Allow`), and for a CORS preflight from an allowed origin (`RequestGate`
    /// already refused any other with 403) what a page may send. No token needed: browsers never send one here.
    private func answerOptions(context: ChannelHandlerContext, request: HTTPRequest) {
        guard let allow = RouteTable.gateway.allow(for: request.path) else {
            return write(context: context, response: .error(ApiError(.notFound, "no such route"), requestId: request.requestId), request: request)
        }
        var headers = [("Allow", allow)]
        if request.allowOrigin != nil {
            headers += [("Access-Control-Allow-Methods", allow),
                        ("Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key, X-Request-Id, Last-Event-ID"),
                        ("Access-Control-Max-Age", "600")]
        }
        var response = HTTPResponse(status: .noContent, headers: headers, body: "")
        response.contentType = "text/plain"
        write(context: context, response: response, request: request)
    }

    /// `/v1/ws` or `/v1/echo` reached as plain HTTP: the upgrade was refused. Say why.
    private func refusedUpgrade(context: ChannelHandlerContext, request: HTTPRequest, echo: Bool) {
        let app = self.app
        respond(context: context, request: request) { () async throws(ApiError) -> HTTPResponse in
            if echo && !app.config.echo { throw ApiError(.notFound, "echo is not enabled") }
            if !echo { _ = try await app.authenticate(request.bearerToken) }
            throw Self.upgradeProblem(request.headers)
        }
    }

    /// Why a WebSocket handshake was not accepted (RFC 6455 §4.2.1–4.2.2): a version other than 13 is 426 with
    /// `Sec-WebSocket-Version: 13`; a WebSocket request with a missing or malformed key, or without
    /// `Connection: Upgrade`, is 400; anything else (no upgrade asked for) is 426.
    static func upgradeProblem(_ headers: HTTPHeaders) -> ApiError {
        handshakeError(headers) ?? ApiError(.upgradeRequired, "a WebSocket upgrade (version 13) is required here")
    }

    /// What is wrong with a WebSocket handshake's headers, if anything (nil: a valid one).
    static func handshakeError(_ headers: HTTPHeaders) -> ApiError? {
        if let version = headers.first(name: "sec-websocket-version"), version != "13" {
            return ApiError(.upgradeRequired, "WebSocket version 13 is required", details: ["version": String(version.prefix(20))])
        }
        guard headers[canonicalForm: "upgrade"].contains(where: { $0.lowercased() == "websocket" }) else {
            return ApiError(.upgradeRequired, "a WebSocket upgrade (version 13) is required here")
        }
        guard let decoded = Data(base64Encoded: headers.first(name: "sec-websocket-key") ?? ""), decoded.count == 16 else {
            return ApiError(.badRequest, "Sec-WebSocket-Key must be 16 bytes in base64")
        }
        guard headers[canonicalForm: "connection"].contains(where: { $0.lowercased() == "upgrade" }) else {
            return ApiError(.badRequest, "a WebSocket handshake needs Connection: Upgrade")
        }
        guard headers.first(name: "sec-websocket-version") != nil else {
            return ApiError(.upgradeRequired, "WebSocket version 13 is required")
        }
        return nil
    }

    // MARK: writing

    /// Runs `work` off the event loop and writes its answer (or its error envelope) back on it.
    func respond(context: ChannelHandlerContext, request: HTTPRequest, _ work: @escaping @Sendable () async throws(ApiError) -> HTTPResponse) {
        let promise = context.eventLoop.makePromise(of: HTTPResponse.self)
        promise.completeWithTask {
            do throws(ApiError) { return try await work() } catch {
                if error.status >= 500 { request.logger.warning("request failed", metadata: ["code": "\(error.code.rawValue)", "error": "\(error.message)"]) }
                return .error(error, requestId: request.requestId)
            }
        }
        promise.futureResult.assumeIsolated().whenSuccess { response in
            self.write(context: context, response: response, request: request)
        }
    }

    func write(context: ChannelHandlerContext, response: HTTPResponse, request: HTTPRequest) {
        responding = false
        context.writeResponse(response, to: request, route: routeTemplate)
    }

    // MARK: long-poll and Server-Sent Events

    /// Authenticates, then hands the request to a session transport (`start`), which answers it, now or later.
    private func startStream(context: ChannelHandlerContext, request: HTTPRequest,
                             _ start: @escaping (Actor, _ finish: @escaping (HTTPResponse) -> Void) throws(ApiError) -> any ConnectionBoundStream) {
        let app = self.app
        let begin = { (result: Result<Actor, any Error>) in
            let finish: (HTTPResponse) -> Void = { [weak self] response in
                self?.live = nil
                self?.write(context: context, response: response, request: request)
            }
            do {
                self.live = try start(try result.get(), finish)
            } catch {
                finish(.error(error as? ApiError ?? ApiError(.internalError, "internal error"), requestId: request.requestId))
            }
        }
        // A token seen before (every long-poll and reconnect brings the same one) is checked without leaving the loop.
        do {
            if let actor = try app.authenticateKnown(request.bearerToken) { return begin(.success(actor)) }
        } catch {
            return begin(.failure(error))
        }
        let setup = context.eventLoop.makePromise(of: Actor.self)
        setup.completeWithTask { () async throws -> Actor in try await app.authenticate(request.bearerToken) }
        setup.futureResult.assumeIsolated().whenComplete(begin)
    }

    private func startLongPoll(context: ChannelHandlerContext, request: HTTPRequest, channel name: String) {
        let app = self.app
        startStream(context: context, request: request) { (actor, finish) throws(ApiError) in
            let poll = LongPoll(app: app, actor: actor, parameters: try LongPoll.Parameters(request), request: request,
                                eventLoop: context.eventLoop, complete: finish)
            poll.run(channel: name)
            return poll
        }
    }

    private func startEventStream(context: ChannelHandlerContext, request: HTTPRequest, channel name: String) {
        let app = self.app
        if app.config.testRefuse.contains("sse") {
            return write(context: context, response: .error(ApiError(.storeUnavailable, "event streams are refused (GATEWAY_TEST_REFUSE)"),
                                                            requestId: request.requestId), request: request)
        }
        startStream(context: context, request: request) { (actor, finish) throws(ApiError) in
            let start = try EventStream.start(request)
            let stream = EventStream(app: app, actor: actor, context: context, request: request) {
                finish(.error($0, requestId: request.requestId))
            }
            stream.run(channel: name, from: start)
            return stream
        }
    }
}

/// A response that outlives the request handling and must stop when the client goes.
protocol ConnectionBoundStream: AnyObject {
    func connectionClosed()
    /// NIO reported a change of the connection's writability.
    func writabilityChanged(_ writable: Bool)
}

extension ConnectionBoundStream {
    func writabilityChanged(_ writable: Bool) {}
}

extension ChannelHandlerContext {
    func writeAndFlushWithFuture(_ data: NIOAny) -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        writeAndFlush(data, promise: promise)
        return promise.futureResult
    }
}
