import Foundation
import Wire

/// Small helpers to write JSON text by hand on the hot path (one message is encoded once and shared), and to
/// parse and canonicalise client JSON (`JSONReader`).
public enum JSONText {
    /// Appends `value` as a JSON string literal.
    public static func appendString(_ value: String, to out: inout String) {
        WireText.appendString(value, to: &out)
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
    public static let maxDepth = JSONDepth.limit

    /// Parses a JSON object from bytes. Throws `BAD_REQUEST` when it is not JSON, not an object, or nested
    /// deeper than `maxDepth`.
    public static func parseObject(_ bytes: some Collection<UInt8>) throws(ApiError) -> [String: Any] {
        if JSONDepth.exceeds(maxDepth, in: bytes) {
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

    /// Parses a JSON object from bytes into a `JSONValue`, with the same checks as `parseObject`.
    public static func parseValue(_ bytes: some Collection<UInt8>) throws(ApiError) -> JSONValue {
        let value: JSONValue
        do {
            value = try JSONReader.parse(bytes, maxDepth: maxDepth)
        } catch {
            if error.tooDeep {
                throw ApiError(.badRequest, "JSON nested deeper than \(maxDepth) levels", details: ["max_depth": String(maxDepth)])
            }
            throw ApiError(.badRequest, "request is not valid JSON")
        }
        guard value.isObject else { throw ApiError(.badRequest, "request must be a JSON object") }
        return value
    }

    /// The canonical text of a message body (keys sorted, compact), so that equal bodies compare equal
    /// for idempotency. Throws `INVALID_BODY` when it is not a JSON object, `PAYLOAD_TOO_LARGE` past `limit`.
    public static func canonicalBody(_ value: JSONValue?, limit: Int) throws(ApiError) -> String {
        guard let value, value.isObject else {
            throw ApiError(.invalidBody, "body must be a JSON object")
        }
        let text = value.canonicalText
        guard text.utf8.count <= limit else {
            throw ApiError(.payloadTooLarge, "body is larger than \(limit) bytes", details: ["limit": String(limit)])
        }
        return text
    }
}
