import Auth
import ChatDomain
import Fanout
import Foundation
import NIOCore

/// `/v1/ws`: the command protocol of PROTOCOL.md §6 over one authenticated WebSocket.
final class WebSocketSession: WebSocketConnection, SubscriptionSink, LiveStream, @unchecked Sendable {  // state only touched on the channel's event loop
    static let maxPublishesInFlight = 64

    private let app: GatewayApp
    private var actor: Actor
    private let requestId: String
    private var subscriptions: [ChannelName: Subscription] = [:]
    private var publishesInFlight = 0
    private var expiry: Scheduled<Void>?
    private var ended = false
    /// Publishes refused by the rate limit in a row; far past the limit the connection is closed (4029).
    private var rateLimitStrikes = 0
    /// Commands of any type this connection may still send, and how many were refused in a row.
    private var commands: TokenBucket
    private var commandStrikes = 0
    /// Only with a test fault (`swap`): a message delivered after the next one.
    private var heldForFault: ByteBuffer?

    private let eventLoop: any EventLoop

    init(app: GatewayApp, actor: Actor, requestId: String, eventLoop: any EventLoop, deflate: PermessageDeflate.Agreement? = nil) {
        self.app = app
        self.eventLoop = eventLoop
        self.actor = actor
        self.requestId = requestId
        self.commands = TokenBucket(rate: app.config.wsCommandRate, burst: app.config.wsCommandBurst)
        super.init(maxMessageBytes: app.config.maxMessageBytes, pingInterval: .seconds(app.config.wsPingSeconds), deflate: deflate)
    }

    override func handlerAdded(context: ChannelHandlerContext) {
        super.handlerAdded(context: context)
        app.streams.add(self)
        app.counters.add("ws_connections")
    }

    /// The 101 is out: the token's expiry, and a revocation that came between the handshake's check and the
    /// registration above (it did not find this session among the live streams), can be acted on now.
    override func upgradeCompleted() {
        if app.revocations.isRevoked(actor) { return close(code: 4003, reason: "session revoked") }
        scheduleExpiry()
    }

    private func scheduleExpiry() {
        expiry?.cancel()
        let ms = max(0, Int64(actor.expiresAt.timeIntervalSinceNow * 1000))
        expiry = context?.eventLoop.scheduleTask(in: .milliseconds(ms)) { [weak self] in self?.close(code: 4001, reason: "token expired") }
    }

    override func connectionEnded() {
        guard !ended else { return }
        ended = true
        expiry?.cancel()
        for subscription in subscriptions.values { subscription.cancel() }
        subscriptions.removeAll()
        app.streams.remove(self)
    }

    func shutdown() {
        context?.eventLoop.execute { self.close(code: 1001, reason: "server shutting down") }
    }

    // MARK: commands

    /// Every byte a connection queues counts against its send budget, replies too: a reply (or pong) that
    /// finds the queue over the budget means the client is not reading what it asks for.
    override func admitReply() -> Bool {
        guard let channel = context?.channel, !channel.isWritable else { return true }
        slowConsumer()
        return false
    }

    /// The per-connection command rate (roles exempt from the publish rate are exempt here too): false (and an
    /// error reply, or 4029 far past it) when over it.
    private func admitCommand() -> Bool {
        if !actor.roles.isDisjoint(with: app.config.rateLimitExemptRoles) || commands.take() {
            commandStrikes = 0
            return true
        }
        commandStrikes += 1
        app.counters.add("rate_limited")
        if commandStrikes >= app.config.rateLimitStrikes {
            close(code: 4029, reason: "rate limited")
        } else {
            sendError(ApiError(.rateLimited, "too many commands on this connection", retryAfter: 1), id: nil)
        }
        return false
    }

    override func handleBinary(_ data: ByteBuffer) {
        guard admitCommand() else { return }
        sendError(ApiError(.badRequest, "commands are JSON text frames"), id: nil)
    }

    override func handleText(_ text: String) {
        guard admitCommand() else { return }
        let command: [String: Any]
        do {
            command = try JSONText.parseObject(text.utf8)
        } catch {
            sendError(error, id: nil)
            return
        }
        let id = Self.idJSON(command["id"])
        guard let type = command["type"] as? String else {
            sendError(ApiError(.badRequest, "a command needs a string type"), id: id)
            return
        }
        do throws(ApiError) {
            switch type {
            case "subscribe": try subscribe(command, id: id)
            case "unsubscribe": try unsubscribe(command, id: id)
            case "publish": try publish(command, id: id)
            case "ping": send("{\"type\":\"pong\"\(Self.idField(id))}")
            case "refresh": refresh(command, id: id)
            case "read": try markRead(command, id: id)
            default: throw ApiError(.unknownCommand, "unknown command type", details: ["type": String(type.prefix(64))])
            }
        } catch {
            sendError(error, id: id)
        }
    }

