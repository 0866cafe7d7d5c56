import Auth
import ChatDomain
import Foundation
import NIOCore
import Wire

/// What one client may do on one connection, whatever carries it (WebSocket, SSE, long-poll): commands and
/// outcomes in, actions out. A value with no I/O — the transport's driver (`SessionDriver`) does what the
/// actions say and feeds back what came of it. Modelled on postgres-nio's connection state machines.
///
/// It owns: the command rate (4029 far past it), publishes in flight (reading pauses at the limit), the
/// subscriptions and their opening (registered first, allowed second, so no revocation or member removal
/// falls between), refresh and expiry (4001), revocation (4003), member removal (a subscription delivers
/// up to the removal's head, then ends), and the verdict on a reply the send budget refused (4008).
struct ClientSession {
    struct Limits: Sendable {
        var maxSubscriptions = 128
        var maxPublishesInFlight = 64
        var commandRate: Double = 100
        var commandBurst: Double = 200
        /// Refusals in a row (commands, or publishes over the per-user rate) that close the connection (4029).
        var rateLimitStrikes = 200
        /// Roles the command rate does not apply to.
        var exemptRoles: Set<String> = []
        /// Live streams one user may hold on an instance (0: no cap).
        var maxStreamsPerUser = 0
    }

    enum Close: Equatable {
        case shutdown, tokenExpired, revoked, slowConsumer, rateLimited
        /// The user has as many live streams as allowed (policy: 1008).
        case tooManyStreams

        var code: UInt16 {
            switch self {
            case .shutdown: 1001
            case .tokenExpired: 4001
            case .revoked: 4003
            case .slowConsumer: 4008
            case .rateLimited: 4029
            case .tooManyStreams: 1008
            }
        }

        var reason: String {
            switch self {
            case .shutdown: "server shutting down"
            case .tokenExpired: "token expired"
            case .revoked: "session revoked"
            case .slowConsumer: "slow consumer"
            case .rateLimited: "rate limited"
            case .tooManyStreams: "too many connections"
            }
        }
    }

    enum Action: Equatable {
        case reply(ServerReply)
        /// An error reply to the command `id` (the transport adds the request id, or answers with the status).
        case fail(CommandID?, ApiError)
        /// Register a subscription to `channel` (nothing delivered yet), then ask `ChannelService.open` where it starts.
        case open(ChannelName, from: ChannelService.StreamStart, permission: Auth.Action)
        /// Deliver from after `after`: catch-up, then live.
        /// `membershipEpoch`: see `ChannelService.StreamOpening`.
        case begin(ChannelName, after: Int64, membershipEpoch: Int64? = nil)
        /// Drop the subscription (nothing more delivered).
        case cancel(ChannelName)
        /// Deliver up to `after`, then end with `unsubscribed` / reason `forbidden` (a member removal).
        case end(ChannelName, after: Int64)
        case publish(CommandID?, channel: String, requestId: String?, body: JSONValue?)
        case markRead(CommandID?, thread: String, cursor: String?)
        /// Answer a `presence` command (who is subscribed to the channel, cluster-wide).
        case presence(CommandID?, channel: String)
        /// Relay a `typing` command to the thread's other members (after the permission check and rate).
        case typing(CommandID?, channel: String)
        /// Send the channel's `join` / `leave` events to this session (its subscription asked for them).
        case watchPresence(ChannelName)
        case verify(CommandID?, token: String?)
        case scheduleExpiry(Date)
        case pauseReading, resumeReading
        case close(Close)
    }

    private enum SubscriptionState: Equatable {
        /// Registered, waiting for `opened`; a member removal seen meanwhile is kept (its head). `presence`:
        /// the client asked for `join` / `leave` events.
        case opening(CommandID?, removedAt: Int64?, presence: Bool)
        case open(presence: Bool)
    }

