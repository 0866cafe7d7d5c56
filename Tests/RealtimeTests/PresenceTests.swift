import Foundation
@testable import Gateway
import Testing

/// Presence, typing and the personal `user:<sub>` channel, across three instances sharing Postgres and Redis.
@Suite(.serialized) struct PresenceTests {
    static let fastPresence: @Sendable (inout GatewayConfig) -> Void = { config in
        config.presence.tick = .milliseconds(100)
        config.presence.heartbeat = .milliseconds(500)
        config.presence.ttl = .milliseconds(2000)
    }

    static func connect(_ port: Int, _ token: String, subscribe channel: String, presence: Bool = false, since: String? = nil) async throws -> (WSTestClient, [String: Any]) {
        let ws = try await WSTestClient.connect(port: port, token: token)
        var command: [String: Any] = ["type": "subscribe", "id": "s", "channel": channel]
        if presence { command["presence"] = true }
        if let since { command["since"] = since }
        try await ws.send(command)
        return (ws, try await ws.reply("subscribed"))
    }

    /// Reads frames until one satisfies `matches` (a hang guard bounds it); returns it and those before it.
    static func frame(_ ws: WSTestClient, _ what: String, timeout: Double = 30, _ matches: @escaping ([String: Any]) -> Bool) async throws -> (found: [String: Any], before: [[String: Any]]) {
        nonisolated(unsafe) let ws = ws
        nonisolated(unsafe) let matches = matches
        let result: (String, [String]) = try await within(timeout, what) {
            var before: [String] = []
            while let object = try await ws.next(timeout: timeout) {
                if matches(object) { return (jsonText(object), before) }
                before.append(jsonText(object))
            }
            throw ServiceError(description: "\(what): the connection closed")
        }
        return (json(result.0), result.1.map { json($0) })
    }

    static func users(_ frame: [String: Any]) -> Set<String> {
        Set((frame["members"] as? [[String: Any]] ?? []).compactMap { $0["user"] as? String })
    }

    // MARK: user:<sub>

