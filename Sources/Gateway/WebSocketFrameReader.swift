import NIOCore
import NIOWebSocket

/// RFC 6455 §5.2 frame boundaries on a connection's byte stream: the connection appends what it reads and takes
/// frames out until more bytes are needed. What the frames mean (masking, reserved bits, fragmentation, UTF-8) is
/// `WebSocketFraming`'s job.
///
/// Between frames it holds nothing, so an idle connection keeps no buffer here; the bytes of a frame still
/// arriving are copied into a buffer of its own (NIO then reuses its read buffer for the next read). A frame
/// that declares a payload over the limit fails before any of that payload is buffered.
struct WebSocketFrameReader {
    enum Next {
        case frame(WebSocketFrame)
        case needMore
        /// The stream is unusable from here: fail the connection with this close code.
        case fail(code: UInt16, reason: String)
    }

    let maxFrameBytes: Int
    private(set) var pending: ByteBuffer?
    /// Whether `pending` is this reader's own copy (appending to it copies nothing more) or a read buffer.
    private var ownsPending = false
    private var failed = false

    init(maxFrameBytes: Int) {
        self.maxFrameBytes = maxFrameBytes
    }

    /// Bytes buffered for a frame that is not complete yet.
    var bufferedBytes: Int { pending?.readableBytes ?? 0 }

    mutating func append(_ bytes: ByteBuffer) {
        guard !failed else { return }
        if pending == nil {
            pending = bytes
            ownsPending = false
        } else {
            var bytes = bytes
            pending!.writeBuffer(&bytes)
        }
    }

    mutating func next() -> Next {
        guard !failed, var buffer = pending else { return .needMore }
        pending = nil  // `buffer` is then the only reference: no copy on write below
        switch Self.header(buffer.readableBytesView, maxFrameBytes: maxFrameBytes) {
        case .incomplete:
            keep(buffer)
            return .needMore
        case .invalid(let code, let reason):
            failed = true
            return .fail(code: code, reason: reason)
        case .complete(let head):
            buffer.moveReaderIndex(forwardBy: head.headerLength)
            let data = buffer.readSlice(length: head.payloadLength)!
            let frame = WebSocketFrame(fin: head.first & 0x80 != 0, rsv1: head.first & 0x40 != 0, rsv2: head.first & 0x20 != 0,
                                       rsv3: head.first & 0x10 != 0, opcode: WebSocketOpcode(encodedWebSocketOpcode: head.first & 0x0F)!,
                                       maskKey: head.maskKey, data: data)
            if buffer.readableBytes > 0 {
                pending = buffer
            } else {
                ownsPending = false  // nothing left: hold no buffer
            }
            return .frame(frame)
        }
    }

    /// The frame still arriving, once its header is here: the header and the part of its (masked) payload
    /// already read. Nil when no frame is pending or its header is not complete.
    func partialFrame() -> (head: Head, payload: ByteBufferView)? {
        guard !failed, let buffer = pending,
              case .complete(let head) = Self.header(buffer.readableBytesView, maxFrameBytes: maxFrameBytes, whole: false) else { return nil }
        let view = buffer.readableBytesView
        let start = view.startIndex + head.headerLength
        return (head, view[start..<min(view.endIndex, start + head.payloadLength)])
    }

    /// Keeps the bytes of an incomplete frame: a read buffer's are copied out into a buffer of the reader's own;
    /// in its own buffer, the frames already taken out are dropped (a peer that keeps sending never makes it
    /// grow past one frame and one read).
    private mutating func keep(_ buffer: ByteBuffer) {
        if ownsPending {
            var buffer = buffer
            if buffer.readerIndex > 0 { buffer.discardReadBytes() }
            pending = buffer
            return
        }
        var own = ByteBuffer()
        own.reserveCapacity(buffer.readableBytes)
        var rest = buffer
        own.writeBuffer(&rest)
        pending = own
        ownsPending = true
    }

    struct Head {
        var first: UInt8
        var maskKey: WebSocketMaskingKey?
        var headerLength: Int
        var payloadLength: Int
    }

    enum HeaderResult {
        /// More bytes are needed.
        case incomplete
        case complete(Head)
        case invalid(code: UInt16, reason: String)
    }

    /// Reads a frame header at the start of `bytes` and checks that the whole frame is there (`whole`; else
    /// only the header).
    static func header(_ bytes: ByteBufferView, maxFrameBytes: Int, whole: Bool = true) -> HeaderResult {
        guard bytes.count >= 2 else { return .incomplete }
        var i = bytes.startIndex
        let first = bytes[i], second = bytes[i + 1]
        i += 2
        let masked = second & 0x80 != 0
        var length = Int(second & 0x7F)
        if first & 0x08 != 0 && length > 125 {
            return .invalid(code: 1002, reason: "bad control frame")
        }
        if length == 126 {
            guard bytes.endIndex - i >= 2 else { return .incomplete }
            length = Int(bytes[i]) << 8 | Int(bytes[i + 1])
            i += 2
        } else if length == 127 {
            guard bytes.endIndex - i >= 8 else { return .incomplete }
            guard bytes[i] & 0x80 == 0 else { return .invalid(code: 1002, reason: "bad frame length") }
            var value: UInt64 = 0
            for k in 0..<8 { value = value << 8 | UInt64(bytes[i + k]) }
            i += 8
            guard value <= UInt64(maxFrameBytes) else { return .invalid(code: 1009, reason: "message too big") }
            length = Int(value)
        }
        guard length <= maxFrameBytes else { return .invalid(code: 1009, reason: "message too big") }
        var maskKey: WebSocketMaskingKey?
        if masked {
            guard bytes.endIndex - i >= 4 else { return .incomplete }
            maskKey = WebSocketMaskingKey(bytes[i..<(i + 4)])
            i += 4
        }
        let headerLength = i - bytes.startIndex
        guard !whole || bytes.count >= headerLength + length else { return .incomplete }
        return .complete(Head(first: first, maskKey: maskKey, headerLength: headerLength, payloadLength: length))
    }
}
