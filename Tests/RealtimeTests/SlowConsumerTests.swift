import Foundation
@testable import Gateway
import Testing

/// A client that stops reading is closed with 4008 once its send buffer passes the budget; the gateway's
/// memory stays bounded and other subscribers keep receiving.
struct SlowConsumerTests {
    static func residentBytes() -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return (Int(line.split(separator: " ")[1]) ?? 0) * 1024
        }
        return 0
    }

    @Test func stalledClientIsClosedWith4008AndOthersKeepReceiving() async throws {
        try await withTestGateway(configure: { config in
            config.bodyLimit = 256 * 1024
            config.sendBudget = 256 * 1024
            config.socketSendBuffer = 64 * 1024
        }) { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let channel = "topic:firehose"

            let slow = try await WSTestClient.connect(port: port, token: token)
            try await slow.send(["type": "subscribe", "id": "slow", "channel": channel])
            _ = try await slow.reply("subscribed")
            let fast = try await WSTestClient.connect(port: port, token: token)
            try await fast.send(["type": "subscribe", "id": "fast", "channel": channel])
            _ = try await fast.reply("subscribed")

            let count = 200
            let payload = String(repeating: "p", count: 200 * 1024)
            let before = Self.residentBytes()
            async let received = fast.messageSeqs(count)
            // As soon as the gateway gives up on the stalled client, it reads again: it finds the backlog that
            // fit in its budget, then the 4008 close.
            async let slowClose: UInt16? = {
                try await eventually("slow consumer closed", timeout: 120) { gateway.server.app.counters.get("slow_consumer_closes") >= 1 }
                return try await slow.waitForClose()
            }()
            for i in 1...count {
                let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i, "pad": payload], token: token)
                #expect(response.status == 201)
            }
            // 40 MB went out; the stalled client had room for a small part of it.
            #expect(try await received == Array(1...Int64(count)))
            let growth = Self.residentBytes() - before
            #expect(growth < count * payload.utf8.count / 2, "resident memory grew by \(growth) bytes")
            #expect(try await slowClose == 4008)
            await fast.close()
        }
    }
}
