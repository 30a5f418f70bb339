import AsyncHTTPClient
import FlowEngine
import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

/// One gateway process: the Redis store, the token flow, Forge verification and the HTTP routes.
///
/// Build it from a ``GatewayConfiguration``, then run ``services`` in a `ServiceGroup` (or call
/// ``run(onServerRunning:)``, which does that and handles SIGTERM/SIGINT).
public final class Gateway: Sendable {
    public let configuration: GatewayConfiguration
    public let redis: RedisClient
    public let store: GatewayStore
    public let flow: TokenFlow
    public let httpClient: HTTPClient
    public let verifier: InvocationTokenVerifier
    /// User tokens (`?asUser=`): the cache and the coalesced exchange.
    public let userTokens: UserTokenExchanger
    /// Where user tokens are cached and their exchanges coordinated.
    public let userTokenStore: RedisUserTokenStore
    /// Verifies Connect signed installs; nil when no Connect base URL is configured.
    public let connectInstallVerifier: SignedInstallVerifier?
    public let registry: PrometheusCollectorRegistry
    public let metrics: GatewayMetrics
    public let logger: Logger
    /// Audit records: every token handed out and every token received.
    public let audit: AuditLog
    /// The buffer audit records pass through when they go to a standard stream; written by the
    /// ``AuditFlushService`` among ``services(onServerRunning:onOperationsServerRunning:)``.
    public let auditBuffer: AuditBuffer?
    /// The body bytes of answers from the cache, per installation (``TokenAnswerBodies``).
    let answerBodies = TokenAnswerBodies()
    /// Requests answered by ``FastAnswerHandler`` (for tests: which path answered).
    let fastAnswerCount = Atomic<Int>(0)
    /// Set when a graceful shutdown begins (``ShutdownNotice``): `/health/ready` answers 503 from
    /// then on, so a probe of the operations listener sees the replica going while it drains.
    let draining = Atomic<Bool>(false)
    /// The main listener's port once it is up (0 before): what OAuth discovery names when the
    /// configured port is 0 (any free port).
    let boundPort = Atomic<Int>(0)
    /// The store check of `GET /health/ready`, shared and reused for a second.
    let storeReadiness = ReadinessCheck()
    /// Keeps the log lines of refused requests to a few per message and 10 s.
    let refusalLog: LogThrottle
    /// When the graceful shutdown began (nil before).
    let drainBegan = Mutex<ContinuousClock.Instant?>(nil)
    public let replicaID: String
    /// Named-trigger calls (`POST …/invoke/{key}`): the signed HTTP call, the per-installation
    /// cap and the metrics.
    let namedTriggerInvoker: NamedTriggerInvoker
    let invocationLimiter: InvocationLimiter
    let invocationMetrics: InvocationMetrics
    /// Claims the `jti` of a Forge call's FIT when the call changes state.
    let replayGuard: InvocationReplayGuard
    /// Sends the auth-trigger calls of the flow; holds the opened trigger material.
    let triggerClient: HTTPTriggerClient
    /// Keeps this replica's heartbeat in the store (status page).
    public let heartbeat: ReplicaHeartbeat
    /// Gives freed heap memory back to the system now and then (``HeapTrimService``).
    public let heapTrim: HeapTrimService
    /// Logs `ready` once the listener is up and the store answers (``ReadinessNotice``).
    public let readiness: ReadinessNotice
    /// This build's version, shown in the replica heartbeat.
    public static let version = "1.1.0"

