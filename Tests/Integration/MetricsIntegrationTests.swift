import ForgeEmulator
import Foundation
import Testing

@testable import TokenGateway

/// Reads one sample from Prometheus text: `name{labels}` → value (labels in any order).
func sample(_ text: String, _ name: String, _ labels: [String: String] = [:]) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(name) && !line.hasPrefix("#") {
        let rest = line.dropFirst(name.count)
        var found: [String: String] = [:]
        var valuePart = rest
        if rest.first == "{" {
            guard let close = rest.lastIndex(of: "}") else { continue }
            // label="value" pairs; values are quoted and may contain braces or commas.
            var inner = rest[rest.index(after: rest.startIndex)..<close]
            while let eq = inner.firstIndex(of: "=") {
                let key = String(inner[..<eq]).trimmingCharacters(in: CharacterSet(charactersIn: ", "))
                let afterQuote = inner.index(eq, offsetBy: 2)
                guard afterQuote <= inner.endIndex, let endQuote = inner[afterQuote...].firstIndex(of: "\"") else {
                    break
                }
                found[key] = String(inner[afterQuote..<endQuote])
                inner = inner[inner.index(after: endQuote)...]
            }
            valuePart = rest[rest.index(after: close)...]
        } else if rest.first != " " {
            continue
        }
        if labels.allSatisfy({ found[$0.key] == $0.value }) && found.count == labels.count {
            return Double(valuePart.trimmingCharacters(in: .whitespaces))
        }
    }
    return nil
}

