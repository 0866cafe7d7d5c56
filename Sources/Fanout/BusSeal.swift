import Crypto
import Foundation
import NIOCore

/// Authenticates what crosses a shared bus: every payload goes out as `HMAC-SHA256(key, channel ‖ 0 ‖ payload)
/// ‖ payload` under the cluster key, and a payload whose tag does not verify (forged by someone who can
/// PUBLISH on the Redis server, or moved from another channel) is dropped before anything reads it. A
/// replayed genuine payload is harmless: messages are deduplicated by `seq`, control events are idempotent.
public struct BusSeal: Sendable {
    static let tagBytes = SHA256.byteCount
    /// An HMAC already keyed, copied for each payload (its hash states are copied on write): keying costs two
    /// block hashes and a few allocations, per message when done each time.
    private let keyed: HMAC<SHA256>

    public init(key: String) {
        self.keyed = HMAC<SHA256>(key: SymmetricKey(data: Array(key.utf8)))
    }

    /// The key of a cluster without `GATEWAY_CLUSTER_KEY`: derived from the HS256 secret every instance shares
    /// (HMAC-SHA256 of a fixed label), so that PROTOCOL.md §8's settings alone start an authenticated cluster.
    /// Whoever could forge with it could already mint any token with the secret.
    public init(derivedFromJWTSecret secret: String) {
        let derived = HMAC<SHA256>.authenticationCode(for: Array("realtime-gateway bus seal v1".utf8), using: SymmetricKey(data: Array(secret.utf8)))
        self.keyed = HMAC<SHA256>(key: SymmetricKey(data: Array(derived)))
    }

    /// The sealed payload for `channel`.
    public func seal<Payload: Collection<UInt8>>(_ payload: Payload, channel: some Collection<UInt8>) -> [UInt8] {
        let tag = authenticationCode(payload, channel: channel)
        var out = [UInt8]()
        out.reserveCapacity(Self.tagBytes + payload.count)
        out.append(contentsOf: tag)
        out.append(contentsOf: payload)
        return out
    }

    /// The payload without its tag, or nil when the tag is missing or does not verify.
    public func open(_ sealed: ByteBuffer, channel: ByteBuffer) -> ByteBuffer? {
        guard sealed.readableBytes >= Self.tagBytes,
              let tag = sealed.getSlice(at: sealed.readerIndex, length: Self.tagBytes),
              let payload = sealed.getSlice(at: sealed.readerIndex + Self.tagBytes, length: sealed.readableBytes - Self.tagBytes)
        else { return nil }
        var hmac = keyed
        channel.withUnsafeReadableBytes { hmac.update(data: $0) }
        hmac.update(data: [0])
        payload.withUnsafeReadableBytes { hmac.update(data: $0) }
        let expected = hmac.finalize()
        // `==` on a MAC compares in constant time.
        return tag.withUnsafeReadableBytes { expected == $0 } ? payload : nil
    }

    private func authenticationCode(_ payload: some Collection<UInt8>, channel: some Collection<UInt8>) -> HMAC<SHA256>.MAC {
        var hmac = keyed
        Self.update(&hmac, with: channel)
        hmac.update(data: [0])
        Self.update(&hmac, with: payload)
        return hmac.finalize()
    }

    /// Without a copy of `bytes` when they are contiguous (an array, a buffer's view).
    private static func update(_ hmac: inout HMAC<SHA256>, with bytes: some Collection<UInt8>) {
        if bytes.withContiguousStorageIfAvailable({ hmac.update(data: UnsafeRawBufferPointer($0)) }) == nil {
            hmac.update(data: Array(bytes))
        }
    }
}
