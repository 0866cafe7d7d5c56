import ChatDomain
import Foundation
@testable import Gateway
import NIOCore
import NIOWebSocket
import Testing
import Wire

struct CursorAndChannelTests {
    let alerts = try! ChannelName(parsing: "topic:alerts")

    @Test func cursorRoundTripsAndIsBoundToItsChannel() throws {
        let cursor = Cursor(channel: alerts, seq: 42)
        #expect(try Cursor(parsing: cursor.text, for: alerts).seq == 42)
        let other = try ChannelName(parsing: "topic:drift")
        #expect(throws: ApiError.self) { try Cursor(parsing: cursor.text, for: other) }
        do {
            _ = try Cursor(parsing: cursor.text, for: other)
        } catch {
            #expect(error.code == .invalidCursor)
        }
    }

    @Test(arguments: ["", "42", "abc.def", "-1.0000000000000000", "1.123", "1.zzzzzzzzzzzzzzzz", "99999999999999999999.0000000000000000", "1.ABCDEF0123456789", "1..2"])
    func malformedCursorsAreRefused(text: String) {
        #expect(throws: ApiError(.invalidCursor, "cursor is malformed", details: ["cursor": text])) { try Cursor(parsing: text, for: alerts) }
    }

    @Test(arguments: ["topic:a", "topic:alerts.prod_eu-1", "thread:6f1c2d3e-0000-4000-8000-1234567890ab", "thread:6F1C2D3E-0000-4000-8000-1234567890AB"])
    func validChannelNames(name: String) throws {
        let channel = try ChannelName(parsing: name)
        #expect(channel.rawValue == name.lowercased() || channel.rawValue == name)
    }

    @Test(arguments: ["", "topic:", "topic:UPPER", "topic:has space", "topic:" + String(repeating: "a", count: 65), "thread:123", "thread:6f1c2d3e00004000800012345678900ab", "room:x", "thread:"])
    func invalidChannelNames(name: String) {
        #expect(throws: ApiError.self) { try ChannelName(parsing: name) }
    }

    @Test func threadNamesAreCaseInsensitive() throws {
        #expect(try ChannelName(parsing: "thread:6F1C2D3E-0000-4000-8000-1234567890AB") == ChannelName(parsing: "thread:6f1c2d3e-0000-4000-8000-1234567890ab"))
    }

    @Test func uuidV7HasVersionAndVariant() {
        let id = UUIDv7.make()
        let chars = Array(id)
        #expect(chars.count == 36 && chars[14] == "7")
        #expect("89ab".contains(chars[19]))
    }

    /// UUIDs as Foundation reads them: v7 (message ids) carries its millisecond time in the first 48 bits;
    /// lowercase 8-4-4-4-12 with the RFC 9562 variant.
    @Test func uuidTextIsWhatFoundationReads() throws {
        for micros: Int64 in [0, 1_795_302_600_123_456, 281_474_976_710_655_999] {
            let id = UUIDv7.make(micros: micros)
            let uuid = try #require(UUID(uuidString: id))
            #expect(uuid.uuidString.lowercased() == id)
            let bytes = withUnsafeBytes(of: uuid.uuid) { Array($0) }
            #expect(bytes[0..<6].reduce(0) { $0 << 8 | Int64($1) } == micros / 1000)
            #expect(bytes[6] >> 4 == 7 && bytes[8] >> 6 == 2)
        }
    }

    /// New request ids are version-4 UUIDs, distinct: the counter's scramble is a bijection of the 62-bit
    /// numbers, shown by undoing it step by step (each multiplier must have an inverse modulo 2^62, so be odd).
    @Test func requestIdsAreDistinctUUIDs() throws {
        func inverse(_ c: UInt64) -> UInt64 {  // Newton's iteration: c * inv == 1 modulo 2^64 (when c is odd)
            var inv = c
            for _ in 0..<6 { inv = inv &* (2 &- c &* inv) }
            return inv
        }
        func unshift(_ y: UInt64, _ k: Int) -> UInt64 {  // undoes x ^= x >> k on 62 bits
            var x = y
            for _ in 0..<(62 / k + 1) { x = y ^ (x >> k) }
            return x
        }
        let (m0, m1) = RequestIds.multipliers
        let (s0, s1, s2) = RequestIds.shifts
        func unscramble(_ y: UInt64) -> UInt64 {
            var x = unshift(y, s2)
            x = (x &* inverse(m1)) & RequestIds.mask62
            x = unshift(x, s1)
            x = (x &* inverse(m0)) & RequestIds.mask62
            return unshift(x, s0)
        }
        var rng = SystemRandomNumberGenerator()
        for count in (UInt64(0)..<10_000).map({ $0 }) + (0..<10_000).map({ _ in rng.next() & RequestIds.mask62 }) {
            let scrambled = RequestIds.scramble(count)
            #expect(scrambled <= RequestIds.mask62)
            #expect(unscramble(scrambled) == count)
        }
        var ids = Set<String>()
        for _ in 0..<1000 {
            let id = GatewayApp.newRequestId()
            let uuid = try #require(UUID(uuidString: id))
            let bytes = withUnsafeBytes(of: uuid.uuid) { Array($0) }
            #expect(uuid.uuidString.lowercased() == id && bytes[6] >> 4 == 4 && bytes[8] >> 6 == 2)
            ids.insert(id)
        }
        #expect(ids.count == 1000)
    }

