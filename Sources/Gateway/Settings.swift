import Configuration
import Foundation
import SystemPackage

/// One setting of `gateway serve`: its name (the environment variable; `--set NAME=VALUE` on the command line;
/// the key `name.lowercased()` with `_` → `.` in a JSON config file), its default, and what it does.
public struct Setting: Sendable {
    public let name: String
    public let defaultValue: String
    public let help: String
}

extension GatewayConfig {
    /// Every setting, in the order of the documented table (README, `gateway serve --help`).
    public static let settings: [Setting] = [
        // Listener, and the contract's variables (PROTOCOL.md §8).
        Setting(name: "GATEWAY_HOST", defaultValue: "127.0.0.1", help: "listen address"),
        Setting(name: "GATEWAY_PORT", defaultValue: "8080", help: "listen port (0: any free port)"),
        Setting(name: "GATEWAY_THREADS", defaultValue: "one per core", help: "event loop threads"),
        Setting(name: "GATEWAY_DATA_DIR", defaultValue: "./data", help: "embedded mode's data folder (SQLite file, one instance per folder)"),
        Setting(name: "GATEWAY_JWT_SECRET", defaultValue: "none", help: "HS256 secret, at least 32 bytes (this or a JWKS file is required)"),
        Setting(name: "GATEWAY_JWKS_FILE", defaultValue: "none", help: "public keys for RS256 / ES256 (re-read on SIGHUP)"),
        Setting(name: "GATEWAY_JWT_AUDIENCE", defaultValue: "none", help: "required `aud` of tokens"),
        Setting(name: "GATEWAY_JWT_ISSUER", defaultValue: "none", help: "required `iss` of tokens"),
        Setting(name: "GATEWAY_JWT_LEEWAY", defaultValue: "30", help: "clock skew allowed on exp / nbf / iat, seconds"),
        Setting(name: "DATABASE_URL", defaultValue: "unset: SQLite", help: "Postgres store postgres://user:pass@host:port/db[?sslmode=…&sslrootcert=…]"),
        Setting(name: "REDIS_URL", defaultValue: "unset: in-process", help: "Redis fan-out redis[s]://[user:password@]host:port[?cacert=…]"),
        Setting(name: "GATEWAY_CLUSTER_KEY", defaultValue: "derived from the JWT secret", help: "key of the MAC on every bus payload (required with JWKS only)"),
        Setting(name: "GATEWAY_SINGLE_INSTANCE", defaultValue: "0", help: "1: Postgres without Redis is allowed (one instance)"),
        Setting(name: "GATEWAY_PG_PREPARED_STATEMENTS", defaultValue: "1", help: "0: appends not as a named prepared statement (PgBouncer in transaction mode before 1.21)"),
        Setting(name: "GATEWAY_INSTANCE_ID", defaultValue: "host:port", help: "name in logs and metrics"),
        Setting(name: "GATEWAY_TLS_CERT", defaultValue: "none", help: "PEM certificate (chain) for https / wss (re-read on SIGHUP)"),
        Setting(name: "GATEWAY_TLS_KEY", defaultValue: "none", help: "PEM private key of that certificate"),
        // Logs.
        Setting(name: "GATEWAY_LOG_LEVEL", defaultValue: "info", help: "trace, debug, info, notice, warning, error, critical"),
        Setting(name: "GATEWAY_LOG_FORMAT", defaultValue: "json", help: "json (one object per line) or text"),
        // Channels, retention and limits.
        Setting(name: "GATEWAY_TOPICS", defaultValue: "none", help: "topic rules `name subscribe=roles publish=roles max_count=N max_age=7d; …`"),
        Setting(name: "GATEWAY_TOPICS_FILE", defaultValue: "none", help: "a file of topic rules, one per line"),
        Setting(name: "GATEWAY_THREAD_RETENTION", defaultValue: "keep all", help: "retention of every thread: `max_count=N max_age=D`"),
        Setting(name: "GATEWAY_RETENTION_INTERVAL_MS", defaultValue: "60000", help: "how often retention runs"),
        Setting(name: "GATEWAY_BODY_LIMIT", defaultValue: "65536", help: "largest message body, bytes (413 above)"),
        Setting(name: "GATEWAY_PAGE_BYTES", defaultValue: "4194304", help: "most message bytes in one history or long-poll page"),
        Setting(name: "GATEWAY_PUBLISH_RATE", defaultValue: "50", help: "publishes per second per user (429 above)"),
        Setting(name: "GATEWAY_PUBLISH_BURST", defaultValue: "100", help: "publish burst per user"),
        Setting(name: "GATEWAY_RATE_EXEMPT_ROLES", defaultValue: "service,admin", help: "roles the publish and command rates do not apply to"),
        Setting(name: "GATEWAY_WS_COMMAND_RATE", defaultValue: "100", help: "WebSocket commands per second per connection"),
        Setting(name: "GATEWAY_WS_COMMAND_BURST", defaultValue: "200", help: "WebSocket command burst"),
        Setting(name: "GATEWAY_CONNECTION_REQUEST_RATE", defaultValue: "100", help: "HTTP requests per second per connection"),
        Setting(name: "GATEWAY_MAX_CONNECTIONS_PER_IP", defaultValue: "1000", help: "open connections per client address (0: no cap)"),
        Setting(name: "GATEWAY_MAX_STREAMS_PER_USER", defaultValue: "100", help: "live streams per user (0: no cap)"),
        Setting(name: "GATEWAY_SEND_BUDGET", defaultValue: "1048576", help: "bytes queued per connection before it is closed as a slow consumer (4008)"),
        Setting(name: "GATEWAY_WRITE_DELAY_MS", defaultValue: "0", help: "how long live messages may wait to go out together (CPU for latency)"),
        Setting(name: "GATEWAY_WS_DEFLATE", defaultValue: "1", help: "offer permessage-deflate"),
        Setting(name: "GATEWAY_REQUEST_IDLE_SECONDS", defaultValue: "10", help: "idle HTTP connection timeout"),
        Setting(name: "GATEWAY_HEADER_DEADLINE_SECONDS", defaultValue: "10", help: "time to send a request's headers"),
        Setting(name: "GATEWAY_BODY_DEADLINE_SECONDS", defaultValue: "30", help: "time to send a request's body"),
        Setting(name: "GATEWAY_ALLOWED_ORIGINS", defaultValue: "none", help: "browser origins allowed (CORS), comma-separated, or *"),
        // Presence.
        Setting(name: "GATEWAY_PRESENCE_TTL_MS", defaultValue: "6000", help: "how long a lost instance's members stay listed"),
        Setting(name: "GATEWAY_TYPING_INTERVAL_MS", defaultValue: "1000", help: "at most one typing relay per user and thread per interval"),
        // Bus and store.
        Setting(name: "GATEWAY_STORE_START_TIMEOUT_S", defaultValue: "30", help: "how long start-up waits for Postgres"),
        Setting(name: "GATEWAY_STORE_POLL_MS", defaultValue: "200", help: "store polling interval while the bus is down"),
        Setting(name: "GATEWAY_RECONCILE_MS", defaultValue: "5000", help: "interval of the channels' head check against the store"),
        Setting(name: "GATEWAY_REDIS_PING_MS", defaultValue: "1000", help: "Redis heartbeat interval"),
        Setting(name: "GATEWAY_REDIS_PING_TIMEOUT_MS", defaultValue: "1500", help: "unanswered heartbeat: the bus counts as down"),
        Setting(name: "GATEWAY_CANARY_INTERVAL_MS", defaultValue: "1000", help: "readiness canary through Redis pub/sub, interval"),
        Setting(name: "GATEWAY_CANARY_MAX_AGE_MS", defaultValue: "5000", help: "readiness fails once the newest canary is older"),
        // Drain.
        Setting(name: "GATEWAY_DRAIN_GRACE_MS", defaultValue: "0", help: "on SIGTERM: readiness 503 while still accepting, for a load balancer"),
        Setting(name: "GATEWAY_DRAIN_TIMEOUT_S", defaultValue: "10", help: "on SIGTERM: connections still open after this are closed"),
        // Development and tests.
        Setting(name: "GATEWAY_ECHO", defaultValue: "0", help: "1 serves /v1/echo (Autobahn conformance)"),
        Setting(name: "GATEWAY_DEMO", defaultValue: "0", help: "1 serves the demo page and its token endpoint (make run sets it)"),
        Setting(name: "GATEWAY_ASSETS_DIR", defaultValue: "beside the binary", help: "folder of client.js, client.d.ts and the demo page"),
        Setting(name: "GATEWAY_TEST_FAULT", defaultValue: "none", help: "tests only: break deliveries on purpose"),
        Setting(name: "GATEWAY_TEST_REFUSE", defaultValue: "none", help: "tests only: refuse ws and/or sse as a proxy might"),
        Setting(name: "GATEWAY_CONFIG_FILE", defaultValue: "none", help: "a JSON file of these settings ({\"gateway.port\": 8080})"),
    ]

