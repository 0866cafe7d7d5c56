import ChatDomain
import Foundation
import NIOConcurrencyHelpers
import Wire

/// Who is subscribed to each channel, cluster-wide, and the `join` / `leave` events of that list.
///
/// Each instance knows its own subscribers (`join` / `leave` from the sessions, WebSocket and SSE; a long-poll
/// is a read, not a presence) and broadcasts them on the bus as a snapshot — at once (at the next tick) when
/// they changed, and every `heartbeat` anyway. Every instance keeps the last snapshot of every other one
/// until it is `ttl` old: an instance that dies (kill -9, a partition) stops refreshing its entries, and they
/// expire everywhere else, which is its members' `leave`. The list is the union of all of them (connections
/// summed, the earliest `joined_at`), so every instance answers the same once snapshots have travelled.
/// Events are computed per tick for channels that have watchers, so a burst of joins is one event.
final class Presence: Sendable {
    struct Member: Sendable, Equatable {
        var connections: Int
        var joinedAt: Int64
    }

    struct Settings: Sendable {
        var tick: Duration = .milliseconds(250)
        var heartbeat: Duration = .seconds(2)
        var ttl: Duration = .seconds(6)
        /// Members per channel in a snapshot, an answer or one event; past it only the count is kept.
        var limit = 1000
    }

    private struct Remote {
        var channels: [String: [String: Member]]
        var totals: [String: Int]
        var expiresAt: ContinuousClock.Instant
    }

    private struct State {
        var local: [String: [String: Member]] = [:]
        var remote: [String: Remote] = [:]
        var watchers: [String: [ObjectIdentifier: WeakWatcher]] = [:]
        /// The list last announced to a channel's watchers.
        var shown: [String: Set<String>] = [:]
        var changed = false
        var lastBroadcast: ContinuousClock.Instant?
    }

    /// This process on the bus (not the configured instance name, which may repeat across hosts).
    let instance = UUID().uuidString.lowercased()
    let settings: Settings
    private let state = NIOLockedValueBox(State())
    private let broadcast: @Sendable (String) -> Void
    private let counters: Counters

    init(settings: Settings = .init(), counters: Counters, broadcast: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.counters = counters
        self.broadcast = broadcast
    }

    // MARK: this instance's subscribers

    func join(_ channel: ChannelName, user: String) {
        state.withLockedValue { state in
            state.local[channel.rawValue, default: [:]][user, default: Member(connections: 0, joinedAt: Timestamp.nowMicros())].connections += 1
            state.changed = true
        }
    }

    func leave(_ channel: ChannelName, user: String) {
        state.withLockedValue { state in
            guard var member = state.local[channel.rawValue]?[user] else { return }
            member.connections -= 1
            state.local[channel.rawValue]?[user] = member.connections > 0 ? member : nil
            if state.local[channel.rawValue]?.isEmpty == true { state.local[channel.rawValue] = nil }
            state.changed = true
        }
    }

    func watch(_ channel: ChannelName, _ watcher: any PresenceWatcher) {
        let now = ContinuousClock.now
        state.withLockedValue { state in
            if state.watchers[channel.rawValue] == nil {
                state.shown[channel.rawValue] = Set(Self.merged(state, channel.rawValue, now: now).members.keys)
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
            }
        }
    }

    // MARK: the list

    /// The channel's members (at most `settings.limit`, earliest first) and how many there are.
    func members(of channel: ChannelName) -> (members: [(user: String, member: Member)], total: Int) {
        let now = ContinuousClock.now
        let merged = state.withLockedValue { Self.merged($0, channel.rawValue, now: now) }
        let sorted = merged.members.sorted { ($0.value.joinedAt, $0.key) < ($1.value.joinedAt, $1.key) }.prefix(settings.limit)
        return (sorted.map { ($0.key, $0.value) }, max(merged.total, merged.members.count))
    }

    /// `{"channel", "members": [{"user","connections","joined_at"}], "count", "truncated"}` (the REST answer and,
    /// with `type` and `id`, the WebSocket reply).
    func json(of channel: ChannelName, reply: Bool = false, id: CommandID? = nil) -> String {
        let (members, total) = members(of: channel)
        var out = "{"
        if reply { out += "\"type\":\"presence\"," + Self.idField(id) }
        out += "\"channel\":\(JSONText.quoted(channel.rawValue)),\"count\":\(total),\"members\":["
        out += members.map(Self.memberJSON).joined(separator: ",")
        return out + "],\"truncated\":\(members.count < total)}"
    }

    private static func idField(_ id: CommandID?) -> String {
        switch id {
        case .string(let s): "\"id\":\(JSONText.quoted(s)),"
        case .integer(let n): "\"id\":\(n),"
        case .number(let n): "\"id\":\(n),"
        case nil: ""
        }
    }

    private static func memberJSON(_ entry: (user: String, member: Member)) -> String {
        "{\"connections\":\(entry.member.connections),\"joined_at\":\"\(Timestamp.iso8601(micros: entry.member.joinedAt))\",\"user\":\(JSONText.quoted(entry.user))}"
    }

