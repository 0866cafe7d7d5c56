import ChatDomain
import Foundation
import Logging
import NIOCore
import NIOHTTP1

// The HTTP side of a connection is a pipeline of small handlers, each with one job:
// `RequestDeadline` (absolute head and body deadlines) → NIO's HTTP decoder and pipelining →
// `ParseErrorAnswer` (the envelope for what the decoder cannot parse) → `RequestReader` (limits of the head
// and body; a complete `HTTPRequest` out) → `RequestGate` (connection cap, per-connection rate, origin,
// content type) → `HTTPHandler` (route table → REST, long-poll, SSE).

/// Reads one request at a time into an `HTTPRequest`: the request target, header count and header bytes
/// limits (answered once the request ends), the body limit (`413` as soon as it is known, from
/// `Content-Length` or once the bytes read pass it, the rest drained so the client sees the answer), and
/// the body's deadline (`408`).
final class RequestReader: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPRequest
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case idle
        case receiving(HTTPRequestHead, ByteBuffer)
        /// A body over the limit was answered 413 at once; the rest of it is read and dropped (up to a bound) so
        /// that the client gets the answer rather than a reset, then the connection closes.
        case draining(Int)
        /// The head broke a limit: answered with this error once the request ends, then closed.
        case rejected(HTTPRequestHead, ApiError)
    }
    private var state = State.idle
    /// The instance (its configuration and logger), by reference: a handler on every connection must not hold
    /// a copy of the whole configuration.
    private let app: GatewayApp
    private var config: GatewayConfig { app.config }
    private var logger: Logger { app.logger }
    private let deadline: RequestDeadline

    init(app: GatewayApp, deadline: RequestDeadline) {
        self.app = app
        self.deadline = deadline
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            deadline.headReceived()
            if let error = limitError(head) {
                state = .rejected(head, error)
            } else if let length = head.headers.first(name: "content-length").flatMap(Int.init), length > config.maxMessageBytes {
                refuseTooLarge(context: context, head: head)
            } else {
                state = .receiving(head, context.channel.allocator.buffer(capacity: 0))
            }
        case .body(var chunk):
            switch state {
            case .draining(let dropped):
                state = .draining(dropped + chunk.readableBytes)
                if dropped + chunk.readableBytes > config.maxMessageBytes { context.close(promise: nil) }
            case .receiving(let head, var body):
                if body.readableBytes + chunk.readableBytes > config.maxMessageBytes {
                    refuseTooLarge(context: context, head: head)
                } else {
                    state = .idle
                    body.writeBuffer(&chunk)
                    state = .receiving(head, body)
                }
            case .idle, .rejected:
                break
            }
        case .end:
            deadline.requestReceived()
            let read = state
            state = .idle
            switch read {
            case .receiving(let head, let body):
                context.fireChannelRead(wrapInboundOut(HTTPRequest(head: head, body: body, app: app)))
            case .rejected(let head, let error):
                let request = HTTPRequest(head: head, body: ByteBuffer(), app: app)
                context.writeResponse(.error(error, requestId: request.requestId), to: request, forceClose: true)
            case .draining:
                context.close(promise: nil)
            case .idle:
                break
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event as? RequestDeadline.Passed == .body else { return context.fireUserInboundEventTriggered(event) }
        // The body did not arrive in time, however the bytes trickled: 408, then closed.
        switch state {
        case .receiving(let head, _), .rejected(let head, _):
            state = .draining(0)
            let request = HTTPRequest(head: head, body: ByteBuffer(), app: app)
            context.writeResponse(.error(ApiError(.requestTimeout, "the request body did not arrive in time"), requestId: request.requestId),
                                  to: request, forceClose: true)
        case .draining, .idle:
            context.close(promise: nil)
        }
    }

    /// `413` as soon as the body is known to be too large, without reading the rest first; the connection
    /// closes after the rest is dropped.
    private func refuseTooLarge(context: ChannelHandlerContext, head: HTTPRequestHead) {
        let request = HTTPRequest(head: head, body: ByteBuffer(), app: app)
        let error = ApiError(.payloadTooLarge, "request body is larger than \(config.maxMessageBytes) bytes")
        context.writeResponse(.error(error, requestId: request.requestId), to: request, forceClose: true, closeAfter: false)
        state = .draining(0)
    }

    /// URI length, header count and size limits; nil when the head is within them.
    private func limitError(_ head: HTTPRequestHead) -> ApiError? {
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
}

/// Admits a complete request, or answers it with the error: a connection past its address's cap (every
/// request refused, then closed), the per-connection request rate (429, closed), an origin not allowed
/// (403), a body that is not JSON (415).
final class RequestGate: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequest
    typealias InboundOut = HTTPRequest
    typealias OutboundOut = HTTPServerResponsePart

    private let app: GatewayApp
    private var config: GatewayConfig { app.config }
    private let refusal: ApiError?
    /// Requests this connection may still make (`connectionRequestRate` per second).
    private var requests: TokenBucket

    init(app: GatewayApp, refusal: ApiError? = nil) {
        self.app = app
        let config = app.config
        self.refusal = refusal
        self.requests = TokenBucket(rate: config.connectionRequestRate, burst: config.connectionRequestBurst)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let request = unwrapInboundIn(data)
        if let (error, close) = refusal(of: request) {
            return context.writeResponse(.error(error, requestId: request.requestId), to: request, forceClose: close)
        }
        context.fireChannelRead(data)
    }

    /// Why `request` is not admitted (and whether the connection closes after the answer), or nil.
    private func refusal(of request: HTTPRequest) -> (ApiError, Bool)? {
        if let refusal { return (refusal, true) }
        if !requests.take() { return (ApiError(.rateLimited, "too many requests on this connection", retryAfter: 1), true) }
        let origin = request.headers.first(name: "origin")
        if !config.allows(origin: origin) {
            return (ApiError(.forbidden, "this origin is not allowed", details: ["origin": String((origin ?? "").prefix(100))]), false)
        }
        // A body is JSON: no Content-Type is taken as JSON, any other type is refused.
        if request.body.readableBytes > 0, let type = request.headers.first(name: "content-type"),
           type.split(separator: ";").first?.trimmingSpaces.lowercased() != "application/json" {
            return (ApiError(.unsupportedMediaType, "request bodies are application/json", details: ["content_type": String(type.prefix(100))]), false)
        }
        return nil
    }
}

