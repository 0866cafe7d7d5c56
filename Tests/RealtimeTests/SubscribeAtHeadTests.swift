import Foundation
import Testing

/// A subscription that starts at the channel's head (live, or a cursor at the head) has nothing to catch up:
/// it reads nothing from the store, and it still gets every message from then on; one that starts behind
/// reads what it missed.
struct SubscribeAtHeadTests {
    @Test func liveSubscribesReadNothingAndMissNothing() async throws {
        try await withTestGateway { gateway in
            let token = try await gateway.token()
            let channel = "topic:head"
            for n in 1...3 { _ = try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["n": n], token: token) }
            let readsBefore = try await gateway.metric("gateway_catch_up_reads_total")
            var live: [WSTestClient] = []
            for i in 0..<20 {
                let client = try await WSTestClient.connect(port: gateway.port, token: token)
                try await client.send(["type": "subscribe", "id": "\(i)", "channel": channel])
                let cursor = try #require(try await client.reply("subscribed")["cursor"] as? String)
                #expect(cursor.hasPrefix("3."), "the stream continues after the head")
                live.append(client)
            }
            let sse = try await SSETestClient.connect(port: gateway.port, channel: channel, token: token)
            #expect(try await sse.guardedNextEvent()?.id?.hasPrefix("3.") == true)
            #expect(try await gateway.metric("gateway_catch_up_reads_total") == readsBefore, "live subscribes read the store")

            // One behind the head catches up from the store.
            let history = try await HTTPTestClient.request(.GET, port: gateway.port, "/v1/channels/\(channel)/messages?limit=3", token: token)
            let first = try #require((history.json["messages"] as? [[String: Any]])?.first?["cursor"] as? String)
            let behind = try await WSTestClient.connect(port: gateway.port, token: token)
            try await behind.send(["type": "subscribe", "id": "b", "channel": channel, "since": first])
            _ = try await behind.reply("subscribed")
            #expect(try await behind.messages(2).map(\.seq) == [2, 3])
            #expect(try await gateway.metric("gateway_catch_up_reads_total") > readsBefore)

            _ = try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["n": 4], token: token)
            for client in live + [behind] { #expect(try await client.messages(1).map(\.seq) == [4]) }
            #expect(try await sse.guardedNextEvent()?.id?.hasPrefix("4.") == true)
            for client in live + [behind] { await client.close() }
        }
    }
}
