import Foundation

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
        var out = "{\"id\":\""
        out.reserveCapacity(body.utf8.count + 220)
        out += id
        out += "\",\"channel\":\""
        out += channel.rawValue
        out += "\",\"seq\":"
        out += String(seq)
        out += ",\"cursor\":\""
        Cursor.append(seq: seq, channelHash: channel.cursorHash, to: &out)
        out += "\",\"created_at\":\""
        out += Timestamp.iso8601(micros: createdAtMicros)
        out += "\",\"sender\":"
        JSONText.appendString(sender, to: &out)
        out += ",\"request_id\":"
        JSONText.appendOptionalString(requestId, to: &out)
        out += ",\"body\":"
        out += body
        out += "}"
        self.json = out
    }

    public var cursor: String { Cursor.text(channel: channel, seq: seq) }

    public static func == (a: Message, b: Message) -> Bool { a.id == b.id && a.seq == b.seq && a.channel == b.channel }
}

public enum Timestamp {
    public static func nowMicros() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1_000
    }

    /// `2026-11-21T22:30:00.123456Z` (written into one 27-byte string: every message built from the store
    /// formats one).
    public static func iso8601(micros: Int64) -> String {
        var seconds = time_t(micros / 1_000_000)
        let fraction = Int(micros % 1_000_000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let fields: [(value: Int, width: Int, after: UInt8)] = [
            (Int(parts.tm_year) + 1900, 4, UInt8(ascii: "-")), (Int(parts.tm_mon) + 1, 2, UInt8(ascii: "-")), (Int(parts.tm_mday), 2, UInt8(ascii: "T")),
            (Int(parts.tm_hour), 2, UInt8(ascii: ":")), (Int(parts.tm_min), 2, UInt8(ascii: ":")), (Int(parts.tm_sec), 2, UInt8(ascii: ".")),
            (fraction, 6, UInt8(ascii: "Z")),
        ]
        return String(unsafeUninitializedCapacity: 27) { buffer in
            var at = 0
            for field in fields {
                var value = field.value
                for index in stride(from: at + field.width - 1, through: at, by: -1) {
                    buffer[index] = UInt8(ascii: "0") + UInt8(value % 10)
                    value /= 10
                }
                at += field.width
                buffer[at] = field.after
                at += 1
            }
            return at
        }
    }
}

/// UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, 74 random bits.
public enum UUIDv7 {
    public static func make(micros: Int64 = Timestamp.nowMicros()) -> String {
        var rng = SystemRandomNumberGenerator()
        let millis = UInt64(micros / 1000)
        var bytes = [UInt8](repeating: 0, count: 16)
        for i in 0..<6 { bytes[i] = UInt8(truncatingIfNeeded: millis >> (8 * (5 - UInt64(i)))) }
        let r1 = rng.next() as UInt64
        let r2 = rng.next() as UInt64
        for i in 6..<16 { bytes[i] = UInt8(truncatingIfNeeded: (i < 14 ? r1 >> (8 * UInt64(i - 6)) : r2 >> (8 * UInt64(i - 14)))) }
        bytes[6] = (bytes[6] & 0x0F) | 0x70
        bytes[8] = (bytes[8] & 0x3F) | 0x80
        let hex = bytes.map { b -> String in
            let s = String(b, radix: 16)
            return b < 16 ? "0" + s : s
        }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-" + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }
}
