import Foundation
import Testing
@testable import Wire

/// `JSONReader` and the canonical writer against Foundation, which they replace on the publish path: the
/// same documents accepted, the same values read, the same canonical text written (stored bodies compare
/// by that text for idempotency, so it must not change).
struct JSONReaderTests {
    static let iterations = PropertyTests.iterations

    static func foundation(_ bytes: [UInt8]) -> JSONValue? {
        try? JSONDecoder().decode(JSONValue.self, from: Data(bytes))
    }

    static func foundationCanonical(_ value: JSONValue) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: (try? encoder.encode(value)) ?? Data(), as: UTF8.self)
    }

    /// Random documents, written in many ways: spaces, escapes, number forms, trailing commas, repeated keys.
    struct Writer {
        var rng: SplitMix

        mutating func pick<T>(_ options: [T]) -> T { options[Int.random(in: 0..<options.count, using: &rng)] }
        mutating func chance(_ percent: Int) -> Bool { Int.random(in: 0..<100, using: &rng) < percent }

        mutating func space() -> String { chance(80) ? "" : pick([" ", "\n", "\t", "\r\n ", "  "]) }

        mutating func scalar() -> Unicode.Scalar {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: return Unicode.Scalar(UInt8.random(in: 0..<0x20, using: &rng))
            case 1: return pick(["\"", "\\", "/", "\u{7f}", "\u{2028}", "é", "€", "😀", "\u{301}", "\u{feff}"])
            case 2: return Unicode.Scalar(UInt32.random(in: 0x80...0xD7FF, using: &rng))!
            case 3: return Unicode.Scalar(UInt32.random(in: 0x10000...0x10FFFF, using: &rng)) ?? "x"
            default: return Unicode.Scalar(UInt8.random(in: 0x20...0x7E, using: &rng))
            }
        }

        mutating func stringText() -> String {
            var text = ""
            for _ in 0..<Int.random(in: 0...8, using: &rng) { text.unicodeScalars.append(scalar()) }
            return text
        }

        /// A string literal of `text`, escaped in any allowed way.
        mutating func literal(_ text: String) -> String {
            var out = "\""
            for scalar in text.unicodeScalars {
                let mustEscape = scalar.value < 0x20 || scalar == "\"" || scalar == "\\"
                if mustEscape || chance(10) {
                    switch scalar {
                    case "\"": out += "\\\""
                    case "\\": out += "\\\\"
                    case "/" where chance(50): out += "\\/"
                    case "\n" where chance(50): out += "\\n"
                    case "\t" where chance(50): out += "\\t"
                    case "\u{08}" where chance(50): out += "\\b"
                    default:
                        for unit in String(scalar).utf16 {
                            let hex = String(unit, radix: 16)
                            let padded = String(repeating: "0", count: 4 - hex.count) + hex
                            out += "\\u" + (chance(50) ? padded.uppercased() : padded)
                        }
                    }
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
            return out + "\""
        }

        mutating func number() -> String {
            switch Int.random(in: 0..<9, using: &rng) {
            case 0: return String(Int64.random(in: Int64.min...Int64.max, using: &rng))
            case 1: return String(Int.random(in: -1000...1000, using: &rng))
            case 2: return pick(["0", "-0", "1.0", "-0.0", "1E2", "1e+2", "1.5e3", "1e-400", "0.1e1", "9223372036854775807", "9223372036854775808",
                                 "-9223372036854775808", "-9223372036854775809", "100000000000000000000", "1e308", "2.5E-3", "123.456", "1e19"])
            case 3: return String(Double.random(in: -1e6...1e6, using: &rng))
            case 4: return "\(Int.random(in: 1...9, using: &rng))e\(Int.random(in: -30...30, using: &rng))"
            case 5: return "\(Int.random(in: 0...99, using: &rng)).\(Int.random(in: 0...999, using: &rng))E\(pick(["", "+", "-"]))\(Int.random(in: 0...25, using: &rng))"
            default: return String(Int.random(in: 0...100_000, using: &rng))
            }
        }

        /// Whether a key was written twice (Foundation reads only the first value, and never looks inside
        /// the second: damage there goes unnoticed by it).
        var repeatedKey = false

        mutating func value(depth: Int) -> String {
            let kind = depth > 3 ? Int.random(in: 0..<5, using: &rng) : Int.random(in: 0..<7, using: &rng)
            switch kind {
            case 0: return pick(["true", "false", "null"])
            case 1, 2: return number()
            case 3, 4: return literal(stringText())
            case 5:
                let items = (0..<Int.random(in: 0...4, using: &rng)).map { _ in space() + value(depth: depth + 1) + space() }
                let trailing = !items.isEmpty && chance(10) ? "," : ""
                return "[" + items.joined(separator: ",") + trailing + space() + "]"
            default:
                var keys = (0..<Int.random(in: 0...4, using: &rng)).map { _ in stringText() }
                if !keys.isEmpty && chance(15) { keys.append(keys[0]) }  // a repeated key
                if Set(keys).count < keys.count { repeatedKey = true }  // (random keys repeat too: "" often)
                let members = keys.map { space() + literal($0) + space() + ":" + space() + value(depth: depth + 1) + space() }
                let trailing = !members.isEmpty && chance(10) ? "," : ""
                return "{" + members.joined(separator: ",") + trailing + space() + "}"
            }
        }

        /// One random edit: a byte dropped, doubled, replaced or inserted (any byte, invalid UTF-8 included).
        mutating func damage(_ bytes: [UInt8]) -> [UInt8] {
            var out = bytes
            let at = out.isEmpty ? 0 : Int.random(in: 0..<out.count, using: &rng)
            let byte = chance(50) ? pick(Array("{}[],:\"\\ e.-+0aun\u{7f}".utf8)) : UInt8.random(in: 0...255, using: &rng)
            switch Int.random(in: 0..<4, using: &rng) {
            case 0 where !out.isEmpty: out.remove(at: at)
            case 1 where !out.isEmpty: out.insert(out[at], at: at)
            case 2 where !out.isEmpty: out[at] = byte
            default: out.insert(byte, at: at)
            }
            return out
        }
    }

    @Test func readsWhatFoundationReadsAndRefusesWhatItRefuses() throws {
        var writer = Writer(rng: SplitMix(seed: 0x4A53_4F4E))
        var accepted = 0, refused = 0
        for _ in 0..<Self.iterations {
            writer.repeatedKey = false
            let document = Array((writer.space() + writer.value(depth: 0) + writer.space()).utf8)
            for (index, bytes) in [document, writer.damage(document), writer.damage(writer.damage(document))].enumerated() {
                let expected = Self.foundation(bytes)
                let ours = try? JSONReader.parse(bytes)
                if ours == nil && ((index > 0 && writer.repeatedKey) || bytes.contains(0)) {
                    // Where we are stricter than Foundation, never more lenient (when we accept, the checks
                    // below hold): damage in a repeated key's value, which Foundation skips and we read; a NUL
                    // byte outside a string, which Foundation takes for the end or for a space.
                    refused += 1
                    continue
                }
                #expect(ours == expected, "\(String(decoding: bytes, as: UTF8.self).debugDescription)")
                if let ours, let expected {
                    #expect(ours.canonicalText == Self.foundationCanonical(expected), "\(String(decoding: bytes, as: UTF8.self).debugDescription)")
                    accepted += 1
                } else {
                    refused += 1
                }
            }
        }
        // Both kinds were seen many times (the test would mean little otherwise).
        #expect(accepted > Self.iterations && refused > Self.iterations / 4, "accepted \(accepted), refused \(refused)")
    }

    @Test func edgeCasesAsFoundation() throws {
        let cases = ["[1,]", "{\"a\":1,}", "{,}", "[,]", "[1,,2]", "\u{feff}{}", "{} x", "[01]", "[1.]", "[-]", "[+1]", "[.5]", "[1e400]",
                     "[1e-400]", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\\u12\"", "\"a\tb\"", "\"\\u0000\"", "{\"a\":1,\"a\":2}", "",
                     " ", "[-9223372036854775809]", "[9.2e18]", "[1E2]", "[-0.0]", "{\"a\" 1}", "[tru]", "[nulll]", "[1]]"]
        for text in cases {
            let bytes = Array(text.utf8)
            let expected = Self.foundation(bytes)
            #expect((try? JSONReader.parse(bytes)) == expected, "\(text.debugDescription)")
        }
        for bytes: [UInt8] in [[0x22, 0xFF, 0x22], [0x22, 0xC3, 0x22], [0x22, 0xED, 0xA0, 0x80, 0x22]] {
            #expect(throws: JSONReader.Failure.self) { try JSONReader.parse(bytes) }
            #expect(Self.foundation(bytes) == nil)
        }
        // Too deep is told apart from not JSON.
        #expect(throws: JSONReader.Failure(tooDeep: true)) { try JSONReader.parse(Array((String(repeating: "[", count: 65) + String(repeating: "]", count: 65)).utf8)) }
        #expect((try? JSONReader.parse(Array((String(repeating: "[", count: 64) + String(repeating: "]", count: 64)).utf8))) != nil)
    }

    @Test func canonicalTextIsWhatJSONEncoderWrites() {
        var writer = Writer(rng: SplitMix(seed: 0x4341_4E4F))
        for _ in 0..<Self.iterations {
            let document = Array(writer.value(depth: 0).utf8)
            guard let value = Self.foundation(document) else { continue }
            #expect(value.canonicalText == Self.foundationCanonical(value), "\(String(decoding: document, as: UTF8.self).debugDescription)")
        }
    }
}
