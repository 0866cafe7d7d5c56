import ChatDomain
import Fanout
import Foundation
import NIOConcurrencyHelpers
import Wire

/// Who is subscribed to each channel, cluster-wide, and the `join` / `leave` events of that list.
///
/// Each instance counts its own subscribers (`join` / `leave` from the sessions, WebSocket and SSE; a long-poll
/// is a read, not a presence). Embedded, that is the list. In a cluster each instance writes its entries to
/// Redis (`PresenceLists`), each with an expiry `ttl` ahead, rewritten every `heartbeat`; an instance that
/// dies stops rewriting, its entries expire, and that is its members' `leave` everywhere. Readers merge the
/// unexpired entries (connections summed, the earliest `joined_at`), so every instance answers the same.
/// Events are computed once per tick for channels that have watchers: a burst of joins is one event. A
/// channel is read again when an instance says (on the bus) that its entries there changed, and every
/// heartbeat (to see expiries).
final class Presence: Sendable {
    struct Member: Sendable, Equatable {
        var connections: Int
        var joinedAt: Int64
    }

    struct Settings: Sendable {
        var tick: Duration = .milliseconds(250)
        var heartbeat: Duration = .seconds(2)
        var ttl: Duration = .seconds(6)
        /// Members per channel in an answer or one event; past it only the count is given.
        var limit = 1000
    }

    private struct State {
        var local: [String: [String: Member]] = [:]
        var watchers: [String: [ObjectIdentifier: WeakWatcher]] = [:]
        /// The list last announced to a channel's watchers.
        var shown: [String: Set<String>] = [:]
        /// The list last read for a watched channel.
        var known: [String: Set<String>] = [:]
        /// Channels whose local entries changed since they were last written, with the users who changed
        /// (users who left altogether: `gone`).
        var changed: [String: Set<String>] = [:]
        var gone: [String: Set<String>] = [:]
        /// Channels another instance said changed.
        var notified: Set<String> = []
        var lastHeartbeat: ContinuousClock.Instant?
        var ticking = false
    }

    /// This process in the lists (not the configured instance name, which may repeat across hosts).
    let instance = UUID().uuidString.lowercased()
    let settings: Settings
    private let state = NIOLockedValueBox(State())
    private let lists: (any PresenceLists)?
    private let notify: @Sendable (String) -> Void
    private let metrics: GatewayMetrics

    /// `lists`: the cluster's store (nil: embedded, this instance's entries are the list); `notify`: hands a
    /// control event to every instance.
    init(settings: Settings = .init(), lists: (any PresenceLists)?, metrics: GatewayMetrics, notify: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.lists = lists
        self.metrics = metrics
        self.notify = notify
    }

    // MARK: this instance's subscribers

    func join(_ channel: ChannelName, user: String) {
        state.withLockedValue { state in
            state.local[channel.rawValue, default: [:]][user, default: Member(connections: 0, joinedAt: Timestamp.nowMicros())].connections += 1
            state.gone[channel.rawValue]?.remove(user)
            state.changed[channel.rawValue, default: []].insert(user)
        }
    }

    func leave(_ channel: ChannelName, user: String) {
        state.withLockedValue { state in
            guard var member = state.local[channel.rawValue]?[user] else { return }
            member.connections -= 1
            if member.connections > 0 {
                state.local[channel.rawValue]?[user] = member
            } else {
                state.local[channel.rawValue]?[user] = nil
                state.gone[channel.rawValue, default: []].insert(user)
                if state.local[channel.rawValue]?.isEmpty == true { state.local[channel.rawValue] = nil }
            }
            state.changed[channel.rawValue, default: []].insert(user)
        }
    }

    /// `watcher` gets the channel's events from the next change on: the list it starts with — what this
    /// instance knows now: its own entries and the list it last read — is not announced.
    func watch(_ channel: ChannelName, _ watcher: any PresenceWatcher) {
        state.withLockedValue { state in
            if state.watchers[channel.rawValue] == nil {
                let local = state.local[channel.rawValue].map { Set($0.keys) } ?? []
                state.shown[channel.rawValue] = local.union(state.known[channel.rawValue] ?? [])
            }
            state.watchers[channel.rawValue, default: [:]][ObjectIdentifier(watcher)] = WeakWatcher(watcher)
        }
    }

    func unwatch(_ channel: ChannelName, _ watcher: any PresenceWatcher) {
        state.withLockedValue { state in
            state.watchers[channel.rawValue]?[ObjectIdentifier(watcher)] = nil
            if state.watchers[channel.rawValue]?.isEmpty == true {
                state.watchers[channel.rawValue] = nil
                state.shown[channel.rawValue] = nil
                state.known[channel.rawValue] = nil
            }
        }
    }

    // MARK: the list

    /// Every member of the channel (cluster-wide), unsorted.
    func read(_ channel: String) async throws(ApiError) -> [String: Member] {
        guard let lists else { return state.withLockedValue { $0.local[channel] ?? [:] } }
        metrics.count(.presenceReads)
        do {
            return try await lists.read(channel, nowMillis: Self.nowMillis())
        } catch {
            throw ApiError(.storeUnavailable, "the presence list cannot be read now (Redis)")
        }
    }

