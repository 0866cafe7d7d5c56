import ChatDomain
import Foundation
import Logging
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

    /// PROTOCOL.md §6: the server pings (here every second) and drops a connection that answered none of
    /// two pings; one that answers stays open.
    @Test func webSocketIsPingedAndDroppedAfterTwoUnansweredPings() async throws {
        try await withTestGateway(configure: { $0.wsPingSeconds = 1 }) { gateway in
            let token = try await gateway.token("quiet", roles: [])
            // A client that reads (WSTestClient answers pings while it reads) stays open across several pings.
            let answering = try await WSTestClient.connect(port: gateway.port, token: token)
            for i in 0..<12 {
                try await answering.send(["type": "ping", "id": "\(i)"])
                #expect(try await answering.reply("pong")["id"] as? String == "\(i)")
                try await Task.sleep(for: .milliseconds(500))
            }
            await answering.close()
            // One that never answers is pinged, then dropped.
            let silent = try await RawWebSocketClient(port: gateway.port, token: token)
            let frames = RawWebSocketClient.frames(try await silent.readToEnd(timeout: 30))
            #expect(frames.filter { $0.0 == 0x9 }.count >= 2, "pinged before being dropped")
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

/// SIGTERM's drain on a WebSocket with publishes in flight: every publish the server stored is acknowledged
/// before the 1001 close, and every acknowledged one is stored.
struct ShutdownAckTests {
    @Test func publishesInFlightAreAcknowledgedBeforeTheClose() async throws {
        let gateway = try await TestGateway.start()
        defer { try? FileManager.default.removeItem(atPath: gateway.dataDir) }
        let token = try await gateway.token("ann", roles: ["service"])
        let ws = try await WSTestClient.connect(port: gateway.port, token: token)
        let count = 200
        for i in 1...count {
            try await ws.send(["type": "publish", "id": i, "channel": "topic:drain", "body": ["n": i]])
        }
        let server = gateway.server
        let shutdown = Task { await server.shutdown() }
        var acked: Set<String> = []
        var refused = 0
        var closeCode: UInt16?
        while let frame = try await ws.next(timeout: 60) {
            if frame["type"] as? String == "ack", let id = (frame["message"] as? [String: Any])?["id"] as? String { acked.insert(id) }
            if frame["type"] as? String == "error" { refused += 1 }
        }
        closeCode = ws.closeCode
        await shutdown.value
        #expect(closeCode == 1001)
        // What the store holds, read after the instance is gone.
        let store = try await SQLiteStore.open(path: gateway.dataDir + "/gateway.sqlite", logger: Logger(label: "test-store"))
        let stored = try await store.messages(in: try ChannelName(parsing: "topic:drain"), after: 0, limit: 1000).messages
        await store.close()
        let storedIsAcknowledged = Set(stored.map(\.id)) == acked
        #expect(storedIsAcknowledged, "stored \(stored.count), acknowledged \(acked.count)")
        print("drain: \(acked.count) of \(count) publishes acknowledged and stored before 1001, \(refused) refused, the rest never read")
    }
}