extension ChannelHandlerContext {
    /// Writes a complete answer to `request` (in pieces of about 64 KiB) and logs its access line (`route`: the
    /// template that matched), closing the connection after it when the client asked, or `forceClose` (unless
    /// `closeAfter` is false: the caller closes later).
    func writeResponse(_ response: HTTPResponse, to request: HTTPRequest, route: String? = nil, forceClose: Bool = false, closeAfter: Bool = true) {
        request.logAnswered(response.status, route: route)
        guard channel.isActive else { return }
        let close = forceClose || !request.keepAlive
        var headers = HTTPHeaders()
        if response.status != .noContent {
            headers.add(name: "Content-Type", value: response.contentType)
            headers.add(name: "Content-Length", value: String(response.bodyBytes))
        }
        headers.add(name: "X-Request-Id", value: request.requestId)
        for (name, value) in response.headers { headers.add(name: name, value: value) }
        for (name, value) in request.corsHeaders { headers.add(name: name, value: value) }
        if close { headers.add(name: "Connection", value: "close") }
        write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: response.status, headers: headers))), promise: nil)
        var piece = channel.allocator.buffer(capacity: min(response.bodyBytes, 64 * 1024))
        for part in response.parts {
            piece.writeString(part)
            if piece.readableBytes >= 64 * 1024 {
                write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(piece))), promise: nil)
                piece = channel.allocator.buffer(capacity: 64 * 1024)
            }
        }
        if piece.readableBytes > 0 { write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(piece))), promise: nil) }
        let done = writeAndFlushWithFuture(NIOAny(HTTPServerResponsePart.end(nil)))
        if close && closeAfter {
            done.assumeIsolated().whenComplete { _ in self.close(promise: nil) }
        }
    }
}

