import NIOCore
import NIOWebSocket

/// RFC 6455 receive rules as a state machine over decoded frames: masking, reserved bits, opcodes,
/// fragmentation with control frames in between, control frame limits, UTF-8 of text messages and close
/// payloads, and the message size limit. It turns frames into complete messages or a close code.
struct WebSocketFraming {
    enum Event: Equatable {
        case text(String)
        case binary(ByteBuffer)
        case ping(ByteBuffer)
        case pong
        /// The peer's close frame: `code` to echo (nil when it sent none).
        case close(code: UInt16?)
        /// Fail the connection with this close code.
        case fail(code: UInt16, reason: String)
        case none
    }

    let maxMessageBytes: Int
    /// Set when permessage-deflate was agreed: RSV1 on a message's first frame means compressed.
    private let inflater: DeflateInflater?
    private var compressed = false
    private var fragments: (opcode: WebSocketOpcode, data: ByteBuffer)?
    /// The text message being received, validated frame by frame (fail fast on the first bad byte).
    private var utf8 = UTF8Validator()
    /// A text frame still arriving: how much of its payload was checked already, and the validator after it.
    private var partialChecked = 0
    private var partialUTF8 = UTF8Validator()

    init(maxMessageBytes: Int, inflater: DeflateInflater? = nil) {
        self.maxMessageBytes = maxMessageBytes
        self.inflater = inflater
    }

    /// Fail fast within a frame (RFC 6455 §8.1): the payload of a text frame still arriving (`payload`, masked,
    /// the part read so far) is checked for UTF-8 as it comes, so an invalid byte fails the connection (1007)
    /// without waiting for the rest of the frame. Frames the whole-frame rules refuse anyway (reserved bits, no
    /// mask, a text frame inside a message) and compressed ones are left to `receive`.
    mutating func receivePartial(_ head: WebSocketFrameReader.Head, payload: ByteBufferView) -> Event {
        guard let key = head.maskKey, head.first & 0x30 == 0 else { return .none }
        let rsv1 = head.first & 0x40 != 0
        switch head.first & 0x0F {
        case 0x1 where fragments == nil && !rsv1:
            if partialChecked == 0 { partialUTF8 = UTF8Validator() }
        case 0x0 where fragments?.opcode == .text && !compressed && !rsv1:
            if partialChecked == 0 { partialUTF8 = utf8 }
        default:
            return .none
        }
        guard payload.count > partialChecked else { return .none }
        let offset = partialChecked
        partialChecked = payload.count
        let unmasked = payload.dropFirst(offset).enumerated().lazy.map { $0.element ^ key[(offset + $0.offset) & 3] }
        return partialUTF8.feed(unmasked) ? .none : .fail(code: 1007, reason: "invalid UTF-8")
    }

    mutating func receive(_ frame: WebSocketFrame) -> Event {
        partialChecked = 0
        let firstDataFrame = (frame.opcode == .text || frame.opcode == .binary) && fragments == nil
        if frame.rsv2 || frame.rsv3 || (frame.rsv1 && !(inflater != nil && firstDataFrame)) {
            return .fail(code: 1002, reason: "reserved bits set")
        }
        guard frame.maskKey != nil else { return .fail(code: 1002, reason: "client frames must be masked") }
        let data = frame.unmaskedData
        switch frame.opcode {
        case .text, .binary:
            guard fragments == nil else { return .fail(code: 1002, reason: "new message inside a fragmented one") }
            guard data.readableBytes <= maxMessageBytes else { return .fail(code: 1009, reason: "message too big") }
            compressed = frame.rsv1
            if frame.opcode == .text && !compressed {
                utf8 = UTF8Validator()
                guard utf8.feed(data.readableBytesView) else { return .fail(code: 1007, reason: "invalid UTF-8") }
            }
            if frame.fin { return complete(frame.opcode, data) }
            fragments = (frame.opcode, data)
            return .none
        case .continuation:
            guard var current = fragments else { return .fail(code: 1002, reason: "continuation without a message") }
            guard current.data.readableBytes + data.readableBytes <= maxMessageBytes else {
                fragments = nil
                return .fail(code: 1009, reason: "message too big")
            }
            fragments = nil
            if current.opcode == .text && !compressed {
                guard utf8.feed(data.readableBytesView) else { return .fail(code: 1007, reason: "invalid UTF-8") }
            }
            var chunk = data
            current.data.writeBuffer(&chunk)
            if frame.fin { return complete(current.opcode, current.data) }
            fragments = current
            return .none
        case .ping:
            guard frame.fin, data.readableBytes <= 125 else { return .fail(code: 1002, reason: "bad control frame") }
            return .ping(data)
        case .pong:
            guard frame.fin, data.readableBytes <= 125 else { return .fail(code: 1002, reason: "bad control frame") }
            return .pong
        case .connectionClose:
            guard frame.fin, data.readableBytes <= 125 else { return .fail(code: 1002, reason: "bad control frame") }
            return closeEvent(data)
        default:
            return .fail(code: 1002, reason: "unknown opcode")
        }
    }

    private func complete(_ opcode: WebSocketOpcode, _ data: ByteBuffer) -> Event {
        if compressed, let inflater {
            let payload: ByteBuffer
            do {
                payload = try inflater.inflate(data, limit: maxMessageBytes)
            } catch .tooBig {
                return .fail(code: 1009, reason: "message too big")
            } catch {
                return .fail(code: 1007, reason: "invalid compressed data")
            }
            guard payload.readableBytes <= maxMessageBytes else { return .fail(code: 1009, reason: "message too big") }
            if opcode == .binary { return .binary(payload) }
            guard let text = String(validating: payload.readableBytesView, as: UTF8.self) else { return .fail(code: 1007, reason: "invalid UTF-8") }
            return .text(text)
        }
        if opcode == .binary { return .binary(data) }
        // Every byte was validated as it arrived; only an open sequence at the end can still be wrong.
        guard utf8.isComplete else { return .fail(code: 1007, reason: "invalid UTF-8") }
        return .text(String(decoding: data.readableBytesView, as: UTF8.self))
    }

    private func closeEvent(_ data: ByteBuffer) -> Event {
        var data = data
        if data.readableBytes == 0 { return .close(code: nil) }
        guard data.readableBytes >= 2, let code = data.readInteger(as: UInt16.self) else {
            return .fail(code: 1002, reason: "bad close payload")
        }
        guard Self.isValidCloseCode(code) else { return .fail(code: 1002, reason: "invalid close code") }
        guard String(validating: data.readableBytesView, as: UTF8.self) != nil else { return .fail(code: 1007, reason: "invalid UTF-8 in close reason") }
        return .close(code: code)
    }

    /// Codes a peer may send (RFC 6455 §7.4).
    static func isValidCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1011, 3000...4999: true
        default: false
        }
    }
}