    @Test func timestampsHaveMicroseconds() {
        #expect(Timestamp.iso8601(micros: 1_795_302_600_123_456) == "2026-11-21T23:10:00.123456Z")
        #expect(Timestamp.iso8601(micros: 0) == "1970-01-01T00:00:00.000000Z")
    }

    @Test func messageJSONIsValidAndComplete() throws {
        let message = Message(id: "0193a6c4-5a1e-7c3b-9f00-2a6f4e1d9b10", channel: alerts, seq: 7, createdAtMicros: 1_795_302_600_000_001,
                              sender: "al\"ice\n", requestId: nil, body: "{\"a\":1}")
        let object = try #require(json(message.json) as [String: Any]?)
        #expect(object["seq"] as? Int == 7)
        #expect(object["sender"] as? String == "al\"ice\n")
        #expect(object["request_id"] is NSNull)
        #expect(object["cursor"] as? String == Cursor.text(channel: alerts, seq: 7))
        #expect((object["body"] as? [String: Any])?["a"] as? Int == 1)
    }

    /// The one-pass writer against the message JSON written out field by field (Foundation's calendar for the
    /// timestamp), on random senders, request ids (quotes, controls, non-ASCII), sequences and times.
    @Test func messageJSONMatchesItsFieldsWrittenOneByOne() throws {
        var random = SplitMix(seed: 3)
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let pieces = ["a", "é", "\"", "\\", "\n", "\u{01}", "\u{1F}", "水", "🙂", " ", "\u{7F}"]
        func text() -> String { (0..<Int.random(in: 0...12, using: &random)).map { _ in pieces.randomElement(using: &random)! }.joined() }
        for _ in 0..<2_000 {
            let seq = Int64.random(in: 0...Int64.max, using: &random) >> Int64.random(in: 0...62, using: &random)
            let micros = Int64.random(in: 0...4_102_444_800_000_000, using: &random)
            let sender = text(), requestId: String? = Bool.random(using: &random) ? text() : nil
            let body = "{\"k\":" + JSONText.quoted(text()) + "}"
            let message = Message(id: UUIDv7.make(micros: micros), channel: alerts, seq: seq, createdAtMicros: micros, sender: sender,
                                  requestId: requestId, body: body)
            let parts = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: Date(timeIntervalSince1970: Double(micros / 1_000_000)))
            let time = String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", parts.year!, parts.month!, parts.day!, parts.hour!, parts.minute!,
                              parts.second!, Int(micros % 1_000_000))
            let cursor = "\(seq)." + String(format: "%016llx", alerts.cursorHash)
            let expected = "{\"id\":\"\(message.id)\",\"channel\":\"\(alerts.rawValue)\",\"seq\":\(seq),\"cursor\":\"\(cursor)\",\"created_at\":\"\(time)\","
                + "\"sender\":\(JSONText.quoted(sender)),\"request_id\":\(requestId.map(JSONText.quoted) ?? "null"),\"body\":\(body)}"
            #expect(message.json == expected)
            #expect(message.cursor == cursor && Timestamp.iso8601(micros: micros) == time)
            let object = try #require(json(message.json) as [String: Any]?)
            #expect(object["sender"] as? String == sender && (object["request_id"] as? String) == requestId)
        }
    }

    @Test func canonicalBodiesCompareEqualRegardlessOfKeyOrder() throws {
        let a = try JSONText.canonicalBody(JSONText.parseValue(Array("{\"b\":1,\"a\":[1,2]}".utf8)), limit: 100)
        let b = try JSONText.canonicalBody(JSONText.parseValue(Array("{ \"a\" : [1, 2], \"b\" : 1 }".utf8)), limit: 100)
        #expect(a == b)
        #expect(throws: ApiError.self) { try JSONText.canonicalBody(.object(["x": .string(String(repeating: "y", count: 200))]), limit: 100) }
        #expect(throws: ApiError.self) { try JSONText.canonicalBody(.array([.integer(1), .integer(2)]), limit: 100) }
    }

    @Test func errorEnvelopeIsJSON() {
        let envelope = json(ApiError(.forbidden, "no \"way\"", details: ["channel": "topic:x"]).envelopeJSON(requestId: "r1"))
        #expect(envelope["code"] as? String == "FORBIDDEN")
        #expect(envelope["message"] as? String == "no \"way\"")
        #expect((envelope["details"] as? [String: Any])?["channel"] as? String == "topic:x")
        #expect(envelope["requestId"] as? String == "r1")
    }
}