    @Test func theUserChannelAnnouncesThreadsAndUnreadCountsAndResumesFromACursor() async throws {
        try await withCluster(instances: 3) { cluster in
            let (a, b, c) = (cluster.ports[0], cluster.ports[1], cluster.ports[2])
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let carol = try await cluster.token("carol", roles: [])
            let admin = try await cluster.token("root", roles: ["admin"])
            var (feed, subscribed) = try await Self.connect(b, bob, subscribe: "user:bob")
            var cursor = subscribed["cursor"] as! String

            // Only bob (and admins) read user:bob; nobody publishes there.
            let (intruder, refused) = try await Self.connect(c, carol, subscribe: "user:bob")
            #expect(refused["type"] as? String == "error" && (refused["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")
            await intruder.close()
            #expect(try await HTTPTestClient.request(.GET, port: a, "/v1/channels/user:bob/events", token: carol).status == 403)
            #expect(try await HTTPTestClient.request(.GET, port: a, "/v1/channels/user:bob/messages", token: carol).status == 403)
            #expect(try await HTTPTestClient.request(.GET, port: a, "/v1/channels/user:bob/messages", token: admin).status == 200)
            for token in [bob, admin] {
                #expect(try await HTTPTestClient.publish(port: a, channel: "user:bob", body: ["forged": true], token: token).status == 403)
            }

            // Added to a thread (on another instance): thread_added.
            let created = try await HTTPTestClient.request(.POST, port: a, "/v1/threads", headers: [("Content-Type", "application/json")],
                                                           body: "{\"title\":\"plans\",\"members\":[\"bob\"]}", token: alice)
            let thread = try #require((created.json["thread"] as? [String: Any])?["id"] as? String)
            let added = try await feed.messages(1)[0]
            #expect(added.object["sender"] as? String == "gateway")
            let addedBody = added.object["body"] as? [String: Any] ?? [:]
            #expect(addedBody["type"] as? String == "thread_added" && addedBody["thread"] as? String == thread && addedBody["by"] as? String == "alice")
            cursor = added.cursor

            // Messages from alice: unread events, the count after each.
            var aliceIds: [String] = []
            for n in 1...2 {
                let sent = try await HTTPTestClient.publish(port: c, channel: "thread:\(thread)", body: ["n": n], token: alice)
                aliceIds.append((sent.json["message"] as? [String: Any])?["id"] as? String ?? "")
                let event = try await feed.messages(1)[0]
                let body = event.object["body"] as? [String: Any] ?? [:]
                #expect(body["type"] as? String == "unread" && body["thread"] as? String == thread)
                #expect((body["unread"] as? NSNumber)?.intValue == n && body["message_id"] as? String == aliceIds.last)
                cursor = event.cursor
            }
            // Bob's own message is not announced to bob: the next event is alice's third message, unread 3.
            #expect(try await HTTPTestClient.publish(port: b, channel: "thread:\(thread)", body: ["from": "bob"], token: bob).status == 201)
            let third = try await HTTPTestClient.publish(port: a, channel: "thread:\(thread)", body: ["n": 3], token: alice)
            let next = (try await feed.messages(1)[0]).object["body"] as? [String: Any] ?? [:]
            #expect(next["message_id"] as? String == (third.json["message"] as? [String: Any])?["id"] as? String)
            #expect((next["unread"] as? NSNumber)?.intValue == 3)

            // Away: removed from the thread meanwhile; back with the cursor, the removal arrives, nothing twice.
            cursor = try await HTTPTestClient.request(.GET, port: b, "/v1/channels/user:bob/messages", token: bob).json["cursor"] as! String
            await feed.close()
            #expect(try await HTTPTestClient.request(.DELETE, port: c, "/v1/threads/\(thread)/members/bob", token: alice).status == 200)
            (feed, subscribed) = try await Self.connect(a, bob, subscribe: "user:bob", since: cursor)
            let removed = try await feed.messages(1)[0]
            let removedBody = removed.object["body"] as? [String: Any] ?? [:]
            #expect(removedBody["type"] as? String == "thread_removed" && removedBody["thread"] as? String == thread)
            let history = try await HTTPTestClient.request(.GET, port: c, "/v1/channels/user:bob/messages", token: bob)
            let kinds = (history.json["messages"] as? [[String: Any]] ?? []).map { ($0["body"] as? [String: Any])?["type"] as? String ?? "" }
            #expect(kinds == ["thread_added", "unread", "unread", "unread", "thread_removed"], "\(kinds)")
            #expect((history.json["messages"] as? [[String: Any]])?.map { ($0["seq"] as? NSNumber)?.intValue ?? 0 } == [1, 2, 3, 4, 5])
            await feed.close()
        }
    }

    // MARK: typing

