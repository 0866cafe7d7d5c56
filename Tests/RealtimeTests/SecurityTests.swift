import Auth
import ChatDomain
import Fanout
import Foundation
@testable import Gateway
import NIOCore
import NIOSSL
import Testing

/// Start-up fails closed: a setting that cannot work stops the `gateway` process with exit status 2 and one
/// line naming the setting, before anything listens.
@Suite(.serialized) struct ConfigFailsClosedTests {
    /// Runs `gateway serve` with only `environment` (and a port and data folder) set; its status and output.
    static func start(_ environment: [String: String]) async throws -> (Int32, String) {
        let dataDir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-refused-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dataDir) }
        let base = ["GATEWAY_PORT": String(TestServices.freePort()), "GATEWAY_DATA_DIR": dataDir, "PATH": "/usr/bin:/bin"]
        return try await TestServices.run(GatewayProcess.binary, ["serve"], environment: base.merging(environment) { $1 }, timeout: 60)
    }

    static let secret = ["GATEWAY_JWT_SECRET": TestGateway.secret]
    static let cluster = ["DATABASE_URL": "postgres://postgres@127.0.0.1:1/gateway", "REDIS_URL": "redis://127.0.0.1:1"]

    /// (what is wrong, the environment, the setting the refusal must name)
    static let cases: [(String, [String: String], String)] = {
        let badTopics = FileManager.default.temporaryDirectory.appendingPathComponent("gw-topics-\(UUID().uuidString)").path
        try? "alerts subscribe=ops\nops publish=pager bogus=x\n".write(toFile: badTopics, atomically: true, encoding: .utf8)
        return [
            ("no secret and no JWKS file", [:], "GATEWAY_JWT_SECRET"),
            ("a secret under 32 bytes", ["GATEWAY_JWT_SECRET": "short"], "GATEWAY_JWT_SECRET"),
            ("a malformed GATEWAY_TOPICS", secret.merging(["GATEWAY_TOPICS": "ops subscribe"]) { $1 }, "GATEWAY_TOPICS"),
            ("a malformed topics file", secret.merging(["GATEWAY_TOPICS_FILE": badTopics]) { $1 }, "GATEWAY_TOPICS_FILE"),
            ("a topics file that does not exist", secret.merging(["GATEWAY_TOPICS_FILE": badTopics + "-missing"]) { $1 }, "GATEWAY_TOPICS_FILE"),
            ("Redis without Postgres", secret.merging(["REDIS_URL": "redis://127.0.0.1:1", "GATEWAY_CLUSTER_KEY": TestGateway.clusterKey]) { $1 }, "REDIS_URL"),
            ("Postgres without Redis", secret.merging(["DATABASE_URL": "postgres://postgres@127.0.0.1:1/gateway"]) { $1 }, "DATABASE_URL"),
            ("a cluster with neither its key nor an HS256 secret to derive it from",
             cluster.merging(["GATEWAY_JWKS_FILE": "/nonexistent/jwks.json"]) { $1 }, "GATEWAY_CLUSTER_KEY"),
            ("a cluster key under 32 bytes", secret.merging(cluster) { $1 }.merging(["GATEWAY_CLUSTER_KEY": "short"]) { $1 }, "GATEWAY_CLUSTER_KEY"),
            ("a REDIS_URL that is not one", secret.merging(cluster) { $1 }.merging(["REDIS_URL": "http://127.0.0.1:1", "GATEWAY_CLUSTER_KEY": TestGateway.clusterKey]) { $1 }, "REDIS_URL"),
            ("an unknown sslmode", secret.merging(cluster) { $1 }.merging(["DATABASE_URL": "postgres://postgres@127.0.0.1:1/gateway?sslmode=maybe", "GATEWAY_CLUSTER_KEY": TestGateway.clusterKey]) { $1 }, "DATABASE_URL"),
            ("a port that is not a number", secret.merging(["GATEWAY_PORT": "http"]) { $1 }, "GATEWAY_PORT"),
            ("a write delay out of range", secret.merging(["GATEWAY_WRITE_DELAY_MS": "500"]) { $1 }, "GATEWAY_WRITE_DELAY_MS"),
            ("a TLS certificate without its key", secret.merging(["GATEWAY_TLS_CERT": "/nonexistent/cert.pem"]) { $1 }, "GATEWAY_TLS_KEY"),
            ("a TLS certificate that cannot be read", secret.merging(["GATEWAY_TLS_CERT": "/nonexistent/cert.pem", "GATEWAY_TLS_KEY": "/nonexistent/key.pem"]) { $1 }, "GATEWAY_TLS_CERT"),
            ("a JWKS file that cannot be read", ["GATEWAY_JWKS_FILE": "/nonexistent/jwks.json"], "GATEWAY_JWKS_FILE"),
        ]
    }()

    @Test(arguments: cases.indices) func startIsRefusedNamingTheSetting(_ index: Int) async throws {
        let (what, environment, setting) = Self.cases[index]
        let (status, output) = try await Self.start(environment)
        #expect(status == 2, "\(what): exit status \(status)\n\(output)")
        let lines = output.split(separator: "\n").filter { $0.contains("configuration error") }
        #expect(lines.count == 1 && lines[0].contains("configuration error: \(setting):"), "\(what): \(output)")
    }

    /// The same binary with a complete configuration starts (the refusals above are the settings', not the
    /// environment's).
    @Test func aCompleteConfigurationStarts() async throws {
        try await withStarted({ try await GatewayProcess.start(environment: Self.secret) }, stop: { await $0.stop() }) { gateway in
            let ready = try await HTTPTestClient.request(.GET, port: gateway.port, "/readyz")
            #expect(ready.status == 200)
        }
    }

    /// An instance that cannot read the revocations does not start: a token revoked before would work on it.
    @Test func revocationsThatCannotBeReadStopTheStart() async throws {
        let postgres = try await PostgresServer.start()
        do {
            let environment = Self.secret.merging(["DATABASE_URL": postgres.url, "GATEWAY_SINGLE_INSTANCE": "1"]) { $1 }
            // First a start that works (and applies the migrations), then the table goes away.
            let first = try await GatewayProcess.start(environment: environment)
            await first.stop()
            let (renamed, output) = try await TestServices.run(postgres.binDir + "/psql", [
                "-h", "127.0.0.1", "-p", String(postgres.port), "-U", "postgres", "-d", "gateway", "-c", "ALTER TABLE revocations RENAME TO revocations_gone",
            ])
            #expect(renamed == 0, "\(output)")
            let (status, refusal) = try await Self.start(environment)
            #expect(status == 2, "\(refusal)")
            #expect(refusal.contains("configuration error: DATABASE_URL: cannot read the revocations"), "\(refusal)")
            await postgres.stop()
        } catch {
            await postgres.stop()
            throw error
        }
    }
}

