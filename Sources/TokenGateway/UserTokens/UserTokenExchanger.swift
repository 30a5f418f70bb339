import FlowEngine
import Logging
import ServiceLifecycle
import Synchronization

/// User tokens (offline user impersonation, contract §2 `?asUser=`): serves a cached user token
/// or exchanges the installation's system token for one, once per user however many callers ask,
/// on however many processes.
///
/// A request reads the cache, a remembered refusal and the installation's state in one Redis
/// round trip. On a miss it joins this process's *flight* for that installation and user, or
/// starts one. A flight takes the user's exchange lease in the ``UserTokenStore``; the process
/// that wins exchanges, the others follow: they read the store again when it announces a change
/// of that user (the winner stored the token, recorded a refusal or let the lease go) or when the
/// winner's lease runs out, and take the lease themselves when it is gone without an answer. The
/// winner, per attempt: gets the system token (``SystemTokenSource``: the token flow's cache or a
/// round trip), counts one exchange against the app-wide budget shared in the store, calls the
/// GraphQL endpoint, and
/// - on a token: caches it sealed until shortly before its expiry and answers every waiter;
/// - on a refusal: remembers it for ``Configuration/denialMemory`` (403 without a call meanwhile);
/// - on 401: fetches a fresh system token once and tries again once;
/// - on 429: holds every replica back for Atlassian's `Retry-After` (429 `rate_limited`);
/// - on 5xx, a transport error or a timeout: retries with capped, jittered backoff (``Backoff``)
///   while the flight's deadline allows.
///
/// A flight's deadline is the latest deadline of the callers waiting on it; each caller also
/// gives up at its own deadline (504 `token_timeout`). A caller that goes away leaves the flight
/// running for the others.
///
/// The decisions of a flight are ``UserExchangeStateMachine``'s; this type runs its actions, each
/// as a child task of ``run()`` (a `Service` of the gateway), so shutdown awaits them all.
public final class UserTokenExchanger: Sendable, Service {
    /// Knobs of the exchange. Every default is documented.
    public struct Configuration: Sendable {
        /// The GraphQL endpoint. Default Atlassian's, `https://api.atlassian.com/graphql`.
        public var graphQLURL: String = "https://api.atlassian.com/graphql"
        /// Exchanges allowed per ``budgetWindow`` across every replica. Default 1000.
        public var exchangesPerMinute: Int = 1000
        /// The window of the budget. Default 60 s.
        public var budgetWindow: Duration = .seconds(60)
        /// Names the shared budget in Redis; the app id (Atlassian counts per app). Default `app`.
        public var budgetScope: String = "app"
        /// Exchange calls per flight, retries included (a fresh-system-token retry included). Default 4.
        public var maxAttempts: Int = 4
        /// Longest wait for one exchange call (bounded by the deadline). Default 10 s.
        public var attemptTimeout: Duration = .seconds(10)
        /// First retry delay; doubles per retry up to ``backoffCap``, with jitter. Default 100 ms.
        public var backoffBase: Duration = .milliseconds(100)
        /// Longest retry delay. Default 2 s.
        public var backoffCap: Duration = .seconds(2)
        /// How long a refusal is remembered (no call for that user meanwhile). Default 60 s.
        public var denialMemory: Duration = .seconds(60)
        /// A user token leaves the cache this long before its expiry. Default 60 s.
        public var cacheMargin: Duration = .seconds(60)
        /// Seconds the system token must still be valid for when it is used. Default 60.
        public var systemTokenMinValidity: Int64 = 60
        /// How long the exchange lease outlives the flight's deadline. Default 2 s.
        public var leaseGrace: Duration = .seconds(2)
        /// The hold after a 429 that came without a readable `Retry-After`. Default 60 s (one budget window).
        public var defaultRetryAfter: Duration = .seconds(60)

