import Foundation

/// Small helpers to write JSON text by hand on the hot path (one message is encoded once and shared), and to
/// parse and canonicalise client JSON with Foundation.
public enum JSONText {
    /// Appends `value` as a JSON string literal.
    public static func appendString(_ value: String, to out: inout String) {
        out.append("\"")
        var needsEscape = false
        for unit in value.utf8 where unit < 0x20 || unit == 0x22 || unit == 0x5C {
            needsEscape = true
            break
        }
        if !needsEscape {
            out.append(value)
        } else {
            for scalar in value.unicodeScalars {
                switch scalar {
                case "\"": out.append("\\\"")
                case "\\": out.append("\\\\")
                case "\n": out.append("\\n")
                case "\r": out.append("\\r")
                case "\t": out.append("\\t")
                default:
                    if scalar.value < 0x20 {
                        let hex = String(scalar.value, radix: 16)
                        out.append("\\u" + String(repeating: "0", count: 4 - hex.count) + hex)
                    } else {
                        out.unicodeScalars.append(scalar)
                    }
                }
            }
        }
        out.append("\"")
    }

    public static func quoted(_ value: String) -> String {
        var out = ""
        appendString(value, to: &out)
        return out
    }

    public static func appendOptionalString(_ value: String?, to out: inout String) {
        if let value { appendString(value, to: &out) } else { out.append("null") }
    }

    /// Deepest nesting of arrays and objects accepted (a parser that recurses must not be handed more).
    public static let maxDepth = 64

    /// Whether arrays and objects nest deeper than `limit` (strings skipped), before any parser sees it.
    static func nestsDeeper(_ bytes: some Collection<UInt8>, than limit: Int) -> Bool {
        var depth = 0
        var inString = false
        var escaped = false
        for byte in bytes {
            if inString {
                if escaped { escaped = false } else if byte == UInt8(ascii: "\\") { escaped = true } else if byte == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                depth += 1
                if depth > limit { return true }
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            default: break
            }
        }
        return false
    }

    /// Parses a JSON object from bytes. Throws `BAD_REQUEST` when it is not JSON, not an object, or nested
    /// deeper than `maxDepth`.
    public static func parseObject(_ bytes: some Collection<UInt8>) throws(ApiError) -> [String: Any] {
        if nestsDeeper(bytes, than: maxDepth) {
            throw ApiError(.badRequest, "JSON nested deeper than \(maxDepth) levels", details: ["max_depth": String(maxDepth)])
        }
        let data = Data(bytes)
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: data, options: [])
        } catch {
            throw ApiError(.badRequest, "request is not valid JSON")
        }
        guard let object = value as? [String: Any] else {
            throw ApiError(.badRequest, "request must be a JSON object")
        }
        return object
    }

    /// The canonical text of a message body (keys sorted, compact), so that equal bodies compare equal
    /// for idempotency. Throws `INVALID_BODY` when it is not a JSON object, `PAYLOAD_TOO_LARGE` past `limit`.
    public static func canonicalBody(_ value: Any?, limit: Int) throws(ApiError) -> String {
        guard let object = value as? [String: Any] else {
            throw ApiError(.invalidBody, "body must be a JSON object")
        }
        let data: Data
        do {
            data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        } catch {
            throw ApiError(.invalidBody, "body is not representable as JSON")
        }
        guard data.count <= limit else {
            throw ApiError(.payloadTooLarge, "body is larger than \(limit) bytes", details: ["limit": String(limit)])
        }
        return String(decoding: data, as: UTF8.self)
    }
}
