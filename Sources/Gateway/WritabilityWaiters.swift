import NIOCore

/// Futures that complete when a connection can take more bytes: how catch-up pages are paced.
struct WritabilityWaiters {
    private var waiting: [EventLoopPromise<Void>] = []

    mutating func whenWritable(_ channel: any Channel) -> EventLoopFuture<Void> {
        if channel.isWritable { return channel.eventLoop.makeSucceededVoidFuture() }
        let promise = channel.eventLoop.makePromise(of: Void.self)
        waiting.append(promise)
        return promise.futureResult
    }

    mutating func writable() {
        let ready = waiting
        waiting.removeAll()
        for promise in ready { promise.succeed() }
    }

    mutating func fail(_ error: any Error) {
        let ready = waiting
        waiting.removeAll()
        for promise in ready { promise.fail(error) }
    }
}
