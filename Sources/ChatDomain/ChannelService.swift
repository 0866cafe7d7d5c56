import Auth
import CoreMetrics
import Wire

/// The domain's entry for channels: names, permissions (through `Policy.can`), publishing and reading.
/// Every transport goes through it, so a check cannot be skipped by picking another transport.
public final class ChannelService: Sendable {
    public let store: any Store
    public let policy: Policy
    public let bodyLimit: Int
    /// The most message bytes one history or long-poll page holds (at least one message): a page cut by
    /// size says `has_more`, and the client reads on from its cursor.
    public let pageBytes: Int
    public static let maxRequestIdLength = 200
    public static let maxPageSize = 1000

    /// Where a thread message's unread counts are announced (each other member's `user:` channel).
    public let feed: UserFeed?
    /// How long each append waited for its commit (queue and transaction).
    let appendTimer: CoreMetrics.Timer?

    public init(store: any Store, policy: Policy, bodyLimit: Int, pageBytes: Int = 4 * 1024 * 1024, feed: UserFeed? = nil,
                appendTimer: CoreMetrics.Timer? = nil) {
        self.appendTimer = appendTimer
        self.store = store
        self.policy = policy
        self.bodyLimit = bodyLimit
        self.pageBytes = max(1, pageBytes)
        self.feed = feed
    }

    /// How many rows to ask the store for next: about the bytes left, by the average size so far (or the
    /// body limit before any is known).
    private func chunk(left: Int, bytesLeft: Int, average: Int?) -> Int {
        max(1, min(left, 100, bytesLeft / max(1, average ?? bodyLimit)))
    }

    /// Whether a page of `count` messages holding `bytes` of JSON takes one more of `size` bytes: at most `limit`
    /// messages and about `pageBytes`, always at least one.
    public func pageTakes(count: Int, bytes: Int, size: Int, limit: Int) -> Bool {
        count == 0 || (bytes + size <= pageBytes && count < limit)
    }

    /// Messages after `after`, ascending: at most `limit` and about `pageBytes` (read from the store in
    /// pieces, so the read itself stays within the byte cap too).
    public func page(in channel: ChannelName, after: Int64, limit: Int) async throws(ApiError) -> Page {
        var out: [Message] = []
        var bytes = 0
        var position = after
        while out.count < limit {
            let page = try await store.messages(in: channel, after: position,
                                                limit: chunk(left: limit - out.count, bytesLeft: pageBytes - bytes, average: out.isEmpty ? nil : bytes / out.count))
            for message in page.messages {
                let size = message.json.utf8.count
                if !pageTakes(count: out.count, bytes: bytes, size: size, limit: limit) { return Page(messages: out, hasMore: true) }
                out.append(message)
                bytes += size
            }
            guard page.hasMore, let last = page.messages.last else { return Page(messages: out, hasMore: false) }
            position = last.seq
        }
        return Page(messages: out, hasMore: true)
    }

    /// The messages just before `before`, ascending: at most `limit` and about `pageBytes`, the nearest kept.
    public func page(in channel: ChannelName, before: Int64, limit: Int) async throws(ApiError) -> Page {
        var pieces: [[Message]] = []
        var count = 0
        var bytes = 0
        var position = before
        var more = false
        reading: while count < limit {
            let page = try await store.messages(in: channel, before: position,
                                                limit: chunk(left: limit - count, bytesLeft: pageBytes - bytes, average: count == 0 ? nil : bytes / count))
            var taken: [Message] = []
            for message in page.messages.reversed() {
                let size = message.json.utf8.count
                if count > 0 && (bytes + size > pageBytes || count == limit) {
                    more = true
                    pieces.append(taken.reversed())
                    break reading
                }
                taken.append(message)
                count += 1
                bytes += size
            }
            pieces.append(taken.reversed())
            more = page.hasMore
            guard page.hasMore, let first = page.messages.first else { break }
            position = first.seq
        }
        return Page(messages: pieces.reversed().flatMap { $0 }, hasMore: more)
    }

    /// Parses a channel name and checks that `actor` may do `action` on it (a thread's membership is read
    /// from the store at every check: subscribe, resume and read; a publish's is checked by its append).
    public func authorize(_ actor: Actor, _ action: Action, _ name: String) async throws(ApiError) -> ChannelName {
        try await check(actor, action, name).channel
    }

    /// `authorize`, and for a member's stream of a thread the membership epoch read with the membership: the
    /// stream must end at any removal with a later epoch. Nil for streams no removal ends (topics, admins).
    private func check(_ actor: Actor, _ action: Action, _ name: String) async throws(ApiError) -> (channel: ChannelName, epoch: Int64?) {
        let channel = try ChannelName(parsing: name)
        if let resource = try resource(of: channel, for: actor, action) {
            try permit(actor, action, resource, channel)
            return (channel, nil)
        }
        guard case .thread(let id) = channel.kind else { preconditionFailure("only a member's thread needs a read") }
        let membership = try await store.membership(of: actor.sub, in: id)
        try permit(actor, action, .thread(id: id, isMember: membership.isMember), channel)
        return (channel, membership.epoch)
    }