        /// Callers of one installation that may wait for user tokens in this process at once;
        /// more get `overloaded` (503). Default 1000.
        public var maxWaitersPerInstallation: Int = 1000
        /// Callers that may wait for user tokens in this process at once. Default 10,000.
        public var maxWaiters: Int = 10_000

        public init() {}

        var machine: UserExchangeStateMachine.Configuration {
            UserExchangeStateMachine.Configuration(
                maxAttempts: self.maxAttempts, attemptTimeout: self.attemptTimeout, backoffBase: self.backoffBase,
                backoffCap: self.backoffCap, leaseGrace: self.leaseGrace, denialMemory: self.denialMemory,
                defaultRetryAfter: self.defaultRetryAfter)
        }

        /// The settings of a gateway: its GraphQL URL, budget and app id.
        public init(gateway: GatewayConfiguration) {
            self.graphQLURL = gateway.forgeGraphQLURL
            self.exchangesPerMinute = gateway.userExchangesPerMinute
            self.budgetScope = gateway.forgeAppID
            self.maxWaitersPerInstallation = gateway.flow.maxWaitersPerInstallation
            self.maxWaiters = gateway.flow.maxWaiters
        }
    }

    /// Options of one user-token request.
    public struct Request: Sendable {
        /// Seconds a cached token must still be valid for (a freshly exchanged one is returned as it is).
        public var minValidity: Int64
        /// The caller's patience: system token and exchange together.
        public var timeout: Duration
        /// Ignore the cache and exchange (still coalesced with an exchange already in flight).
        public var forceRefresh: Bool

        public init(minValidity: Int64 = 300, timeout: Duration = .seconds(10), forceRefresh: Bool = false) {
            self.minValidity = minValidity
            self.timeout = timeout
            self.forceRefresh = forceRefresh
        }
    }

    /// Where a user token handed to a caller came from (contract §2 `source`).
    public enum Source: String, Sendable, Hashable {
        /// The shared cache.
        case cache
        /// An exchange made for this request, or one it shared (on this process or another).
        case exchange
    }

    /// A user token for one caller.
    public struct Answer: Sendable, Hashable {
        public let token: AccessToken
        public let source: Source
        /// The installation's `apiBaseUrl`, when known.
        public let apiBaseUrl: String?
    }

    struct FlightKey: Hashable, Sendable {
        let installation: InstallationID
        let accountId: String
    }

    /// What a flight needs to know, fixed by the caller that started it.
    struct Job: Sendable {
        let installation: InstallationID
        let accountId: UserAccountID
        let context: SiteContext
        let apiBaseUrl: String?
        /// The cached token the starting caller refused (stale or forced away): not an answer.
        let ignoring: String?

        var key: FlightKey { FlightKey(installation: self.installation, accountId: self.accountId.value) }
    }

    typealias Outcome = Result<Answer, UserTokenError>

    /// One caller's place: waiting (its continuation once it is attached) or answered before it was.
    enum WaiterSlot {
        case waiting(CheckedContinuation<Outcome, Never>?)
        case answered(Outcome)
    }

    struct Flight: Sendable {
        /// Tells this flight's events from those of an earlier flight of the same user.
        let id: UInt64
        let job: Job
        var machine: UserExchangeStateMachine
        var waiters: Set<UInt64>
        /// Unique per flight: the lease's owner in the store.
        let owner: String
    }

    struct State: ~Copyable {
        var flights: [FlightKey: Flight] = [:]
        var slots: [UInt64: WaiterSlot] = [:]
        var nextID: UInt64 = 0
        /// Waiters over all flights, and per installation (the caps).
        var waiting = 0
        var waitingPerInstallation: [InstallationID: Int] = [:]
        var shuttingDown = false

        mutating func makeID() -> UInt64 {
            self.nextID += 1
            return self.nextID
        }

        mutating func countWaiter(_ installation: InstallationID, _ delta: Int) {
            self.waiting += delta
            let now = (self.waitingPerInstallation[installation] ?? 0) + delta
            self.waitingPerInstallation[installation] = now > 0 ? now : nil
        }

