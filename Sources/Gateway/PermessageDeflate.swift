import CompressNIO
import Foundation
import NIOCore

/// RFC 7692 permessage-deflate, as this server does it: every message it compresses uses a fresh deflate
/// context (`server_no_context_takeover`), so one compressed frame of a broadcast serves every subscriber
/// that negotiated the extension. Messages under `threshold` bytes are sent uncompressed (RSV1 clear).
/// Client messages are inflated with the client's context (kept between messages unless the client offered
/// `client_no_context_takeover`), never past the message size limit.
enum PermessageDeflate {
    static let threshold = 256

    /// The window the server compresses with when a client limits it (`server_max_window_bits` 9…14): one
    /// small window serves every such client, so their frames are shared too. zlib's raw deflate has no 8.
    static let smallWindowBits: Int32 = 9

    /// What was agreed for one connection.
    struct Agreement: Sendable, Equatable {
        let clientNoContextTakeover: Bool
        /// The client's `server_max_window_bits`, when it limited the server's window.
        var serverMaxWindowBits: Int? = nil

        /// The `Sec-WebSocket-Extensions` value of the 101.
        var responseHeader: String {
            "permessage-deflate; server_no_context_takeover" + (clientNoContextTakeover ? "; client_no_context_takeover" : "")
                + (serverMaxWindowBits.map { "; server_max_window_bits=\($0)" } ?? "")
        }

        /// The window bits this connection's messages are compressed with.
        var windowBits: Int32 { serverMaxWindowBits.map { $0 < 15 ? PermessageDeflate.smallWindowBits : 15 } ?? 15 }
    }

    /// Picks the first permessage-deflate offer this server can honour (nil: no compression).
    /// `server_max_window_bits=8` is declined (zlib's raw deflate cannot use a 256-byte window).
    static func negotiate(_ header: String?) -> Agreement? {
        guard let header else { return nil }
        offers: for offer in header.split(separator: ",") {
            let parts = offer.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.first?.lowercased() == "permessage-deflate" else { continue }
            var clientNoContext = false
            var serverWindow: Int?
            var seen: Set<String> = []
            for parameter in parts.dropFirst() {
                let kv = parameter.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
                let name = kv[0].lowercased()
                guard seen.insert(name).inserted else { continue offers }  // a parameter twice: invalid offer
                switch name {
                case "server_no_context_takeover":
                    guard kv.count == 1 else { continue offers }
                case "client_no_context_takeover":
                    guard kv.count == 1 else { continue offers }
                    clientNoContext = true
                case "server_max_window_bits":
                    guard kv.count == 2, kv[1].allSatisfy(\.isNumber), let bits = Int(kv[1]), (9...15).contains(bits) else { continue offers }
                    serverWindow = bits
                case "client_max_window_bits":
                    if kv.count == 2 { guard kv[1].allSatisfy(\.isNumber), let bits = Int(kv[1]), (8...15).contains(bits) else { continue offers } }
                default:
                    continue offers
                }
            }
            return Agreement(clientNoContextTakeover: clientNoContext, serverMaxWindowBits: serverWindow)
        }
        return nil
    }

    /// `payload` deflated with a fresh context and a sync flush, the 00 00 FF FF tail removed (RFC 7692 §7.2.1).
    static func compress(_ payload: ByteBuffer, windowBits: Int32 = 15) -> ByteBuffer? {
        var input = payload
        let compressor = CompressionAlgorithm.deflate(configuration: ZlibConfiguration(windowSize: windowBits)).compressor
        do {
            try compressor.startStream()
            defer { try? compressor.finishStream() }
            var output = try input.compressStream(with: compressor, flush: .sync, allocator: WireEncoding.allocator)
            let tail = output.readableBytes - 4
            if tail >= 0, output.getBytes(at: output.readerIndex + tail, length: 4) == [0x00, 0x00, 0xFF, 0xFF] {
                output.moveWriterIndex(to: output.readerIndex + tail)
            }
            return output
        } catch {
            return nil
        }
    }
}

/// One connection's inflater for client messages.
final class DeflateInflater {
    private let decompressor = CompressionAlgorithm.deflate().decompressor
    private let resetEachMessage: Bool
    private var started = false

    init(_ agreement: PermessageDeflate.Agreement) {
        resetEachMessage = agreement.clientNoContextTakeover
    }

    enum Failure: Error { case tooBig, corrupt }

    /// The message's payload inflated; `tooBig` past `limit` bytes, `corrupt` for data that is not deflate.
    func inflate(_ compressed: ByteBuffer, limit: Int) throws(Failure) -> ByteBuffer {
        var input = compressed
        input.writeBytes([0x00, 0x00, 0xFF, 0xFF])
        do {
            if !started || resetEachMessage {
                if started { try decompressor.finishStream() }
                try decompressor.startStream()
                started = true
            }
            return try input.decompressStream(with: decompressor, maxSize: limit + 1, allocator: WireEncoding.allocator)
        } catch let error as CompressNIOError where error == .bufferOverflow {
            throw .tooBig
        } catch {
            throw .corrupt
        }
    }

    deinit {
        if started { try? decompressor.finishStream() }
    }
}
