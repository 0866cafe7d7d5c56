import Foundation

/// JSON text made elsewhere and carried as is (a message the store encoded once). Decoding keeps the value's
/// canonical text; encoding writes the value it holds.
public struct RawJSON: Codable, Sendable, Hashable {
    public let text: String

    /// Equal when they hold the same JSON value (key order and spacing aside).
    public static func == (a: RawJSON, b: RawJSON) -> Bool {
        a.text == b.text || (try? JSONValue.parse(a.text)) == (try? JSONValue.parse(b.text))
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(try? JSONValue.parse(text))
    }

    public init(_ text: String) { self.text = text }

    public init(from decoder: any Decoder) throws {
        text = try JSONValue(from: decoder).canonicalText
    }

    public func encode(to encoder: any Encoder) throws {
        try JSONValue.parse(text).encode(to: encoder)
    }

    /// The text read as `type` (a client reading a message it was sent).
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try JSONDecoder().decode(type, from: Data(text.utf8))
    }
}

/// The error envelope of PROTOCOL.md §4.
public struct ErrorEnvelope: Codable, Sendable, Equatable {
    public let code: String
    public let message: String
    public var details: [String: String]
    public let requestId: String

    public init(code: String, message: String, details: [String: String] = [:], requestId: String) {
        self.code = code
        self.message = message
        self.details = details
        self.requestId = requestId
    }

    /// Compact JSON, details sorted.
    public var json: String {
        var out = "{\"code\":"
        WireText.appendString(code, to: &out)
        out += ",\"message\":"
        WireText.appendString(message, to: &out)
        out += ",\"details\":{"
        for (i, (key, value)) in details.sorted(by: { $0.key < $1.key }).enumerated() {
            if i > 0 { out += "," }
            WireText.appendString(key, to: &out)
            out += ":"
            WireText.appendString(value, to: &out)
        }
        out += "},\"requestId\":"
        WireText.appendString(requestId, to: &out)
        return out + "}"
    }
}

/// A message as a client reads it (PROTOCOL.md §1).
public struct WireMessage: Codable, Sendable, Equatable {
    public let id: String
    public let channel: String
    public let seq: Int64
    public let cursor: String
    public let createdAt: String
    public let sender: String
    public let requestId: String?
    public let body: JSONValue

    enum CodingKeys: String, CodingKey {
        case id, channel, seq, cursor, sender, body
        case createdAt = "created_at"
        case requestId = "request_id"
    }
}

/// A WebSocket `{"type":"message","channel":…,"message":{…}}` read in one pass, for a client that wants the
/// message itself (a load generator reading thousands a second): `ServerReply.decode` keeps the message's
/// text, which is one parse more. `Message` may be `WireMessage`, or a type that reads only the fields it needs.
public struct MessageFrame<Message: Decodable & Sendable>: Decodable, Sendable {
    public let type: String
    public let channel: String
    public let message: Message

    /// The frame's message, or nil when the text is not a message frame.
    public static func decode(_ utf8: some Collection<UInt8>, with decoder: JSONDecoder) -> Message? {
        guard utf8.starts(with: messageFramePrefix), let frame = try? decoder.decode(MessageFrame.self, from: Data(utf8)),
              frame.type == "message" else { return nil }
        return frame.message
    }
}

private let messageFramePrefix = Array("{\"type\":\"message\"".utf8)

/// What the server sends on a WebSocket (PROTOCOL.md §6), apart from close frames. The server writes these
/// with `json` (by hand: messages and acks embed the pre-encoded message text); clients and tests read them
/// with `decode`.
public enum ServerReply: Sendable, Equatable {
    case subscribed(id: CommandID?, channel: String, cursor: String)
    /// An answer to `unsubscribe` (no reason), or the server ending a subscription (`forbidden`, …).
    case unsubscribed(id: CommandID?, channel: String, reason: String? = nil)
    /// A publish's ack carries the message (and `replayed`); a `read`'s the cursor in force and unread count.
    case ack(id: CommandID?, message: RawJSON? = nil, replayed: Bool = false, cursor: String? = nil, unread: Int64? = nil)
    case pong(id: CommandID?)
    case error(id: CommandID?, ServerError)
    case message(channel: String, message: RawJSON)
    /// A frame the server made whole (presence answers, `join` / `leave` / `typing` events): written as is.
    case event(id: CommandID?, text: String)

    public struct ServerError: Sendable, Equatable {
        public let envelope: ErrorEnvelope
        public init(_ envelope: ErrorEnvelope) { self.envelope = envelope }
    }

    public var id: CommandID? {
        switch self {
        case .subscribed(let id, _, _), .unsubscribed(let id, _, _), .ack(let id, _, _, _, _), .pong(let id), .error(let id, _), .event(let id, _): id
        case .message: nil
        }
    }

