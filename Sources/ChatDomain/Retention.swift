/// How much of a channel's history is kept: at most `maxCount` messages and/or none older than `maxAge`
/// (from the topics configuration; threads keep everything unless configured).
public struct Retention: Sendable, Equatable {
    public var maxCount: Int?
    public var maxAge: Duration?

    public init(maxCount: Int? = nil, maxAge: Duration? = nil) {
        self.maxCount = maxCount
        self.maxAge = maxAge
    }

    public var keepsEverything: Bool { maxCount == nil && maxAge == nil }

    /// `created_at` (µs) before which messages may go (`Int64.min`: no age limit).
    func ageCutoffMicros(now: Int64) -> Int64 {
        guard let maxAge else { return .min }
        return now - maxAge.nanoseconds / 1000
    }

    /// A publish repeating a request id whose message the retention already removed: nothing new is stored
    /// (the request id still holds), and the original cannot be returned.
    static func replayOfRemoved(_ requestId: String, seq: Int64) -> ApiError {
        ApiError(.idempotencyConflict, "this request id's message was already removed by the channel's retention",
                 details: ["request_id": requestId, "seq": String(seq)])
    }

    /// The error for a read after `after` when the floor is above it: names the oldest position still kept.
    static func expired(_ channel: ChannelName, after: Int64, floor: Int64) -> ApiError {
        ApiError(.cursorExpired, "the cursor is older than what the channel keeps; resume from oldest_cursor",
                 details: ["channel": channel.rawValue, "oldest_cursor": Cursor.text(channel: channel, seq: floor), "first_seq": String(floor + 1)])
    }
}

/// How long a member removal is kept for instances to read (they read new ones every few seconds).
let removalWindowMicros: Int64 = 24 * 3600 * 1_000_000