struct WireTests {
    func frame(_ opcode: WebSocketOpcode, _ bytes: [UInt8], fin: Bool = true, masked: Bool = true, rsv1: Bool = false) -> WebSocketFrame {
        let key: WebSocketMaskingKey? = masked ? .random() : nil
        var data = ByteBuffer(bytes: bytes)
        if let key { data.webSocketMask(key) }
        return WebSocketFrame(fin: fin, rsv1: rsv1, opcode: opcode, maskKey: key, data: data)
    }

    @Test func fragmentsWithInterleavedPingsMakeOneMessage() {
        var framing = WebSocketFraming(maxMessageBytes: 100)
        #expect(framing.receive(frame(.text, Array("he".utf8), fin: false)) == .none)
        #expect(framing.receive(frame(.ping, [1, 2])) == .ping(ByteBuffer(bytes: [1, 2])))
        #expect(framing.receive(frame(.continuation, Array("l".utf8), fin: false)) == .none)
        #expect(framing.receive(frame(.continuation, Array("lo".utf8))) == .text("hello"))
    }

    @Test func utf8IsCheckedAcrossFragments() {
        var framing = WebSocketFraming(maxMessageBytes: 100)
        // "é" split over two fragments is fine …
        #expect(framing.receive(frame(.text, [0xC3], fin: false)) == .none)
        #expect(framing.receive(frame(.continuation, [0xA9])) == .text("é"))
        // … a byte that can never be UTF-8 is not.
        #expect(framing.receive(frame(.text, [0x61, 0xFF])) == .fail(code: 1007, reason: "invalid UTF-8"))
    }

    @Test func invalidUTF8FailsAtTheFragmentThatHoldsIt() {
        var framing = WebSocketFraming(maxMessageBytes: 100)
        // A surrogate (ED A0 80) in the first fragment fails there, before the message ends.
        #expect(framing.receive(frame(.text, [0xCE, 0xBA, 0xED, 0xA0, 0x80], fin: false)) == .fail(code: 1007, reason: "invalid UTF-8"))
        framing = WebSocketFraming(maxMessageBytes: 100)
        #expect(framing.receive(frame(.text, [0x61], fin: false)) == .none)
        #expect(framing.receive(frame(.continuation, [0xF4, 0x90], fin: false)) == .fail(code: 1007, reason: "invalid UTF-8"))
        // A sequence left open at the end of the message fails at the end.
        framing = WebSocketFraming(maxMessageBytes: 100)
        #expect(framing.receive(frame(.text, [0x61, 0xE2, 0x82])) == .fail(code: 1007, reason: "invalid UTF-8"))
    }

    @Test func protocolErrors() {
        var framing = WebSocketFraming(maxMessageBytes: 10)
        #expect(framing.receive(frame(.text, [0x61], masked: false)) == .fail(code: 1002, reason: "client frames must be masked"))
        #expect(framing.receive(frame(.text, [0x61], rsv1: true)) == .fail(code: 1002, reason: "reserved bits set"))
        #expect(framing.receive(frame(.continuation, [0x61])) == .fail(code: 1002, reason: "continuation without a message"))
        #expect(framing.receive(frame(.ping, [], fin: false)) == .fail(code: 1002, reason: "bad control frame"))
        #expect(framing.receive(frame(.text, Array(repeating: 0x61, count: 11))) == .fail(code: 1009, reason: "message too big"))
        #expect(framing.receive(frame(.text, Array(repeating: 0x61, count: 6), fin: false)) == .none)
        #expect(framing.receive(frame(.continuation, Array(repeating: 0x61, count: 6))) == .fail(code: 1009, reason: "message too big"))
    }

