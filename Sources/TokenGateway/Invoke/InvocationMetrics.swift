import Metrics

/// `token_gateway_invocations_total{outcome}` and `token_gateway_invocation_duration_seconds`
/// (named-trigger calls). Labels are fixed outcome words, never a trigger key or an installation.
public struct InvocationMetrics: Sendable {
    /// Every outcome word the counter is labelled with:
    /// - `success` / `http_error`: the trigger answered 2xx / another status, relayed;
    /// - `replayed`: the stored answer of an earlier call with the same `Idempotency-Key`;
    /// - `timeout`, `transport_error`, `invalid_answer`: the call failed (504, 502, 502);
    /// - `circuit_open`, `overloaded`, `not_found` (unknown or uninstalled installation, or no
    ///   trigger under the key), `store_unavailable`: refused before any call;
    /// - `invalid_request`: a bad `timeout`, `Idempotency-Key` or payload (400, 413), after the
    ///   caller's scope checks;
    /// - `internal_error`: a stored secret of the trigger (or a kept answer) that does not open.
    public static let outcomes = [
        "success", "http_error", "replayed", "timeout", "transport_error", "invalid_answer", "circuit_open",
        "overloaded", "not_found", "store_unavailable", "invalid_request", "internal_error",
    ]

    private let counters: [String: Counter]
    /// Time spent calling the trigger (all attempts of one invocation).
    public let duration: Metrics.Timer

    public init(factory: any MetricsFactory) {
        var counters: [String: Counter] = [:]
        for outcome in Self.outcomes {
            counters[outcome] = Counter(
                label: "token_gateway_invocations_total", dimensions: [("outcome", outcome)], factory: factory)
        }
        self.counters = counters
        self.duration = Metrics.Timer(label: "token_gateway_invocation_duration_seconds", factory: factory)
    }

    /// Counts one invocation; `outcome` must be one of ``outcomes`` (anything else is dropped).
    public func count(outcome: String) {
        self.counters[outcome]?.increment()
    }
}