    @Test func typingReachesTheOtherMembersOnlyAndIsNeverStored() async throws {
        try await withCluster(instances: 3) { cluster in
            let (a, b, c) = (cluster.ports[0], cluster.ports[1], cluster.ports[2])
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let carol = try await cluster.token("carol", roles: [])
            let dave = try await cluster.token("dave", roles: [])
            let created = try await HTTPTestClient.request(.POST, port: a, "/v1/threads", headers: [("Content-Type", "application/json")],
                                                           body: "{\"title\":\"t\",\"members\":[\"bob\",\"carol\"]}", token: alice)
            let thread = "thread:" + ((created.json["thread"] as? [String: Any])?["id"] as? String ?? "")
            let (aliceWS, start) = try await Self.connect(a, alice, subscribe: thread)
            let (bobWS, _) = try await Self.connect(b, bob, subscribe: thread)
            let (carolWS, _) = try await Self.connect(c, carol, subscribe: thread)

            // Everything alice's connection receives is kept: none of it may be her own typing.
            var seenByAlice: [[String: Any]] = []
            try await aliceWS.send(["type": "typing", "id": "t1", "channel": thread])
            let (ack1, beforeAck1) = try await Self.frame(aliceWS, "ack t1") { $0["type"] as? String == "ack" }
            #expect(ack1["id"] as? String == "t1")
            seenByAlice += beforeAck1
            for ws in [bobWS, carolWS] {
                let (typing, before) = try await Self.frame(ws, "alice's typing") { $0["type"] as? String == "typing" }
                #expect(typing["user"] as? String == "alice" && typing["channel"] as? String == thread && typing["seq"] == nil)
                #expect(before.isEmpty)
            }
            // Within the interval a second one is acknowledged, not relayed: bob's next typing is carol's.
            try await aliceWS.send(["type": "typing", "id": "t2", "channel": thread])
            seenByAlice += try await Self.frame(aliceWS, "ack t2") { $0["type"] as? String == "ack" }.before
            try await carolWS.send(["type": "typing", "id": "c1", "channel": thread])
            _ = try await carolWS.reply("ack")
            let (fromCarol, skipped) = try await Self.frame(bobWS, "carol's typing") { $0["type"] as? String == "typing" }
            #expect(fromCarol["user"] as? String == "carol" && skipped.isEmpty)
            // The sender never gets its own: alice's frames up to carol's typing hold no typing of alice.
            let (carolAtAlice, beforeCarol) = try await Self.frame(aliceWS, "carol's typing at alice") {
                $0["type"] as? String == "typing" && $0["user"] as? String == "carol"
            }
            #expect(carolAtAlice["channel"] as? String == thread)
            seenByAlice += beforeCarol
            #expect(!seenByAlice.contains { $0["type"] as? String == "typing" }, "\(seenByAlice)")

            // Only members, only threads.
            try await aliceWS.send(["type": "typing", "id": "t3", "channel": "topic:news"])
            #expect((try await aliceWS.reply("error")["error"] as? [String: Any])?["code"] as? String == "BAD_REQUEST")
            let (daveWS, _) = try await Self.connect(b, dave, subscribe: "topic:lobby")
            try await daveWS.send(["type": "typing", "id": "d1", "channel": thread])
            #expect((try await daveWS.reply("error")["error"] as? [String: Any])?["code"] as? String == "FORBIDDEN")

            // Never stored, never replayed: history and a catch-up from the start hold the one real message only.
            #expect(try await HTTPTestClient.publish(port: a, channel: thread, body: ["text": "hi"], token: alice).status == 201)
            let history = try await HTTPTestClient.request(.GET, port: b, "/v1/channels/\(thread)/messages", token: bob)
            #expect((history.json["messages"] as? [[String: Any]])?.count == 1)
            let (replay, _) = try await Self.connect(c, carol, subscribe: thread, since: start["cursor"] as? String)
            let (first, beforeFirst) = try await Self.frame(replay, "the catch-up") { $0["type"] as? String == "message" }
            #expect((first["message"] as? [String: Any])?["seq"] as? Int == 1 && beforeFirst.isEmpty)
            for ws in [aliceWS, bobWS, carolWS, daveWS, replay] { await ws.close() }
        }
    }

    // MARK: presence