    /// The settings as help text (`gateway serve --help`).
    public static var settingsHelp: String {
        "Settings: an environment variable, `--set NAME=VALUE`, or a key of GATEWAY_CONFIG_FILE (flags win over the "
            + "environment, the environment over the file).\n\n"
            + settings.map { "\($0.name) (default: \($0.defaultValue))\n    \($0.help)" }.joined(separator: "\n")
    }

    /// Reads the configuration through swift-configuration: `flags` (`--set NAME=VALUE` and the named options)
    /// first, then the environment, then the JSON file named by `GATEWAY_CONFIG_FILE` (if any). A setting that is
    /// not known, or not well-formed, fails with a `ConfigError` naming it.
    public static func load(environment: [String: String] = ProcessInfo.processInfo.environment, flags: [String: String] = [:]) async throws(ConfigError) -> GatewayConfig {
        let known = Set(settings.map(\.name))
        for name in flags.keys where !known.contains(name) { throw ConfigError(name, "not a setting (gateway serve --help lists them)") }
        var values: [AbsoluteConfigKey: ConfigValue] = [:]
        for (name, value) in flags { values[AbsoluteConfigKey(SettingsReader.key(name))] = ConfigValue(.string(value), isSecret: true) }
        var providers: [any ConfigProvider] = [InMemoryProvider(name: "flags", values: values), EnvironmentVariablesProvider(environmentVariables: environment)]
        if let path = flags["GATEWAY_CONFIG_FILE"] ?? environment["GATEWAY_CONFIG_FILE"], !path.isEmpty {
            let file: FileProvider<JSONSnapshot>
            do { file = try await FileProvider<JSONSnapshot>(filePath: FilePath(path)) } catch {
                throw ConfigError("GATEWAY_CONFIG_FILE", "cannot read \(path) as a JSON object of settings: \(error)")
            }
            for key in try keys(ofJSONFile: path) where !known.contains(key) {
                throw ConfigError("GATEWAY_CONFIG_FILE", "\(path): \(key) is not a setting (gateway serve --help lists them)")
            }
            providers.append(file)
        }
        return try read(SettingsReader(ConfigReader(providers: providers)))
    }

    /// The environment alone (in-process use; `load` is what `gateway serve` uses).
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigError) -> GatewayConfig {
        try read(SettingsReader(ConfigReader(provider: EnvironmentVariablesProvider(environmentVariables: env))))
    }

    /// The setting names a JSON settings file spells (nested objects joined by `_`, uppercased).
    private static func keys(ofJSONFile path: String) throws(ConfigError) -> [String] {
        guard let data = FileManager.default.contents(atPath: path),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw ConfigError("GATEWAY_CONFIG_FILE", "\(path) is not a JSON object")
        }
        var out: [String] = []
        func walk(_ object: [String: Any], _ prefix: [String]) {
            for (key, value) in object {
                let path = prefix + key.split(separator: ".").map(String.init)
                if let nested = value as? [String: Any] { walk(nested, path) } else { out.append(path.joined(separator: "_").uppercased()) }
            }
        }
        walk(object, [])
        return out
    }
}
