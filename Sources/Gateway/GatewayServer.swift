import Auth
import ChatDomain
import Fanout
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOWebSocket
import PostgresNIO
import ServiceLifecycle

/// One gateway instance: the store, the Hub and the NIO server on one port (one event loop per core).
public final class GatewayServer: Sendable {
    public let app: GatewayApp
    public let port: Int
    private let group: MultiThreadedEventLoopGroup
    private let lockFD: Int32

    /// Starts the instance. A setting that cannot work (see `GatewayConfig.validate`, an unreadable key,
    /// certificate or CA file, revocations that cannot be read) throws a `ConfigError` naming it.
    public static func start(config: GatewayConfig, logger: Logger) async throws -> GatewayServer {
        try config.validate()
        let revocations = Revocations()
        let verifier: TokenVerifier
        do {
            verifier = try await TokenVerifier(hs256Secret: config.jwtSecret, jwksFile: config.jwksFile, leeway: config.jwtLeeway,
                                               revocations: revocations, audience: config.jwtAudience, issuer: config.jwtIssuer)
        } catch {
            throw ConfigError("GATEWAY_JWKS_FILE", "\(error)")
        }
        let tls = try ListenerTLS(config: config)
        var redisEndpoint: RedisEndpoint?
        if let url = config.redisURL {
            guard let endpoint = RedisEndpoint(url: url) else {
                throw ConfigError("REDIS_URL", "expected redis://[user:password@]host:port or rediss://…")
            }
            redisEndpoint = endpoint
        }
        if let url = config.databaseURL, PostgresStore.configuration(from: url) == nil {
            throw ConfigError("DATABASE_URL", "expected postgres://user:password@host:port/db[?sslmode=…&sslrootcert=…]")
        }
        let metrics = GatewayMetrics(instance: config.instanceName)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, config.eventLoops))
        let loops = Array(group.makeIterator())

        // Background services (the Postgres pool) run in a ServiceGroup owned by this instance.
        var services: [any Service] = []
        let client = try config.databaseURL.map { try PostgresStore.makeClient(url: $0, group: group, logger: logger) }
        if let client { services.append(client) }
        let serviceGroup = ServiceGroup(configuration: .init(services: services, logger: logger))
        let servicesTask = Task { try? await serviceGroup.run() }
        let stopServices: @Sendable () async -> Void = {
            await serviceGroup.triggerGracefulShutdown()
            await servicesTask.value
        }

        let store: any Store
        var lockFD: Int32 = -1
        if let client {
            do {
                store = try await withDeadline(config.storeStartTimeout) {
                    try await PostgresStore.open(client: client, idempotencyWindow: config.idempotencyWindow,
                                                 preparedStatements: config.postgresPreparedStatements, logger: logger)
                }
            } catch {
                await stopServices()
                try? await group.shutdownGracefully()
                throw ConfigError("DATABASE_URL", error is DeadlinePassed
                    ? "the store did not answer within \(config.storeStartTimeout) (down, refused, or its TLS certificate not trusted: see the log)"
                    : "\(error)")
            }
        } else {
            try FileManager.default.createDirectory(atPath: config.dataDir, withIntermediateDirectories: true)
            lockFD = try lockDataDir(config.dataDir)
            store = try await SQLiteStore.open(path: config.dataDir + "/gateway.sqlite", idempotencyWindow: config.idempotencyWindow, logger: logger)
        }
        let bus: any Bus
        var redis: RedisBus?
        var presenceRedis: RedisCommands?
        var hub: Hub?
        /// Releases what this start made so far, when a later step fails: the event loops last, after the
        /// Postgres pool that runs on them (it keeps connections open and may be opening one).
        func abandon() async {
            redis?.stop()
            presenceRedis?.stop()
            hub?.stop()
            await store.close()
            await stopServices()
            try? await group.shutdownGracefully()
            if lockFD >= 0 { close(lockFD) }
        }
        if let endpoint = redisEndpoint, let seal = config.clusterKey.map(BusSeal.init(key:)) ?? config.jwtSecret.map(BusSeal.init(derivedFromJWTSecret:)) {
            var redisConfig = RedisConnectionStateMachine.Configuration()
            redisConfig.pingInterval = config.redisPingInterval
            redisConfig.pingTimeout = config.redisPingTimeout
            let redisBus: RedisBus
            do {
                redisBus = try RedisBus(endpoint: endpoint, seal: seal, group: group, configuration: redisConfig, canary: config.canary,
                                        metrics: metrics.fanout, logger: logger)
                presenceRedis = try RedisCommands(endpoint: endpoint, group: group, configuration: redisConfig, logger: logger)
            } catch {
                await abandon()
                throw ConfigError("REDIS_URL", "TLS: \(error)")
            }
            redis = redisBus
            bus = redisBus
        } else {
            bus = InProcessBus()
        }
        await store.setCommitObserver { bus.publish($0) }
        store.appends.commit(on: group.next())
        var hubConfig = Hub.Configuration()
        hubConfig.pollInterval = config.storePollInterval
        hubConfig.reconcileInterval = config.reconcileInterval
        hubConfig.writeDelay = config.writeDelay
        let startedHub = Hub(loops: loops, store: store, bus: bus, encoder: WireEncoding.encoder, configuration: hubConfig,
                             metrics: metrics.fanout, logger: logger)
        hub = startedHub
        let policy = Policy(topics: config.topics)
        let feed = UserFeed(store: store, logger: logger)
        let channels = ChannelService(store: store, policy: policy, bodyLimit: config.bodyLimit, pageBytes: config.pageBytes, feed: feed,
                                      appendTimer: metrics.storeAppend)
        let app = GatewayApp(config: config, verifier: verifier, channels: channels, threads: ThreadService(store: store, policy: policy, feed: feed),
                             revocations: revocations, hub: startedHub, bus: bus, redis: redis,
                             presenceLists: presenceRedis.map { RedisPresenceLists(redis: $0, ttlMillis: config.presence.ttl.milliseconds) },
                             metrics: metrics, loops: loops, logger: logger)
        bus.setControlReceiver { [weak app] payload in app?.handleControl(payload) }
        startedHub.setStoreReadHook { [weak app] channel in
            guard case .thread = channel.kind else { return }
            try? await app?.refreshRemovals()
        }
        // Tokens revoked before this start must not work here: an instance that cannot read them does not start.
        do {
            try await app.refreshRevocations()
        } catch {
            await abandon()
            throw ConfigError(config.databaseURL == nil ? "GATEWAY_DATA_DIR" : "DATABASE_URL", "cannot read the revocations: \(error)")
        }
        redis?.start()
        presenceRedis?.start()
        let upgrades = PendingUpgrades()
        let quiescing = ServerQuiescingHelper(group: group)

        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.so_sndbuf), value: SocketOptionValue(config.socketSendBuffer))
            .childChannelOption(ChannelOptions.writeBufferWaterMark,
                                value: .init(low: config.sendBudget / 2, high: config.sendBudget))
            .childChannelOption(ChannelOptions.maxMessagesPerRead, value: 16)
            // NIO keeps each connection's receive buffer for its next read: start it small (an idle WebSocket holds
            // 512 bytes, not 2 KiB); it grows for clients that send more.
            .childChannelOption(ChannelOptions.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 65536))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try Self.configure(channel, app: app, upgrades: upgrades)
                    // Below everything else: every handler above sees plain HTTP and WebSocket bytes.
                    if let context = tls?.context {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context), position: .first)
                    }
                }
            }
        let serverChannel: any Channel
        do {
            serverChannel = try await bootstrap
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(quiescing.makeServerChannelHandler(channel: channel))
                    }
                }
                .bind(host: config.host, port: config.port).get()
        } catch {
            await abandon()
            throw error
        }
        // The running instance as services, in dependency order; a graceful shutdown stops them in reverse: the
        // listener drains, the periodic work stops, the Hub, the bus connections, the store, then the Postgres
        // pool (which runs from the start, in a group of its own, because the store's migrations need it; its
        // stop is this group's last step).
        let (presenceConnection, busConnection) = (presenceRedis, redis)
        let pruneEvery = min(config.idempotencyWindow, .seconds(3600))
        let drain = Drain(app: app, serverChannel: serverChannel, quiescing: quiescing)
        let parts = ServiceGroup(configuration: .init(services: [
            InstancePart(description: "postgres pool") { await stopServices() },
            InstancePart(description: "store") {
                // Publishes still in flight (their client gone) commit before the store closes.
                for _ in 0..<100 where store.appends.waiting > 0 { try? await Task.sleep(for: .milliseconds(50)) }
                await store.close()
            },
            InstancePart(description: "bus") {
                busConnection?.stop()
                presenceConnection?.stop()
            },
            InstancePart(description: "hub") {
                startedHub.stop()
                app.timers.stop()
            },
            // Request ids out of their window, revocations past their end, old removals: every hour (or every window).
            PeriodicWork(description: "pruning", interval: pruneEvery) {
                do { try await store.pruneExpired() } catch { logger.warning("pruning expired rows failed", metadata: ["error": "\(error)"]) }
            },
            // Revocations and removals the bus lost (Redis down at the time) still arrive.
            PeriodicWork(description: "revocation refresh", interval: config.revocationRefresh) { [weak app] in
                try? await app?.refreshRevocations()
                try? await app?.refreshRemovals()
            },
            // Retention: the topics' limits (and the threads', when configured), in batches.
            PeriodicWork(description: "retention", interval: config.retentionInterval) { [weak app] in await app?.applyRetention() },
            // Presence: events for watched channels and this instance's snapshot, every tick.
            PeriodicWork(description: "presence ticker", interval: config.presence.tick) { [weak app] in await app?.presence.tick() },
            InstancePart(description: "listener") { await drain.run() },
        ], logger: logger))
        let partsRun = Task { try? await parts.run() }
        let port = serverChannel.localAddress?.port ?? config.port
        logger.info("gateway listening", metadata: ["instance": "\(config.instanceName)", "address": "\(config.host):\(port)",
                                                        "mode": "\(config.databaseURL == nil ? "embedded" : "cluster")", "fanout": "\(redis == nil ? "in-process" : "redis")"])
        return GatewayServer(app: app, port: port, group: group, lockFD: lockFD, tls: tls, stop: {
            await parts.triggerGracefulShutdown()
            await partsRun.value
        })
    }

    private let stop: @Sendable () async -> Void
    private let tls: ListenerTLS?
    private let stopping = NIOLockedValueBox<Task<Void, Never>?>(nil)

    private init(app: GatewayApp, port: Int, group: MultiThreadedEventLoopGroup, lockFD: Int32,
                 tls: ListenerTLS?, stop: @escaping @Sendable () async -> Void) {
        self.app = app
        self.tls = tls
        self.port = port
        self.group = group
        self.lockFD = lockFD
        self.stop = stop
    }

    /// Reads the JWKS file again (SIGHUP); a file that cannot be read or parsed keeps the keys in use. Counted
    /// in `/metrics` (`gateway_jwks_reloads_total{result="ok"|"failed"}`).
    public func reloadKeys() async {
        do {
            try await app.verifier.reloadKeys()
            app.metrics.count(.jwksReloadOK)
            app.logger.info("reloaded the JWKS file")
        } catch {
            app.metrics.count(.jwksReloadFailed)
            app.logger.error("could not reload the JWKS file; the keys in use stay", metadata: ["error": "\(error)"])
        }
    }

    /// Reads the TLS certificate and key again (SIGHUP): new connections use them, open ones keep theirs; files
    /// that cannot be used keep the ones in use. Counted in `/metrics` (`gateway_tls_reloads_total{result}`).
    public func reloadCertificate() {
        guard let tls else { return }
        do {
            try tls.reload()
            app.metrics.count(.tlsReloadOK)
            app.logger.info("reloaded the TLS certificate and key")
        } catch {
            app.metrics.count(.tlsReloadFailed)
            app.logger.error("could not reload the TLS certificate; the one in use stays", metadata: ["error": "\(error)"])
        }
    }

    /// Drains and stops the instance (SIGTERM, SIGINT): readiness 503 `SHUTTING_DOWN` (for `drainGrace` while
    /// still accepting), then the listener closes, idle connections close, publishes in flight are answered,
    /// WebSockets close with 1001, SSE streams and long-polls end; connections still open after `drainTimeout`
    /// are closed. Then the Hub, the bus and the store stop. A second call waits for the first.
    public func shutdown() async {
        let task = stopping.withLockedValue { running -> Task<Void, Never> in
            if let running { return running }
            app.logger.info("gateway shutting down")
            let (stop, group, lockFD) = (self.stop, self.group, self.lockFD)
            let task = Task {
                await stop()
                try? await group.shutdownGracefully()
                if lockFD >= 0 { close(lockFD) }
            }
            running = task
            return task
        }
        await task.value
    }

    /// The HTTP pipeline with the WebSocket upgrade for `/v1/ws` (authenticated before the 101) and
    /// `/v1/echo` (when enabled). A refused upgrade falls through to `HTTPHandler`, which answers with the
    /// error envelope.
    static func configure(_ channel: any Channel, app: GatewayApp, upgrades: PendingUpgrades) throws {
        let sync = channel.pipeline.syncOperations
        let deadline = RequestDeadline(app.config, timers: app.timers.on(channel.eventLoop))
        // A client IP past its connection cap gets its first request answered 429, then the connection closes.
        if app.config.maxConnectionsPerIP > 0, let ip = channel.remoteAddress?.ipAddress {
            let open = app.connectionsPerIP.add(ip)
            channel.closeFuture.whenComplete { _ in app.connectionsPerIP.remove(ip) }
            if open > app.config.maxConnectionsPerIP {
                try sync.configureHTTPServerPipeline(withErrorHandling: false)
                try ParseErrorAnswer.add(to: sync)
                try sync.addHandler(deadline, position: .first)
                let refusal = ApiError(.rateLimited, "at most \(app.config.maxConnectionsPerIP) connections per client address",
                                       details: ["limit": String(app.config.maxConnectionsPerIP)], retryAfter: 1)
                try sync.addHandlers(RequestReader(app: app, deadline: deadline), RequestGate(app: app, refusal: refusal), HTTPHandler(app: app))
                return
            }
        }
        // The handshake's checks and its `101` (the upgrade pipeline handler is not used: `WebSocketUpgrader` adds the session).
        let handshake = NIOWebSocketServerUpgrader(
            maxFrameSize: app.config.maxMessageBytes,
            automaticErrorHandling: false,
            shouldUpgrade: { channel, head in
                let request = HTTPRequest(head: head, body: ByteBuffer(), app: app)
                // A browser page from an origin not allowed, a method other than GET (RFC 6455 §4.1) or a malformed
                // handshake is refused (HTTPHandler answers 403, 405, 400 or 426 with the envelope).
                guard head.method == .GET, app.config.allows(origin: head.headers.first(name: "origin")), HTTPHandler.handshakeError(head.headers) == nil,
                      !app.config.testRefuse.contains("ws") else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                var headers: HTTPHeaders = ["X-Request-Id": request.requestId]
                let deflate = app.config.permessageDeflate
                    ? PermessageDeflate.negotiate(head.headers[canonicalForm: "sec-websocket-extensions"].map(String.init).joined(separator: ","))
                    : nil
                if let deflate { headers.add(name: "Sec-WebSocket-Extensions", value: deflate.responseHeader) }
                switch request.path {
                case ["v1", "echo"]:
                    guard app.config.echo else { return channel.eventLoop.makeSucceededFuture(nil) }
                    upgrades.put(channel, .init(actor: nil, log: request.log, deflate: deflate))
                    return channel.eventLoop.makeSucceededFuture(headers)
                case ["v1", "ws"]:
                    // A token verified before is checked here, on the loop (expiry, revocation); a new one in a task.
                    let known: Actor?
                    do { known = try app.authenticateKnown(request.bearerToken) } catch { return channel.eventLoop.makeSucceededFuture(nil) }
                    if let actor = known {
                        upgrades.put(channel, .init(actor: actor, log: request.log, deflate: deflate))
                        return channel.eventLoop.makeSucceededFuture(headers)
                    }
                    return channel.eventLoop.makeFutureWithTask {
                        guard let actor = try? await app.authenticate(request.bearerToken) else { return nil }
                        upgrades.put(channel, .init(actor: actor, log: request.log, deflate: deflate))
                        return headers
                    }
                default:
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
            },
            upgradePipelineHandler: { channel, _ in channel.eventLoop.makeSucceededVoidFuture() })
        let upgrader = WebSocketUpgrader(handshake: handshake) { channel in
            let upgrade = upgrades.take(channel)
            if let upgrade, let actor = upgrade.actor {
                return WebSocketSession(app: app, actor: actor, log: upgrade.log, eventLoop: channel.eventLoop, deflate: upgrade.deflate)
            }
            return EchoSession(maxMessageBytes: app.config.maxMessageBytes, pingInterval: .seconds(app.config.wsPingSeconds),
                               timers: app.timers.on(channel.eventLoop), deflate: upgrade?.deflate)
        }
        try sync.configureHTTPServerPipeline(
            withServerUpgrade: (upgraders: [upgrader], completionHandler: { context in
                let sync = context.pipeline.syncOperations
                sync.removeIfPresent(HTTPHandler.self)
                sync.removeRequestHandling()
            }),
            withErrorHandling: false)
        try ParseErrorAnswer.add(to: sync)
        // Read-idle events reach HTTPHandler, which closes a connection that stalls mid-request or idles
        // between requests (WebSockets have their own pings; the handler leaves with the upgrade).
        try sync.addHandler(IdleStateHandler(readTimeout: .seconds(app.config.requestIdleSeconds)), position: .first)
        try sync.addHandler(deadline, position: .first)
        try sync.addHandlers(RequestReader(app: app, deadline: deadline), RequestGate(app: app), HTTPHandler(app: app))
        channel.closeFuture.whenComplete { _ in _ = upgrades.take(channel) }
    }

    /// Takes an exclusive lock on the data folder: one embedded instance per folder.
    private static func lockDataDir(_ dir: String) throws -> Int32 {
        let fd = open(dir + "/gateway.lock", O_CREAT | O_RDWR, 0o644)
        guard fd >= 0 else { throw ConfigError("GATEWAY_DATA_DIR", "cannot open \(dir)/gateway.lock") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw ConfigError("GATEWAY_DATA_DIR", "another gateway is using \(dir)")
        }
        return fd
    }
}