    /// The resource `policy.can` decides on, when the configuration alone says what it is; nil for a thread
    /// whose membership must be read (a non-admin's).
    private func resource(of channel: ChannelName, for actor: Actor, _ action: Action) throws(ApiError) -> Resource? {
        switch channel.kind {
        case .topic(let topic): return .topic(name: topic)
        case .thread(let id) where actor.isAdmin: return .thread(id: id, isMember: true)
        case .thread: return nil
        case .user(let sub):
            // Written by the gateway only: no client publishes there, admins included.
            if action == .publish { throw ApiError(.forbidden, "user channels are written by the gateway", details: ["channel": channel.rawValue]) }
            return .userFeed(owner: sub)
        }
    }

    private func permit(_ actor: Actor, _ action: Action, _ resource: Resource, _ channel: ChannelName) throws(ApiError) {
        guard policy.can(actor, action, resource) else { throw ApiError.notAllowed(action, on: channel) }
    }

    /// A publish's permission, decided without a read: thrown when the configuration refuses it; true when it
    /// holds only if the sender is a member of the thread, which the store checks in the append's transaction
    /// (refused there with the same error). So a member's publish costs no read of its own, and a removal
    /// committed before the append always refuses it.
    private func publishPermit(_ actor: Actor, _ channel: ChannelName) throws(ApiError) -> Bool {
        if let resource = try resource(of: channel, for: actor, .publish) {
            try permit(actor, .publish, resource, channel)
            return false
        }
        guard case .thread(let id) = channel.kind else { preconditionFailure("only a member's thread needs a read") }
        if policy.can(actor, .publish, .thread(id: id, isMember: false)) { return false }
        try permit(actor, .publish, .thread(id: id, isMember: true), channel)
        return true
    }

    /// Where a stream (a subscription, an SSE stream, a long-poll) starts.
    public enum StreamStart: Sendable, Equatable {
        /// At the channel's head: live messages only.
        case live
        /// The last N messages first.
        case history(Int)
        /// Strictly after this cursor.
        case since(String)
    }

    /// The one way a stream opens, on every transport: the name parsed, `action` allowed through the policy, and
    /// the position the stream continues after (a cursor checked against the channel and its head), with the
    /// membership epoch the permission was read at (nil when no removal can end the stream).
    public func open(_ actor: Actor, _ action: Action, _ name: String, from start: StreamStart) async throws(ApiError) -> StreamOpening {
        let (channel, cursor) = try Self.parse(name, from: start)
        let epoch = try await check(actor, action, name).epoch
        let (head, floor) = try await store.bounds(of: channel)
        return try opening(channel, from: start, cursor: cursor, head: head, floor: floor, epoch: epoch)
    }

    /// `open` without waiting, when it needs no read: a channel whose permission comes from the configuration
    /// (a topic, a user's feed, an admin on a thread) and whose bounds the store knows in memory. Nil when it
    /// needs `open`. The same checks, in the same order, and the same errors.
    public func openKnown(_ actor: Actor, _ action: Action, _ name: String, from start: StreamStart) throws(ApiError) -> StreamOpening? {
        let (channel, cursor) = try Self.parse(name, from: start)
        guard let resource = try resource(of: channel, for: actor, action) else { return nil }
        try permit(actor, action, resource, channel)
        guard let (head, floor) = store.knownBounds(of: channel) else { return nil }
        return try opening(channel, from: start, cursor: cursor, head: head, floor: floor, epoch: nil)
    }

    private static func parse(_ name: String, from start: StreamStart) throws(ApiError) -> (ChannelName, Cursor?) {
        let channel = try ChannelName(parsing: name)
        var cursor: Cursor?
        if case .since(let text) = start { cursor = try Cursor(parsing: text, for: channel) }
        if case .history(let n) = start, !(0...Self.maxPageSize).contains(n) {
            throw ApiError(.badRequest, "history must be an integer in 0...\(Self.maxPageSize)")
        }
        return (channel, cursor)
    }

    private func opening(_ channel: ChannelName, from start: StreamStart, cursor: Cursor?, head: Int64, floor: Int64,
                         epoch: Int64?) throws(ApiError) -> StreamOpening {
        switch start {
        case .live: return StreamOpening(channel: channel, after: head, head: head, membershipEpoch: epoch)
        case .history(let n):
            // The last n the channel still keeps (retention may keep fewer).
            return StreamOpening(channel: channel, after: max(floor, head - Int64(n)), head: head, membershipEpoch: epoch)
        case .since:
            let after = try position(of: cursor, in: channel, head: head)
            guard after >= floor else { throw Retention.expired(channel, after: after, floor: floor) }
            return StreamOpening(channel: channel, after: after, head: head, membershipEpoch: epoch)
        }
    }

    public struct StreamOpening: Sendable, Equatable {
        public let channel: ChannelName
        /// The position the stream continues after.
        public let after: Int64
        /// The channel's newest message when the stream opened (read after the caller registered for live
        /// messages: with `after == head`, everything later reaches it live).
        public let head: Int64
        /// The thread's membership epoch when the permission was read; nil when no removal ends the stream.
        public let membershipEpoch: Int64?
    }