    @Test func closeCodesAreValidated() {
        var framing = WebSocketFraming(maxMessageBytes: 10)
        #expect(framing.receive(frame(.connectionClose, [])) == .close(code: nil))
        #expect(framing.receive(frame(.connectionClose, [0x03, 0xE8])) == .close(code: 1000))
        #expect(framing.receive(frame(.connectionClose, [0x03])) == .fail(code: 1002, reason: "bad close payload"))
        #expect(framing.receive(frame(.connectionClose, [0x03, 0xED])) == .fail(code: 1002, reason: "invalid close code"))  // 1005
        #expect(framing.receive(frame(.connectionClose, [0x0F, 0xA0, 0xFF])) == .fail(code: 1007, reason: "invalid UTF-8 in close reason"))
    }

    @Test func serverFramesUseTheShortestLength() {
        #expect(Array(WireEncoding.frame(.text, text: "hi").readableBytesView) == [0x81, 2, 0x68, 0x69])
        let medium = WireEncoding.frame(.text, text: String(repeating: "a", count: 300))
        #expect(Array(medium.readableBytesView.prefix(4)) == [0x81, 126, 0x01, 0x2C])
        let large = WireEncoding.frame(.binary, payload: ByteBuffer(repeating: 0, count: 70_000))
        #expect(Array(large.readableBytesView.prefix(10)) == [0x82, 127, 0, 0, 0, 0, 0, 0x01, 0x11, 0x70])
        #expect(Array(WireEncoding.closeFrame(code: 4008).readableBytesView) == [0x88, 2, 0x0F, 0xA8])
    }

    @Test func sseEventCarriesTheCursorAsId() throws {
        let channel = try ChannelName(parsing: "topic:x")
        let message = Message(id: "i", channel: channel, seq: 3, createdAtMicros: 1, sender: "s", requestId: "r", body: "{}")
        let text = String(buffer: WireEncoding.serverSentEvent(message))
        // One HTTP/1.1 chunk: its hex length, CRLF, the event, CRLF.
        let event = "id: \(message.cursor)\nevent: message\ndata: \(message.json)\n\n"
        #expect(text == String(event.utf8.count, radix: 16) + "\r\n" + event + "\r\n")
    }

    /// An HTTP/1.0 stream gets the events without the chunk framing: a batch of chunks joined comes apart
    /// into its payloads; bytes that are not chunks are not taken for them.
    @Test func sseChunksUnwrapToTheirEventsForHTTP10() throws {
        let channel = try ChannelName(parsing: "topic:x")
        let messages = (1...3).map { Message(id: "i\($0)", channel: channel, seq: Int64($0), createdAtMicros: Int64($0), sender: "s", requestId: nil,
                                            body: "{\"n\":\"" + String(repeating: "x", count: $0 * 100) + "\"}") }
        var batch = ByteBuffer()
        for message in messages { var chunk = WireEncoding.serverSentEvent(message); batch.writeBuffer(&chunk) }
        let events = messages.map { "id: \($0.cursor)\nevent: message\ndata: \($0.json)\n\n" }.joined()
        #expect(WireEncoding.unchunked(batch).map { String(buffer: $0) } == events)
        #expect(WireEncoding.unchunked(ByteBuffer(string: "zz\r\nabc\r\n")) == nil)
        #expect(WireEncoding.unchunked(ByteBuffer(string: "5\r\nabc\r\n")) == nil)
    }
}

/// Property: the incremental validator agrees with the standard library on any bytes, split anywhere.
struct UTF8ValidatorTests {
    @Test func agreesWithTheStandardLibraryOnRandomBytesSplitAnywhere() {
        var random = SplitMix(seed: 6455)
        // Bytes drawn mostly from the interesting ranges (lead bytes, continuations, ASCII).
        let pool: [UInt8] = Array(0x00...0x7F) + Array(0x80...0xBF) + Array(0xC0...0xFF) + Array(0x80...0xBF)
        for _ in 0..<20_000 {
            let length = Int.random(in: 0...12, using: &random)
            let bytes = (0..<length).map { _ in pool.randomElement(using: &random)! }
            let expected = String(validating: bytes, as: UTF8.self) != nil
            let cut = Int.random(in: 0...length, using: &random)
            var validator = UTF8Validator()
            let ok = validator.feed(bytes[..<cut]) && validator.feed(bytes[cut...]) && validator.isComplete
            #expect(ok == expected, "\(bytes.map { String($0, radix: 16) }) split at \(cut)")
            if ok != expected { return }
        }
    }
}

