import CoreMetrics
import Prometheus

/// The metrics backend of a gateway: swift-prometheus's registry, with a `# HELP` line for every
/// family the gateway exports and histogram buckets that reach the longest waits the settings
/// allow (60 s), where swift-prometheus's defaults stop at 10 s.
///
/// swift-metrics' factory interface has no place for help text, and swift-prometheus's factory
/// registers every family without one; this one looks the text up by family name and registers
/// through the registry's own `help:` calls. A name without an entry gets none. The registry
/// requires one text per family, so every handle of a gateway's registry must come from this
/// factory (``Gateway/bootstrapMetrics()`` installs it as the process-wide backend too).
public struct GatewayMetricsFactory: MetricsFactory {
    let base: PrometheusMetricsFactory
    var registry: PrometheusCollectorRegistry { self.base.registry }

    /// Duration buckets: swift-prometheus's defaults (5 ms to 10 s) and 30 s and 60 s, the longest
    /// caller deadline (30 s) and trigger attempt timeout (60 s) allowed.
    static let durationBuckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        .seconds(30), .seconds(60),
    ]

    public init(registry: PrometheusCollectorRegistry) {
        var base = PrometheusMetricsFactory(registry: registry)
        base.defaultDurationHistogramBuckets = Self.durationBuckets
        self.base = base
    }

    /// The help text of a family, empty when it has none.
    static func help(_ name: String) -> String { Self.helpTexts[name] ?? "" }

    /// The family `label` with its help text (the whole label is the name: no unit is appended).
    private static func family(_ label: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: label, unitName: "", helpText: Self.help(label))
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        self.registry.makeCounter(descriptor: Self.family(label), labels: dimensions)
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)])
        -> any FloatingPointCounterHandler
    {
        self.registry.makeCounter(descriptor: Self.family(label), labels: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool)
        -> any RecorderHandler
    {
        guard aggregate else {
            return self.registry.makeGauge(descriptor: Self.family(label), labels: dimensions)
        }
        return self.registry.makeValueHistogram(
            descriptor: Self.family(label), labels: dimensions, buckets: self.base.defaultValueHistogramBuckets)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        self.registry.makeGauge(descriptor: Self.family(label), labels: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        self.registry.makeDurationHistogram(
            descriptor: Self.family(label), labels: dimensions, buckets: Self.durationBuckets)
    }

    public func destroyCounter(_ handler: any CounterHandler) { self.base.destroyCounter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        self.base.destroyFloatingPointCounter(handler)
    }
    public func destroyRecorder(_ handler: any RecorderHandler) { self.base.destroyRecorder(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { self.base.destroyMeter(handler) }
    public func destroyTimer(_ handler: any TimerHandler) { self.base.destroyTimer(handler) }

    /// One line per family, as `Docs/operations.md` "Metrics" describes it at more length.
    static let helpTexts: [String: String] = [
        "token_gateway_http_requests_total": "HTTP answers, by route template and status.",
        "token_gateway_token_requests_total":
            "Answered system-token requests, by where the token came from and how the request ended.",
        "token_gateway_trigger_attempts_total":
            "Trigger calls this replica sent, by how they ended (success: the delivery arrived).",
        "token_gateway_trigger_retries_total": "Trigger attempts after the first of a round trip.",
        "token_gateway_trigger_round_trip_seconds": "From sending a trigger call to its 2xx answer.",
        "token_gateway_caller_wait_seconds": "How long token requests waited for their answer, cache hits included.",
        "token_gateway_coalesced_waiters_total":
            "Token requests that joined a round trip already in flight in this replica.",
        "token_gateway_tokens_received_total":
            "Tokens delivered by Forge: solicited (answered a pending request) or pushed.",
        "token_gateway_store_errors_total":
            "Redis commands that failed because the store cannot serve: unreachable, too slow, or refusing (OOM, NOPERM, READONLY, CLUSTERDOWN, LOADING...).",
        "token_gateway_audit_records_dropped_total":
            "Audit records dropped because the audit buffer was full. Should stay 0.",
        "token_gateway_circuits_open": "Circuits this replica opened whose open window has not ended.",
        "token_gateway_leases_held": "Round-trip leases this replica holds (round trips it leads now).",
        "token_gateway_store_announcements_heard":
            "1 while this replica hears the other replicas' announcements through Redis, 0 while not (every caller then reads Redis).",
        "token_gateway_same_token_round_trips_total":
            "Round trips whose delivery was not newer than the stored token, by what the callers got.",
        "token_gateway_round_trips_held_total": "Round trips a same-token hold kept from starting, by kind.",
        "token_gateway_invocation_token_verifications_total":
            "Forge invocation token verifications on the /forge routes, by outcome.",
        "token_gateway_user_exchanges_total": "User-token exchange calls to Atlassian, by how they ended.",
        "token_gateway_undecryptable_secrets_total":
            "Sealed values read from Redis that no key of the ring opens, by kind. Should stay 0.",
        "token_gateway_overloaded_requests_total":
            "Token requests (system and user tokens) refused with 503 overloaded because too many callers waited.",
        "token_gateway_invocations_total": "Named-trigger calls, by how they ended.",
        "token_gateway_invocation_duration_seconds": "Time spent calling a named trigger (all attempts).",
        "token_gateway_memory_returned_bytes_total": "Resident memory given back to the system by the heap trim.",
        "token_gateway_http_idle_connections_closed_total":
            "Client connections closed because they sent nothing for the idle timeout while no answer was due.",
        "token_gateway_resident_memory_bytes": "The replica's resident memory, updated at each heap trim.",
        "token_gateway_caller_authentication_failures_total":
            "Answers 401 to a missing or wrong caller credential (caller routes, /oauth/token, the status page), by route.",
    ]
}
