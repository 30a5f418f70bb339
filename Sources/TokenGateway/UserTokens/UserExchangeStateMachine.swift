import FlowEngine

/// What the executor does for one exchange flight, as told by ``UserExchangeStateMachine``.
enum UserExchangeAction: Sendable, Equatable {
    /// Take the user's exchange lease for `ttl` (answer: ``UserExchangeStateMachine/leaseAnswered(won:now:)``).
    case acquireLease(ttl: Duration)
    /// Extend the lease while this flight holds it (best effort, no answer).
    case extendLease(ttl: Duration)
    /// Release the lease while this flight holds it (best effort; answer:
    /// ``UserExchangeStateMachine/leaseReleased()``).
    case releaseLease
    /// Read the user's snapshot (answer: ``UserExchangeStateMachine/storeRead(_:now:)``).
    case readStore
    /// Get the installation's system token (answer: ``UserExchangeStateMachine/systemTokenArrived(_:now:)``).
    case fetchSystemToken(forceRefresh: Bool, timeout: Duration)
    /// Count one exchange against the app-wide budget (answer: ``UserExchangeStateMachine/admission(_:now:)``).
    case admit
    /// Call the GraphQL exchange (answer: ``UserExchangeStateMachine/exchanged(_:now:jitter:)``).
    case exchange(systemToken: AccessToken, attempt: Int, timeout: Duration)
    /// Cache the exchanged token (answer: ``UserExchangeStateMachine/tokenKept(_:)``).
    case keep(value: String, ttl: Int64?)
    /// Remember Atlassian's refusal of the user for this long (best effort; answer:
    /// ``UserExchangeStateMachine/recorded()``).
    case rememberDenial(Duration)
    /// Hold every replica's exchanges back for this long (Atlassian answered 429; best effort;
    /// answer: ``UserExchangeStateMachine/recorded()``).
    case blockExchanges(Duration)
    /// Count one exchange outcome (the `outcome` label of the exchange metric).
    case recordOutcome(String)
    /// Call ``UserExchangeStateMachine/timerFired(_:now:)`` with this id at `deadline`.
    case scheduleTimer(TimerID, deadline: FlowTime)
    /// The flight is over: answer every caller waiting on it.
    case finish(Result<UserTokenExchanger.Answer, UserTokenError>)
}

/// One exchange flight for one installation and user: the lease-and-coalesce decisions of
/// ``UserTokenExchanger`` as a value type. Events in, actions out; time and jitter are inputs.
///
/// ```
///  start ─▶ acquiringLease ──won──▶ checking ──nothing yet──▶ fetchingSystemToken ─▶ admitting ─▶ exchanging
///              ▲   │ busy              │ settled                ▲        ▲ 401 (once)               │
///              │   ▼                   ▼                         │        └────────────────────────┤
///              │  reading ──lease still held──▶ following        │ timer                          │ 5xx, timeout
///              │   │  ▲                          │ notice/timer   └──────── backingOff ◀────────────┤
///              └───┘  └──────────────────────────┘                                                  │ token
///           lease gone     settled ─▶ finished ◀── refusal, 429, budget, last attempt, keeping ◀────┘
/// ```
///
/// A refusal or a 429 is recorded in the store (``State/recording(outcome:)``), and a flight that
/// holds the lease gives it up (``State/releasing(outcome:)``), before the callers are answered. Notices (another process stored a
/// token, remembered a refusal or let its lease go) and timers the machine asked for are the only
/// ways a follower wakes; it never polls on a fixed schedule.
struct UserExchangeStateMachine: Sendable {
    struct Configuration: Sendable, Hashable {
        var maxAttempts: Int = 4
        var attemptTimeout: Duration = .seconds(10)
        var backoffBase: Duration = .milliseconds(100)
        var backoffCap: Duration = .seconds(2)
        var leaseGrace: Duration = .seconds(2)
        var denialMemory: Duration = .seconds(60)
        var defaultRetryAfter: Duration = .seconds(60)
    }

