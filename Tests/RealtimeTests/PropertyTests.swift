@testable import ChatDomain
import Foundation
@testable import Gateway
import NIOCore
import NIOWebSocket
import Testing
import Wire

/// Seeded random inputs for the parsers that face the network: the WebSocket frame state machine, the
/// command decoder, the cursor parser and the SSE `Last-Event-ID` parser. None may crash, each answers only
/// what it documents, and valid inputs round-trip. `make test` runs a bounded number of cases;
/// `make fuzz` runs many more (FUZZ_ITERATIONS).
struct PropertyTests {
    static let iterations = Int(ProcessInfo.processInfo.environment["FUZZ_ITERATIONS"] ?? "") ?? 3_000
    typealias Random = SplitMix

    static func bytes(_ random: inout Random, max: Int) -> [UInt8] {
        (0..<Int.random(in: 0...max, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
    }

    @Test func frameStateMachineAnswersEveryFrameSequenceWithADocumentedEvent() {
        var random = Random(seed: 1)
        let opcodes: [WebSocketOpcode] = [.text, .binary, .continuation, .ping, .pong, .connectionClose, WebSocketOpcode(encodedWebSocketOpcode: 0x3)!,
                                          WebSocketOpcode(encodedWebSocketOpcode: 0xB)!]
        let allowedFailures: Set<UInt16> = [1002, 1007, 1009]
        for _ in 0..<Self.iterations {
            var framing = WebSocketFraming(maxMessageBytes: 64,
                                           inflater: Bool.random(using: &random) ? DeflateInflater(.init(clientNoContextTakeover: Bool.random(using: &random))) : nil)
            for _ in 0..<Int.random(in: 1...8, using: &random) {
                let key: WebSocketMaskingKey? = Int.random(in: 0..<10, using: &random) == 0 ? nil : .random()
                var data = ByteBuffer(bytes: Self.bytes(&random, max: 80))
                if let key { data.webSocketMask(key) }
                let frame = WebSocketFrame(fin: Bool.random(using: &random), rsv1: Int.random(in: 0..<6, using: &random) == 0,
                                           opcode: opcodes.randomElement(using: &random)!, maskKey: key, data: data)
                if case .fail(let code, _) = framing.receive(frame) {
                    #expect(allowedFailures.contains(code))
                    break
                }
            }
        }
    }

    @Test func validTextSplitIntoRandomFragmentsIsReassembledExactly() {
        var random = Random(seed: 2)
        let samples = ["", "hello", "κόσμε", "emoji 👍🏽 mix", String(repeating: "ab", count: 30)]
        for _ in 0..<Self.iterations {
            let text = samples.randomElement(using: &random)!
            let bytes = Array(text.utf8)
            var cuts = (0..<Int.random(in: 0...3, using: &random)).map { _ in Int.random(in: 0...bytes.count, using: &random) }.sorted()
            cuts = [0] + cuts + [bytes.count]
            var framing = WebSocketFraming(maxMessageBytes: 1000)
            var event = WebSocketFraming.Event.none
            for i in 0..<(cuts.count - 1) {
                let key = WebSocketMaskingKey.random()
                var data = ByteBuffer(bytes: bytes[cuts[i]..<cuts[i + 1]])
                data.webSocketMask(key)
                event = framing.receive(WebSocketFrame(fin: i == cuts.count - 2, opcode: i == 0 ? .text : .continuation, maskKey: key, data: data))
            }
            #expect(event == .text(text))
        }
    }

    /// Accepts exactly the JSON objects (by Foundation's reading) nested at most 64 deep, and returns that
    /// object; everything else is `BAD_REQUEST`. Inputs mix random pieces, random bytes, valid objects and
    /// objects nested around the limit.
    @Test func commandDecoderAcceptsExactlyObjectsWithinTheDepthLimit() {
        var random = Random(seed: 3)
        let pieces = ["{", "}", "[", "]", "\"", ":", ",", "\"type\"", "\"subscribe\"", "1e400", "-0", "null", "true", "\\u0000", "\\", " ", "é", "\u{0}"]
        var accepted = 0, deepRefused = 0
        for _ in 0..<Self.iterations {
            let input: [UInt8]
            switch Int.random(in: 0..<4, using: &random) {
            case 0: input = Array((0..<Int.random(in: 0...40, using: &random)).map { _ in pieces.randomElement(using: &random)! }.joined().utf8)
            case 1: input = Self.bytes(&random, max: 60)
            case 2: input = Array("{\"type\":\"ping\",\"id\":\(Int.random(in: 0...1000, using: &random)),\"x\":[true,null,\"é\"]}".utf8)
            default:
                let depth = Int.random(in: 60...68, using: &random)
                input = Array(("{\"a\":" + String(repeating: "[", count: depth - 1) + String(repeating: "]", count: depth - 1) + "}").utf8)
            }
            let oracle = (try? JSONSerialization.jsonObject(with: Data(input))) as? [String: Any]
            let tooDeep = JSONDepth.exceeds(JSONText.maxDepth, in: input)
            do {
                let object = try JSONText.parseObject(input)
                accepted += 1
                #expect(oracle != nil && !tooDeep, "accepted \(String(decoding: input, as: UTF8.self))")
                if let oracle { #expect(NSDictionary(dictionary: object).isEqual(to: oracle)) }
            } catch {
                #expect(error.code == .badRequest)
                #expect(oracle == nil || tooDeep, "refused a valid object: \(String(decoding: input, as: UTF8.self))")
                if oracle != nil && tooDeep { deepRefused += 1 }
            }
        }
        // Both sides of the property were exercised.
        #expect(accepted > Self.iterations / 10 && deepRefused > 0)
    }

    /// The WebSocket command reader: what Foundation does not read as a JSON object (or what nests deeper than
    /// 64) is `BAD_REQUEST` saying so; an object is a command or a field error naming the field; every
    /// command encoded by the wire type reads back as itself.
    @Test func commandReaderRefusesExactlyWhatIsNotACommandObject() {
        var random = Random(seed: 6)
        let pieces = ["{", "}", "[", "]", "\"", ":", ",", "\"type\"", "\"subscribe\"", "\"ping\"", "\"id\"", "\"channel\"", "1", "-0", "null",
                      "true", "\\u0000", "\\", " ", "é"]
        let notACommand: Set<String> = ["request is not valid JSON", "request must be a JSON object", "JSON nested deeper than 64 levels"]
        var commands = 0, fieldErrors = 0, refused = 0
        for _ in 0..<Self.iterations {
            let input: [UInt8]
            switch Int.random(in: 0..<5, using: &random) {
            case 0: input = Array((0..<Int.random(in: 0...30, using: &random)).map { _ in pieces.randomElement(using: &random)! }.joined().utf8)
            case 4:
                // Objects with a field wrong: the error names it, with its code, and keeps the command's id.
                let id = Int.random(in: 0...99, using: &random)
                let wrong: [(String, CommandError.Code)] = [("{\"type\":\"dance\",\"id\":\(id)}", .unknownCommand), ("{\"id\":\(id)}", .badRequest),
                                                             ("{\"type\":\"subscribe\",\"id\":\(id)}", .badRequest),
                                                             ("{\"type\":\"subscribe\",\"id\":\(id),\"channel\":\"c\",\"since\":5}", .invalidCursor),
                                                             ("{\"type\":\"subscribe\",\"id\":\(id),\"channel\":\"c\",\"history\":1001}", .badRequest),
                                                             ("{\"type\":\"publish\",\"id\":\(id),\"channel\":\"c\",\"request_id\":1}", .badRequest),
                                                             ("{\"type\":\"read\",\"id\":\(id),\"channel\":\"c\",\"cursor\":[]}", .invalidCursor)]
                let (text, code) = wrong.randomElement(using: &random)!
                if case .failure(let error) = ClientCommand.decode(text) {
                    #expect(error.code == code && error.id == .integer(Int64(id)), "\(text): \(error)")
                } else {
                    Issue.record("read a command from \(text)")
                }
                input = Array(text.utf8)
            case 1: input = Self.bytes(&random, max: 60)
            case 2:
                let id = Int64.random(in: -1000...1000, using: &random)
                let all: [ClientCommand] = [.ping(id: .integer(id)), .subscribe(id: .string("s\(id)"), channel: "topic:a", since: "x", history: nil),
                                            .subscribe(id: nil, channel: "topic:a", history: Int(id.magnitude % 1001)), .unsubscribe(id: .integer(id), channel: "c"),
                                            .publish(id: .string("p"), channel: "topic:a", requestId: "r\(id)", body: .object(["n": .integer(id), "x": .array([.null, .bool(true), .string("é\n")])])),
                                            .read(id: nil, channel: "thread:t", cursor: "c"), .refresh(id: .integer(id), token: "t")]
                let command = all.randomElement(using: &random)!
                #expect(ClientCommand.decode(command.text) == .success(command), "round trip of \(command.text)")
                input = Array(command.text.utf8)
            default:
                let depth = Int.random(in: 60...68, using: &random)
                input = Array(("{\"type\":\"ping\",\"a\":" + String(repeating: "[", count: depth - 1) + String(repeating: "]", count: depth - 1) + "}").utf8)
            }
            let isObject = ((try? JSONSerialization.jsonObject(with: Data(input))) as? [String: Any]) != nil
            let tooDeep = JSONDepth.exceeds(JSONDepth.limit, in: input)
            switch ClientCommand.decode(bytes: input) {
            case .success:
                commands += 1
                #expect(isObject && !tooDeep, "read a command from \(String(decoding: input, as: UTF8.self))")
            case .failure(let error) where notACommand.contains(error.message):
                refused += 1
                #expect(error.code == .badRequest)
                #expect(!isObject || tooDeep, "refused an object: \(String(decoding: input, as: UTF8.self))")
            case .failure(let error):
                fieldErrors += 1
                #expect(isObject && !tooDeep, "a field error for \(String(decoding: input, as: UTF8.self)): \(error.message)")
            }
        }
        #expect(commands > Self.iterations / 10 && refused > Self.iterations / 10 && fieldErrors > 0)
    }

    @Test func cursorParserAcceptsExactlyWhatItPrintsForItsChannel() throws {
        var random = Random(seed: 4)
        let channel = try ChannelName(parsing: "topic:fuzz")
        let other = try ChannelName(parsing: "topic:other")
        let alphabet = Array("0123456789abcdefABCDEF.-+ x")
        for _ in 0..<Self.iterations {
            let seq = Int64.random(in: 0...Int64.max, using: &random)
            let valid = Cursor.text(channel: channel, seq: seq)
            #expect((try? Cursor(parsing: valid, for: channel))?.seq == seq)
            #expect((try? Cursor(parsing: valid, for: other)) == nil)
            // Random text and single-character mutations of a valid cursor: parsed only when it is exactly valid.
            var mutated = Array(valid)
            mutated[Int.random(in: 0..<mutated.count, using: &random)] = alphabet.randomElement(using: &random)!
            for candidate in [String(mutated), String((0..<Int.random(in: 0...24, using: &random)).map { _ in alphabet.randomElement(using: &random)! })] {
                do {
                    let cursor = try Cursor(parsing: candidate, for: channel)
                    #expect(Cursor.text(channel: channel, seq: cursor.seq) == candidate)
                } catch {
                    #expect(error.code == .invalidCursor)
                }
            }
        }
    }

    @Test func lastEventIDIsACursorAfterTrimmingSpaces() throws {
        var random = Random(seed: 5)
        let channel = try ChannelName(parsing: "topic:sse")
        for _ in 0..<Self.iterations {
            let seq = Int64.random(in: 0...1_000_000, using: &random)
            let header = String(repeating: " ", count: Int.random(in: 0...2, using: &random)) + Cursor.text(channel: channel, seq: seq)
                + String(repeating: " ", count: Int.random(in: 0...2, using: &random))
            #expect((try? EventStream.resumeCursor(header, for: channel))?.seq == seq)
            // Junk, or a valid cursor with a byte changed: accepted only when it is a cursor of the channel.
            var near = Array(header.utf8)
            near[Int.random(in: 0..<near.count, using: &random)] = UInt8.random(in: 0x20...0x7E, using: &random)
            for candidate in [String(decoding: Self.bytes(&random, max: 30), as: UTF8.self), String(decoding: near, as: UTF8.self)] {
                do {
                    let cursor = try EventStream.resumeCursor(candidate, for: channel)
                    #expect(Cursor.text(channel: channel, seq: cursor.seq) == candidate.trimmingCharacters(in: .whitespaces))
                } catch {
                    #expect(error.code == .invalidCursor)
                }
            }
        }
    }
}