    /// `{"channel", "count", "members": [{"user","connections","joined_at"}], "truncated"}`, earliest first, at
    /// most `settings.limit` members (the REST answer and, with `type` and `id`, the WebSocket reply).
    func json(of channel: ChannelName, reply: Bool = false, id: CommandID? = nil) async throws(ApiError) -> String {
        let all = try await read(channel.rawValue)
        let members = all.sorted { ($0.value.joinedAt, $0.key) < ($1.value.joinedAt, $1.key) }.prefix(settings.limit)
        var out = "{"
        if reply { out += "\"type\":\"presence\"," + (id.map { "\"id\":\($0.json)," } ?? "") }
        out += "\"channel\":\(JSONText.quoted(channel.rawValue)),\"count\":\(all.count),\"members\":["
        out += members.map { Self.memberJSON($0.key, $0.value) }.joined(separator: ",")
        return out + "],\"truncated\":\(members.count < all.count)}"
    }

    private static func memberJSON(_ user: String, _ member: Member) -> String {
        "{\"connections\":\(member.connections),\"joined_at\":\"\(Timestamp.iso8601(micros: member.joinedAt))\",\"user\":\(JSONText.quoted(user))}"
    }

    static func nowMillis() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    // MARK: the cluster

    /// Another instance's `{"type":"presence_changed","instance","channels":[…]}`.
    func received(_ object: [String: Any]) {
        guard object["instance"] as? String != instance, let channels = object["channels"] as? [String] else { return }
        state.withLockedValue { $0.notified.formUnion(channels) }
    }

    /// Every `settings.tick`: this instance's changed entries written (all of them every heartbeat), the
    /// others told, and watched channels read again where something may have changed, their events sent.
    func tick(now: ContinuousClock.Instant = .now) async {
        let plan = state.withLockedValue { state -> (write: [String: [String: Member]], gone: [String: Set<String>], changed: Set<String>, read: Set<String>)? in
            guard !state.ticking else { return nil }
            state.ticking = true
            let heartbeat = state.lastHeartbeat.map { now - $0 >= settings.heartbeat } ?? true
            if heartbeat { state.lastHeartbeat = now }
            let changed = Set(state.changed.keys)
            // Every entry at a heartbeat (their expiry moves on); otherwise only the users who changed.
            var write = state.local
            if !heartbeat {
                write = [:]
                for (channel, users) in state.changed {
                    guard let members = state.local[channel] else { continue }
                    let touched = members.filter { users.contains($0.key) }
                    if !touched.isEmpty { write[channel] = touched }
                }
            }
            let gone = state.gone
            state.changed = [:]
            state.gone = [:]
            let watched = Set(state.watchers.keys)
            let read = heartbeat ? watched : watched.intersection(changed.union(state.notified))
            state.notified = []
            return (write, gone, changed, read)
        }
        guard let plan else { return }
        defer { state.withLockedValue { $0.ticking = false } }
        if let lists, !(plan.write.isEmpty && plan.gone.isEmpty) {
            do {
                let bytes = try await lists.write(plan.write, gone: plan.gone, instance: instance,
                                                  expiresAtMillis: Self.nowMillis() + settings.ttl.milliseconds)
                metrics.count(.presenceWrites)
                metrics.count(.presenceWriteBytes, bytes)
            } catch {
                // Written again at the next heartbeat (all of this instance's entries are).
                state.withLockedValue { state in
                    for channel in plan.changed { state.changed[channel, default: []].formUnion(plan.write[channel].map { Set($0.keys) } ?? []) }
                    for (channel, users) in plan.gone { state.gone[channel, default: []].formUnion(users.filter { state.local[channel]?[$0] == nil }) }
                }
            }
            if !plan.changed.isEmpty {
                notify("{\"type\":\"presence_changed\",\"instance\":\"\(instance)\",\"channels\":[\(plan.changed.sorted().map(JSONText.quoted).joined(separator: ","))]}")
            }
        }
        for channel in plan.read {
            guard let current = try? await read(channel) else { continue }
            announce(channel, current)
        }
    }

    /// Compares the channel's list with the one its watchers last heard of, and tells them what changed.
    private func announce(_ channel: String, _ current: [String: Member]) {
        let change = state.withLockedValue { state -> (watchers: [any PresenceWatcher], joined: [(String, Member)], left: [String])? in
            guard let watchers = state.watchers[channel] else { return nil }
            state.known[channel] = Set(current.keys)
            let before = state.shown[channel] ?? []
            let joined = current.filter { !before.contains($0.key) }.sorted { ($0.value.joinedAt, $0.key) < ($1.value.joinedAt, $1.key) }.map { ($0.key, $0.value) }
            let left = before.subtracting(current.keys).sorted()
            guard !joined.isEmpty || !left.isEmpty else { return nil }
            state.shown[channel] = Set(current.keys)
            return (watchers.values.compactMap(\.watcher), joined, left)
        }
        guard let change, let name = try? ChannelName(parsing: channel) else { return }
        var events: [String] = []
        if !change.joined.isEmpty {
            let list = change.joined.prefix(settings.limit).map { Self.memberJSON($0.0, $0.1) }.joined(separator: ",")
            events.append("{\"type\":\"join\",\"channel\":\(JSONText.quoted(channel)),\"members\":[\(list)],\"count\":\(change.joined.count)}")
        }
        if !change.left.isEmpty {
            let list = change.left.prefix(settings.limit).map { "{\"user\":\(JSONText.quoted($0))}" }.joined(separator: ",")
            events.append("{\"type\":\"leave\",\"channel\":\(JSONText.quoted(channel)),\"members\":[\(list)],\"count\":\(change.left.count)}")
        }
        for event in events {
            for watcher in change.watchers { watcher.presenceEvent(name, event) }
            metrics.count(.presenceEvents, change.watchers.count)
        }
    }
}