    /// Local and unexpired remote entries of one channel, summed per user.
    private static func merged(_ state: State, _ channel: String, now: ContinuousClock.Instant) -> (members: [String: Member], total: Int) {
        var out = state.local[channel] ?? [:]
        var extra = 0
        for remote in state.remote.values where remote.expiresAt > now {
            guard let entries = remote.channels[channel] else { continue }
            extra += max(0, (remote.totals[channel] ?? entries.count) - entries.count)
            for (user, member) in entries {
                if var known = out[user] {
                    known.connections += member.connections
                    known.joinedAt = min(known.joinedAt, member.joinedAt)
                    out[user] = known
                } else {
                    out[user] = member
                }
            }
        }
        return (out, out.count + extra)
    }

    // MARK: the bus

    /// Another instance's snapshot (this one's own are ignored).
    func received(_ object: [String: Any]) {
        guard let from = object["instance"] as? String, from != instance, let channels = object["channels"] as? [String: Any] else { return }
        var entries: [String: [String: Member]] = [:]
        var totals: [String: Int] = [:]
        for (channel, value) in channels {
            guard let value = value as? [String: Any], let list = value["m"] as? [[Any]] else { continue }
            var members: [String: Member] = [:]
            for item in list.prefix(settings.limit) where item.count == 3 {
                guard let user = item[0] as? String, let count = (item[1] as? NSNumber)?.intValue, let joined = (item[2] as? NSNumber)?.int64Value else { continue }
                members[user] = Member(connections: count, joinedAt: joined)
            }
            entries[channel] = members
            totals[channel] = (value["n"] as? NSNumber)?.intValue ?? members.count
        }
        let expires = ContinuousClock.now.advanced(by: settings.ttl)
        state.withLockedValue { $0.remote[from] = Remote(channels: entries, totals: totals, expiresAt: expires) }
    }

    /// Every `settings.tick`: expired instances dropped, events for watched channels, a snapshot when this
    /// instance's list changed or a heartbeat is due.
    func tick(now: ContinuousClock.Instant = .now) {
        var events: [(watchers: [any PresenceWatcher], channel: String, text: String)] = []
        var snapshot: String?
        state.withLockedValue { state in
            state.remote = state.remote.filter { $0.value.expiresAt > now }
            for (channel, watchers) in state.watchers {
                let current = Self.merged(state, channel, now: now).members
                let before = state.shown[channel] ?? []
                let joined = current.filter { !before.contains($0.key) }.sorted { ($0.value.joinedAt, $0.key) < ($1.value.joinedAt, $1.key) }
                let left = before.subtracting(current.keys).sorted()
                guard !joined.isEmpty || !left.isEmpty else { continue }
                state.shown[channel] = Set(current.keys)
                let alive = watchers.values.compactMap(\.watcher)
                if !joined.isEmpty {
                    let list = joined.prefix(settings.limit).map { Self.memberJSON(($0.key, $0.value)) }.joined(separator: ",")
                    events.append((alive, channel, "{\"type\":\"join\",\"channel\":\(JSONText.quoted(channel)),\"members\":[\(list)],\"count\":\(joined.count)}"))
                }
                if !left.isEmpty {
                    let list = left.prefix(settings.limit).map { "{\"user\":\(JSONText.quoted($0))}" }.joined(separator: ",")
                    events.append((alive, channel, "{\"type\":\"leave\",\"channel\":\(JSONText.quoted(channel)),\"members\":[\(list)],\"count\":\(left.count)}"))
                }
            }
            let due = state.lastBroadcast.map { now - $0 >= settings.heartbeat } ?? true
            if state.changed || due {
                state.changed = false
                state.lastBroadcast = now
                snapshot = snapshotJSON(state.local)
            }
        }
        for event in events {
            guard let channel = try? ChannelName(parsing: event.channel) else { continue }
            for watcher in event.watchers { watcher.presenceEvent(channel, event.text) }
            counters.add("presence_events", event.watchers.count)
        }
        if let snapshot {
            counters.add("presence_snapshots")
            counters.add("presence_snapshot_bytes", snapshot.utf8.count)
            broadcast(snapshot)
        }
    }

    private func snapshotJSON(_ local: [String: [String: Member]]) -> String {
        var out = "{\"type\":\"presence\",\"instance\":\"\(instance)\",\"channels\":{"
        out += local.map { channel, members in
            let list = members.sorted { ($0.value.joinedAt, $0.key) < ($1.value.joinedAt, $1.key) }.prefix(settings.limit)
                .map { "[\(JSONText.quoted($0.key)),\($0.value.connections),\($0.value.joinedAt)]" }.joined(separator: ",")
            return "\(JSONText.quoted(channel)):{\"n\":\(members.count),\"m\":[\(list)]}"
        }.joined(separator: ",")
        return out + "}}"
    }
}

/// A session that asked for a channel's `join` / `leave` events.
protocol PresenceWatcher: AnyObject, Sendable {
    func presenceEvent(_ channel: ChannelName, _ text: String)
}

struct WeakWatcher: @unchecked Sendable {  // a weak reference, read under Presence's lock
    weak var watcher: (any PresenceWatcher)?
    init(_ watcher: any PresenceWatcher) { self.watcher = watcher }
}
