import ChatDomain
import NIOConcurrencyHelpers

/// What a bus tells the Hub. Every event of one bus arrives in the order the bus saw it.
public struct BusEvents: Sendable {
    /// Committed messages, in any order, possibly duplicated.
    public var received: @Sendable ([Message]) -> Void
    /// A `subscribe` request for the channel was confirmed: messages published from now on will arrive.
    public var subscribed: @Sendable (ChannelName) -> Void
    /// An `unsubscribe` request for the channel was confirmed.
    public var unsubscribed: @Sendable (ChannelName) -> Void
    /// The bus went down (`false`: every outstanding request is void) or is back (`true`).
    public var availability: @Sendable (Bool) -> Void
    /// Another instance may have lost publishes: every channel reads the store once.
    public var syncRequested: @Sendable () -> Void

    public init(received: @escaping @Sendable ([Message]) -> Void, subscribed: @escaping @Sendable (ChannelName) -> Void,
                unsubscribed: @escaping @Sendable (ChannelName) -> Void, availability: @escaping @Sendable (Bool) -> Void,
                syncRequested: @escaping @Sendable () -> Void) {
        self.received = received
        self.subscribed = subscribed
        self.unsubscribed = unsubscribed
        self.availability = availability
        self.syncRequested = syncRequested
    }
}

/// Carries committed messages to every instance's Hub. The in-process bus is the embedded mode's; Redis
/// pub/sub is the cluster's. A bus starts down until it says otherwise (`availability(true)`).
public protocol Bus: Sendable {
    /// Hands committed messages (in commit order) to every instance, this one included.
    func publish(_ messages: [Message])
    /// Asks for the channels' messages; each is confirmed by `subscribed` (or void by `availability(false)`).
    /// The Hub has at most one request outstanding per channel.
    func subscribe(_ channels: [ChannelName])
    /// The channels' last local subscribers are gone; each is confirmed by `unsubscribed`.
    func unsubscribe(_ channels: [ChannelName])
    /// Where the bus's events go.
    func setEvents(_ events: BusEvents)
    /// Hands a control event (revocation, member removal: JSON text) to every instance, this one included.
    func publishControl(_ payload: String)
    func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void)
}

/// Fan-out inside one process: a publish is a direct call to the receiver; requests are confirmed at once.
public final class InProcessBus: Bus {
    private let events = NIOLockedValueBox<BusEvents?>(nil)
    private let controlReceiver = NIOLockedValueBox<(@Sendable (String) -> Void)?>(nil)

    public init() {}

    public func publish(_ messages: [Message]) {
        events.withLockedValue { $0 }?.received(messages)
    }

    public func subscribe(_ channels: [ChannelName]) {
        guard let events = events.withLockedValue({ $0 }) else { return }
        for channel in channels { events.subscribed(channel) }
    }

    public func unsubscribe(_ channels: [ChannelName]) {
        guard let events = events.withLockedValue({ $0 }) else { return }
        for channel in channels { events.unsubscribed(channel) }
    }

    public func setEvents(_ events: BusEvents) {
        self.events.withLockedValue { $0 = events }
        events.availability(true)
    }

    public func publishControl(_ payload: String) {
        controlReceiver.withLockedValue { $0 }?(payload)
    }

    public func setControlReceiver(_ receiver: @escaping @Sendable (String) -> Void) {
        controlReceiver.withLockedValue { $0 = receiver }
    }
}
