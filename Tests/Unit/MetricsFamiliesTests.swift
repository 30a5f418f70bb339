import Prometheus
import Testing

@testable import TokenGateway

/// contract §6: the metric families dashboards and alerts are built on are on `/metrics` from the
/// first scrape, before any request or Forge call has moved them.
@Suite("Metrics families")
struct MetricsFamiliesTests {
    static let contractFamilies = [
        "token_gateway_http_requests_total", "token_gateway_token_requests_total",
        "token_gateway_trigger_attempts_total", "token_gateway_trigger_retries_total",
        "token_gateway_trigger_round_trip_seconds", "token_gateway_caller_wait_seconds",
        "token_gateway_coalesced_waiters_total", "token_gateway_tokens_received_total",
        "token_gateway_store_errors_total", "token_gateway_circuits_open",
        "token_gateway_invocation_token_verifications_total", "token_gateway_leases_held",
        "token_gateway_user_exchanges_total",
    ]

    @Test("a fresh process's first scrape lists every contract family")
    func everyFamilyFromTheStart() {
        let registry = PrometheusCollectorRegistry()
        let metrics = GatewayMetrics(factory: GatewayMetricsFactory(registry: registry))
        var bytes: [UInt8] = []
        registry.emit(into: &bytes)
        let text = String(decoding: bytes, as: UTF8.self)
        for family in Self.contractFamilies {
            #expect(text.contains("# TYPE \(family) "), "\(family)")
        }
        // The series made up front are the ones later answers move, not extra ones.
        metrics.countRequest(route: "/metrics", status: 200)
        metrics.countInvocationToken(outcome: "success")
        bytes = []
        registry.emit(into: &bytes)
        let after = String(decoding: bytes, as: UTF8.self)
        let lines = after.split(separator: "\n").map(String.init)
        #expect(lines.filter { $0.hasPrefix("token_gateway_http_requests_total{") }.count == 1)
        #expect(lines.contains { $0.hasPrefix("token_gateway_http_requests_total{") && $0.hasSuffix(" 1") })
        #expect(lines.filter { $0.hasPrefix("token_gateway_invocation_token_verifications_total{") }.count == 1)
        #expect(
            lines.contains { $0.hasPrefix("token_gateway_invocation_token_verifications_total{") && $0.hasSuffix(" 1") }
        )
    }

    @Test("every family has help text, and duration histograms have buckets up to 60 s")
    func helpTextAndBuckets() {
        let registry = PrometheusCollectorRegistry()
        let metrics = GatewayMetrics(factory: GatewayMetricsFactory(registry: registry))
        metrics.flow.roundTrip.recordSeconds(45)
        var bytes: [UInt8] = []
        registry.emit(into: &bytes)
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init)
        let typed = lines.filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
        #expect(typed.count >= Self.contractFamilies.count)
        for family in typed {
            #expect(lines.contains { $0.hasPrefix("# HELP \(family) ") && $0.count > "# HELP \(family) ".count })
        }
        // A 45 s round trip lands in the 60 s bucket, not only in +Inf.
        #expect(lines.contains("token_gateway_trigger_round_trip_seconds_bucket{le=\"30.0\"} 0"))
        #expect(lines.contains("token_gateway_trigger_round_trip_seconds_bucket{le=\"60.0\"} 1"))
    }
}
