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

    init(maxMessageBytes: Int, inflater: DeflateInflater? = nil) {
        self.maxMessageBytes = maxMessageBytes
        self.inflater = inflater
    }

    mutating func receive(_ frame: WebSocketFrame) -> Event {
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
