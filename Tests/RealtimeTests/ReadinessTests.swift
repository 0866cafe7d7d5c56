import Fanout
import Foundation
import Gateway
import Testing

/// The readiness canary as a value type: numbered canaries out, the newest return decides.
@Suite struct BusCanaryTests {
    let start = ContinuousClock.now

    func at(_ ms: Int) -> ContinuousClock.Instant { start + .milliseconds(ms) }

    @Test func sendsEveryIntervalAndIsHealthyOnlyWhileTheNewestReturnIsYoung() {
        var configuration = BusCanary.Configuration()
        configuration.interval = .seconds(1)
        configuration.maxAge = .seconds(3)
        var canary = BusCanary(configuration: configuration)
        #expect(canary.tick(now: at(0)) == .send(1))
        #expect(canary.tick(now: at(500)) == .none)
        #expect(!canary.isHealthy(now: at(500)), "nothing came back yet")
        canary.received(1, now: at(600))
        #expect(canary.isHealthy(now: at(600)))
        #expect(canary.lastRoundTrip == .milliseconds(600))
        #expect(canary.tick(now: at(1000)) == .send(2))
        #expect(canary.tick(now: at(2000)) == .send(3))
        // 2 and 3 never come back: healthy until the max age after the last return, then not.
        #expect(canary.isHealthy(now: at(3600)))
        #expect(!canary.isHealthy(now: at(3601)))
        #expect(canary.age(now: at(3601)) == .milliseconds(3001))
        // A number never sent, and one already back, change nothing.
        canary.received(99, now: at(3700))
        canary.received(1, now: at(3700))
        #expect(!canary.isHealthy(now: at(3700)))
        // 3 comes back late: 2 is forgotten with it, and a late 2 changes nothing.
        canary.received(3, now: at(4000))
        #expect(canary.isHealthy(now: at(4000)) && canary.lastRoundTrip == .milliseconds(2000))
        canary.received(2, now: at(4100))
        #expect(canary.age(now: at(4100)) == .milliseconds(100))
    }
}

/// `/readyz` proves delivery: a Redis that stalls with its connections open (SIGSTOP) turns it 503 through the
/// canary alone (the PING heartbeat is set to notice only after a minute here), and SIGCONT turns it 200 again.
@Suite(.serialized) struct ReadinessTests {
    @Test func aStalledRedisTurnsReadinessUnavailableThroughTheCanary() async throws {
        try await withCluster(instances: 1, configure: { config in
            config.redisPingTimeout = .seconds(60)
            config.canary.interval = .milliseconds(250)
            config.canary.maxAge = .seconds(2)
        }) { cluster in
            let gateway = cluster.gateways[0]
            let port = gateway.port
            @Sendable func readiness() async throws -> (Int, [String: Any]) {
                let response = try await HTTPTestClient.request(.GET, port: port, "/readyz")
                return (response.status, response.json)
            }
            /// Canaries sent and come back, from one scrape.
            @Sendable func canaries() async throws -> (sent: Int, received: Int) {
                let text = try await HTTPTestClient.request(.GET, port: port, "/metrics").body
                func value(_ direction: String) -> Int {
                    let line = text.split(separator: "\n").first { $0.hasPrefix("gateway_canaries_total{") && $0.contains("direction=\"\(direction)\"") }
                    return Int(Double(line?.split(separator: " ").last ?? "") ?? -1)
                }
                return (value("sent"), value("received"))
            }
            try await eventually("ready once the first canary came back") { try await readiness().0 == 200 }
            let (_, ready) = try await readiness()
            #expect(ready["redis"] as? String == "ok" && ready["canary_age_ms"] is Int)
            // While Redis answers, every canary comes back: at most the newest one is on its way.
            try await eventually("canaries counted both ways") {
                let c = try await canaries()
                return c.received >= 3 && (0...1).contains(c.sent - c.received)
            }

            cluster.redis.signal(SIGSTOP)
            let stalledAt = Date()
            defer { cluster.redis.signal(SIGCONT) }
            try await eventually("503 once the newest canary is older than its max age", timeout: 20) { try await readiness().0 == 503 }
            let noticed = Date().timeIntervalSince(stalledAt)
            let (_, stalled) = try await readiness()
            #expect(stalled["redis"] as? String == "failed" && stalled["store"] as? String == "ok")
            #expect((stalled["canary_age_ms"] as? Int ?? 0) > 2000)
            // The heartbeat has not noticed: the bus's connection still counts as up.
            #expect(try await gateway.metric("gateway_redis_up") == 1)
            // Stalled, canaries still go out (one every 250 ms) and not one comes back.
            let first = try await canaries()
            try await Task.sleep(for: .milliseconds(800))
            let second = try await canaries()
            #expect(second.received == first.received, "a canary came back from a stopped Redis")
            #expect(second.sent >= first.sent + 2)

            cluster.redis.signal(SIGCONT)
            try await eventually("200 again once canaries come back", timeout: 20) { try await readiness().0 == 200 }
            // The ones sent during the stall were queued in Redis and all come back after it.
            try await eventually("every canary back") {
                let c = try await canaries()
                return c.received > second.received && c.received >= second.sent && (0...1).contains(c.sent - c.received)
            }
            print("readiness: 503 \(Int(noticed * 1000)) ms after SIGSTOP (canary max age 2 s, PING timeout 60 s); 200 again after SIGCONT")
        }
    }
}