    /// Validates and commits a publish. `body` is the parsed JSON value of the request's `body`.
    public func publish(_ actor: Actor, to channelName: String, body: JSONValue?, requestId: String?) async throws(ApiError) -> AppendResult {
        let request = try appendRequest(actor, to: channelName, body: body, requestId: requestId)
        return try await withCheckedContinuation { waiter in commit(request) { waiter.resume(returning: $0) } }.get()
    }

    /// `publish` without waiting: the same checks in the same order, with the same errors (thrown), then the
    /// append goes to the store's group commit, which gives `answer` the outcome once the transaction committed
    /// — on the committing task's thread, or at once when the queue is full.
    public func publish(_ actor: Actor, to channelName: String, body: JSONValue?, requestId: String?,
                        then answer: @escaping @Sendable (Result<AppendResult, ApiError>) -> Void) throws(ApiError) {
        commit(try appendRequest(actor, to: channelName, body: body, requestId: requestId), then: answer)
    }

    /// Hands a checked request to the store's group commit; `answer` gets the outcome, timed and announced.
    private func commit(_ request: AppendRequest, then answer: @escaping @Sendable (Result<AppendResult, ApiError>) -> Void) {
        let started = ContinuousClock.now
        store.appends.append(request) { answer(self.appended($0, since: started)) }
    }

    /// A publish checked (the channel's name, the permission, the request id) and its body made canonical.
    private func appendRequest(_ actor: Actor, to channelName: String, body: JSONValue?, requestId: String?) throws(ApiError) -> AppendRequest {
        let channel = try ChannelName(parsing: channelName)
        let membersOnly = try publishPermit(actor, channel)
        if let requestId, requestId.isEmpty || requestId.utf8.count > Self.maxRequestIdLength {
            throw ApiError(.badRequest, "request id must be 1 to \(Self.maxRequestIdLength) bytes")
        }
        return AppendRequest(channel: channel, sender: actor.sub, requestId: requestId, body: try JSONText.canonicalBody(body, limit: bodyLimit),
                             senderMustBeMember: membersOnly)
    }

    /// After an append: its time recorded, and a thread's new message announced to the other members' feeds.
    private func appended(_ outcome: Result<AppendResult, ApiError>, since started: ContinuousClock.Instant) -> Result<AppendResult, ApiError> {
        appendTimer?.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
        if case .success(let result) = outcome, case .thread(let thread) = result.message.channel.kind, !result.replayed {
            feed?.messagePosted(in: thread, by: result.message.sender, message: result.message)
        }
        return outcome
    }

    /// Checks that `cursor` is not past the channel's head (a cursor the channel never gave out).
    public func position(of cursor: Cursor?, in channel: ChannelName, head: Int64) throws(ApiError) -> Int64 {
        guard let cursor else { return head }
        guard cursor.seq <= head else {
            throw ApiError(.invalidCursor, "cursor is past the end of the channel", details: ["channel": channel.rawValue])
        }
        return cursor.seq
    }

    public enum HistoryQuery: Sendable {
        case since(Cursor)
        case before(Cursor)
        case latest
    }

    public struct History: Sendable {
        public let messages: [Message]
        public let cursor: String
        public let hasMore: Bool
    }

    /// History reads (`GET …/messages`). The answer's cursor is the last message's, or, for an empty page,
    /// the position the query names (the channel's head for `latest`).
    public func history(_ channel: ChannelName, _ query: HistoryQuery, limit: Int) async throws(ApiError) -> History {
        switch query {
        case .since(let cursor):
            let page = try await page(in: channel, after: cursor.seq, limit: limit)
            if page.messages.isEmpty { _ = try position(of: cursor, in: channel, head: try await store.head(of: channel)) }
            return History(messages: page.messages, cursor: page.messages.last?.cursor ?? Cursor.text(channel: channel, seq: cursor.seq), hasMore: page.hasMore)
        case .before(let cursor):
            let head = try await store.head(of: channel)
            _ = try position(of: cursor, in: channel, head: head)
            let page = try await page(in: channel, before: cursor.seq, limit: limit)
            return History(messages: page.messages, cursor: page.messages.last?.cursor ?? Cursor.text(channel: channel, seq: cursor.seq), hasMore: page.hasMore)
        case .latest:
            let head = try await store.head(of: channel)
            let page = try await page(in: channel, before: head + 1, limit: limit)
            return History(messages: page.messages, cursor: Cursor.text(channel: channel, seq: head), hasMore: page.hasMore)
        }
    }
}

extension ApiError {
    /// `403 FORBIDDEN` for an action the policy refuses on a channel (a non-member's publish to a thread
    /// included, refused by the store's append).
    static func notAllowed(_ action: Action, on channel: ChannelName) -> ApiError {
        ApiError(.forbidden, "not allowed to \(action.rawValue) on \(channel.rawValue)", details: ["channel": channel.rawValue])
    }
}
