import Auth
import ChatDomain
import Fanout
import Foundation
import Logging
import NIOCore
import Wire

/// The I/O a transport does for its `ClientSession`: write replies, hold subscriptions, close.
protocol SessionTransport: AnyObject {
    /// A reply to write (a transport without command replies ignores what it has no use for).
    func deliver(_ reply: ServerReply)
    func fail(_ id: CommandID?, _ error: ApiError)
    /// Register a subscription (so nothing is missed), not yet delivering.
    func register(_ channel: ChannelName)
    /// `membershipEpoch`, `head`: see `ChannelService.StreamOpening` (`head` nil when not known).
    func begin(_ channel: ChannelName, after: Int64, head: Int64?, membershipEpoch: Int64?)
    func cancel(_ channel: ChannelName)
    func end(_ channel: ChannelName, after: Int64)
    func close(_ reason: ClientSession.Close)
    func setReading(_ on: Bool)
}

/// Drives one `ClientSession` on one event loop: performs its actions (store and token work off the loop, their
/// outcomes fed back on it), keeps the expiry timer, and stands for the connection among the live streams, so
/// that revocations, member removals and shutdown reach the session from the moment the transport starts it.
final class SessionDriver: LiveStream, PresenceWatcher, LoopTimerOwner, @unchecked Sendable {  // state only touched on `eventLoop`
    enum Kind: String, Sendable {
        case webSocket = "ws", serverSentEvents = "sse", longPoll = "poll"
    }

    let kind: Kind
    let eventLoop: any EventLoop
    /// The request that started the session (its id on every line logged).
    let log: RequestLog
    var logger: Logger { log.logger }
    private let app: GatewayApp
    private var session: ClientSession
    private weak var transport: (any SessionTransport)?
    /// The token's expiry in the loop's timer wheel.
    private var expiry: TimerWheel.Token?
    private let timers: LoopTimers
    private var started = false
    private var released = false
    /// Channels this session counts in the presence list of (WebSocket and SSE subscriptions).
    private var present = SmallMap<ChannelName, Void>()
    /// Each opening channel's head as its opening read it, until the stream begins.
    private var openedHeads = SmallMap<ChannelName, Int64>()

    init(app: GatewayApp, actor: Actor, kind: Kind, eventLoop: any EventLoop, log: RequestLog, transport: any SessionTransport) {
        self.app = app
        self.kind = kind
        self.eventLoop = eventLoop
        self.log = log
        self.transport = transport
        self.timers = app.timers.on(eventLoop)
        let config = app.config
        self.session = ClientSession(actor: actor, limits: ClientSession.Limits(
            maxSubscriptions: kind == .webSocket ? config.maxSubscriptionsPerConnection : 1, maxPublishesInFlight: 64,
            commandRate: config.wsCommandRate, commandBurst: config.wsCommandBurst, rateLimitStrikes: config.rateLimitStrikes,
            exemptRoles: config.rateLimitExemptRoles, maxStreamsPerUser: config.maxStreamsPerUser))
    }

    var actor: Actor { session.actor }

    /// Joins the live streams first, then looks for a revocation that came before (it could not find this one).
    func start() {
        guard !started else { return }
        started = true
        app.streams.add(self)
        app.metrics.connectionOpened(kind)
        let userStreams = app.streamsPerUser.add(session.actor.sub)
        run(session.registered(revoked: app.revocations.isRevoked(session.actor), userStreams: userStreams))
        // Started while the instance drains (its upgrade or request was read before the listener closed).
        if app.isDraining { run(session.shutdown()) }
    }

    func received(_ text: String) { run(session.received(ClientCommand.decode(text))) }
    func receivedBinary() { run(session.receivedBinary()) }
    func open(_ name: String, from start: ChannelService.StreamStart, permission: Auth.Action) {
        run(session.open(name, from: start, permission: permission))
    }
    func subscriptionEnded(_ channel: ChannelName, reason: String) { run(session.subscriptionEnded(channel, reason: reason)) }
    func sendRefused() { run(session.sendRefused()) }

    func connectionClosed() {
        timers.cancel(expiry)
        expiry = nil
        if started && !released {
            released = true
            app.streamsPerUser.remove(session.actor.sub)
            app.metrics.connectionClosed(kind)
        }
        app.streams.remove(self)
        run(session.connectionClosed())
    }

    // MARK: LiveStream (any thread)

