import Auth
import ChatDomain
import Fanout
import Foundation
import NIOCore
import NIOHTTP1

/// Serves the HTTP side of a connection: REST, long-poll and SSE. One request at a time (NIO's pipelining
/// handler queues the next); a WebSocket upgrade never reaches it unless it was refused.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let app: GatewayApp
    private enum State {
        case idle
        case receiving(HTTPRequestHead, ByteBuffer)
        /// A body over the limit was answered 413 at once; the rest of it is read and dropped (up to a bound) so
        /// that the client gets the answer rather than a reset, then the connection closes.
        case draining(Int)
        /// The head broke a limit: answered with this error once the request ends, then closed.
        case rejected(HTTPRequestHead, ApiError)
        case responding
    }
    private var state = State.idle
    /// Requests this connection may still make (`connectionRequestRate` per second).
    private var requests: TokenBucket
    /// The SSE stream or long-poll wait in progress, ended when the connection goes.
    private var live: (any ConnectionBoundStream)?

    /// The absolute deadlines of the request being read.
    private let deadline: RequestDeadline
    /// Set when every request of this connection is refused (a client address past its connection cap).
    private let refusal: ApiError?

    init(app: GatewayApp, deadline: RequestDeadline, refusal: ApiError? = nil) {
        self.app = app
        self.deadline = deadline
        self.refusal = refusal
        self.requests = TokenBucket(rate: app.config.connectionRequestRate, burst: app.config.connectionRequestBurst)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            deadline.headReceived()
            if let refusal {
                state = .rejected(head, refusal)
            } else if !requests.take() {
                state = .rejected(head, ApiError(.rateLimited, "too many requests on this connection", retryAfter: 1))
            } else if let error = limitError(head) {
                state = .rejected(head, error)
            } else if let length = head.headers.first(name: "content-length").flatMap(Int.init), length > app.config.maxMessageBytes {
                refuseTooLarge(context: context, head: head)
            } else {
                state = .receiving(head, context.channel.allocator.buffer(capacity: 0))
            }
        case .body(var chunk):
            if case .draining(let dropped) = state {
                state = .draining(dropped + chunk.readableBytes)
                if dropped + chunk.readableBytes > app.config.maxMessageBytes { context.close(promise: nil) }
            }
            if case .receiving(let head, var body) = state {
                if body.readableBytes + chunk.readableBytes > app.config.maxMessageBytes {
                    refuseTooLarge(context: context, head: head)
                } else {
                    state = .idle
                    body.writeBuffer(&chunk)
                    state = .receiving(head, body)
                }
            }
        case .end:
            deadline.requestReceived()
            switch state {
            case .receiving(let head, let body):
                state = .responding
                route(context: context, request: HTTPRequest(head: head, body: body))
            case .rejected(let head, let error):
                state = .responding
                let request = HTTPRequest(head: head, body: ByteBuffer())
                write(context: context, response: .error(error, requestId: request.requestId), request: request, forceClose: true)
            case .draining:
                context.close(promise: nil)
            case .idle, .responding:
                break
            }
        }
    }

    /// `413` as soon as the body is known to be too large (from `Content-Length`, or once the bytes read pass
    /// the limit), without reading the rest first; the connection closes after the rest is dropped.
    private func refuseTooLarge(context: ChannelHandlerContext, head: HTTPRequestHead) {
        let request = HTTPRequest(head: head, body: ByteBuffer())
        let error = ApiError(.payloadTooLarge, "request body is larger than \(app.config.maxMessageBytes) bytes")
        write(context: context, response: .error(error, requestId: request.requestId), request: request, forceClose: true, closeAfter: false)
        state = .draining(0)
    }

    /// URI length, header count and size limits (HTTP hardening); nil when the head is within them.
    private func limitError(_ head: HTTPRequestHead) -> ApiError? {
        let config = app.config
        if head.uri.utf8.count > config.maxURILength {
            return ApiError(.uriTooLong, "the request target is longer than \(config.maxURILength) bytes")
        }
        if head.headers.count > config.maxHeaderCount {
            return ApiError(.headersTooLarge, "more than \(config.maxHeaderCount) header fields")
        }
        var bytes = 0
        for (name, value) in head.headers { bytes += name.utf8.count + value.utf8.count + 4 }
        if bytes > config.maxHeaderBytes {
            return ApiError(.headersTooLarge, "the header fields are larger than \(config.maxHeaderBytes) bytes")
        }
        return nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? RequestDeadline.Passed == .body {
            // The body did not arrive in time, however the bytes trickled: 408, then closed.
            let error = ApiError(.requestTimeout, "the request body did not arrive in time")
            switch state {
            case .idle, .receiving, .rejected:
                state = .responding
                let request = HTTPRequest(head: HTTPRequestHead(version: .http1_1, method: .GET, uri: "/"), body: ByteBuffer())
                write(context: context, response: .error(error, requestId: request.requestId), request: request, forceClose: true)
            case .draining, .responding:
                context.close(promise: nil)
            }
            return
        }
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, live == nil {
            switch state {
            case .idle, .receiving, .draining, .rejected:
                // Nothing pending for the client: a stalled request, a slow handshake, or an idle keep-alive.
                context.close(promise: nil)
                return
            case .responding:
                break
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        live?.connectionClosed()
        live = nil
        context.fireChannelInactive()
    }

    // MARK: routing

    private func route(context: ChannelHandlerContext, request: HTTPRequest) {
        if !app.config.allows(origin: request.headers.first(name: "origin")) {
            let error = ApiError(.forbidden, "this origin is not allowed", details: ["origin": String((request.headers.first(name: "origin") ?? "").prefix(100))])
            return write(context: context, response: .error(error, requestId: request.requestId), request: request)
        }
        // A body is JSON: no Content-Type is taken as JSON, any other type is refused.
        if request.body.readableBytes > 0, let type = request.headers.first(name: "content-type"),
           type.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased() != "application/json" {
            let error = ApiError(.unsupportedMediaType, "request bodies are application/json", details: ["content_type": String(type.prefix(100))])
            return write(context: context, response: .error(error, requestId: request.requestId), request: request)
        }
        switch RouteTable.gateway.match(request.method, request.path) {
        case .notFound:
            write(context: context, response: .error(ApiError(.notFound, "no such route"), requestId: request.requestId), request: request)
        case .methodNotAllowed:
            write(context: context, response: .error(ApiError(.methodNotAllowed, "method not allowed"), requestId: request.requestId), request: request)
        case .route(let route, let parameters):
            var logger = app.logger
            logger[metadataKey: "request-id"] = "\(request.requestId)"
            let request = RequestContext(request: request, parameters: parameters, logger: logger, route: route.template)
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
            do throws(ApiError) { return try await work() } catch { return .error(error, requestId: request.requestId) }
        }
        promise.futureResult.assumeIsolated().whenSuccess { response in
            self.write(context: context, response: response, request: request)
        }
    }

    func write(context: ChannelHandlerContext, response: HTTPResponse, request: HTTPRequest, forceClose: Bool = false, closeAfter: Bool = true) {
        guard context.channel.isActive else { return }
        let close = forceClose || !request.keepAlive
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: String(response.bodyBytes))
        headers.add(name: "X-Request-Id", value: request.requestId)
        for (name, value) in response.headers { headers.add(name: name, value: value) }
        if close { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: response.status, headers: headers))), promise: nil)
        // In pieces of about 64 KiB: small parts are gathered, a large one goes as it is.
        var piece = context.channel.allocator.buffer(capacity: min(response.bodyBytes, 64 * 1024))
        for part in response.parts {
            piece.writeString(part)
            if piece.readableBytes >= 64 * 1024 {
                context.write(wrapOutboundOut(.body(.byteBuffer(piece))), promise: nil)
                piece = context.channel.allocator.buffer(capacity: 64 * 1024)
            }
        }
        if piece.readableBytes > 0 { context.write(wrapOutboundOut(.body(.byteBuffer(piece))), promise: nil) }
        let done = context.writeAndFlushWithFuture(wrapOutboundOut(.end(nil)))
        state = .idle
        if close && closeAfter {
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }

    // MARK: long-poll and Server-Sent Events

    /// Authenticates, then hands the request to a session transport (`start`), which answers it, now or later.
    private func startStream(context: ChannelHandlerContext, request: HTTPRequest,
                             _ start: @escaping (Actor, _ finish: @escaping (HTTPResponse) -> Void) throws(ApiError) -> any ConnectionBoundStream) {
        let app = self.app
        let setup = context.eventLoop.makePromise(of: Actor.self)
        setup.completeWithTask { () async throws -> Actor in try await app.authenticate(request.bearerToken) }
        setup.futureResult.assumeIsolated().whenComplete { result in
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
    }

    private func startLongPoll(context: ChannelHandlerContext, request: HTTPRequest, channel name: String) {
        let app = self.app
        startStream(context: context, request: request) { (actor, finish) throws(ApiError) in
            let poll = LongPoll(app: app, actor: actor, parameters: try LongPoll.Parameters(request), requestId: request.requestId,
                                eventLoop: context.eventLoop, complete: finish)
            poll.run(channel: name)
            return poll
        }
    }

    private func startEventStream(context: ChannelHandlerContext, request: HTTPRequest, channel name: String) {
        let app = self.app
        startStream(context: context, request: request) { (actor, finish) throws(ApiError) in
            let start = try EventStream.start(request)
            let stream = EventStream(app: app, actor: actor, context: context, requestId: request.requestId) {
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
}

extension ChannelHandlerContext {
    func writeAndFlushWithFuture(_ data: NIOAny) -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        writeAndFlush(data, promise: promise)
        return promise.futureResult
    }
}

/// Absolute deadlines for one request at a time, whatever the idle timer sees (it resets on every byte, so a
/// client trickling a byte every few seconds would never trip it): the head must be complete
/// `headerDeadlineSeconds` after the request's first byte, the body `bodyDeadlineSeconds` after the head.
/// Sits before the HTTP decoder to see the first byte; `HTTPHandler` tells it when the head and the end came.
/// Past the head's deadline it answers 408 itself (there is no request for the HTTP handlers yet); past the
/// body's it fires `Passed.body` through the pipeline for `HTTPHandler` to answer.
final class RequestDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Passed: Equatable { case head, body }
    private enum Phase { case between, head, body, done }

    private let headLimit: TimeAmount
    private let bodyLimit: TimeAmount
    private var phase = Phase.between
    private var timer: Scheduled<Void>?
    private var context: ChannelHandlerContext?

    init(_ config: GatewayConfig) {
        headLimit = .seconds(config.headerDeadlineSeconds)
        bodyLimit = .seconds(config.bodyDeadlineSeconds)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if phase == .between { arm(.head, headLimit) }
        context.fireChannelRead(data)
    }

    /// The head is complete: the body's deadline starts.
    func headReceived() {
        if phase == .between || phase == .head { arm(.body, bodyLimit) }
    }

    /// The whole request is in: no deadline until the next request's first byte.
    func requestReceived() {
        timer?.cancel()
        timer = nil
        phase = .between
    }

    private func arm(_ next: Phase, _ limit: TimeAmount) {
        guard let context else { return }
        timer?.cancel()
        phase = next
        let passed: Passed = next == .head ? .head : .body
        timer = context.eventLoop.scheduleTask(in: limit) { [weak self] in
            guard let self, let context = self.context else { return }
            self.phase = .done
            guard passed == .head else { return context.fireUserInboundEventTriggered(passed) }
            // No head yet, so no request for the HTTP handlers to answer: the 408 is written here, below them.
            let requestId = GatewayApp.newRequestId()
            let body = ApiError(.requestTimeout, "the request head did not arrive in time").envelopeJSON(requestId: requestId)
            let answer = "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n"
                + "X-Request-Id: \(requestId)\r\nConnection: close\r\n\r\n" + body
            let channel = context.channel
            context.writeAndFlush(NIOAny(ByteBuffer(string: answer))).whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
