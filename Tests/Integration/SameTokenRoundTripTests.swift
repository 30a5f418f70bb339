import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// A round trip that brings no newer token (Forge's token cache re-delivers the token the gateway
/// holds), end to end: contract §2 *(v1.1)*, second paragraph.
@Suite("Same-token round trip and the hold")
struct SameTokenRoundTripTests {
    /// `tg:{<ari>}:hold` in the test Redis: its value and milliseconds left (nil when absent).
    static func hold(_ h: GatewayHarness, _ installation: EmulatedInstallation) async throws -> (String, Int)? {
        let key = "tg:{\(installation.id)}:hold"
        let ttl = try await h.gateway.redis.send(["PTTL", key]).int ?? -2
        guard ttl > 0, let value = try await h.gateway.redis.send(["GET", key]).string else { return nil }
        return (value, Int(ttl))
    }

    /// The value of one exported sample, such as `token_gateway_round_trips_held_total{kind="request"}`
    /// (labels in any order); 0 when it is not exported.
    static func sample(_ h: GatewayHarness, _ series: String, at baseURL: String? = nil) async throws -> Double {
        func parts(_ s: Substring) -> (String, Set<Substring>) {
            guard let open = s.firstIndex(of: "{"), let close = s.lastIndex(of: "}") else { return (String(s), []) }
            return (String(s[..<open]), Set(s[s.index(after: open)..<close].split(separator: ",")))
        }
        let wanted = parts(Substring(series))
        let metrics = try await h.call(.GET, "/metrics", at: baseURL ?? h.gatewayURL)
        for line in metrics.body.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            if parts(line[..<space]) == wanted { return Double(line[line.index(after: space)...]) ?? -1 }
        }
        return 0
    }

    static func concurrently(_ n: Int, _ call: @escaping @Sendable () async throws -> GatewayHarness.Answer)
        async throws -> [GatewayHarness.Answer]
    {
        try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
            for _ in 0..<n { group.addTask { try await call() } }
            var all: [GatewayHarness.Answer] = []
            for try await answer in group { all.append(answer) }
            return all
        }
    }

    @Test(
        "ten callers asking for more validity than Forge gives cause one trigger call; for the hold every request on every replica is answered at once; a forced refresh still triggers"
    )
    func tenCallersOneTrigger() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/token"
            // The gateway holds a token with 10 minutes left; Forge's cache hands out that one again.
            let held = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(600))
            #expect(held.status == 200)
            let exp = try #require(TokenClaims.expiry(of: held.token))
            h.emulator.setFault(.redeliverCached, for: installation)

            let first = try await Self.concurrently(10) { try await h.token(installation, query: "minValidity=3600") }
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            for answer in first {
                // Every caller: the same token with its true expiry, although it asked for an hour.
                let source = answer.json["source"] as? String ?? ""
                #expect(source == "trigger" || source == "cache", "\(answer.body)")
                TokenAnswerMatrixTests.expectWholeAnswer(
                    answer, installation, token: held.token, source: source, "first ten")
            }
            #expect(first.contains { $0.json["source"] as? String == "trigger" })
            #expect(first.allSatisfy { $0.json["expiresAt"] as? String == RFC3339.string(unixSeconds: exp) })

            // The hold is in Redis for a minute, naming the round trip that placed it.
            let (holder, ttl) = try #require(try await Self.hold(h, installation))
            #expect(holder.hasPrefix("rq_"))
            #expect(ttl > 0 && ttl <= 60_000)
            #expect(try await h.gateway.redis.send(["EXISTS", "tg:{\(installation.id)}:lease"]).int == 0)

            // Within the hold: answered at once from the cache, no trigger call.
            for _ in 0..<10 {
                let answer = try await h.token(installation, query: "minValidity=3600")
                TokenAnswerMatrixTests.expectWholeAnswer(
                    answer, installation, token: held.token, source: "cache", "held")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // Also on a second replica, which holds nothing in memory: it finds the hold in Redis.
            try await h.withSecondGateway { otherURL, other in
                let there = try await Self.concurrently(10) {
                    try await h.call(.GET, path + "?minValidity=3600", at: otherURL)
                }
                for answer in there {
                    TokenAnswerMatrixTests.expectWholeAnswer(
                        answer, installation, token: held.token, source: "cache", "second replica")
                }
                #expect(h.emulator.triggerCalls(for: installation) == 1)
                #expect(!other.flow.isRoundActive(installation.installationID))
                #expect(
                    try await Self.sample(h, #"token_gateway_round_trips_held_total{kind="request"}"#, at: otherURL)
                        == 10)
            }

            // A forced refresh still starts one round trip (Forge again hands out the same token).
            let forced = try await h.call(.POST, path + "/refresh")
            TokenAnswerMatrixTests.expectWholeAnswer(
                forced, installation, token: held.token, source: "trigger", "forced")
            #expect(h.emulator.triggerCalls(for: installation) == 2)
            let after = try await h.token(installation, query: "minValidity=3600")
            TokenAnswerMatrixTests.expectWholeAnswer(
                after, installation, token: held.token, source: "cache", "after forced")
            #expect(h.emulator.triggerCalls(for: installation) == 2)

            #expect(try await Self.sample(h, #"token_gateway_same_token_round_trips_total{outcome="served"}"#) == 2)
            #expect(try await Self.sample(h, #"token_gateway_trigger_attempts_total{outcome="success"}"#) == 2)
            #expect(try await Self.sample(h, #"token_gateway_round_trips_held_total{kind="request"}"#) >= 11)
            #expect(try await Self.sample(h, #"token_gateway_round_trips_held_total{kind="refresh_ahead"}"#) == 0)
        }
    }

    @Test("the re-delivered token landing on the other replica still answers the leader's callers and places the hold")
    func deliveryOnOtherReplica() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let held = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(600))
            h.emulator.setFault(.redeliverCached, for: installation)
            try await h.withSecondGateway { otherURL, other in
                // Gateway A sends the trigger; Forge delivers to replica B, which stores nothing
                // (not newer) and tells A through the notification channel.
                h.emulator.setGatewayURL(otherURL)
                let answers = try await Self.concurrently(5) {
                    try await h.token(installation, query: "minValidity=3600")
                }
                for answer in answers {
                    let source = answer.json["source"] as? String ?? ""
                    #expect(source == "trigger" || source == "cache", "\(answer.body)")
                    TokenAnswerMatrixTests.expectWholeAnswer(
                        answer, installation, token: held.token, source: source, "leader")
                }
                #expect(h.emulator.triggerCalls(for: installation) == 1)
                #expect(try await Self.hold(h, installation) != nil)
                let there = try await h.call(
                    .GET, GatewayHarness.path(installation) + "/token?minValidity=3600", at: otherURL)
                TokenAnswerMatrixTests.expectWholeAnswer(
                    there, installation, token: held.token, source: "cache", "replica B")
                #expect(!other.flow.isRoundActive(installation.installationID))
                #expect(h.emulator.triggerCalls(for: installation) == 1)
                h.emulator.setGatewayURL(h.gatewayURL)
            }
        }
    }

    @Test("when the hold ends the next request starts exactly one more round trip")
    func holdEnds() async throws {
        try await GatewayHarness.run(configure: { $0.flow.sameTokenHold = .milliseconds(500) }) { h in
            let installation = try await h.installed()
            let held = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(600))
            h.emulator.setFault(.redeliverCached, for: installation)
            let first = try await h.token(installation, query: "minValidity=3600")
            TokenAnswerMatrixTests.expectWholeAnswer(first, installation, token: held.token, source: "trigger", "first")
            // Wait for the hold to end in Redis (and in this process: its own expiry is the same).
            let deadline = ContinuousClock.now + .seconds(10)
            while try await Self.hold(h, installation) != nil, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            while let until = h.gateway.flow.holdUntil(installation.installationID), until > FlowTime.now(),
                ContinuousClock.now < deadline
            {
                try await Task.sleep(for: .milliseconds(20))
            }
            let next = try await h.token(installation, query: "minValidity=3600")
            TokenAnswerMatrixTests.expectWholeAnswer(
                next, installation, token: held.token, source: "trigger", "after the hold")
            #expect(h.emulator.triggerCalls(for: installation) == 2)
        }
    }

    @Test(
        "a token with under 60 s left is not served after a same-token round trip nor during the hold: 502 trigger_failed"
    )
    func tooShortToServe() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let path = GatewayHarness.path(installation) + "/token"
            // A token with 45 s left: Forge's cache will hand it out again (the emulator learns it
            // from a delivery, which the gateway does not store: too little time left)…
            let short = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(45))
            let offered = try await h.emulator.deliver(installation, systemToken: short, requestId: nil)
            #expect(offered.status == 200)
            #expect(offered.body.contains("\"stored\":false"))
            // …and the store holds it (written while it still had more than a minute left).
            let exp = try #require(TokenClaims.expiry(of: short))
            let stored = try await h.gateway.store.storeDeliveredToken(
                id, token: AccessToken(value: short, expiresAt: exp), requestID: nil,
                metadata: InstallationMetadata(appId: nil, apiBaseUrl: installation.apiBaseUrl, cloudId: nil),
                now: FlowTime.now() - .seconds(30))
            #expect(stored.outcome == .stored)
            h.emulator.setFault(.redeliverCached, for: installation)

            let answers = try await Self.concurrently(5) { try await h.token(installation) }
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            for answer in answers {
                #expect(answer.status == 502, "\(answer.body)")
                #expect(answer.errorCode == "trigger_failed")
                #expect(!answer.body.contains(short))
            }
            #expect(try await Self.hold(h, installation) != nil)
            // During the hold: the same answer at once, on both replicas, no trigger call.
            let again = try await h.token(installation)
            #expect(again.status == 502)
            #expect(again.errorCode == "trigger_failed")
            try await h.withSecondGateway { otherURL in
                let there = try await h.call(.GET, path, at: otherURL)
                #expect(there.status == 502)
                #expect(there.errorCode == "trigger_failed")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            #expect(try await Self.sample(h, #"token_gateway_same_token_round_trips_total{outcome="expiring"}"#) == 1)
            #expect(
                try await Self.sample(h, #"token_gateway_token_requests_total{source="none",outcome="trigger_failed"}"#)
                    == 6)
        }
    }

    @Test(
        "a refresh-ahead that brings the same token does not loop: one trigger call, then none during the hold, on either replica"
    )
    func refreshAheadDoesNotLoop() async throws {
        try await GatewayHarness.run(configure: { $0.flow.refreshAheadFraction = 1.0 }) { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let path = GatewayHarness.path(installation) + "/token"
            let held = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1800))
            h.emulator.setFault(.redeliverCached, for: installation)
            // Inside the refresh-ahead window (here its whole lifetime): served at once, and one
            // background round trip asks Forge, which hands out the same token.
            let first = try await h.token(installation)
            TokenAnswerMatrixTests.expectWholeAnswer(first, installation, token: held.token, source: "cache", "first")
            // The hold's announcement, heard by this process, wakes the wait.
            let holdPlaced = try await Events.wait(within: .seconds(20), on: h.gateway.flow.notificationEvents()) {
                try await Self.hold(h, installation) != nil && !h.gateway.flow.isRoundActive(id)
            }
            #expect(holdPlaced)
            #expect(try await Self.hold(h, installation) != nil)
            #expect(!h.gateway.flow.isRoundActive(id))
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // Every later answer is still in the window, and starts nothing.
            for _ in 0..<20 {
                let answer = try await h.token(installation)
                TokenAnswerMatrixTests.expectWholeAnswer(
                    answer, installation, token: held.token, source: "cache", "later")
                #expect(!h.gateway.flow.isRoundActive(id))
            }
            try await h.withSecondGateway { otherURL, other in
                for _ in 0..<5 {
                    let answer = try await h.call(.GET, path, at: otherURL)
                    TokenAnswerMatrixTests.expectWholeAnswer(
                        answer, installation, token: held.token, source: "cache", "second replica")
                    #expect(!other.flow.isRoundActive(id))
                }
            }
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            #expect(try await Self.sample(h, #"token_gateway_round_trips_held_total{kind="refresh_ahead"}"#) >= 20)
            #expect(try await Self.sample(h, #"token_gateway_same_token_round_trips_total{outcome="served"}"#) == 1)
        }
    }
}
