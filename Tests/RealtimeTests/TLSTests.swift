import Foundation
@testable import Gateway
import NIOSSL
import Testing

/// TLS everywhere it can be: the listener (https, wss), Postgres (`sslmode`), Redis (`rediss://` with an ACL
/// user), each against a CA the suite makes.
@Suite(.serialized) struct TLSTests {
    /// Expects `body` to fail the TLS handshake (not to time out, not to succeed).
    static func expectRefused(_ what: String, _ body: () async throws -> Void) async {
        do {
            try await body()
            Issue.record("\(what): connected")
        } catch {
            #expect(!(error is TimedOut), "\(what): \(error)")
        }
    }

    @Test func httpsAndWssClientsTrustingTheCAConnectAndOthersFail() async throws {
        let ca = try await TestCA.make()
        defer { ca.remove() }
        let (certificate, key) = try await ca.issue("gateway")
        try await withTestGateway(configure: { $0.tlsCertificateFile = certificate; $0.tlsKeyFile = key }) { gateway in
            let port = gateway.port
            let trusting = try ca.clientContext()
            let token = try await gateway.token()
            let channel = "topic:tls"
            let ws = try await WSTestClient.connect(port: port, token: token, tls: trusting)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            let published = try await HTTPTestClient.request(.POST, port: port, "/v1/channels/\(channel)/messages",
                                                             headers: [("Content-Type", "application/json")], body: "{\"body\":{\"n\":1}}",
                                                             token: token, tls: trusting)
            #expect(published.status == 201)
            #expect(try await ws.messages(1).map(\.seq) == [1])
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token, query: "history=1", tls: trusting)
            #expect(sse.status == 200)
            #expect(try await sse.messages(1).map(\.seq) == [1])
            await sse.close()
            await ws.close()

            // A client that trusts only the system's CAs fails the handshake, over HTTPS and WSS alike; a
            // plain-text client gets no HTTP answer.
            let untrusting = try NIOSSLContext(configuration: .makeClientConfiguration())
            await Self.expectRefused("https without the CA") {
                _ = try await HTTPTestClient.request(.GET, port: port, "/healthz", tls: untrusting)
            }
            await Self.expectRefused("wss without the CA") { _ = try await WSTestClient.connect(port: port, token: token, tls: untrusting) }
            let plain = try? await HTTPTestClient.request(.GET, port: port, "/healthz")
            #expect(plain?.status != 200)

            // SIGHUP's reload: a certificate from another CA replaces the files; new connections get it.
            let next = try await TestCA.make()
            defer { next.remove() }
            let (nextCertificate, nextKey) = try await next.issue("gateway")
            try FileManager.default.removeItem(atPath: certificate)
            try FileManager.default.removeItem(atPath: key)
            try FileManager.default.copyItem(atPath: nextCertificate, toPath: certificate)
            try FileManager.default.copyItem(atPath: nextKey, toPath: key)
            gateway.server.reloadCertificate()
            let nextTrusting = try next.clientContext()
            #expect(try await HTTPTestClient.metric("gateway_tls_reloads_total", port: port, label: "result=\"ok\"", tls: nextTrusting) == 1)
            #expect(try await HTTPTestClient.request(.GET, port: port, "/healthz", tls: try next.clientContext()).status == 200)
            await Self.expectRefused("https trusting only the old CA") {
                _ = try await HTTPTestClient.request(.GET, port: port, "/healthz", tls: trusting)
            }
            // A reload that cannot work keeps what is in use.
            try "not a certificate".write(toFile: certificate, atomically: true, encoding: .utf8)
            gateway.server.reloadCertificate()
            #expect(try await HTTPTestClient.metric("gateway_tls_reloads_total", port: port, label: "result=\"failed\"", tls: nextTrusting) == 1)
            #expect(try await HTTPTestClient.request(.GET, port: port, "/healthz", tls: try next.clientContext()).status == 200)
        }
    }

    /// `kill -HUP` makes a running `gateway` process read its certificate and key again.
    @Test func sighupReloadsTheCertificate() async throws {
        let ca = try await TestCA.make()
        let next = try await TestCA.make()
        defer { ca.remove(); next.remove() }
        let (certificate, key) = try await ca.issue("gateway")
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_TLS_CERT": certificate, "GATEWAY_TLS_KEY": key],
                                                               tls: try ca.clientContext()) },
                              stop: { await $0.stop() }) { gateway in
            let (nextCertificate, nextKey) = try await next.issue("gateway")
            try FileManager.default.removeItem(atPath: certificate)
            try FileManager.default.removeItem(atPath: key)
            try FileManager.default.copyItem(atPath: nextCertificate, toPath: certificate)
            try FileManager.default.copyItem(atPath: nextKey, toPath: key)
            kill(gateway.process.pid, SIGHUP)
            let trustingNext = try next.clientContext()
            try await eventually("the new certificate served after SIGHUP") {
                (try? await HTTPTestClient.request(.GET, port: gateway.port, "/healthz", tls: trustingNext))?.status == 200
            }
            await Self.expectRefused("https trusting only the old CA") {
                _ = try await HTTPTestClient.request(.GET, port: gateway.port, "/healthz", tls: try ca.clientContext())
            }
        }
    }

    /// Postgres with `ssl=on` that rejects every connection without TLS (`hostnossl … reject`): the gateway
    /// connects with `sslmode=verify-full` and the suite's CA; without TLS, or with a CA that did not sign the
    /// server's certificate, it does not start.
    @Test func postgresWithVerifyFull() async throws {
        let ca = try await TestCA.make()
        defer { ca.remove() }
        let (certificate, key) = try await ca.issue("postgres")
        let postgres = try await PostgresServer.start(arguments: ["-c", "ssl=on", "-c", "ssl_cert_file=server.pem", "-c", "ssl_key_file=server.key"]) { data in
            try FileManager.default.copyItem(atPath: certificate, toPath: data + "/server.pem")
            try FileManager.default.copyItem(atPath: key, toPath: data + "/server.key")
            chmod(data + "/server.key", 0o600)
            if TestServices.isRoot { _ = try await TestServices.run("/bin/chown", ["postgres:postgres", data + "/server.pem", data + "/server.key"]) }
            let hba = data + "/pg_hba.conf"
            let rules = try String(contentsOfFile: hba, encoding: .utf8)
            try ("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n" + rules).write(toFile: hba, atomically: true, encoding: .utf8)
            if TestServices.isRoot { _ = try await TestServices.run("/bin/chown", ["postgres:postgres", hba]) }
        }
        do {
            let base = "postgres://postgres@127.0.0.1:\(postgres.port)/gateway"
            try await withTestGateway(configure: {
                $0.databaseURL = base + "?sslmode=verify-full&sslrootcert=\(ca.certificateFile)"
                $0.singleInstance = true
            }) { gateway in
                let token = try await gateway.token()
                #expect(try await HTTPTestClient.publish(port: gateway.port, channel: "topic:pg-tls", body: ["n": 1], token: token).status == 201)
                #expect(try await HTTPTestClient.request(.GET, port: gateway.port, "/readyz").status == 200)
            }
            // The same server without TLS is refused by its pg_hba.conf, and a CA that did not sign its
            // certificate fails verification: neither instance starts.
            let other = try await TestCA.make()
            defer { other.remove() }
            for url in [base + "?sslmode=disable", base + "?sslmode=verify-full&sslrootcert=\(other.certificateFile)"] {
                do {
                    let gateway = try await within(60, "start with \(url)") {
                        try await TestGateway.start {
                            $0.databaseURL = url
                            $0.singleInstance = true
                            $0.storeStartTimeout = .seconds(5)
                        }
                    }
                    await gateway.stop()
                    Issue.record("started with \(url)")
                } catch let error as ConfigError {
                    #expect(error.setting == "DATABASE_URL", "\(url): \(error)")
                }
            }
            await postgres.stop()
        } catch {
            await postgres.stop()
            throw error
        }
    }

    /// redis-server with a TLS port only, `requirepass` and an ACL user: instances connect with
    /// `rediss://user:password@…?cacert=…` and deliver through it; a wrong password, plain text, or a CA that
    /// is not trusted keep the bus down.
    @Test func redisOverTLSWithAnACLUser() async throws {
        let ca = try await TestCA.make()
        defer { ca.remove() }
        let (certificate, key) = try await ca.issue("redis")
        let redis = try await RedisServer.start(arguments: [
            "--tls-cert-file", certificate, "--tls-key-file", key, "--tls-ca-cert-file", ca.certificateFile, "--tls-auth-clients", "no",
            "--requirepass", "default-password", "--user", "gw", "on", ">gw-password", "~*", "&*", "+@all",
        ], tls: true)
        let postgres = try await PostgresServer.start()
        func start(_ redisURL: String) async throws -> TestGateway {
            try await TestGateway.start {
                $0.databaseURL = postgres.url
                $0.redisURL = redisURL
                // Live delivery can only come through Redis: no reconcile with the store during the test.
                $0.reconcileInterval = .seconds(3600)
            }
        }
        var gateways: [TestGateway] = []
        do {
            let good = "rediss://gw:gw-password@127.0.0.1:\(redis.port)?cacert=\(ca.certificateFile)"
            let a = try await start(good)
            gateways.append(a)
            let b = try await start(good)
            gateways.append(b)
            for gateway in [a, b] {
                try await eventually("redis up over TLS") { try await HTTPTestClient.request(.GET, port: gateway.port, "/readyz").status == 200 }
            }
            let token = try await a.token()
            let ws = try await WSTestClient.connect(port: b.port, token: token)
            try await ws.send(["type": "subscribe", "id": "s", "channel": "topic:rediss"])
            _ = try await ws.reply("subscribed")
            #expect(try await HTTPTestClient.publish(port: a.port, channel: "topic:rediss", body: ["n": 1], token: token).status == 201)
            #expect(try await ws.messages(1).map(\.seq) == [1])
            await ws.close()

            for bad in ["rediss://gw:wrong-password@127.0.0.1:\(redis.port)?cacert=\(ca.certificateFile)",
                        "redis://gw:gw-password@127.0.0.1:\(redis.port)",
                        "rediss://gw:gw-password@127.0.0.1:\(redis.port)"] {
                let gateway = try await start(bad)
                gateways.append(gateway)
                try await eventually("the bus reported down with \(bad)") { try await gateway.metric("gateway_redis_disconnects_total") >= 1 }
                #expect(try await gateway.metric("gateway_redis_up") == 0, "\(bad)")
                #expect(try await HTTPTestClient.request(.GET, port: gateway.port, "/readyz").status == 503, "\(bad)")
            }
            for gateway in gateways { await gateway.stop() }
            await postgres.stop()
            await redis.stop()
        } catch {
            for gateway in gateways { await gateway.stop() }
            await postgres.stop()
            await redis.stop()
            throw error
        }
    }
}
