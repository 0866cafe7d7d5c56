import Foundation
import NIOCore
import NIOWebSocket
import Testing

struct LifecycleTests {
    @Test func echoEndpointOnlyWhenEnabled() async throws {
        let off = try await TestGateway.start()
        await #expect(throws: WSTestClient.WSRefused.self) { _ = try await WSTestClient.connect(port: off.port, token: nil, path: "/v1/echo") }
        await off.stop()

        let on = try await TestGateway.start { $0.echo = true }
        let echo = try await WSTestClient.connect(port: on.port, token: nil, path: "/v1/echo")
        try await echo.send("héllo")
        #expect(try await echo.nextText() == "héllo")
        await echo.close()
        await on.stop()
    }

    @Test func shutdownClosesWebSocketsWith1001AndEndsStreams() async throws {
        let gateway = try await TestGateway.start()
        let token = try await gateway.token()
        let ws = try await WSTestClient.connect(port: gateway.port, token: token)
        try await ws.send(["type": "subscribe", "id": "1", "channel": "topic:bye"])
        _ = try await ws.reply("subscribed")
        let sse = try await SSETestClient.connect(port: gateway.port, channel: "topic:bye", token: token)
        _ = try await sse.guardedNextEvent()
        async let closeCode = ws.waitForClose()
        await gateway.stop()
        #expect(try await closeCode == 1001)
        let ended = try await within(10, "SSE end") { try await sse.nextEvent() == nil }
        #expect(ended)
    }

    @Test func sseSendsKeepalivesAndEndsAtTokenExpiry() async throws {
        try await withTestGateway(configure: { $0.keepaliveSeconds = 1 }) { gateway in
            let token = try await gateway.verifier.mint(sub: "short", roles: [], ttl: 3)
            let sse = try await SSETestClient.connect(port: gateway.port, channel: "topic:ka", token: token)
            #expect(sse.headers.first(name: "Content-Type") == "text/event-stream")
            #expect(sse.headers.first(name: "Cache-Control") == "no-cache")
            #expect(sse.headers.first(name: "X-Accel-Buffering") == "no")
            let opening = try await sse.guardedNextEvent()
            #expect(opening?.id != nil && sse.retry == "2000")
            let ended = try await within(30, "SSE end at expiry") { try await sse.nextEvent() == nil }
            #expect(ended)
            #expect(sse.comments.contains(": keepalive"))
        }
    }

    @Test func webSocketClosesWith4001WhenTheTokenExpiresAndRefreshKeepsItOpen() async throws {
        try await withTestGateway { gateway in
            let expiring = try await WSTestClient.connect(port: gateway.port, token: try await gateway.verifier.mint(sub: "eve", roles: [], ttl: 2))
            #expect(try await expiring.waitForClose() == 4001)

            let refreshed = try await WSTestClient.connect(port: gateway.port, token: try await gateway.verifier.mint(sub: "eve", roles: [], ttl: 2))
            try await refreshed.send(["type": "refresh", "id": "r", "token": try await gateway.verifier.mint(sub: "eve", roles: [], ttl: 3600)])
            #expect(try await refreshed.reply("ack")["id"] as? String == "r")
            try await Task.sleep(for: .seconds(3))
            try await refreshed.send(["type": "ping", "id": "still-here"])
            #expect(try await refreshed.reply("pong")["id"] as? String == "still-here")
            await refreshed.close()
        }
    }
}