    enum State: Sendable, Hashable {
        /// Taking the user's lease.
        case acquiringLease
        /// The lease is ours: reading the store once more (another process may have just finished).
        case checking
        /// Another process holds the lease: reading what it left. `again`: a notice came meanwhile.
        case reading(again: Bool)
        /// Another process holds the lease: waiting for its notice or for `wake`.
        case following(wake: TimerID)
        /// Getting the system token for exchange call `attempt + 1`.
        case fetchingSystemToken(attempt: Int)
        /// Counting exchange call `attempt + 1` against the shared budget.
        case admitting(attempt: Int, systemToken: AccessToken)
        /// Exchange call `attempt` is out.
        case exchanging(attempt: Int)
        /// Waiting before the next call after failed call `attempt`.
        case backingOff(attempt: Int, timer: TimerID)
        /// Caching the exchanged token.
        case keeping
        /// Recording a refusal or a rate limit in the store before answering with `outcome`.
        case recording(outcome: Result<UserTokenExchanger.Answer, UserTokenError>)
        /// Giving the lease up before answering with `outcome`.
        case releasing(outcome: Result<UserTokenExchanger.Answer, UserTokenError>)
        case finished
    }

    let configuration: Configuration
    /// The cached token the starting caller refused (stale or forced away): never an answer.
    let ignoring: String?
    /// The installation's `apiBaseUrl` as the starting caller read it.
    let apiBaseUrl: String?
    private(set) var state: State = .acquiringLease
    /// The latest deadline of the callers waiting on this flight.
    private(set) var deadline: FlowTime
    private(set) var holdsLease = false
    private var systemTokenRenewed = false
    private var lastFailure: OfflineUserAuthTokenClient.Failure?
    private var nextTimer: UInt64 = 0

    init(configuration: Configuration, deadline: FlowTime, ignoring: String?, apiBaseUrl: String?) {
        self.configuration = configuration
        self.deadline = deadline
        self.ignoring = ignoring
        self.apiBaseUrl = apiBaseUrl
    }

    var isFinished: Bool { self.state == .finished }

    private mutating func makeTimer() -> TimerID {
        self.nextTimer += 1
        return TimerID(self.nextTimer)
    }

    private func leaseTTL(_ now: FlowTime) -> Duration {
        max(self.deadline - now, .zero) + self.configuration.leaseGrace
    }

    // MARK: Events

    /// The flight starts: take the lease.
    mutating func start(now: FlowTime) -> [UserExchangeAction] {
        guard self.state == .acquiringLease else { return [] }
        return [.acquireLease(ttl: self.leaseTTL(now))]
    }

    /// Another caller joined with a later deadline.
    mutating func deadlineExtended(to deadline: FlowTime) {
        self.deadline = max(self.deadline, deadline)
    }

    mutating func leaseAnswered(won: Bool, now: FlowTime) -> [UserExchangeAction] {
        guard self.state == .acquiringLease else { return [] }
        self.holdsLease = won
        self.state = won ? .checking : .reading(again: false)
        return [.readStore]
    }

    /// A read of the store answered.
    mutating func storeRead(_ snapshot: UserTokenSnapshot, now: FlowTime) -> [UserExchangeAction] {
        switch self.state {
        case .checking:
            if let outcome = self.settled(snapshot, now: now) { return self.finish(outcome) }
            guard now < self.deadline else { return self.finish(.failure(.timeout)) }
            self.state = .fetchingSystemToken(attempt: 0)
            return [.fetchSystemToken(forceRefresh: false, timeout: self.deadline - now)]
        case .reading(let again):
            if let outcome = self.settled(snapshot, now: now) { return self.finish(outcome) }
            guard now < self.deadline else { return self.finish(.failure(.timeout)) }
            if again {
                self.state = .reading(again: false)
                return [.readStore]
            }
            guard let remaining = snapshot.leaseRemaining else {
                self.state = .acquiringLease
                return [.acquireLease(ttl: self.leaseTTL(now))]
            }
            let wake = self.makeTimer()
            self.state = .following(wake: wake)
            return [.scheduleTimer(wake, deadline: min(now + remaining, self.deadline))]
        default:
            return []
        }
    }

