import Foundation

/// A command's `id`, echoed in its reply exactly as it came (a string or a number).
public enum CommandID: Codable, Sendable, Hashable, CustomStringConvertible {
    case string(String)
    case integer(Int64)
    case number(Double)

    public init(from decoder: any Decoder) throws {
        guard let id = CommandID(json: try JSONValue(from: decoder)) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "an id is a string or a number"))
        }
        self = id
    }

    /// A string or a number; nil for any other value.
    init?(json: JSONValue) {
        switch json {
        case .integer(let n): self = .integer(n)
        case .number(let n): self = .number(n)
        case .string(let s): self = .string(s)
        default: return nil
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var value = encoder.singleValueContainer()
        switch self {
        case .string(let s): try value.encode(s)
        case .integer(let n): try value.encode(n)
        case .number(let n): try value.encode(n)
        }
    }

    /// The id as JSON (a string literal or a number), as a reply echoes it.
    public var json: String {
        switch self {
        case .string(let s):
            var out = ""
            WireText.appendString(s, to: &out)
            return out
        case .integer(let n): return String(n)
        case .number(let n): return (try? String(decoding: JSONEncoder().encode(n), as: UTF8.self)) ?? "null"
        }
    }

    public var description: String {
        switch self {
        case .string(let s): s
        case .integer(let n): String(n)
        case .number(let n): String(n)
        }
    }
}

/// A WebSocket client's command (PROTOCOL.md §6), one JSON object per text frame.
public enum ClientCommand: Sendable, Equatable {
    /// `since` (a cursor) or `history` (the last N first), or neither: live only. `presence`: also send the
    /// channel's `join` and `leave` events.
    case subscribe(id: CommandID?, channel: String, since: String? = nil, history: Int? = nil, presence: Bool = false)
    case unsubscribe(id: CommandID?, channel: String)
    case publish(id: CommandID?, channel: String, requestId: String? = nil, body: JSONValue?)
    case read(id: CommandID?, channel: String, cursor: String?)
    case refresh(id: CommandID?, token: String?)
    case ping(id: CommandID?)
    /// Who is subscribed to the channel now (cluster-wide).
    case presence(id: CommandID?, channel: String)
    /// "I am typing" in a thread: relayed to its other members, never stored.
    case typing(id: CommandID?, channel: String)

    public var id: CommandID? {
        switch self {
        case .subscribe(let id, _, _, _, _), .unsubscribe(let id, _), .publish(let id, _, _, _), .read(let id, _, _), .refresh(let id, _), .ping(let id),
             .presence(let id, _), .typing(let id, _):
            id
        }
    }
}

/// Why a command could not be read: the error code of PROTOCOL.md's envelope, a message, and the command's
/// `id` when it was readable (so the error reply carries it).
public struct CommandError: Error, Sendable, Equatable {
    public enum Code: String, Sendable {
        case badRequest = "BAD_REQUEST"
        case unknownCommand = "UNKNOWN_COMMAND"
        case invalidCursor = "INVALID_CURSOR"
    }
    public let code: Code
    public let message: String
    public var details: [String: String] = [:]
    public var id: CommandID?

    public init(_ code: Code, _ message: String, details: [String: String] = [:], id: CommandID? = nil) {
        self.code = code
        self.message = message
        self.details = details
        self.id = id
    }
}

extension ClientCommand: Codable {
    enum Key: String, CodingKey {
        case type, id, channel, since, history, body, cursor, token, presence
        case requestId = "request_id"
    }

    /// The largest `history` a subscribe may ask for.
    public static let maxHistory = 1000
    /// Deepest nesting of arrays and objects in a command (a recursive reader must not be handed more).
    public static let maxDepth = JSONDepth.limit

    /// Reads one command from a text frame; every way it can be wrong is a `CommandError` naming it.
    public static func decode(_ text: some StringProtocol) -> Result<ClientCommand, CommandError> {
        decode(bytes: text.utf8)
    }

    public static func decode(bytes: some Collection<UInt8>) -> Result<ClientCommand, CommandError> {
        let value: JSONValue
        do {
            value = try JSONReader.parse(bytes, maxDepth: maxDepth)
        } catch {
            if error.tooDeep {
                return .failure(CommandError(.badRequest, "JSON nested deeper than \(maxDepth) levels", details: ["max_depth": String(maxDepth)]))
            }
            return .failure(CommandError(.badRequest, "request is not valid JSON"))
        }
        guard case .object(let object) = value else { return .failure(CommandError(.badRequest, "request must be a JSON object")) }
        return Result { () throws(CommandError) in try ClientCommand(object: object) }
    }

    public init(from decoder: any Decoder) throws {
        guard case .object(let object) = try JSONValue(from: decoder) else { throw CommandError(.badRequest, "request must be a JSON object") }
        self = try ClientCommand(object: object)
    }