/// `GATEWAY_JWT_AUDIENCE` and `GATEWAY_JWT_ISSUER`: a token from the same key for another audience or from
/// another issuer is refused.
struct AudienceAndIssuerTests {
    @Test func audienceAndIssuerAreCheckedWhenConfigured() async throws {
        let minter = await TokenVerifier(hs256Secret: TestGateway.secret)
        let verifier = try await TokenVerifier(hs256Secret: TestGateway.secret, audience: "gateway", issuer: "https://id.example")
        func token(aud: [String]?, iss: String?) async throws -> String {
            try await minter.mint(sub: "ann", roles: [], ttl: 600, audience: aud, issuer: iss)
        }
        let good = try await verifier.verify(try await token(aud: ["gateway"], iss: "https://id.example"))
        #expect(good.sub == "ann")
        #expect(try await verifier.verify(try await token(aud: ["billing", "gateway"], iss: "https://id.example")).sub == "ann")
        await #expect(throws: AuthFailure.wrongAudience) { try await verifier.verify(try await token(aud: nil, iss: "https://id.example")) }
        await #expect(throws: AuthFailure.wrongAudience) { try await verifier.verify(try await token(aud: ["billing"], iss: "https://id.example")) }
        await #expect(throws: AuthFailure.wrongIssuer) { try await verifier.verify(try await token(aud: ["gateway"], iss: nil)) }
        await #expect(throws: AuthFailure.wrongIssuer) { try await verifier.verify(try await token(aud: ["gateway"], iss: "https://other.example")) }
        // Without the settings, neither claim is required.
        #expect(try await minter.verify(try await token(aud: nil, iss: nil)).sub == "ann")
    }