        /// Answers one waiter: resumes it, or keeps the answer until it attaches. Returns the
        /// continuation to resume (outside the lock).
        mutating func answer(_ waiterID: UInt64, _ outcome: Outcome) -> CheckedContinuation<Outcome, Never>? {
            switch self.slots[waiterID] {
            case .some(.waiting(let continuation?)):
                self.slots[waiterID] = nil
                return continuation
            case .some(.waiting(nil)):
                self.slots[waiterID] = .answered(outcome)
                return nil
            case .some(.answered), .none:
                return nil
            }
        }
    }

    typealias Work = @Sendable () async -> Void

    public let configuration: Configuration
    let store: any UserTokenStore
    let systemTokens: any SystemTokenSource
    let client: any UserTokenExchangeCall
    let metrics: UserExchangeMetrics
    let audit: AuditLog
    let logger: Logger
    let clock: any FlowClock
    let jitter: @Sendable () -> Double
    private let state = Mutex(State())
    /// Actions and timers for ``run()`` to start as child tasks.
    private let work: (stream: AsyncStream<Work>, continuation: AsyncStream<Work>.Continuation)

    /// - Parameters:
    ///   - store: the user-token cache, refusals, leases and budget.
    ///   - systemTokens: where system tokens come from (the token flow).
    ///   - client: the GraphQL exchange call.
    ///   - clock: the wall clock, and waiting for an instant of it; `jitter` draws from 0...1
    ///     (both injectable for tests).
    public init(
        configuration: Configuration, store: any UserTokenStore, systemTokens: any SystemTokenSource,
        client: any UserTokenExchangeCall, metrics: UserExchangeMetrics, audit: AuditLog, logger: Logger,
        clock: any FlowClock = SystemFlowClock(),
        jitter: @escaping @Sendable () -> Double = { Double.random(in: 0...1) }
    ) {
        self.configuration = configuration
        self.store = store
        self.systemTokens = systemTokens
        self.client = client
        self.metrics = metrics
        self.audit = audit
        self.logger = logger
        self.clock = clock
        self.jitter = jitter
        self.work = AsyncStream.makeStream(of: Work.self)
    }

    // MARK: - The facade

    /// A user token for `accountId` in `installation`: from the cache when one is valid for at
    /// least `request.minValidity` seconds (and no refresh is forced), else from one coalesced exchange.
    ///
    /// - Throws: ``UserTokenError``: `denied` (403), `rateLimited` (429), `exchangeFailed` (502),
    ///   or the flow's errors (404, 410, 422, 502 `trigger_failed`, 503, 504).
    ///
    /// `admit` runs once an exchange is needed (no usable cached token), before it is started or
    /// joined: the caller's own limits; what it throws is the answer.
    public func token(
        for installation: InstallationID, accountId: UserAccountID, request: Request,
        admit: @Sendable () async throws(UserTokenError) -> Void = {}
    )
        async throws(UserTokenError) -> Answer
    {
        let start = self.clock.now()
        let deadline = start + request.timeout
        let snapshot: UserTokenSnapshot
        do {
            snapshot = try await self.store.snapshot(
                installation, accountId: accountId.value, timeout: min(request.timeout, .seconds(2)))
        } catch {
            self.logger.warning(
                "store unavailable for user-token request",
                metadata: ["installation.id": "\(installation)", "error": "\(error)"])
            throw .storeUnavailable
        }
        guard snapshot.exists else { throw .flow(.installationNotFound) }
        guard snapshot.status == .active else { throw .flow(.installationUninstalled) }
        if !request.forceRefresh, let cached = snapshot.token,
            cached.expiresAt >= start.unixSeconds + request.minValidity
        {
            return Answer(token: cached, source: .cache, apiBaseUrl: snapshot.apiBaseUrl)
        }
        if snapshot.deniedFor != nil { throw .denied }
        guard let context = SiteContext(apiBaseUrl: snapshot.apiBaseUrl, cloudId: snapshot.cloudId) else {
            self.logger.warning(
                "installation has no known site; cannot exchange for a user token",
                metadata: ["installation.id": "\(installation)"])
            throw .exchangeFailed("the installation's site is unknown")
        }
        try await admit()
        let job = Job(
            installation: installation, accountId: accountId, context: context, apiBaseUrl: snapshot.apiBaseUrl,
            ignoring: snapshot.token?.value)
        return try await self.join(job, deadline: deadline).get()
    }

