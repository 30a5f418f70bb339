import FlowEngine
import Logging
import Synchronization

/// User tokens (offline user impersonation, contract §2 `?asUser=`): serves a cached user token
/// or exchanges the installation's system token for one, once per user however many callers ask,
/// on however many processes.
///
/// A request reads the cache, a remembered refusal and the installation's state in one Redis
/// round trip. On a miss it joins this process's *flight* for that installation and user, or
/// starts one. A flight takes the user's exchange lease in Redis (`SET NX PX`); the process that
/// wins exchanges, the others follow by polling the cache with capped backoff until the winner
/// stores the token, records a refusal or lets the lease go (then they try to take it
/// themselves). The winner, per attempt: gets the system token from ``TokenFlow`` (cache or
/// round trip), counts one exchange against the app-wide budget shared in Redis, calls the
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
public final class UserTokenExchanger: Sendable {
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
        /// First poll interval while another process exchanges for the same user. Default 25 ms.
        public var pollInitial: Duration = .milliseconds(25)
        /// Longest poll interval. Default 500 ms.
        public var pollCap: Duration = .milliseconds(500)
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

    struct Waiter {
        let continuation: CheckedContinuation<Outcome, Never>
        var timer: Task<Void, Never>?
    }

    struct Flight {
        var waiters: [UInt64: Waiter]
        var deadline: FlowTime
    }

    struct State: ~Copyable {
        var flights: [FlightKey: Flight] = [:]
        var nextWaiter: UInt64 = 0
        /// Waiters over all flights, and per installation (the caps).
        var waiting = 0
        var waitingPerInstallation: [InstallationID: Int] = [:]

        mutating func countWaiter(_ installation: InstallationID, _ delta: Int) {
            self.waiting += delta
            let now = (self.waitingPerInstallation[installation] ?? 0) + delta
            self.waitingPerInstallation[installation] = now > 0 ? now : nil
        }
    }

    public let configuration: Configuration
    let store: GatewayStore
    let flow: TokenFlow
    let client: OfflineUserAuthTokenClient
    let metrics: UserExchangeMetrics
    let audit: AuditLog
    let logger: Logger
    let now: @Sendable () -> FlowTime
    private let state = Mutex(State())

    /// - Parameters:
    ///   - flow: where system tokens come from.
    ///   - client: the GraphQL exchange call.
    ///   - now: the wall clock (injectable for tests).
    public init(
        configuration: Configuration, store: GatewayStore, flow: TokenFlow, client: OfflineUserAuthTokenClient,
        metrics: UserExchangeMetrics, audit: AuditLog, logger: Logger,
        now: @escaping @Sendable () -> FlowTime = { FlowTime.now() }
    ) {
        self.configuration = configuration
        self.store = store
        self.flow = flow
        self.client = client
        self.metrics = metrics
        self.audit = audit
        self.logger = logger
        self.now = now
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
        let start = self.now()
        let deadline = start + request.timeout
        let snapshot: UserTokenSnapshot
        do {
            snapshot = try await self.store.userTokenSnapshot(
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

    /// Waits for the flight of `job`'s user (starting it when there is none) until `deadline`.
    private func join(_ job: Job, deadline: FlowTime) async -> Outcome {
        let key = job.key
        let waiterID = self.state.withLock { s -> UInt64 in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Outcome, Never>) in
                let configuration = self.configuration
                let admitted = self.state.withLock { s -> Bool? in
                    guard s.waiting < configuration.maxWaiters,
                        (s.waitingPerInstallation[key.installation] ?? 0) < configuration.maxWaitersPerInstallation
                    else { return nil }
                    s.countWaiter(key.installation, 1)
                    if var flight = s.flights[key] {
                        flight.waiters[waiterID] = Waiter(continuation: continuation)
                        flight.deadline = max(flight.deadline, deadline)
                        s.flights[key] = flight
                        return false
                    }
                    s.flights[key] = Flight(waiters: [waiterID: Waiter(continuation: continuation)], deadline: deadline)
                    return true
                }
                guard let leads = admitted else {
                    continuation.resume(returning: .failure(.flow(.overloaded)))
                    return
                }
                if leads {
                    Task { self.land(key, await self.fly(job)) }
                }
                if Task.isCancelled {
                    self.leave(key, waiterID, with: .failure(.flow(.cancelled)))
                    return
                }
                let delay = deadline - self.now()
                let timer = Task {
                    if delay > .zero {
                        do { try await Task.sleep(for: delay) } catch { return }
                    }
                    self.leave(key, waiterID, with: .failure(.timeout))
                }
                let attached = self.state.withLock { s -> Bool in
                    guard s.flights[key]?.waiters[waiterID] != nil else { return false }
                    s.flights[key]!.waiters[waiterID]!.timer = timer
                    return true
                }
                if !attached { timer.cancel() }
            }
        } onCancel: {
            self.leave(key, waiterID, with: .failure(.flow(.cancelled)))
        }
    }

    /// One waiter stops waiting (its deadline, or it went away); the flight goes on for the others.
    private func leave(_ key: FlightKey, _ waiterID: UInt64, with outcome: Outcome) {
        let waiter = self.state.withLock { s -> Waiter? in
            let removed = s.flights[key]?.waiters.removeValue(forKey: waiterID)
            if removed != nil { s.countWaiter(key.installation, -1) }
            return removed
        }
        guard let waiter else { return }
        waiter.timer?.cancel()
        waiter.continuation.resume(returning: outcome)
    }

    /// The flight ended: answer everyone still waiting.
    private func land(_ key: FlightKey, _ outcome: Outcome) {
        let waiters = self.state.withLock { s -> [Waiter] in
            guard let flight = s.flights.removeValue(forKey: key) else { return [] }
            s.countWaiter(key.installation, -flight.waiters.count)
            return Array(flight.waiters.values)
        }
        for waiter in waiters {
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: outcome)
        }
    }

