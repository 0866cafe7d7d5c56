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
        let bodyMarker = "body-marker-\(UUID().uuidString)"
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        try await withStarted({ try await GatewayProcess.start(environment: ["GATEWAY_LOG_LEVEL": "info"], log: log) },
                              stop: { await $0.stop() }) { gateway in
            let port = gateway.port
            let channel = "topic:logged"
            // REST: a publish (its id chosen by the client), a history read, a 404, a 401, a bad cursor.
            let published = try await HTTPTestClient.request(.POST, port: port, "/v1/channels/\(channel)/messages",
                                                             headers: [("X-Request-Id", "client-chosen-1"), ("Content-Type", "application/json")],
                                                             body: "{\"body\":{\"n\":\"\(bodyMarker)\"}}", token: token)
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
            // A request with a W3C trace context, and one with a malformed one.
            let traced = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages",
                                                          headers: [("X-Request-Id", "traced-1"), ("traceparent", traceparent)], token: token)
            #expect(traced.status == 200)
            let badlyTraced = try await HTTPTestClient.request(.GET, port: port, "/v1/channels/\(channel)/messages",
                                                               headers: [("X-Request-Id", "badly-traced-1"), ("traceparent", "00-xyz-00f067aa0ba902b7-01")], token: token)
            #expect(badlyTraced.status == 200)
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
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("\"websocket closed\"")
            }
        }
        let output = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        // Every log line (standard error) is one JSON object (GATEWAY_LOG_FORMAT's default); standard output has
        // the one line for people that says where it listens.
        let lines = output.filter { !$0.hasPrefix("gateway listening on ") }
        #expect(output.count == lines.count + 1)
        let objects = lines.map { json($0) }
        #expect(objects.allSatisfy { $0["time"] is String && $0["level"] is String && $0["message"] is String }, "a line that is not a JSON log object")
        // The lines of the run: after the listener started, before the shutdown began.
        let start = try #require(objects.lastIndex { $0["message"] as? String == "gateway listening" })
        let end = objects[(start + 1)...].firstIndex { ["gateway shutting down", "gateway draining"].contains($0["message"] as? String ?? "") } ?? objects.count
        let run = Array(objects[(start + 1)..<end])
        #expect(run.count >= ids.count, "\(run.count) lines logged during the run")
        for line in run {
            #expect(line["request_id"] is String, "a line of the run without a request id: \(line)")
        }
        for (what, id) in ids {
            let id = try #require(Optional(id), "\(what): no X-Request-Id")
            let own = run.filter { $0["request_id"] as? String == id }
            #expect(own.contains { $0["message"] as? String == "request" && $0["status"] != nil && $0["route"] != nil && $0["duration_ms"] != nil },
                    "\(what): no access line with its id \(id)")
        }
        let wsLines = run.filter { $0["request_id"] as? String == "ws-handshake-1" }
        #expect(wsLines.contains { $0["status"] as? String == "101" } && wsLines.contains { $0["message"] as? String == "websocket closed" })
        // The W3C trace context: every line of the traced request carries it; a malformed one is ignored.
        let traced = run.filter { $0["request_id"] as? String == "traced-1" }
        #expect(!traced.isEmpty && traced.allSatisfy { $0["trace_id"] as? String == "4bf92f3577b34da6a3ce929d0e0e4736" && $0["traceparent"] as? String == traceparent })
        #expect(run.filter { $0["request_id"] as? String == "badly-traced-1" }.allSatisfy { $0["trace_id"] == nil })
        // No token, nor its signature, nor a message body anywhere in the log.
        let signature = String(token.split(separator: ".").last!)
        #expect(!lines.contains { $0.contains(signature) }, "a token reached the log")
        #expect(!lines.contains { $0.contains(bodyMarker) }, "a message body reached the log")
        // The target is logged, with the token's value masked.
        #expect(run.contains { $0["target"] as? String == "/v1/channels/topic:logged/messages?access_token=***" }, "the history request's masked target")
        #expect(wsLines.contains { $0["target"] as? String == "/v1/ws?access_token=***" && $0["status"] as? String == "101" }, "the WebSocket's masked target")
        for line in lines[(start + 1)..<min(end, lines.count)] { print("  " + line) }
        print("request log: \(run.count) lines during the run, each with its request id; \(ids.count) requests found by their id")
    }
}