    private(set) var actor: Actor
    private let limits: Limits
    private var subscriptions = SmallMap<ChannelName, SubscriptionState>()
    private var commands: TokenBucket
    private var commandStrikes = 0
    private var publishStrikes = 0
    private(set) var publishesInFlight = 0
    /// Set by a close: nothing but `connectionClosed` does anything after it.
    private(set) var closed = false
    /// The token expired while a subscription was opening: the close waits for the open (an accepted token
    /// gets its answer — the stream's start — before the stream ends).
    private var expiredWhileOpening = false
    /// The instance shuts down while publishes are in flight: reading stopped, and the close (1001) waits for
    /// their acks, so that nothing stored goes unacknowledged on a connection that was still open.
    private(set) var closingAfterPublishes = false

    init(actor: Actor, limits: Limits) {
        self.actor = actor
        self.limits = limits
        self.commands = TokenBucket(rate: limits.commandRate, burst: limits.commandBurst)
    }

    var subscriptionCount: Int { subscriptions.count }

    // MARK: events

    /// The transport registered the session among the live streams; `revoked`: a revocation in force covers
    /// its token (one applied before the registration, which it could not find); `userStreams`: the live
    /// streams of the same user on this instance, this one included.
    mutating func registered(revoked: Bool, userStreams: Int = 1) -> [Action] {
        if revoked { return close(.revoked) }
        if limits.maxStreamsPerUser > 0 && userStreams > limits.maxStreamsPerUser {
            let error = ApiError(.rateLimited, "at most \(limits.maxStreamsPerUser) live connections per user", details: ["limit": String(limits.maxStreamsPerUser)],
                                 retryAfter: 1)
            return [.fail(nil, error)] + close(.tooManyStreams)
        }
        return [.scheduleExpiry(actor.expiresAt)]
    }

    /// A text frame, read (or not) as a command.
    mutating func received(_ command: Result<ClientCommand, CommandError>, now: NIODeadline = .now()) -> [Action] {
        guard !closed else { return [] }
        if closingAfterPublishes {
            let id: CommandID? = switch command {
            case .success(let command): command.id
            case .failure(let error): error.id
            }
            return [.fail(id, ApiError(.shuttingDown, "the server is shutting down"))]
        }
        if let refused = admitCommand(now) { return refused }
        switch command {
        case .failure(let error):
            return [.fail(error.id, ApiError(Self.code(error.code), error.message, details: error.details))]
        case .success(let command):
            return handle(command)
        }
    }

    /// A binary frame: commands are text.
    mutating func receivedBinary(now: NIODeadline = .now()) -> [Action] {
        guard !closed else { return [] }
        if let refused = admitCommand(now) { return refused }
        return [.fail(nil, ApiError(.badRequest, "commands are JSON text frames"))]
    }

    /// Opens a stream outside the command protocol (SSE's one subscription, long-poll's one read).
    mutating func open(_ name: String, from start: ChannelService.StreamStart, permission: Auth.Action) -> [Action] {
        guard !closed else { return [] }
        return subscribe(id: nil, name, from: start, permission: permission)
    }

    mutating func opened(_ channel: ChannelName, _ result: Result<Int64, ApiError>, membershipEpoch: Int64? = nil) -> [Action] {
        guard !closed, case .opening(let id, let removedAt, let presence) = subscriptions[channel] else { return [] }
        var actions: [Action]
        switch result {
        case .failure(let error):
            subscriptions[channel] = nil
            actions = [.cancel(channel), .fail(id, error)]
        case .success(let after):
            subscriptions[channel] = .open(presence: presence)
            actions = [.reply(.subscribed(id: id, channel: channel.rawValue, cursor: Cursor.text(channel: channel, seq: after))), .begin(channel, after: after, membershipEpoch: membershipEpoch)]
            if presence { actions.append(.watchPresence(channel)) }
            if let removedAt { actions.append(.end(channel, after: removedAt)) }
        }
        if expiredWhileOpening && !isOpening { actions += close(.tokenExpired) }
        return actions
    }

    private var isOpening: Bool {
        subscriptions.values.contains { if case .opening = $0 { true } else { false } }
    }