/// Where a cluster's presence entries live (Redis).
protocol PresenceLists: Sendable {
    /// Writes this instance's entries of these channels (each expiring at `expiresAtMillis`) and removes the
    /// ones in `gone`; returns the bytes sent.
    func write(_ entries: [String: [String: Presence.Member]], gone: [String: Set<String>], instance: String, expiresAtMillis: Int64) async throws -> Int
    /// Every unexpired entry of the channel over all instances, summed per user.
    func read(_ channel: String, nowMillis: Int64) async throws -> [String: Presence.Member]
}

/// Presence entries in Redis: one hash per channel, `gw:presence:<channel>`, a field per instance and user
/// (`<instance>\u{1F}<user>`) holding `<connections> <joined_at µs> <expires_at ms>`. Expired fields are
/// skipped by readers, which also delete them; the key itself expires when nobody rewrites it.
struct RedisPresenceLists: PresenceLists {
    static let prefix = "gw:presence:"
    let redis: RedisCommands
    let ttlMillis: Int64

    func write(_ entries: [String: [String: Presence.Member]], gone: [String: Set<String>], instance: String, expiresAtMillis: Int64) async throws -> Int {
        var commands: [[[UInt8]]] = []
        for (channel, members) in entries where !members.isEmpty {
            let key = Array((Self.prefix + channel).utf8)
            var hset: [[UInt8]] = [Array("HSET".utf8), key]
            for (user, member) in members {
                hset.append(Array((instance + "\u{1F}" + user).utf8))
                hset.append(Array("\(member.connections) \(member.joinedAt) \(expiresAtMillis)".utf8))
            }
            commands.append(hset)
            commands.append([Array("PEXPIRE".utf8), key, Array(String(ttlMillis * 10).utf8)])
        }
        for (channel, users) in gone where !users.isEmpty {
            commands.append([Array("HDEL".utf8), Array((Self.prefix + channel).utf8)] + users.map { Array((instance + "\u{1F}" + $0).utf8) })
        }
        let bytes = commands.reduce(0) { $0 + $1.reduce(0) { $0 + $1.count + 16 } }
        let replies = try await redis.run(commands)
        if let failed = replies.first(where: { if case .error = $0 { true } else { false } }) { throw RedisReplyError(reply: failed) }
        return bytes
    }

    func read(_ channel: String, nowMillis: Int64) async throws -> [String: Presence.Member] {
        let key = Array((Self.prefix + channel).utf8)
        let reply = try await redis.run([[Array("HGETALL".utf8), key]]).first
        guard case .array(let items)? = reply else {
            if case .error = reply { throw RedisReplyError(reply: reply ?? .null) }
            return [:]
        }
        var out: [String: Presence.Member] = [:]
        var expired: [[UInt8]] = []
        var i = 0
        while i + 1 < items.count {
            defer { i += 2 }
            guard case .string(let fieldBuffer) = items[i], case .string(let valueBuffer) = items[i + 1] else { continue }
            let field = String(buffer: fieldBuffer)
            let parts = String(buffer: valueBuffer).split(separator: " ")
            guard let user = field.split(separator: "\u{1F}", maxSplits: 1).last.map(String.init), parts.count == 3,
                  let connections = Int(parts[0]), let joinedAt = Int64(parts[1]), let expires = Int64(parts[2]) else { continue }
            guard expires > nowMillis else {
                expired.append(Array(field.utf8))
                continue
            }
            if var known = out[user] {
                known.connections += connections
                known.joinedAt = min(known.joinedAt, joinedAt)
                out[user] = known
            } else {
                out[user] = Presence.Member(connections: connections, joinedAt: joinedAt)
            }
        }
        if !expired.isEmpty { _ = try? await redis.run([[Array("HDEL".utf8), key] + expired]) }
        return out
    }
}

struct RedisReplyError: Error, CustomStringConvertible {
    let reply: RESPValue
    var description: String { "redis answered \(reply)" }
}

/// A session that asked for a channel's `join` / `leave` events.
protocol PresenceWatcher: AnyObject, Sendable {
    func presenceEvent(_ channel: ChannelName, _ text: String)
}

struct WeakWatcher: @unchecked Sendable {  // a weak reference, read under Presence's lock
    weak var watcher: (any PresenceWatcher)?
    init(_ watcher: any PresenceWatcher) { self.watcher = watcher }
}
