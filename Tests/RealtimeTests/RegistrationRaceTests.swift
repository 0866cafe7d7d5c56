import Foundation
import Gateway
import Testing

/// A stream is checked (token, membership) before it is registered as live; a revocation or member removal
/// that lands between the two must still end it (PROTOCOL.md §3: within one second).
@Suite(.serialized) struct RegistrationRaceTests {
    /// More streams of one user than the default per-user cap (100): the cap is off here, the race is the point.
    static func uncapped(_ config: inout GatewayConfig) { config.maxStreamsPerUser = 0 }

    @Test func revocationRacingWithTwoHundredConnectsLeavesNoSessionAlive() async throws {
        try await withTestGateway(configure: Self.uncapped) { gateway in
            let port = gateway.port
            let admin = try await gateway.token()
            let token = try await gateway.verifier.mint(sub: "racer", roles: [], ttl: 3600, sid: "s-race")
            // 200 connects spread over ~200 ms; the revocation lands in the middle, while many are mid-handshake.
            let connects = (0..<200).map { i in
                Task { () -> RawWebSocketClient? in
                    try? await Task.sleep(for: .microseconds(1000 * i))
                    return try? await RawWebSocketClient(port: port, token: token)
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            let revoked = try await HTTPTestClient.request(.POST, port: port, "/v1/sessions/revoke", body: jsonText(["sid": "s-race"]), token: admin)
            #expect(revoked.status == 200)
            var clients: [RawWebSocketClient] = []
            for connect in connects { if let client = await connect.value { clients.append(client) } }
            try await Task.sleep(for: .seconds(1))
            // A session still alive answers this ping; a revoked one has sent its 4003 close and answers nothing.
            for client in clients { try? await client.send("{\"type\":\"ping\",\"id\":\"alive?\"}") }
            try await Task.sleep(for: .milliseconds(500))
            var upgraded = 0, refused = 0, survivors = 0
            var closedWith: [UInt16: Int] = [:]
            for client in clients {
                let received = client.received
                guard received.starts(with: Array("HTTP/1.1 101".utf8)) else { refused += 1; continue }
                upgraded += 1
                let frames = RawWebSocketClient.frames(received)
                if frames.contains(where: { $0.0 == 0x1 && String(decoding: $0.1, as: UTF8.self).contains("pong") }) { survivors += 1 }
                closedWith[RawWebSocketClient.closeCode(frames) ?? 0, default: 0] += 1
                client.channel.close(promise: nil)
            }
            print("revocation race: \(upgraded) of 200 connects were upgraded, \(refused) refused (401); closes \(closedWith), survivors \(survivors)")
            #expect(survivors == 0)
            #expect(closedWith.keys.allSatisfy { $0 == 4003 }, "\(closedWith)")
        }
    }

    @Test func memberRemovalRacingWithEventStreamConnectsLeavesNoStreamOpen() async throws {
        try await withTestGateway(configure: Self.uncapped) { gateway in
            let port = gateway.port
            let alice = try await gateway.token("alice", roles: [])
            let bob = try await gateway.token("bob", roles: [])
            let created = try await HTTPTestClient.request(.POST, port: port, "/v1/threads", body: jsonText(["title": "race", "members": ["bob"]]), token: alice)
            let thread = (created.json["thread"] as? [String: Any])?["id"] as? String ?? ""
            let channel = "thread:" + thread
            #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["before": true], token: alice).status == 201)
            let connects = (0..<200).map { i in
                Task { () -> SSETestClient? in
                    try? await Task.sleep(for: .microseconds(1000 * i))
                    guard let sse = try? await SSETestClient.connect(port: port, channel: channel, token: bob, query: "history=1"), sse.status == 200 else { return nil }
                    return sse
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            let removed = try await HTTPTestClient.request(.DELETE, port: port, "/v1/threads/\(thread)/members/bob", token: alice)
            #expect(removed.status == 200)
            var streams: [SSETestClient] = []
            for connect in connects { if let sse = await connect.value { streams.append(sse) } }
            try await Task.sleep(for: .seconds(1))
            // Published after the removal: a stream still open would deliver it.
            #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["after": true], token: alice).status == 201)
            var survivors = 0
            for sse in streams {
                nonisolated(unsafe) let s = sse
                let leaked = try? await within(5, "SSE end") { () -> Bool in
                    while let event = try await s.nextEvent() { if event.data?.contains("\"after\"") == true { return true } }
                    return false
                }
                if leaked != false { survivors += 1 }  // delivered the later message, or never ended
                await sse.close()
            }
            print("removal race: \(streams.count) of 200 SSE connects opened, \(200 - streams.count) refused (403); survivors \(survivors)")
            #expect(survivors == 0)
        }
    }
}