/// A request NIO's HTTP decoder cannot parse (a malformed request line or header, a bad `Content-Length`, a
/// broken chunk) is answered `400 BAD_REQUEST` (header fields past the decoder's bound: `431
/// HEADERS_TOO_LARGE`) with the error envelope and a request id, as every error is (NIO's own
/// `HTTPServerProtocolErrorHandler` answers with an empty body) — unless an answer is already on its way, which
/// is then the last. The connection closes: the decoder gives up on the byte stream. Sits where NIO's handler
/// would, right after its pipelining handler, and tracks the answers passing through for that.
final class ParseErrorAnswer: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private var answering = false

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parseError = error as? HTTPParserError else { return context.fireErrorCaught(error) }
        if !answering {
            let requestId = GatewayApp.newRequestId()
            // Header fields past the decoder's own bound (larger than `RequestReader`'s limit allows anyway): 431, as there.
            let problem = parseError == .headerOverflow
                ? ApiError(.headersTooLarge, "the header fields are too large")
                : ApiError(.badRequest, "malformed HTTP request")
            let answer = HTTPResponse.error(problem, requestId: requestId)
            let body = answer.parts.joined()
            let headers = HTTPHeaders([("Content-Type", answer.contentType), ("Content-Length", String(body.utf8.count)),
                                       ("X-Request-Id", requestId), ("Connection", "close")] + answer.headers)
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: answer.status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        } else {
            context.close(promise: nil)
        }
        context.fireErrorCaught(error)
    }

    /// Puts one right after NIO's pipelining handler in `pipeline` (set up without NIO's error handler).
    static func add(to pipeline: ChannelPipeline.SynchronousOperations) throws {
        try pipeline.addHandler(ParseErrorAnswer(), position: .after(pipeline.handler(type: HTTPServerPipelineHandler.self)))
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let head) where head.status.code >= 200: answering = true
        case .end: answering = false
        default: break
        }
        context.write(data, promise: promise)
    }
}

/// Absolute deadlines for one request at a time, whatever the idle timer sees (it resets on every byte, so a
/// client trickling a byte every few seconds would never trip it): the head must be complete
/// `headerDeadlineSeconds` after the request's first byte, the body `bodyDeadlineSeconds` after the head.
/// Sits before the HTTP decoder to see the first byte; `HTTPHandler` tells it when the head and the end came.
/// Past the head's deadline it answers 408 itself (there is no request for the HTTP handlers yet); past the
/// body's it fires `Passed.body` through the pipeline for `RequestReader` to answer.
final class RequestDeadline: ChannelInboundHandler, RemovableChannelHandler, LoopTimerOwner {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Passed: Equatable { case head, body }
    private enum Phase { case between, head, body, done }

    private let headLimit: TimeAmount
    private let bodyLimit: TimeAmount
    /// The loop's one-second timer wheel: a deadline of whole seconds needs no scheduled task of its own (two
    /// per request, each an allocation and a heap insertion and removal); it passes within a second after it is due.
    private let timers: LoopTimers
    private var phase = Phase.between
    private var timer: TimerWheel.Token?
    private var context: ChannelHandlerContext?

    init(_ config: GatewayConfig, timers: LoopTimers) {
        headLimit = .seconds(config.headerDeadlineSeconds)
        bodyLimit = .seconds(config.bodyDeadlineSeconds)
        self.timers = timers
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        timers.cancel(timer)
        timer = nil
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
        timers.cancel(timer)
        timer = nil
        phase = .between
    }

    private func arm(_ next: Phase, _ limit: TimeAmount) {
        guard context != nil else { return }
        timers.cancel(timer)
        phase = next
        timer = timers.schedule(self, at: .now() + limit)
    }

    func timerFired() {
        timer = nil
        guard let context, phase == .head || phase == .body else { return }
        let passed: Passed = phase == .head ? .head : .body
        phase = .done
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

extension ChannelPipeline.SynchronousOperations {
    /// Takes the handler of `type` out of the pipeline, if it is there.
    func removeIfPresent<Handler: RemovableChannelHandler>(_ type: Handler.Type) {
        if let handler = try? self.handler(type: type) { _ = removeHandler(handler) }
    }

    /// Takes out our handlers that serve the next request (its deadlines, limits, checks, the idle timer and
    /// the parse-error answer): for a connection that will take no other request (upgraded, or streaming).
    func removeRequestHandling() {
        removeIfPresent(RequestGate.self)
        removeIfPresent(RequestReader.self)
        removeIfPresent(ParseErrorAnswer.self)
        removeIfPresent(IdleStateHandler.self)
        removeIfPresent(RequestDeadline.self)
    }
}
