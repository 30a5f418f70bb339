import Metrics

/// `token_gateway_user_exchanges_total{outcome}` (contract §6): one count per exchange call made
/// to Atlassian, by how it ended, plus `budget_exhausted` for every exchange the shared budget
/// (or Atlassian's `Retry-After`) held back without a call; and user-token requests refused past
/// the waiter caps in `token_gateway_overloaded_requests_total`. Handles are created once.
public struct UserExchangeMetrics: Sendable {
    /// Every outcome word the counter is labelled with.
    public static let outcomes = [
        "success", "denied", "unauthorized", "rate_limited", "budget_exhausted", "http_error", "transport_error",
        "timeout", "invalid_response",
    ]

    private let counters: [String: Counter]
    /// `token_gateway_overloaded_requests_total`, shared with system-token requests.
    private let overloaded: Counter

    public init(factory: any MetricsFactory) {
        var counters: [String: Counter] = [:]
        for outcome in Self.outcomes {
            counters[outcome] = Counter(
                label: "token_gateway_user_exchanges_total", dimensions: [("outcome", outcome)], factory: factory)
        }
        self.counters = counters
        self.overloaded = Counter(label: "token_gateway_overloaded_requests_total", factory: factory)
    }

    /// Counts one user-token request refused because too many callers already wait.
    public func countOverloaded() {
        self.overloaded.increment()
    }

    /// Counts one exchange; `outcome` must be one of ``outcomes`` (anything else is dropped).
    public func count(outcome: String) {
        self.counters[outcome]?.increment()
    }
}
