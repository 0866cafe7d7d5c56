import ArgumentParser
import Auth
import Foundation
import Gateway
import Logging
import ServiceLifecycle

@main
struct GatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gateway",
        abstract: "Realtime message gateway: WebSocket, Server-Sent Events and long-poll over a durable, ordered store.",
        subcommands: [Serve.self, Token.self],
        defaultSubcommand: Serve.self)
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the gateway (settings from flags, the environment of PROTOCOL.md §8, or a JSON file).",
        discussion: GatewayConfig.settingsHelp)

    @Option(help: "Listen address (GATEWAY_HOST).") var host: String?
    @Option(help: "Listen port (GATEWAY_PORT).") var port: Int?
    @Option(help: "Embedded mode's data folder (GATEWAY_DATA_DIR).") var dataDir: String?
    @Option(help: "HS256 secret, at least 32 bytes (GATEWAY_JWT_SECRET).") var jwtSecret: String?
    @Option(help: "JWKS file with the RS256 / ES256 public keys, re-read on SIGHUP (GATEWAY_JWKS_FILE).") var jwksFile: String?
    @Flag(help: "Serve /v1/echo for conformance tests (GATEWAY_ECHO=1).") var echo = false
    @Option(help: "Event loop threads (GATEWAY_THREADS).") var threads: Int?
    @Option(help: "Postgres URL: cluster store (DATABASE_URL).") var databaseURL: String?
    @Option(help: "Redis URL: cluster fan-out (REDIS_URL).") var redisURL: String?
    @Option(help: "Name in logs and metrics (GATEWAY_INSTANCE_ID).") var instanceId: String?
    @Option(help: "A JSON file of settings (GATEWAY_CONFIG_FILE).") var configFile: String?
    @Option(name: .customLong("set"), help: ArgumentHelp("Any setting listed above, as NAME=VALUE (repeatable).", valueName: "NAME=VALUE"))
    var settings: [String] = []

    func run() async throws {
        // Flags first, then the environment, then the file. A setting that is wrong stops the start with one
        // line naming it, and exit status 2.
        var flags: [String: String] = [:]
        for pair in settings {
            guard let equals = pair.firstIndex(of: "=") else { Self.refuse(ConfigError(pair, "expected --set NAME=VALUE")) }
            flags[String(pair[..<equals])] = String(pair[pair.index(after: equals)...])
        }
        let named: [(String, String?)] = [("GATEWAY_HOST", host), ("GATEWAY_PORT", port.map(String.init)), ("GATEWAY_DATA_DIR", dataDir),
                                          ("GATEWAY_JWT_SECRET", jwtSecret), ("GATEWAY_JWKS_FILE", jwksFile), ("GATEWAY_ECHO", echo ? "1" : nil),
                                          ("GATEWAY_THREADS", threads.map(String.init)), ("DATABASE_URL", databaseURL), ("REDIS_URL", redisURL),
                                          ("GATEWAY_INSTANCE_ID", instanceId), ("GATEWAY_CONFIG_FILE", configFile)]
        for case let (name, value?) in named { flags[name] = value }
        let config: GatewayConfig
        do {
            config = try await GatewayConfig.load(flags: flags)
            try config.validate()
        } catch {
            Self.refuse(error)
        }

        let (level, format) = (config.logLevel, config.logFormat)
        LoggingSystem.bootstrap { label in
            switch format {
            case .json:
                return JSONLogHandler(label: label, level: level)
            case .text:
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        }
        var logger = Logger(label: "gateway")
        logger[metadataKey: "instance"] = "\(config.instanceName)"

        // SIGTERM or SIGINT: stop accepting, close WebSockets with 1001, end streams, finish publishes, exit.
        let group = ServiceGroup(configuration: .init(
            services: [GatewayService(config: config, logger: logger)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }

    static func refuse(_ error: ConfigError) -> Never {
        FileHandle.standardError.write(Data("gateway: \(error)\n".utf8))
        Foundation.exit(2)
    }
}

/// The gateway instance as a swift-service-lifecycle service.
struct GatewayService: Service {
    let config: GatewayConfig
    let logger: Logger

    func run() async throws {
        let server: GatewayServer
        do {
            server = try await GatewayServer.start(config: config, logger: logger)
        } catch let error as ConfigError {
            Serve.refuse(error)
        }
        let scheme = config.tlsCertificateFile == nil ? "http" : "https"
        if config.databaseURL == nil {
            print("gateway listening on \(scheme)://\(config.host):\(server.port) (embedded, data in \(config.dataDir))")
        } else {
            print("gateway listening on \(scheme)://\(config.host):\(server.port) (cluster store\(config.redisURL == nil ? "" : ", Redis fan-out"))")
        }
        fflush(nil)
        // SIGHUP: read the JWKS file and the TLS certificate and key again (rotation without a restart).
        signal(SIGHUP, SIG_IGN)
        let hangup = DispatchSource.makeSignalSource(signal: SIGHUP)
        hangup.setEventHandler {
            Task {
                await server.reloadKeys()
                server.reloadCertificate()
            }
        }
        hangup.resume()
        defer { hangup.cancel() }
        try? await gracefulShutdown()
        await server.shutdown()
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a token signed with the HS256 secret (for development and tests).")

    @Option(help: "The token's subject.") var sub: String
    @Option(help: "Comma-separated roles.") var roles: String = ""
    @Option(help: "Lifetime: seconds, or with a suffix s, m, h, d.") var ttl: String = "1h"
    @Option(help: "Session id claim.") var sid: String?
    @Option(help: "HS256 secret (default GATEWAY_JWT_SECRET).") var secret: String?

    func run() async throws {
        guard let secret = secret ?? ProcessInfo.processInfo.environment["GATEWAY_JWT_SECRET"], secret.utf8.count >= 32 else {
            throw ValidationError("give --secret or GATEWAY_JWT_SECRET (at least 32 bytes)")
        }
        guard let seconds = Self.seconds(ttl) else { throw ValidationError("bad --ttl \(ttl)") }
        let verifier = await TokenVerifier(hs256Secret: secret)
        let roleList = roles.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        print(try await verifier.mint(sub: sub, roles: roleList, ttl: seconds, sid: sid))
    }

    static func seconds(_ text: String) -> TimeInterval? {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        if let last = text.last, let unit = units[last], let n = Double(text.dropLast()) { return n * unit }
        return Double(text)
    }
}
