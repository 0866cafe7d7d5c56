import ChatDomain
import Fanout
import NIOCore

/// Server-side bytes on the wire: WebSocket frames (server frames are never masked, so one encoding serves
/// every subscriber) and Server-Sent Events.
enum WireEncoding {
    static let allocator = ByteBufferAllocator()

    enum Opcode: UInt8 {
        case continuation = 0x0, text = 0x1, binary = 0x2, close = 0x8, ping = 0x9, pong = 0xA
    }

    /// One final, unmasked frame.
    static func frame(_ opcode: Opcode, payload: ByteBuffer) -> ByteBuffer {
        var out = allocator.buffer(capacity: payload.readableBytes + 10)
        writeHeader(opcode, length: payload.readableBytes, into: &out)
        var payload = payload
        out.writeBuffer(&payload)
        return out
    }

    static func frame(_ opcode: Opcode, text: String) -> ByteBuffer {
        var out = allocator.buffer(capacity: text.utf8.count + 10)
        writeHeader(opcode, length: text.utf8.count, into: &out)
        out.writeString(text)
        return out
    }

    static func writeHeader(_ opcode: Opcode, length: Int, compressed: Bool = false, into out: inout ByteBuffer) {
        out.writeInteger(0x80 | (compressed ? 0x40 : 0) | opcode.rawValue)
        if length < 126 {
            out.writeInteger(UInt8(length))
        } else if length <= 0xFFFF {
            out.writeInteger(UInt8(126))
            out.writeInteger(UInt16(length))
        } else {
            out.writeInteger(UInt8(127))
            out.writeInteger(UInt64(length))
        }
    }

    static func closeFrame(code: UInt16, reason: String = "") -> ByteBuffer {
        var payload = allocator.buffer(capacity: 2 + reason.utf8.count)
        payload.writeInteger(code)
        payload.writeString(reason)
        return frame(.close, payload: payload)
    }

    /// `{"type":"message","channel":…,"message":…}` as a text frame.
    /// The frame written straight into one buffer (no intermediate strings: catch-up encodes every stored
    /// message it sends).
    static func webSocketMessage(_ message: Message) -> ByteBuffer {
        let prefix = "{\"type\":\"message\",\"channel\":\""
        let middle = "\",\"message\":"
        let length = prefix.utf8.count + message.channel.rawValue.utf8.count + middle.utf8.count + message.json.utf8.count + 1
        var out = allocator.buffer(capacity: length + 10)
        writeHeader(.text, length: length, into: &out)
        out.writeString(prefix)
        out.writeString(message.channel.rawValue)
        out.writeString(middle)
        out.writeString(message.json)
        out.writeInteger(UInt8(ascii: "}"))
        return out
    }

    static func webSocketMessageText(_ message: Message) -> String {
        "{\"type\":\"message\",\"channel\":\"" + message.channel.rawValue + "\",\"message\":" + message.json + "}"
    }

    /// A text or binary frame for a permessage-deflate connection: compressed (RSV1) from the threshold up.
    static func deflateFrame(_ opcode: Opcode, payload: ByteBuffer, windowBits: Int32 = 15) -> ByteBuffer {
        guard payload.readableBytes >= PermessageDeflate.threshold, let compressed = PermessageDeflate.compress(payload, windowBits: windowBits),
              compressed.readableBytes < payload.readableBytes else {
            return frame(opcode, payload: payload)
        }
        var out = allocator.buffer(capacity: compressed.readableBytes + 10)
        writeHeader(opcode, length: compressed.readableBytes, compressed: true, into: &out)
        var body = compressed
        out.writeBuffer(&body)
        return out
    }

    /// `id: <cursor>\nevent: message\ndata: <json>\n\n` (the JSON never holds a raw newline), framed as one
    /// HTTP/1.1 chunk (`<hex length>\r\n…\r\n`): SSE streams are chunked, and a stream writes these bytes
    /// below NIO's HTTP encoder, straight to the socket — encoded once for every subscriber, and a batch of
    /// them joined is still a valid run of chunks.
    static func serverSentEvent(_ message: Message) -> ByteBuffer {
        let cursor = message.cursor
        let length = 4 + cursor.utf8.count + 22 + message.json.utf8.count + 2
        let size = String(length, radix: 16)
        var out = allocator.buffer(capacity: length + size.utf8.count + 4)
        out.writeString(size)
        out.writeString("\r\nid: ")
        out.writeString(cursor)
        out.writeString("\nevent: message\ndata: ")
        out.writeString(message.json)
        out.writeString("\n\n\r\n")
        return out
    }

    /// The payloads of a run of chunks as `serverSentEvent` frames them (an HTTP/1.0 client reads no chunks);
    /// nil if the bytes are not such a run.
    static func unchunked(_ chunks: ByteBuffer) -> ByteBuffer? {
        var chunks = chunks
        var out = ByteBufferAllocator().buffer(capacity: chunks.readableBytes)
        while chunks.readableBytes > 0 {
            guard let line = chunks.readableBytesView.firstIndex(of: UInt8(ascii: "\r")),
                  let size = Int(String(decoding: chunks.readableBytesView[..<line], as: UTF8.self), radix: 16) else { return nil }
            chunks.moveReaderIndex(to: line + 2)
            guard var payload = chunks.readSlice(length: size), chunks.readSlice(length: 2) != nil else { return nil }
            out.writeBuffer(&payload)
        }
        return out
    }

    static let encoder: MessageEncoder = { message, format in
        switch format {
        case .webSocket: webSocketMessage(message)
        case .serverSentEvents: serverSentEvent(message)
        case .webSocketDeflate: deflateFrame(.text, payload: ByteBuffer(string: webSocketMessageText(message)))
        case .webSocketDeflateSmallWindow:
            deflateFrame(.text, payload: ByteBuffer(string: webSocketMessageText(message)), windowBits: PermessageDeflate.smallWindowBits)
        }
    }
}
