import Foundation
import Auth
import ChatDomain
import JWTKit
import Testing

/// PROTOCOL.md §3: tokens, thread membership, topic roles, revocation, rate limits — over real sockets.
@Suite(.serialized) struct AuthTests {
    static let wsUpgradeHeaders = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                   ("Sec-WebSocket-Version", "13")]

    /// A token every transport accepts: REST history, long-poll, SSE and the WebSocket upgrade.
    /// `expired`: the token's `exp` passed (within the leeway): accepted, but a live stream ends at once (4001).
    static func expectAccepted(_ token: String, port: Int, channel: String, expired: Bool = false, _ what: String) async throws {
        #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token).status == 200, "\(what): history")
        #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?timeout=0", token: token).status == 200, "\(what): poll")
        let sse = try await SSETestClient.connect(port: port, channel: channel, token: token)
        #expect(sse.status == 200, "\(what): SSE")
        await sse.close()
        if expired {
            // The upgrade is accepted (101), and the session is closed at once with 4001 (exp has passed): the
            // close frame follows the 101 on the wire (it once was written before the upgrade finished and lost).
            let raw = try await RawClient.read(port: port, """
                GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer \(token)\r\n\r\n
                """, until: Array("token expired".utf8))
            #expect(raw.starts(with: Array("HTTP/1.1 101".utf8)), "\(what): WebSocket upgrade")
            let headerEnd = raw.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound ?? raw.count
            #expect(Array(raw[headerEnd...].prefix(4)) == [0x88, UInt8(2 + "token expired".utf8.count), 0x0F, 0xA1], "\(what): close 4001 right after the 101")
            return
        }
        let ws: WSTestClient
        do { ws = try await WSTestClient.connect(port: port, token: token) } catch {
            Issue.record("\(what): the WebSocket upgrade was refused (\(error))")
            return
        }
        try await ws.send(["type": "ping", "id": "p"])
        #expect(try await ws.reply("pong")["id"] as? String == "p", "\(what): WebSocket")
        await ws.close()
    }

    /// A token every transport refuses with 401 and the envelope (the WebSocket upgrade before upgrading).
    static func expectRefused(_ token: String, port: Int, channel: String, code: String = "UNAUTHENTICATED", _ what: String) async throws {
        let answers = [
            try await HTTPTestClient.publish(port: port, channel: channel, body: ["a": 1], token: token),
            try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token),
            try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?timeout=0", token: token),
            try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/events", token: token),
            try await HTTPTestClient.request(.GET, port: port, "/v1/ws", headers: wsUpgradeHeaders, token: token),
        ]
        for answer in answers {
            #expect(answer.status == 401, "\(what): \(answer.body)")
            #expect(answer.json["code"] as? String == code, "\(what): \(answer.body)")
            #expect(answer.json["requestId"] as? String == answer.headers.first(name: "X-Request-Id"), "\(what)")
        }
        await #expect(throws: WSTestClient.WSRefused.self, "\(what)") { _ = try await WSTestClient.connect(port: port, token: token) }
    }

    @Test func hs256Rs256AndEs256AreAcceptedAndEveryBadTokenIsRefusedOnEveryTransport() async throws {
        let keys = try await TestKeys.make()
        try await withTestGateway(configure: { $0.jwksFile = keys.jwksFile; $0.jwtLeeway = 30 }) { gateway in
            let port = gateway.port
            let channel = "topic:tokens"
            try await Self.expectAccepted(try await gateway.token(), port: port, channel: channel, "HS256")
            try await Self.expectAccepted(try await keys.rsa.sign(TestClaims()), port: port, channel: channel, "RS256")
            try await Self.expectAccepted(try await keys.ec.sign(TestClaims()), port: port, channel: channel, "ES256")
            // Within the clock-skew leeway (30 s): expired 10 s ago, or valid from 10 s on, is still accepted.
            try await Self.expectAccepted(try await keys.rsa.sign(TestClaims(ttl: -10)), port: port, channel: channel, expired: true, "expired within leeway")
            try await Self.expectAccepted(try await keys.ec.sign(TestClaims(notBefore: Date().addingTimeInterval(10))), port: port, channel: channel, "nbf within leeway")

            let bad: [(String, String)] = [
                ("expired", try await keys.rsa.sign(TestClaims(ttl: -120))),
                ("not yet valid", try await keys.ec.sign(TestClaims(notBefore: Date().addingTimeInterval(300)))),
                ("wrong signature", try await keys.otherRSA.sign(TestClaims())),
                ("alg none", try TestKeys.unsigned(TestClaims())),
                ("HS256 signed with the RSA public key", try await keys.confused.sign(TestClaims())),
                ("missing sub", try await keys.rsa.sign(TestClaims(sub: nil))),
                ("malformed", "abc.def.ghi"),
                ("not a JWT", "hello"),
            ]
            for (what, token) in bad { try await Self.expectRefused(token, port: port, channel: channel, what) }
        }
    }

    /// A token verified once is remembered (its signature and claims are not checked again), but its expiry,
    /// not-before and revocation are checked at every use.
    @Test func aRememberedTokenIsStillCheckedForExpiryAndRevocation() async throws {
        let revocations = Revocations()
        let verifier = try await TokenVerifier(hs256Secret: TestGateway.secret, leeway: 0, revocations: revocations)
        let issued = Date()
        let token = try await verifier.mint(sub: "remembered", roles: [], ttl: 60, sid: "s-1")
        #expect(try await verifier.verify(token, now: issued).sub == "remembered")
        #expect(try await verifier.verify(token, now: issued.addingTimeInterval(30)).sub == "remembered")
        await #expect(throws: AuthFailure.expired) { try await verifier.verify(token, now: issued.addingTimeInterval(61)) }
        revocations.apply([Revocation(kind: .sid, value: "s-1", at: Int64(issued.timeIntervalSince1970), until: Int64(issued.timeIntervalSince1970) + 3600)])
        await #expect(throws: AuthFailure.revoked) { try await verifier.verify(token, now: issued) }
        // A token that fails is not remembered: one byte changed in its signature fails every time.
        var forged = Array(token)
        let inSignature = token.distance(from: token.startIndex, to: token.lastIndex(of: ".")!) + 5
        forged[inSignature] = forged[inSignature] == "A" ? "B" : "A"
        let forgedToken = String(forged)
        for _ in 0..<2 { await #expect(throws: AuthFailure.badSignature) { try await verifier.verify(forgedToken) } }
    }

    @Test func jwksIsReloadedWithoutARestart() async throws {
        let keys = try await TestKeys.make()
        let other = try await TestKeys.make()
        try await withTestGateway(configure: { $0.jwksFile = keys.jwksFile }) { gateway in
            let token = try await other.rsa.sign(TestClaims())
            let retired = try await keys.rsa.sign(TestClaims())
            try await Self.expectRefused(token, port: gateway.port, channel: "topic:rotate", "key not yet in the file")
            try await Self.expectAccepted(retired, port: gateway.port, channel: "topic:rotate", "key in the file")
            try FileManager.default.removeItem(atPath: keys.jwksFile)
            try FileManager.default.copyItem(atPath: other.jwksFile, toPath: keys.jwksFile)
            try await gateway.server.app.verifier.reloadKeys()  // what SIGHUP does in `gateway serve`
            try await Self.expectAccepted(token, port: gateway.port, channel: "topic:rotate", "rotated key")
            // A token accepted (and remembered as verified) before the rotation is not accepted after it.
            try await Self.expectRefused(retired, port: gateway.port, channel: "topic:rotate", "key gone from the file")
        }
    }

    static func reloads(_ gateway: GatewayProcess, _ result: String) async throws -> Int {
        let text = try await HTTPTestClient.request(.GET, port: gateway.port, "/metrics").body
        let line = text.split(separator: "\n").first { $0.hasPrefix("gateway_jwks_reloads_total{") && $0.contains("result=\"\(result)\"") }
        return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
    }

    @Test func sighupMakesAGatewayProcessReadItsJWKSFileAgain() async throws {
        let keys = try await TestKeys.make()
        let other = try await TestKeys.make()
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_JWKS_FILE": keys.jwksFile]) }, stop: { await $0.stop() }) { gateway in
            let token = try await other.ec.sign(TestClaims())
            let path = "/v1/channels/topic:hup/messages"
            #expect(try await HTTPTestClient.request(.GET, port: gateway.port, path, token: token).status == 401)
            try FileManager.default.removeItem(atPath: keys.jwksFile)
            try FileManager.default.copyItem(atPath: other.jwksFile, toPath: keys.jwksFile)
            kill(gateway.process.pid, SIGHUP)
            try await eventually("the rotated key is accepted") {
                try await HTTPTestClient.request(.GET, port: gateway.port, path, token: token).status == 200
            }
            #expect(try await Self.reloads(gateway, "ok") >= 1)
            // A broken file on the next SIGHUP keeps the keys in use (and the failed reload is counted: the
            // SIGHUP was acted on, not ignored).
            try "not json".write(toFile: keys.jwksFile, atomically: true, encoding: .utf8)
            kill(gateway.process.pid, SIGHUP)
            try await eventually("the failed reload counted") { try await Self.reloads(gateway, "failed") == 1 }
            #expect(try await HTTPTestClient.request(.GET, port: gateway.port, path, token: token).status == 200)
            #expect(gateway.process.isRunning)
        }
    }

    @Test func topicRolesAreEnforcedForSubscribeAndPublish() async throws {
        try await withTestGateway(configure: { $0.topics = try! TopicRule.parse("ops subscribe=oncall publish=pager") }) { gateway in
            let port = gateway.port
            let user = try await gateway.token("u", roles: [])
            let oncall = try await gateway.token("o", roles: ["oncall"])
            let pager = try await gateway.token("p", roles: ["pager"])
            // The user without the role is refused on every transport: history, SSE, long-poll, WebSocket subscribe.
            func expectUserRefused() async throws {
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:ops/messages", token: user).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:ops/events", token: user).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:ops/poll?timeout=0", token: user).status == 403)
                let ws = try await WSTestClient.connect(port: port, token: user)
                try await ws.send(["type": "subscribe", "id": "1", "channel": "topic:ops"])
                #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")
                await ws.close()
            }
            try await expectUserRefused()
            #expect(try await HTTPTestClient.publish(port: port, channel: "topic:ops", body: ["a": 1], token: oncall).status == 403)
            #expect(try await HTTPTestClient.publish(port: port, channel: "topic:ops", body: ["a": 1], token: pager).status == 201)
            // Over WebSocket (a publish goes to the store's group commit without a task).
            for (token, answer) in [(oncall, "error"), (user, "error"), (pager, "ack")] {
                let ws = try await WSTestClient.connect(port: port, token: token)
                try await ws.send(["type": "publish", "id": "p", "channel": "topic:ops", "body": ["ws": answer]])
                let reply = try await ws.next()
                #expect(reply?["type"] as? String == answer)
                if answer == "error" { #expect((reply?["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN") }
                await ws.close()
            }
            let stored = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:ops/messages", token: oncall)
            #expect((stored.json["messages"] as? [[String: Any]])?.compactMap { $0["body"] as? [String: Any] }.count == 2)
            #expect((stored.json["messages"] as? [[String: Any]])?.last.flatMap { $0["body"] as? [String: Any] }?["ws"] as? String == "ack")
            #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:ops/messages", token: oncall).status == 200)
            // Once an allowed stream has opened the topic, its bounds are in memory and a stream opens without
            // leaving the event loop (`ChannelService.openKnown`), the user's token remembered as verified too:
            // refused just the same.
            let allowed = try await SSETestClient.connect(port: port, channel: "topic:ops", token: oncall)
            #expect(allowed.status == 200)
            _ = try await allowed.guardedNextEvent()
            #expect(gateway.server.app.store.knownBounds(of: try ChannelName(parsing: "topic:ops")) != nil)
            try await expectUserRefused()
            await allowed.close()
            // Defaults elsewhere: anyone subscribes, only service/admin publish.
            #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:news/messages", token: user).status == 200)
            #expect(try await HTTPTestClient.publish(port: port, channel: "topic:news", body: ["a": 1], token: user).status == 403)
        }
    }

    /// A thread's publishes are its members' only, on HTTP and WebSocket alike, in embedded mode (the store
    /// checks the membership in the append's transaction): a non-member is refused with `FORBIDDEN`, and a
    /// member removed while connected is refused from then on, on the same connection; nothing refused is stored.
    @Test func aThreadsPublishesAreItsMembersOnlyOnEveryTransport() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let (bob, carol) = (try await gateway.token("bob", roles: []), try await gateway.token("carol", roles: []))
            let thread = try await ThreadClusterTests.createThread(port: port, token: bob, members: ["bob", "dave"])
            let channel = "thread:\(thread)"
            func publishOverWebSocket(_ ws: WSTestClient, _ id: String) async throws -> String {
                try await ws.send(["type": "publish", "id": id, "channel": channel, "body": ["id": id]])
                let reply = try await ws.next()
                return reply?["type"] as? String == "ack" ? "ack" : (reply?["error"] as? [String: Any])?["code"] as? String ?? "?"
            }
            #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["id": "carol-http"], token: carol).status == 403)
            let carolWS = try await WSTestClient.connect(port: port, token: carol)
            #expect(try await publishOverWebSocket(carolWS, "carol-ws") == "FORBIDDEN")
            await carolWS.close()

            let dave = try await gateway.token("dave", roles: [])
            let daveWS = try await WSTestClient.connect(port: port, token: dave)
            #expect(try await publishOverWebSocket(daveWS, "dave-1") == "ack")
            #expect(try await HTTPTestClient.request(.DELETE, port: port, "/v1/threads/\(thread)/members/dave", token: bob).status == 200)
            #expect(try await publishOverWebSocket(daveWS, "dave-2") == "FORBIDDEN")
            #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["id": "dave-http"], token: dave).status == 403)
            await daveWS.close()

            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: bob)
            #expect((history.json["messages"] as? [[String: Any]])?.compactMap { ($0["body"] as? [String: Any])?["id"] as? String } == ["dave-1"])
        }
    }

    @Test func publishRateLimitRefusesTheExcessAndStoresNothingOverIt() async throws {
        try await withTestGateway(configure: {
            $0.publishRate = 0.5; $0.publishBurst = 5; $0.rateLimitStrikes = 10; $0.topics = try! TopicRule.parse("rl publish=writer")
        }) { gateway in
            let port = gateway.port
            let admin = try await gateway.token()
            let created = try await HTTPTestClient.request(.POST, port: port, "/v1/threads", body: jsonText(["title": "t", "members": ["rl"]]), token: admin)
            let channel = "thread:" + ((created.json["thread"] as? [String: Any])?["id"] as? String ?? "")
            let user = try await gateway.token("rl", roles: [])
            var statuses: [Int] = []
            for i in 0..<8 {
                let answer = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i], token: user)
                statuses.append(answer.status)
                if answer.status == 429 {
                    #expect(answer.json["code"] as? String == "RATE_LIMITED")
                    #expect(Int(answer.headers.first(name: "Retry-After") ?? "") ?? 0 >= 1)
                }
            }
            #expect(statuses.filter { $0 == 201 }.count == 5, "\(statuses)")
            #expect(statuses.suffix(3) == [429, 429, 429], "\(statuses)")
            // Over WebSocket: error replies, then 4029 for a client that keeps going.
            let ws = try await WSTestClient.connect(port: port, token: user)
            try await ws.send(["type": "publish", "id": "x", "channel": channel, "body": ["ws": true]])
            #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "RATE_LIMITED")
            for i in 0..<20 { try? await ws.send(["type": "publish", "id": "\(i)", "channel": channel, "body": ["ws": i]]) }
            #expect(try await ws.waitForClose() == 4029)
            // Nothing over the limit was stored; an exempt role (admin) is not limited.
            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: admin)
            #expect((history.json["messages"] as? [Any])?.count == 5)
            for i in 0..<10 { #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["admin": i], token: admin).status == 201) }
            // A topic's publish over WebSocket (no task: `ChannelService.publishKnown`) is limited the same.
            let writer = try await gateway.token("w", roles: ["writer"])
            let topic = try await WSTestClient.connect(port: port, token: writer)
            var answers: [String] = []
            for i in 0..<7 {
                try await topic.send(["type": "publish", "id": "\(i)", "channel": "topic:rl", "body": ["t": i]])
                let reply = try await topic.next()
                answers.append(reply?["type"] as? String == "ack" ? "ack" : (reply?["error"] as? [String: Any])?["code"] as? String ?? "?")
            }
            #expect(answers == ["ack", "ack", "ack", "ack", "ack", "RATE_LIMITED", "RATE_LIMITED"])
            await topic.close()
            let topicHistory = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:rl/messages", token: admin)
            #expect((topicHistory.json["messages"] as? [Any])?.count == 5)
            // A member's thread publish over WebSocket takes one token, not two.
            let member = try await gateway.token("m2", roles: [])
            _ = try await HTTPTestClient.request(.POST, port: port, "/v1/threads/\(channel.dropFirst("thread:".count))/members",
                                                 body: jsonText(["user": "m2"]), token: admin)
            let memberWS = try await WSTestClient.connect(port: port, token: member)
            var memberAnswers: [String] = []
            for i in 0..<7 {
                try await memberWS.send(["type": "publish", "id": "m\(i)", "channel": channel, "body": ["m": i]])
                let reply = try await memberWS.next()
                memberAnswers.append(reply?["type"] as? String == "ack" ? "ack" : (reply?["error"] as? [String: Any])?["code"] as? String ?? "?")
            }
            #expect(memberAnswers == ["ack", "ack", "ack", "ack", "ack", "RATE_LIMITED", "RATE_LIMITED"])
            await memberWS.close()
        }
    }
}
