/// A validated channel name: `thread:<uuid>` (stored lowercase) or `topic:<name>` with `[a-z0-9._-]{1,64}`.
public struct ChannelName: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        case thread(id: String)
        case topic(name: String)
        /// A user's personal channel `user:<sub>`: thread additions, removals and unread counts, written by the
        /// gateway only.
        case user(sub: String)
    }

    public let rawValue: String
    public let kind: Kind
    /// FNV-1a of `rawValue`, the second half of every cursor of the channel (computed once, not per message).
    public var cursorHash: UInt64 { _cursorHash }
    private var _cursorHash: UInt64 = 0

    public static func == (a: ChannelName, b: ChannelName) -> Bool { a.rawValue == b.rawValue }
    public func hash(into hasher: inout Hasher) { hasher.combine(rawValue) }

    public var description: String { rawValue }

    public var isThread: Bool {
        if case .thread = kind { return true }
        return false
    }

    public init(parsing text: String) throws(ApiError) {
        if text.hasPrefix("thread:") {
            let id = String(text.dropFirst("thread:".count)).lowercased()
            guard ChannelName.isUUID(id) else {
                throw ApiError(.invalidChannel, "thread channel must be thread:<uuid>", details: ["channel": text])
            }
            self.rawValue = "thread:" + id
            self.kind = .thread(id: id)
        } else if text.hasPrefix("topic:") {
            let name = text.dropFirst("topic:".count)
            guard (1...64).contains(name.utf8.count), name.utf8.allSatisfy(ChannelName.isTopicByte) else {
                throw ApiError(.invalidChannel, "topic channel must be topic:[a-z0-9._-]{1,64}", details: ["channel": text])
            }
            self.rawValue = text
            self.kind = .topic(name: String(name))
        } else if text.hasPrefix("user:") {
            let sub = text.dropFirst("user:".count)
            guard ChannelName.isUserSub(sub) else {
                throw ApiError(.invalidChannel, "user channel must be user:<sub> (1…128 of A-Z a-z 0-9 . _ @ + -)", details: ["channel": text])
            }
            self.rawValue = text
            self.kind = .user(sub: String(sub))
        } else {
            throw ApiError(.invalidChannel, "channel must be thread:<uuid>, topic:<name> or user:<sub>", details: ["channel": text])
        }
        _cursorHash = Cursor.hash(rawValue)
    }

    /// The personal channel of `sub`, if `sub` can name one.
    public init?(user sub: String) {
        guard ChannelName.isUserSub(Substring(sub)) else { return nil }
        self.rawValue = "user:" + sub
        self.kind = .user(sub: sub)
        _cursorHash = Cursor.hash(rawValue)
    }

    /// Subs that have a personal channel: 1…128 bytes of letters, digits and `._@+-`.
    static func isUserSub(_ sub: Substring) -> Bool {
        (1...128).contains(sub.utf8.count) && sub.utf8.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39) || b == 0x2E || b == 0x5F || b == 0x40 || b == 0x2B || b == 0x2D
        }
    }

    /// The channel of a thread whose id is already known to be a lowercase UUID.
    public init(thread id: String) {
        self.rawValue = "thread:" + id
        self.kind = .thread(id: id)
        _cursorHash = Cursor.hash(rawValue)
    }

    static func isTopicByte(_ b: UInt8) -> Bool {
        (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2E || b == 0x5F || b == 0x2D
    }

    /// 8-4-4-4-12 hex digits.
    public static func isUUID(_ s: String) -> Bool {
        let bytes = Array(s.utf8)
        guard bytes.count == 36 else { return false }
        for (i, b) in bytes.enumerated() {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                if b != 0x2D { return false }
            } else if !((b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x66)) {
                return false
            }
        }
        return true
    }
}