    /// The command a JSON object names; every way it can be wrong is a `CommandError` naming it.
    init(object: [String: JSONValue]) throws(CommandError) {
        // An id the reply could not carry back (an object, an array, a boolean) is refused, not dropped.
        let id: CommandID?
        if let value = object["id"], value != .null {
            guard let valid = CommandID(json: value) else { throw CommandError(.badRequest, "an id is a string or a number") }
            id = valid
        } else {
            id = nil
        }
        /// The member `key`: nil when absent or null; `read` nil for a value of the wrong type throws.
        func field<T>(_ key: String, _ code: CommandError.Code = .badRequest, _ message: String, _ read: (JSONValue) -> T?) throws(CommandError) -> T? {
            guard let value = object[key], value != .null else { return nil }
            guard let typed = read(value) else { throw CommandError(code, message, id: id) }
            return typed
        }
        func required(_ key: String, _ message: String) throws(CommandError) -> String {
            guard let value = try field(key, .badRequest, message, \.stringValue) else { throw CommandError(.badRequest, message, id: id) }
            return value
        }
        guard let type = object["type"]?.stringValue else { throw CommandError(.badRequest, "a command needs a string type", id: id) }
        switch type {
        case "subscribe":
            let channel = try required("channel", "subscribe needs a channel")
            let since = try field("since", .invalidCursor, "since must be a cursor string", \.stringValue)
            let history = try field("history", .badRequest, "history must be an integer in 0...\(Self.maxHistory)", \.intValue)
            if let history, !(0...Self.maxHistory).contains(history) {
                throw CommandError(.badRequest, "history must be an integer in 0...\(Self.maxHistory)", id: id)
            }
            let presence = try field("presence", .badRequest, "presence must be true or false", \.boolValue) ?? false
            self = .subscribe(id: id, channel: channel, since: since, history: history, presence: presence)
        case "unsubscribe":
            self = .unsubscribe(id: id, channel: try required("channel", "unsubscribe needs a channel"))
        case "publish":
            let channel = try required("channel", "publish needs a channel")
            let requestId = try field("request_id", .badRequest, "request_id must be a string", \.stringValue)
            let body = object["body"].flatMap { $0 == .null ? nil : $0 }
            self = .publish(id: id, channel: channel, requestId: requestId, body: body)
        case "read":
            let channel = try required("channel", "read needs a channel")
            self = .read(id: id, channel: channel, cursor: try field("cursor", .invalidCursor, "cursor must be a cursor string", \.stringValue))
        case "refresh":
            self = .refresh(id: id, token: object["token"]?.stringValue)
        case "ping":
            self = .ping(id: id)
        case "presence":
            self = .presence(id: id, channel: try required("channel", "presence needs a channel"))
        case "typing":
            self = .typing(id: id, channel: try required("channel", "typing needs a channel"))
        default:
            throw CommandError(.unknownCommand, "unknown command type", details: ["type": String(type.prefix(64))], id: id)
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var object = encoder.container(keyedBy: Key.self)
        try object.encodeIfPresent(id, forKey: .id)
        switch self {
        case .subscribe(_, let channel, let since, let history, let presence):
            try object.encode("subscribe", forKey: .type)
            try object.encode(channel, forKey: .channel)
            try object.encodeIfPresent(since, forKey: .since)
            try object.encodeIfPresent(history, forKey: .history)
            if presence { try object.encode(true, forKey: .presence) }
        case .presence(_, let channel):
            try object.encode("presence", forKey: .type)
            try object.encode(channel, forKey: .channel)
        case .typing(_, let channel):
            try object.encode("typing", forKey: .type)
            try object.encode(channel, forKey: .channel)
        case .unsubscribe(_, let channel):
            try object.encode("unsubscribe", forKey: .type)
            try object.encode(channel, forKey: .channel)
        case .publish(_, let channel, let requestId, let body):
            try object.encode("publish", forKey: .type)
            try object.encode(channel, forKey: .channel)
            try object.encodeIfPresent(requestId, forKey: .requestId)
            try object.encodeIfPresent(body, forKey: .body)
        case .read(_, let channel, let cursor):
            try object.encode("read", forKey: .type)
            try object.encode(channel, forKey: .channel)
            try object.encodeIfPresent(cursor, forKey: .cursor)
        case .refresh(_, let token):
            try object.encode("refresh", forKey: .type)
            try object.encodeIfPresent(token, forKey: .token)
        case .ping:
            try object.encode("ping", forKey: .type)
        }
    }

    /// The command as one JSON text frame.
    public var text: String {
        String(decoding: (try? JSONEncoder().encode(self)) ?? Data(), as: UTF8.self)
    }
}

/// How deep JSON nests, found before any recursive parser is handed it.
public enum JSONDepth {
    /// Deepest nesting of arrays and objects the gateway reads.
    public static let limit = 64

    /// Whether arrays and objects nest deeper than `limit` (strings skipped).
    public static func exceeds(_ limit: Int, in bytes: some Collection<UInt8>) -> Bool {
        var depth = 0
        var inString = false
        var escaped = false
        for byte in bytes {
            if inString {
                if escaped { escaped = false } else if byte == UInt8(ascii: "\\") { escaped = true } else if byte == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                depth += 1
                if depth > limit { return true }
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            default: break
            }
        }
        return false
    }
}
