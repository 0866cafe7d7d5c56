import Foundation
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