    /// - Parameters:
    ///   - configuration: the validated settings.
    ///   - logger: the root logger; components derive their own labels' metadata from it.
    ///   - registry: the Prometheus registry `/metrics` exposes (a new one by default).
    ///   - auditBufferCapacity: audit lines held at most before new ones are counted as dropped.
    public init(
        configuration: GatewayConfiguration, logger: Logger,
        registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
        auditBufferCapacity: Int = AuditBuffer.defaultCapacity
    ) {
        self.configuration = configuration
        self.refusalLog = LogThrottle(window: configuration.refusalLogWindow)
        self.logger = logger
        self.registry = registry
        self.metrics = GatewayMetrics(factory: GatewayMetricsFactory(registry: registry))
        (self.audit, self.auditBuffer) = Self.makeAudit(
            logger: logger, bufferCapacity: auditBufferCapacity, metrics: self.metrics)
        self.replicaID = "gw_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        self.httpClient = HTTPClient(
            eventLoopGroupProvider: .singleton, configuration: Self.outboundHTTPConfiguration())
        self.redis = RedisClient(
            configuration: configuration.redis, logger: logger, metricsFactory: self.metrics.factory,
            metricNames: RedisMetricNames(errors: "token_gateway_store_errors_total"))
        let metrics = self.metrics
        let refusedOrigins = RefusedAPIBaseURLOrigins(prefixes: configuration.apiBaseURLPrefixes, logger: logger)
        self.store = GatewayStore(
            redis: self.redis, box: configuration.encryptionKeys, prefix: configuration.storePrefix,
            routing: RoutingPolicy { refusedOrigins.allows($0) }
        ) { kind in
            metrics.countUndecryptable(kind)
        }
        let trigger = HTTPTriggerClient(
            store: self.store, httpClient: self.httpClient, allowList: configuration.triggerHosts, logger: logger)
        self.triggerClient = trigger
        self.namedTriggerInvoker = NamedTriggerInvoker(
            httpClient: self.httpClient, allowList: configuration.triggerHosts, configuration: configuration.invoke,
            logger: logger)
        self.invocationLimiter = InvocationLimiter(
            limit: configuration.invoke.maxConcurrencyPerInstallation, total: configuration.invoke.maxConcurrencyTotal)
        self.invocationMetrics = InvocationMetrics(factory: self.metrics.factory)
        self.flow = TokenFlow(
            configuration: configuration.flow, store: RedisTokenStore(store: self.store), trigger: trigger,
            metrics: self.metrics.flow,
            logger: logger, replicaID: self.replicaID,
            observer: RoundTripRecorder(store: self.store, replicaID: self.replicaID, logger: logger))
        let flow = self.flow
        self.heartbeat = ReplicaHeartbeat(
            store: self.store, replicaID: self.replicaID, version: Self.version, startedAt: FlowTime.now(),
            logger: logger, onTick: { flow.refreshOpenCircuits() })
        self.heapTrim = HeapTrimService(factory: self.metrics.factory, logger: logger)
        self.readiness = ReadinessNotice(redis: self.redis, logger: logger)
        // Only the configured JWKS is trusted: a staging app names the staging JWKS as its JWKS.
        var verifierConfiguration = InvocationTokenVerifier.Configuration(
            appId: configuration.forgeAppID, jwksURL: configuration.forgeJWKSURL)
        verifierConfiguration.allowedModuleKeys = configuration.forgeModuleKeys
        self.verifier = InvocationTokenVerifier(
            configuration: verifierConfiguration,
            httpClient: self.httpClient, logger: logger)
        self.replayGuard = InvocationReplayGuard(store: self.store)
        self.userTokenStore = RedisUserTokenStore(installations: self.store)
        self.userTokens = UserTokenExchanger(
            configuration: .init(gateway: configuration), store: self.userTokenStore, systemTokens: self.flow,
            client: OfflineUserAuthTokenClient(
                httpClient: self.httpClient, url: configuration.forgeGraphQLURL, logger: logger),
            metrics: self.metrics.userExchanges, audit: self.audit, logger: logger)
        if let connectBaseURL = configuration.connectBaseURL {
            var installConfiguration = SignedInstallVerifier.Configuration(
                appBaseURL: connectBaseURL, keysURL: configuration.connectKeysURL)
            installConfiguration.maximumCachedKeys = configuration.connectInstallKeysCached
            installConfiguration.keyFetchesPerMinute = configuration.connectInstallKeyFetchesPerMinute
            self.connectInstallVerifier = SignedInstallVerifier(
                configuration: installConfiguration,
                httpClient: self.httpClient, registry: self.store, logger: logger)
        } else {
            self.connectInstallVerifier = nil
        }
    }

    /// The audit log: the root logger's handler under the audit label, at info level. Records
    /// written to a stream go through a bounded buffer that a background service writes
    /// (``AuditFlushService``), so no request waits on write(2); that buffer is returned too.
    private static func makeAudit(
        logger: Logger, bufferCapacity: Int, metrics: GatewayMetrics
    ) -> (AuditLog, AuditBuffer?) {
        var auditHandler = logger.handler
        var auditBuffer: AuditBuffer? = nil
        if var structured = auditHandler as? GatewayLogHandler {
            structured.label = AuditLog.label
            if structured.sink.isStream {
                let buffer = AuditBuffer(
                    downstream: structured.sink, capacity: bufferCapacity, dropped: metrics.auditRecordsDropped)
                structured.sink = .buffered(buffer)
                auditBuffer = buffer
            }
            auditHandler = structured
        }
        let handler = auditHandler
        var auditLogger = Logger(label: AuditLog.label, factory: { _ in handler })
        auditLogger.logLevel = .info
        return (AuditLog(auditLogger: auditLogger), auditBuffer)
    }

    /// The HTTP application, bound to the configured host and port.
    public func makeApplication(
        onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        Application(
            router: self.makeRouter(),
            server: self.httpServer(health: self.configuration.operationsListener == nil, token: true),
            configuration: .init(
                address: .hostname(self.configuration.host, port: self.configuration.port),
                serverName: Self.serverName,
                availableConnectionsDelegate: MaximumAvailableConnections(self.configuration.maxConnections)),
            onServerRunning: onServerRunning,
            logger: self.logger)
    }

    /// The operations listener (health, metrics, operator pages) when `TOKEN_GATEWAY_OPS_PORT` is
    /// set, else nil.
    public func makeOperationsApplication(
        onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
    ) -> (any Service)? {
        guard let listener = self.configuration.operationsListener else { return nil }
        return Application(
            router: self.makeOperationsRouter(),
            server: self.httpServer(health: true, token: false),
            configuration: .init(
                address: .hostname(listener.host, port: listener.port), serverName: Self.serverName,
                availableConnectionsDelegate: MaximumAvailableConnections(self.configuration.maxConnections)),
            onServerRunning: onServerRunning,
            logger: self.logger)
    }

    /// Every long-lived part in start order; a `ServiceGroup` shuts them down in reverse, so the
    /// HTTP servers drain first, then user-token exchanges and the flow release their leases, then
    /// Redis and the HTTP client close.
    public func services(
        onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in },
        onOperationsServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
    ) -> [any Service] {
        var services: [any Service] = []
        // First, so it stops last: every audit record of the last requests is written.
        if let auditBuffer = self.auditBuffer { services.append(AuditFlushService(buffer: auditBuffer)) }
        services +=
            [
                HTTPClientService(client: self.httpClient), self.redis, self.flow, self.userTokens, self.heartbeat,
                self.heapTrim,
            ] as [any Service]
        if let operations = self.makeOperationsApplication(onServerRunning: onOperationsServerRunning) {
            services.append(operations)
        }
        let readiness = self.readiness
        let host = self.configuration.host
        services.append(
            self.makeApplication { [self] channel in
                self.boundPort.store(channel.localAddress?.port ?? 0, ordering: .relaxed)
                await onServerRunning(channel)
                readiness.listenerUp(host: host, port: channel.localAddress?.port ?? 0)
            })
        // Logs `ready` once the listener is up and the store answers.
        services.append(readiness)
        // Last, so it is told first: readiness fails before the listeners drain.
        services.append(ShutdownNotice(gateway: self))
        return services
    }

    /// Pins the threads of the event loops (the process-wide group that serves HTTP, Redis and the
    /// HTTP client) when `TOKEN_GATEWAY_EVENT_LOOP_AFFINITY` is `pinned`.
    func placeEventLoops() async throws {
        guard self.configuration.eventLoopAffinity == .pinned else { return }
        let cpus = try await EventLoopPinning.pin(MultiThreadedEventLoopGroup.singleton)
        self.logger.info(
            "event loops pinned", metadata: ["event_loops": "\(cpus.count)", "event_loops.cpus": "\(cpus)"])
    }

    /// Runs the gateway until SIGTERM or SIGINT, then shuts down gracefully.
    public func run(
        onServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in },
        onOperationsServerRunning: @escaping @Sendable (any Channel) async -> Void = { _ in }
    ) async throws {
        try await self.placeEventLoops()
        var configuration = ServiceGroupConfiguration(
            services: self.services(
                onServerRunning: onServerRunning, onOperationsServerRunning: onOperationsServerRunning
            ).map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: self.logger)
        // A drain that outlasts the timeout (a client that never sends the rest of its body) is
        // cut off: every service is cancelled, and still closes what it holds (the audit records
        // are written, the leases given back while Redis is there), and the process exits 0.
        configuration.maximumGracefulShutdownDuration = self.configuration.shutdownTimeout
        do {
            try await ServiceGroup(configuration: configuration).run()
        } catch  where self.draining.load(ordering: .relaxed) {
            // A service cancelled at the cut-off (or failing while it drained) ends with an error
            // of its own; the shutdown itself went on to the end.
            self.logger.notice("a service ended with an error during shutdown", metadata: ["error": "\(error)"])
        }
        if self.drainTimedOut {
            self.logger.warning(
                "graceful shutdown took longer than allowed; what was left was cut off",
                metadata: ["shutdown.timeout_ms": "\(Int(self.configuration.shutdownTimeout / .milliseconds(1)))"])
        }
    }

    /// Whether a graceful shutdown began and ran into ``GatewayConfiguration/shutdownTimeout``.
    private var drainTimedOut: Bool {
        guard let began = self.drainBegan.withLock({ $0 }) else { return false }
        // The notice is told a moment after the service group starts its own timer.
        return ContinuousClock.now - began >= self.configuration.shutdownTimeout - .milliseconds(100)
    }
}

