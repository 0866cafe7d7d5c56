import Foundation
import Testing

/// PROTOCOL.md §4: every log line of a request carries its request id. Tokens never reach the logs, also when
/// they come as `?access_token=`.
@Suite(.serialized) struct RequestLogTests {
    @Test func everyLineOfARequestCarriesItsIdAndNoTokenIsLogged() async throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("gw-log-\(UUID().uuidString).log").path
        defer { try? FileManager.default.removeItem(atPath: log) }
        let token = try await TestGateway.token("logger", roles: ["admin"])
        var ids: [String: String] = [:]  // what each request was → the id its answer named
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_LOG_LEVEL": "info"], log: log) },
                              stop: { await $0.stop() }) { gateway in
            let port = gateway.port
            let channel = "topic:logged"
            // REST: a publish (its id chosen by the client), a history read, a 404, a 401, a bad cursor.
            let published = try await HTTPTestClient.request(.POST, port: port, "/v1/channels/\(channel)/messages",
                                                             headers: [("X-Request-Id", "client-chosen-1"), ("Content-Type", "application/json")],
                                                             body: "{\"body\":{\"n\":1}}", token: token)
            #expect(published.status == 201)
            ids["publish"] = published.headers.first(name: "x-request-id")
            #expect(ids["publish"] == "client-chosen-1")
            let history = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?access_token=\(token)")
            #expect(history.status == 200)
            ids["history with ?access_token="] = history.headers.first(name: "x-request-id")
            let missing = try await HTTPTestClient.request(.GET, port: port, "/v1/nothing-here", token: token)
            #expect(missing.status == 404)
            ids["404"] = missing.headers.first(name: "x-request-id")
            let unauthenticated = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?access_token=\(token)x")
            #expect(unauthenticated.status == 401)
            ids["401"] = unauthenticated.headers.first(name: "x-request-id")
            let badCursor = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages?since=nonsense", token: token)
            #expect(badCursor.status == 400)
            ids["400"] = badCursor.headers.first(name: "x-request-id")
            // A long-poll that answers at once, with its token in the query.
            let poll = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/poll?timeout=0&access_token=\(token)")
            #expect(poll.status == 200)
            ids["poll"] = poll.headers.first(name: "x-request-id")
            // An SSE stream, opened and closed by the client.
            let sse = try await SSETestClient.connect(port: port, channel: channel, token: token)
            #expect(sse.status == 200)
            ids["sse"] = sse.headers.first(name: "x-request-id")
            await sse.close()
            // A WebSocket with its token in the query, a command or two, closed by the client.
            let ws = try await WSTestClient.connect(port: port, token: nil, path: "/v1/ws?access_token=\(token)",
                                                    headers: [("X-Request-Id", "ws-handshake-1")])
            ids["ws"] = "ws-handshake-1"
            try await ws.send(["type": "subscribe", "id": "s", "channel": channel])
            _ = try await ws.reply("subscribed")
            try await ws.send(["type": "ping", "id": "p"])
            _ = try await ws.reply("pong")
            await ws.close()
            try await eventually("the WebSocket's close logged") {
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("websocket closed")
            }
        }
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        // The lines of the run: after the listener started, before the shutdown began.
        let start = try #require(lines.lastIndex { $0.contains("gateway listening") })
        let end = lines.lastIndex { $0.contains("gateway shutting down") } ?? lines.count
        let run = Array(lines[(start + 1)..<end])
        #expect(run.count >= ids.count, "\(run.count) lines logged during the run")
        for line in run {
            #expect(line.contains("request-id="), "a line of the run without a request id: \(line)")
        }
        for (what, id) in ids {
            let id = try #require(Optional(id), "\(what): no X-Request-Id")
            let own = run.filter { $0.contains("request-id=\(id)") }
            #expect(own.contains { $0.contains(" request") && $0.contains("status=") }, "\(what): no access line with its id \(id)")
        }
        let wsLines = run.filter { $0.contains("request-id=ws-handshake-1") }
        #expect(wsLines.contains { $0.contains("status=101") } && wsLines.contains { $0.contains("websocket closed") })
        // No token, nor its signature, anywhere in the log.
        let signature = String(token.split(separator: ".").last!)
        #expect(!lines.contains { $0.contains(signature) }, "a token reached the log")
        // The target is logged, with the token's value masked.
        #expect(run.contains { $0.contains("target=/v1/channels/topic:logged/messages?access_token=***") }, "the history request's masked target")
        #expect(wsLines.contains { $0.contains("target=/v1/ws?access_token=***") && $0.contains("status=101") }, "the WebSocket's masked target")
        for line in run { print("  " + line) }
        print("request log: \(run.count) lines during the run, each with its request id; \(ids.count) requests found by their id")
    }
}
