import Foundation
import Gateway
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

/// A client that stops reading is closed with 4008 once its send buffer passes the budget; the gateway's
/// memory stays bounded and other subscribers keep receiving. The gateway runs in its own process so that
/// its memory is measured alone.
struct SlowConsumerTests {
    @Test func stalledClientIsClosedWith4008AndOthersKeepReceiving() async throws {
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_BODY_LIMIT": String(256 * 1024), "GATEWAY_SEND_BUDGET": String(256 * 1024)]) },
                              stop: { await $0.stop() }) { gateway in
        let port = gateway.port
        let token = try await TestGateway.token()
        let channel = "topic:firehose"

        let slow = try await WSTestClient.connect(port: port, token: token)
        try await slow.send(["type": "subscribe", "id": "slow", "channel": channel])
        _ = try await slow.reply("subscribed")
        let fast = try await WSTestClient.connect(port: port, token: token)
        try await fast.send(["type": "subscribe", "id": "fast", "channel": channel])
        _ = try await fast.reply("subscribed")

        let count = 200
        let payload = String(repeating: "p", count: 200 * 1024)
        let before = gateway.residentBytes
        var peak = before
        async let received = fast.messageSeqs(count)
        // As soon as the gateway gives up on the stalled client, it reads again: it finds the backlog that
        // fit in its budget, then the 4008 close.
        async let slowClose: UInt16? = {
            try await eventually("slow consumer closed", timeout: 120) { try await gateway.metric("gateway_slow_consumer_closes_total") >= 1 }
            return try await slow.waitForClose()
        }()
        for i in 1...count {
            let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i, "pad": payload], token: token)
            #expect(response.status == 201)
            peak = max(peak, gateway.residentBytes)
        }
        // 40 MB went out; the stalled client had room for a small part of it.
        #expect(try await received == Array(1...Int64(count)))
        #expect(try await slowClose == 4008)
        let growth = peak - before
        #expect(growth < count * payload.utf8.count / 2, "the gateway's resident memory grew by \(growth) bytes")
        print("slow consumer: gateway RSS before \(before / 1024) KiB, peak \(peak / 1024) KiB, growth \(growth / 1024) KiB for \(count * payload.utf8.count / 1024) KiB published")
        await fast.close()
        }
    }
}

/// The send budget holds during catch-up too: a client that stops reading while it catches up, in a
/// channel that moves on, is ended like a live slow consumer (WebSocket 4008, SSE stream closed).
@Suite(.serialized) struct CatchUpSlowConsumerTests {
    static let pad = String(repeating: "c", count: 200 * 1024)

    static func configure(_ config: inout GatewayConfig) {
        config.bodyLimit = 256 * 1024
        config.sendBudget = 256 * 1024
        config.socketSendBuffer = 64 * 1024
    }

    /// 100 stored messages of 200 KiB (20 MiB: far more than the client's socket buffers take).
    static func backlog(port: Int, channel: String, token: String) async throws {
        for i in 0..<100 {
            let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i, "pad": pad], token: token)
            #expect(response.status == 201)
        }
    }

    /// Publishes live messages until the gateway has closed a slow consumer (bounded).
    static func publishUntilClosed(_ gateway: TestGateway, channel: String, token: String) async throws -> Int {
        var published = 0
        while try await gateway.metric("gateway_slow_consumer_closes_total") == 0 && published < 60 {
            _ = try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["live": published, "pad": pad], token: token)
            published += 1
            try await Task.sleep(for: .milliseconds(50))
        }
        return published
    }

    @Test func webSocketThatStopsReadingMidCatchUpIsClosed4008() async throws {
        try await withTestGateway(configure: Self.configure) { gateway in
            let token = try await gateway.token()
            let channel = "topic:catchup-stall-ws"
            try await Self.backlog(port: gateway.port, channel: channel, token: token)
            let zero = try await HTTPTestClient.zeroCursor(port: gateway.port, channel: channel, token: token)
            let slow = try await WSTestClient.connect(port: gateway.port, token: token)
            try await slow.send(["type": "subscribe", "id": "s", "channel": channel, "since": zero])
            _ = try await slow.reply("subscribed")
            // The client reads nothing more; the channel moves on.
            let published = try await Self.publishUntilClosed(gateway, channel: channel, token: token)
            #expect(try await gateway.metric("gateway_slow_consumer_closes_total") == 1, "not closed after \(published) live messages")
            #expect(try await slow.waitForClose(timeout: 60) == 4008)
            print("catch-up stall (WebSocket): closed 4008 after \(published) live messages of 200 KiB (budget 256 KiB)")
            // Nothing was lost: the history is whole, and a resume from the cursor would get it all.
            let history = try await HTTPTestClient.allMessages(port: gateway.port, channel: channel, since: zero, token: token)
            #expect(history.map(\.seq) == Array(1...Int64(100 + published)))
        }
    }

    @Test func eventStreamThatStopsReadingMidCatchUpIsEnded() async throws {
        try await withTestGateway(configure: Self.configure) { gateway in
            let token = try await gateway.token()
            let channel = "topic:catchup-stall-sse"
            try await Self.backlog(port: gateway.port, channel: channel, token: token)
            let zero = try await HTTPTestClient.zeroCursor(port: gateway.port, channel: channel, token: token)
            let slow = try await SSETestClient.connect(port: gateway.port, channel: channel, token: token, lastEventID: zero)
            #expect(slow.status == 200)
            let published = try await Self.publishUntilClosed(gateway, channel: channel, token: token)
            #expect(try await gateway.metric("gateway_slow_consumer_closes_total") == 1, "not closed after \(published) live messages")
            // Reading now finds what fitted in the buffers, then the end of the stream.
            nonisolated(unsafe) let client = slow
            let received = try await within(60, "SSE stream end") { () -> Int in
                var n = 0
                while let event = try? await client.nextEvent() { if event.event == "message" { n += 1 } }
                return n
            }
            #expect(received < 100 + published)
            print("catch-up stall (SSE): ended after \(published) live messages; the client had \(received) messages in its buffers")
        }
    }
}

