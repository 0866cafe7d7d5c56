import Foundation

/// Reads JSON text into a `JSONValue` in one pass over its bytes, and writes a value's canonical text.
///
/// Every publish goes through both (the command or request body in, the body's canonical text out), and
/// Foundation's `JSONDecoder` into `JSONValue` and `JSONEncoder` back took about a fifth of a publish's CPU.
/// Both accept and produce exactly what those did (held by `JSONReaderTests` against Foundation on random
/// documents): RFC 8259 plus Foundation's leniencies (a trailing comma before `]` or `}`, a leading byte
/// order mark), the first of two equal keys, a number that is an exact integer within Int64 read as one.
public enum JSONReader {
    public struct Failure: Error, Sendable, Equatable {
        /// True when the document nests deeper than the limit it was read with.
        public let tooDeep: Bool
        /// A number written with a fraction or exponent at 2^53 or beyond: Foundation reads some of those as
        /// exact integers and others as Doubles, by rules not worth copying; such rare documents go to it.
        let unsure: Bool

        public init(tooDeep: Bool) {
            self.tooDeep = tooDeep
            self.unsure = false
        }

        static let unsure = Failure(unsure: ())
        private init(unsure: Void) {
            self.tooDeep = false
            self.unsure = true
        }
    }

    /// Parses one JSON document (any value at the top, whitespace around it). Arrays and objects nested
    /// deeper than `maxDepth` are refused before any deeper recursion.
    public static func parse(_ bytes: some Collection<UInt8>, maxDepth: Int = JSONDepth.limit) throws(Failure) -> JSONValue {
        if let result = bytes.withContiguousStorageIfAvailable({ buffer in Result { () throws(Failure) in try parse(buffer, maxDepth: maxDepth) } }) {
            return try result.get()
        }
        let copy = Array(bytes)
        return try copy.withUnsafeBufferPointer { buffer throws(Failure) in try parse(buffer, maxDepth: maxDepth) }
    }

    static func parse(_ buffer: UnsafeBufferPointer<UInt8>, maxDepth: Int) throws(Failure) -> JSONValue {
        var reader = Reader(bytes: buffer, maxDepth: maxDepth)
        if buffer.count >= 3, buffer[0] == 0xEF, buffer[1] == 0xBB, buffer[2] == 0xBF { reader.at = 3 }
        do throws(Failure) {
            let value = try reader.value()
            reader.skipSpace()
            guard reader.at == buffer.count else { throw Failure(tooDeep: false) }
            return value
        } catch {
            guard error.unsure else { throw error }
            // Unsure: the whole document goes to Foundation (nesting is within the limit: checked first).
            if JSONDepth.exceeds(maxDepth, in: buffer) { throw Failure(tooDeep: true) }
            guard let value = try? JSONDecoder().decode(JSONValue.self, from: Data(buffer)) else { throw Failure(tooDeep: false) }
            return value
        }
    }

    struct Reader {
        let bytes: UnsafeBufferPointer<UInt8>
        let maxDepth: Int
        var at = 0
        var depth = 0

        init(bytes: UnsafeBufferPointer<UInt8>, maxDepth: Int) {
            self.bytes = bytes
            self.maxDepth = maxDepth
        }

        static let bad = Failure(tooDeep: false)

        mutating func skipSpace() {
            while at < bytes.count {
                switch bytes[at] {
                case 0x20, 0x0A, 0x0D, 0x09: at += 1
                default: return
                }
            }
        }

        mutating func value() throws(Failure) -> JSONValue {
            skipSpace()
            guard at < bytes.count else { throw Self.bad }
            switch bytes[at] {
            case UInt8(ascii: "{"): return try object()
            case UInt8(ascii: "["): return try array()
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): try literal("true"); return .bool(true)
            case UInt8(ascii: "f"): try literal("false"); return .bool(false)
            case UInt8(ascii: "n"): try literal("null"); return .null
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
            default: throw Self.bad
            }
        }

        mutating func literal(_ word: StaticString) throws(Failure) {
            let count = word.utf8CodeUnitCount
            guard bytes.count - at >= count else { throw Self.bad }
            for offset in 0..<count where bytes[at + offset] != word.utf8Start[offset] { throw Self.bad }
            at += count
        }