    @Test func aTokenForAnotherAudienceIsRefusedOverHTTP() async throws {
        try await withTestGateway(configure: { $0.jwtAudience = "gateway" }) { gateway in
            let minter = await TokenVerifier(hs256Secret: TestGateway.secret)
            let other = try await minter.mint(sub: "ann", roles: ["admin"], ttl: 600, audience: ["billing"])
            let mine = try await minter.mint(sub: "ann", roles: ["admin"], ttl: 600, audience: ["gateway"])
            // Every transport refuses it, the WebSocket before its upgrade.
            try await AuthTests.expectRefused(other, port: gateway.port, channel: "topic:aud", "a token for another audience")
            #expect(try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/topic:aud/messages", token: mine).status == 200)
        }
    }
}

/// CORS: `GATEWAY_ALLOWED_ORIGINS` drives `Access-Control-Allow-*` on REST and SSE, with preflights.
struct CORSTests {
    static let allowed = "https://chat.example"
    static let other = "https://evil.example"

    @Test func preflightAndCrossOriginRequestsFromAnAllowedOriginSucceedAndOthersAreRefused() async throws {
        try await withTestGateway(configure: { $0.allowedOrigins = [Self.allowed] }) { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let channel = "topic:cors"
            let preflight: [(String, String)] = [("Access-Control-Request-Method", "POST"),
                                                 ("Access-Control-Request-Headers", "authorization, content-type, idempotency-key")]
            // A browser's preflight of a publish, from the allowed origin: no token, 204 and what may be sent.
            let ok = try await HTTPTestClient.request(.OPTIONS, port: port, "/v1/channels/\(channel)/messages",
                                                      headers: [("Origin", Self.allowed)] + preflight)
            #expect(ok.status == 204)
            #expect(ok.headers.first(name: "access-control-allow-origin") == Self.allowed)
            #expect(ok.headers.first(name: "vary") == "Origin")
            let methods = ok.headers.first(name: "access-control-allow-methods") ?? ""
            #expect(methods.contains("POST") && methods.contains("GET"), "\(methods)")
            let allowedHeaders = (ok.headers.first(name: "access-control-allow-headers") ?? "").lowercased()
            for header in ["authorization", "content-type", "idempotency-key", "last-event-id"] { #expect(allowedHeaders.contains(header)) }
            // From another origin: refused, and nothing that would let a browser go on.
            let refused = try await HTTPTestClient.request(.OPTIONS, port: port, "/v1/channels/\(channel)/messages",
                                                           headers: [("Origin", Self.other)] + preflight)
            #expect(refused.status == 403)
            #expect(refused.headers.first(name: "access-control-allow-origin") == nil)

            // The request itself, and a cross-origin SSE stream that receives it.
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token, headers: [("Origin", Self.allowed)])
            #expect(sse.status == 200)
            #expect(sse.headers.first(name: "access-control-allow-origin") == Self.allowed)
            let published = try await HTTPTestClient.request(.POST, port: port, "/v1/channels/\(channel)/messages",
                                                             headers: [("Origin", Self.allowed), ("Content-Type", "application/json")],
                                                             body: "{\"body\":{\"n\":1}}", token: token)
            #expect(published.status == 201)
            #expect(published.headers.first(name: "access-control-allow-origin") == Self.allowed)
            #expect((published.headers.first(name: "access-control-expose-headers") ?? "").contains("X-Request-Id"))
            #expect(try await sse.messages(1).map(\.seq) == [1])
            await sse.close()

            let otherStream = try await SSETestClient.connect(port: port, channel: channel, token: token, headers: [("Origin", Self.other)])
            #expect(otherStream.status == 403)
            #expect(otherStream.headers.first(name: "access-control-allow-origin") == nil)
            await otherStream.close()
            let otherPublish = try await HTTPTestClient.request(.POST, port: port, "/v1/channels/\(channel)/messages",
                                                                headers: [("Origin", Self.other), ("Content-Type", "application/json")],
                                                                body: "{\"body\":{\"n\":2}}", token: token)
            #expect(otherPublish.status == 403)
            // Refused means nothing stored.
            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token)
            #expect((history.json["messages"] as? [Any])?.count == 1)
            // Without an Origin (curl, a backend): no CORS headers, not refused.
            let plain = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token)
            #expect(plain.status == 200 && plain.headers.first(name: "access-control-allow-origin") == nil)
        }
    }

    @Test func withoutAListNoCORSHeadersAreSent() async throws {
        try await withTestGateway { gateway in
            let answer = try await HTTPTestClient.request(.OPTIONS, port: gateway.port, "/v1/channels/topic:x/messages",
                                                          headers: [("Origin", Self.allowed), ("Access-Control-Request-Method", "POST")])
            #expect(answer.status == 204)
            #expect(answer.headers.first(name: "allow")?.contains("POST") == true)
            #expect(answer.headers.first(name: "access-control-allow-origin") == nil)
            #expect(answer.headers.first(name: "access-control-allow-methods") == nil)
        }
    }
}

