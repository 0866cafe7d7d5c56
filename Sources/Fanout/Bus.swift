import ChatDomain
import NIOConcurrencyHelpers

/// Carries committed messages to every instance's Hub. The in-process bus is the embedded mode's; Redis
/// pub/sub is the cluster's.
public protocol Bus: Sendable {
    /// Hands committed messages (in commit order) to every instance, this one included.
    func publish(_ messages: [Message])
    /// The Hub starts caring about a channel (its first local subscriber). `active` runs once messages
    /// published from now on will arrive (at once when the bus is down: the Hub polls the store then).
    func subscribe(_ channel: ChannelName, active: @escaping @Sendable () -> Void)
    /// The last local subscriber is gone.
    func unsubscribe(_ channel: ChannelName)
    /// Where received messages go, and whom to tell when the bus goes down (`false`) or is back (`true`).
    func setReceiver(_ receiver: @escaping @Sendable ([Message]) -> Void, availability: @escaping @Sendable (Bool) -> Void)
    /// Hands a control event (revocation, member removal: JSON text) to every instance, this one included.
    func publishControl(_ payload: String)
    func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void)
}

/// Fan-out inside one process: a publish is a direct call to the receiver.
public final class InProcessBus: Bus {
    private let receiver = NIOLockedValueBox<(@Sendable ([Message]) -> Void)?>(nil)
    private let controlReceiver = NIOLockedValueBox<(@Sendable (String) -> Void)?>(nil)

    public init() {}

    public func publish(_ messages: [Message]) {
        receiver.withLockedValue { $0 }?(messages)
    }

    public func subscribe(_ channel: ChannelName, active: @escaping @Sendable () -> Void) { active() }
    public func unsubscribe(_ channel: ChannelName) {}

    public func setReceiver(_ receiver: @escaping @Sendable ([Message]) -> Void, availability: @escaping @Sendable (Bool) -> Void) {
        self.receiver.withLockedValue { $0 = receiver }
    }

    public func publishControl(_ payload: String) {
        controlReceiver.withLockedValue { $0 }?(payload)
    }

    public func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void) {
        controlReceiver.withLockedValue { $0 = receiver }
    }
}
