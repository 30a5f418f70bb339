import FlowEngine
import Logging
import ServiceLifecycle
import Synchronization

/// User tokens (offline user impersonation, contract §2 `?asUser=`): serves a cached user token
/// or exchanges the installation's system token for one, once per user however many callers ask,
/// on however many processes.
///
/// A request reads the cache, a remembered refusal and the installation's state in one Redis
/// round trip. On a miss it joins this process's *round* for that installation and user, or
/// starts one. A round takes the user's exchange lease in the ``UserTokenStore``; the process
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
///   while the round's deadline allows.
///
/// A round's deadline is the latest deadline of the callers waiting on it; each caller also
/// gives up at its own deadline (504 `token_timeout`). A caller that goes away leaves the round
/// running for the others.
///
/// The decisions are those of the leased-round machine system tokens use too
/// (``UserRoundMachine``, one per installation and user); this type runs its actions, each as a
/// child task of ``run()`` (a `Service` of the gateway), so shutdown awaits them all. The round's
/// work, one attempt, is the exchange (``attempt(_:requestID:attempt:deadline:timeout:)``).
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
        /// Attempts per round, retries included; an attempt answered 401 makes one more call with a
        /// fresh system token. Default 4.
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
        /// How long the exchange lease outlives the round's deadline. Default 2 s.
        public var leaseGrace: Duration = .seconds(2)
        /// The hold after a 429 that came without a readable `Retry-After`. Default 60 s (one budget window).
        public var defaultRetryAfter: Duration = .seconds(60)

        /// Callers of one installation that may wait for user tokens in this process at once (from
        /// their store read on: reading, being admitted, or waiting for a round); more get
        /// `overloaded` (503). Default 1000.
        public var maxWaitersPerInstallation: Int = 1000
        /// Callers that may wait for user tokens in this process at once, counted the same way.
        /// Default 10,000.
        public var maxWaiters: Int = 10_000

        public init() {}

        /// The settings of the round machine: attempts, backoff and lease as above; no circuit
        /// breaking, no refresh-ahead, no delivery (the exchange call returns the token), and no
        /// exchange for a caller that left (the budget is spent only for callers waiting).
        var rounds: TokenFlowConfiguration {
            var rounds = TokenFlowConfiguration()
            rounds.maxAttempts = self.maxAttempts
            rounds.attemptTimeout = self.attemptTimeout
            rounds.backoffBase = self.backoffBase
            rounds.backoffCap = self.backoffCap
            rounds.leaseGrace = self.leaseGrace
            rounds.refreshAheadFraction = 0
            rounds.circuitBreaking = false
            rounds.workOutlivesCallers = false
            rounds.rereadsAfterFailedAttempt = false
            return rounds
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

    /// What a round needs to know, fixed by the caller that started it.
    struct Job: Sendable {
        let installation: InstallationID
        let accountId: UserAccountID
        let context: SiteContext
        let apiBaseUrl: String?
        /// The cached token the starting caller refused (stale or forced away): not an answer.
        let ignoring: AccessToken?

        var key: FlightKey { FlightKey(installation: self.installation, accountId: self.accountId.value) }
    }

    typealias Outcome = Result<Answer, UserTokenError>

    /// One caller's place: waiting (its continuation once it is attached) or answered before it was.
    struct WaiterSlot {
        let installation: InstallationID
        /// When the caller is answered at the latest (its request's deadline).
        let deadline: FlowTime
        var continuation: CheckedContinuation<Outcome, Never>?
        var answer: Outcome?
    }

    /// One user's rounds in this process: the machine, and the job of the round it runs.
    struct Flight: Sendable {
        var job: Job
        var machine: UserRoundMachine
        /// The token an attempt of round `requestID` is storing (or has stored), noted before the
        /// write, so that a caller who reads it before the machine hears of it is known to have
        /// read this round's own answer.
        var storing: (requestID: String, token: String)?
    }

    struct TimerKey: Hashable, Sendable {
        let flight: FlightKey
        let timer: TimerID
    }

    struct State: ~Copyable {
        var flights: [FlightKey: Flight] = [:]
        var slots: [UInt64: WaiterSlot] = [:]
        /// The round (lease owner) of each user whose exchange lease this process holds.
        var leasesHeld: [FlightKey: String] = [:]
        /// Which take of the lease `leasesHeld` names (a round that lost its lease takes it again
        /// under the same request id): an extension's answer concerns the take it was sent for.
        var leaseTakes: [FlightKey: UInt64] = [:]
        var nextLeaseTake: UInt64 = 0
        /// The take of the lease whose first attempt has not started yet: that attempt reads the
        /// store once more before its exchange (attempt 1, or the next one after a lease lost and
        /// taken again, when the other process has likely just stored a token).
        var recheckDue: [FlightKey: UInt64] = [:]
        var nextID: UInt64 = 0
        /// Waiters over all flights, and per installation (the caps).
        var waiting = 0
        var waitingPerInstallation: [InstallationID: Int] = [:]
        /// Callers not waiting for a round yet: reading the store, or being admitted (the caps
        /// count them too).
        var readers = 0
        var readersPerInstallation: [InstallationID: Int] = [:]
        var shuttingDown = false
        /// Per installation, the system token the exchange last refused (401) and when a fresh one
        /// was last forced for such a refusal (see ``SystemTokenRefusals``).
        var refusals = SystemTokenRefusals()
        /// Exchange leases this process held whose release failed: given back on the next resync
        /// (the store's notices subscribed again).
        var releasesOwed = OwedReleases<FlightKey>()

        /// Forgets the lease `owner` holds on `key` (only its take `take`, when given); true when
        /// this process held it.
        mutating func forgetLease(_ key: FlightKey, owner: String, take: UInt64? = nil) -> Bool {
            guard self.leasesHeld[key] == owner, take == nil || self.leaseTakes[key] == take else { return false }
            self.leasesHeld[key] = nil
            self.leaseTakes[key] = nil
            self.recheckDue[key] = nil
            return true
        }

        mutating func makeID() -> UInt64 {
            self.nextID += 1
            return self.nextID
        }

        /// Whether one more caller of `installation` would exceed the caps (readers and waiters alike).
        func isFull(_ installation: InstallationID, _ configuration: Configuration) -> Bool {
            let here =
                (self.waitingPerInstallation[installation] ?? 0) + (self.readersPerInstallation[installation] ?? 0)
            return here >= configuration.maxWaitersPerInstallation
                || self.waiting + self.readers >= configuration.maxWaiters
        }

        mutating func countReader(_ installation: InstallationID, _ delta: Int) {
            self.readers += delta
            let now = (self.readersPerInstallation[installation] ?? 0) + delta
            self.readersPerInstallation[installation] = now > 0 ? now : nil
        }

        mutating func countWaiter(_ installation: InstallationID, _ delta: Int) {
            self.waiting += delta
            let now = (self.waitingPerInstallation[installation] ?? 0) + delta
            self.waitingPerInstallation[installation] = now > 0 ? now : nil
        }

        /// Answers one waiter: resumes it, or keeps the answer until it attaches. Returns the
        /// continuation to resume (outside the lock).
        mutating func answer(_ waiterID: UInt64, _ outcome: Outcome) -> CheckedContinuation<Outcome, Never>? {
            guard var slot = self.slots[waiterID], slot.answer == nil else { return nil }
            self.countWaiter(slot.installation, -1)
            guard let continuation = slot.continuation else {
                slot.answer = outcome
                self.slots[waiterID] = slot
                return nil
            }
            self.slots[waiterID] = nil
            return continuation
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
    let state = Mutex(State())
    /// Actions and timers for ``run()`` to start as child tasks.
    let work: (stream: AsyncStream<Work>, continuation: AsyncStream<Work>.Continuation)
    /// The machines' timers, each waited for by a child task of ``run()``.
    let timers: RoundTimers<TimerKey>

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
        self.timers = RoundTimers(clock: clock)
    }

    // MARK: - The facade

    /// A user token for `accountId` in `installation`: from the cache when one is valid for at
    /// least `request.minValidity` seconds (and no refresh is forced), else from one coalesced exchange.
    ///
    /// - Throws: ``UserTokenError``: `denied` (403), `rateLimited` (429), `exchangeFailed` (502),
    ///   or the flow's errors (404, 410, 422, 502 `trigger_failed`, 503, 504).
    ///
    /// `admit` runs once an exchange is needed (no usable cached token), before one is started:
    /// the caller's own limits; what it throws is the answer. A caller that joins a round already
    /// in flight in this process (no forced refresh) starts no exchange and is not admitted; nor is
    /// one refused because the app's shared budget is spent or Atlassian's 429 hold is in force.
    public func token(
        for installation: InstallationID, accountId: UserAccountID, request: Request,
        admit: @Sendable () async throws(UserTokenError) -> Void = {}
    )
        async throws(UserTokenError) -> Answer
    {
        let start = self.clock.now()
        let deadline = start + request.timeout
        // The caller counts in the caps from its store read on, until it waits for a round (the
        // count moves in one step) or has its answer.
        let counted = self.state.withLock { s -> Bool in
            guard !s.isFull(installation, self.configuration) else { return false }
            s.countReader(installation, 1)
            return true
        }
        guard counted else {
            self.metrics.countOverloaded()
            throw .flow(.overloaded)
        }
        var reading = true
        defer { if reading { self.state.withLock { $0.countReader(installation, -1) } } }
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
        let job = Job(
            installation: installation, accountId: accountId, context: context, apiBaseUrl: snapshot.apiBaseUrl,
            ignoring: snapshot.token)
        // A forced refresh starts an exchange of its own: admitted first. Any other caller joins the
        // round in flight unadmitted; whether one is in flight is decided under the same lock that
        // registers the caller, so a round that ends meanwhile cannot let one start uncounted.
        var admitted = false
        if request.forceRefresh {
            try await self.admitCaller(job, admit)
            admitted = true
        }
        while true {
            switch self.join(job, request: request, deadline: deadline, admitted: admitted) {
            case .waiting(let waiterID):
                reading = false
                return try await self.outcome(of: waiterID, key: job.key).get()
            case .needsAdmission:
                try await self.admitCaller(job, admit)
                admitted = true
            }
        }
    }

    // MARK: - Coalescing in this process

    /// Charges the caller (`admit`: its own limits) for the exchange it is about to start, unless
    /// the app's shared budget or Atlassian's hold would refuse that exchange now: then it is
    /// refused (429) without being charged, since it starts nothing.
    private func admitCaller(_ job: Job, _ admit: @Sendable () async throws(UserTokenError) -> Void)
        async throws(UserTokenError)
    {
        if case .failure(let error) = await self.admit(job, recording: false, logging: false) { throw error }
        try await admit()
    }

    /// What ``join(_:request:deadline:admitted:)`` made of a caller.
    enum Registration {
        /// Registered: the waiter's id.
        case waiting(UInt64)
        /// No round is in flight, so the caller would start one: it must be admitted first.
        case needsAdmission
    }

    /// Waits for `waiterID`'s answer: the round's value or failure, the caller's deadline (the
    /// machine's timer), or the calling task being cancelled; the round goes on for the others.
    private func outcome(of waiterID: UInt64, key: FlightKey) async -> Outcome {
        await withTaskCancellationHandler {
            await self.outcome(of: waiterID)
        } onCancel: {
            self.handle(key) { $0.waiterCancelled(WaiterID(waiterID), now: self.clock.now()) }
        }
    }

    /// Adds a waiter to the user's machine (creating it when there is none), which joins it to the
    /// round in flight or starts one; a caller not `admitted` is added only when it joins a round
    /// in flight. A waiter is answered at once when the process shuts down. The caller, counted
    /// as a reader until now, counts as a waiter from this step on (the caps were checked when it
    /// began to read: the move changes no total).
    private func join(_ job: Job, request: Request, deadline: FlowTime, admitted: Bool) -> Registration {
        let key = job.key
        let configuration = self.configuration
        let now = self.clock.now()
        let registered = self.state.withLock { s -> (UInt64, Job, [UserRoundMachine.Action])? in
            guard admitted || s.flights[key]?.machine.isActive == true else { return nil }
            s.countReader(key.installation, -1)
            let waiterID = s.makeID()
            s.slots[waiterID] = WaiterSlot(installation: key.installation, deadline: deadline)
            s.countWaiter(key.installation, 1)
            if s.shuttingDown {
                _ = s.answer(waiterID, .failure(.flow(.shuttingDown)))
                return (waiterID, job, [])
            }
            var flight =
                s.flights[key]
                ?? Flight(
                    job: job,
                    machine: UserRoundMachine(configuration: configuration.rounds, firstTimerID: waiterID << 20))
            var actions = Self.endRoundWithItsStoredToken(
                &flight, refusedBy: job, forced: request.forceRefresh, now: now)
            if !flight.machine.isActive { flight.job = job }
            let requestID =
                "ux_" + String(waiterID, radix: 36) + "_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
            actions += flight.machine.tokenWasRequested(
                waiter: WaiterID(waiterID), minValidity: request.minValidity, knownExpiry: job.ignoring?.expiresAt ?? 0,
                forced: request.forceRefresh, deadline: deadline, requestID: requestID, now: now)
            s.flights[key] = flight.machine.isRetained(at: now) ? flight : nil
            return (waiterID, flight.job, actions)
        }
        guard let (waiterID, roundJob, actions) = registered else { return .needsAdmission }
        self.perform(roundJob, actions)
        return .waiting(waiterID)
    }

    /// A forced refresh that read the token this process's round is storing, before the round heard
    /// of it, was sent to replace that very token: the round ends with it first (its callers are
    /// answered, its lease goes back), so the forced caller starts a round of its own instead of
    /// being answered with the token it refused. (The machine answers every caller of a round with
    /// the round's own value, whatever its expiry.)
    static func endRoundWithItsStoredToken(
        _ flight: inout Flight, refusedBy job: Job, forced: Bool, now: FlowTime
    ) -> [UserRoundMachine.Action] {
        guard forced, let refused = job.ignoring, let storing = flight.storing, storing.token == refused.value,
            flight.machine.currentRequestID == storing.requestID
        else { return [] }
        flight.storing = nil
        let value = UserToken(token: refused, apiBaseUrl: flight.job.apiBaseUrl, roundID: storing.requestID)
        return flight.machine.valueObserved(value, solicitedBy: storing.requestID, now: now)
    }

    /// The state of a user's round machine now (for tests).
    func roundState(_ installation: InstallationID, accountId: String) -> UserRoundMachine.StateName {
        let now = self.clock.now()
        let key = FlightKey(installation: installation, accountId: accountId)
        return self.state.withLock { $0.flights[key]?.machine.stateName(at: now) ?? .idle }
    }

    /// Callers of `installation` waiting for a round now (for tests).
    func waiting(_ installation: InstallationID) -> Int {
        self.state.withLock { $0.waitingPerInstallation[installation] ?? 0 }
    }

    /// The waiter's answer, once there is one.
    private func outcome(of waiterID: UInt64) async -> Outcome {
        await withCheckedContinuation { (continuation: CheckedContinuation<Outcome, Never>) in
            let ready = self.state.withLock { s -> Outcome? in
                guard var slot = s.slots[waiterID] else { return .failure(.flow(.shuttingDown)) }
                if let answer = slot.answer {
                    s.slots[waiterID] = nil
                    return answer
                }
                slot.continuation = continuation
                s.slots[waiterID] = slot
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// Answers these waiters.
    func answer(_ waiters: [WaiterID], _ outcome: Outcome) {
        let continuations = self.state.withLock { s in waiters.compactMap { s.answer($0.raw, outcome) } }
        for continuation in continuations { continuation.resume(returning: outcome) }
    }

    // MARK: - Service

    /// Runs every action and timer of every round as a child task, and wakes followers on the
    /// store's notices, until graceful shutdown (or cancellation); then fails the callers still
    /// waiting and, once every child task has ended, releases the leases this process holds.
    public func run() async throws {
        let held = await withDiscardingTaskGroup(returning: [FlightKey: String].self) { group in
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
        for (key, owner) in held {
            _ = try? await self.store.releaseLease(key.installation, accountId: key.accountId, owner: owner)
        }
    }

    /// Gives the exchange lease `owner` holds back; one whose release fails is owed
    /// (``State/releasesOwed``) and given back on the next resync.
    @discardableResult
    func giveBack(_ key: FlightKey, owner: String) async -> Bool {
        do {
            _ = try await self.store.releaseLease(key.installation, accountId: key.accountId, owner: owner)
            return true
        } catch {
            self.state.withLock { s in
                if !s.shuttingDown { s.releasesOwed.owe(key, owner: owner) }
            }
            return false
        }
    }

    /// Wakes the followers a notice concerns: they read the store again. On a resync (the store
    /// heard again), the leases owed go back first.
    func noticed(_ notice: UserTokenNotice) {
        let now = self.clock.now()
        let concerned = self.state.withLock { s -> [(Job, String)] in
            s.flights.compactMap { (key, flight) -> (Job, String)? in
                guard flight.machine.stateName(at: now) == .following, let requestID = flight.machine.currentRequestID
                else { return nil }
                switch notice {
                case .user(let id, let accountId):
                    guard key == FlightKey(installation: id, accountId: accountId) else { return nil }
                case .uninstalled(let id):
                    guard key.installation == id else { return nil }
                case .resync:
                    break
                }
                return (flight.job, requestID)
            }
        }
        let owed = self.state.withLock { s -> [(FlightKey, String)] in
            guard case .resync = notice else { return [] }
            // Not one a round of this process holds (it stays owed).
            return s.releasesOwed.take { key, owner in s.leasesHeld[key] != owner }
        }
        guard !owed.isEmpty else {
            for (job, requestID) in concerned { self.submit { await self.readStore(job, requestID: requestID) } }
            return
        }
        self.submit {
            // One that fails again stays owed, for the next resync.
            let given = await OwedReleases.giveBack(owed) { await self.giveBack($0, owner: $1) }
            if given > 0 {
                self.logger.info(
                    "gave back the user-token exchange leases this replica could not release while the store was unreachable",
                    metadata: ["leases": "\(given)"])
            }
            for (job, requestID) in concerned { self.submit { await self.readStore(job, requestID: requestID) } }
        }
    }

    /// Ends every round still in flight, answering its callers (503 `shutting_down`); later
    /// callers get the same. Returns the leases still to be released.
    private func endFlights() -> [FlightKey: String] {
        self.work.continuation.finish()
        let now = self.clock.now()
        let (ended, held) = self.state.withLock { s -> ([UserRoundMachine.Action], [FlightKey: String]) in
            s.shuttingDown = true
            var ended: [UserRoundMachine.Action] = []
            for key in Array(s.flights.keys) { ended += s.flights[key]!.machine.shutdownRequested(now: now) }
            s.flights.removeAll()
            let held = s.leasesHeld
            s.leasesHeld.removeAll()
            s.leaseTakes.removeAll()
            s.recheckDue.removeAll()
            return (ended, held)
        }
        self.timers.cancelAll()
        for action in ended {
            if case .fail(let waiters, let error) = action { self.answer(waiters, .failure(error)) }
        }
        // Callers whose answer waited on work that will no longer run (a lease being released).
        let left = self.state.withLock { s in Array(s.slots.keys) }
        self.answer(left.map(WaiterID.init), .failure(.flow(.shuttingDown)))
        return held
    }
}