@Suite("Metrics")
struct MetricsIntegrationTests {
    @Test("after a scripted flow every contract metric moved as it should")
    func scriptedFlow() async throws {
        try await GatewayHarness.run { h in
            let a = try await h.installed()
            let b = try await h.installed()
            #expect(try await h.token(a).status == 200)  // cold: one trigger
            #expect(try await h.token(a).status == 200)  // cache
            h.emulator.setFault(.failWith(status: 500, times: 1), for: b)
            #expect(try await h.token(b).status == 200)  // one failed attempt, one retry
            #expect(try await h.emulator.push(b, expiresAt: Date().addingTimeInterval(7200)).status == 200)
            var bad = FITOptions()
            bad.audience = "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000000"
            _ = try await h.emulator.deliver(
                a, systemToken: try h.emulator.mintAccessToken(for: a), requestId: nil, fit: bad)
            #expect(try await h.token(h.emulator.makeInstallation()).status == 404)
            let text = try await h.call(.GET, "/metrics", secret: nil)
            #expect(text.status == 200)
            #expect(text.headers["content-type"] == "text/plain; version=0.0.4")
            let m = text.body
            #expect(sample(m, "token_gateway_token_requests_total", ["source": "trigger", "outcome": "success"]) == 2)
            #expect(sample(m, "token_gateway_token_requests_total", ["source": "cache", "outcome": "success"]) == 1)
            #expect(
                sample(
                    m, "token_gateway_token_requests_total", ["source": "none", "outcome": "installation_not_found"])
                    == 1)
            #expect(sample(m, "token_gateway_trigger_attempts_total", ["outcome": "success"]) == 2)
            #expect(sample(m, "token_gateway_trigger_attempts_total", ["outcome": "http_error"]) == 1)
            #expect(sample(m, "token_gateway_trigger_retries_total") == 1)
            #expect(sample(m, "token_gateway_tokens_received_total", ["kind": "solicited"]) == 2)
            #expect(sample(m, "token_gateway_tokens_received_total", ["kind": "pushed"]) == 1)
            #expect(sample(m, "token_gateway_invocation_token_verifications_total", ["outcome": "wrong_audience"]) == 1)
            #expect(sample(m, "token_gateway_invocation_token_verifications_total", ["outcome": "success"]) == 7)
            #expect(sample(m, "token_gateway_trigger_round_trip_seconds_count") == 2)
            #expect(sample(m, "token_gateway_caller_wait_seconds_count") == 4)
            #expect(sample(m, "token_gateway_leases_held") == 0)
            #expect(sample(m, "token_gateway_circuits_open") == 0)
            #expect(sample(m, "token_gateway_store_errors_total") == 0)
            #expect(sample(m, "token_gateway_coalesced_waiters_total") == 0)
            #expect(
                sample(
                    m, "token_gateway_http_requests_total", ["route": "/v1/installations/{id}/token", "status": "200"])
                    == 3)
            #expect(
                sample(m, "token_gateway_http_requests_total", ["route": "/forge/auth-trigger", "status": "401"]) == 1)
            // Bounded labels: no installation id ever appears in a label.
            #expect(!m.contains("installation/"))
        }
    }

    @Test("caller authentication failures are counted by route; a Connect tenant's JWT refused is not")
    func callerAuthenticationFailures() async throws {
        try await GatewayHarness.run(connectBaseURL: connectTestAppBaseURL) { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation, secret: "wrong-secret-0123456789").status == 401)
            #expect(try await h.call(.GET, GatewayHarness.path(installation) + "/token", secret: nil).status == 401)
            let oauth = try await h.call(
                .POST, "/oauth/token", secret: nil, headers: ["content-type": "application/x-www-form-urlencoded"],
                body: "grant_type=client_credentials&client_id=nobody&client_secret=wrong-0123456789")
            #expect(oauth.status == 401)
            #expect(try await h.call(.GET, "/status", secret: nil).status == 401)
            // A caller with a good secret forwarding a tenant's JWT that fails: 401, not the caller's.
            let verify = try await h.call(
                .POST, "/v1/connect/verify", headers: ["content-type": "application/json"],
                body: #"{"jwt":"a.b.c","method":"GET","url":"/issue-panel"}"#)
            #expect(verify.status == 401)
            #expect(verify.errorCode == "invalid_connect_jwt")

            let m = try await h.call(.GET, "/metrics", secret: nil).body
            let family = "token_gateway_caller_authentication_failures_total"
            #expect(sample(m, family, ["route": "/v1/installations/{id}/token"]) == 2)
            #expect(sample(m, family, ["route": "/oauth/token"]) == 1)
            #expect(sample(m, family, ["route": "/status"]) == 1)
            #expect(sample(m, family, ["route": "/v1/connect/verify"]) == nil)
            #expect(
                sample(m, "token_gateway_http_requests_total", ["route": "/v1/connect/verify", "status": "401"]) == 1)
        }
    }

    @Test("unknown paths and wrong methods are counted under route unmatched")
    func unmatchedRoutes() async throws {
        try await GatewayHarness.run { h in
            #expect(try await h.call(.GET, "/nope").status == 404)
            #expect(try await h.call(.GET, "/v1/nope/deeper", secret: nil).status == 404)
            #expect(try await h.call(.POST, "/health/live", secret: nil).status == 405)
            let m = try await h.call(.GET, "/metrics", secret: nil).body
            #expect(sample(m, "token_gateway_http_requests_total", ["route": "unmatched", "status": "404"]) == 2)
            #expect(sample(m, "token_gateway_http_requests_total", ["route": "unmatched", "status": "405"]) == 1)
            #expect(!m.contains("NotFound"))
        }
    }

    @Test("token_gateway_leases_held counts the lease of a round trip in flight, and drops when it ends")
    func leaseHeldWhileRoundTripRuns() async throws {
        try await GatewayHarness.run(configure: { $0.flow.deliveryGrace = .seconds(60) }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            let waiting = Task { try await h.token(installation, query: "timeout=30000") }
            #expect(
                try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) == 1 })
            #expect(try await h.metric("token_gateway_leases_held") == 1)
            let requestId = try #require(h.emulator.triggerRecords(for: installation).first?.requestId)
            let token = try h.emulator.mintAccessToken(for: installation)
            #expect(try await h.emulator.deliver(installation, systemToken: token, requestId: requestId).status == 200)
            let answer = try await waiting.value
            #expect(answer.status == 200)
            #expect(answer.json["accessToken"] as? String == token)
            #expect(try await Events.wait { try await h.metric("token_gateway_leases_held") == 0 })
        }
    }

    @Test("a Redis outage moves token_gateway_store_errors_total and token_gateway_store_announcements_heard")
    func storeOutageMetrics() async throws {
        // Written to disk at once, so the installation is still there after the restart.
        let redis = try await RedisServerProcess.start(extraArguments: [
            "--appendonly", "yes", "--appendfsync", "always",
        ])
        try await GatewayHarness.run(redisURL: redis.url) { h in
            let installation = try await h.installed()
            #expect(try await h.metric("token_gateway_store_announcements_heard") == 1)
            #expect(try await h.metric("token_gateway_store_errors_total") == 0)
            await redis.kill()
            let details = try await h.call(.GET, GatewayHarness.path(installation))
            #expect(details.status == 503)
            #expect(details.errorCode == "store_unavailable")
            #expect(try await h.metric("token_gateway_store_errors_total") >= 1)
            #expect(try await Events.wait { try await h.metric("token_gateway_store_announcements_heard") == 0 })
            try await redis.restart()
            await h.gateway.flow.subscribed(times: 2)
            #expect(try await h.metric("token_gateway_store_announcements_heard") == 1)
            #expect(try await h.token(installation).status == 200)
        }
        await redis.stop()
    }
}