    mutating func published(_ id: CommandID?, _ result: Result<AppendResult, ApiError>) -> [Action] {
        publishesInFlight -= 1
        guard !closed else { return [] }
        var actions: [Action] = publishesInFlight == limits.maxPublishesInFlight - 1 && !closingAfterPublishes ? [.resumeReading] : []
        if case .failure(let error) = result, error.code == .rateLimited {
            publishStrikes += 1
            if publishStrikes >= limits.rateLimitStrikes { return actions + close(.rateLimited) }
        } else {
            publishStrikes = 0
        }
        switch result {
        case .success(let appended):
            actions.append(.reply(.ack(id: id, message: RawJSON(appended.message.json), replayed: appended.replayed)))
        case .failure(let error):
            actions.append(.fail(id, error))
        }
        if closingAfterPublishes && publishesInFlight == 0 { actions += close(.shutdown) }
        return actions
    }

    /// A command answered off the loop (`presence`, `typing`): its reply or its error.
    func answered(_ id: CommandID?, _ result: Result<ServerReply, ApiError>) -> [Action] {
        guard !closed else { return [] }
        switch result {
        case .success(let reply): return [.reply(reply)]
        case .failure(let error): return [.fail(id, error)]
        }
    }

    mutating func readMarked(_ id: CommandID?, _ result: Result<(cursor: String, unread: Int64), ApiError>) -> [Action] {
        guard !closed else { return [] }
        switch result {
        case .success(let read): return [.reply(.ack(id: id, cursor: read.cursor, unread: read.unread))]
        case .failure(let error): return [.fail(id, error)]
        }
    }

    mutating func verified(_ id: CommandID?, _ result: Result<Actor, ApiError>) -> [Action] {
        guard !closed else { return [] }
        switch result {
        case .success(let fresh) where fresh.sub == actor.sub:
            actor = fresh
            return [.scheduleExpiry(fresh.expiresAt), .reply(.ack(id: id))]
        case .success:
            return [.fail(id, ApiError(.forbidden, "a refresh token must have the same sub"))]
        case .failure(let error):
            return [.fail(id, error)]
        }
    }

    mutating func revoked(_ revocation: Revocation) -> [Action] {
        guard !closed, revocation.covers(actor) else { return [] }
        return close(.revoked)
    }

