import ChatDomain
import Logging
import NIOCore
import NIOExtras
import ServiceLifecycle

/// One part of a running instance (the store, the bus, the Hub, the listener) as a swift-service-lifecycle
/// Service: started by `GatewayServer.start` in dependency order, it holds until its group shuts down
/// gracefully, then stops its part. The group shuts its services down in reverse order, one after the other:
/// the listener drains first, the store goes last.
struct InstancePart: Service, CustomStringConvertible {
    let description: String
    let stop: @Sendable () async -> Void

    func run() async throws {
        try? await gracefulShutdown()
        await stop()
    }
}

/// Work repeated every `interval` until the group shuts down (pruning, refreshes, presence ticks).
struct PeriodicWork: Service, CustomStringConvertible {
    let description: String
    let interval: Duration
    let work: @Sendable () async -> Void

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do { try await Task.sleep(for: interval) } catch { return }
                await work()
            }
        }
    }
}

/// The listener's drain: readiness turns 503 `SHUTTING_DOWN` (for `drainGrace` the listener still accepts, so
/// that a load balancer notices), then NIOExtras' `ServerQuiescingHelper` closes the listener and asks every
/// connection to quiesce (idle HTTP connections close, one answering a request closes after its answer) while
/// every live stream is shut down (WebSockets answer the publishes they read, then close 1001; SSE streams and
/// long-polls end). It returns once every connection closed, or at `drainTimeout` (the rest are closed with
/// the event loops).
struct Drain: Sendable {
    let app: GatewayApp
    let serverChannel: any Channel
    let quiescing: ServerQuiescingHelper

    func run() async {
        let config = app.config
        app.startDraining()
        app.logger.info("gateway draining", metadata: ["grace_ms": "\(config.drainGrace.milliseconds)", "timeout_ms": "\(config.drainTimeout.milliseconds)",
                                                       "streams": "\(app.streams.count)"])
        if config.drainGrace > .zero { try? await Task.sleep(for: config.drainGrace) }
        let closed = serverChannel.eventLoop.makePromise(of: Void.self)
        quiescing.initiateShutdown(promise: closed)
        for stream in app.streams.all() { stream.shutdown() }
        do {
            try await withDeadline(config.drainTimeout) { try await closed.futureResult.get() }
            app.logger.info("gateway drained: every connection closed")
        } catch {
            app.logger.warning("drain deadline passed; closing the connections still open", metadata: ["streams": "\(app.streams.count)"])
        }
    }
}
