import ChatDomain
import Foundation
import Logging
import NIOConcurrencyHelpers

/// swift-log's handler for operations: one JSON object per line on standard error —
/// `{"time":…,"level":…,"message":…,"label":…, <metadata>}` — so that a log pipeline reads every field
/// (the request id, the trace id, the instance) without parsing text. Metadata values that are not strings
/// are written as their description; nested dictionaries and arrays as JSON.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String
    private let output: Output

    /// Where lines go: a whole line is written with one call, under a lock shared by every handler.
    final class Output: Sendable {
        static let standardError = Output(fd: 2)
        private let fd: Int32
        private let lock = NIOLock()
        init(fd: Int32) { self.fd = fd }

        func write(_ line: String) {
            lock.withLock {
                var bytes = Array(line.utf8)
                bytes.append(0x0A)
                var offset = 0
                while offset < bytes.count {
                    let n = bytes[offset...].withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
                    if n <= 0 { if errno == EINTR { continue } else { return } }
                    offset += n
                }
            }
        }
    }

    public init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
        self.output = .standardError
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        output.write(Self.line(time: Date(), level: event.level, message: "\(event.message)", label: label, source: event.source, metadata: all))
    }

    /// The line of one event (fixed fields first, then the metadata sorted by key).
    static func line(time: Date, level: Logger.Level, message: String, label: String, source: String, metadata: Logger.Metadata) -> String {
        let micros = Int64((time.timeIntervalSince1970 * 1_000_000).rounded())
        var out = "{\"time\":\"" + Timestamp.iso8601(micros: micros) + "\",\"level\":\"" + level.rawValue + "\",\"message\":" + JSONText.quoted(message)
        out += ",\"label\":" + JSONText.quoted(label) + ",\"source\":" + JSONText.quoted(source)
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) where !["time", "level", "message", "label", "source"].contains(key) {
            out += "," + JSONText.quoted(key) + ":" + json(value)
        }
        return out + "}"
    }

    private static func json(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let s): JSONText.quoted(s)
        case .stringConvertible(let c): JSONText.quoted(c.description)
        case .array(let values): "[" + values.map(json).joined(separator: ",") + "]"
        case .dictionary(let d): "{" + d.sorted(by: { $0.key < $1.key }).map { JSONText.quoted($0.key) + ":" + json($0.value) }.joined(separator: ",") + "}"
        }
    }
}