/// Replies count against the send budget too (PROTOCOL.md §6, DESIGN.md "every byte a connection queues"),
/// and a WebSocket has a command rate.
@Suite(.serialized) struct ReplyBudgetTests {
    /// The bound: what a flooder holds is its send budget; the gateway's resident memory may grow by that plus a
    /// few hundred KiB (the connection, its read buffers, allocator slack) — asserted as budget + 512 KiB. Before
    /// the flood, clients that read send the same commands (5,000 pings each, every pong read, on every event loop): the code they run is
    /// paged in and the allocator's first arenas exist, so the growth measured is what the flood holds, not
    /// one-time start-up costs of a fresh process (measured: ~240 KiB of code pages, ~250 KiB of heap).
    @Test func clientThatSendsPingsAndNeverReadsIsClosed4008WithinItsBudget() async throws {
        let budget = 1024 * 1024
        let allowance = 512 * 1024
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_SEND_BUDGET": String(budget)]) }, stop: { await $0.stop() }) { gateway in
            let token = try await TestGateway.token("flooder", roles: ["admin"])  // exempt from the command rate
            for _ in 0..<4 {  // connections are spread over the event loops: warm each
                let reader = try await RawWebSocketClient(port: gateway.port, token: token, reading: true)
                await reader.sendPings(5_000, batch: 100)
                try await eventually("the warm-up's pongs read") { RawWebSocketClient.frames(reader.received).filter { $0.0 == 0x1 }.count == 5_000 }
                await reader.close()
            }
            let client = try await RawWebSocketClient(port: gateway.port, token: token, reading: false)
            try await Task.sleep(for: .milliseconds(300))
            let before = gateway.residentBytes
            let (bytes, growth) = try await gateway.residentGrowth { () -> [UInt8] in
                await client.sendPings(100_000)
                try await eventually("the flooder closed", timeout: 60) { try await gateway.metric("gateway_slow_consumer_closes_total") >= 1 }
                return try await client.readToEnd()
            }
            let frames = RawWebSocketClient.frames(bytes)
            let pongs = frames.filter { $0.0 == 0x1 }.count
            print("ping flood: 100,000 pings never read; \(pongs) pongs queued before the close; gateway RSS before \(before / 1024) KiB, growth \(growth / 1024) KiB (budget \(budget / 1024) KiB)")
            #expect(RawWebSocketClient.closeCode(frames) == 4008)
            #expect(pongs < 100_000)
            #expect(growth < budget + allowance, "RSS grew \(growth / 1024) KiB: more than the budget plus \(allowance / 1024) KiB")
        }
    }

    @Test func webSocketCommandRateGivesErrorsThen4029AndExemptRolesAreNotLimited() async throws {
        try await withTestGateway(configure: { $0.wsCommandRate = 10; $0.wsCommandBurst = 20; $0.rateLimitStrikes = 30 }) { gateway in
            let user = try await WSTestClient.connect(port: gateway.port, token: try await gateway.token("chatty", roles: []))
            for i in 0..<200 { try? await user.send(["type": "ping", "id": "\(i)"]) }
            nonisolated(unsafe) let client = user
            let (closeCode, pongs, limited) = try await within(30, "rate-limited close") { () -> (UInt16?, Int, Int) in
                var pongs = 0
                var limited = 0
                while let text = try await client.nextText() {
                    let object = json(text)
                    if object["type"] as? String == "pong" { pongs += 1 }
                    if (object["error"] as? [String: Any])?["code"] as? String == "RATE_LIMITED" { limited += 1 }
                }
                return (client.closeCode, pongs, limited)
            }
            #expect(closeCode == 4029)
            #expect(pongs >= 20 && pongs < 200, "\(pongs) pongs")
            #expect(limited == 29, "every refusal but the last is an error reply")
            // A service (exempt, like the publish rate) is not limited.
            let service = try await WSTestClient.connect(port: gateway.port, token: try await gateway.token("svc", roles: ["service"]))
            for i in 0..<200 { try await service.send(["type": "ping", "id": "\(i)"]) }
            var servicePongs = 0
            while servicePongs < 200, let object = try await service.next() { if object["type"] as? String == "pong" { servicePongs += 1 } }
            #expect(servicePongs == 200)
            await service.close()
        }
    }
}