/// Marks the gateway as shutting down when a graceful shutdown begins: the last of
/// ``Gateway/services(onServerRunning:onOperationsServerRunning:)``, so it is told first.
struct ShutdownNotice: Service {
    let gateway: Gateway

    func run() async throws {
        try await gracefulShutdown()
        self.gateway.drainBegan.withLock { $0 = .now }
        self.gateway.draining.store(true, ordering: .relaxed)
        self.gateway.logger.info("shutting down: draining the requests in flight")
    }
}

/// Keeps an `HTTPClient` open while the service group runs and shuts it down at the end.
public struct HTTPClientService: Service {
    let client: HTTPClient

    public init(client: HTTPClient) { self.client = client }

    public func run() async throws {
        try? await gracefulShutdown()
        try await self.client.shutdown()
    }
}

extension Gateway {
    /// Makes this gateway's Prometheus registry the process-wide metrics backend (call once, in `serve`).
    public func bootstrapMetrics() {
        MetricsSystem.bootstrap(GatewayMetricsFactory(registry: self.registry))
    }
}

extension Gateway {
    /// The outbound HTTP client's configuration: no redirect is followed, and no client span is
    /// made even when a tracer is bootstrapped. Such a span records the full URL (`url.full`), and a
    /// trigger URL is a secret (whoever has it can call the trigger); the trace context is still
    /// passed on by hand on every trigger call.
    public static func outboundHTTPConfiguration() -> HTTPClient.Configuration {
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(30))
        configuration.connectionPool = .init(idleTimeout: .seconds(60))
        configuration.tracing.tracer = nil
        return configuration
    }
}