/// The listener's TLS context (https, wss) from `GATEWAY_TLS_CERT` and `GATEWAY_TLS_KEY` (PEM; the certificate
/// file may hold the chain), replaced by `reload()`; each new connection takes the current one.
final class ListenerTLS: Sendable {
    private let certificateFile: String
    private let keyFile: String
    private let current: NIOLockedValueBox<NIOSSLContext>

    /// Nil without TLS settings; throws a `ConfigError` naming the file that cannot be used.
    convenience init?(config: GatewayConfig) throws(ConfigError) {
        guard let certificateFile = config.tlsCertificateFile, let keyFile = config.tlsKeyFile else { return nil }
        self.init(certificateFile: certificateFile, keyFile: keyFile, context: try Self.load(certificateFile: certificateFile, keyFile: keyFile))
    }

    private init(certificateFile: String, keyFile: String, context: NIOSSLContext) {
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        self.current = NIOLockedValueBox(context)
    }

    var context: NIOSSLContext { current.withLockedValue { $0 } }

    func reload() throws(ConfigError) {
        let context = try Self.load(certificateFile: certificateFile, keyFile: keyFile)
        current.withLockedValue { $0 = context }
    }

    static func load(certificateFile: String, keyFile: String) throws(ConfigError) -> NIOSSLContext {
        let chain: [NIOSSLCertificate]
        do { chain = try NIOSSLCertificate.fromPEMFile(certificateFile) } catch {
            throw ConfigError("GATEWAY_TLS_CERT", "cannot read a PEM certificate from \(certificateFile): \(error)")
        }
        guard !chain.isEmpty else { throw ConfigError("GATEWAY_TLS_CERT", "no certificate in \(certificateFile)") }
        let key: NIOSSLPrivateKey
        do { key = try NIOSSLPrivateKey(file: keyFile, format: .pem) } catch {
            throw ConfigError("GATEWAY_TLS_KEY", "cannot read a PEM private key from \(keyFile): \(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        do { return try NIOSSLContext(configuration: configuration) } catch {
            throw ConfigError("GATEWAY_TLS_KEY", "the key does not go with the certificate: \(error)")
        }
    }
}

/// Actors verified before a `101`, waiting for their session handler.
final class PendingUpgrades: Sendable {
    /// What the handshake decided, for the handler that takes over after the 101 (no actor: echo).
    struct Upgrade: Sendable {
        let actor: Actor?
        /// The handshake's request id and logger.
        let log: RequestLog
        let deflate: PermessageDeflate.Agreement?
    }
    private let pending = NIOLockedValueBox<[ObjectIdentifier: Upgrade]>([:])

    func put(_ channel: any Channel, _ upgrade: Upgrade) {
        pending.withLockedValue { $0[ObjectIdentifier(channel)] = upgrade }
    }

    func take(_ channel: any Channel) -> Upgrade? {
        pending.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(channel)) }
    }
}
