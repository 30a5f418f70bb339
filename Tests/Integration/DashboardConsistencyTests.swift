import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

@Suite("Dashboard, alert rules and operations guide match the exported metrics")
struct DashboardConsistencyTests {
    /// The families of contract §6; the dashboard must show every one of them.
    static let contractFamilies = [
        "token_gateway_http_requests_total", "token_gateway_token_requests_total",
        "token_gateway_trigger_attempts_total", "token_gateway_trigger_retries_total",
        "token_gateway_trigger_round_trip_seconds", "token_gateway_caller_wait_seconds",
        "token_gateway_coalesced_waiters_total", "token_gateway_tokens_received_total",
        "token_gateway_store_errors_total", "token_gateway_circuits_open",
        "token_gateway_invocation_token_verifications_total", "token_gateway_leases_held",
        "token_gateway_user_exchanges_total",
    ]

    @Test("every metric, label and value the dashboard and the alerts use is in /metrics after a scripted flow")
    func dashboardsUseExportedMetrics() async throws {
        try await GatewayHarness.run { h in
            // A cold fetch (trigger success, round trip, caller wait), then a cached one.
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            #expect(try await h.token(installation).status == 200)
            // A retried trigger: one 500, then success.
            let flaky = try await h.installed()
            h.emulator.setFault(.failWith(status: 500, times: 1), for: flaky)
            #expect(try await h.token(flaky).status == 200)
            // Concurrent callers on a cold installation coalesce.
            let busy = try await h.installed()
            let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<8 { group.addTask { try await h.token(busy).status } }
                var all: [Int] = []
                for try await s in group { all.append(s) }
                return all
            }
            #expect(statuses.allSatisfy { $0 == 200 })
            // A pushed token, a refused FIT, a user-token exchange, an unknown installation.
            #expect(try await h.emulator.push(installation).status == 200)
            let refused = try await h.call(
                .POST, "/forge/auth-trigger", secret: nil,
                headers: ["authorization": "Bearer not.a.fit", "content-type": "application/json"], body: "{}")
            #expect(refused.status == 401)
            #expect(
                try await h.call(.GET, GatewayHarness.path(installation) + "/token?asUser=557058:dash").status == 200)
            #expect(try await h.token(h.emulator.makeInstallation()).status == 404)
            // A trigger that keeps failing: 502 trigger_failed.
            let broken = try await h.installed()
            h.emulator.setFault(.failWith(status: 503, times: 100), for: broken)
            #expect(try await h.token(broken).status == 502)
            #expect(try await h.call(.GET, "/health/ready", secret: nil).status == 200)

            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(metrics.status == 200)
            #expect(metrics.headers["content-type"] == "text/plain; version=0.0.4")
            for family in Self.contractFamilies {
                #expect(metrics.body.contains("# TYPE \(family) "), "\(family) is missing from /metrics")
            }
            // Every family of the gateway's own has a `# HELP` line.
            let lines = metrics.body.split(separator: "\n")
            for line in lines where line.hasPrefix("# TYPE token_gateway_") {
                let family = line.split(separator: " ")[2]
                #expect(lines.contains { $0.hasPrefix("# HELP \(family) ") }, "\(family) has no help text")
            }
            let file = try DocumentationCheck.temporaryFile("metrics.txt", contents: Data(metrics.body.utf8))
            defer { DocumentationCheck.removeTemporaryFile(file) }
            let outcome = try await DocumentationCheck.run(
                [
                    "observability", "--metrics", file,
                    "--dashboard", DocumentationCheck.path("Docs/grafana-dashboard.json"),
                    "--alerts", DocumentationCheck.path("Docs/alerts.yaml"),
                    "--operations", DocumentationCheck.path("Docs/operations.md"),
                    "--require",
                ] + Self.contractFamilies)
            if outcome.status == 0 { print(outcome.output) }
            #expect(outcome.status == 0, "the dashboards drifted from the code:\n\(outcome.output)")
        }
    }
}