/// The bus is authenticated: what someone who can PUBLISH on the Redis server sends without the cluster key
/// never reaches a subscriber, and is counted.
@Suite(.serialized) struct BusSealTests {
    @Test func sealedPayloadsOpenOnlyWithTheKeyAndOnTheirChannel() {
        let seal = BusSeal(key: TestGateway.clusterKey)
        let channel = ByteBuffer(string: "gw:topic:a")
        let sealed = ByteBuffer(bytes: seal.seal(Array("payload".utf8), channel: Array("gw:topic:a".utf8)))
        #expect(seal.open(sealed, channel: channel).map { String(buffer: $0) } == "payload")
        #expect(seal.open(sealed, channel: ByteBuffer(string: "gw:topic:b")) == nil)
        #expect(BusSeal(key: "another-key-another-key-another-key-0000").open(sealed, channel: channel) == nil)
        var tampered = sealed
        tampered.setInteger(UInt8(ascii: "P"), at: tampered.writerIndex - 7)
        #expect(seal.open(tampered, channel: channel) == nil)
        #expect(seal.open(ByteBuffer(string: "payload"), channel: channel) == nil)
        #expect(seal.open(ByteBuffer(), channel: channel) == nil)
    }

    /// PUBLISHes `payload` on the cluster's Redis by hand (redis-cli, binary-safe through stdin).
    static func publishByHand(_ redis: RedisServer, channel: String, payload: [UInt8]) async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("gw-forged-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: file) }
        FileManager.default.createFile(atPath: file, contents: Data(payload))
        let (status, output) = try await TestServices.run("/bin/sh", ["-c", "redis-cli -p \(redis.port) -x PUBLISH '\(channel)' < '\(file)'"])
        #expect(status == 0 && output.trimmingCharacters(in: .whitespacesAndNewlines) != "0", "PUBLISH reached no subscriber: \(output)")
    }

