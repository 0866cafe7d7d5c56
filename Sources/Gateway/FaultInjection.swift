import NIOConcurrencyHelpers
import NIOCore

/// Test-only misbehaviour, off unless `GATEWAY_TEST_FAULT` is set: proves that `loadtest` catches what it
/// must. `drop:N` loses one live message in N on WebSocket and SSE streams (no repair); `swap:N` delivers one
/// message in N after the one that follows it. Never set it in production.
struct TestFault: Sendable, Equatable {
    enum Kind: String, Sendable { case drop, swap }
    let kind: Kind
    let every: Int

    init?(_ text: String) {
        let parts = text.split(separator: ":")
        guard parts.count == 2, let kind = Kind(rawValue: String(parts[0])), let every = Int(parts[1]), every > 0 else { return nil }
        self.kind = kind
        self.every = every
    }
}

/// Counts live writes across the instance and says which one misbehaves.
final class FaultInjector: Sendable {
    let fault: TestFault?
    private let count = NIOLockedValueBox(0)

    init(_ fault: TestFault?) {
        self.fault = fault
    }

    /// The fault to apply to this write, if it is the chosen one.
    func next() -> TestFault.Kind? {
        guard let fault else { return nil }
        let n = count.withLockedValue { $0 += 1; return $0 }
        return n % fault.every == 0 ? fault.kind : nil
    }
}

extension FaultInjector {
    /// Writes `bytes` through `write`, unless the fault says to drop it or to hold it until the next write
    /// (`held` is the connection's own slot for that).
    func write(_ bytes: ByteBuffer, held: inout ByteBuffer?, _ write: (ByteBuffer) -> Void) {
        switch next() {
        case .drop?: return
        case .swap?: held = bytes
        case nil:
            write(bytes)
            if let message = held {
                held = nil
                write(message)
            }
        }
    }
}
