import Auth
import ChatDomain
import Foundation

/// Revocations and member removals travel to every instance over the bus as small JSON objects.
enum ControlEvent: Equatable {
    case revoked(Revocation)
    case memberRemoved(MemberRemoval)

    var json: String {
        switch self {
        case .revoked(let r):
            return "{\"type\":\"revoked\",\"kind\":\"\(r.kind.rawValue)\",\"value\":\(JSONText.quoted(r.value)),\"at\":\(r.at),\"until\":\(r.until)}"
        case .memberRemoved(let r):
            return "{\"type\":\"member_removed\",\"id\":\(JSONText.quoted(r.id)),\"thread\":\(JSONText.quoted(r.thread)),\"user\":\(JSONText.quoted(r.user)),\"head\":\(r.head),\"at\":\(r.atMicros)}"
        }
    }

    init?(json text: String) {
        guard let object = try? JSONText.parseObject(text.utf8) else { return nil }
        switch object["type"] as? String {
        case "revoked":
            guard let kind = (object["kind"] as? String).flatMap(Revocation.Kind.init(rawValue:)), let value = object["value"] as? String,
                  let at = (object["at"] as? NSNumber)?.int64Value, let until = (object["until"] as? NSNumber)?.int64Value else { return nil }
            self = .revoked(Revocation(kind: kind, value: value, at: at, until: until))
        case "member_removed":
            guard let id = object["id"] as? String, let thread = object["thread"] as? String, ChannelName.isUUID(thread),
                  let user = object["user"] as? String, let head = (object["head"] as? NSNumber)?.int64Value,
                  let at = (object["at"] as? NSNumber)?.int64Value else { return nil }
            self = .memberRemoved(MemberRemoval(id: id, thread: thread, user: user, head: head, atMicros: at))
        default:
            return nil
        }
    }
}

extension GatewayApp {
    /// An event from any instance (this one included): act on the live streams it concerns.
    func handleControl(_ payload: String) {
        if payload.hasPrefix("{\"type\":\"presence_changed\"") || payload.hasPrefix("{\"type\":\"typing\"") {
            guard let object = try? JSONText.parseObject(payload.utf8) else { return }
            if object["type"] as? String == "presence_changed" { return presence.received(object) }
            guard let user = object["user"] as? String, let name = object["channel"] as? String, let channel = try? ChannelName(parsing: name) else { return }
            metrics.count(.typingReceived)
            for session in channelSessions.of(channel) { session.typing(channel, user: user, payload) }
            return
        }
        guard let event = ControlEvent(json: payload) else {
            logger.warning("ignoring a malformed control event")
            return
        }
        switch event {
        case .revoked(let revocation):
            apply([revocation])
        case .memberRemoved(let removal):
            apply([removal])
        }
    }

    /// A `typing` command: a member of the thread (the publish permission), at most one relay per user and
    /// thread each `typingInterval`; relayed to every instance (this one included), which hands it to the
    /// thread's other subscribers. Never stored.
    func relayTyping(_ actor: Actor, in name: String) async throws(ApiError) {
        guard case .thread = try ChannelName(parsing: name).kind else { throw ApiError(.badRequest, "typing is for thread channels") }
        let channel = try await channels.authorize(actor, .publish, name)
        let key = actor.sub + "\u{1F}" + channel.rawValue
        let now = ContinuousClock.now
        let interval = config.typingInterval
        let relay = typingRelayed.withLockedValue { last -> Bool in
            if let previous = last[key], now - previous < interval { return false }
            if last.count >= 100_000 { last = last.filter { now - $0.value < interval } }
            last[key] = now
            return true
        }
        guard relay else {
            metrics.count(.typingThrottled)
            return
        }
        bus.publishControl("{\"type\":\"typing\",\"channel\":\(JSONText.quoted(channel.rawValue)),\"user\":\(JSONText.quoted(actor.sub))}")
    }

    /// Ends the live streams of removed members (each removal once, whether it came by bus or store).
    func apply(_ removals: [MemberRemoval]) {
        let now = Timestamp.nowMicros()
        let fresh = appliedRemovals.withLockedValue { seen in
            seen = seen.filter { now - $0.value.atMicros < Self.removalMemory }
            return removals.filter { seen.updateValue($0, forKey: $0.id) == nil }
        }
        for removal in fresh {
            let channel = ChannelName(thread: removal.thread)
            for stream in streams.all() { stream.memberRemoved(removal.user, from: channel, at: removal.head) }
        }
    }

    /// Removals are re-read this far back (covers clock skew between instances and the refresh period).
    static let removalLookback: Int64 = 30_000_000
    /// Applied removal ids are remembered longer than the look-back, so none is applied twice.
    static let removalMemory: Int64 = 120_000_000

    /// Reads recent member removals from the store (for those the bus lost).
    func refreshRemovals() async throws(ApiError) {
        apply(try await store.memberRemovals(since: Timestamp.nowMicros() - Self.removalLookback))
    }

    /// Records revocations and closes the live streams they cover.
    func apply(_ list: [Revocation]) {
        let fresh = revocations.apply(list)
        for revocation in fresh {
            metrics.count(.revocations)
            for stream in streams.all() { stream.revoke(revocation) }
        }
    }

    /// Reads the revocations in force from the store (at start and periodically).
    func refreshRevocations() async throws(ApiError) {
        let now = Int64(Date().timeIntervalSince1970)
        revocations.prune(now: now)
        apply(try await store.revocations(now: now))
    }

    /// `POST /v1/sessions/revoke`: `{"sid"}` (one's own session, or an admin) or `{"sub"}` (oneself, or an
    /// admin). Stored first, then broadcast; answers once stored.
    func revoke(_ actor: Actor, _ object: [String: Any]) async throws(ApiError) -> Revocation {
        let kind: Revocation.Kind
        let value: String
        switch (object["sid"], object["sub"]) {
        case (let sid as String, nil) where !sid.isEmpty && sid.utf8.count <= 200:
            (kind, value) = (.sid, sid)
        case (nil, let sub as String) where !sub.isEmpty && sub.utf8.count <= 200:
            (kind, value) = (.sub, sub)
        default:
            throw ApiError(.badRequest, "give either sid or sub (a string of 1 to 200 bytes)")
        }
        let owner: String? = kind == .sub ? value : (actor.sid == value ? actor.sub : nil)
        guard channels.policy.can(actor, .revoke, .sessions(sub: owner)) else {
            throw ApiError(.forbidden, "only an admin may revoke another user's \(kind.rawValue)")
        }
        let now = Int64(Date().timeIntervalSince1970)
        let retention = config.revocationRetention.components.seconds
        let revocation = Revocation(kind: kind, value: value, at: now, until: now + retention)
        try await store.revoke(revocation)
        bus.publishControl(ControlEvent.revoked(revocation).json)
        return revocation
    }

    /// Removes a member and tells every instance, so that the user's live subscriptions to the thread end.
    func removeMember(_ actor: Actor, thread: String, user: String) async throws(ApiError) {
        let removal = try await threads.removeMember(actor, thread: thread, user: user)
        bus.publishControl(ControlEvent.memberRemoved(removal).json)
    }
}