    /// With `GATEWAY_CLUSTER_KEY` set (`derived`: false), and derived from the HS256 secret (true).
    @Test(arguments: [false, true]) func forgedMessagesAndControlEventsNeverReachASubscriber(derived: Bool) async throws {
        let key = derived ? BusSeal(derivedFromJWTSecret: TestGateway.secret) : BusSeal(key: TestGateway.clusterKey)
        try await withCluster(instances: 2, configure: { $0.clusterKey = derived ? nil : TestGateway.clusterKey }) { cluster in
            let token = try await cluster.token("ann", roles: ["admin"])
            let channel = "topic:sealed"
            let sockets = try await ClusterFaultTests.subscribers(cluster, channel: channel, token: token)
            _ = try await HTTPTestClient.publish(port: cluster.ports[0], channel: channel, body: ["n": 1], token: token)
            for ws in sockets { #expect(try await ws.messages(1).map(\.seq) == [1]) }
            let before = try await cluster.gateways.asyncMap { try await $0.metric("gateway_bus_seal_failures_total") }

            // A well-formed message with the next seq: without a tag, with a tag under another key, and with a
            // genuine tag taken from another channel.
            let forged = Message(id: "forged-2", channel: try ChannelName(parsing: channel), seq: 2, createdAtMicros: Timestamp.nowMicros(),
                                 sender: "mallory", requestId: nil, body: "{\"forged\":true}")
            let wire = Array(MessageWire.encode(forged).readableBytesView)
            let name = "gw:" + channel
            try await Self.publishByHand(cluster.redis, channel: name, payload: wire)
            try await Self.publishByHand(cluster.redis, channel: name, payload: BusSeal(key: "wrong-key-wrong-key-wrong-key-wrong-key").seal(wire, channel: Array(name.utf8)))
            try await Self.publishByHand(cluster.redis, channel: name, payload: key.seal(wire, channel: Array("gw:topic:elsewhere".utf8)))
            // A forged revocation of every token of the subscribers' user.
            let now = Int64(Date().timeIntervalSince1970)
            let revocation = Array(ControlEvent.revoked(Revocation(kind: .sub, value: "ann", at: now + 60, until: now + 7200)).json.utf8)
            try await Self.publishByHand(cluster.redis, channel: "gw:_control", payload: revocation)
            try await Self.publishByHand(cluster.redis, channel: "gw:_control", payload: BusSeal(key: "wrong-key-wrong-key-wrong-key-wrong-key").seal(revocation, channel: Array("gw:_control".utf8)))

            // Every instance dropped all five, and counted them.
            for (i, gateway) in cluster.gateways.enumerated() {
                try await eventually("seal failures counted on instance \(i)") {
                    try await gateway.metric("gateway_bus_seal_failures_total") == before[i] + 5
                }
            }
            // The subscribers got nothing forged and were not revoked: the next genuine message is seq 2, and the
            // token still works.
            _ = try await HTTPTestClient.publish(port: cluster.ports[1], channel: channel, body: ["n": 2], token: token)
            for ws in sockets {
                let next = try await ws.messages(1)
                #expect(next.map(\.seq) == [2])
                #expect(next.first?.object["sender"] as? String == "ann")
                #expect(ws.closeCode == nil)
            }
            #expect(try await HTTPTestClient.request(.GET, port: cluster.ports[0], "/v1/channels/\(channel)/messages", token: token).status == 200)

            // Sealed with the cluster key (what an instance sends), the same bytes are taken: the check is the seal.
            let genuine = Message(id: "by-hand-3", channel: try ChannelName(parsing: channel), seq: 3, createdAtMicros: Timestamp.nowMicros(),
                                  sender: "ops", requestId: nil, body: "{\"by_hand\":true}")
            try await Self.publishByHand(cluster.redis, channel: name,
                                         payload: key.seal(Array(MessageWire.encode(genuine).readableBytesView), channel: Array(name.utf8)))
            for ws in sockets { #expect(try await ws.messages(1).map(\.id) == ["by-hand-3"]) }
            for ws in sockets { await ws.close() }
        }
    }
}

extension Array {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for element in self { out.append(try await transform(element)) }
        return out
    }
}

struct TargetMaskingTests {
    @Test func everyAccessTokenValueIsMasked() {
        #expect(RequestLog.masked("/v1/ws?access_token=abc.def.ghi") == "/v1/ws?access_token=***")
        #expect(RequestLog.masked("/v1/channels/c/poll?since=1.x&access_token=abc&timeout=5") == "/v1/channels/c/poll?since=1.x&access_token=***&timeout=5")
        // Spelled with percent-encoding, or twice: still masked.
        #expect(RequestLog.masked("/v1/ws?access%5Ftoken=abc&access_token=def") == "/v1/ws?access%5Ftoken=***&access_token=***")
        #expect(RequestLog.masked("/v1/channels/c/messages") == "/v1/channels/c/messages")
        #expect(RequestLog.masked("/x?" + String(repeating: "a", count: 1000)).utf8.count <= 256 + 3)
    }
}