    /// The flight's current deadline (the latest of its waiters').
    private func deadline(of key: FlightKey) -> FlowTime {
        self.state.withLock { $0.flights[key]?.deadline } ?? self.now()
    }

    // MARK: - Coalescing across processes

    /// Runs one flight: takes the user's lease and exchanges, or follows the process that holds it.
    private func fly(_ job: Job) async -> Outcome {
        var generator = SystemRandomNumberGenerator()
        let owner = "ux_" + String(generator.next() as UInt64, radix: 36)
        var pollDelay = self.configuration.pollInitial
        while true {
            let now = self.now()
            let deadline = self.deadline(of: job.key)
            guard now < deadline else { return .failure(.timeout) }
            let won: Bool
            do {
                won = try await self.store.acquireUserLease(
                    job.installation, accountId: job.accountId.value, owner: owner,
                    ttl: deadline - now + self.configuration.leaseGrace)
            } catch {
                return .failure(.storeUnavailable)
            }
            if won {
                let outcome = await self.lead(job, owner: owner)
                _ = try? await self.store.releaseUserLease(
                    job.installation, accountId: job.accountId.value, owner: owner)
                return outcome
            }
            if let outcome = await self.follow(job, pollDelay: &pollDelay) {
                return outcome
            }
            // The other process let the lease go without an answer: take it over.
        }
    }

    /// Polls while another process exchanges. Returns its outcome, or nil when the lease went
    /// away without one.
    private func follow(_ job: Job, pollDelay: inout Duration) async -> Outcome? {
        while true {
            let now = self.now()
            let deadline = self.deadline(of: job.key)
            guard now < deadline else { return .failure(.timeout) }
            try? await Task.sleep(for: min(pollDelay, deadline - now))
            pollDelay = min(pollDelay * 2, self.configuration.pollCap)
            let snapshot: UserTokenSnapshot
            do {
                snapshot = try await self.store.userTokenSnapshot(job.installation, accountId: job.accountId.value)
            } catch {
                return .failure(.storeUnavailable)
            }
            if let outcome = self.settled(job, snapshot) { return outcome }
            if !snapshot.exchangeInFlight { return nil }
        }
    }

    /// What a snapshot taken after an exchange may have happened says, if anything.
    private func settled(_ job: Job, _ snapshot: UserTokenSnapshot) -> Outcome? {
        guard snapshot.exists else { return .failure(.flow(.installationNotFound)) }
        guard snapshot.status == .active else { return .failure(.flow(.installationUninstalled)) }
        if let token = snapshot.token, token.value != job.ignoring, token.expiresAt > self.now().unixSeconds {
            return .success(Answer(token: token, source: .exchange, apiBaseUrl: snapshot.apiBaseUrl ?? job.apiBaseUrl))
        }
        if snapshot.deniedFor != nil { return .failure(.denied) }
        return nil
    }

    // MARK: - The exchange