        mutating func enter() throws(Failure) {
            depth += 1
            if depth > maxDepth { throw Failure(tooDeep: true) }
            at += 1
        }

        mutating func object() throws(Failure) -> JSONValue {
            var members: [String: JSONValue] = [:]
            try elements(until: UInt8(ascii: "}")) { reader throws(Failure) in
                reader.skipSpace()
                guard reader.at < reader.bytes.count, reader.bytes[reader.at] == UInt8(ascii: "\"") else { throw Self.bad }
                let key = try reader.string()
                reader.skipSpace()
                guard reader.at < reader.bytes.count, reader.bytes[reader.at] == UInt8(ascii: ":") else { throw Self.bad }
                reader.at += 1
                let value = try reader.value()
                if members[key] == nil { members[key] = value }  // the first of two equal keys, as Foundation
            }
            return .object(members)
        }

        mutating func array() throws(Failure) -> JSONValue {
            var items: [JSONValue] = []
            try elements(until: UInt8(ascii: "]")) { reader throws(Failure) in items.append(try reader.value()) }
            return .array(items)
        }

        /// The comma-separated elements of an array or object (at its opening bracket), through `close`: one
        /// level deeper, a trailing comma allowed (as Foundation).
        mutating func elements(until close: UInt8, _ element: (inout Reader) throws(Failure) -> Void) throws(Failure) {
            try enter()
            skipSpace()
            if at < bytes.count, bytes[at] == close {
                at += 1
                depth -= 1
                return
            }
            while true {
                try element(&self)
                skipSpace()
                guard at < bytes.count else { throw Self.bad }
                if bytes[at] == close { break }
                guard bytes[at] == UInt8(ascii: ",") else { throw Self.bad }
                at += 1
                skipSpace()
                if at < bytes.count, bytes[at] == close { break }
            }
            at += 1
            depth -= 1
        }

