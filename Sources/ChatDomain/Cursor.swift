/// A position in one channel: every message with `seq` greater than `seq` comes after it. Position 0 is
/// the start of a channel. On the wire it is `"<seq>.<16 hex digits of the channel name's FNV-1a hash>"`,
/// which clients treat as opaque; the hash lets a cursor of another channel be refused instead of
/// silently misread.
public struct Cursor: Hashable, Sendable {
    public let seq: Int64
    public let channelHash: UInt64

    public init(channel: ChannelName, seq: Int64) {
        self.seq = seq
        self.channelHash = channel.cursorHash
    }

    public var text: String {
        String(capacity: Self.maxTextBytes) { Self.write(seq: seq, channelHash: channelHash, to: &$0) }
    }

    /// The longest cursor text: a sign, 19 digits, the dot, 16 hex digits.
    static let maxTextBytes = 37

    /// Writes `<seq>.<16 hex digits>` (the message JSON is built with it, once per message).
    static func write(seq: Int64, channelHash: UInt64, to out: inout TextWriter) {
        out.integer(seq)
        out.byte(0x2E)
        out.hex(channelHash)
    }

    public static func text(channel: ChannelName, seq: Int64) -> String {
        Cursor(channel: channel, seq: seq).text
    }

    /// Parses a cursor for `channel`. Malformed text or another channel's cursor is `INVALID_CURSOR`.
    public init(parsing text: String, for channel: ChannelName) throws(ApiError) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        // Canonical form only: no leading zero (so one position has one cursor text).
        guard parts.count == 2, (1...19).contains(parts[0].utf8.count), parts[0].utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              parts[0] == "0" || parts[0].utf8.first != 0x30,
              parts[1].utf8.count == 16, let seq = Int64(parts[0]), let hash = UInt64(parts[1], radix: 16),
              parts[1].utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) })
        else {
            throw ApiError(.invalidCursor, "cursor is malformed", details: ["cursor": String(text.prefix(100))])
        }
        guard hash == channel.cursorHash else {
            throw ApiError(.invalidCursor, "cursor belongs to another channel", details: ["cursor": text, "channel": channel.rawValue])
        }
        self.seq = seq
        self.channelHash = hash
    }

    static func hash(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in s.utf8 {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01B3
        }
        return h
    }
}