/// URL percent-decoding without Foundation (the request path runs it for every path segment and query
/// component): the same answers as Foundation's `removingPercentEncoding` (with `+` as a space in queries).
struct PercentDecodingTests {
    @Test func agreesWithFoundationOnFixedAndRandomInputs() {
        var inputs = ["", "plain", "a%20b", "a+b", "%2B", "%e2%82%ac", "%E2%82%AC", "%", "%4", "%zz", "%ff", "%c3", "%c3%a9", "x%00y",
                      "access_token=abc", "since=12.ab34&timeout=30", "%%", "+%2b+", "caf%C3%A9+au+lait", "%F0%9F%98%80"]
        var rng = SplitMix(seed: 5)
        let alphabet = Array("ab+%0123456789ABCDEFcefz=&é")
        for _ in 0..<3000 {
            inputs.append(String((0..<Int(rng.next() % 12)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }))
        }
        for input in inputs {
            // Where escapes decode to bytes that are not UTF-8, Foundation on Linux sometimes answers nil and
            // sometimes repairs them (U+FFFD); ours always answers nil (the caller then keeps the raw text).
            let foundation = (path: input.removingPercentEncoding, query: input.replacingOccurrences(of: "+", with: " ").removingPercentEncoding)
            let ours = (path: PercentDecoding.decode(Substring(input), plusAsSpace: false), query: PercentDecoding.decode(Substring(input), plusAsSpace: true))
            if foundation.path?.contains("\u{FFFD}") == true { #expect(ours.path == nil && ours.query == nil, "\(input)"); continue }
            #expect(ours.path == foundation.path, "path: \(input)")
            #expect(ours.query == foundation.query, "query: \(input)")
        }
        #expect(PercentDecoding.decode("%ff", plusAsSpace: false) == nil && PercentDecoding.decode("a%c3", plusAsSpace: true) == nil)
        #expect(Substring("  Bearer x \t").trimmingSpaces == "Bearer x" && Substring(" \t ").trimmingSpaces.isEmpty)
    }
}

/// The request target split on its bytes, against the same rules written with `Character` splitting (the
/// implementation before), on random targets.
struct RequestTargetTests {
    static func reference(_ uri: String) -> (path: [String], query: [String: String]) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = parts[0].split(separator: "/").map { PercentDecoding.decode($0, plusAsSpace: false) ?? String($0) }
        var query: [String: String] = [:]
        for pair in parts.count > 1 ? parts[1].split(separator: "&") : [] {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = PercentDecoding.decode(kv[0], plusAsSpace: true) ?? String(kv[0])
            let value = kv.count > 1 ? (PercentDecoding.decode(kv[1], plusAsSpace: true) ?? String(kv[1])) : ""
            if query[key] == nil { query[key] = value }
        }
        return (path, query)
    }

    @Test func targetsSplitAsTheCharacterRulesSplitThem() {
        var rng = SplitMix(seed: 9)
        let alphabet = Array("/?&=ab+%2F0é水.~-")
        var inputs = ["", "/", "/v1/ws", "/v1/channels/topic:a/poll?since=3.ab&timeout=25&limit=100", "/a//b/?x=1&x=2&y&=z&w==v", "?", "/p?a=%2F&b=%E2%82%AC"]
        for _ in 0..<5000 { inputs.append(String((0..<Int(rng.next() % 24)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] })) }
        for uri in inputs {
            let (path, query) = HTTPRequest.target(uri)
            let expected = Self.reference(uri)
            #expect(path == expected.path && query == expected.query, "\(uri)")
        }
    }
}

/// The request target as logged: every spelling of `access_token` masked, anything else as it came.
struct RequestTargetMaskingTests {
    @Test func tokensAreMaskedInAnySpellingAndOtherTargetsPassUnchanged() {
        #expect(RequestLog.masked("/v1/ws?access_token=secret") == "/v1/ws?access_token=***")
        #expect(RequestLog.masked("/v1/x/poll?since=1.ab&access%5Ftoken=secret&timeout=5") == "/v1/x/poll?since=1.ab&access%5Ftoken=***&timeout=5")
        #expect(RequestLog.masked("/v1/x/poll?access+token=a&access_tok%65n=b") == "/v1/x/poll?access+token=a&access_tok%65n=***")
        #expect(RequestLog.masked("/v1/x/poll?since=1.ab&timeout=5") == "/v1/x/poll?since=1.ab&timeout=5")
        #expect(RequestLog.masked("/v1/x/messages") == "/v1/x/messages")
    }
}
