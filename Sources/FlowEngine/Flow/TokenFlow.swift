import Logging
import ServiceLifecycle
import Synchronization

/// Runs the per-installation ``TokenFlowStateMachine``s: the synchronous "get token" facade.
///
/// A lock guards the machines, the waiting callers' continuations and the timers; actions are
/// performed after the lock is released, and their results come back as events. Concurrent
/// callers for one installation share one round trip; the lease in Redis makes that one round
/// trip across every process sharing the store. Runs as a `Service`: it listens for the
/// notifications other processes publish and, on shutdown, answers waiting callers and releases
/// its leases.
public final class TokenFlow: Sendable, Service {
    /// Options of one token request.
    public struct Request: Sendable {
        public var minValidity: Int64
        public var timeout: Duration
        public var forceRefresh: Bool
        public init(minValidity: Int64 = 300, timeout: Duration = .seconds(10), forceRefresh: Bool = false) {
            self.minValidity = minValidity
            self.timeout = timeout
            self.forceRefresh = forceRefresh
        }
    }

    struct TimerKey: Hashable {
        var installation: InstallationID
        var timer: TimerID
    }

    /// What this process remembers of an installation: its newest token and its `apiBaseUrl`
    /// (from the latest verified FIT), kept together so every answer served from memory carries both.
    struct MemoryEntry {
        var token: AccessToken?
        var apiBaseUrl: String?
    }

    struct State: ~Copyable {
        var machines: [InstallationID: TokenFlowStateMachine] = [:]
        var waiters: [WaiterID: CheckedContinuation<TokenAnswer, any Error>] = [:]
        var waiterBaseURL: [WaiterID: String] = [:]
        /// Which installation each waiter waits for, and how many wait per installation (the caps).
        var waiterInstallation: [WaiterID: InstallationID] = [:]
        var waitersPerInstallation: [InstallationID: Int] = [:]
        var timers: [TimerKey: Task<Void, Never>] = [:]
        var memory: [InstallationID: MemoryEntry] = [:]
        /// Holds on round trips seen by this process (placed here, announced or read from the store).
        var holds: [InstallationID: FlowTime] = [:]
        /// Installations known to have a registered trigger (refresh-ahead needs one).
        var triggerKnown: Set<InstallationID> = []
        /// Installations whose trigger registration this process has read from the store.
        var triggerChecked: Set<InstallationID> = []
        /// No refresh-ahead round before this instant (after a failed one).
        var refreshNotBefore: [InstallationID: FlowTime] = [:]
        /// Circuits this process opened.
        var openCircuits: Set<InstallationID> = []
        var nextWaiter: UInt64 = 0
        var nextTimerBase: UInt64 = 0
        var leasesHeld: [InstallationID: String] = [:]
        var shuttingDown = false
    }

    public let configuration: TokenFlowConfiguration
    let store: GatewayStore
    let trigger: any TriggerSender
    let metrics: FlowMetrics
    let logger: Logger
    let now: @Sendable () -> FlowTime
    /// This process's id, recorded as the owner of pending requests.
    public let replicaID: String
    /// Sees the actions performed (round-trip history); nil when nothing observes the flow.
    let observer: (any TokenFlowObserver)?
    private let state = Mutex(State())

    public init(
        configuration: TokenFlowConfiguration,
        store: GatewayStore,
        trigger: any TriggerSender,
        metrics: FlowMetrics,
        logger: Logger,
        replicaID: String,
        observer: (any TokenFlowObserver)? = nil,
        now: @escaping @Sendable () -> FlowTime = { FlowTime.now() }
    ) {
        self.configuration = configuration
        self.store = store
        self.trigger = trigger
        self.metrics = metrics
        self.logger = logger
        self.replicaID = replicaID
        self.observer = observer
        self.now = now
    }

    // MARK: - The facade

