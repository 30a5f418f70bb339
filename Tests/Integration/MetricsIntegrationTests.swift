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
}
