import Foundation
import NIOHTTP1
import Testing

/// Real clients over loopback against a real embedded gateway.
@Suite(.serialized) struct FanoutEndToEndTests {
    typealias Seen = [(seq: Int64, id: String)]

    static func seen(_ messages: [Received]) -> [Int64: String] {
        Dictionary(messages.map { ($0.seq, $0.id) }, uniquingKeysWith: { a, _ in a })
    }

    static func seqs(_ messages: [Received]) -> [Int64] { messages.map(\.seq) }

    static func seqs(_ messages: [[String: Any]]) -> [Int64] { messages.map { Received($0).seq } }

    /// With a write delay (`GATEWAY_WRITE_DELAY_MS`) too: messages then reach subscribers in batches written at
    /// once (frames joined), and still each exactly once, in order.
    @Test(arguments: [0, 20])
    func fiveHundredMessagesReachEveryTransportOnceInOrder(writeDelayMs: Int64) async throws {
        try await withTestGateway(configure: { $0.writeDelay = .milliseconds(writeDelayMs) }) { gateway in
            let port = gateway.port
            let token = try await gateway.token("svc", roles: ["service"])
            let channel = "topic:e2e"
            let total = 500

            var wsSubscribers: [WSTestClient] = []
            for i in 0..<3 {
                let client = try await WSTestClient.connect(port: port, token: token)
                try await client.send(["type": "subscribe", "id": "s\(i)", "channel": channel])
                let reply = try await client.reply("subscribed")
                #expect(reply["id"] as? String == "s\(i)")
                #expect(reply["cursor"] as? String != nil)
                wsSubscribers.append(client)
            }
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token)
            #expect(sse.status == 200)
            let opening = try await sse.guardedNextEvent()
            #expect(opening?.id != nil && opening?.data == nil)

            try await withThrowingTaskGroup(of: (String, [Received]).self) { group in
                for (i, client) in wsSubscribers.enumerated() {
                    group.addTask { ("ws\(i)", try await client.messages(total)) }
                }
                group.addTask { ("sse", try await sse.messages(total)) }
                group.addTask { ("poll", try await HTTPTestClient.longPoll(port: port, channel: channel, token: token, count: total)) }
                // Publishers: two WebSocket connections and ten REST workers, all at once.
                for p in 0..<2 {
                    group.addTask {
                        let publisher = try await WSTestClient.connect(port: port, token: token)
                        for i in 0..<125 {
                            try await publisher.send(["type": "publish", "id": "p\(p)-\(i)", "channel": channel, "body": ["from": "ws\(p)", "i": i]])
                        }
                        var acks = 0
                        while acks < 125 {
                            let reply = try await publisher.reply("ack")
                            #expect(reply["type"] as? String == "ack")
                            acks += 1
                        }
                        await publisher.close()
                        return ("publisher-ws\(p)", [])
                    }
                }
                for w in 0..<10 {
                    group.addTask {
                        for i in 0..<25 {
                            let response = try await HTTPTestClient.publish(port: port, channel: channel, body: ["from": "rest\(w)", "i": i], token: token)
                            #expect(response.status == 201)
                        }
                        return ("publisher-rest\(w)", [])
                    }
                }
                var byReceiver: [String: [Received]] = [:]
                for try await (name, messages) in group where !name.hasPrefix("publisher") {
                    byReceiver[name] = messages
                }
                #expect(byReceiver.count == 5)
                let reference = Self.seen(byReceiver["ws0"] ?? [])
                for (name, messages) in byReceiver {
                    #expect(Self.seqs(messages) == Array(1...Int64(total)), "\(name) saw a gap, a duplicate or a reordering")
                    #expect(Self.seen(messages) == reference, "\(name) saw a different seq → id mapping")
                }
            }
            let batches = try await gateway.metric("gateway_fanout_batches_total")
            let batched = try await gateway.metric("gateway_fanout_batched_messages_total")
            #expect(batched == total, "every message handed out once")
            print("fan-out batches (write delay \(writeDelayMs) ms): \(total) messages in \(batches) batches")
            for client in wsSubscribers { await client.close() }
            await sse.close()
        }
    }

    @Test func clientsResumeFromTheirCursorWithoutLossOrDuplicates() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token()
            let channel = "topic:resume"
            let k = 20

            let ws = try await WSTestClient.connect(port: port, token: token)
            try await ws.send(["type": "subscribe", "id": "1", "channel": channel])
            _ = try await ws.reply("subscribed")
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token)
            _ = try await sse.guardedNextEvent()
            for i in 1...k { #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["i": i], token: token).status == 201) }
            let wsFirst = try await ws.messages(k)
            let sseFirst = try await sse.messages(k)
            #expect(Self.seqs(wsFirst) == Array(1...Int64(k)))
            #expect(Self.seqs(sseFirst) == Array(1...Int64(k)))
            let wsCursor = wsFirst.last!.cursor
            let sseCursor = sseFirst.last!.cursor
            await ws.close()
            await sse.close()

            for i in 1...100 { #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["after": i], token: token).status == 201) }

            let ws2 = try await WSTestClient.connect(port: port, token: token)
            try await ws2.send(["type": "subscribe", "id": "2", "channel": channel, "since": wsCursor])
            let subscribed = try await ws2.reply("subscribed")
            #expect(subscribed["cursor"] as? String == wsCursor)
            let sse2 = try await SSETestClient.connect(port: port, channel: channel, token: token, lastEventID: sseCursor)
            let sseOpening = try await sse2.guardedNextEvent()
            #expect(sseOpening?.id == sseCursor)
            let caughtUpWS = try await ws2.messages(100)
            let caughtUpSSE = try await sse2.messages(100)
            #expect(Self.seqs(caughtUpWS) == Array(Int64(k + 1)...Int64(k + 100)))
            #expect(Self.seqs(caughtUpSSE) == Array(Int64(k + 1)...Int64(k + 100)))
            for i in 1...5 { #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["live": i], token: token).status == 201) }
            #expect(Self.seqs(try await ws2.messages(5)) == Array(Int64(k + 101)...Int64(k + 105)))
            #expect(Self.seqs(try await sse2.messages(5)) == Array(Int64(k + 101)...Int64(k + 105)))

            // After unsubscribe, nothing more arrives for the channel on that connection.
            try await ws2.send(["type": "unsubscribe", "id": "u", "channel": channel])
            let unsubscribed = try await ws2.reply("unsubscribed")
            #expect(unsubscribed["id"] as? String == "u" && unsubscribed["channel"] as? String == channel)
            #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["after": "unsubscribe"], token: token).status == 201)
            #expect(Self.seqs(try await sse2.messages(1)) == [Int64(k + 106)])
            try await ws2.send(["type": "ping", "id": "last"])
            let next = try await ws2.next()
            #expect(next?["type"] as? String == "pong", "a message arrived after unsubscribe: \(String(describing: next))")

            // `since` on the SSE query string works the same, and `history` starts N back.
            let sse3 = try await SSETestClient.connect(port: port, channel: channel, token: token, query: "history=3")
            _ = try await sse3.guardedNextEvent()
            #expect(Self.seqs(try await sse3.messages(3)) == [Int64(k + 104), Int64(k + 105), Int64(k + 106)])
            await ws2.close()
            await sse2.close()
            await sse3.close()
        }
    }

    @Test func requestIdsAreForgottenAfterTheirWindowInSQLite() async throws {
        try await withTestGateway(configure: { $0.idempotencyWindow = .seconds(1) }) { gateway in
            try await IdempotencyWindow.check(ports: [gateway.port], token: try await gateway.token())
        }
    }

    @Test func idempotentPublishStoresOnceOverRESTAndWebSocket() async throws {
        try await withTestGateway { gateway in
            let port = gateway.port
            let token = try await gateway.token("svc", roles: ["service"])
            let channel = "topic:idem"

            let first = try await HTTPTestClient.publish(port: port, channel: channel, body: ["n": 1], token: token, idempotencyKey: "key-1")
            let again = try await HTTPTestClient.publish(port: port, channel: channel, body: ["n": 1], token: token, idempotencyKey: "key-1")
            #expect(first.status == 201)
            #expect(again.status == 200)
            #expect(again.headers.first(name: "Idempotent-Replayed") == "true")
            #expect((first.json["message"] as? [String: Any])?["id"] as? String == (again.json["message"] as? [String: Any])?["id"] as? String)
            let conflict = try await HTTPTestClient.publish(port: port, channel: channel, body: ["n": 2], token: token, idempotencyKey: "key-1")
            #expect(conflict.status == 409)
            #expect(conflict.json["code"] as? String == "IDEMPOTENCY_CONFLICT")

            let ws = try await WSTestClient.connect(port: port, token: token)
            try await ws.send(["type": "publish", "id": "a", "channel": channel, "request_id": "key-2", "body": ["w": 1]])
            let ack1 = try await ws.reply("ack")
            try await ws.send(["type": "publish", "id": "b", "channel": channel, "request_id": "key-2", "body": ["w": 1]])
            let ack2 = try await ws.reply("ack")
            #expect(ack1["replayed"] == nil)
            #expect(ack2["replayed"] as? Bool == true)
            #expect((ack1["message"] as? [String: Any])?["id"] as? String == (ack2["message"] as? [String: Any])?["id"] as? String)
            try await ws.send(["type": "publish", "id": "c", "channel": channel, "request_id": "key-2", "body": ["w": 2]])
            let error = try await ws.reply("error")
            #expect(error["id"] as? String == "c")
            #expect((error["error"] as? [String: Any])?["code"] as? String == "IDEMPOTENCY_CONFLICT")
            // The same key used over REST and WebSocket by the same sender is one key.
            let cross = try await HTTPTestClient.publish(port: port, channel: channel, body: ["w": 1], token: token, idempotencyKey: "key-2")
            #expect(cross.status == 200)

            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: token)
            #expect(Self.seqs(history.json["messages"] as! [[String: Any]]) == [1, 2])
            await ws.close()
        }
    }
}

/// With a 1 s window (24 h in production): a request id repeats within it, and is new again after it.
enum IdempotencyWindow {
    static func check(ports: [Int], token: String) async throws {
        let channel = "topic:window"
        let first = try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["v": 1], token: token, idempotencyKey: "k")
        #expect(first.status == 201)
        let conflict = try await HTTPTestClient.publish(port: ports.last!, channel: channel, body: ["v": 2], token: token, idempotencyKey: "k")
        #expect(conflict.status == 409)
        try await Task.sleep(for: .milliseconds(1500))
        let fresh = try await HTTPTestClient.publish(port: ports.last!, channel: channel, body: ["v": 2], token: token, idempotencyKey: "k")
        #expect(fresh.status == 201)
        #expect((fresh.json["message"] as? [String: Any])?["seq"] as? Int == 2)
        let replay = try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["v": 2], token: token, idempotencyKey: "k")
        #expect(replay.status == 200)
        #expect((replay.json["message"] as? [String: Any])?["seq"] as? Int == 2)
    }
}
