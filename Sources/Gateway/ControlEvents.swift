import Auth
import ChatDomain
import Foundation

/// Revocations and member removals travel to every instance over the bus as small JSON objects.
enum ControlEvent: Equatable {
    case revoked(Revocation)
    case memberRemoved(thread: String, user: String, head: Int64)

    var json: String {
        switch self {
        case .revoked(let r):
            return "{\"type\":\"revoked\",\"kind\":\"\(r.kind.rawValue)\",\"value\":\(JSONText.quoted(r.value)),\"at\":\(r.at),\"until\":\(r.until)}"
        case .memberRemoved(let thread, let user, let head):
            return "{\"type\":\"member_removed\",\"thread\":\(JSONText.quoted(thread)),\"user\":\(JSONText.quoted(user)),\"head\":\(head)}"
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
            guard let thread = object["thread"] as? String, ChannelName.isUUID(thread), let user = object["user"] as? String,
                  let head = (object["head"] as? NSNumber)?.int64Value else { return nil }
            self = .memberRemoved(thread: thread, user: user, head: head)
        default:
            return nil
        }
    }
}

extension GatewayApp {
    /// An event from any instance (this one included): act on the live streams it concerns.
    func handleControl(_ payload: String) {
        guard let event = ControlEvent(json: payload) else {
            logger.warning("ignoring a malformed control event")
            return
        }
        switch event {
        case .revoked(let revocation):
            apply([revocation])
        case .memberRemoved(let thread, let user, let head):
            let channel = ChannelName(thread: thread)
            for stream in streams.all() { stream.memberRemoved(user, from: channel, at: head) }
        }
    }

    /// Records revocations and closes the live streams they cover.
    func apply(_ list: [Revocation]) {
        let fresh = revocations.apply(list)
        for revocation in fresh {
            counters.add("revocations")
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
        guard let head = try await threads.removeMember(actor, thread: thread, user: user) else { return }
        bus.publishControl(ControlEvent.memberRemoved(thread: thread.lowercased(), user: user, head: head).json)
    }
}
