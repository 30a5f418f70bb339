import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Contract §2 `GET …/token` and `POST …/token/refresh`, §4 and §6: the promises held over real
/// HTTP — query defaults and ranges, the `source` words, joining a round trip in flight, the exact
/// error of each trigger failure and the trigger-attempt outcome it counts.
@Suite("Contract: the token route")
struct ContractTokenRouteTests {
    static func seconds(_ date: Date) -> Int64 { Int64(date.timeIntervalSince1970.rounded(.down)) }

    @Test("minValidity defaults to 300 s: 500 s left is served from the store, 200 s left makes a round trip")
    func minValidityDefault() async throws {
        try await GatewayHarness.run { h in
            let plenty = try await h.installed()
            let short = try await h.installed()
            #expect(try await h.emulator.push(plenty, expiresAt: Date().addingTimeInterval(500)).status == 200)
            #expect(try await h.emulator.push(short, expiresAt: Date().addingTimeInterval(200)).status == 200)
            let cached = try await h.token(plenty)
            #expect(cached.status == 200)
            #expect(cached.json["source"] as? String == "cache")
            #expect(h.emulator.triggerCalls(for: plenty) == 0)
            let fetched = try await h.token(short)
            #expect(fetched.status == 200)
            #expect(fetched.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: short) == 1)
            // The same 200 s token with minValidity below what it has left is served as it is.
            let other = try await h.installed()
            #expect(try await h.emulator.push(other, expiresAt: Date().addingTimeInterval(200)).status == 200)
            let lenient = try await h.token(other, query: "minValidity=100")
            #expect(lenient.json["source"] as? String == "cache")
            #expect(h.emulator.triggerCalls(for: other) == 0)
        }
    }

