import Logging
import NIOCore
import NIOSSL

/// Redis commands with replies (the cluster's presence lists), on a connection of their own driven by a
/// `RedisConnectionStateMachine` in the `.commands` role: AUTH and TLS as the bus's, heartbeats, reconnects
/// with backoff. Commands are pipelined and answered in order; nothing waits for a connection that is not
/// ready (the call fails at once), and at most `maxInFlightBytes` are unanswered.
public final class RedisCommands: @unchecked Sendable {  // `waiting` is only touched on the driver's loop
    private let driver: RedisConnectionDriver
    private var waiting = CircularBuffer<Batch>()

    private struct Batch {
        let promise: EventLoopPromise<[RESPValue]>
        var left: Int
        var replies: [RESPValue] = []
    }

    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String { "redis is not available for commands" }
    }

    public init(endpoint: RedisEndpoint, group: any EventLoopGroup, configuration: RedisConnectionStateMachine.Configuration = .init(),
                logger: Logger) throws {
        var configuration = configuration
        configuration.credentials = endpoint.credentials
        driver = RedisConnectionDriver(endpoint: endpoint, tls: try endpoint.tlsContext(), seal: BusSeal(key: ""), loop: group.next(), logger: logger,
                                       machine: RedisConnectionStateMachine(role: .commands, configuration: configuration))
        driver.onReply = { [unowned self] reply in self.answered(reply) }
        driver.onConnectionLost = { [unowned self] in self.failAll() }
    }

    public func start() { driver.start() }
    public func stop() {
        driver.stop()
        driver.loop.execute { self.failAll() }
    }

    /// Sends the commands (each an argument list) in one write; their replies, in order. An error reply is a
    /// reply (`.error`), not a failure; a connection that is not ready, or goes before answering, is.
    public func run(_ commands: [[[UInt8]]]) async throws -> [RESPValue] {
        guard !commands.isEmpty else { return [] }
        let loop = driver.loop
        return try await loop.flatSubmit { () -> EventLoopFuture<[RESPValue]> in
            var buffer = ByteBuffer()
            for command in commands { RESPCommand.encode(command, into: &buffer) }
            guard self.driver.sendCommands(buffer, count: commands.count) else { return loop.makeFailedFuture(Unavailable()) }
            let promise = loop.makePromise(of: [RESPValue].self)
            self.waiting.append(Batch(promise: promise, left: commands.count))
            return promise.futureResult
        }.get()
    }

    private func answered(_ reply: RESPValue) {
        guard !waiting.isEmpty else { return }
        waiting[waiting.startIndex].replies.append(reply)
        waiting[waiting.startIndex].left -= 1
        if waiting[waiting.startIndex].left == 0 {
            let batch = waiting.removeFirst()
            batch.promise.succeed(batch.replies)
        }
    }

    private func failAll() {
        while let batch = waiting.popFirst() { batch.promise.fail(Unavailable()) }
    }
}