/// The routing policy's check of an `apiBaseUrl` against `TOKEN_GATEWAY_API_BASE_URL_PREFIXES`,
/// with a warning the first time an origin (scheme and host, never the path) is refused: a staging
/// app or an emulator whose prefix is missing would otherwise see `apiBaseUrl: null` and no reason.
final class RefusedAPIBaseURLOrigins: Sendable {
    let prefixes: [String]
    let logger: Logger
    private let warned = Mutex<Set<String>>([])

    init(prefixes: [String], logger: Logger) {
        self.prefixes = prefixes
        self.logger = logger
    }

    func allows(_ url: String) -> Bool {
        if RoutingPolicy.hasAllowedPrefix(url, prefixes: self.prefixes) { return true }
        let components = URLComponents(string: url)
        let origin = "\(components?.scheme ?? "?")://\(components?.host ?? "?")"
        let first = self.warned.withLock { warned in
            guard warned.count < 100 else { return false }
            return warned.insert(origin).inserted
        }
        if first {
            self.logger.warning(
                "an installation's apiBaseUrl is outside TOKEN_GATEWAY_API_BASE_URL_PREFIXES: not stored or handed to callers",
                metadata: [
                    "api_base_url.origin": "\(origin)",
                    "api_base_url.prefixes": "\(self.prefixes.joined(separator: ","))",
                ])
        }
        return false
    }
}
