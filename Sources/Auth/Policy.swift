/// What an actor wants to do.
public enum Action: String, Sendable {
    case subscribe
    case publish
    /// History, long-poll and resume reads.
    case read
}

/// What the action is done to, as far as the policy needs to know.
public enum Resource: Sendable {
    /// A chat thread's channel; `isMember` comes from the thread store.
    case thread(id: String, isMember: Bool)
    case topic(name: String)
}

/// Roles that may subscribe to and publish on a topic. `nil` means the default of PROTOCOL.md §1.
public struct TopicRule: Sendable, Equatable {
    public var subscribe: Set<String>?
    public var publish: Set<String>?

    public init(subscribe: Set<String>? = nil, publish: Set<String>? = nil) {
        self.subscribe = subscribe
        self.publish = publish
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
            return isMember
        case .topic(let name):
            let rule = topics[name] ?? TopicRule()
            switch action {
            case .subscribe, .read:
                guard let roles = rule.subscribe else { return true }
                return !roles.isDisjoint(with: actor.roles)
            case .publish:
                return !(rule.publish ?? Self.defaultTopicPublishers).isDisjoint(with: actor.roles)
            }
        }
    }
}
