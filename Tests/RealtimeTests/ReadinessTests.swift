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
            try await eventually("ready once the first canary came back") { try await readiness().0 == 200 }
            let (_, ready) = try await readiness()
            #expect(ready["redis"] as? String == "ok" && ready["canary_age_ms"] is Int)

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

            cluster.redis.signal(SIGCONT)
            try await eventually("200 again once canaries come back", timeout: 20) { try await readiness().0 == 200 }
            print("readiness: 503 \(Int(noticed * 1000)) ms after SIGSTOP (canary max age 2 s, PING timeout 60 s); 200 again after SIGCONT")
        }
    }
}