    @Test func presenceIsTheSameEverywhereWithJoinsLeavesAndADeadInstanceExpiring() async throws {
        try await withCluster(instances: 3, configure: Self.fastPresence) { cluster in
            let ports = cluster.ports
            let channel = "topic:room"
            let carol = try await cluster.token("carol", roles: [])
            let alice = try await cluster.token("alice", roles: [])
            let bob = try await cluster.token("bob", roles: [])
            let dave = try await cluster.token("dave", roles: [])
            // carol watches on instance 0; alice (two tabs) on 1; bob over SSE on 2.
            let (watcher, _) = try await Self.connect(ports[0], carol, subscribe: channel, presence: true)
            let (aliceOne, _) = try await Self.connect(ports[1], alice, subscribe: channel)
            let (aliceTwo, _) = try await Self.connect(ports[1], alice, subscribe: channel)
            let bobStream = try await SSETestClient.connect(port: ports[2], channel: channel, token: bob)
            #expect(bobStream.status == 200)
            // The watcher's list starts with itself (the `presence` command tells who is there): the others join.
            var joined: Set<String> = []
            while !joined.isSuperset(of: ["alice", "bob"]) {
                let (event, _) = try await Self.frame(watcher, "joins") { $0["type"] as? String == "join" }
                #expect(event["channel"] as? String == channel)
                joined.formUnion(Self.users(event))
            }
            #expect(joined == ["alice", "bob"])
            // The same list from every instance, REST and WebSocket alike.
            for port in ports {
                try await eventually("presence on \(port)") {
                    let answer = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/presence", token: carol).json
                    let members = answer["members"] as? [[String: Any]] ?? []
                    let byUser = Dictionary(members.map { ($0["user"] as? String ?? "", ($0["connections"] as? NSNumber)?.intValue ?? 0) }) { $1 }
                    return byUser == ["carol": 1, "alice": 2, "bob": 1] && (answer["count"] as? NSNumber)?.intValue == 3
                }
            }
            // The entries live in Redis: one field per instance and user.
            let (_, stored) = try await TestServices.run("/usr/bin/redis-cli", ["-p", String(cluster.redis.port), "HKEYS", "gw:presence:\(channel)"])
            let fields = stored.split(separator: "\n").map(String.init)
            #expect(fields.count == 3 && Set(fields.compactMap { $0.split(separator: "\u{1F}").last.map(String.init) }) == ["carol", "alice", "bob"], "\(fields)")
            try await aliceOne.send(["type": "presence", "id": "p", "channel": channel])
            let reply = try await aliceOne.reply("presence")
            #expect(reply["id"] as? String == "p" && Self.users(reply) == ["carol", "alice", "bob"])

            // One tab closed: alice stays; the other too: alice leaves.
            await aliceOne.close()
            try await aliceTwo.send(["type": "unsubscribe", "id": "u", "channel": channel])
            _ = try await aliceTwo.reply("unsubscribed")
            let (left, beforeLeave) = try await Self.frame(watcher, "alice's leave") { $0["type"] as? String == "leave" }
            #expect(Self.users(left) == ["alice"])
            #expect(!beforeLeave.contains { $0["type"] as? String == "leave" })

            // An instance killed -9: its members leave everywhere within the TTL.
            try await withStarted({
                try await GatewayProcess.start(environment: ["DATABASE_URL": cluster.postgres.url, "REDIS_URL": cluster.redis.url,
                                                             "GATEWAY_PRESENCE_TTL_MS": "2000"])
            }, stop: { await $0.kill9() }) { victim in
                let (daveWS, _) = try await Self.connect(victim.port, dave, subscribe: channel)
                let (daveJoin, _) = try await Self.frame(watcher, "dave's join") { $0["type"] as? String == "join" }
                #expect(Self.users(daveJoin) == ["dave"])
                await victim.kill9()
                let (daveLeave, _) = try await Self.frame(watcher, "dave's leave after the kill") { $0["type"] as? String == "leave" }
                #expect(Self.users(daveLeave) == ["dave"])
                for port in ports {
                    let answer = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/presence", token: carol).json
                    #expect(Self.users(answer) == ["carol", "bob"], "\(port): \(answer)")
                }
                // The dead instance's field is gone from Redis too (readers delete expired entries).
                try await eventually("dave's entry deleted") {
                    let (_, keys) = try await TestServices.run("/usr/bin/redis-cli", ["-p", String(cluster.redis.port), "HKEYS", "gw:presence:\(channel)"])
                    return !keys.contains("dave")
                }
                _ = daveWS
            }
            // Presence needs the subscribe permission: a thread's list is for its members.
            let created = try await HTTPTestClient.request(.POST, port: ports[0], "/v1/threads", headers: [("Content-Type", "application/json")],
                                                           body: "{\"title\":\"p\",\"members\":[]}", token: alice)
            let thread = "thread:" + ((created.json["thread"] as? [String: Any])?["id"] as? String ?? "")
            #expect(try await HTTPTestClient.request(.GET, port: ports[1], "/v1/channels/\(thread)/presence", token: bob).status == 403)
            #expect(try await HTTPTestClient.request(.GET, port: ports[1], "/v1/channels/\(thread)/presence", token: alice).status == 200)
            await bobStream.close()
            for ws in [watcher, aliceTwo] { await ws.close() }
        }
    }
}

/// Presence inside one (embedded) instance: the same events without a bus in between.
struct LocalPresenceTests {
    @Test func joinAndLeaveEventsOnOneInstance() async throws {
        try await withTestGateway(configure: PresenceTests.fastPresence) { gateway in
            let carol = try await gateway.token("carol", roles: [])
            let alice = try await gateway.token("alice", roles: [])
            let (watcher, _) = try await PresenceTests.connect(gateway.port, carol, subscribe: "topic:local", presence: true)
            let (other, _) = try await PresenceTests.connect(gateway.port, alice, subscribe: "topic:local")
            let (join, _) = try await PresenceTests.frame(watcher, "alice's join") { $0["type"] as? String == "join" }
            #expect(PresenceTests.users(join) == ["alice"])
            await other.close()
            let (leave, _) = try await PresenceTests.frame(watcher, "alice's leave") { $0["type"] as? String == "leave" }
            #expect(PresenceTests.users(leave) == ["alice"])
            await watcher.close()
        }
    }
}
