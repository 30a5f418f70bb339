import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Many replicas, one flow")
struct ReplicaIntegrationTests {
    @Test("200 concurrent callers spread over three replicas cause exactly one trigger")
    func oneTriggerAcrossReplicas() async throws {
        try await ReplicaHarness.run(replicas: 3) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            let answers = try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                for i in 0..<200 { group.addTask { try await h.token(i % 3, installation) } }
                var all: [GatewayHarness.Answer] = []
                for try await a in group { all.append(a) }
                return all
            }
            #expect(answers.allSatisfy { $0.status == 200 })
            let tokens = Set(answers.compactMap { $0.json["accessToken"] as? String })
            #expect(tokens.count == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            // Every caller's whole answer: the round trip's token (or the cache's, for late comers).
            let token = try #require(tokens.first)
            for answer in answers {
                let source = answer.json["source"] as? String ?? ""
                #expect(["trigger", "cache"].contains(source), "\(answer.body)")
                TokenAnswerMatrixTests.expectWholeAnswer(answer, installation, token: token, source: source, "caller")
            }
        }
    }

    @Test(
        "replicas whose subscription is refused hear nothing from each other, so each reads the store: an uninstall through one is 410 on the other"
    )
    func replicasWithoutAnnouncementsReadTheStore() async throws {
        let server = try await RedisServerProcess.start()
        // A user that may publish but not subscribe: every SUBSCRIBE is refused (`NOPERM`).
        try redisCLI([
            "-p", "\(server.port)", "ACL", "SETUSER", "nochannels", "on", ">nochannels-pw-5", "~*", "&*", "+@all",
            "-subscribe",
        ])
        try await ReplicaHarness.run(
            replicas: 2, redisURL: "redis://nochannels:nochannels-pw-5@127.0.0.1:\(server.port)/0"
        ) { h in
            for replica in h.replicas {
                #expect(await replica.waitForLine { $0.contains("store announcements not heard") })
            }
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            let first = try await h.token(0, installation)
            #expect(first.status == 200)
            #expect(try await h.token(0, installation).json["source"] as? String == "cache")
            // Uninstalled through the other replica: its announcement reaches nobody.
            h.emulator.setGatewayURL(h.replicas[1].url)
            try await h.emulator.uninstall(installation)
            let after = try await h.token(0, installation)
            #expect(after.status == 410, "\(after.body)")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
        await server.stop()
    }

    @Test("a delivery landing on another replica answers the caller waiting on the first")
    func deliveryToOtherReplica() async throws {
        try await ReplicaHarness.run(replicas: 2) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            h.emulator.setFault(.deliverVia(gatewayURL: h.replicas[1].url), for: installation)
            let answer = try await h.token(0, installation)
            let stored = try #require(try await h.store.systemToken(installation.installationID))
            TokenAnswerMatrixTests.expectWholeAnswer(
                answer, installation, token: stored.value, source: "trigger", "the waiting replica")
            // The replica the delivery landed on serves it from its cache, whole.
            let there = try await h.token(1, installation)
            TokenAnswerMatrixTests.expectWholeAnswer(
                there, installation, token: stored.value, source: "cache", "the delivering replica")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a late delivery to another replica still answers the waiter (source trigger)")
    func lateDeliveryOtherReplica() async throws {
        // A delivery grace far beyond the emulator's delay: the late delivery, not the clock, ends the wait.
        try await ReplicaHarness.run(replicas: 2, extraSettings: ["TOKEN_GATEWAY_DELIVERY_GRACE_MS": "60000"]) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            h.emulator.setFault(.deliverLate(.milliseconds(500)), for: installation)
            let answer = try await h.token(1, installation)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test(
        "a caller that gives up before a slow trigger answers leaves its round trip running: a caller on another replica gets its token, one trigger call, no failure counted"
    )
    func roundTripOutlivesItsCallers() async throws {
        // One failed round trip would open the circuit.
        try await ReplicaHarness.run(replicas: 2, extraSettings: ["TOKEN_GATEWAY_BREAKER_THRESHOLD": "1"]) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            // Forge's function starts slowly: it delivers, then answers, 4 s after the call, when
            // the lease taken for the first caller (its 300 ms and 2 s of grace) would have run out.
            h.emulator.setFault(.respondSlowly(.seconds(4)), for: installation)
            let first = try await h.token(0, installation, query: "timeout=300")
            #expect(first.status == 504)
            #expect(first.errorCode == "token_timeout")
            // The trigger call goes on, and replica 0 keeps the lease: replica 1's caller follows
            // that round trip instead of starting a second one (or meeting an open circuit).
            let second = try await h.token(1, installation, query: "timeout=10000")
            #expect(second.status == 200, "\(second.body)")
            let token = try #require(second.json["accessToken"] as? String)
            let source = second.json["source"] as? String ?? ""
            #expect(["trigger", "cache"].contains(source), "\(second.body)")
            TokenAnswerMatrixTests.expectWholeAnswer(second, installation, token: token, source: source, "second")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            // The call was not expired when the function read it: the gateway's `expiresAt` is
            // when it stops waiting for the call, not the first caller's deadline.
            #expect(
                try await Events.wait(within: .seconds(10), on: h.emulator.callEvents()) {
                    h.emulator.triggerRecords(for: installation).first?.answeredStatus != nil
                })
            #expect(h.emulator.triggerRecords(for: installation).first?.answeredStatus == 200)
            // No failure was counted: a forced refresh on either replica makes a round trip.
            h.emulator.setFault(.none, for: installation)
            for replica in 0..<2 {
                let refreshed = try await h.call(replica, .POST, GatewayHarness.path(installation) + "/token/refresh")
                #expect(refreshed.status == 200, "\(refreshed.body)")
                #expect(refreshed.json["source"] as? String == "trigger")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 3)
        }
    }

    @Test("the circuit opens after consecutive failures, is shared by replicas, and closes after a good probe")
    func circuitBreaker() async throws {
        try await ReplicaHarness.run(
            replicas: 2,
            extraSettings: [
                "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS": "1", "TOKEN_GATEWAY_BREAKER_THRESHOLD": "2",
                // Long enough that the open circuit is seen on both replicas on a loaded machine;
                // its end is waited for below (the answer turning from 503 to 200), not timed.
                "TOKEN_GATEWAY_BREAKER_OPEN_MS": "5000",
            ]
        ) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            h.emulator.setFault(.failWith(status: 500, times: 2), for: installation)
            #expect(try await h.token(0, installation).errorCode == "trigger_failed")
            #expect(try await h.token(0, installation).errorCode == "trigger_failed")
            // Open: both replicas answer at once without calling the trigger.
            let open = try await h.token(1, installation)
            #expect(open.status == 503)
            #expect(open.errorCode == "circuit_open")
            let retryAfter = Int(open.headers["retry-after"] ?? "") ?? 0
            #expect((1...5).contains(retryAfter), "Retry-After \(retryAfter) for a 5 s window")
            let openOnFirst = try await h.token(0, installation)
            #expect(openOnFirst.status == 503)
            #expect(openOnFirst.errorCode == "circuit_open")
            #expect(h.emulator.triggerCalls(for: installation) == 2)
            // After the open window one probe goes through; the trigger works again, so it closes.
            let deadline = ContinuousClock.now + .seconds(30)
            var last = open
            while last.status == 503, ContinuousClock.now < deadline {
                #expect(last.errorCode == "circuit_open")
                #expect(h.emulator.triggerCalls(for: installation) == 2)
                try await Task.sleep(for: .milliseconds(100))
                last = try await h.token(0, installation)
            }
            #expect(last.status == 200)
            #expect(h.emulator.triggerCalls(for: installation) == 3)
            // The leader records the closing round right after answering: wait for the gauge.
            let gaugeDeadline = ContinuousClock.now + .seconds(10)
            var metrics = try await h.call(0, .GET, "/metrics")
            while sample(metrics.body, "token_gateway_circuits_open") != 0, ContinuousClock.now < gaugeDeadline {
                try await Task.sleep(for: .milliseconds(20))
                metrics = try await h.call(0, .GET, "/metrics")
            }
            #expect(sample(metrics.body, "token_gateway_circuits_open") == 0)
        }
    }

    @Test(
        "SIGTERM mid-round-trip: the waiting caller gets its token through another replica, the lease is released, exit 0"
    )
    func gracefulShutdown() async throws {
        try await ReplicaHarness.run(replicas: 2) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            // Forge delivers through the load balancer: here, to the replica that keeps running.
            h.emulator.setGatewayURL(h.replicas[1].url)
            h.emulator.setFault(.respondSlowly(.milliseconds(1500)), for: installation)
            async let answer = h.token(0, installation)
            // Wait until the trigger call is in flight, then ask replica 0 to stop.
            #expect(
                try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) > 0 })
            h.replicas[0].signal(SIGTERM)
            let result = try await answer
            #expect(result.status == 200)
            #expect(result.json["source"] as? String == "trigger")
            let status = await h.replicas[0].waitForExit()
            #expect(status == 0)
            let lease = try await h.store.redis.send(["EXISTS", "tg:{\(installation.id)}:lease"])
            #expect(lease.int == 0)
        }
    }

    @Test("SIGTERM with nowhere to deliver: the caller gets its error answer (502 trigger_failed), never a reset")
    func gracefulShutdownAlone() async throws {
        try await ReplicaHarness.run(
            replicas: 1,
            extraSettings: ["TOKEN_GATEWAY_DELIVERY_GRACE_MS": "300", "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS": "1"]
        ) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            // Nowhere to deliver: Forge's delivery reaches a listener that closes every connection,
            // so the trigger answers 502 and the one attempt fails whatever the shutdown's timing.
            let nowhere = try await ConnectionRecorder.start()
            defer { Task { await nowhere.stop() } }
            h.emulator.setGatewayURL(nowhere.baseURL)
            h.emulator.setFault(.respondSlowly(.milliseconds(500)), for: installation)
            async let answer = h.token(0, installation, query: "timeout=30000")
            #expect(
                try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) > 0 })
            h.replicas[0].signal(SIGTERM)
            let result = try await answer
            #expect(result.status == 502)
            #expect(result.errorCode == "trigger_failed")
            #expect(await h.replicas[0].waitForExit() == 0)
            let lease = try await h.store.redis.send(["EXISTS", "tg:{\(installation.id)}:lease"])
            #expect(lease.int == 0)
        }
    }
}
