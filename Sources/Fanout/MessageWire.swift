import ChatDomain
import NIOCore

/// A committed message as bytes on the bus: a version byte, then the fields, each length-prefixed. The
/// receiving instance rebuilds the same `Message` (and so the same JSON) without parsing JSON. Version 2 adds
/// the membership epoch; version 1 (an instance not yet upgraded) still decodes, with epoch 0.
public enum MessageWire {
    static let version: UInt8 = 2

    public static func encode(_ message: Message) -> ByteBuffer {
        var out = ByteBuffer()
        out.reserveCapacity(message.body.utf8.count + 128)
        out.writeInteger(version)
        out.writeInteger(message.seq)
        out.writeInteger(message.createdAtMicros)
        out.writeInteger(message.membershipEpoch)
        for field in [message.channel.rawValue, message.id, message.sender, message.body] { write(field, into: &out) }
        if let requestId = message.requestId {
            out.writeInteger(UInt8(1))
            write(requestId, into: &out)
        } else {
            out.writeInteger(UInt8(0))
        }
        return out
    }

    /// The message, or nil for bytes that are not one (never trusted blindly: the bus is a network peer).
    public static func decode(_ buffer: ByteBuffer) -> Message? {
        var input = buffer
        guard let version = input.readInteger(as: UInt8.self), version == 1 || version == Self.version,
              let seq = input.readInteger(as: Int64.self),
              let createdAt = input.readInteger(as: Int64.self),
              let epoch = version == 1 ? 0 : input.readInteger(as: Int64.self),
              let channelText = read(&input), let id = read(&input), let sender = read(&input), let body = read(&input),
              let flag = input.readInteger(as: UInt8.self),
              let channel = try? ChannelName(parsing: channelText)
        else { return nil }
        var requestId: String?
        if flag == 1 {
            guard let text = read(&input) else { return nil }
            requestId = text
        }
        return Message(id: id, channel: channel, seq: seq, createdAtMicros: createdAt, sender: sender, requestId: requestId, body: body,
                       membershipEpoch: epoch)
    }

    private static func write(_ text: String, into out: inout ByteBuffer) {
        out.writeInteger(UInt32(text.utf8.count))
        out.writeString(text)
    }

    private static func read(_ input: inout ByteBuffer) -> String? {
        guard let length = input.readInteger(as: UInt32.self) else { return nil }
        return input.readString(length: Int(length))
    }
}
