@testable import Gateway
import NIOCore
import NIOWebSocket
import Testing

/// `WebSocketFrameReader`: frame boundaries on a byte stream, however the bytes are cut, and the limits it
/// enforces before buffering a payload.
struct WebSocketFrameReaderTests {
    struct Sent: Equatable {
        var fin, rsv1, rsv2, rsv3: Bool
        var opcode: UInt8
        var key: [UInt8]?
        var payload: [UInt8]
    }

    /// RFC 6455 §5.2 encoding, written here independently of the reader; `wideLength` uses the 16- or 64-bit
    /// length form even where a shorter one fits (receivers accept it).
    static func encode(_ f: Sent, wideLength: Int = 0) -> [UInt8] {
        var out: [UInt8] = [(f.fin ? 0x80 : 0) | (f.rsv1 ? 0x40 : 0) | (f.rsv2 ? 0x20 : 0) | (f.rsv3 ? 0x10 : 0) | f.opcode]
        let mask: UInt8 = f.key == nil ? 0 : 0x80
        let n = f.payload.count
        if n > 0xFFFF || wideLength == 2 {
            out.append(mask | 127)
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: UInt64(n) >> UInt64(shift))) }
        } else if n > 125 || wideLength == 1 {
            out += [mask | 126, UInt8(n >> 8), UInt8(n & 0xFF)]
        } else {
            out.append(mask | UInt8(n))
        }
        if let key = f.key {
            out += key
            out += f.payload.enumerated().map { $0.element ^ key[$0.offset % 4] }
        } else {
            out += f.payload
        }
        return out
    }

    static func received(_ frame: WebSocketFrame) -> Sent {
        Sent(fin: frame.fin, rsv1: frame.rsv1, rsv2: frame.rsv2, rsv3: frame.rsv3, opcode: UInt8(webSocketOpcode: frame.opcode),
             key: frame.maskKey.map { Array($0) }, payload: Array(frame.unmaskedData.readableBytesView))
    }

    /// Feeds `chunks` one by one, taking every frame out after each; returns the frames and the first failure.
    static func read(_ chunks: [[UInt8]], max: Int, reader: inout WebSocketFrameReader) -> (frames: [Sent], failure: UInt16?) {
        var frames: [Sent] = []
        for chunk in chunks {
            reader.append(ByteBuffer(bytes: chunk))
            loop: while true {
                switch reader.next() {
                case .frame(let frame): frames.append(received(frame))
                case .needMore: break loop
                case .fail(let code, _): return (frames, code)
                }
            }
        }
        return (frames, nil)
    }

    @Test func framesComeOutWhole_inOrder_howeverTheBytesAreCut() {
        var random = SplitMix(seed: 7)
        for _ in 0..<PropertyTests.iterations / 10 {
            var sent: [Sent] = []
            var stream: [UInt8] = []
            var boundaries: Set<Int> = []
            for _ in 0..<Int.random(in: 1...6, using: &random) {
                let opcode = UInt8.random(in: 0...15, using: &random)
                let size: Int = switch Int.random(in: 0..<10, using: &random) {
                case 0: Int.random(in: 126...70_000, using: &random)
                default: Int.random(in: 0...125, using: &random)
                }
                let frame = Sent(fin: .random(using: &random), rsv1: .random(using: &random), rsv2: .random(using: &random),
                                 rsv3: .random(using: &random), opcode: opcode,
                                 key: Int.random(in: 0..<5, using: &random) == 0 ? nil : (0..<4).map { _ in UInt8.random(in: 0...255, using: &random) },
                                 payload: opcode >= 8 ? Array(repeating: 0x41, count: min(size, 125)) : (0..<size).map { _ in UInt8.random(in: 0...255, using: &random) })
                sent.append(frame)
                stream += Self.encode(frame, wideLength: frame.payload.count <= 125 && frame.opcode < 8 ? Int.random(in: 0...2, using: &random) : 0)
                boundaries.insert(stream.count)
            }
            // Random cuts, including single bytes and cuts inside headers.
            var chunks: [[UInt8]] = []
            var at = 0
            while at < stream.count {
                let n = Int.random(in: 0..<4, using: &random) == 0 ? 1 : Int.random(in: 1...max(1, stream.count / 3), using: &random)
                chunks.append(Array(stream[at..<min(stream.count, at + n)]))
                at += n
            }
            var reader = WebSocketFrameReader(maxFrameBytes: 100_000)
            let (frames, failure) = Self.read(chunks, max: 100_000, reader: &reader)
            #expect(failure == nil)
            #expect(frames == sent)
            #expect(reader.pending == nil, "a stream that ends on a frame boundary leaves nothing buffered")
        }
    }

    @Test func anIdleConnectionHoldsNoBuffer_andAPartialFrameIsCopiedOutOfTheReadBuffer() {
        var reader = WebSocketFrameReader(maxFrameBytes: 1000)
        let ping = Self.encode(Sent(fin: true, rsv1: false, rsv2: false, rsv3: false, opcode: 0x9, key: [1, 2, 3, 4], payload: [7, 7]))
        let text = Self.encode(Sent(fin: true, rsv1: false, rsv2: false, rsv3: false, opcode: 0x1, key: [9, 8, 7, 6], payload: Array("hello".utf8)))
        var (frames, failure) = Self.read([ping + text], max: 1000, reader: &reader)
        #expect(failure == nil && frames.count == 2 && reader.pending == nil)

        // Half a frame: kept in a buffer of the reader's own, so the read buffer is free again.
        var readBuffer = ByteBuffer(bytes: text[0..<5])
        reader.append(readBuffer)
        guard case .needMore = reader.next() else { Issue.record("half a frame is not a frame"); return }
        #expect(reader.bufferedBytes == 5)
        #expect(readBuffer.modifyIfUniquelyOwned { _ in true } == true, "the reader must not keep the read buffer")
        (frames, failure) = Self.read([Array(text[5...])], max: 1000, reader: &reader)
        #expect(failure == nil && frames.map(\.payload) == [Array("hello".utf8)] && reader.pending == nil)
    }

    @Test func aPeerThatKeepsSendingNeverGrowsTheBufferPastAFrameAndARead() {
        // 20,000 ping frames of 16 bytes, read in pieces of 1,003 bytes: nearly every read ends inside a frame.
        var stream: [UInt8] = []
        let ping = Self.encode(Sent(fin: true, rsv1: false, rsv2: false, rsv3: false, opcode: 0x9, key: [1, 2, 3, 4], payload: Array(repeating: 1, count: 10)))
        for _ in 0..<20_000 { stream += ping }
        var reader = WebSocketFrameReader(maxFrameBytes: 1000)
        var frames = 0, largest = 0, at = 0
        while at < stream.count {
            reader.append(ByteBuffer(bytes: stream[at..<min(stream.count, at + 1003)]))
            at += 1003
            while case .frame = reader.next() { frames += 1 }
            largest = max(largest, reader.pending?.capacity ?? 0)
        }
        #expect(frames == 20_000)
        #expect(largest <= 4096, "held \(largest) bytes of capacity")
    }

    @Test func aFrameOverTheLimitFailsWith1009BeforeItsPayloadArrives() {
        for length in [1001, 70_000, Int(UInt32.max)] {
            var reader = WebSocketFrameReader(maxFrameBytes: 1000)
            var header: [UInt8] = [0x82]
            if length <= 0xFFFF {
                header += [0x80 | 126, UInt8(length >> 8), UInt8(length & 0xFF)]
            } else {
                header.append(0x80 | 127)
                for shift in stride(from: 56, through: 0, by: -8) { header.append(UInt8(truncatingIfNeeded: length >> shift)) }
            }
            let (frames, failure) = Self.read([header], max: 1000, reader: &reader)
            #expect(frames.isEmpty && failure == 1009, "declared \(length)")
            // Failed for good: later bytes are not read as frames.
            reader.append(ByteBuffer(bytes: [0x81, 0x00]))
            guard case .needMore = reader.next() else { Issue.record("a failed reader must stay failed"); return }
        }
        // Exactly the limit is allowed.
        var reader = WebSocketFrameReader(maxFrameBytes: 1000)
        let frame = Sent(fin: true, rsv1: false, rsv2: false, rsv3: false, opcode: 0x2, key: [1, 1, 1, 1], payload: Array(repeating: 3, count: 1000))
        #expect(Self.read([Self.encode(frame)], max: 1000, reader: &reader).frames == [frame])
    }

    @Test func malformedHeadersFailWith1002() {
        // A 64-bit length with its most significant bit set.
        var reader = WebSocketFrameReader(maxFrameBytes: 1000)
        #expect(Self.read([[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1]], max: 1000, reader: &reader).failure == 1002)
        // A control frame whose length field says more than 125.
        for opcode: UInt8 in [0x8, 0x9, 0xA] {
            reader = WebSocketFrameReader(maxFrameBytes: 1000)
            #expect(Self.read([[0x80 | opcode, 0x80 | 126, 0, 5]], max: 1000, reader: &reader).failure == 1002)
        }
    }

    /// Feeds `bytes` in `pieces`-byte reads as the connection does: whole frames to `receive`, and after each read
    /// the frame still arriving to `receivePartial`. Returns the events, stopping at the first failure.
    static func connection(_ bytes: [UInt8], pieces: Int, framing: inout WebSocketFraming) -> [WebSocketFraming.Event] {
        var reader = WebSocketFrameReader(maxFrameBytes: 1000)
        var events: [WebSocketFraming.Event] = []
        for start in stride(from: 0, to: bytes.count, by: pieces) {
            reader.append(ByteBuffer(bytes: bytes[start..<min(bytes.count, start + pieces)]))
            loop: while true {
                switch reader.next() {
                case .frame(let frame):
                    let event = framing.receive(frame)
                    if event != .none { events.append(event) }
                    if case .fail = event { return events }
                case .needMore:
                    if let (head, payload) = reader.partialFrame() {
                        let event = framing.receivePartial(head, payload: payload)
                        if case .fail = event { return events + [event] }
                    }
                    break loop
                case .fail(let code, let reason): return events + [.fail(code: code, reason: reason)]
                }
            }
        }
        return events
    }

    /// RFC 6455 §8.1, fail fast: a text frame cut by reads fails at the read that brings its first invalid byte,
    /// before the rest of the frame; valid text cut anywhere (inside a character too) is a message as before;
    /// a continuation frame carries on from the message's earlier fragments.
    @Test func aTextFrameCutByReadsFailsAtTheReadWithItsFirstInvalidByte() {
        func text(_ payload: [UInt8], opcode: UInt8 = 0x1, fin: Bool = true) -> [UInt8] {
            Self.encode(Sent(fin: fin, rsv1: false, rsv2: false, rsv3: false, opcode: opcode, key: [0x37, 0xFA, 0x21, 0x3D], payload: payload))
        }
        let good = Array("κόσμε, hello — ünïcödé".utf8)
        for pieces in [1, 2, 3, 5, 7] {
            var framing = WebSocketFraming(maxMessageBytes: 1000)
            #expect(Self.connection(text(good), pieces: pieces, framing: &framing) == [.text(String(decoding: good, as: UTF8.self))])
        }
        // A surrogate (ED A0 80) after some good text, then 100 more bytes: the read that brings A0 fails.
        let before = Array("κόσμε".utf8)
        let bad = text(before + [0xED, 0xA0, 0x80] + Array(repeating: 0x61, count: 100))
        let header = 2 + 4
        var framing = WebSocketFraming(maxMessageBytes: 1000)
        #expect(Self.connection(Array(bad[..<(header + before.count + 1)]), pieces: 4, framing: &framing) == [], "ED may start a character")
        framing = WebSocketFraming(maxMessageBytes: 1000)
        #expect(Self.connection(Array(bad[..<(header + before.count + 2)]), pieces: 4, framing: &framing) == [.fail(code: 1007, reason: "invalid UTF-8")])
        // A continuation frame: "é" begun in the first fragment (C3), ended in the second (A9), then FF.
        framing = WebSocketFraming(maxMessageBytes: 1000)
        let fragments = text([0x61, 0xC3], fin: false) + text([0xA9, 0x62, 0xFF] + Array(repeating: 0x61, count: 50), opcode: 0x0)
        #expect(Self.connection(Array(fragments[..<(header + 2 + header + 2)]), pieces: 3, framing: &framing) == [])
        framing = WebSocketFraming(maxMessageBytes: 1000)
        #expect(Self.connection(Array(fragments[..<(header + 2 + header + 3)]), pieces: 3, framing: &framing) == [.fail(code: 1007, reason: "invalid UTF-8")])
        // Binary frames are not text.
        framing = WebSocketFraming(maxMessageBytes: 1000)
        let binary = Self.encode(Sent(fin: true, rsv1: false, rsv2: false, rsv3: false, opcode: 0x2, key: [1, 2, 3, 4], payload: [0xFF, 0xFE] + Array(repeating: 0, count: 20)))
        #expect(Self.connection(Array(binary[..<10]), pieces: 2, framing: &framing) == [])
    }
}