    /// The reply as one JSON text frame.
    public var json: String {
        var out = "{\"type\":"
        func field(_ name: String, _ value: String?) {
            guard let value else { return }
            out += ",\"\(name)\":"
            WireText.appendString(value, to: &out)
        }
        func idField(_ id: CommandID?) {
            if let id { out += ",\"id\":" + id.json }
        }
        switch self {
        case .subscribed(let id, let channel, let cursor):
            out += "\"subscribed\""
            idField(id)
            field("channel", channel)
            field("cursor", cursor)
        case .unsubscribed(let id, let channel, let reason):
            out += "\"unsubscribed\""
            idField(id)
            field("channel", channel)
            field("reason", reason)
        case .ack(let id, let message, let replayed, let cursor, let unread):
            out += "\"ack\""
            idField(id)
            if let message { out += ",\"message\":" + message.text }
            if replayed { out += ",\"replayed\":true" }
            field("cursor", cursor)
            if let unread { out += ",\"unread\":\(unread)" }
        case .pong(let id):
            out += "\"pong\""
            idField(id)
        case .error(let id, let error):
            out += "\"error\""
            idField(id)
            out += ",\"error\":" + error.envelope.json
        case .message(let channel, let message):
            out += "\"message\""
            field("channel", channel)
            out += ",\"message\":" + message.text
        case .event(_, let text):
            return text
        }
        return out + "}"
    }
}

extension ServerReply: Codable {
    enum Key: String, CodingKey {
        case type, id, channel, cursor, reason, message, replayed, unread, error
    }

    public init(from decoder: any Decoder) throws {
        let object = try decoder.container(keyedBy: Key.self)
        let id = try object.decodeIfPresent(CommandID.self, forKey: .id)
        let type = try object.decode(String.self, forKey: .type)
        switch type {
        case "subscribed":
            self = .subscribed(id: id, channel: try object.decode(String.self, forKey: .channel), cursor: try object.decode(String.self, forKey: .cursor))
        case "unsubscribed":
            self = .unsubscribed(id: id, channel: try object.decode(String.self, forKey: .channel),
                                 reason: try object.decodeIfPresent(String.self, forKey: .reason))
        case "ack":
            self = .ack(id: id, message: try object.decodeIfPresent(RawJSON.self, forKey: .message),
                        replayed: try object.decodeIfPresent(Bool.self, forKey: .replayed) ?? false,
                        cursor: try object.decodeIfPresent(String.self, forKey: .cursor), unread: try object.decodeIfPresent(Int64.self, forKey: .unread))
        case "pong":
            self = .pong(id: id)
        case "error":
            self = .error(id: id, ServerError(try object.decode(ErrorEnvelope.self, forKey: .error)))
        case "message":
            self = .message(channel: try object.decode(String.self, forKey: .channel), message: try object.decode(RawJSON.self, forKey: .message))
        case "typing", "join", "leave", "presence":
            self = .event(id: id, text: try JSONValue(from: decoder).canonicalText)
        default:
            throw DecodingError.dataCorruptedError(forKey: .type, in: object, debugDescription: "unknown reply type \(type)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        try JSONValue.parse(json).encode(to: encoder)
    }

    /// Reads one reply from a text frame.
    public static func decode(_ text: some StringProtocol) throws -> ServerReply {
        try JSONDecoder().decode(ServerReply.self, from: Data(text.utf8))
    }
}

/// JSON string literals written by hand (the server's replies are fixed shapes).
public enum WireText {
    /// Appends `value` as a JSON string literal, escaped as `JSONEncoder` does: `"` and `\`, control
    /// characters as `\b \f \n \r \t` or `\u00XX`, everything else (`/` included) as is. Canonical bodies
    /// are written with it, so it must stay exactly that.
    /// Whether `value` has a byte that a JSON string literal must escape (a quote, a backslash, a control).
    public static func needsEscape(_ value: String) -> Bool {
        value.utf8.contains { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }
    }

    public static func appendString(_ value: String, to out: inout String) {
        out.append("\"")
        if !needsEscape(value) {
            out.append(value)
        } else {
            for scalar in value.unicodeScalars {
                switch scalar {
                case "\"": out.append("\\\"")
                case "\\": out.append("\\\\")
                case "\u{08}": out.append("\\b")
                case "\u{0C}": out.append("\\f")
                case "\n": out.append("\\n")
                case "\r": out.append("\\r")
                case "\t": out.append("\\t")
                default:
                    if scalar.value < 0x20 {
                        let hex = String(scalar.value, radix: 16)
                        out.append("\\u" + String(repeating: "0", count: 4 - hex.count) + hex)
                    } else {
                        out.unicodeScalars.append(scalar)
                    }
                }
            }
        }
        out.append("\"")
    }
}

/// A history or long-poll answer (PROTOCOL.md §4).
public struct MessagePage: Codable, Sendable, Equatable {
    public let messages: [WireMessage]
    public let cursor: String
    public let hasMore: Bool

    enum CodingKeys: String, CodingKey {
        case messages, cursor
        case hasMore = "has_more"
    }
}
