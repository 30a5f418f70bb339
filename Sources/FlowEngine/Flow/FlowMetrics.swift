import Metrics

/// The flow's metric handles (contract §6), created once. Label values are fixed words only.
public struct FlowMetrics: Sendable {
    let factory: any MetricsFactory
    let tokenRequests: [String: Counter]
    /// The `outcome="success"` counters of ``tokenRequests`` by source, resolved once (the answer
    /// path counts without building a key).
    let tokenRequestSuccesses: [Counter?]
    let triggerAttempts: [String: Counter]
    public let triggerRetries: Counter
    public let roundTrip: Metrics.Timer
    public let callerWait: Metrics.Timer
    public let coalescedWaiters: Counter
    /// `token_gateway_overloaded_requests_total`: callers refused because too many already wait.
    public let overloadedRequests: Counter
    public let tokensReceivedSolicited: Counter
    public let tokensReceivedPushed: Counter
    public let leasesHeld: Meter
    /// Circuits this process opened that have not closed again.
    public let circuitsOpen: Meter
    /// `token_gateway_store_announcements_heard`: 1 while the store's announcements are
    /// subscribed to, 0 while the subscription is lost or refused (every caller reads the store).
    public let announcementsHeard: Meter
    /// `token_gateway_same_token_round_trips_total{outcome}` and
    /// `token_gateway_round_trips_held_total{kind}`, by ``HoldEvent``.
    let holdEvents: [HoldEvent: Counter]

    public init(factory: any MetricsFactory) {
        self.factory = factory
        var requests: [String: Counter] = [:]
        for source in ["cache", "trigger", "push", "none"] {
            for outcome in FlowMetrics.outcomes {
                requests["\(source)|\(outcome)"] = Counter(
                    label: "token_gateway_token_requests_total",
                    dimensions: [("source", source), ("outcome", outcome)],
                    factory: factory)
            }
        }
        self.tokenRequests = requests
        self.tokenRequestSuccesses = [TokenSource.cache, .trigger, .push].map { requests["\($0.rawValue)|success"] }
        var attempts: [String: Counter] = [:]
        for outcome in ["success", "http_error", "transport_error", "timeout", "no_delivery"] {
            attempts[outcome] = Counter(
                label: "token_gateway_trigger_attempts_total", dimensions: [("outcome", outcome)], factory: factory)
        }
        self.triggerAttempts = attempts
        self.triggerRetries = Counter(label: "token_gateway_trigger_retries_total", factory: factory)
        self.roundTrip = Metrics.Timer(label: "token_gateway_trigger_round_trip_seconds", factory: factory)
        self.callerWait = Metrics.Timer(label: "token_gateway_caller_wait_seconds", factory: factory)
        self.coalescedWaiters = Counter(label: "token_gateway_coalesced_waiters_total", factory: factory)
        self.overloadedRequests = Counter(label: "token_gateway_overloaded_requests_total", factory: factory)
        self.tokensReceivedSolicited = Counter(
            label: "token_gateway_tokens_received_total", dimensions: [("kind", "solicited")], factory: factory)
        self.tokensReceivedPushed = Counter(
            label: "token_gateway_tokens_received_total", dimensions: [("kind", "pushed")], factory: factory)
        self.leasesHeld = Meter(label: "token_gateway_leases_held", factory: factory)
        self.circuitsOpen = Meter(label: "token_gateway_circuits_open", factory: factory)
        self.announcementsHeard = Meter(label: "token_gateway_store_announcements_heard", factory: factory)
        var holds: [HoldEvent: Counter] = [:]
        for event in HoldEvent.allCases {
            switch event {
            case .sameTokenServed, .sameTokenExpiring:
                holds[event] = Counter(
                    label: "token_gateway_same_token_round_trips_total", dimensions: [("outcome", event.rawValue)],
                    factory: factory)
            case .requestHeld, .refreshAheadHeld:
                holds[event] = Counter(
                    label: "token_gateway_round_trips_held_total", dimensions: [("kind", event.rawValue)],
                    factory: factory)
            }
        }
        self.holdEvents = holds
    }

    /// Counts what a round-trip hold did.
    func countHold(_ event: HoldEvent) {
        self.holdEvents[event]?.increment()
    }

    /// Outcome words of `token_gateway_token_requests_total`: `success` or a contract error code.
    static let outcomes = [
        "success", "installation_not_found", "installation_uninstalled", "no_trigger_url", "token_timeout",
        "trigger_failed", "circuit_open", "store_unavailable", "cancelled", "shutting_down", "overloaded",
    ]

    /// Counts one answered token request.
    public func countTokenRequest(source: TokenSource?, outcome: String) {
        if outcome == "success", let source {
            let index: Int
            switch source {
            case .cache: index = 0
            case .trigger: index = 1
            case .push: index = 2
            }
            self.tokenRequestSuccesses[index]?.increment()
            return
        }
        self.tokenRequests["\(source?.rawValue ?? "none")|\(outcome)"]?.increment()
    }

    func countAttempt(outcome: String) {
        self.triggerAttempts[outcome]?.increment()
    }
}
