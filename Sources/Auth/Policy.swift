/// What an actor wants to do.
public enum Action: String, Sendable {
    case subscribe
    case publish
    /// History, long-poll and resume reads.
    case read
    /// Seeing a thread and its members.
    case view
    /// Moving one's own read cursor in a thread.
    case moveReadCursor = "move the read cursor"
    case addMember = "add a member"
    case removeMember = "remove a member"
    /// Ending a session's or a user's tokens (`POST /v1/sessions/revoke`).
    case revoke
}

/// What the action is done to, as far as the policy needs to know.
public enum Resource: Sendable {
    /// A chat thread (or its channel); `isMember` comes from the thread store.
    case thread(id: String, isMember: Bool)
    /// One member of a thread, for removal; `creator` is the thread's creator.
    case threadMember(thread: String, user: String, creator: String)
    case topic(name: String)
    /// The tokens of user `sub` (for a `sid`, its owner when known: nil for someone else's session).
    case sessions(sub: String?)
    /// The personal channel of `owner` (`user:<sub>`): its owner reads it; only the gateway writes it.
    case userFeed(owner: String)
}

/// Roles that may subscribe to and publish on a topic. `nil` means the default of PROTOCOL.md §1.
public struct TopicRule: Sendable, Equatable {
    public var subscribe: Set<String>?
    public var publish: Set<String>?
    /// Retention of the topic's history: at most this many messages, none older than this (nil: no limit).
    public var maxCount: Int?
    public var maxAge: Duration?

    public init(subscribe: Set<String>? = nil, publish: Set<String>? = nil, maxCount: Int? = nil, maxAge: Duration? = nil) {
        self.subscribe = subscribe
        self.publish = publish
        self.maxCount = maxCount
        self.maxAge = maxAge
    }
}

/// The one policy function every permission check goes through.
public struct Policy: Sendable {
    public static let defaultTopicPublishers: Set<String> = ["service", "admin"]
    public var topics: [String: TopicRule]

    public init(topics: [String: TopicRule] = [:]) {
        self.topics = topics
    }

    public func can(_ actor: Actor, _ action: Action, _ resource: Resource) -> Bool {
        if actor.isAdmin { return true }
        switch resource {
        case .thread(_, let isMember):
            switch action {
            case .subscribe, .publish, .read, .view, .moveReadCursor, .addMember: return isMember
            case .removeMember, .revoke: return false
            }
        case .threadMember(_, let user, let creator):
            return action == .removeMember && (actor.sub == user || actor.sub == creator)
        case .topic(let name):
            let rule = topics[name] ?? TopicRule()
            switch action {
            case .subscribe, .read:
                guard let roles = rule.subscribe else { return true }
                return !roles.isDisjoint(with: actor.roles)
            case .publish:
                return !(rule.publish ?? Self.defaultTopicPublishers).isDisjoint(with: actor.roles)
            default:
                return false
            }
        case .sessions(let sub):
            return action == .revoke && sub == actor.sub
        case .userFeed(let owner):
            return (action == .subscribe || action == .read) && owner == actor.sub
        }
    }
}

extension TopicRule {
    /// Topic rules from text, one topic per line: `alerts subscribe=ops,admin publish=service max_count=1000
    /// max_age=7d` (roles comma-separated; a missing side keeps the default; retention limits optional; `#`
    /// starts a comment). Used for `GATEWAY_TOPICS_FILE` and `GATEWAY_TOPICS` (where `;` also separates topics).
    public static func parse(_ text: String) throws -> [String: TopicRule] {
        var rules: [String: TopicRule] = [:]
        for rawLine in text.split(whereSeparator: { $0 == "\n" || $0 == ";" }) {
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let name = words.first else { continue }
            var rule = TopicRule()
            for word in words.dropFirst() {
                let kv = word.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard kv.count == 2 else { throw AuthConfigurationError(description: "topic rule \"\(line)\": expected key=roles") }
                let roles = Set(kv[1].split(separator: ",").map(String.init))
                switch kv[0] {
                case "subscribe": rule.subscribe = roles
                case "publish": rule.publish = roles
                case "max_count":
                    guard let n = Int(kv[1]), n > 0 else { throw AuthConfigurationError(description: "topic rule \"\(line)\": max_count must be a positive integer") }
                    rule.maxCount = n
                case "max_age":
                    guard let age = Self.duration(String(kv[1])) else {
                        throw AuthConfigurationError(description: "topic rule \"\(line)\": max_age must be a positive number of seconds, or with s, m, h or d")
                    }
                    rule.maxAge = age
                default: throw AuthConfigurationError(description: "topic rule \"\(line)\": unknown key \(kv[0])")
                }
            }
            rules[String(name)] = rule
        }
        return rules
    }

    /// `90`, `90s`, `15m`, `12h`, `7d` (positive, whole).
    public static func duration(_ text: String) -> Duration? {
        let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        var number = Substring(text)
        var unit: Int64 = 1
        if let last = text.last, let u = units[last] {
            unit = u
            number = number.dropLast()
        }
        guard let n = Int64(number), n > 0, n <= Int64.max / unit / 1_000_000_000 else { return nil }
        return .seconds(n * unit)
    }
}