    /// A token for `installation` valid for at least `request.minValidity` seconds, from memory,
    /// the store, or one (coalesced) auth-trigger round trip within `request.timeout`.
    public func token(for installation: InstallationID, request: Request) async throws(FlowError) -> TokenAnswer {
        let start = self.now()
        let deadline = start + request.timeout
        do {
            let answer = try await self.resolve(installation, request: request, start: start, deadline: deadline)
            self.metrics.countTokenRequest(source: answer.source, outcome: "success")
            self.metrics.callerWait.recordNanoseconds((self.now() - start).nanoseconds)
            return answer
        } catch {
            self.metrics.countTokenRequest(source: nil, outcome: error.code.rawValue)
            self.metrics.callerWait.recordNanoseconds((self.now() - start).nanoseconds)
            throw error
        }
    }

    private func resolve(_ id: InstallationID, request: Request, start: FlowTime, deadline: FlowTime)
        async throws(FlowError) -> TokenAnswer
    {
        let nowSeconds = start.unixSeconds
        // The hot path: one lock, no Redis, no decryption. An expired token is dropped here, so
        // memory holds no token past its expiry once it has been asked for.
        let (remembered, rememberedBaseURL, localHold) = self.state.withLock {
            s -> (AccessToken?, String?, FlowTime?) in
            var hold = s.holds[id]
            if let until = hold, until <= start {
                s.holds[id] = nil
                hold = nil
            }
            guard let entry = s.memory[id] else { return (nil, nil, hold) }
            guard let t = entry.token else { return (nil, entry.apiBaseUrl, hold) }
            if t.expiresAt <= nowSeconds {
                s.memory[id]?.token = nil
                return (nil, entry.apiBaseUrl, hold)
            }
            return (t, entry.apiBaseUrl, hold)
        }
        if !request.forceRefresh, let t = remembered, t.expiresAt >= nowSeconds + request.minValidity {
            self.refreshAheadIfStale(id, t, now: start)
            return TokenAnswer(token: t, source: .cache, apiBaseUrl: rememberedBaseURL)
        }
        if !request.forceRefresh, let until = localHold, let t = remembered {
            // A hold this process knows of: answered at once from memory, no Redis, no round trip.
            return try await self.waitCatchingCancellation(
                for: id, request: request, knownExpiry: t.expiresAt, deadline: deadline,
                apiBaseUrl: rememberedBaseURL, hold: RoundTripHold(until: until, newest: t))
        }
        let snapshot: GatewayStore.RequestSnapshot
        do {
            snapshot = try await self.store.snapshot(id, timeout: min(deadline - start, .seconds(2)))
        } catch {
            // Redis is unreachable: a still-valid token held in memory is served, except to a forced
            // refresh, which asks for a token other than the one it holds.
            if !request.forceRefresh, let t = remembered, t.expiresAt > self.now().unixSeconds {
                return TokenAnswer(token: t, source: .cache, apiBaseUrl: rememberedBaseURL)
            }
            self.logger.warning(
                "store unavailable for token request", metadata: ["installation.id": "\(id)", "error": "\(error)"])
            throw .storeUnavailable
        }
        guard snapshot.exists else { throw .installationNotFound }
        guard snapshot.status == .active else {
            self.forget(id)
            throw .installationUninstalled
        }
        let baseURL = snapshot.apiBaseUrl ?? rememberedBaseURL
        let hold = snapshot.holdRemaining.map { RoundTripHold(until: start + $0, newest: snapshot.token) }
        self.state.withLock {
            if snapshot.triggerRegistered { $0.triggerKnown.insert(id) } else { $0.triggerKnown.remove(id) }
            $0.triggerChecked.insert(id)
            if let hold { $0.holds[id] = hold.until }
        }
        self.remember(id, snapshot.token, apiBaseUrl: snapshot.apiBaseUrl)
        if let t = snapshot.token {
            if !request.forceRefresh, t.expiresAt >= nowSeconds + request.minValidity {
                self.refreshAheadIfStale(id, t, now: start)
                return TokenAnswer(token: t, source: .cache, apiBaseUrl: baseURL)
            }
        }
        if !request.forceRefresh, let hold {
            // A round trip brought no newer token a moment ago: answered at once, no round trip.
            return try await self.waitCatchingCancellation(
                for: id, request: request, knownExpiry: snapshot.token?.expiresAt ?? 0, deadline: deadline,
                apiBaseUrl: baseURL, hold: hold)
        }
        if snapshot.circuitOpenUntil > start.unixMilliseconds {
            // Recent round trips failed: answer at once instead of adding to the storm.
            let wait = Duration.milliseconds(snapshot.circuitOpenUntil - start.unixMilliseconds)
            throw .circuitOpen(retryAfter: wait)
        }
        guard snapshot.triggerRegistered else {
            if !request.forceRefresh, let t = snapshot.token, t.expiresAt > nowSeconds {
                return TokenAnswer(token: t, source: .cache, apiBaseUrl: baseURL)
            }
            throw .noTriggerURL
        }
        return try await self.waitCatchingCancellation(
            for: id, request: request, knownExpiry: snapshot.token?.expiresAt ?? 0, deadline: deadline,
            apiBaseUrl: baseURL, hold: nil)
    }