    private func subscribe(_ command: [String: Any], id: String?) throws(ApiError) {
        guard let name = command["channel"] as? String else { throw ApiError(.badRequest, "subscribe needs a channel") }
        let channel = try ChannelName(parsing: name)
        guard subscriptions[channel] == nil else { throw ApiError(.alreadySubscribed, "already subscribed to \(channel)") }
        guard subscriptions.count < app.config.maxSubscriptionsPerConnection else {
            throw ApiError(.tooManySubscriptions, "at most \(app.config.maxSubscriptionsPerConnection) subscriptions per connection")
        }
        var cursor: Cursor?
        if let since = command["since"], !(since is NSNull) {
            guard let text = since as? String else { throw ApiError(.invalidCursor, "since must be a cursor string") }
            cursor = try Cursor(parsing: text, for: channel)
        }
        var history: Int64 = 0
        if let value = command["history"], !(value is NSNull) {
            guard let n = value as? Int, (0...ChannelService.maxPageSize).contains(n) else {
                throw ApiError(.badRequest, "history must be an integer in 0...\(ChannelService.maxPageSize)")
            }
            history = Int64(n)
        }
        guard let context else { return }
        let subscription = Subscription(channel: channel, eventLoop: context.eventLoop, format: deflate.map { $0.windowBits < 15 ? .webSocketDeflateSmallWindow : .webSocketDeflate } ?? .webSocket,
                                        hub: app.hub, sink: self, budget: app.config.sendBudget, largestMessage: app.config.bodyLimit)
        subscriptions[channel] = subscription
        subscription.register()
        let store = app.store
        let service = app.channels
        let loop = context.eventLoop
        let actor = self.actor
        Task {
            let position: Result<Int64, ApiError>
            do throws(ApiError) {
                // Registered first (so nothing is missed), allowed second: nothing is sent before both.
                _ = try await service.authorize(actor, .subscribe, name)
                let head = try await store.head(of: channel)
                position = .success(cursor == nil ? max(0, head - history) : try service.position(of: cursor, in: channel, head: head))
            } catch {
                position = .failure(error)
            }
            loop.execute {
                guard self.subscriptions[channel] === subscription else { return }
                switch position {
                case .failure(let error):
                    subscription.cancel()
                    self.subscriptions[channel] = nil
                    self.sendError(error, id: id)
                case .success(let after):
                    self.send("{\"type\":\"subscribed\"\(Self.idField(id)),\"channel\":\"\(channel.rawValue)\",\"cursor\":\"\(Cursor.text(channel: channel, seq: after))\"}")
                    subscription.begin(after: after)
                }
            }
        }
    }

    private func unsubscribe(_ command: [String: Any], id: String?) throws(ApiError) {
        guard let name = command["channel"] as? String else { throw ApiError(.badRequest, "unsubscribe needs a channel") }
        let channel = try ChannelName(parsing: name)
        subscriptions.removeValue(forKey: channel)?.cancel()
        send("{\"type\":\"unsubscribed\"\(Self.idField(id)),\"channel\":\"\(channel.rawValue)\"}")
    }