        /// A string literal (at its opening quote): escapes decoded, UTF-8 checked, no raw control character.
        mutating func string() throws(Failure) -> String {
            at += 1
            let start = at
            // The common case: no escape. Find the closing quote; the bytes between are the string.
            while at < bytes.count {
                let byte = bytes[at]
                if byte == UInt8(ascii: "\"") {
                    let raw = UnsafeBufferPointer(rebasing: bytes[start..<at])
                    at += 1
                    guard let text = String(validating: raw, as: UTF8.self) else { throw Self.bad }
                    return text
                }
                if byte == UInt8(ascii: "\\") { break }
                if byte < 0x20 { throw Self.bad }
                at += 1
            }
            guard at < bytes.count else { throw Self.bad }
            var out = Array(UnsafeBufferPointer(rebasing: bytes[start..<at]))
            while at < bytes.count {
                let byte = bytes[at]
                if byte == UInt8(ascii: "\"") {
                    at += 1
                    guard let text = String(validating: out, as: UTF8.self) else { throw Self.bad }
                    return text
                }
                if byte < 0x20 { throw Self.bad }
                guard byte == UInt8(ascii: "\\") else {
                    out.append(byte)
                    at += 1
                    continue
                }
                at += 1
                guard at < bytes.count else { throw Self.bad }
                let escape = bytes[at]
                at += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        // A high surrogate must be followed by an escaped low one.
                        guard bytes.count - at >= 6, bytes[at] == UInt8(ascii: "\\"), bytes[at + 1] == UInt8(ascii: "u") else { throw Self.bad }
                        at += 2
                        let low = try hex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw Self.bad }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw Self.bad
                    }
                    guard let unicode = Unicode.Scalar(scalar) else { throw Self.bad }
                    out.append(contentsOf: UTF8.encode(unicode)!)
                default:
                    throw Self.bad
                }
            }
            throw Self.bad
        }

        mutating func hex4() throws(Failure) -> UInt32 {
            guard bytes.count - at >= 4 else { throw Self.bad }
            var value: UInt32 = 0
            for _ in 0..<4 {
                let byte = bytes[at]
                let digit: UInt8
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
                default: throw Self.bad
                }
                value = value << 4 | UInt32(digit)
                at += 1
            }
            return value
        }

        /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`: an integer within Int64 (written as one, or an
        /// exact integer in any form) is `.integer`, any other finite number `.number`.
        mutating func number() throws(Failure) -> JSONValue {
            let start = at
            if bytes[at] == UInt8(ascii: "-") { at += 1 }
            guard at < bytes.count else { throw Self.bad }
            if bytes[at] == UInt8(ascii: "0") {
                at += 1
            } else {
                guard digits() > 0 else { throw Self.bad }
            }
            var plain = true
            if at < bytes.count, bytes[at] == UInt8(ascii: ".") {
                plain = false
                at += 1
                guard digits() > 0 else { throw Self.bad }
            }
            if at < bytes.count, bytes[at] == UInt8(ascii: "e") || bytes[at] == UInt8(ascii: "E") {
                plain = false
                at += 1
                if at < bytes.count, bytes[at] == UInt8(ascii: "+") || bytes[at] == UInt8(ascii: "-") { at += 1 }
                guard digits() > 0 else { throw Self.bad }
            }
            let text = UnsafeBufferPointer(rebasing: bytes[start..<at])
            if plain, let integer = Int64(ascii: text) { return .integer(integer) }
            // Digits past Int64 are a Double (as Foundation); a fraction or exponent giving an exact integer
            // within Int64 is that integer (as Foundation).
            // strtod needs a terminated string: the number's text is short, copy it.
            var terminated = Array(text)
            terminated.append(0)
            let double = terminated.withUnsafeBufferPointer { strtod(UnsafeRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), nil) }
            guard double.isFinite else { throw Self.bad }
            if !plain && double.magnitude >= 0x1p53 { throw Failure.unsure }
            if !plain, let integer = Int64(exactly: double) { return .integer(integer) }
            return .number(double)
        }

        /// Skips decimal digits; how many.
        mutating func digits() -> Int {
            let start = at
            while at < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[at]) { at += 1 }
            return at - start
        }
    }
}

extension Int64 {
    /// An optional minus and decimal digits, within range; nil otherwise.
    init?(ascii text: UnsafeBufferPointer<UInt8>) {
        var index = 0
        let negative = text.first == UInt8(ascii: "-")
        if negative { index = 1 }
        guard index < text.count else { return nil }
        var value: Int64 = 0
        while index < text.count {
            let digit = Int64(text[index] &- UInt8(ascii: "0"))
            guard (0...9).contains(digit) else { return nil }
            let (shifted, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (next, overflow2) = negative ? shifted.subtractingReportingOverflow(digit) : shifted.addingReportingOverflow(digit)
            if overflow1 || overflow2 { return nil }
            value = next
            index += 1
        }
        self = value
    }
}

extension JSONValue {
    /// Appends the canonical text (keys sorted, no spaces, slashes unescaped: what `JSONEncoder` with
    /// `.sortedKeys` and `.withoutEscapingSlashes` writes) to `out`.
    public func appendCanonical(to out: inout String) {
        switch self {
        case .null: out.append("null")
        case .bool(let value): out.append(value ? "true" : "false")
        case .integer(let value): out.append(String(value))
        case .number(let value):
            // Non-integral numbers are rare in bodies: Foundation formats them, exactly as before.
            out.append((try? String(decoding: JSONEncoder().encode(value), as: UTF8.self)) ?? "null")
        case .string(let value): Self.appendCanonical(string: value, to: &out)
        case .array(let items):
            out.append("[")
            for (index, item) in items.enumerated() {
                if index > 0 { out.append(",") }
                item.appendCanonical(to: &out)
            }
            out.append("]")
        case .object(let members):
            out.append("{")
            // By UTF-8 bytes, as Foundation (String's `<` would compare canonically equivalent forms instead).
            for (index, key) in members.keys.sorted(by: { $0.utf8.lexicographicallyPrecedes($1.utf8) }).enumerated() {
                if index > 0 { out.append(",") }
                Self.appendCanonical(string: key, to: &out)
                out.append(":")
                members[key]!.appendCanonical(to: &out)
            }
            out.append("}")
        }
    }

    /// A string literal as `JSONEncoder` writes it (`WireText`'s escaping is the same).
    static func appendCanonical(string: String, to out: inout String) {
        WireText.appendString(string, to: &out)
    }
}