    // MARK: - Coalescing in this process

    /// Waits for the flight of `job`'s user (starting it when there is none) until `deadline` or
    /// until the calling task is cancelled; the flight goes on for the others.
    private func join(_ job: Job, deadline: FlowTime) async -> Outcome {
        guard let waiterID = self.register(job, deadline: deadline) else { return .failure(.flow(.overloaded)) }
        return await withTaskGroup(of: Outcome?.self) { group in
            group.addTask { await self.outcome(of: waiterID) }
            group.addTask {
                try? await self.clock.sleep(until: deadline)
                return nil
            }
            while let next = await group.next() {
                if let outcome = next {
                    group.cancelAll()
                    return outcome
                }
                // The deadline passed, or the caller went away: leave the flight.
                self.leave(job.key, waiterID, with: .failure(Task.isCancelled ? .flow(.cancelled) : .timeout))
            }
            return .failure(.timeout)
        }
    }

    /// Adds a waiter to the user's flight, starting the flight when there is none. Nil when the
    /// waiter caps are reached; a waiter answered at once when the process shuts down.
    private func register(_ job: Job, deadline: FlowTime) -> UInt64? {
        let key = job.key
        let configuration = self.configuration
        let now = self.clock.now()
        let started = self.state.withLock { s -> (UInt64, (UInt64, [UserExchangeAction])?)? in
            guard s.waiting < configuration.maxWaiters,
                (s.waitingPerInstallation[key.installation] ?? 0) < configuration.maxWaitersPerInstallation
            else { return nil }
            let waiterID = s.makeID()
            if s.shuttingDown {
                s.slots[waiterID] = .answered(.failure(.flow(.shuttingDown)))
                return (waiterID, nil)
            }
            s.slots[waiterID] = .waiting(nil)
            s.countWaiter(key.installation, 1)
            if s.flights[key] != nil {
                s.flights[key]!.waiters.insert(waiterID)
                s.flights[key]!.machine.deadlineExtended(to: deadline)
                return (waiterID, nil)
            }
            let flightID = s.makeID()
            var machine = UserExchangeStateMachine(
                configuration: configuration.machine, deadline: deadline, ignoring: job.ignoring,
                apiBaseUrl: job.apiBaseUrl)
            let actions = machine.start(now: now)
            s.flights[key] = Flight(
                id: flightID, job: job, machine: machine, waiters: [waiterID],
                owner: "ux_" + String(flightID, radix: 36) + "_" + String(UInt64.random(in: 0...UInt64.max), radix: 36))
            return (waiterID, (flightID, actions))
        }
        guard let (waiterID, start) = started else { return nil }
        if let (flightID, actions) = start { self.perform(key, flightID, actions) }
        return waiterID
    }

