import Foundation
import Testing

/// Threads, membership, revocation across three instances sharing Postgres and Redis.
@Suite(.serialized) struct ThreadClusterTests {
    static func createThread(port: Int, token: String, members: [String]) async throws -> String {
        let created = try await HTTPTestClient.request(.POST, port: port, "/v1/threads", body: jsonText(["title": "team", "members": members]), token: token)
        #expect(created.status == 201, "\(created.body)")
        return (created.json["thread"] as? [String: Any])?["id"] as? String ?? ""
    }

    static func summary(port: Int, token: String, thread: String) async throws -> [String: Any] {
        let list = try await HTTPTestClient.request(.GET, port: port, "/v1/threads", token: token)
        let threads = list.json["threads"] as? [[String: Any]] ?? []
        return threads.first { $0["id"] as? String == thread } ?? [:]
    }

    /// `user` subscribed to `channel` on every port: a WebSocket and an SSE stream each, both opened.
    static func streams(ports: [Int], channel: String, token: String) async throws -> (sockets: [WSTestClient], streams: [SSETestClient]) {
        var sockets: [WSTestClient] = []
        var streams: [SSETestClient] = []
        for port in ports {
            let ws = try await WSTestClient.connect(port: port, token: token)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            sockets.append(ws)
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token)
            _ = try await sse.guardedNextEvent()
            streams.append(sse)
        }
        return (sockets, streams)
    }

    @Test func membersOnlyAndUnreadCountsAgreeOnEveryInstance() async throws {
        try await withCluster(instances: 3) { cluster in
            let ports = cluster.ports
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let carol = try await cluster.token("carol", roles: [])
            let thread = try await Self.createThread(port: ports[0], token: alice, members: ["bob"])
            let channel = "thread:" + thread

            // Carol is not a member: every way in is 403, on every instance, and nothing is stored.
            for port in ports {
                #expect(try await HTTPTestClient.publish(port: port, channel: channel, body: ["x": 1], token: carol).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: carol).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?timeout=0", token: carol).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/events", token: carol).status == 403)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/threads/\(thread)", token: carol).status == 403)
                let ws = try await WSTestClient.connect(port: port, token: carol)
                try await ws.send(["type": "subscribe", "id": "s2", "channel": channel])
                #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")
                try await ws.send(["type": "publish", "id": "p", "channel": channel, "body": ["x": 1]])
                #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")
                await ws.close()
            }

            // Alice sends 3 on instance 0, bob 2 on instance 1, alice 1 more on instance 2.
            var acked: [Received] = []
            for i in 0..<3 { acked.append(Received((try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["a": i], token: alice)).json["message"] as! [String: Any])) }
            for i in 0..<2 { acked.append(Received((try await HTTPTestClient.publish(port: ports[1], channel: channel, body: ["b": i], token: bob)).json["message"] as! [String: Any])) }
            acked.append(Received((try await HTTPTestClient.publish(port: ports[2], channel: channel, body: ["a": 3], token: alice)).json["message"] as! [String: Any]))
            #expect(acked.map(\.seq) == [1, 2, 3, 4, 5, 6])
            #expect(try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["x": 1], token: carol).status == 403)
            for port in ports {
                #expect(try await Self.summary(port: port, token: alice, thread: thread)["unread"] as? Int == 2)
                #expect(try await Self.summary(port: port, token: bob, thread: thread)["unread"] as? Int == 4)
                let last = try await Self.summary(port: port, token: bob, thread: thread)["last_message"] as? [String: Any]
                #expect(last?["seq"] as? Int == 6)
            }
            // Bob reads up to 4 on instance 2: unread = alice's messages after 4 = 1; a cursor back is ignored.
            let read = try await HTTPTestClient.request(.PUT, port: ports[2], "/v1/threads/\(thread)/read", body: jsonText(["cursor": acked[3].cursor]), token: bob)
            #expect(read.status == 200)
            #expect(read.json["unread"] as? Int == 1)
            let back = try await HTTPTestClient.request(.PUT, port: ports[0], "/v1/threads/\(thread)/read", body: jsonText(["cursor": acked[0].cursor]), token: bob)
            #expect(back.json["cursor"] as? String == acked[3].cursor)
            #expect(back.json["unread"] as? Int == 1)
            // Over WebSocket, on instance 1: alice reads everything.
            let ws = try await WSTestClient.connect(port: ports[1], token: alice)
            try await ws.send(["type": "read", "id": "r", "channel": channel, "cursor": acked[5].cursor])
            let ack = try await ws.reply("ack")
            #expect(ack["id"] as? String == "r")
            #expect(ack["unread"] as? Int == 0)
            await ws.close()
            for port in ports {
                #expect(try await Self.summary(port: port, token: alice, thread: thread)["unread"] as? Int == 0)
                #expect(try await Self.summary(port: port, token: bob, thread: thread)["unread"] as? Int == 1)
            }
            // Carol becomes a member (added by bob, a member) and may read.
            #expect(try await HTTPTestClient.request(.POST, port: ports[2], "/v1/threads/\(thread)/members", body: jsonText(["user": "carol"]), token: bob).status == 200)
            #expect(try await HTTPTestClient.request(.GET, port: ports[0], "/v1/channels/\(channel)/messages", token: carol).status == 200)
            #expect(try await Self.summary(port: ports[1], token: carol, thread: thread)["unread"] as? Int == 6)
        }
    }

    @Test func removedMemberGetsEverythingBeforeTheRemovalAndNothingAfterOnEveryInstance() async throws {
        try await withCluster(instances: 3) { cluster in
            let ports = cluster.ports
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let thread = try await Self.createThread(port: ports[0], token: alice, members: ["bob"])
            let channel = "thread:" + thread
            let (sockets, streams) = try await Self.streams(ports: ports, channel: channel, token: bob)
            // Every stream is read as it arrives, noting when it ended.
            let readers = sockets.map { ws in
                Task { () -> ([Int64], String?, Date) in
                    var seen: [Int64] = []
                    var reason: String?
                    while let object = try await ws.next(timeout: 30) {
                        if object["type"] as? String == "message" { seen.append(Received(object["message"] as! [String: Any]).seq) }
                        if object["type"] as? String == "unsubscribed" { reason = object["reason"] as? String; break }
                    }
                    return (seen, reason, Date())
                }
            } + streams.map { sse in
                Task { () -> ([Int64], String?, Date) in
                    var seen: [Int64] = []
                    while let event = try await sse.guardedNextEvent(timeout: 30) {
                        if event.event == "message", let data = event.data { seen.append(Received(json(data)).seq) }
                    }
                    return (seen, sse.ended ? "ended" : nil, Date())
                }
            }
            // Alice publishes steadily from every instance; the removal happens in the middle.
            let publishing = Task { () -> [Int64] in
                var seqs: [Int64] = []
                for i in 0..<120 {
                    let answer = try await HTTPTestClient.publish(port: ports[i % 3], channel: channel, body: ["i": i], token: alice)
                    if let message = answer.json["message"] as? [String: Any] { seqs.append(Received(message).seq) }
                    try await Task.sleep(for: .milliseconds(5))
                }
                return seqs
            }
            try await Task.sleep(for: .milliseconds(250))
            let removed = try await HTTPTestClient.request(.DELETE, port: ports[1], "/v1/threads/\(thread)/members/bob", token: alice)
            let answered = Date()
            #expect(removed.status == 200, "\(removed.body)")
            var ends: [Int64] = []
            var slowest = 0.0
            for (i, reader) in readers.enumerated() {
                let (seen, how, at) = try await reader.value
                #expect(how == (i < sockets.count ? "forbidden" : "ended"))
                #expect(!seen.isEmpty && seen == Array(1...(seen.last ?? 0)), "a gap or a duplicate: \(seen)")
                ends.append(seen.last ?? 0)
                slowest = max(slowest, at.timeIntervalSince(answered))
            }
            let acked = try await publishing.value
            #expect(acked == Array(1...120))
            print("member removal: all 6 streams on 3 instances ended within \(Int(slowest * 1000)) ms of the removal's answer")
            // One cut for everyone: the channel's head at the removal, below the last message published.
            #expect(Set(ends).count == 1, "\(ends)")
            #expect((ends.first ?? 0) < 120)
            // And no way back in: a resume with a real cursor is refused too.
            let cursor = try await HTTPTestClient.request(.GET, port: ports[0], "/v1/channels/\(channel)/messages?limit=1", token: alice).json["cursor"] as? String ?? ""
            for port in ports {
                let ws = try await WSTestClient.connect(port: port, token: bob)
                try await ws.send(["type": "subscribe", "id": "again", "channel": channel, "since": cursor])
                #expect((try await ws.reply("error")["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")
                await ws.close()
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages", token: bob).status == 403)
            }
            for ws in sockets { await ws.close() }
        }
    }

    /// A removal and the next message travel separately (the removal's broadcast, the message's PUBLISH), so an
    /// instance may get the message first. Here no instance hears of the removal at all (it is written to the
    /// store directly, and the periodic re-read is 10 minutes away): the messages after it carry the thread's
    /// next membership epoch, and that alone must end the member's streams at the removal's head.
    @Test func aRemovalNoInstanceHeardOfStillCutsTheStreamsAtItsHead() async throws {
        try await withCluster(instances: 2, configure: { $0.revocationRefresh = .seconds(600) }) { cluster in
            let ports = cluster.ports
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let carol = try await cluster.token("carol", roles: [])
            let thread = try await Self.createThread(port: ports[0], token: alice, members: ["bob", "carol"])
            let channel = "thread:" + thread
            let (bobs, bobStreams) = try await Self.streams(ports: ports, channel: channel, token: bob)
            let carolWS = try await WSTestClient.connect(port: ports[1], token: carol)
            try await carolWS.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await carolWS.reply("subscribed")
            for i in 0..<3 { #expect(try await HTTPTestClient.publish(port: ports[i % 2], channel: channel, body: ["before": i], token: alice).status == 201) }
            let removal = try await cluster.gateways[0].server.app.store.removeMember("bob", from: thread)
            #expect(removal?.head == 3)
            #expect(removal?.epoch == 1)
            for i in 0..<3 { #expect(try await HTTPTestClient.publish(port: ports[i % 2], channel: channel, body: ["after": i], token: alice).status == 201) }
            for ws in bobs {
                let (seen, reason) = try await ws.seqsUntilUnsubscribed()
                #expect(seen == [1, 2, 3] && reason == "forbidden")
            }
            for sse in bobStreams {
                #expect(try await sse.seqsUntilEnd() == [1, 2, 3])
                #expect(sse.ended)
            }
            // Carol, still a member, is not held up: she gets all six (her check found no removal of hers).
            #expect(try await carolWS.messages(6).map(\.seq) == [1, 2, 3, 4, 5, 6])
            try await carolWS.send(["type": "ping", "id": "p"])
            #expect(try await carolWS.reply("pong")["id"] as? String == "p")
            // Bob back in: a new subscription from the start gets everything again, and the old removal (epoch 1,
            // before this subscription's permission was read) does not end it.
            #expect(try await HTTPTestClient.request(.POST, port: ports[0], "/v1/threads/\(thread)/members", body: jsonText(["user": "bob"]), token: alice).status == 200)
            let back = try await WSTestClient.connect(port: ports[1], token: bob)
            let zero = try await HTTPTestClient.zeroCursor(port: ports[1], channel: channel, token: bob)
            try await back.send(["type": "subscribe", "id": "again", "channel": channel, "since": zero])
            _ = try await back.reply("subscribed")
            #expect(try await back.messages(6).map(\.seq) == [1, 2, 3, 4, 5, 6])
            #expect(try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["back": true], token: alice).status == 201)
            #expect(try await back.messages(1).map(\.seq) == [7])
            for ws in bobs + [carolWS, back] { await ws.close() }
        }
    }

    /// The same in embedded mode (SQLite, in-process fan-out): the epoch is taken on the directory
    /// connection by the removal and read in the append's transaction.
    @Test func aRemovalNoOneHeardOfCutsTheStreamAtItsHeadInEmbeddedMode() async throws {
        try await withTestGateway(configure: { $0.revocationRefresh = .seconds(600) }) { gateway in
            let alice = try await gateway.token("alice", roles: [])
            let bob = try await gateway.token("bob", roles: [])
            let thread = try await Self.createThread(port: gateway.port, token: alice, members: ["bob"])
            let channel = "thread:" + thread
            let ws = try await WSTestClient.connect(port: gateway.port, token: bob)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            for i in 0..<2 { #expect(try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["before": i], token: alice).status == 201) }
            let removal = try await gateway.server.app.store.removeMember("bob", from: thread)
            #expect(removal?.head == 2 && removal?.epoch == 1)
            for i in 0..<2 { #expect(try await HTTPTestClient.publish(port: gateway.port, channel: channel, body: ["after": i], token: alice).status == 201) }
            let (seen, reason) = try await ws.seqsUntilUnsubscribed()
            #expect(seen == [1, 2] && reason == "forbidden")
            await ws.close()
        }
    }

    @Test func aRemovalReachesOtherInstancesThroughTheStoreWhileRedisIsDown() async throws {
        try await withCluster(instances: 2) { cluster in
            let ports = cluster.ports
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let thread = try await Self.createThread(port: ports[0], token: alice, members: ["bob"])
            let channel = "thread:" + thread
            let ws = try await WSTestClient.connect(port: ports[1], token: bob)
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            for i in 0..<3 { #expect(try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["i": i], token: alice).status == 201) }
            #expect(try await ws.messages(3).map(\.seq) == [1, 2, 3])
            await cluster.redis.kill9()
            #expect(try await HTTPTestClient.request(.DELETE, port: ports[0], "/v1/threads/\(thread)/members/bob", token: alice).status == 200)
            #expect(try await HTTPTestClient.publish(port: ports[0], channel: channel, body: ["after": true], token: alice).status == 201)
            // Instance 1 never heard the broadcast; it finds the removal in the store.
            var reason: String?
            while let object = try await ws.next(timeout: 20) {
                #expect(object["type"] as? String != "message", "a message after the removal: \(object)")
                if object["type"] as? String == "unsubscribed" { reason = object["reason"] as? String; break }
            }
            #expect(reason == "forbidden")
            await ws.close()
        }
    }

    @Test func revokingASessionClosesItsStreamsEverywhereAndOnlyThem() async throws {
        try await withCluster(instances: 3) { cluster in
            let ports = cluster.ports
            let gateway = cluster.gateways[0]
            let doomed = try await gateway.verifier.mint(sub: "dana", roles: [], ttl: 3600, sid: "s-doomed")
            let kept = try await gateway.verifier.mint(sub: "dana", roles: [], ttl: 3600, sid: "s-kept")
            let mallory = try await gateway.verifier.mint(sub: "mallory", roles: [], ttl: 3600, sid: "s-m")
            var doomedSockets: [WSTestClient] = []
            var keptSockets: [WSTestClient] = []
            var doomedStreams: [SSETestClient] = []
            for port in ports {
                doomedSockets.append(try await WSTestClient.connect(port: port, token: doomed))
                keptSockets.append(try await WSTestClient.connect(port: port, token: kept))
                let sse = try await SSETestClient.connect(port: port, channel: "topic:news", token: doomed)
                _ = try await sse.guardedNextEvent()
                doomedStreams.append(sse)
            }
            // Someone else's session: 403, nothing changes.
            let denied = try await HTTPTestClient.request(.POST, port: ports[0], "/v1/sessions/revoke", body: jsonText(["sid": "s-doomed"]), token: mallory)
            #expect(denied.status == 403)
            #expect(try await HTTPTestClient.request(.GET, port: ports[0], "/v1/channels/topic:news/messages", token: doomed).status == 200)

            let started = Date()
            let revoked = try await HTTPTestClient.request(.POST, port: ports[2], "/v1/sessions/revoke", body: jsonText(["sid": "s-doomed"]), token: doomed)
            #expect(revoked.status == 200, "\(revoked.body)")
            for ws in doomedSockets { #expect(try await ws.waitForClose(timeout: 10) == 4003) }
            for sse in doomedStreams {
                while try await sse.guardedNextEvent(timeout: 10) != nil {}
                #expect(sse.ended)
            }
            print("revocation: every WS and SSE of the session closed on 3 instances within \(Int(Date().timeIntervalSince(started) * 1000)) ms")
            for port in ports {
                let answer = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:news/messages", token: doomed)
                #expect(answer.status == 401)
                #expect(answer.json["code"] as? String == "TOKEN_REVOKED")
                // Every instance remembers the token from its WebSocket (verified on the loop, without a task): a
                // new upgrade is refused all the same.
                let upgrade = try await HTTPTestClient.request(.GET, port: port, "/v1/ws", headers: AuthTests.wsUpgradeHeaders, token: doomed)
                #expect(upgrade.status == 401 && upgrade.json["code"] as? String == "TOKEN_REVOKED", "\(upgrade.body)")
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:news/messages", token: kept).status == 200)
            }
            for ws in keptSockets {
                try await ws.send(["type": "ping", "id": "still"])
                #expect(try await ws.reply("pong")["id"] as? String == "still")
            }
            // Revoking the user ends tokens issued up to now; a token issued later works.
            #expect(try await HTTPTestClient.request(.POST, port: ports[0], "/v1/sessions/revoke", body: jsonText(["sub": "dana"]), token: kept).status == 200)
            for ws in keptSockets { #expect(try await ws.waitForClose(timeout: 10) == 4003) }
            let later = try await gateway.verifier.mint(sub: "dana", roles: [], ttl: 3600, sid: "s-new", now: Date().addingTimeInterval(2))
            for port in ports {
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:news/messages", token: kept).status == 401)
                #expect(try await HTTPTestClient.request(.GET, port: port, "/v1/channels/topic:news/messages", token: later).status == 200)
            }
            // An instance started afterwards knows the revocations (they are stored).
            let fresh = try await cluster.startInstance(3)
            #expect(try await HTTPTestClient.request(.GET, port: fresh.port, "/v1/channels/topic:news/messages", token: doomed).status == 401)
            await fresh.stop()
        }
    }
}
