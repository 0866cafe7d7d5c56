/// One channel's subscription to the bus, as the Hub sees it: a value type that takes events and returns
/// the action the Hub carries out (the shape of postgres-nio's `ListenStateMachine.ChannelState`).
///
/// At most one bus request (SUBSCRIBE or UNSUBSCRIBE) is outstanding per channel, so the bus can match
/// replies to requests in order. Local subscribers that arrive while a request is outstanding wait for it.
/// While the bus is down the channel polls the store instead; when the bus is back the channel subscribes
/// again and reads the store once the subscription is confirmed, so nothing published in between is lost.
public struct BusSubscriptionStateMachine: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        /// No local subscriber and nothing asked of the bus.
        case initialized
        /// SUBSCRIBE asked for; live messages are held until it is confirmed and the store was read.
        case subscribing(subscribers: Int)
        /// The bus delivers the channel's messages.
        case live(subscribers: Int)
        /// UNSUBSCRIBE asked for; subscribers that joined since wait for it, then the channel subscribes again.
        case unsubscribing(subscribers: Int)
        /// The bus is down (or refused the channel): the store is polled for the channel's messages.
        case storePolling(subscribers: Int)
    }

    public enum Action: Sendable, Equatable {
        case none
        /// Ask the bus to subscribe to the channel.
        case subscribe
        /// Ask the bus to unsubscribe from the channel.
        case unsubscribe
        /// Read the store after what was delivered (the bus may have missed messages).
        case readStore
        /// Compare the store's head with what was delivered (one batched query for many channels).
        case checkHead
        /// Nothing is left of the channel: forget it.
        case release
    }

    public private(set) var state: State = .initialized

    public init() {}

    /// A machine in a given state (tests and diagnostics).
    public init(state: State) { self.state = state }

    public var subscribers: Int {
        switch state {
        case .initialized: 0
        case .subscribing(let n), .live(let n), .unsubscribing(let n), .storePolling(let n): n
        }
    }

    /// A local subscriber joined. `busUp`: the bus is available as far as the Hub knows.
    public mutating func subscriberAdded(busUp: Bool) -> Action {
        switch state {
        case .initialized:
            if busUp {
                state = .subscribing(subscribers: 1)
                return .subscribe
            }
            state = .storePolling(subscribers: 1)
            return .readStore
        case .subscribing(let n): state = .subscribing(subscribers: n + 1)
        case .live(let n): state = .live(subscribers: n + 1)
        case .unsubscribing(let n): state = .unsubscribing(subscribers: n + 1)
        case .storePolling(let n): state = .storePolling(subscribers: n + 1)
        }
        return .none
    }

    /// A local subscriber left.
    public mutating func subscriberRemoved() -> Action {
        switch state {
        case .initialized:
            return .none
        case .subscribing(let n):
            // The request stays outstanding; its confirmation turns into an UNSUBSCRIBE if nobody is left.
            state = .subscribing(subscribers: max(0, n - 1))
            return .none
        case .live(let n):
            if n <= 1 {
                state = .unsubscribing(subscribers: 0)
                return .unsubscribe
            }
            state = .live(subscribers: n - 1)
            return .none
        case .unsubscribing(let n):
            state = .unsubscribing(subscribers: max(0, n - 1))
            return .none
        case .storePolling(let n):
            if n <= 1 {
                state = .initialized
                return .release
            }
            state = .storePolling(subscribers: n - 1)
            return .none
        }
    }

    /// The bus confirmed the SUBSCRIBE: live from now on, after one store read for what came before.
    public mutating func subscribeConfirmed() -> Action {
        guard case .subscribing(let n) = state else { return .none }
        if n == 0 {
            state = .unsubscribing(subscribers: 0)
            return .unsubscribe
        }
        state = .live(subscribers: n)
        return .readStore
    }

    /// The bus refused the SUBSCRIBE: the channel is served from the store.
    public mutating func subscribeFailed() -> Action {
        guard case .subscribing(let n) = state else { return .none }
        if n == 0 {
            state = .initialized
            return .release
        }
        state = .storePolling(subscribers: n)
        return .readStore
    }

    /// The bus confirmed the UNSUBSCRIBE.
    public mutating func unsubscribeConfirmed(busUp: Bool) -> Action {
        guard case .unsubscribing(let n) = state else { return .none }
        if n == 0 {
            state = .initialized
            return .release
        }
        if busUp {
            state = .subscribing(subscribers: n)
            return .subscribe
        }
        state = .storePolling(subscribers: n)
        return .readStore
    }

    /// The bus went down: every outstanding request is void; subscribers are served from the store.
    public mutating func busLost() -> Action {
        switch state {
        case .initialized, .storePolling:
            return .none
        case .subscribing(let n), .live(let n), .unsubscribing(let n):
            if n == 0 {
                state = .initialized
                return .release
            }
            state = .storePolling(subscribers: n)
            return .readStore
        }
    }

    /// The bus is back: subscribe again (the store is read once that is confirmed).
    public mutating func busRestored() -> Action {
        guard case .storePolling(let n) = state else { return .none }
        state = .subscribing(subscribers: n)
        return .subscribe
    }

    /// The store-polling interval passed.
    public func pollTick() -> Action {
        if case .storePolling = state { return .checkHead }
        return .none
    }

    /// The reconcile interval passed (the bus is up): a quiet channel whose last message the bus lost
    /// finds it by comparing heads.
    public func reconcileTick() -> Action {
        if case .live = state { return .checkHead }
        return .none
    }

    /// The store's head was read (after `.checkHead`); `delivered` is the last seq the Hub handed on.
    public func headRead(_ head: Int64, delivered: Int64) -> Action {
        switch state {
        case .live, .storePolling: head > delivered ? .readStore : .none
        default: .none
        }
    }
}