    private func waitCatchingCancellation(
        for id: InstallationID, request: Request, knownExpiry: Int64, deadline: FlowTime, apiBaseUrl: String?,
        hold: RoundTripHold?
    ) async throws(FlowError) -> TokenAnswer {
        do {
            return try await self.wait(
                for: id, request: request, knownExpiry: knownExpiry, deadline: deadline, apiBaseUrl: apiBaseUrl,
                hold: hold)
        } catch let error as FlowError {
            throw error
        } catch {
            throw .cancelled
        }
    }

    private func wait(
        for id: InstallationID, request: Request, knownExpiry: Int64, deadline: FlowTime, apiBaseUrl: String?,
        hold: RoundTripHold?
    ) async throws -> TokenAnswer
    {
        let waiter = self.state.withLock { s -> WaiterID in
            s.nextWaiter += 1
            return WaiterID(s.nextWaiter)
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<TokenAnswer, any Error>) in
                let now = self.now()
                let requestID = Self.makeRequestID()
                var overloaded = false
                let (actions, coalesced, refused, answered) = self.state.withLock {
                    s -> ([FlowAction], Bool, Bool, TokenAnswer?) in
                    if s.shuttingDown { return ([], false, true, nil) }
                    // A round may have ended between this caller's store read and now (its token is
                    // in memory, the machine gone): a token that satisfies the caller answers it,
                    // instead of a second round trip for the same installation.
                    if !request.forceRefresh, s.machines[id]?.isActive != true, let t = s.memory[id]?.token,
                        t.expiresAt >= now.unixSeconds + request.minValidity, t.expiresAt > now.unixSeconds
                    {
                        return (
                            [], false, false,
                            TokenAnswer(token: t, source: .cache, apiBaseUrl: s.memory[id]?.apiBaseUrl ?? apiBaseUrl)
                        )
                    }
                    // Caps: a flood of callers (of one installation or of all) cannot grow memory
                    // without bound; the excess is refused at once with `overloaded`.
                    let waitingHere = s.waitersPerInstallation[id] ?? 0
                    if waitingHere >= self.configuration.maxWaitersPerInstallation
                        || s.waiters.count >= self.configuration.maxWaiters
                    {
                        overloaded = true
                        return ([], false, false, nil)
                    }
                    s.waiters[waiter] = continuation
                    s.waiterInstallation[waiter] = id
                    s.waitersPerInstallation[id] = waitingHere + 1
                    if let apiBaseUrl { s.waiterBaseURL[waiter] = apiBaseUrl }
                    var machine = s.machines[id] ?? self.makeMachine(&s)
                    let wasActive = machine.isActive
                    let actions = machine.tokenWasRequested(
                        waiter: waiter, minValidity: request.minValidity, knownExpiry: knownExpiry,
                        forced: request.forceRefresh, deadline: deadline, requestID: requestID, hold: hold, now: now)
                    if machine.isActive { s.machines[id] = machine }
                    return (actions, wasActive, false, nil)
                }
                if refused {
                    continuation.resume(throwing: FlowError.shuttingDown)
                    return
                }
                if let answered {
                    continuation.resume(returning: answered)
                    return
                }
                if overloaded {
                    self.metrics.overloadedRequests.increment()
                    continuation.resume(throwing: FlowError.overloaded)
                    return
                }
                if coalesced, !actions.contains(.recordHold(.requestHeld)) { self.metrics.coalescedWaiters.increment() }
                self.perform(actions, for: id)
            }
        } onCancel: {
            self.handle(id) { $0.waiterCancelled(waiter, now: self.now()) }
        }
    }

    private func makeMachine(_ s: inout State) -> TokenFlowStateMachine {
        s.nextTimerBase += 1 << 32
        return TokenFlowStateMachine(configuration: self.configuration, firstTimerID: s.nextTimerBase)
    }

    static func makeRequestID() -> String {
        var g = SystemRandomNumberGenerator()
        let a = g.next() as UInt64
        let b = g.next() as UInt64
        return "rq_" + String(a, radix: 36) + String(b, radix: 36)
    }

    /// Starts one background round trip when `token` is inside its refresh-ahead window and
    /// nothing runs for the installation yet. Callers are never made to wait for it.
    func refreshAheadIfStale(_ id: InstallationID, _ token: AccessToken, now: FlowTime) {
        guard token.isStale(at: now, fraction: self.configuration.refreshAheadFraction) else { return }
        let checked = self.state.withLock { $0.triggerChecked.contains(id) }
        if !checked {
            // A token that reached memory without a store read (a push): learn whether a trigger
            // is registered first, off the caller's path.
            Task {
                guard let snapshot = try? await self.store.snapshot(id, timeout: .seconds(2)) else { return }
                self.state.withLock {
                    if snapshot.triggerRegistered { $0.triggerKnown.insert(id) }
                    $0.triggerChecked.insert(id)
                }
                if snapshot.status == .active, snapshot.triggerRegistered {
                    self.refreshAheadIfStale(id, token, now: self.now())
                }
            }
            return
        }
        let actions = self.state.withLock { s -> [FlowAction] in
            guard !s.shuttingDown, s.triggerKnown.contains(id) else { return [] }
            if let notBefore = s.refreshNotBefore[id], now < notBefore { return [] }
            if let m = s.machines[id], m.isActive { return [] }
            var machine = self.makeMachine(&s)
            let hold = s.holds[id].map { RoundTripHold(until: $0, newest: token) }
            let actions = machine.refreshAheadWasRequested(
                knownExpiry: token.expiresAt, requestID: Self.makeRequestID(), hold: hold, now: now)
            guard machine.isActive else { return actions }
            s.machines[id] = machine
            // Whatever its outcome, no second background round for a while.
            s.refreshNotBefore[id] = now + self.configuration.refreshAheadCooldown
            return actions
        }
        if actions.contains(where: { if case .acquireLease = $0 { return true } else { return false } }) {
            self.logger.debug("refresh-ahead started", metadata: ["installation.id": "\(id)"])
        }
        self.perform(actions, for: id)
    }

    private func recordRound(_ id: InstallationID, succeeded: Bool) async {
        do {
            let openUntil = try await self.store.recordRoundOutcome(
                id, succeeded: succeeded, threshold: self.configuration.breakerThreshold,
                openBase: self.configuration.breakerOpenBase, openCap: self.configuration.breakerOpenCap,
                now: self.now())
            let count = self.state.withLock { s -> Int in
                if openUntil != nil { s.openCircuits.insert(id) } else if succeeded { s.openCircuits.remove(id) }
                return s.openCircuits.count
            }
            self.metrics.circuitsOpen.set(count)
            if let openUntil {
                self.logger.warning(
                    "circuit opened after consecutive failed round trips",
                    metadata: ["installation.id": "\(id)", "circuit.open_until_ms": "\(openUntil)"])
            }
        } catch {
            self.logger.warning("could not record round-trip outcome", metadata: ["installation.id": "\(id)"])
        }
    }

    // MARK: - Inputs from the rest of the gateway

    /// A token was delivered to this process (a Forge route) and stored. Remembers it with the
    /// installation's `apiBaseUrl` (as the store holds it after the delivery: the latest FIT's)
    /// and answers local waiters.
    public func tokenDelivered(
        _ id: InstallationID, token: AccessToken, apiBaseUrl: String? = nil, solicitedBy: String?
    ) {
        self.remember(id, token, apiBaseUrl: apiBaseUrl)
        self.handle(id) { $0.tokenObserved(token, solicitedBy: solicitedBy, now: self.now()) }
    }

    /// A delivery to this process answered round trip `requestID` but did not replace the stored
    /// token (Forge handed out a token no newer than the one held). `newest` is the stored token.
    /// If this process leads that round trip, its callers are answered and the hold is placed.
    public func deliveryBroughtNoNewerToken(
        _ id: InstallationID, requestID: String, newest: AccessToken?, apiBaseUrl: String? = nil
    ) {
        self.remember(id, newest, apiBaseUrl: apiBaseUrl)
        self.handle(id) { $0.roundTripBroughtNoNewerToken(requestID: requestID, newest: newest, now: self.now()) }
    }

    /// The installation's `apiBaseUrl` as the store holds it after a verified FIT (the latest FIT's):
    /// answers from memory carry it from now on.
    public func apiBaseUrlSeen(_ id: InstallationID, _ apiBaseUrl: String?) {
        self.remember(id, nil, apiBaseUrl: apiBaseUrl)
    }

    /// The installation was uninstalled: forget its token and fail its waiters with 410.
    public func installationUninstalled(_ id: InstallationID) {
        self.forget(id)
        self.handle(id) { $0.installationUninstalled(now: self.now()) }
    }

    /// The token this process holds in memory for `id`, if any.
    public func rememberedToken(_ id: InstallationID) -> AccessToken? {
        self.state.withLock { $0.memory[id]?.token }
    }

    /// The token and `apiBaseUrl` this process holds in memory for `id`.
    public func remembered(_ id: InstallationID) -> (token: AccessToken?, apiBaseUrl: String?) {
        self.state.withLock { ($0.memory[id]?.token, $0.memory[id]?.apiBaseUrl) }
    }

    /// Until when this process knows `id`'s round trips to be on hold, if it knows of a hold.
    public func holdUntil(_ id: InstallationID) -> FlowTime? {
        self.state.withLock { $0.holds[id] }
    }

    /// Whether a round trip (or a refresh-ahead) for `id` is in flight in this process.
    public func isRoundActive(_ id: InstallationID) -> Bool {
        self.state.withLock { $0.machines[id]?.isActive == true }
    }

    /// Remembers `token` (when it is newer than the one held) and `apiBaseUrl` (when known: it is
    /// the latest FIT's, so it replaces the one held).
    func remember(_ id: InstallationID, _ token: AccessToken?, apiBaseUrl: String?) {
        guard token != nil || apiBaseUrl != nil else { return }
        self.state.withLock { s in
            var entry = s.memory[id] ?? MemoryEntry()
            if let apiBaseUrl { entry.apiBaseUrl = apiBaseUrl }
            if let token, (entry.token?.expiresAt ?? Int64.min) < token.expiresAt { entry.token = token }
            s.memory[id] = entry
        }
    }

    func forget(_ id: InstallationID) {
        self.state.withLock {
            $0.memory[id] = nil
            $0.holds[id] = nil
            $0.triggerKnown.remove(id)
            $0.triggerChecked.remove(id)
        }
    }

    // MARK: - Running actions

    /// Feeds one event to the installation's machine (if it exists) and runs the resulting actions.
    func handle(_ id: InstallationID, _ event: (inout TokenFlowStateMachine) -> [FlowAction]) {
        let actions = self.state.withLock { s -> [FlowAction] in
            guard var machine = s.machines[id] else { return [] }
            let actions = event(&machine)
            if machine.isActive {
                s.machines[id] = machine
            } else {
                s.machines[id] = nil
            }
            return actions
        }
        self.perform(actions, for: id)
    }

    func perform(_ actions: [FlowAction], for id: InstallationID) {
        if let observer = self.observer, !actions.isEmpty { observer.tokenFlow(performs: actions, for: id, at: self.now()) }
        for action in actions {
            switch action {
            case .acquireLease(let requestID, let ttl):
                Task { await self.acquireLease(id, requestID: requestID, ttl: ttl, respectingHold: true) }
            case .acquireLeaseIgnoringHold(let requestID, let ttl):
                Task { await self.acquireLease(id, requestID: requestID, ttl: ttl, respectingHold: false) }
            case .extendLease(let requestID, let ttl):
                Task { _ = try? await self.store.extendLease(id, owner: requestID, ttl: ttl) }
            case .releaseLease(let requestID):
                let held = self.state.withLock { s -> Bool in
                    guard s.leasesHeld[id] == requestID else { return false }
                    s.leasesHeld[id] = nil
                    return true
                }
                if held {
                    self.metrics.leasesHeld.decrement()
                    Task { _ = try? await self.store.releaseLease(id, owner: requestID) }
                }
            case .placeHold(let requestID, let duration, let releasingLease):
                let held = self.state.withLock { s -> Bool in
                    s.holds[id] = self.now() + duration
                    guard releasingLease, s.leasesHeld[id] == requestID else { return false }
                    s.leasesHeld[id] = nil
                    return true
                }
                if held { self.metrics.leasesHeld.decrement() }
                self.logger.info(
                    "round trip brought no newer token; round trips on hold",
                    metadata: ["installation.id": "\(id)", "hold.ms": "\(duration.milliseconds)"])
                Task {
                    do {
                        try await self.store.placeHold(
                            id, requestID: requestID, duration: duration, releasingLease: releasingLease)
                    } catch {
                        self.logger.warning(
                            "could not place the round-trip hold", metadata: ["installation.id": "\(id)"])
                        if releasingLease { _ = try? await self.store.releaseLease(id, owner: requestID) }
                    }
                }
            case .recordHold(let event):
                self.metrics.countHold(event)
            case .sendTrigger(let requestID, let attempt, let expiresAt, let timeout):
                Task { await self.sendTrigger(id, requestID: requestID, attempt: attempt, expiresAt: expiresAt, timeout: timeout) }
            case .readStore(let requestID):
                Task { await self.readStore(id, requestID: requestID) }
            case .scheduleTimer(let timer, let deadline):
                self.schedule(timer, for: id, at: deadline)
            case .cancelTimer(let timer):
                let task = self.state.withLock { $0.timers.removeValue(forKey: TimerKey(installation: id, timer: timer)) }
                task?.cancel()
            case .succeed(let waiters, let token, let source):
                let current = self.state.withLock { $0.memory[id]?.apiBaseUrl }
                for (continuation, baseURL) in self.takeWaiters(waiters) {
                    continuation.resume(
                        returning: TokenAnswer(token: token, source: source, apiBaseUrl: current ?? baseURL))
                }
            case .fail(let waiters, let error):
                for (continuation, _) in self.takeWaiters(waiters) {
                    continuation.resume(throwing: error)
                }
            case .recordRetry:
                self.metrics.triggerRetries.increment()
            case .roundFinished(let succeeded):
                if succeeded { self.state.withLock { _ = $0.refreshNotBefore.removeValue(forKey: id) } }
                Task { await self.recordRound(id, succeeded: succeeded) }
            case .recordAttempt(let outcome):
                self.metrics.countAttempt(outcome: outcome)
                if outcome != "success" {
                    self.logger.notice(
                        "trigger attempt failed",
                        metadata: ["installation.id": "\(id)", "trigger.outcome": "\(outcome)"])
                }
            }
        }
    }

    private func takeWaiters(_ ids: [WaiterID]) -> [(CheckedContinuation<TokenAnswer, any Error>, String?)] {
        self.state.withLock { s in
            ids.compactMap { id in
                guard let c = s.waiters.removeValue(forKey: id) else { return nil }
                if let installation = s.waiterInstallation.removeValue(forKey: id) {
                    let left = (s.waitersPerInstallation[installation] ?? 1) - 1
                    s.waitersPerInstallation[installation] = left > 0 ? left : nil
                }
                return (c, s.waiterBaseURL.removeValue(forKey: id))
            }
        }
    }

    private func schedule(_ timer: TimerID, for id: InstallationID, at deadline: FlowTime) {
        let key = TimerKey(installation: id, timer: timer)
        let delay = deadline - self.now()
        let task = Task {
            if delay > .zero {
                do { try await Task.sleep(for: delay) } catch { return }
            }
            let current = self.state.withLock { $0.timers.removeValue(forKey: key) != nil }
            guard current else { return }
            self.handle(id) { $0.timerFired(timer, now: self.now(), jitter: Double.random(in: 0...1)) }
        }
        self.state.withLock { $0.timers[key] = task }
    }

    private func acquireLease(_ id: InstallationID, requestID: String, ttl: Duration, respectingHold: Bool) async {
        do {
            switch try await self.store.takeLease(id, owner: requestID, ttl: ttl, respectingHold: respectingHold) {
            case .taken:
                try await self.store.putPending(id, requestID: requestID, owner: self.replicaID, ttl: ttl)
                self.state.withLock { $0.leasesHeld[id] = requestID }
                self.metrics.leasesHeld.increment()
                self.handle(id) { $0.leaseAcquired(requestID: requestID, now: self.now()) }
            case .busy:
                self.handle(id) { $0.leaseDenied(requestID: requestID, now: self.now()) }
            case .held(let remaining):
                // Another round trip just brought no newer token: answer with the newest one.
                let now = self.now()
                let entry = try await self.store.systemTokenEntry(id)
                self.remember(id, entry.token, apiBaseUrl: entry.apiBaseUrl)
                let hold = RoundTripHold(until: now + remaining, newest: entry.token)
                self.state.withLock { $0.holds[id] = hold.until }
                self.handle(id) { $0.leaseHeld(requestID: requestID, hold: hold, now: self.now()) }
            }
        } catch {
            self.logger.warning(
                "store unavailable while taking the lease", metadata: ["installation.id": "\(id)", "error": "\(error)"])
            self.handle(id) { $0.storeFailed(requestID: requestID, now: self.now()) }
        }
    }

    private func sendTrigger(_ id: InstallationID, requestID: String, attempt: Int, expiresAt: FlowTime, timeout: Duration)
        async
    {
        let started = self.now()
        self.logger.debug(
            "sending auth trigger",
            metadata: ["installation.id": "\(id)", "request.id": "\(requestID)", "trigger.attempt": "\(attempt)"])
        let result = await self.trigger.sendTrigger(
            installation: id, requestID: requestID, attempt: attempt, issuedAt: started, expiresAt: expiresAt,
            timeout: timeout)
        let now = self.now()
        switch result {
        case .accepted:
            self.metrics.roundTrip.recordNanoseconds((now - started).nanoseconds)
            self.handle(id) { $0.triggerSucceeded(requestID: requestID, attempt: attempt, now: now) }
        case .failed(let failure):
            self.handle(id) {
                $0.triggerFailed(
                    requestID: requestID, attempt: attempt, failure: failure, now: now, jitter: Double.random(in: 0...1))
            }
        }
    }

    /// Reads the token, the round trip's pending request and the hold, and feeds what it found to
    /// the machine: the token (solicited when this round stored it), a delivery that answered this
    /// round without replacing the token (its pending request consumed), a hold, or nothing.
    private func readStore(_ id: InstallationID, requestID: String) async {
        do {
            let probe = try await self.store.roundProbe(id, requestID: requestID)
            self.remember(id, probe.token, apiBaseUrl: probe.apiBaseUrl)
            let now = self.now()
            let hold = probe.holdRemaining.map { RoundTripHold(until: now + $0, newest: probe.token) }
            if let hold { self.state.withLock { $0.holds[id] = hold.until } }
            self.handle(id) { m in
                var actions: [FlowAction] = []
                if let token = probe.token {
                    let solicited = token.requestID == requestID ? requestID : nil
                    actions += m.tokenObserved(token, solicitedBy: solicited, now: now)
                }
                if !probe.pendingOpen, probe.token?.requestID != requestID, m.currentRequestID == requestID {
                    // Consumed by a delivery that did not replace the token (ignored unless this
                    // process leads the round trip: only the leader records a pending request).
                    actions += m.roundTripBroughtNoNewerToken(requestID: requestID, newest: probe.token, now: now)
                }
                if let hold, m.isActive { actions += m.holdObserved(hold, now: now) }
                if probe.token == nil, m.isActive { actions += m.storeReadEmpty(requestID: requestID, now: now) }
                return actions
            }
        } catch {
            self.handle(id) { $0.storeFailed(requestID: requestID, now: self.now()) }
        }
    }

    // MARK: - Service

    /// Listens for the notifications of every process (token stored, installation uninstalled)
    /// until graceful shutdown; then fails waiting callers that are still waiting and releases leases.
    public func run() async throws {
        let events = self.store.redis.subscribe(channels: [self.store.channel])
        await withGracefulShutdownHandler {
            await cancelWhenGracefulShutdown {
                for await event in events {
                    await self.handleNotification(event)
                }
            }
        } onGracefulShutdown: {
            self.logger.info("token flow draining")
        }
        await self.shutdown()
    }

    func handleNotification(_ event: RedisPubSubEvent) async {
        switch event {
        case .subscribed:
            // Messages may have been lost while reconnecting: re-read the store for every round in flight.
            let active = self.state.withLock { s in
                s.machines.compactMap { entry in entry.value.currentRequestID.map { (entry.key, $0) } }
            }
            for (id, rid) in active { await self.readStore(id, requestID: rid) }
        case .message(_, let payload):
            let parts = payload.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let id = InstallationID(String(parts[1])) else { return }
            switch parts[0] {
            case "token", "hold", "base":
                // `token <ari> <requestId|-> [same]`: a token was stored, or (`same`) a delivery
                // answered that round trip without replacing the stored token. `hold <ari>`: round
                // trips are on hold. `base <ari>`: the installation's apiBaseUrl changed.
                let solicited = parts[0] == "token" && parts.count > 2 && parts[2] != "-" ? String(parts[2]) : nil
                let same = parts[0] == "token" && parts.count > 3 && parts[3] == "same"
                let interested = self.state.withLock { $0.machines[id] != nil || $0.memory[id] != nil }
                guard interested else { return }
                do {
                    let entry = try await self.store.systemTokenEntry(id)
                    self.remember(id, entry.token, apiBaseUrl: entry.apiBaseUrl)
                    let now = self.now()
                    let hold = entry.holdRemaining.map { RoundTripHold(until: now + $0, newest: entry.token) }
                    if let hold { self.state.withLock { $0.holds[id] = hold.until } }
                    self.handle(id) { m in
                        var actions: [FlowAction] = []
                        if same, let solicited {
                            actions += m.roundTripBroughtNoNewerToken(requestID: solicited, newest: entry.token, now: now)
                        }
                        if let token = entry.token, m.isActive {
                            actions += m.tokenObserved(token, solicitedBy: same ? nil : solicited, now: now)
                        }
                        if let hold, m.isActive { actions += m.holdObserved(hold, now: now) }
                        return actions
                    }
                } catch {
                    // The polling fallback will pick it up.
                }
            case "uninstalled":
                self.installationUninstalled(id)
            default:
                return
            }
        }
    }

    /// Fails every caller still waiting, cancels timers and releases the leases this process holds.
    public func shutdown() async {
        let (ids, held) = self.state.withLock { s -> ([InstallationID], [InstallationID: String]) in
            s.shuttingDown = true
            let held = s.leasesHeld
            s.leasesHeld.removeAll()
            return (Array(s.machines.keys), held)
        }
        for id in ids { self.handle(id) { $0.shutdownRequested(now: self.now()) } }
        for (id, requestID) in held {
            self.metrics.leasesHeld.decrement()
            _ = try? await self.store.releaseLease(id, owner: requestID)
        }
        let timers = self.state.withLock { s -> [Task<Void, Never>] in
            let t = Array(s.timers.values)
            s.timers.removeAll()
            return t
        }
        for t in timers { t.cancel() }
    }
}