    /// The store could not be read or written in time.
    mutating func storeFailed() -> [UserExchangeAction] {
        switch self.state {
        case .acquiringLease, .checking, .reading, .admitting:
            return self.finish(.failure(.storeUnavailable))
        default:
            return []
        }
    }

    /// Another process announced a change of this user's token, refusal or lease (or notices
    /// may have been lost).
    mutating func noticed() -> [UserExchangeAction] {
        switch self.state {
        case .following:
            self.state = .reading(again: false)
            return [.readStore]
        case .reading:
            self.state = .reading(again: true)
            return []
        default:
            return []
        }
    }

    mutating func timerFired(_ id: TimerID, now: FlowTime) -> [UserExchangeAction] {
        switch self.state {
        case .following(let wake) where wake == id:
            self.state = .reading(again: false)
            return [.readStore]
        case .backingOff(let attempt, let timer) where timer == id:
            guard now < self.deadline else { return self.finish(.failure(self.giveUp())) }
            self.state = .fetchingSystemToken(attempt: attempt)
            return [.fetchSystemToken(forceRefresh: false, timeout: self.deadline - now)]
        default:
            return []
        }
    }

    mutating func systemTokenArrived(_ result: Result<AccessToken, FlowError>, now: FlowTime)
        -> [UserExchangeAction]
    {
        guard case .fetchingSystemToken(let attempt) = self.state else { return [] }
        switch result {
        case .failure(let error):
            return self.finish(.failure(.flow(error)))
        case .success(let token):
            self.state = .admitting(attempt: attempt, systemToken: token)
            return [.admit]
        }
    }

    mutating func admission(_ admission: UserExchangeAdmission, now: FlowTime) -> [UserExchangeAction] {
        guard case .admitting(let attempt, let systemToken) = self.state else { return [] }
        if case .refused(let retryAfter) = admission {
            return [.recordOutcome("budget_exhausted")] + self.finish(.failure(.rateLimited(retryAfter: retryAfter)))
        }
        guard now < self.deadline else { return self.finish(.failure(self.giveUp())) }
        self.state = .exchanging(attempt: attempt + 1)
        return [
            .extendLease(ttl: self.leaseTTL(now)),
            .exchange(
                systemToken: systemToken, attempt: attempt + 1,
                timeout: min(self.configuration.attemptTimeout, self.deadline - now)),
        ]
    }

    /// The exchange call answered. `jitter` (0...1) spreads the backoff.
    mutating func exchanged(_ outcome: OfflineUserAuthTokenClient.Outcome, now: FlowTime, jitter: Double)
        -> [UserExchangeAction]
    {
        guard case .exchanging(let attempt) = self.state else { return [] }
        let recorded = UserExchangeAction.recordOutcome(outcome.outcome)
        switch outcome {
        case .token(let value, let ttl):
            self.state = .keeping
            return [recorded, .keep(value: value, ttl: ttl)]
        case .denied:
            self.state = .recording(outcome: .failure(.denied))
            return [recorded, .rememberDenial(self.configuration.denialMemory)]
        case .systemTokenRefused:
            guard !self.systemTokenRenewed else {
                return [recorded] + self.finish(.failure(.exchangeFailed("the system token was refused")))
            }
            self.systemTokenRenewed = true
            self.state = .fetchingSystemToken(attempt: attempt)
            return [recorded, .fetchSystemToken(forceRefresh: true, timeout: max(self.deadline - now, .zero))]
        case .rateLimited(let retryAfter):
            let hold = max(retryAfter ?? self.configuration.defaultRetryAfter, .seconds(1))
            self.state = .recording(outcome: .failure(.rateLimited(retryAfter: hold)))
            return [recorded, .blockExchanges(hold)]
        case .failed(let failure):
            self.lastFailure = failure
            return [recorded] + self.failed(failure, attempt: attempt, now: now, jitter: jitter)
        }
    }

