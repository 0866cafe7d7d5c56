import CHiredis
import NIOCore

/// A Redis reply, copied out of hiredis.
public enum RESPValue: Sendable, Equatable {
    case string(ByteBuffer)
    case status(String)
    case error(String)
    case integer(Int64)
    case null
    case array([RESPValue])
}

/// RESP parsing with hiredis's reader (no I/O: bytes in, replies out).
final class RESPParser {
    private let reader: UnsafeMutablePointer<redisReader>

    struct ProtocolError: Error, CustomStringConvertible { let description: String }

    init() {
        reader = redisReaderCreate()
    }

    deinit {
        redisReaderFree(reader)
    }

    func feed(_ buffer: ByteBuffer) throws {
        let status = buffer.withUnsafeReadableBytes { raw in
            redisReaderFeed(reader, raw.baseAddress?.assumingMemoryBound(to: CChar.self), raw.count)
        }
        guard status == REDIS_OK else { throw ProtocolError(description: errorText) }
    }

    /// The next complete reply, or nil when more bytes are needed.
    func next() throws -> RESPValue? {
        var reply: UnsafeMutableRawPointer?
        guard redisReaderGetReply(reader, &reply) == REDIS_OK else { throw ProtocolError(description: errorText) }
        guard let reply else { return nil }
        let typed = reply.assumingMemoryBound(to: redisReply.self)
        defer { freeReplyObject(reply) }
        return Self.copy(typed)
    }

    private var errorText: String {
        withUnsafeBytes(of: reader.pointee.errstr) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    private static func copy(_ reply: UnsafeMutablePointer<redisReply>) -> RESPValue {
        let r = reply.pointee
        switch r.type {
        case REDIS_REPLY_STRING:
            return .string(ByteBuffer(bytes: UnsafeRawBufferPointer(start: r.str, count: r.len)))
        case REDIS_REPLY_STATUS:
            return .status(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
        case REDIS_REPLY_ERROR:
            return .error(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
        case REDIS_REPLY_INTEGER:
            return .integer(Int64(r.integer))
        case REDIS_REPLY_ARRAY:
            return .array((0..<r.elements).map { copy(r.element[$0]!) })
        default:
            return .null
        }
    }
}

/// RESP command encoding with hiredis's `redisFormatCommandArgv`.
enum RESPCommand {
    static func encode(_ arguments: [[UInt8]], into buffer: inout ByteBuffer) {
        var pointers: [UnsafePointer<CChar>?] = []
        var lengths: [Int] = []
        var copies: [UnsafeMutablePointer<CChar>] = []
        for argument in arguments {
            let copy = UnsafeMutablePointer<CChar>.allocate(capacity: max(1, argument.count))
            if !argument.isEmpty {
                argument.withUnsafeBufferPointer { source in
                    source.withMemoryRebound(to: CChar.self) { copy.update(from: $0.baseAddress!, count: argument.count) }
                }
            }
            copies.append(copy)
            pointers.append(UnsafePointer(copy))
            lengths.append(argument.count)
        }
        defer { copies.forEach { $0.deallocate() } }
        var target: UnsafeMutablePointer<CChar>?
        let length = pointers.withUnsafeMutableBufferPointer { argv in
            lengths.withUnsafeBufferPointer { argvlen in
                redisFormatCommandArgv(&target, Int32(arguments.count), argv.baseAddress, argvlen.baseAddress)
            }
        }
        guard length > 0, let target else { return }
        buffer.writeBytes(UnsafeRawBufferPointer(start: target, count: Int(length)))
        redisFreeCommand(target)
    }

}