    /// `user` left the thread of `channel` at `head`.
    mutating func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64) -> [Action] {
        guard !closed, user == actor.sub, let state = subscriptions[channel] else { return [] }
        switch state {
        case .open:
            return [.end(channel, after: head)]
        case .opening(let id, let removedAt, let presence):
            subscriptions[channel] = .opening(id, removedAt: min(head, removedAt ?? head), presence: presence)
            return []
        }
    }

    /// A `join` or `leave` event of `channel`: for a subscription that asked for them.
    func presenceEvent(_ channel: ChannelName, _ text: String) -> [Action] {
        guard !closed, case .open(presence: true)? = subscriptions[channel] else { return [] }
        return [.reply(.event(id: nil, text: text))]
    }

    /// `user` is typing in `channel`: for an open subscription of anyone else.
    func typingEvent(_ channel: ChannelName, user: String, _ text: String) -> [Action] {
        guard !closed, user != actor.sub, case .open? = subscriptions[channel] else { return [] }
        return [.reply(.event(id: nil, text: text))]
    }

    /// A subscription reached the end a removal set (`forbidden`), or its catch-up failed (`store_unavailable`).
    mutating func subscriptionEnded(_ channel: ChannelName, reason: String) -> [Action] {
        guard !closed, subscriptions.removeValue(forKey: channel) != nil else { return [] }
        return [.cancel(channel), .reply(.unsubscribed(id: nil, channel: channel.rawValue, reason: reason))]
    }

    mutating func tokenExpired() -> [Action] {
        guard !closed else { return [] }
        if isOpening {
            expiredWhileOpening = true
            return []
        }
        return close(.tokenExpired)
    }
    /// A reply or a message did not fit the send budget: the client is not reading what it is sent.
    mutating func sendRefused() -> [Action] { closed ? [] : close(.slowConsumer) }
    /// The instance shuts down: close (1001) now, or once the publishes in flight are acknowledged.
    mutating func shutdown() -> [Action] {
        guard !closed, !closingAfterPublishes else { return [] }
        guard publishesInFlight == 0 else {
            closingAfterPublishes = true
            return [.pauseReading]
        }
        return close(.shutdown)
    }

    /// The connection is gone (or closing): every subscription is dropped.
    mutating func connectionClosed() -> [Action] {
        closed = true
        let channels = subscriptions.keys.sorted { $0.rawValue < $1.rawValue }
        subscriptions.removeAll()
        return channels.map { .cancel($0) }
    }

    // MARK: commands

    private mutating func handle(_ command: ClientCommand) -> [Action] {
        switch command {
        case .subscribe(let id, let channel, let since, let history, let presence):
            let start: ChannelService.StreamStart = since.map { .since($0) } ?? history.map { .history($0) } ?? .live
            return subscribe(id: id, channel, from: start, permission: .subscribe, presence: presence)
        case .presence(let id, let channel):
            return [.presence(id, channel: channel)]
        case .typing(let id, let channel):
            return [.typing(id, channel: channel)]
        case .unsubscribe(let id, let name):
            let channel: ChannelName
            do throws(ApiError) { channel = try ChannelName(parsing: name) } catch { return [.fail(id, error)] }
            let cancel: [Action] = subscriptions.removeValue(forKey: channel) != nil ? [.cancel(channel)] : []
            return cancel + [.reply(.unsubscribed(id: id, channel: channel.rawValue))]
        case .publish(let id, let channel, let requestId, let body):
            publishesInFlight += 1
            let pause: [Action] = publishesInFlight == limits.maxPublishesInFlight ? [.pauseReading] : []
            return pause + [.publish(id, channel: channel, requestId: requestId, body: body)]
        case .read(let id, let name, let cursor):
            do throws(ApiError) {
                guard case .thread(let thread) = try ChannelName(parsing: name).kind else {
                    throw ApiError(.badRequest, "read cursors exist for thread channels only")
                }
                return [.markRead(id, thread: thread, cursor: cursor)]
            } catch {
                return [.fail(id, error)]
            }
        case .refresh(let id, let token):
            return [.verify(id, token: token)]
        case .ping(let id):
            return [.reply(.pong(id: id))]
        }
    }

    private mutating func subscribe(id: CommandID?, _ name: String, from start: ChannelService.StreamStart, permission: Auth.Action,
                                    presence: Bool = false) -> [Action] {
        let channel: ChannelName
        do throws(ApiError) { channel = try ChannelName(parsing: name) } catch { return [.fail(id, error)] }
        guard subscriptions[channel] == nil else { return [.fail(id, ApiError(.alreadySubscribed, "already subscribed to \(channel)"))] }
        guard subscriptions.count < limits.maxSubscriptions else {
            return [.fail(id, ApiError(.tooManySubscriptions, "at most \(limits.maxSubscriptions) subscriptions per connection"))]
        }
        subscriptions[channel] = .opening(id, removedAt: nil, presence: presence)
        return [.open(channel, from: start, permission: permission)]
    }

    /// nil when the command may run; else what to do about one over the rate.
    private mutating func admitCommand(_ now: NIODeadline) -> [Action]? {
        if !actor.roles.isDisjoint(with: limits.exemptRoles) || commands.take(now: now) {
            commandStrikes = 0
            return nil
        }
        commandStrikes += 1
        if commandStrikes >= limits.rateLimitStrikes { return close(.rateLimited) }
        return [.fail(nil, ApiError(.rateLimited, "too many commands on this connection", retryAfter: 1))]
    }

    private mutating func close(_ reason: Close) -> [Action] {
        closed = true
        return [.close(reason)]
    }

    /// A reader's code is one of the registry's (same raw value).
    private static func code(_ code: CommandError.Code) -> ApiError.Code {
        ApiError.Code(rawValue: code.rawValue) ?? .badRequest
    }
}
