import Foundation
import Wire

/// A committed message. Its JSON (PROTOCOL.md §1) is built once, when the message is made, and shared by
/// every transport and every subscriber.
public struct Message: Sendable, Equatable {
    public let id: String
    public let channel: ChannelName
    public let seq: Int64
    /// Microseconds since the Unix epoch; strictly increasing within a channel.
    public let createdAtMicros: Int64
    public let sender: String
    public let requestId: String?
    /// Canonical JSON text of the body object.
    public let body: String
    /// The whole message as JSON text.
    public let json: String
    /// How many members the thread had lost (removals) when the message was committed: 0 for topics. Not
    /// part of the message's JSON; a live stream of a thread checks for a removal it has not seen yet when
    /// this passes what it knows (a removal and a later message may reach an instance in either order).
    public let membershipEpoch: Int64

    public init(id: String, channel: ChannelName, seq: Int64, createdAtMicros: Int64, sender: String, requestId: String?, body: String,
                membershipEpoch: Int64 = 0) {
        self.membershipEpoch = membershipEpoch
        self.id = id
        self.channel = channel
        self.seq = seq
        self.createdAtMicros = createdAtMicros
        self.sender = sender
        self.requestId = requestId
        self.body = body
        self.json = Self.json(id: id, channel: channel, seq: seq, createdAtMicros: createdAtMicros, sender: sender,
                              requestId: requestId, body: body)
    }

    public var cursor: String { Cursor.text(channel: channel, seq: seq) }

    /// The message's JSON, written in one pass into one allocation (built for every message committed and
    /// every message read back). `sender` and `request_id` are escaped only when they need it.
    static func json(id: String, channel: ChannelName, seq: Int64, createdAtMicros: Int64, sender: String, requestId: String?,
                     body: String) -> String {
        let quotedSender = WireText.needsEscape(sender) ? JSONText.quoted(sender) : nil
        let quotedRequest = requestId.flatMap { WireText.needsEscape($0) ? JSONText.quoted($0) : nil }
        let senderBytes = quotedSender?.utf8.count ?? sender.utf8.count + 2
        let requestBytes = requestId.map { quotedRequest?.utf8.count ?? $0.utf8.count + 2 } ?? 4
        let capacity = 120 + id.utf8.count + channel.rawValue.utf8.count + 2 * Cursor.maxTextBytes + Timestamp.iso8601Bytes
            + senderBytes + requestBytes + body.utf8.count
        return String(capacity: capacity) { out in
            out.ascii("{\"id\":\"")
            out.text(id)
            out.ascii("\",\"channel\":\"")
            out.text(channel.rawValue)
            out.ascii("\",\"seq\":")
            out.integer(seq)
            out.ascii(",\"cursor\":\"")
            Cursor.write(seq: seq, channelHash: channel.cursorHash, to: &out)
            out.ascii("\",\"created_at\":\"")
            Timestamp.writeISO8601(micros: createdAtMicros, to: &out)
            out.ascii("\",\"sender\":")
            if let quotedSender { out.text(quotedSender) } else { out.byte(0x22); out.text(sender); out.byte(0x22) }
            out.ascii(",\"request_id\":")
            if let requestId {
                if let quotedRequest { out.text(quotedRequest) } else { out.byte(0x22); out.text(requestId); out.byte(0x22) }
            } else {
                out.ascii("null")
            }
            out.ascii(",\"body\":")
            out.text(body)
            out.byte(0x7D)
        }
    }

    public static func == (a: Message, b: Message) -> Bool { a.id == b.id && a.seq == b.seq && a.channel == b.channel }
}

public enum Timestamp {
    public static func nowMicros() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1_000
    }

    /// Bytes of `iso8601(micros:)`.
    static let iso8601Bytes = 27

    /// `2026-11-21T22:30:00.123456Z`.
    public static func iso8601(micros: Int64) -> String {
        String(capacity: iso8601Bytes) { writeISO8601(micros: micros, to: &$0) }
    }

    static func writeISO8601(micros: Int64, to out: inout TextWriter) {
        var seconds = time_t(micros / 1_000_000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        out.digits(Int(parts.tm_year) + 1900, width: 4)
        out.byte(UInt8(ascii: "-"))
        out.digits(Int(parts.tm_mon) + 1, width: 2)
        out.byte(UInt8(ascii: "-"))
        out.digits(Int(parts.tm_mday), width: 2)
        out.byte(UInt8(ascii: "T"))
        out.digits(Int(parts.tm_hour), width: 2)
        out.byte(UInt8(ascii: ":"))
        out.digits(Int(parts.tm_min), width: 2)
        out.byte(UInt8(ascii: ":"))
        out.digits(Int(parts.tm_sec), width: 2)
        out.byte(UInt8(ascii: "."))
        out.digits(Int(micros % 1_000_000), width: 6)
        out.byte(UInt8(ascii: "Z"))
    }
}

/// UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, 74 random bits.
public enum UUIDv7 {
    public static func make(micros: Int64 = Timestamp.nowMicros()) -> String {
        var rng = SystemRandomNumberGenerator()
        let high = UInt64(micros / 1000) << 16 | 0x7000 | ((rng.next() as UInt64) & 0x0FFF)
        let low = ((rng.next() as UInt64) & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000
        return UUIDText.format(high: high, low: low)
    }
}

/// The 36-character lowercase text of a UUID's 128 bits (8-4-4-4-12 hex digits).
public enum UUIDText {
    public static func format(high: UInt64, low: UInt64) -> String {
        String(capacity: 36) { out in
            out.hex(high >> 32, width: 8)
            out.byte(0x2D)
            out.hex(high >> 16, width: 4)
            out.byte(0x2D)
            out.hex(high, width: 4)
            out.byte(0x2D)
            out.hex(low >> 48, width: 4)
            out.byte(0x2D)
            out.hex(low, width: 12)
        }
    }
}