    @Test("minValidity 0 and 7200 are accepted, -1 and 7201 refused with 400 invalid_parameter")
    func minValidityBoundaries() async throws {
        // Tokens of three hours, so that 7200 s of validity can be given.
        try await GatewayHarness.run(emulatorConfigure: { $0.tokenLifetime = .seconds(3 * 3600) }) { h in
            let installation = try await h.installed()
            let longest = try await h.token(installation, query: "minValidity=7200")
            #expect(longest.status == 200)
            #expect(longest.json["source"] as? String == "trigger")
            let expiresAt = try #require(
                (longest.json["expiresAt"] as? String).flatMap { ISO8601DateFormatter().date(from: $0) })
            #expect(expiresAt.timeIntervalSinceNow >= 7200)
            let zero = try await h.token(installation, query: "minValidity=0")
            #expect(zero.status == 200)
            #expect(zero.json["source"] as? String == "cache")
            for query in ["minValidity=-1", "minValidity=7201"] {
                let refused = try await h.token(installation, query: query)
                #expect(refused.status == 400, "\(query)")
                #expect(refused.errorCode == "invalid_parameter", "\(query)")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("timeout 100 and 30000 are accepted, 99 and 30001 refused with 400 invalid_parameter")
    func timeoutBoundaries() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.emulator.push(installation).status == 200)
            for query in ["timeout=100", "timeout=30000"] {
                let answer = try await h.token(installation, query: query)
                #expect(answer.status == 200, "\(query)")
                #expect(answer.json["source"] as? String == "cache", "\(query)")
            }
            for query in ["timeout=99", "timeout=30001"] {
                let refused = try await h.token(installation, query: query)
                #expect(refused.status == 400, "\(query)")
                #expect(refused.errorCode == "invalid_parameter", "\(query)")
            }
            let refresh = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh?timeout=30001")
            #expect(refresh.errorCode == "invalid_parameter")
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test(
        "the trigger body's expiresAt is when the gateway stops waiting: the caller's deadline (10 000 ms by default, the timeout parameter otherwise), or the 10 s attempt timeout when that is later",
        arguments: [nil, 12_345, 30_000, 1_000] as [Int?])
    func triggerExpiresAtIsTheCallersDeadline(timeout: Int?) async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            // A caller waiting less than the attempt timeout: the call is still waited for that long.
            let wait = Double(max(timeout ?? 10_000, 10_000)) / 1000
            let before = Date()
            let answer = try await h.token(installation, query: timeout.map { "timeout=\($0)" } ?? "")
            let after = Date()
            #expect(answer.status == 200)
            let record = try #require(h.emulator.triggerRecords(for: installation).first)
            let expiresAt = try #require(record.expiresAt)
            // Unix seconds on the wire: the deadline rounded to a whole second, between the
            // deadlines of the moments the request was sent and answered.
            #expect(Self.seconds(expiresAt) >= Self.seconds(before.addingTimeInterval(wait)))
            #expect(Self.seconds(expiresAt) <= Self.seconds(after.addingTimeInterval(wait)) + 1)
        }
    }

    @Test("a delivery without the round trip's request id answers the waiting caller with source push")
    func sourcePush() async throws {
        try await GatewayHarness.run(configure: { $0.flow.deliveryGrace = .seconds(60) }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            let waiting = Task { try await h.token(installation, query: "timeout=30000") }
            #expect(
                try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) == 1 })
            // The caller waits for the round trip; Forge pushes a token unasked meanwhile.
            let pushed = try await h.emulator.push(installation)
            #expect(pushed.status == 200)
            #expect(pushed.body.contains("\"stored\":true"))
            let answer = try await waiting.value
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "push")
            #expect(answer.json["accessToken"] as? String == pushed.token)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a forced refresh joins the round trip already in flight: one trigger, one token, both answered")
    func forcedRefreshJoinsRoundTrip() async throws {
        try await GatewayHarness.run(configure: { $0.flow.deliveryGrace = .seconds(60) }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            let first = Task { try await h.token(installation, query: "timeout=30000") }
            #expect(
                try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) == 1 })
            let refresh = Task {
                try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh?timeout=30000")
            }
            // The refresh joined once the gateway counts it as a coalesced waiter.
            #expect(try await Events.wait { try await h.metric("token_gateway_coalesced_waiters_total") == 1 })
            let requestId = try #require(h.emulator.triggerRecords(for: installation).first?.requestId)
            let token = try h.emulator.mintAccessToken(for: installation)
            let delivered = try await h.emulator.deliver(installation, systemToken: token, requestId: requestId)
            #expect(delivered.status == 200)
            let (a, b) = (try await first.value, try await refresh.value)
            #expect(a.status == 200)
            #expect(b.status == 200)
            #expect(a.json["accessToken"] as? String == token)
            #expect(b.json["accessToken"] as? String == token)
            #expect(a.json["source"] as? String == "trigger")
            #expect(b.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("an unreachable trigger ends in exactly 502 trigger_failed; each attempt counts as transport_error")
    func unreachableTrigger() async throws {
        let unreachable = "http://127.0.0.1:1"
        try await GatewayHarness.run(configure: {
            GatewayHarness.allowing(unreachable, in: &$0)
            $0.flow.maxAttempts = 3
        }) { h in
            let installation = try await h.installed()
            #expect(try await h.emulator.register(installation, authTriggerUrl: unreachable + "/x1/gone").status == 200)
            // A deadline far beyond three refused connections: the attempts, not the clock, decide.
            let answer = try await h.token(installation, query: "timeout=30000")
            #expect(answer.status == 502)
            #expect(answer.errorCode == "trigger_failed")
            let m = try await h.metricsText()
            #expect(sample(m, "token_gateway_trigger_attempts_total", ["outcome": "transport_error"]) == 3)
            #expect(sample(m, "token_gateway_trigger_retries_total") == 2)
            #expect(
                sample(m, "token_gateway_token_requests_total", ["source": "none", "outcome": "trigger_failed"]) == 1)
        }
    }

    /// Runs `body` against a gateway whose installation's trigger is `holder` (allow-listed), with
    /// two attempts of 300 ms each; stops `holder` afterwards.
    static func withTrigger(
        _ holder: LoopbackListener, _ body: @Sendable (GatewayHarness, EmulatedInstallation) async throws -> Void
    ) async throws {
        do {
            try await GatewayHarness.run(configure: {
                GatewayHarness.allowing(holder.baseURL, in: &$0)
                $0.flow.maxAttempts = 2
                $0.flow.attemptTimeout = .milliseconds(300)
            }) { h in
                let installation = try await h.installed()
                #expect(
                    try await h.emulator.register(installation, authTriggerUrl: holder.baseURL + "/x1/held").status
                        == 200)
                try await body(h, installation)
            }
        } catch {
            await holder.stop()
            throw error
        }
        await holder.stop()
    }

    @Test("a trigger that never answers: each attempt ends at its own timeout, counted as timeout, then 504")
    func triggerAttemptTimeout() async throws {
        let holder = try await HoldingServer.start()
        try await Self.withTrigger(holder) { h, installation in
            let answer = try await h.token(installation, query: "timeout=30000")
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
            #expect(holder.connections == 2)
            let m = try await h.metricsText()
            #expect(sample(m, "token_gateway_trigger_attempts_total", ["outcome": "timeout"]) == 2)
            #expect(sample(m, "token_gateway_trigger_attempts_total", ["outcome": "success"]) == 0)
        }
    }

    @Test(
        "a trigger that answers 2xx at once and then holds its body: each attempt still ends at its own timeout, and the next is made"
    )
    func triggerBodyHeldPastTheAttemptTimeout() async throws {
        let holder = try await LoopbackListener.start(
            answering: "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{", hold: true)
        try await Self.withTrigger(holder) { h, installation in
            // Accepted (2xx) twice, delivered never: the caller's deadline is far off, so only
            // attempts that end by their own timeout reach the second one.
            let answer = try await h.token(installation, query: "timeout=30000")
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
            #expect(holder.connections == 2)
        }
    }

    @Test("the default trigger allow-list: https on *.hello.atlassian-dev.net and *.webtrigger.atlassian.app only")
    func defaultTriggerAllowList() async throws {
        try await GatewayHarness.run(configure: { $0.triggerHosts = .forgeDefault }) { h in
            let installation = h.emulator.makeInstallation()
            #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
            for url in [
                "https://0123abcd.hello.atlassian-dev.net/x1/trigger",
                "https://abc-def.webtrigger.atlassian.app/public/trigger",
            ] {
                let answer = try await h.emulator.register(installation, authTriggerUrl: url)
                #expect(answer.status == 200, "\(url): \(answer.body)")
            }
            for url in [
                "http://0123abcd.hello.atlassian-dev.net/x1/trigger",
                "https://0123abcd.hello.atlassian-dev.net:8443/x1/trigger",
                "https://hello.atlassian-dev.net.example.com/x1/trigger",
                "https://example.com/x1/trigger",
                h.emulator.triggerURL(for: installation),
            ] {
                let answer = try await h.emulator.register(installation, authTriggerUrl: url)
                #expect(answer.status == 400, "\(url)")
                #expect(answer.body.contains("\"trigger_url_not_allowed\""), "\(url)")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }
}