    /// The waiter's answer, once there is one.
    private func outcome(of waiterID: UInt64) async -> Outcome {
        await withCheckedContinuation { (continuation: CheckedContinuation<Outcome, Never>) in
            let ready = self.state.withLock { s -> Outcome? in
                if case .answered(let outcome) = s.slots[waiterID] {
                    s.slots[waiterID] = nil
                    return outcome
                }
                s.slots[waiterID] = .waiting(continuation)
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// One waiter stops waiting (its deadline, or it went away); the flight goes on for the others.
    private func leave(_ key: FlightKey, _ waiterID: UInt64, with outcome: Outcome) {
        let continuation = self.state.withLock { s -> CheckedContinuation<Outcome, Never>? in
            if s.flights[key]?.waiters.remove(waiterID) != nil { s.countWaiter(key.installation, -1) }
            return s.answer(waiterID, outcome)
        }
        continuation?.resume(returning: outcome)
    }

    /// The flight ended: answer everyone still waiting.
    private func land(_ key: FlightKey, _ flightID: UInt64, _ outcome: Outcome) {
        let continuations = self.state.withLock { s -> [CheckedContinuation<Outcome, Never>] in
            guard let flight = s.flights[key], flight.id == flightID else { return [] }
            s.flights[key] = nil
            s.countWaiter(key.installation, -flight.waiters.count)
            var continuations: [CheckedContinuation<Outcome, Never>] = []
            for waiterID in flight.waiters {
                if let continuation = s.answer(waiterID, outcome) { continuations.append(continuation) }
            }
            return continuations
        }
        for continuation in continuations { continuation.resume(returning: outcome) }
    }

    // MARK: - Running the machine

    /// Feeds one event to the flight's machine (when it is still the flight `flightID`) and runs
    /// what it asks for.
    private func handle(
        _ key: FlightKey, _ flightID: UInt64, _ event: (inout UserExchangeStateMachine) -> [UserExchangeAction]
    ) {
        let actions = self.state.withLock { s -> [UserExchangeAction] in
            guard s.flights[key]?.id == flightID else { return [] }
            return event(&s.flights[key]!.machine)
        }
        self.perform(key, flightID, actions)
    }

    private func perform(_ key: FlightKey, _ flightID: UInt64, _ actions: [UserExchangeAction]) {
        guard !actions.isEmpty, let flight = self.state.withLock({ $0.flights[key] }), flight.id == flightID else {
            return
        }
        for action in actions {
            switch action {
            case .finish(let outcome):
                self.land(key, flightID, outcome)
            case .recordOutcome(let outcome):
                self.metrics.count(outcome: outcome)
            default:
                self.work.continuation.yield { await self.execute(action, flight) }
            }
        }
    }

    /// Runs one action of `flight` and feeds its answer back.
    private func execute(_ action: UserExchangeAction, _ flight: Flight) async {
        let job = flight.job
        let key = job.key
        let account = job.accountId.value
        switch action {
        case .acquireLease(let ttl):
            do {
                let won = try await self.store.acquireLease(
                    job.installation, accountId: account, owner: flight.owner, ttl: ttl)
                self.handle(key, flight.id) { $0.leaseAnswered(won: won, now: self.clock.now()) }
            } catch {
                self.handle(key, flight.id) { $0.storeFailed() }
            }
        case .extendLease(let ttl):
            _ = try? await self.store.extendLease(job.installation, accountId: account, owner: flight.owner, ttl: ttl)
        case .releaseLease:
            _ = try? await self.store.releaseLease(job.installation, accountId: account, owner: flight.owner)
            self.handle(key, flight.id) { $0.leaseReleased() }
        case .readStore:
            do {
                let snapshot = try await self.store.snapshot(job.installation, accountId: account, timeout: nil)
                self.handle(key, flight.id) { $0.storeRead(snapshot, now: self.clock.now()) }
            } catch {
                self.handle(key, flight.id) { $0.storeFailed() }
            }
        case .fetchSystemToken(let forceRefresh, let timeout):
            await self.fetchSystemToken(flight, forceRefresh: forceRefresh, timeout: timeout)
        case .admit:
            await self.admit(flight)
        case .exchange(let systemToken, let attempt, let timeout):
            await self.exchange(flight, systemToken: systemToken, attempt: attempt, timeout: timeout)
        case .keep(let value, let ttl):
            let outcome = await self.keep(job, value: value, ttl: ttl, logger: self.logger(for: job))
            self.handle(key, flight.id) { $0.tokenKept(outcome) }
        case .rememberDenial(let duration):
            do {
                try await self.store.rememberDenial(job.installation, accountId: account, for: duration)
            } catch {
                self.logger(for: job).warning("could not remember the refusal", metadata: ["error": "\(error)"])
            }
            self.handle(key, flight.id) { $0.recorded() }
        case .blockExchanges(let duration):
            do {
                try await self.store.blockExchanges(scope: self.configuration.budgetScope, for: duration)
            } catch {
                self.logger(for: job).warning("could not record the rate limit", metadata: ["error": "\(error)"])
            }
            self.handle(key, flight.id) { $0.recorded() }
        case .scheduleTimer(let id, let deadline):
            guard (try? await self.clock.sleep(until: deadline)) != nil else { return }
            self.handle(key, flight.id) { $0.timerFired(id, now: self.clock.now()) }
        case .finish, .recordOutcome:
            return
        }
    }

    private func logger(for job: Job) -> Logger {
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(job.installation)"
        logger[metadataKey: "account.id"] = "\(job.accountId.value)"
        return logger
    }

    private func fetchSystemToken(_ flight: Flight, forceRefresh: Bool, timeout: Duration) async {
        if forceRefresh {
            self.logger(for: flight.job).notice("the exchange refused the system token; fetching a fresh one")
        }
        let result: Result<AccessToken, FlowError>
        do {
            result = .success(
                try await self.systemTokens.systemToken(
                    for: flight.job.installation, minValidity: self.configuration.systemTokenMinValidity,
                    timeout: timeout, forceRefresh: forceRefresh))
        } catch {
            self.logger(for: flight.job).notice(
                "no system token for the exchange", metadata: ["error.code": "\(error.code.rawValue)"])
            result = .failure(error)
        }
        self.handle(flight.job.key, flight.id) { $0.systemTokenArrived(result, now: self.clock.now()) }
    }

    private func admit(_ flight: Flight) async {
        do {
            let admission = try await self.store.admitExchange(
                scope: self.configuration.budgetScope, limit: self.configuration.exchangesPerMinute,
                window: self.configuration.budgetWindow, now: self.clock.now())
            if case .refused(let retryAfter) = admission {
                self.logger(for: flight.job).notice(
                    "user-token exchange held back by the shared budget",
                    metadata: ["retry.after_ms": "\(retryAfter.milliseconds)"])
            }
            self.handle(flight.job.key, flight.id) { $0.admission(admission, now: self.clock.now()) }
        } catch {
            self.handle(flight.job.key, flight.id) { $0.storeFailed() }
        }
    }

    private func exchange(_ flight: Flight, systemToken: AccessToken, attempt: Int, timeout: Duration) async {
        let job = flight.job
        let logger = self.logger(for: job)
        logger.debug("exchanging for a user token", metadata: ["exchange.attempt": "\(attempt)"])
        let outcome = await self.client.exchange(
            systemToken: systemToken.value, context: job.context, accountId: job.accountId, timeout: timeout)
        switch outcome {
        case .token, .systemTokenRefused:
            break
        case .denied(let message):
            logger.notice("Atlassian refused a user token", metadata: ["exchange.message": "\(message ?? "-")"])
        case .rateLimited(let retryAfter):
            logger.warning(
                "Atlassian rate-limited user-token exchanges; holding every replica back",
                metadata: ["retry.after_ms": "\(retryAfter.map { String($0.milliseconds) } ?? "-")"])
        case .failed(let failure):
            logger.notice(
                "user-token exchange attempt failed",
                metadata: ["exchange.attempt": "\(attempt)", "exchange.outcome": "\(failure.outcome)"])
        }
        self.handle(job.key, flight.id) { $0.exchanged(outcome, now: self.clock.now(), jitter: self.jitter()) }
    }

    /// Caches a freshly exchanged token (best effort) and records it in the audit log.
    private func keep(_ job: Job, value: String, ttl: Int64?, logger: Logger) async -> Outcome {
        let now = self.clock.now()
        let expiresAt: Int64
        if let exp = TokenClaims.expiry(of: value) {
            expiresAt = exp
        } else if let ttl {
            expiresAt = now.unixSeconds + ttl
        } else {
            logger.warning("the exchange answered a token with neither exp nor ttl")
            return .failure(.exchangeFailed("malformed answer"))
        }
        guard expiresAt > now.unixSeconds else {
            logger.warning("the exchange answered an expired token")
            return .failure(.exchangeFailed("malformed answer"))
        }
        let token = AccessToken(value: value, expiresAt: expiresAt)
        var stored = false
        do {
            let outcome = try await self.store.store(
                job.installation, accountId: job.accountId.value, token: token,
                cacheUntil: expiresAt - self.configuration.cacheMargin.nanoseconds / 1_000_000_000, now: now)
            switch outcome {
            case .stored: stored = true
            case .tooShortLived: stored = false
            case .uninstalled: return .failure(.flow(.installationUninstalled))
            }
        } catch {
            // The caller still gets its token; the next request exchanges again.
            logger.warning("could not cache the user token", metadata: ["error": "\(error)"])
        }
        self.audit.tokenReceived(
            installation: job.installation, kind: "user_exchange", expiresAt: expiresAt, token: value, stored: stored,
            requestID: nil, accountId: job.accountId.value)
        return .success(Answer(token: token, source: .exchange, apiBaseUrl: job.apiBaseUrl))
    }

    // MARK: - Service

    /// Runs every action and timer of every flight as a child task, and wakes followers on the
    /// store's notices, until graceful shutdown (or cancellation); then fails the callers still
    /// waiting and, once every child task has ended, releases the leases this process holds.
    public func run() async throws {
        let held = await withDiscardingTaskGroup(returning: [Flight].self) { group in
            group.addTask { await self.store.watch { self.noticed($0) } }
            await withGracefulShutdownHandler {
                for await work in self.work.stream {
                    group.addTask { await work() }
                }
            } onGracefulShutdown: {
                self.logger.info("user-token exchanges draining")
                self.work.continuation.finish()
            }
            let held = self.endFlights()
            group.cancelAll()
            return held
        }
        for flight in held {
            _ = try? await self.store.releaseLease(
                flight.job.installation, accountId: flight.job.accountId.value, owner: flight.owner)
        }
    }

    /// Wakes the flights a notice concerns.
    func noticed(_ notice: UserTokenNotice) {
        let concerned = self.state.withLock { s -> [(FlightKey, UInt64)] in
            switch notice {
            case .user(let id, let accountId):
                let key = FlightKey(installation: id, accountId: accountId)
                return s.flights[key].map { [(key, $0.id)] } ?? []
            case .uninstalled(let id):
                return s.flights.compactMap { key, flight in key.installation == id ? (key, flight.id) : nil }
            case .resync:
                return s.flights.map { key, flight in (key, flight.id) }
            }
        }
        for (key, flightID) in concerned { self.handle(key, flightID) { $0.noticed() } }
    }

    /// Ends every flight still in the air, answering its callers (503 `shutting_down`); later
    /// callers get the same. Returns the flights whose lease is still to be released.
    private func endFlights() -> [Flight] {
        self.work.continuation.finish()
        let ended = self.state.withLock { s -> [(Flight, [UserExchangeAction])] in
            s.shuttingDown = true
            var ended: [(Flight, [UserExchangeAction])] = []
            for key in Array(s.flights.keys) {
                let actions = s.flights[key]!.machine.shutdownRequested()
                ended.append((s.flights[key]!, actions))
            }
            return ended
        }
        var held: [Flight] = []
        for (flight, actions) in ended {
            for action in actions {
                if case .finish(let outcome) = action { self.land(flight.job.key, flight.id, outcome) }
                if case .releaseLease = action { held.append(flight) }
            }
        }
        return held
    }
}
