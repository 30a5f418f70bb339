import FlowEngine
import Metrics
import Synchronization

/// The gateway's HTTP-level metric handles (contract §6); the flow's own are in ``FlowMetrics``.
public final class GatewayMetrics: Sendable {
    let factory: any MetricsFactory
    public let flow: FlowMetrics
    /// `token_gateway_user_exchanges_total{outcome}`.
    public let userExchanges: UserExchangeMetrics
    /// A route template and status: the key of the request counters (no string is built per request).
    private struct RequestKey: Hashable {
        let route: String
        let status: Int
    }
    private let requestCounters = Mutex<[RequestKey: Counter]>([:])
    private let fitCounters = Mutex<[String: Counter]>([:])
    private let callerAuthenticationCounters = Mutex<[String: Counter]>([:])
    /// `token_gateway_undecryptable_secrets_total{kind}`: stored secrets no key of the ring opens
    /// (a key removed too early, or a value copied under another key), by kind.
    let undecryptableSecrets: [String: Counter]
    /// `token_gateway_audit_records_dropped_total`: audit records dropped because the audit
    /// buffer was full (``AuditBuffer``).
    public let auditRecordsDropped: Counter
    /// `token_gateway_http_idle_connections_closed_total`: client connections closed because they
    /// sent nothing for `TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS` while no answer was due to them.
    public let idleConnectionsClosed: Counter

    public init(factory: any MetricsFactory) {
        self.factory = factory
        self.undecryptableSecrets = Dictionary(
            uniqueKeysWithValues: GatewayStore.SecretKind.allCases.map { kind in
                (
                    kind.rawValue,
                    Counter(
                        label: "token_gateway_undecryptable_secrets_total", dimensions: [("kind", kind.rawValue)],
                        factory: factory)
                )
            })
        self.auditRecordsDropped = Counter(label: "token_gateway_audit_records_dropped_total", factory: factory)
        self.idleConnectionsClosed = Counter(
            label: "token_gateway_http_idle_connections_closed_total", factory: factory)
        self.flow = FlowMetrics(factory: factory)
        self.userExchanges = UserExchangeMetrics(factory: factory)
        self.flow.circuitsOpen.set(0)
        self.flow.leasesHeld.set(0)
        self.flow.announcementsHeard.set(0)
        _ = Counter(label: "token_gateway_store_errors_total", factory: factory)
        // Every contract family is on the first scrape (contract §6): one series of each labelled
        // family that is otherwise made on first use, the one the first scrape and the first Forge
        // call move.
        self.countRequest(route: "/metrics", status: 200, by: 0)
        self.countInvocationToken(outcome: "success", by: 0)
        self.countCallerAuthenticationFailure(route: "/v1/installations/{id}/token", by: 0)
    }

    /// Counts one stored secret that did not open.
    public func countUndecryptable(_ kind: GatewayStore.SecretKind) {
        self.undecryptableSecrets[kind.rawValue]?.increment()
    }

    /// Counts one HTTP answer; `route` is a route template (bounded), never a concrete path.
    public func countRequest(route: String, status: Int, by amount: Int64 = 1) {
        let key = RequestKey(route: route, status: status)
        let counter = self.requestCounters.withLock { cache -> Counter in
            if let c = cache[key] { return c }
            let c = Counter(
                label: "token_gateway_http_requests_total", dimensions: [("route", route), ("status", String(status))],
                factory: self.factory)
            cache[key] = c
            return c
        }
        if amount > 0 { counter.increment(by: amount) }
    }

    /// Counts one answer 401 to a caller credential (`token_gateway_caller_authentication_failures_total{route}`):
    /// a caller route's Bearer secret, `/oauth/token`'s client authentication or the status page's
    /// Basic credential was missing or wrong. `route` is a route template.
    public func countCallerAuthenticationFailure(route: String, by amount: Int64 = 1) {
        Self.count(
            in: self.callerAuthenticationCounters, "token_gateway_caller_authentication_failures_total",
            ("route", route), by: amount, factory: self.factory)
    }

    /// Counts one Forge invocation token verification by outcome (`success` or a fixed reason word).
    public func countInvocationToken(outcome: String, by amount: Int64 = 1) {
        Self.count(
            in: self.fitCounters, "token_gateway_invocation_token_verifications_total", ("outcome", outcome),
            by: amount, factory: self.factory)
    }

    /// Adds `amount` to the counter `label{dimension}`, made on first use and kept in `cache` by the
    /// dimension's value (bounded: route templates, fixed words).
    private static func count(
        in cache: borrowing Mutex<[String: Counter]>, _ label: String, _ dimension: (String, String), by amount: Int64,
        factory: any MetricsFactory
    ) {
        let counter = cache.withLock { cache -> Counter in
            if let c = cache[dimension.1] { return c }
            let c = Counter(label: label, dimensions: [dimension], factory: factory)
            cache[dimension.1] = c
            return c
        }
        if amount > 0 { counter.increment(by: amount) }
    }
}