    private func publish(_ command: [String: Any], id: String?) throws(ApiError) {
        guard let name = command["channel"] as? String else { throw ApiError(.badRequest, "publish needs a channel") }
        var requestId: String?
        if let value = command["request_id"], !(value is NSNull) {
            guard let text = value as? String else { throw ApiError(.badRequest, "request_id must be a string") }
            requestId = text
        }
        guard let context else { return }
        // Bounded work per connection: past the limit, stop reading until acks go out.
        publishesInFlight += 1
        if publishesInFlight == Self.maxPublishesInFlight { context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in } }
        let body = UncheckedSendable(command["body"])
        let app = self.app
        let actor = self.actor
        let loop = context.eventLoop
        Task {
            let result = await app.publish(actor, to: name, body: body.value, requestId: requestId)
            loop.execute {
                self.publishesInFlight -= 1
                if self.publishesInFlight == Self.maxPublishesInFlight - 1 {
                    self.context?.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                }
                if case .failure(let error) = result, error.code == .rateLimited {
                    self.rateLimitStrikes += 1
                    if self.rateLimitStrikes >= app.config.rateLimitStrikes {
                        self.close(code: 4029, reason: "rate limited")
                        return
                    }
                } else {
                    self.rateLimitStrikes = 0
                }
                switch result {
                case .success(let appended):
                    self.send("{\"type\":\"ack\"\(Self.idField(id)),\"message\":\(appended.message.json)\(appended.replayed ? ",\"replayed\":true" : "")}")
                case .failure(let error):
                    self.sendError(error, id: id)
                }
            }
        }
    }

    private func markRead(_ command: [String: Any], id: String?) throws(ApiError) {
        guard let name = command["channel"] as? String else { throw ApiError(.badRequest, "read needs a channel") }
        guard case .thread(let thread) = try ChannelName(parsing: name).kind else {
            throw ApiError(.badRequest, "read cursors exist for thread channels only")
        }
        let cursor = UncheckedSendable(command["cursor"])
        let app = self.app
        let actor = self.actor
        guard let loop = context?.eventLoop else { return }
        Task {
            let result: Result<(cursor: String, unread: Int64), ApiError>
            do throws(ApiError) { result = .success(try await app.threads.markRead(actor, thread: thread, cursor: cursor.value)) } catch { result = .failure(error) }
            loop.execute {
                switch result {
                case .success(let read): self.send("{\"type\":\"ack\"\(Self.idField(id)),\"cursor\":\"\(read.cursor)\",\"unread\":\(read.unread)}")
                case .failure(let error): self.sendError(error, id: id)
                }
            }
        }
    }

    private func refresh(_ command: [String: Any], id: String?) {
        let token = command["token"] as? String
        let app = self.app
        guard let loop = context?.eventLoop else { return }
        Task {
            let result: Result<Actor, ApiError>
            do throws(ApiError) { result = .success(try await app.authenticate(token)) } catch { result = .failure(error) }
            loop.execute {
                switch result {
                case .success(let fresh) where fresh.sub == self.actor.sub:
                    self.actor = fresh
                    self.scheduleExpiry()
                    self.send("{\"type\":\"ack\"\(Self.idField(id))}")
                case .success:
                    self.sendError(ApiError(.forbidden, "a refresh token must have the same sub"), id: id)
                case .failure(let error):
                    self.sendError(error, id: id)
                }
            }
        }
    }

    private func sendError(_ error: ApiError, id: String?) {
        send("{\"type\":\"error\"\(Self.idField(id)),\"error\":\(error.envelopeJSON(requestId: requestId))}")
    }

    /// A command's `id` as JSON text (string or number), to echo in the reply.
    static func idJSON(_ value: Any?) -> String? {
        switch value {
        case let s as String: JSONText.quoted(s)
        case let n as NSNumber: n.stringValue
        default: nil
        }
    }

    static func idField(_ id: String?) -> String {
        id.map { ",\"id\":" + $0 } ?? ""
    }

    // MARK: SubscriptionSink

    func write(_ bytes: ByteBuffer, message: Message, promise: EventLoopPromise<Void>?) {
        guard !closing else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        guard app.faults.fault != nil else { return writeFrame(bytes, promise: promise) }
        var promise = promise
        app.faults.write(bytes, held: &heldForFault) { writeFrame($0, promise: promise); promise = nil }
        promise?.succeed()
    }

    func flush() {
        flushFrames()
    }

    var isWritable: Bool { context?.channel.isWritable ?? false }


    func slowConsumer() {
        guard !closing else { return }
        app.counters.add("slow_consumer_closes")
        app.logger.info("closing slow WebSocket consumer", metadata: ["request-id": "\(requestId)"])
        close(code: 4008, reason: "slow consumer")
    }

    func subscriptionEnded(_ channel: ChannelName) {
        subscriptions.removeValue(forKey: channel)
        send("{\"type\":\"unsubscribed\",\"channel\":\"\(channel.rawValue)\",\"reason\":\"forbidden\"}")
    }

    func revoke(_ revocation: Revocation) {
        eventLoop.execute {
            guard revocation.covers(self.actor) else { return }
            self.close(code: 4003, reason: "session revoked")
        }
    }

    func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64) {
        eventLoop.execute {
            guard user == self.actor.sub else { return }
            self.subscriptions[channel]?.end(after: head)
        }
    }

    func subscriptionFailed(_ channel: ChannelName, _ error: ApiError) {
        subscriptions.removeValue(forKey: channel)?.cancel()
        send("{\"type\":\"unsubscribed\",\"channel\":\"\(channel.rawValue)\",\"reason\":\"store_unavailable\"}")
    }
}

/// Carries a value parsed by JSONSerialization (immutable Foundation containers) into a task.
struct UncheckedSendable<T>: @unchecked Sendable {  // the wrapped value is never mutated after parsing
    let value: T
    init(_ value: T) { self.value = value }
}