    private mutating func failed(
        _ failure: OfflineUserAuthTokenClient.Failure, attempt: Int, now: FlowTime, jitter: Double
    ) -> [UserExchangeAction] {
        guard failure.isRetryable else { return self.finish(.failure(.exchangeFailed(failure.detail))) }
        guard attempt < self.configuration.maxAttempts else { return self.finish(.failure(self.giveUp())) }
        let delay = Backoff.delay(
            attempt: attempt, base: self.configuration.backoffBase, cap: self.configuration.backoffCap, jitter: jitter)
        guard now + delay < self.deadline else { return self.finish(.failure(self.giveUp())) }
        let timer = self.makeTimer()
        self.state = .backingOff(attempt: attempt, timer: timer)
        return [.scheduleTimer(timer, deadline: now + delay)]
    }

    /// The exchanged token was cached (or could not be, and is still the answer), or was unusable.
    mutating func tokenKept(_ outcome: Result<UserTokenExchanger.Answer, UserTokenError>) -> [UserExchangeAction] {
        guard self.state == .keeping else { return [] }
        return self.finish(outcome)
    }

    /// The refusal or rate limit was recorded (or could not be).
    mutating func recorded() -> [UserExchangeAction] {
        guard case .recording(let outcome) = self.state else { return [] }
        return self.finish(outcome)
    }

    /// The lease was given up (or could not be: it runs out on its own).
    mutating func leaseReleased() -> [UserExchangeAction] {
        guard case .releasing(let outcome) = self.state else { return [] }
        self.state = .finished
        return [.finish(outcome)]
    }

    /// The process shuts down: the callers are answered at once, the lease is given up.
    /// An outcome already decided (being recorded, or the lease being given up) is kept.
    mutating func shutdownRequested() -> [UserExchangeAction] {
        let outcome: Result<UserTokenExchanger.Answer, UserTokenError>
        switch self.state {
        case .finished: return []
        case .recording(let decided), .releasing(let decided): outcome = decided
        default: outcome = .failure(.flow(.shuttingDown))
        }
        self.state = .finished
        let release: [UserExchangeAction] = self.holdsLease ? [.releaseLease] : []
        self.holdsLease = false
        return release + [.finish(outcome)]
    }

    // MARK: Helpers

    /// Ends the flight with `outcome`, giving the lease up first when this flight holds it.
    private mutating func finish(_ outcome: Result<UserTokenExchanger.Answer, UserTokenError>) -> [UserExchangeAction] {
        guard self.holdsLease else {
            self.state = .finished
            return [.finish(outcome)]
        }
        self.holdsLease = false
        self.state = .releasing(outcome: outcome)
        return [.releaseLease]
    }

    /// What a snapshot read after an exchange may have happened says, if anything.
    func settled(_ snapshot: UserTokenSnapshot, now: FlowTime) -> Result<UserTokenExchanger.Answer, UserTokenError>? {
        guard snapshot.exists else { return .failure(.flow(.installationNotFound)) }
        guard snapshot.status == .active else { return .failure(.flow(.installationUninstalled)) }
        if let token = snapshot.token, token.value != self.ignoring, token.expiresAt > now.unixSeconds {
            return .success(
                UserTokenExchanger.Answer(
                    token: token, source: .exchange, apiBaseUrl: snapshot.apiBaseUrl ?? self.apiBaseUrl))
        }
        if snapshot.deniedFor != nil { return .failure(.denied) }
        return nil
    }

    /// The error when no more attempts fit: 504 when the last one timed out (or none was made),
    /// 502 when it failed.
    private func giveUp() -> UserTokenError {
        switch self.lastFailure {
        case nil, .timeout?: return .timeout
        case let failure?: return .exchangeFailed("last attempt: \(failure.detail)")
        }
    }
}
