import Logging
import ServiceLifecycle
import Synchronization

/// Runs the per-installation ``TokenFlowStateMachine``s: the synchronous "get token" facade.
///
/// A lock guards the machines, the waiting callers' continuations and the tokens held
/// in memory; actions are performed after the lock is released, and their results come back as
/// events. Concurrent callers for one installation share one round trip; the lease in the store
/// makes that one round trip across every replica sharing it.
///
/// Runs as a `Service`: every piece of work an action asks for (a store call, a trigger call, a
/// timer) runs as a child task of ``run()``, and the notifications of every replica are read
/// there too. On graceful shutdown waiting callers are answered with `shutting_down`, leases are
/// released, and `run()` returns once every child task has ended. Callers await their answer from
/// their own task; nothing waits by polling: a caller is woken by a notification, a delivery, or
/// a timer its machine asked for (the store re-read while following is a safety net for a lost
/// notification).
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

    struct TimerKey: Hashable, Sendable {
        var installation: InstallationID
        var timer: TimerID
    }

    /// What this process remembers of an installation: its newest token and its `apiBaseUrl`
    /// (from the latest verified FIT), kept together so every answer served from memory carries both.
    struct MemoryEntry {
        var token: AccessToken?
        var apiBaseUrl: String?
        /// Remembered before the subscription to the store's announcements last came up, so an
        /// announcement about it (an uninstall, a new `apiBaseUrl`, a hold) may have been lost:
        /// its token is not served while the store can be read, and the next store read verifies it.
        var unverified = false
    }

    /// A caller waiting in this process.
    struct Waiter {
        var continuation: CheckedContinuation<TokenAnswer, any Error>
        var installation: InstallationID
        var apiBaseUrl: String?
    }

    /// An announcement this process caused and has already handled itself (the token of a round
    /// trip it stored and handed to its machine, a hold it placed): its echo on the channel is not
    /// handled again. A push carries no request id to recognise it by, so its echo is handled.
    struct OwnAnnouncement: Hashable {
        var installation: InstallationID
        /// `token <requestId|->` or `hold`.
        var tag: String
    }

    typealias SnapshotFollower = CheckedContinuation<Result<SharedRead, any Error>?, Never>

    /// What a caller that shares another caller's store read gets when that read has not answered
    /// by the time its own read would have timed out: the same as a store read of its own that
    /// timed out.
    struct SharedReadTimedOut: Error, CustomStringConvertible {
        var description: String { "the store read this request shared did not answer within its timeout" }
    }

    /// A snapshot, with the ``State/memoryGeneration`` at which its read began (for every caller
    /// that shares it: the read may be older than a caller's arrival).
    struct SharedRead: Sendable {
        var snapshot: TokenStoreSnapshot
        var readAt: UInt64
    }

    struct LeaseMaterial {
        var requestID: String
        var read: TriggerMaterialRead
    }

    struct State: ~Copyable {
        var machines: [InstallationID: TokenFlowStateMachine] = [:]
        var waiters: [WaiterID: Waiter] = [:]
        /// How many callers wait per installation (the caps).
        var waitersPerInstallation: [InstallationID: Int] = [:]
        /// Callers reading the store before they are answered or wait (counted in the caps too),
        /// per installation and in all.
        var readersPerInstallation: [InstallationID: Int] = [:]
        var readers = 0
        var memory: [InstallationID: MemoryEntry] = [:]
        /// Entries added to `memory` since it was last swept of expired tokens, and how many it
        /// held after that sweep.
        var rememberedSinceSweep = 0
        var memoryAfterSweep = 0
        /// Installations known to have a registered trigger (refresh-ahead needs one).
        var triggerKnown: Set<InstallationID> = []
        /// Installations whose trigger registration this process has read from the store.
        var triggerChecked: Set<InstallationID> = []
        /// Circuits this process opened (the `circuitsOpen` gauge).
        /// Circuits this process opened, with the end of their open window.
        var openCircuits: [InstallationID: FlowTime] = [:]
        var ownAnnouncements: [OwnAnnouncement: FlowTime] = [:]
        var nextWaiter: UInt64 = 0
        var nextTimerBase: UInt64 = 0
        var leasesHeld: [InstallationID: String] = [:]
        /// Which take of the lease `leasesHeld` names (a round that lost its lease takes it again
        /// under the same request id): an extension's answer concerns the take it was sent for.
        var leaseTakes: [InstallationID: UInt64] = [:]
        var nextLeaseTake: UInt64 = 0
        /// The trigger material read with a lease this process took, kept for the first trigger
        /// call made under that take (keyed by installation, with the round's request id).
        var leaseMaterial: [InstallationID: LeaseMaterial] = [:]
        /// Leases this process held whose release failed: given back once the store's
        /// announcements are heard again (a lease a failed take may or may not have set is not
        /// owed).
        var releasesOwed = OwedReleases<InstallationID>()
        /// The store snapshots this process is reading, per installation, with the callers that
        /// arrived meanwhile and wait for the same answer.
        var snapshotsInFlight: [InstallationID: [UInt64: SnapshotFollower]] = [:]
        var nextSnapshotFollower: UInt64 = 0
        /// Installations whose trigger registration a refresh-ahead is reading (one read at a time).
        var triggerChecksInFlight: Set<InstallationID> = []
        /// A lease a snapshot of this process took for the round its caller would start, until
        /// that round takes it over (or it is given back).
        var leaseAhead: [InstallationID: SnapshotLease] = [:]
        /// How many times the store's announcements were (re)subscribed to.
        var subscriptions = 0
        /// The store's announcements are not being heard (the subscription was lost or refused):
        /// what memory holds stays unverified, so every caller reads the store, until the next
        /// ``TokenStoreNotification/subscribed``.
        var announcementsDown = false
        /// Callers of ``subscribed(times:)`` waiting, with the count each waits for.
        var subscriptionWaiters: [(times: Int, continuation: CheckedContinuation<Void, Never>)] = []
        /// Streams of ``notificationEvents()``, each told when a notification has been handled.
        var notificationListeners: [UInt64: AsyncStream<Void>.Continuation] = [:]
        var nextListener: UInt64 = 0
        /// Bumped whenever memory is forgotten or marked unverified: a store read that began
        /// before (``remember(_:_:apiBaseUrl:readAt:)``) is older than what memory now says.
        var memoryGeneration: UInt64 = 0
        var shuttingDown = false

        /// Whether one more caller of `id` would exceed the caps: callers waiting in rounds and
        /// callers reading the store (sharing a read in flight, or reading for themselves) count
        /// alike, per installation and in all.
        func isFull(_ id: InstallationID, _ configuration: TokenFlowConfiguration) -> Bool {
            (self.waitersPerInstallation[id] ?? 0) + (self.readersPerInstallation[id] ?? 0)
                >= configuration.maxWaitersPerInstallation
                || self.waiters.count + self.readers >= configuration.maxWaiters
        }

        /// Removes and returns the lease a snapshot took ahead for `id` when it is the one named
        /// `requestID` and no round has it: not while the installation's round is the one named
        /// for it, which takes it over in the step that performs its start (another caller, on
        /// another thread, may end its own request between that round's start and that step).
        mutating func takeUnusedLeaseAhead(_ id: InstallationID, named requestID: String) -> SnapshotLease? {
            guard let ahead = self.leaseAhead[id], ahead.requestID == requestID,
                self.machines[id]?.currentRequestID != requestID
            else { return nil }
            return self.leaseAhead.removeValue(forKey: id)
        }
    }

    /// One piece of work an action asked for, run as a child task of ``run()``.
    typealias Job = @Sendable () async -> Void

    public let configuration: TokenFlowConfiguration
    let store: any TokenStore
    let trigger: any TriggerSender
    let metrics: FlowMetrics
    let logger: Logger
    let clock: any FlowClock
    /// This process's id, recorded as the owner of pending requests.
    public let replicaID: String
    /// Sees the actions performed (round-trip history); nil when nothing observes the flow.
    let observer: (any TokenFlowObserver)?
    let state = Mutex(State())
    let jobs: (stream: AsyncStream<Job>, continuation: AsyncStream<Job>.Continuation)
    /// The machines' timers, each waited for by a child task of ``run()``.
    let timers: RoundTimers<TimerKey>
    /// The deadlines of callers sharing another caller's store read, keyed by follower number.
    let followerTimers: RoundTimers<UInt64>

    /// - Parameters:
    ///   - store: the shared store (``RedisTokenStore`` in production).
    ///   - trigger: sends auth-trigger calls.
    ///   - replicaID: this process's id, recorded as the owner of the pending requests it makes.
    ///   - observer: sees the actions performed, if anything observes the flow.
    ///   - clock: the wall clock and how to wait (a manual one in tests).
    public init(
        configuration: TokenFlowConfiguration,
        store: any TokenStore,
        trigger: any TriggerSender,
        metrics: FlowMetrics,
        logger: Logger,
        replicaID: String,
        observer: (any TokenFlowObserver)? = nil,
        clock: any FlowClock = SystemFlowClock()
    ) {
        self.configuration = configuration
        self.store = store
        self.trigger = trigger
        self.metrics = metrics
        self.logger = logger
        self.replicaID = replicaID
        self.observer = observer
        self.clock = clock
        self.jobs = AsyncStream.makeStream(of: Job.self)
        self.timers = RoundTimers(clock: clock)
        self.followerTimers = RoundTimers(clock: clock)
    }

    func now() -> FlowTime { self.clock.now() }

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

    /// The answer memory gives at once: a token this process holds that is valid for at least
    /// `minValidity` seconds, counted and timed like any answer of ``token(for:request:)``
    /// (refresh-ahead starts in the background when the token is in its window). Nil when the
    /// request needs the store or a round trip; a forced refresh never comes here.
    ///
    /// It takes one lock and touches neither the store nor a task, so it can be called from an
    /// event loop (the gateway's fast answers).
    public func tokenFromMemory(for id: InstallationID, minValidity: Int64) -> TokenAnswer? {
        let start = self.now()
        let memory = self.lookUpMemory(id, now: start)
        guard let t = memory.token, t.expiresAt >= start.unixSeconds + minValidity else { return nil }
        self.refreshAheadIfStale(id, t, now: start)
        self.metrics.countTokenRequest(source: .cache, outcome: "success")
        self.metrics.callerWait.recordNanoseconds((self.now() - start).nanoseconds)
        return TokenAnswer(token: t, source: .cache, apiBaseUrl: memory.apiBaseUrl)
    }

    /// What this process remembers of `id` (one lock).
    struct Remembered {
        /// Its token unless expired (an expired token is dropped on lookup, so memory holds no
        /// token past its expiry once it has been asked for) or unverified.
        var token: AccessToken?
        /// Its token while unverified (``MemoryEntry/unverified``): served only when the store
        /// cannot be read.
        var unverifiedToken: AccessToken?
        var apiBaseUrl: String?
        /// The hold its machine knows of.
        var hold: RoundTripHold?
        /// A round trip of this process with callers waiting is in flight for it.
        var roundActive = false
        /// Its trigger is known to be registered.
        var triggerKnown = false
    }

    private func lookUpMemory(_ id: InstallationID, now: FlowTime) -> Remembered {
        let nowSeconds = now.unixSeconds
        return self.state.withLock { s -> Remembered in
            let machine = s.machines[id]
            // A round with callers was read for a moment ago: a caller joins it without a read of
            // its own. One without (a refresh-ahead, or one seeing its trigger call through after
            // its callers left) may be older than a token stored since: the caller reads first.
            let roundActive = machine.map { $0.isActive && $0.waiterCount > 0 } ?? false
            var found = Remembered(
                hold: machine?.hold(at: now), roundActive: roundActive,
                triggerKnown: roundActive && s.triggerKnown.contains(id))
            guard let entry = s.memory[id] else { return found }
            found.apiBaseUrl = entry.apiBaseUrl
            if let t = entry.token, t.expiresAt <= nowSeconds {
                s.memory[id]?.token = nil
            } else if entry.unverified {
                found.unverifiedToken = entry.token
            } else {
                found.token = entry.token
            }
            return found
        }
    }

    /// A round trip of this process is in flight (its first caller read the store a moment ago):
    /// the caller joins it without reading the store again. A token another replica stores
    /// meanwhile reaches the round by its announcement. (A forced refresh reads the store first:
    /// the token it replaces may be one another replica stored that this process has not heard of
    /// yet, and it must not be handed back as the new one.) Nil when the round ended before the
    /// caller joined and no trigger is known now: the store says why (an uninstall answers 410),
    /// as for a caller that read it.
    private func joinRound(_ id: InstallationID, request: Request, memory: Remembered, deadline: FlowTime)
        async throws(FlowError) -> TokenAnswer?
    {
        do {
            return try await self.wait(
                for: id, request: request, knownExpiry: memory.token?.expiresAt ?? 0, deadline: deadline,
                apiBaseUrl: memory.apiBaseUrl, hold: memory.hold, current: memory.token,
                canStartRound: memory.triggerKnown)
        } catch  where error.code == .noTriggerURL {
            return nil
        }
    }

    private func resolve(_ id: InstallationID, request: Request, start: FlowTime, deadline: FlowTime)
        async throws(FlowError) -> TokenAnswer
    {
        let nowSeconds = start.unixSeconds
        // The hot path: one lock, no store, no decryption.
        let memory = self.lookUpMemory(id, now: start)
        let (remembered, rememberedBaseURL, localHold) = (memory.token, memory.apiBaseUrl, memory.hold)
        if !request.forceRefresh, let t = remembered, t.expiresAt >= nowSeconds + request.minValidity {
            self.refreshAheadIfStale(id, t, now: start)
            return TokenAnswer(token: t, source: .cache, apiBaseUrl: rememberedBaseURL)
        }
        if !request.forceRefresh, let hold = localHold, let t = remembered {
            // A hold this process knows of: answered at once from memory, no store, no round trip.
            return try await self.wait(
                for: id, request: request, knownExpiry: t.expiresAt, deadline: deadline,
                apiBaseUrl: rememberedBaseURL, hold: hold, current: t, canStartRound: true)
        }
        if memory.roundActive, !request.forceRefresh,
            let answer = try await self.joinRound(id, request: request, memory: memory, deadline: deadline)
        {
            return answer
        }
        let read: SharedRead
        let intent = SnapshotLeaseIntent(
            requestID: Self.makeRequestID(), replicaID: self.replicaID,
            ttl: max(deadline - start, .milliseconds(1)) + self.configuration.leaseGrace,
            minValidity: request.minValidity, forced: request.forceRefresh, now: start,
            material: self.trigger.triggerMaterialQuery(for: id))
        guard self.startReading(id) else { return try self.answerOverloaded(request, memory: memory, now: nowSeconds) }
        do {
            defer { self.doneReading(id) }
            // A token held in memory but not verified (announcements lost, or just back) is
            // served if the store does not answer soon: the read only checks it.
            let verifying =
                !request.forceRefresh
                && (memory.unverifiedToken.map { $0.expiresAt >= nowSeconds + request.minValidity } ?? false)
            let timeout = min(deadline - start, verifying ? self.configuration.verifyReadTimeout : .seconds(2))
            read = try await self.sharedSnapshot(id, timeout: timeout, until: start + timeout, intent: intent)
        } catch {
            // The store is unreachable: a still-valid token held in memory is served (unverified
            // too: nothing better can be known now), except to a forced refresh, which asks for a
            // token other than the one it holds.
            if !request.forceRefresh, let t = remembered ?? memory.unverifiedToken, t.expiresAt > self.now().unixSeconds
            {
                return TokenAnswer(token: t, source: .cache, apiBaseUrl: rememberedBaseURL)
            }
            self.logger.warning(
                "store unavailable for token request", metadata: ["installation.id": "\(id)", "error": "\(error)"])
            throw .storeUnavailable
        }
        let snapshot = read.snapshot
        // A lease this caller's snapshot took but no round will need is given back at once.
        guard snapshot.exists, snapshot.active else {
            self.giveBackLeaseAhead(id, named: intent.requestID)
            guard snapshot.exists else { throw .installationNotFound }
            self.forget(id)
            throw .installationUninstalled
        }
        let baseURL = snapshot.apiBaseUrl ?? rememberedBaseURL
        let hold = snapshot.holdRemaining.map { RoundTripHold(until: start + $0, newest: snapshot.token) }
        self.observe(id, snapshot, hold: hold, now: start)
        self.remember(id, snapshot.token, apiBaseUrl: snapshot.apiBaseUrl, readAt: read.readAt)
        if let t = snapshot.token, !request.forceRefresh, t.expiresAt >= nowSeconds + request.minValidity {
            self.giveBackLeaseAhead(id, named: intent.requestID)
            self.refreshAheadIfStale(id, t, now: start)
            return TokenAnswer(token: t, source: .cache, apiBaseUrl: baseURL)
        }
        // The machine decides the rest: a hold answers at once, an open circuit fails fast, no
        // trigger serves what is valid, else the caller joins or starts a round trip.
        return try await self.wait(
            for: id, request: request, knownExpiry: snapshot.token?.expiresAt ?? 0, deadline: deadline,
            apiBaseUrl: baseURL, hold: hold, current: snapshot.token, canStartRound: snapshot.triggerRegistered)
    }

    /// A caller past the caps (``startReading(_:)`` refused it). A token held in memory that
    /// satisfies it but is not verified (announcements lost: every caller reads the store, only to
    /// check it) is served, as it would be if the store did not answer soon; else `overloaded`.
    private func answerOverloaded(_ request: Request, memory: Remembered, now: Int64) throws(FlowError)
        -> TokenAnswer
    {
        if !request.forceRefresh, let t = memory.unverifiedToken, t.expiresAt >= now + request.minValidity {
            return TokenAnswer(token: t, source: .cache, apiBaseUrl: memory.apiBaseUrl)
        }
        self.metrics.overloadedRequests.increment()
        throw .overloaded
    }

    /// Counts a caller about to read the store (or share a read in flight) in the caps; false when
    /// they are reached (the caller is not counted): a flood of callers waiting on reads grows
    /// memory no more than one waiting on rounds. ``doneReading(_:)`` ends the count.
    private func startReading(_ id: InstallationID) -> Bool {
        self.state.withLock { s -> Bool in
            guard !s.isFull(id, self.configuration) else { return false }
            s.readersPerInstallation[id, default: 0] += 1
            s.readers += 1
            return true
        }
    }

    private func doneReading(_ id: InstallationID) {
        self.state.withLock { s in
            let left = (s.readersPerInstallation[id] ?? 1) - 1
            s.readersPerInstallation[id] = left > 0 ? left : nil
            s.readers -= 1
        }
    }

    /// The installation's snapshot, read once for every caller that needs it while a read is in
    /// flight: the first reads the store, callers arriving meanwhile get its answer (a read as
    /// recent as their own would be), or ``SharedReadTimedOut`` at `readDeadline` (when a read of
    /// their own would have timed out) if it has not come by then. A caller whose reader was
    /// cancelled or timed out (by a shorter deadline) reads for itself in the time it has left, and
    /// a forced refresh reads for itself.
    /// The reader's snapshot may take the lease for the round its caller would start (`intent`):
    /// it is kept as ``State/leaseAhead`` before anyone is answered, for the first round started.
    private func sharedSnapshot(
        _ id: InstallationID, timeout: Duration, until readDeadline: FlowTime, intent: SnapshotLeaseIntent
    ) async throws -> SharedRead {
        let ownRead = { (timeout: Duration) async throws -> SharedRead in
            let readAt = self.memoryGenerationNow()
            return SharedRead(snapshot: try await self.store.snapshot(id, timeout: timeout), readAt: readAt)
        }
        let leads = self.state.withLock { s -> Bool in
            guard s.snapshotsInFlight[id] == nil else { return false }
            s.snapshotsInFlight[id] = [:]
            return true
        }
        guard leads else {
            // A forced refresh reads for itself: a read in flight may have left before the token it
            // replaces was stored (by another replica), and that token would then count as newer.
            if intent.forced { return try await ownRead(timeout) }
            switch await self.followSnapshot(id, until: readDeadline) {
            case .some(.success(let read)):
                return read
            case .some(.failure(let error)) where error is SharedReadTimedOut || self.store.isUnreachable(error):
                // This caller's own time is up, or the store cannot be reached: as a read of its own.
                throw error
            default:
                // The read in flight ended before it answered (its reader cancelled, or timed out by
                // a shorter deadline than this caller's): this caller reads for itself, in the time
                // its own read has left.
                let left = readDeadline - self.now()
                guard left > .zero else { throw SharedReadTimedOut() }
                return try await ownRead(left)
            }
        }
        let result: Result<SharedRead, any Error>
        var replaced: SnapshotLease?
        let readAt = self.memoryGenerationNow()
        do {
            let (snapshot, lease) = try await self.store.snapshot(id, timeout: timeout, takingLease: intent)
            if let lease {
                replaced = self.state.withLock { s in
                    defer { s.leaseAhead[id] = s.shuttingDown ? nil : lease }
                    return s.shuttingDown ? lease : s.leaseAhead[id]
                }
            }
            result = .success(SharedRead(snapshot: snapshot, readAt: readAt))
        } catch {
            result = .failure(Task.isCancelled ? CancellationError() : error)
            // The script may have run with its answer lost (a timeout) or unread (cancelled): the
            // lease it may have taken is given back (the release script compares the owner). Not
            // when the store could not be reached: the script did not run.
            if self.store.mayHaveRun(failingWith: error) {
                await self.giveBackLease(id, requestID: intent.requestID, known: false)
            }
        }
        if let replaced { await self.giveBackLease(id, requestID: replaced.requestID) }
        let followers = self.state.withLock { $0.snapshotsInFlight.removeValue(forKey: id) ?? [:] }
        for (number, follower) in followers {
            self.followerTimers.cancel(number)
            follower.resume(returning: result)
        }
        return try result.get()
    }

    /// Waits for the store read of `id` in flight: its answer, ``SharedReadTimedOut`` when it has
    /// not come by `readDeadline` (a timer, a child task of ``run()``), or nil when the read
    /// ended before this caller joined.
    private func followSnapshot(_ id: InstallationID, until readDeadline: FlowTime) async
        -> Result<SharedRead, any Error>?
    {
        let number = self.state.withLock { s -> UInt64 in
            s.nextSnapshotFollower += 1
            return s.nextSnapshotFollower
        }
        self.followerTimers.arm(number)
        defer { self.followerTimers.cancel(number) }
        return await withCheckedContinuation { (follower: SnapshotFollower) in
            let joined = self.state.withLock { s -> Bool in
                guard s.snapshotsInFlight[id] != nil else { return false }
                s.snapshotsInFlight[id]?[number] = follower
                return true
            }
            guard joined else { return follower.resume(returning: nil) }
            self.submit {
                guard await self.followerTimers.wait(number, until: readDeadline) else { return }
                let late = self.state.withLock { $0.snapshotsInFlight[id]?.removeValue(forKey: number) }
                late?.resume(returning: .failure(SharedReadTimedOut()))
            }
        }
    }

    /// Feeds what a snapshot said about the installation (trigger, hold, circuit) to this process,
    /// and the token it read to a round in flight: to a round of this process that stored it and
    /// has not heard of it yet (its announcement is late or lost), as its own, so the round ends
    /// before the caller that read the snapshot joins (a forced refresh of that token then starts a
    /// round of its own instead of being answered with it); to a round following another
    /// replica's, as any value read, so its callers do not wait for a re-read: the snapshot put
    /// the token in memory, and the announcement of that token is then taken as already handled.
    private func observe(_ id: InstallationID, _ snapshot: TokenStoreSnapshot, hold: RoundTripHold?, now: FlowTime) {
        let actions = self.state.withLock { s -> [FlowAction] in
            if snapshot.triggerRegistered { s.triggerKnown.insert(id) } else { s.triggerKnown.remove(id) }
            s.triggerChecked.insert(id)
            guard hold != nil || snapshot.circuitOpenUntil != nil || s.machines[id] != nil else { return [] }
            var machine = s.machines[id] ?? self.makeMachine(&s)
            var actions: [FlowAction] = []
            if let token = snapshot.token, let round = machine.currentRequestID {
                actions += machine.valueObserved(token, solicitedBy: token.requestID == round ? round : nil, now: now)
            }
            if let hold { actions += machine.holdObserved(hold, now: now) }
            actions += machine.circuitObserved(openUntil: snapshot.circuitOpenUntil, now: now)
            s.machines[id] = machine.isRetained(at: now) ? machine : nil
            return actions
        }
        self.perform(actions, for: id)
    }

    private func wait(
        for id: InstallationID, request: Request, knownExpiry: Int64, deadline: FlowTime, apiBaseUrl: String?,
        hold: RoundTripHold?, current: AccessToken?, canStartRound: Bool
    ) async throws(FlowError) -> TokenAnswer {
        let waiter = self.state.withLock { s -> WaiterID in
            s.nextWaiter += 1
            return WaiterID(s.nextWaiter)
        }
        do {
            return try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation {
                    (continuation: CheckedContinuation<TokenAnswer, any Error>) in
                    self.admit(
                        waiter, continuation, for: id, request: request, knownExpiry: knownExpiry, deadline: deadline,
                        apiBaseUrl: apiBaseUrl, hold: hold, current: current, canStartRound: canStartRound)
                    // Cancelled before it was admitted: the cancellation handler ran when there was no
                    // waiter yet to drop, so it is dropped now.
                    if Task.isCancelled { self.handle(id) { $0.waiterCancelled(waiter, now: self.now()) } }
                }
            } onCancel: {
                self.handle(id) { $0.waiterCancelled(waiter, now: self.now()) }
            }
        } catch let error as FlowError {
            throw error
        } catch {
            throw .cancelled
        }
    }

    /// Registers a waiting caller (within the caps) and feeds its request to the machine.
    private func admit(
        _ waiter: WaiterID, _ continuation: CheckedContinuation<TokenAnswer, any Error>, for id: InstallationID,
        request: Request, knownExpiry: Int64, deadline: FlowTime, apiBaseUrl: String?, hold: RoundTripHold?,
        current: AccessToken?, canStartRound: Bool
    ) {
        enum Admission {
            case refused(FlowError)
            case admitted([FlowAction], coalesced: Bool)
        }
        let now = self.now()
        let fresh = Self.makeRequestID()
        var requestID = fresh
        let admission = self.state.withLock { s -> Admission in
            if s.shuttingDown { return .refused(.shuttingDown) }
            // A lease a snapshot took ahead names the round this caller would start.
            requestID = s.leaseAhead[id]?.requestID ?? fresh
            // Caps: a flood of callers (of one installation or of all) cannot grow memory
            // without bound; the excess is refused at once with `overloaded`.
            if s.isFull(id, self.configuration) { return .refused(.overloaded) }
            s.waiters[waiter] = Waiter(continuation: continuation, installation: id, apiBaseUrl: apiBaseUrl)
            s.waitersPerInstallation[id, default: 0] += 1
            // A round may have ended between this caller's store read and now: the newest token
            // in memory is the one the machine judges.
            var newest = current
            if let entry = s.memory[id], !entry.unverified, let t = entry.token,
                t.expiresAt > (newest?.expiresAt ?? .min)
            {
                newest = t
            }
            var machine = s.machines[id] ?? self.makeMachine(&s)
            let wasActive = machine.isActive
            let actions = machine.tokenWasRequested(
                waiter: waiter, minValidity: request.minValidity, knownExpiry: knownExpiry,
                forced: request.forceRefresh, deadline: deadline, requestID: requestID, hold: hold, current: newest,
                canStartRound: canStartRound, now: now)
            s.machines[id] = machine.isRetained(at: now) ? machine : nil
            return .admitted(actions, coalesced: wasActive)
        }
        switch admission {
        case .refused(let error):
            if error == .overloaded { self.metrics.overloadedRequests.increment() }
            continuation.resume(throwing: error)
        case .admitted(let actions, let coalesced):
            if coalesced, !actions.contains(.recordHold(.requestHeld)) { self.metrics.coalescedWaiters.increment() }
            self.perform(actions, for: id)
        }
        // The lease taken ahead went to the round this caller started, or to none: given back.
        self.giveBackLeaseAhead(id, named: requestID)
    }

    /// Gives back the lease a snapshot took ahead for `id`, if it is the one named `requestID` and
    /// no round has taken it over or is about to (``State/takeUnusedLeaseAhead(_:named:)``).
    func giveBackLeaseAhead(_ id: InstallationID, named requestID: String) {
        let unused = self.state.withLock { $0.takeUnusedLeaseAhead(id, named: requestID) }
        guard let unused else { return }
        self.submit { await self.releaseLease(id, requestID: unused.requestID) }
    }

    /// Takes over the lease a snapshot took ahead when it is the one named `requestID`: this
    /// process now holds it for that round, with the trigger material read with it. Returns it
    /// (its expiry was set for the deadline of the caller whose read took it), or nil.
    func takeOverLeaseAhead(_ id: InstallationID, requestID: String) -> SnapshotLease? {
        let taken = self.state.withLock { s -> SnapshotLease? in
            guard !s.shuttingDown, let ahead = s.leaseAhead[id], ahead.requestID == requestID else { return nil }
            s.leaseAhead[id] = nil
            s.leasesHeld[id] = requestID
            s.nextLeaseTake += 1
            s.leaseTakes[id] = s.nextLeaseTake
            s.leaseMaterial[id] = ahead.material.map { LeaseMaterial(requestID: requestID, read: $0) }
            return ahead
        }
        if taken != nil { self.metrics.leasesHeld.increment() }
        return taken
    }

    func makeMachine(_ s: inout State) -> TokenFlowStateMachine {
        s.nextTimerBase &+= 1 << 32
        return TokenFlowStateMachine(configuration: self.configuration, firstTimerID: s.nextTimerBase)
    }

    static func makeRequestID() -> String {
        var g = SystemRandomNumberGenerator()
        let a = g.next() as UInt64
        let b = g.next() as UInt64
        return "rq_" + String(a, radix: 36) + String(b, radix: 36)
    }

    /// Starts one background round trip when `token` is inside its refresh-ahead window and the
    /// machine allows one. Callers are never made to wait for it.
    func refreshAheadIfStale(_ id: InstallationID, _ token: AccessToken, now: FlowTime) {
        guard token.isStale(at: now, fraction: self.configuration.refreshAheadFraction) else { return }
        let (checked, starts) = self.state.withLock { s in
            s.triggerChecked.contains(id) ? (true, false) : (false, s.triggerChecksInFlight.insert(id).inserted)
        }
        if !checked {
            // A token that reached memory without a store read (a push): learn whether a trigger
            // is registered first, off the caller's path; one read at a time per installation,
            // however many callers are served meanwhile.
            guard starts else { return }
            self.submit {
                defer { self.state.withLock { _ = $0.triggerChecksInFlight.remove(id) } }
                guard let snapshot = try? await self.store.snapshot(id, timeout: .seconds(2)) else { return }
                self.state.withLock {
                    if snapshot.triggerRegistered { $0.triggerKnown.insert(id) } else { $0.triggerKnown.remove(id) }
                    $0.triggerChecked.insert(id)
                }
                if snapshot.active, snapshot.triggerRegistered {
                    self.refreshAheadIfStale(id, token, now: self.now())
                }
            }
            return
        }
        let actions = self.state.withLock { s -> [FlowAction] in
            guard !s.shuttingDown, s.triggerKnown.contains(id) else { return [] }
            var machine = s.machines[id] ?? self.makeMachine(&s)
            let actions = machine.valueServed(token, requestID: Self.makeRequestID(), now: now)
            s.machines[id] = machine.isRetained(at: now) ? machine : nil
            return actions
        }
        if actions.contains(where: { if case .acquireLease = $0 { return true } else { return false } }) {
            self.logger.debug("refresh-ahead started", metadata: ["installation.id": "\(id)"])
        }
        self.perform(actions, for: id)
    }

    // MARK: - Inputs from the rest of the gateway

    /// A token was delivered to this process (a Forge route) and stored. Remembers it with the
    /// installation's `apiBaseUrl` (as the store holds it after the delivery: the latest FIT's)
    /// and answers local waiters. The store's announcement of it is not handled again.
    ///
    /// `storedAt`: ``deliveryGeneration()`` taken before the store was asked; the token is then not
    /// remembered when memory was dropped since (an uninstall handled while it was being stored).
    public func tokenDelivered(
        _ id: InstallationID, token: AccessToken, apiBaseUrl: String? = nil, solicitedBy: String?,
        storedAt: UInt64? = nil
    ) {
        self.remember(id, token, apiBaseUrl: apiBaseUrl, readAt: storedAt)
        if let solicitedBy { self.noteOwnAnnouncement(OwnAnnouncement(installation: id, tag: "token " + solicitedBy)) }
        self.handle(id) { $0.valueObserved(token, solicitedBy: solicitedBy, now: self.now()) }
    }

    /// This process is about to store a token Forge delivered for round trip `requestID`: the
    /// store's announcement of it, which may reach this process before the store's own answer
    /// does, is then known as this process's own and not read back from the store.
    public func deliveryArriving(_ id: InstallationID, requestID: String) {
        self.noteOwnAnnouncement(OwnAnnouncement(installation: id, tag: "token " + requestID))
    }

    /// The delivery announced by ``deliveryArriving(_:requestID:)`` was not stored (refused, or
    /// the store failed): no announcement of it comes, and one for `requestID` from elsewhere is
    /// not this process's own.
    public func deliveryNotStored(_ id: InstallationID, requestID: String) {
        _ = self.takeOwnAnnouncement(OwnAnnouncement(installation: id, tag: "token " + requestID))
    }

    /// A delivery to this process answered round trip `requestID` but did not replace the stored
    /// token (Forge handed out a token no newer than the one held). `newest` is the stored token.
    /// If this process leads that round trip, its callers are answered and the hold is placed.
    public func deliveryBroughtNoNewerToken(
        _ id: InstallationID, requestID: String, newest: AccessToken?, apiBaseUrl: String? = nil,
        storedAt: UInt64? = nil
    ) {
        self.remember(id, newest, apiBaseUrl: apiBaseUrl, readAt: storedAt)
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
        self.updateOpenCircuits { $0.removeValue(forKey: id) }
    }

    /// Sets `token_gateway_circuits_open` to the circuits this process opened whose open window
    /// has not ended (called periodically: a window that lapses with no later round trip, or a
    /// circuit another replica closed, stops counting when its window ends).
    public func refreshOpenCircuits() {
        self.updateOpenCircuits { _ in }
    }

    /// Changes the open circuits, drops those whose window has ended, and sets the gauge.
    func updateOpenCircuits(_ change: (inout [InstallationID: FlowTime]) -> Void) {
        let now = self.now()
        let count = self.state.withLock { s -> Int in
            change(&s.openCircuits)
            s.openCircuits = s.openCircuits.filter { $0.value > now }
            return s.openCircuits.count
        }
        self.metrics.circuitsOpen.set(count)
    }

    /// How many callers wait for a store read of `id` another caller has in flight.
    public func snapshotFollowers(_ id: InstallationID) -> Int {
        self.state.withLock { $0.snapshotsInFlight[id]?.count ?? 0 }
    }

    /// How many times this process's subscription to the store's announcements came up (the
    /// first time, then after each reconnection), as handled by ``run()``.
    public var subscriptionsHandled: Int {
        self.state.withLock { $0.subscriptions }
    }

    /// Whether the store's announcements are heard (false after a lost or refused subscription,
    /// until it is back): while they are not, every caller reads the store.
    public var hearsAnnouncements: Bool {
        self.state.withLock { !$0.announcementsDown }
    }

    /// The token this process holds in memory for `id` and would answer with, if any (nil while
    /// it is unverified: see ``unverifiedToken(_:)``).
    public func rememberedToken(_ id: InstallationID) -> AccessToken? {
        self.state.withLock { s in s.memory[id].flatMap { $0.unverified ? nil : $0.token } }
    }

    /// The token this process holds for `id` while it is unverified (kept for store outages).
    public func unverifiedToken(_ id: InstallationID) -> AccessToken? {
        self.state.withLock { s in s.memory[id].flatMap { $0.unverified ? $0.token : nil } }
    }

    /// Returns once this process's subscription to the store's announcements has come up (and
    /// been handled) `times` times: the first at start-up, then once after each reconnection.
    public func subscribed(times: Int = 1) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = self.state.withLock { s -> Bool in
                guard s.subscriptions < times else { return true }
                s.subscriptionWaiters.append((times, continuation))
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// An event after each notification from the store this process has handled (an announcement
    /// of any replica, its own included, or a change of the subscription), from now on: what it
    /// changed (memory, holds, rounds) is then in place. For tests, which wait on it instead of
    /// polling; the stream keeps only the latest event not yet read.
    public func notificationEvents() -> AsyncStream<Void> {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let key = self.state.withLock { s in
            defer { s.nextListener += 1 }
            s.notificationListeners[s.nextListener] = continuation
            return s.nextListener
        }
        continuation.onTermination = { _ in
            self.state.withLock { _ = $0.notificationListeners.removeValue(forKey: key) }
        }
        return stream
    }

    /// Tells the streams of ``notificationEvents()`` that a notification has been handled.
    func notificationHandled() {
        let listeners = self.state.withLock { s in
            s.notificationListeners.isEmpty ? [] : Array(s.notificationListeners.values)
        }
        for listener in listeners { listener.yield() }
    }

    /// The token and `apiBaseUrl` this process holds in memory for `id`.
    public func remembered(_ id: InstallationID) -> (token: AccessToken?, apiBaseUrl: String?) {
        self.state.withLock { ($0.memory[id]?.token, $0.memory[id]?.apiBaseUrl) }
    }

    /// Until when this process knows `id`'s round trips to be on hold, if it knows of a hold.
    public func holdUntil(_ id: InstallationID) -> FlowTime? {
        let now = self.now()
        return self.state.withLock { $0.machines[id]?.hold(at: now)?.until }
    }

    /// Whether a round trip (or a refresh-ahead) for `id` is in flight in this process.
    public func isRoundActive(_ id: InstallationID) -> Bool {
        self.state.withLock { $0.machines[id]?.isActive == true }
    }

    /// Callers of `id` waiting in this process for its round trip.
    public func waiterCount(_ id: InstallationID) -> Int {
        self.state.withLock { $0.machines[id]?.waiterCount ?? 0 }
    }

    /// The state of `id`'s machine in this process (`idle` when it has none).
    public func roundState(_ id: InstallationID) -> TokenFlowStateMachine.StateName {
        let now = self.now()
        return self.state.withLock { $0.machines[id]?.stateName(at: now) ?? .idle }
    }

    /// Remembers `token` (when it is newer than the one held) and `apiBaseUrl` (when known: it is
    /// the latest FIT's, so it replaces the one held). `readAt`: the ``State/memoryGeneration``
    /// when the store read that found them began; a read older than memory's last drop or mark
    /// is not remembered, and a current one verifies the entry (as does a token the store has just
    /// taken, from a delivery).
    func remember(_ id: InstallationID, _ token: AccessToken?, apiBaseUrl: String?, readAt: UInt64? = nil) {
        guard token != nil || apiBaseUrl != nil || readAt != nil else { return }
        let now = self.now().unixSeconds
        self.state.withLock { s in
            if let readAt, readAt != s.memoryGeneration { return }
            guard token != nil || apiBaseUrl != nil || s.memory[id] != nil else { return }
            if s.memory[id] == nil { Self.sweepIfDue(&s, now: now) }
            var entry = s.memory[id] ?? MemoryEntry()
            if let apiBaseUrl { entry.apiBaseUrl = apiBaseUrl }
            if let token, (entry.token?.expiresAt ?? Int64.min) < token.expiresAt { entry.token = token }
            if readAt != nil || token != nil { entry.unverified = s.announcementsDown }
            s.memory[id] = entry
        }
    }

    /// Entries added between two sweeps of memory.
    static var memorySweepInterval: Int { 1024 }

    /// Every ``memorySweepInterval`` new entries (or as many as memory held after the last sweep,
    /// if more: a sweep costs a pass over memory, so each new entry pays for two steps of it at
    /// most), drops those whose
    /// token has expired (and those with none), unless the installation has a machine here:
    /// memory holds one entry per installation this process served or heard of, and an
    /// installation no caller asks for again would otherwise keep its expired token for good. What
    /// is dropped is read again from the store when asked for.
    private static func sweepIfDue(_ s: inout State, now: Int64) {
        s.rememberedSinceSweep += 1
        guard s.rememberedSinceSweep >= max(Self.memorySweepInterval, s.memoryAfterSweep) else { return }
        s.rememberedSinceSweep = 0
        let machines = s.machines
        s.memory = s.memory.filter { id, entry in
            (entry.token.map { $0.expiresAt > now } ?? false) || machines[id] != nil
        }
        s.memoryAfterSweep = s.memory.count
    }

    /// Entries held in memory (for tests).
    var memoryCount: Int { self.state.withLock { $0.memory.count } }

    /// What a Forge route takes before storing a delivery, for ``tokenDelivered(_:token:apiBaseUrl:solicitedBy:storedAt:)``:
    /// memory dropped meanwhile (an uninstall) is not filled again with the token stored before it.
    public func deliveryGeneration() -> UInt64 {
        self.memoryGenerationNow()
    }

    /// The ``State/memoryGeneration`` a store read beginning now is remembered at.
    func memoryGenerationNow() -> UInt64 {
        self.state.withLock { $0.memoryGeneration }
    }

    func forget(_ id: InstallationID) {
        self.state.withLock {
            $0.memory[id] = nil
            $0.memoryGeneration &+= 1
            $0.triggerKnown.remove(id)
            $0.triggerChecked.remove(id)
        }
    }

    /// Remembers that this process caused `announcement` and handled it already.
    func noteOwnAnnouncement(_ announcement: OwnAnnouncement) {
        let now = self.now()
        self.state.withLock { s in
            if s.ownAnnouncements.count >= 1024 {
                s.ownAnnouncements = s.ownAnnouncements.filter { now - $0.value < .seconds(2) }
            }
            s.ownAnnouncements[announcement] = now
        }
    }

    /// True (once) when this process caused `announcement` within the last 2 s and handled it.
    /// Tags are unique (a round trip's request id, or a hold noted before it is placed); an echo
    /// that overtook its note leaves the note unused until it lapses.
    func takeOwnAnnouncement(_ announcement: OwnAnnouncement) -> Bool {
        let now = self.now()
        return self.state.withLock { s in
            guard let at = s.ownAnnouncements.removeValue(forKey: announcement) else { return false }
            return now - at < .seconds(2)
        }
    }
}
