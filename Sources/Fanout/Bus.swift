import ChatDomain
import NIOConcurrencyHelpers

/// Carries committed messages to every instance's Hub. The in-process bus is the embedded mode's; Redis
/// pub/sub is the cluster's.
public protocol Bus: Sendable {
    /// Hands committed messages (in commit order) to every instance, this one included.
    func publish(_ messages: [Message])
    /// The Hub starts and stops caring about a channel (first local subscriber, last one gone).
    func subscribe(_ channel: ChannelName)
    func unsubscribe(_ channel: ChannelName)
    /// Where received messages go.
    func setReceiver(_ receiver: @escaping @Sendable ([Message]) -> Void)
}

/// Fan-out inside one process: a publish is a direct call to the receiver.
public final class InProcessBus: Bus {
    private let receiver = NIOLockedValueBox<(@Sendable ([Message]) -> Void)?>(nil)

    public init() {}

    public func publish(_ messages: [Message]) {
        receiver.withLockedValue { $0 }?(messages)
    }

    public func subscribe(_ channel: ChannelName) {}
    public func unsubscribe(_ channel: ChannelName) {}

    public func setReceiver(_ receiver: @escaping @Sendable ([Message]) -> Void) {
        self.receiver.withLockedValue { $0 = receiver }
    }
}