    func shutdown() { eventLoop.execute { self.run(self.session.shutdown()) } }
    func revoke(_ revocation: Revocation) { eventLoop.execute { self.run(self.session.revoked(revocation)) } }
    func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64) {
        eventLoop.execute { self.run(self.session.memberRemoved(user, from: channel, at: head)) }
    }
    func presenceEvent(_ channel: ChannelName, _ text: String) {
        eventLoop.execute { self.run(self.session.presenceEvent(channel, text)) }
    }
    func typing(_ channel: ChannelName, user: String, _ text: String) {
        eventLoop.execute { self.run(self.session.typingEvent(channel, user: user, text)) }
    }

    // MARK: actions

    private func run(_ actions: [ClientSession.Action]) {
        for action in actions { perform(action) }
    }

    private func perform(_ action: ClientSession.Action) {
        switch action {
        case .reply(let reply): transport?.deliver(reply)
        case .fail(let id, let error):
            // A command refused by the connection's rate (a publish over the user's rate is counted where it is refused).
            if id == nil && error.code == .rateLimited { app.metrics.count(.rateLimited) }
            transport?.fail(id, error)
        case .open(let channel, let start, let permission):
            transport?.register(channel)
            let (app, actor) = (self.app, session.actor)
            let opened: (SessionDriver, Result<ChannelService.StreamOpening, ApiError>) -> Void = {
                if let opening = try? $1.get() { $0.openedHeads[channel] = opening.head }
                $0.run($0.session.opened(channel, $1.map(\.after), membershipEpoch: try? $1.get().membershipEpoch))
            }
            // Most openings need no read (a topic whose bounds the store keeps in memory): answered on the loop,
            // after the actions in hand, as a read's answer would be.
            let known: Result<ChannelService.StreamOpening, ApiError>
            do throws(ApiError) {
                guard let opening = try app.channels.openKnown(actor, permission, channel.rawValue, from: start) else {
                    return later({ () async throws(ApiError) in try await app.channels.open(actor, permission, channel.rawValue, from: start) },
                                 then: opened)
                }
                known = .success(opening)
            } catch {
                known = .failure(error)
            }
            eventLoop.assumeIsolated().execute { opened(self, known) }
        case .begin(let channel, let after, let epoch):
            transport?.begin(channel, after: after, head: openedHeads.removeValue(forKey: channel), membershipEpoch: epoch)
            if kind != .longPoll, present[channel] == nil {
                present[channel] = ()
                app.presence.join(channel, user: session.actor.sub)
                app.channelSessions.add(channel, self)
            }
        case .cancel(let channel):
            transport?.cancel(channel)
            _ = openedHeads.removeValue(forKey: channel)  // opened, then cancelled before it began
            if present.removeValue(forKey: channel) != nil {
                app.presence.leave(channel, user: session.actor.sub)
                app.presence.unwatch(channel, self)
                app.channelSessions.remove(channel, self)
            }
        case .watchPresence(let channel):
            app.presence.watch(channel, self)
        case .presence(let id, let name):
            let (app, actor) = (self.app, session.actor)
            later({ () async throws(ApiError) -> ServerReply in
                let channel = try await app.channels.authorize(actor, .subscribe, name)
                return .event(id: id, text: try await app.presence.json(of: channel, reply: true, id: id))
            }) { $0.run($0.session.answered(id, $1)) }
        case .typing(let id, let name):
            let (app, actor) = (self.app, session.actor)
            later({ () async throws(ApiError) -> ServerReply in
                try await app.relayTyping(actor, in: name)
                return .ack(id: id)
            }) { $0.run($0.session.answered(id, $1)) }
        case .end(let channel, let after): transport?.end(channel, after: after)
        case .publish(let id, let channel, let requestId, let body):
            // The publish goes to the group commit from here; its answer comes back to the loop.
            let loop = eventLoop
            app.publish(session.actor, to: channel, body: body, requestId: requestId) { outcome in
                loop.execute { self.run(self.session.published(id, outcome)) }
            }
        case .markRead(let id, let thread, let cursor):
            let (app, actor) = (self.app, session.actor)
            later({ () async throws(ApiError) in try await app.threads.markRead(actor, thread: thread, cursor: cursor) }) {
                $0.run($0.session.readMarked(id, $1))
            }
        case .verify(let id, let token):
            let app = self.app
            later({ () async throws(ApiError) in try await app.authenticate(token) }) { $0.run($0.session.verified(id, $1)) }
        case .scheduleExpiry(let date):
            timers.cancel(expiry)
            expiry = nil
            if date.timeIntervalSinceNow <= 0 {
                // Already past: at once, not at the wheel's next tick.
                eventLoop.execute { self.run(self.session.tokenExpired()) }
            } else {
                expiry = timers.schedule(self, at: date)
            }
        case .pauseReading: transport?.setReading(false)
        case .resumeReading: transport?.setReading(true)
        case .close(let reason):
            timers.cancel(expiry)
            expiry = nil
            if reason == .slowConsumer {
                app.metrics.count(.slowConsumerCloses)
                logger.info("closing slow consumer", metadata: ["transport": "\(kind.rawValue)"])
            }
            if reason == .rateLimited { app.metrics.count(.rateLimited) }
            transport?.close(reason)
        }
    }

    /// The token's expiry.
    func timerFired() {
        expiry = nil
        run(session.tokenExpired())
    }

    /// How a member's subscription to a thread asks the store for a removal it has not heard of.
    func membershipCheck(_ channel: ChannelName) -> MembershipCheck? {
        guard case .thread(let thread) = channel.kind else { return nil }
        let (lookups, user) = (app.removalLookups, session.actor.sub)
        return { epochs throws(ApiError) in try await lookups.heads(from: thread, epochs: epochs)[user] }
    }

    /// Runs `work` off the event loop and hands its outcome to `then` back on it.
    private func later<T: Sendable>(_ work: @escaping @Sendable () async throws(ApiError) -> T, then: @escaping (SessionDriver, Result<T, ApiError>) -> Void) {
        let loop = eventLoop
        nonisolated(unsafe) let then = then
        Task {
            let result: Result<T, ApiError>
            do throws(ApiError) { result = .success(try await work()) } catch { result = .failure(error) }
            loop.execute { then(self, result) }
        }
    }
}