    /// Exchanges while holding the user's lease: system token, budget, call, retries.
    private func lead(_ job: Job, owner: String) async -> Outcome {
        let account = job.accountId.value
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(job.installation)"
        logger[metadataKey: "account.id"] = "\(account)"
        // Another process may have finished just before this one took the lease.
        do {
            let snapshot = try await self.store.userTokenSnapshot(job.installation, accountId: account)
            if let outcome = self.settled(job, snapshot) { return outcome }
        } catch {
            return .failure(.storeUnavailable)
        }
        var attempt = 0
        var lastFailure: OfflineUserAuthTokenClient.Failure? = nil
        var systemTokenRenewed = false
        var renewSystemToken = false
        while true {
            let deadline = self.deadline(of: job.key)
            var now = self.now()
            guard now < deadline else { return .failure(self.giveUp(lastFailure)) }

            let systemToken: AccessToken
            do {
                systemToken = try await self.flow.token(
                    for: job.installation,
                    request: .init(
                        minValidity: self.configuration.systemTokenMinValidity, timeout: deadline - now,
                        forceRefresh: renewSystemToken)
                ).token
            } catch {
                logger.notice("no system token for the exchange", metadata: ["error.code": "\(error.code.rawValue)"])
                return .failure(.flow(error))
            }
            renewSystemToken = false

            now = self.now()
            do {
                let admission = try await self.store.admitUserExchange(
                    scope: self.configuration.budgetScope, limit: self.configuration.exchangesPerMinute,
                    window: self.configuration.budgetWindow, now: now)
                if case .refused(let retryAfter) = admission {
                    self.metrics.count(outcome: "budget_exhausted")
                    logger.notice(
                        "user-token exchange held back by the shared budget",
                        metadata: ["retry.after_ms": "\(retryAfter.milliseconds)"])
                    return .failure(.rateLimited(retryAfter: retryAfter))
                }
            } catch {
                return .failure(.storeUnavailable)
            }

            attempt += 1
            now = self.now()
            let callDeadline = self.deadline(of: job.key)
            guard now < callDeadline else { return .failure(self.giveUp(lastFailure)) }
            _ = try? await self.store.extendUserLease(
                job.installation, accountId: account, owner: owner,
                ttl: callDeadline - now + self.configuration.leaseGrace)
            logger.debug("exchanging for a user token", metadata: ["exchange.attempt": "\(attempt)"])
            let outcome = await self.client.exchange(
                systemToken: systemToken.value, context: job.context, accountId: job.accountId,
                timeout: min(self.configuration.attemptTimeout, callDeadline - now))
            self.metrics.count(outcome: outcome.outcome)

            switch outcome {
            case .token(let value, let ttl):
                return await self.keep(job, value: value, ttl: ttl, logger: logger)

            case .denied(let message):
                logger.notice(
                    "Atlassian refused a user token", metadata: ["exchange.message": "\(message ?? "-")"])
                do {
                    try await self.store.rememberUserDenial(
                        job.installation, accountId: account, for: self.configuration.denialMemory)
                } catch {
                    logger.warning("could not remember the refusal", metadata: ["error": "\(error)"])
                }
                return .failure(.denied)

            case .systemTokenRefused:
                guard !systemTokenRenewed else {
                    logger.warning("the exchange refused a fresh system token too")
                    return .failure(.exchangeFailed("the system token was refused"))
                }
                logger.notice("the exchange refused the system token; fetching a fresh one")
                systemTokenRenewed = true
                renewSystemToken = true

            case .rateLimited(let retryAfter):
                let hold = max(retryAfter ?? self.configuration.defaultRetryAfter, .seconds(1))
                logger.warning(
                    "Atlassian rate-limited user-token exchanges; holding every replica back",
                    metadata: ["retry.after_ms": "\(hold.milliseconds)"])
                do {
                    try await self.store.blockUserExchanges(scope: self.configuration.budgetScope, for: hold)
                } catch {
                    logger.warning("could not record the rate limit", metadata: ["error": "\(error)"])
                }
                return .failure(.rateLimited(retryAfter: hold))

            case .failed(let failure):
                lastFailure = failure
                logger.notice(
                    "user-token exchange attempt failed",
                    metadata: ["exchange.attempt": "\(attempt)", "exchange.outcome": "\(failure.outcome)"])
                guard failure.isRetryable else { return .failure(.exchangeFailed(failure.detail)) }
                guard attempt < self.configuration.maxAttempts else { return .failure(self.giveUp(failure)) }
                let delay = Backoff.delay(
                    attempt: attempt, base: self.configuration.backoffBase, cap: self.configuration.backoffCap,
                    jitter: Double.random(in: 0...1))
                guard self.now() + delay < self.deadline(of: job.key) else { return .failure(self.giveUp(failure)) }
                try? await Task.sleep(for: delay)
            }
        }
    }

    /// Caches a freshly exchanged token (best effort) and records it in the audit log.
    private func keep(_ job: Job, value: String, ttl: Int64?, logger: Logger) async -> Outcome {
        let now = self.now()
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
            let outcome = try await self.store.storeUserToken(
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

    /// The error when no more attempts fit: 504 when the last one timed out (or none was made),
    /// 502 when it failed.
    private func giveUp(_ lastFailure: OfflineUserAuthTokenClient.Failure?) -> UserTokenError {
        switch lastFailure {
        case nil, .timeout?: return .timeout
        case let failure?: return .exchangeFailed("last attempt: \(failure.detail)")
        }
    }
}
