/// Identifies one caller waiting for a token in one process.
public struct WaiterID: Hashable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "w\(self.raw)" }
}

/// Identifies a timer the state machine asked for. A timer whose id is no longer current is ignored.
public struct TimerID: Hashable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "t\(self.raw)" }
}

/// How one trigger attempt failed (the `outcome` label of `token_gateway_trigger_attempts_total`).
public enum TriggerFailure: String, Sendable, Hashable {
    /// The trigger answered non-2xx.
    case httpError = "http_error"
    /// Connecting or sending failed.
    case transportError = "transport_error"
    /// The trigger did not answer within the attempt timeout.
    case timeout = "timeout"
    /// The trigger answered 2xx but no token arrived within the delivery grace.
    case noDelivery = "no_delivery"
}

/// Settings of the token flow. Every default is documented in `Docs/operations.md`.
public struct TokenFlowConfiguration: Sendable, Hashable {
    /// Trigger attempts per round trip (the first one included). Default 4.
    public var maxAttempts: Int = 4
    /// Longest wait for one trigger call to answer (bounded by the caller's deadline). Default 10 s.
    public var attemptTimeout: Duration = .seconds(10)
    /// How long after a 2xx from the trigger the token may still arrive before the attempt counts
    /// as `no_delivery`. Default 3 s.
    public var deliveryGrace: Duration = .seconds(3)
    /// First retry delay; doubles per retry up to `backoffCap`, with jitter (see ``Backoff``). Default 100 ms.
    public var backoffBase: Duration = .milliseconds(100)
    /// Longest retry delay. Default 2 s.
    public var backoffCap: Duration = .seconds(2)
    /// How long the lease outlives the round trip's deadline. Default 2 s.
    public var leaseGrace: Duration = .seconds(2)
    /// While following another process's round trip (or waiting for a delivery), the store is
    /// polled starting at this interval… Default 50 ms.
    public var pollInitial: Duration = .milliseconds(50)
    /// …growing to at most this one. Default 1 s.
    public var pollCap: Duration = .seconds(1)
    /// Deadline of a background (refresh-ahead) round trip. Default 30 s.
    public var backgroundDeadline: Duration = .seconds(30)
    /// Refresh-ahead window: a token in the last `refreshAheadFraction` of its lifetime is still
    /// served, and one background round trip fetches the next. 0 turns refresh-ahead off. Default 0.25.
    public var refreshAheadFraction: Double = 0.25
    /// After a background round trip failed, the next one waits at least this long. Default 10 s.
    public var refreshAheadCooldown: Duration = .seconds(10)
    /// Consecutive failed round trips of one installation that open its circuit. Default 5.
    public var breakerThreshold: Int = 5
    /// First open window of a circuit; doubles on every reopening up to `breakerOpenCap`. Default 5 s.
    public var breakerOpenBase: Duration = .seconds(5)
    /// Longest open window. Default 5 min.
    public var breakerOpenCap: Duration = .seconds(300)
    /// After a round trip that brought no newer token (Forge handed out the token it had cached),
    /// no request and no refresh-ahead starts another round trip for the installation for this
    /// long, on any replica (the hold is kept in the store); a forced refresh still starts one.
    /// Default 60 s.
    public var sameTokenHold: Duration = .seconds(60)
    /// The least validity a token must have left to be served when a round trip brought no newer
    /// one, or while the hold lasts (less: 502 `trigger_failed`). Default 60 s.
    public var heldTokenMinimumValidity: Duration = .seconds(60)
    /// Callers of one installation that may wait in this process for a round trip at once; more
    /// get `overloaded` (503) at once. Default 1000.
    public var maxWaitersPerInstallation: Int = 1000
    /// Callers that may wait in this process at once, over all installations. Default 10,000.
    public var maxWaiters: Int = 10_000

    public init() {}
}

/// A hold on an installation's round trips: a round trip ended with a token no newer than the
/// stored one, so until `until` requests are answered with the newest token instead of starting
/// another round trip (contract §2, the same-token round trip).
public struct RoundTripHold: Sendable, Hashable {
    /// When the hold ends.
    public var until: FlowTime
    /// The newest valid token known for the installation (the stored one), if any.
    public var newest: AccessToken?

    public init(until: FlowTime, newest: AccessToken?) {
        self.until = until
        self.newest = newest
    }

    /// Whether the hold is still in force at `now`.
    public func isActive(at now: FlowTime) -> Bool { now < self.until }
}

/// What a hold did, for metrics (`token_gateway_same_token_round_trips_total`,
/// `token_gateway_round_trips_held_total`).
public enum HoldEvent: String, Sendable, Hashable, CaseIterable {
    /// A round trip this process led brought no newer token; its callers got the newest one.
    case sameTokenServed = "served"
    /// A round trip this process led brought no newer token and the newest has too little time
    /// left: its callers got `trigger_failed`.
    case sameTokenExpiring = "expiring"
    /// A request was answered under a hold instead of starting a round trip.
    case requestHeld = "request"
    /// A refresh-ahead round trip was not started because of a hold.
    case refreshAheadHeld = "refresh_ahead"
}

/// What the owner of a ``TokenFlowStateMachine`` must do. The machine does no I/O.
public enum FlowAction: Sendable, Hashable {
    /// Try to take the installation's lease (`SET NX PX`) with this owner value unless a hold is in
    /// force; answer with `leaseAcquired` / `leaseDenied` / `leaseHeld` / `storeFailed`.
    case acquireLease(requestID: String, ttl: Duration)
    /// Try to take the lease whether or not a hold is in force (a forced refresh); answer with
    /// `leaseAcquired` / `leaseDenied` / `storeFailed`.
    case acquireLeaseIgnoringHold(requestID: String, ttl: Duration)
    /// Extend the lease (only if still ours).
    case extendLease(requestID: String, ttl: Duration)
    /// Release the lease (only if still ours).
    case releaseLease(requestID: String)
    /// Put the installation's round trips on hold for `duration` (on every replica, through the
    /// store) and, when `releasingLease`, release the lease in the same step, so no other round
    /// trip can start between the two.
    case placeHold(requestID: String, duration: Duration, releasingLease: Bool)
    /// Send trigger attempt `attempt`; answer with `triggerSucceeded` / `triggerFailed`.
    case sendTrigger(requestID: String, attempt: Int, expiresAt: FlowTime, timeout: Duration)
    /// Read the installation's token from the store; answer with `tokenObserved` or `storeReadEmpty`.
    case readStore(requestID: String)
    /// Call `timerFired(id)` at `deadline`.
    case scheduleTimer(TimerID, deadline: FlowTime)
    /// A timer is no longer needed.
    case cancelTimer(TimerID)
    /// Answer these waiters with this token.
    case succeed([WaiterID], AccessToken, TokenSource)
    /// Fail these waiters.
    case fail([WaiterID], FlowError)
    /// Count one finished trigger attempt by outcome (metrics only).
    case recordAttempt(outcome: String)
    /// Count one retry being sent (metrics only).
    case recordRetry
    /// This process led a round trip that ended: record the outcome for circuit breaking.
    case roundFinished(succeeded: Bool)
    /// Count what a hold did (metrics only).
    case recordHold(HoldEvent)
}

/// The RFC-34 round trip of one installation in one process, as a value type.
///
/// Events go in (a caller asked, the lease was won or lost, a trigger attempt ended, a token was
/// seen, a timer fired, a caller went away, the installation was uninstalled); actions come out.
/// Time comes in with every event. Concurrent callers share one round (coalescing); the round
/// retries failed trigger attempts with capped, jittered backoff inside the callers' deadline.
///
/// A round trip that brings no newer token (Forge caches tokens and may hand out the one the
/// gateway holds) answers its callers with the newest token that has a minute left and puts the
/// installation's round trips on hold: while a hold is in force, requests that do not force a
/// refresh are answered at once and refresh-ahead starts nothing (``RoundTripHold``).
///
/// States:
/// - `idle`: nothing in flight.
/// - `round`: one round trip, with its request id, the waiting callers, the overall deadline and a
///   phase: taking the lease, following another process's round trip, triggering attempt N,
///   awaiting the delivery after a 2xx, or backing off before attempt N+1.
public struct TokenFlowStateMachine: Sendable {
    struct Waiter: Sendable, Hashable {
        var deadline: FlowTime
        var minValidity: Int64
        /// The expiry of the token the caller found insufficient (0 if none): a token with a
        /// later expiry is always acceptable.
        var knownExpiry: Int64
        /// A forced refresh accepts only a token newer than `knownExpiry`.
        var forced: Bool
        var timer: TimerID
    }

    enum Phase: Sendable, Hashable {
        case acquiringLease
        case following(poll: TimerID, delay: Duration)
        case triggering(attempt: Int)
        case awaitingDelivery(attempt: Int, grace: TimerID, poll: TimerID, pollDelay: Duration)
        case backingOff(attempt: Int, timer: TimerID)
    }

    struct Round: Sendable {
        var requestID: String
        var waiters: [WaiterID: Waiter]
        var deadline: FlowTime
        var phase: Phase
        var holdsLease: Bool
        var lastFailure: TriggerFailure?
        /// A refresh-ahead round: runs without waiters until a newer token arrives.
        var background: Bool
        var backgroundKnownExpiry: Int64
        /// The current poll interval while following another process's round trip.
        var followDelay: Duration = .zero
        /// At least one trigger attempt was sent by this process.
        var attempted = false
        /// The lease is taken whether or not a hold is in force (a forced refresh started the
        /// round, or only forced callers are left).
        var ignoresHold = false
    }

    enum RoundOutcome {
        case succeeded
        case failed
        /// Ended without a verdict on the trigger (callers went away, store down, shutdown).
        case abandoned
    }

    enum State: Sendable {
        case idle
        case round(Round)
    }

    private var state: State = .idle
    private var nextTimer: UInt64 = 0
    public let configuration: TokenFlowConfiguration

    /// - Parameter firstTimerID: timer ids start after this value; an owner that creates many
    ///   machines passes distinct ranges so a stale timer of one never matches another's.
    public init(configuration: TokenFlowConfiguration, firstTimerID: UInt64 = 0) {
        self.configuration = configuration
        self.nextTimer = firstTimerID
    }

    /// True while a round trip is in flight (or being followed).
    public var isActive: Bool {
        if case .round = self.state { return true }
        return false
    }

    /// The current round's request id, if any.
    public var currentRequestID: String? {
        if case .round(let r) = self.state { return r.requestID }
        return nil
    }

    /// Number of callers currently waiting.
    public var waiterCount: Int {
        if case .round(let r) = self.state { return r.waiters.count }
        return 0
    }

    private mutating func makeTimer() -> TimerID {
        self.nextTimer += 1
        return TimerID(self.nextTimer)
    }

    // MARK: - Events

    /// A caller asked for a token and the stored one (expiry `knownExpiry`, 0 for none) did not do.
    /// `requestID` names the round trip if this caller starts one. `hold` is the installation's
    /// hold as last seen: while it is in force, a caller that does not force a refresh is answered
    /// at once (see ``heldAnswer(for:_:source:now:)``) and no round trip starts.
    public mutating func tokenWasRequested(
        waiter: WaiterID,
        minValidity: Int64,
        knownExpiry: Int64,
        forced: Bool,
        deadline: FlowTime,
        requestID: String,
        hold: RoundTripHold? = nil,
        now: FlowTime
    ) -> [FlowAction] {
        if !forced, let hold, hold.isActive(at: now) {
            return [self.heldAnswer(for: [waiter], hold.newest, source: .cache, now: now), .recordHold(.requestHeld)]
        }
        let timer = self.makeTimer()
        let w = Waiter(
            deadline: deadline, minValidity: minValidity, knownExpiry: knownExpiry, forced: forced, timer: timer)
        switch self.state {
        case .idle:
            var round = Round(
                requestID: requestID, waiters: [waiter: w], deadline: deadline, phase: .acquiringLease,
                holdsLease: false, lastFailure: nil, background: false, backgroundKnownExpiry: 0)
            round.ignoresHold = forced
            self.state = .round(round)
            return [.scheduleTimer(timer, deadline: deadline), self.leaseAction(round, now: now)]
        case .round(var round):
            round.waiters[waiter] = w
            var actions: [FlowAction] = [.scheduleTimer(timer, deadline: deadline)]
            if deadline > round.deadline {
                round.deadline = deadline
                if round.holdsLease {
                    actions.append(
                        .extendLease(requestID: round.requestID, ttl: self.leaseTTL(deadline: deadline, now: now)))
                }
            }
            self.state = .round(round)
            return actions
        }
    }

    /// A valid token sits in its refresh-ahead window: start one background round trip unless one
    /// runs or a hold (`hold`, as last seen) is in force.
    public mutating func refreshAheadWasRequested(
        knownExpiry: Int64, requestID: String, hold: RoundTripHold? = nil, now: FlowTime
    ) -> [FlowAction] {
        guard case .idle = self.state else { return [] }
        if let hold, hold.isActive(at: now) { return [.recordHold(.refreshAheadHeld)] }
        let deadline = now + self.configuration.backgroundDeadline
        self.state = .round(
            Round(
                requestID: requestID, waiters: [:], deadline: deadline, phase: .acquiringLease, holdsLease: false,
                lastFailure: nil, background: true, backgroundKnownExpiry: knownExpiry))
        return [
            .scheduleTimer(self.makeTimer(), deadline: deadline),
            .acquireLease(requestID: requestID, ttl: self.leaseTTL(deadline: deadline, now: now)),
        ]
    }

    /// This process took the lease: it runs the round trip.
    public mutating func leaseAcquired(requestID: String, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, round.requestID == requestID, case .acquiringLease = round.phase
        else { return [] }
        round.holdsLease = true
        round.attempted = true
        round.phase = .triggering(attempt: 1)
        self.state = .round(round)
        return [self.sendTrigger(round, attempt: 1, now: now)]
    }

    /// Another process holds the lease: follow its round trip by polling the store (notifications
    /// also arrive as `tokenObserved`).
    public mutating func leaseDenied(requestID: String, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, round.requestID == requestID else { return [] }
        switch round.phase {
        case .acquiringLease, .following: break
        default: return []
        }
        let delay =
            round.followDelay == .zero
            ? self.configuration.pollInitial : min(round.followDelay * 2, self.configuration.pollCap)
        round.followDelay = delay
        let timer = self.makeTimer()
        round.phase = .following(poll: timer, delay: delay)
        self.state = .round(round)
        return [.scheduleTimer(timer, deadline: min(now + delay, round.deadline))]
    }

    /// The lease was not taken because a hold is in force (another round trip, on any replica,
    /// just brought no newer token). Callers that do not force a refresh are answered at once the
    /// held way; forced ones go on and take the lease regardless of the hold. A refresh-ahead
    /// round ends.
    public mutating func leaseHeld(requestID: String, hold: RoundTripHold, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, round.requestID == requestID, case .acquiringLease = round.phase
        else { return [] }
        var actions = self.answerHeldWaiters(&round, hold: hold, now: now)
        if round.waiters.isEmpty {
            if round.background { actions.append(.recordHold(.refreshAheadHeld)) }
            return actions + self.finishRound(round, outcome: .abandoned)
        }
        round.ignoresHold = true
        self.state = .round(round)
        return actions + [self.leaseAction(round, now: now)]
    }

    /// A hold was seen (announced by the replica that placed it, or read from the store) while
    /// this process waits for a round trip it does not lead. Callers that do not force a refresh
    /// are answered the held way; forced ones try to take the lease regardless of the hold.
    public mutating func holdObserved(_ hold: RoundTripHold, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, !round.holdsLease, hold.isActive(at: now) else { return [] }
        switch round.phase {
        case .acquiringLease, .following: break
        default: return []
        }
        var actions = self.answerHeldWaiters(&round, hold: hold, now: now)
        if round.waiters.isEmpty {
            if round.background { actions.append(.recordHold(.refreshAheadHeld)) }
            return actions + self.finishRound(round, outcome: .abandoned)
        }
        if case .following(let poll, _) = round.phase {
            // Only forced callers are left: the round trip followed has ended (a hold is only
            // placed when one ends), and they still get a round trip of their own.
            actions.append(.cancelTimer(poll))
            round.ignoresHold = true
            round.phase = .acquiringLease
            self.state = .round(round)
            return actions + [self.leaseAction(round, now: now)]
        }
        self.state = .round(round)
        return actions
    }

    /// The round trip this process leads (`requestID`) was answered by a delivery that did not
    /// replace the stored token: Forge handed out a token no newer than the one held (it caches
    /// tokens). `newest` is the newest valid token known (the stored one). Every caller of the
    /// round gets `newest` when it has at least ``TokenFlowConfiguration/heldTokenMinimumValidity``
    /// left, even if less than its `minValidity` (its expiry tells the truth), else
    /// `trigger_failed`; and the installation's round trips are put on hold for
    /// ``TokenFlowConfiguration/sameTokenHold``.
    public mutating func roundTripBroughtNoNewerToken(requestID: String, newest: AccessToken?, now: FlowTime)
        -> [FlowAction]
    {
        guard case .round(let round) = self.state, round.requestID == requestID, round.holdsLease else { return [] }
        var actions: [FlowAction] = []
        switch round.phase {
        case .triggering, .awaitingDelivery: actions.append(.recordAttempt(outcome: "success"))
        default: break
        }
        let ids = round.waiters.keys.sorted { $0.raw < $1.raw }
        for id in ids { actions.append(.cancelTimer(round.waiters[id]!.timer)) }
        let servable = self.servable(newest, now: now)
        // The hold first: a caller that comes back the moment it is answered finds it in force.
        actions += self.finishRound(
            round, outcome: servable != nil ? .succeeded : .failed, hold: self.configuration.sameTokenHold)
        if !ids.isEmpty { actions.append(self.heldAnswer(for: ids, newest, source: .trigger, now: now)) }
        actions.append(.recordHold(servable != nil ? .sameTokenServed : .sameTokenExpiring))
        return actions
    }

    /// The store could not be reached while taking the lease: without it there is no safe round trip.
    public mutating func storeFailed(requestID: String, now: FlowTime) -> [FlowAction] {
        guard case .round(let round) = self.state, round.requestID == requestID else { return [] }
        switch round.phase {
        case .acquiringLease:
            return self.endRound(round, failing: .storeUnavailable, outcome: .abandoned)
        case .following(let poll, let delay):
            // Keep following: the next poll retries; the callers' deadlines bound the wait.
            _ = poll
            let timer = self.makeTimer()
            var r = round
            r.phase = .following(poll: timer, delay: delay)
            self.state = .round(r)
            return [.scheduleTimer(timer, deadline: min(now + delay, round.deadline))]
        default:
            return []
        }
    }

    /// The trigger answered 2xx: the token should be in the store now (or arrive shortly).
    public mutating func triggerSucceeded(requestID: String, attempt: Int, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, round.requestID == requestID,
            case .triggering(let current) = round.phase, current == attempt
        else { return [] }
        let grace = self.makeTimer()
        let poll = self.makeTimer()
        let pollDelay = self.configuration.pollInitial
        round.phase = .awaitingDelivery(attempt: attempt, grace: grace, poll: poll, pollDelay: pollDelay)
        self.state = .round(round)
        return [
            .readStore(requestID: requestID),
            .scheduleTimer(grace, deadline: min(now + self.configuration.deliveryGrace, round.deadline)),
            .scheduleTimer(poll, deadline: min(now + pollDelay, round.deadline)),
        ]
    }

    /// Trigger attempt `attempt` failed.
    public mutating func triggerFailed(
        requestID: String, attempt: Int, failure: TriggerFailure, now: FlowTime, jitter: Double
    ) -> [FlowAction] {
        guard case .round(let round) = self.state, round.requestID == requestID,
            case .triggering(let current) = round.phase, current == attempt
        else { return [] }
        return [.recordAttempt(outcome: failure.rawValue)]
            + self.attemptFailed(round, attempt: attempt, failure: failure, now: now, jitter: jitter)
    }

    /// A token was seen: read from the store, delivered to this process, or announced by another
    /// replica. `solicitedBy` is the request id whose delivery it answered, if any.
    public mutating func tokenObserved(_ token: AccessToken, solicitedBy: String?, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state else { return [] }
        let answersThisRound = solicitedBy != nil && solicitedBy == round.requestID
        guard token.expiresAt > now.unixSeconds else { return [] }
        let source: TokenSource = (solicitedBy != nil || token.requestID != nil) ? .trigger : .push
        var answered: [WaiterID] = []
        var actions: [FlowAction] = []
        for (id, w) in round.waiters {
            let newer = token.expiresAt > w.knownExpiry
            let acceptable =
                answersThisRound || (w.forced ? newer : (newer || token.expiresAt >= now.unixSeconds + w.minValidity))
            if acceptable {
                answered.append(id)
                actions.append(.cancelTimer(w.timer))
            }
        }
        for id in answered { round.waiters[id] = nil }
        if !answered.isEmpty {
            actions.append(.succeed(answered.sorted { $0.raw < $1.raw }, token, source))
        }
        let backgroundDone = round.background && (answersThisRound || token.expiresAt > round.backgroundKnownExpiry)
        if round.waiters.isEmpty && (!round.background || backgroundDone) {
            // The attempt in flight (or just answered) delivered: count it as a success once.
            switch round.phase {
            case .triggering, .awaitingDelivery: actions.append(.recordAttempt(outcome: "success"))
            default: break
            }
            actions += self.finishRound(round, outcome: .succeeded)
        } else {
            self.state = .round(round)
        }
        return actions
    }

    /// A store read found no acceptable token.
    public mutating func storeReadEmpty(requestID: String, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, round.requestID == requestID else { return [] }
        if case .following = round.phase {
            // The leader may have died: try to take the lease over (it expires after its deadline).
            round.phase = .acquiringLease
            self.state = .round(round)
            return [self.leaseAction(round, now: now)]
        }
        return []
    }

    /// A timer fired.
    public mutating func timerFired(_ timer: TimerID, now: FlowTime, jitter: Double) -> [FlowAction] {
        guard case .round(var round) = self.state else { return [] }
        if round.background && round.waiters.isEmpty && now >= round.deadline {
            return self.finishRound(round, outcome: round.attempted ? .failed : .abandoned)
        }
        // A caller's deadline.
        if let (id, _) = round.waiters.first(where: { $0.value.timer == timer }) {
            round.waiters[id] = nil
            var actions: [FlowAction] = [.fail([id], .tokenTimeout)]
            if round.waiters.isEmpty && !round.background {
                actions += self.finishRound(round, outcome: round.attempted ? .failed : .abandoned)
            } else {
                self.state = .round(round)
            }
            return actions
        }
        switch round.phase {
        case .following(let poll, _) where poll == timer:
            return [.readStore(requestID: round.requestID)]
        case .awaitingDelivery(let attempt, let grace, let poll, let pollDelay):
            if grace == timer {
                return [.recordAttempt(outcome: TriggerFailure.noDelivery.rawValue)]
                    + self.attemptFailed(round, attempt: attempt, failure: .noDelivery, now: now, jitter: jitter)
            }
            if poll == timer {
                let next = self.makeTimer()
                let delay = min(pollDelay * 2, self.configuration.pollCap)
                round.phase = .awaitingDelivery(attempt: attempt, grace: grace, poll: next, pollDelay: delay)
                self.state = .round(round)
                return [
                    .readStore(requestID: round.requestID),
                    .scheduleTimer(next, deadline: min(now + delay, round.deadline)),
                ]
            }
            return []
        case .backingOff(let attempt, let t) where t == timer:
            round.phase = .triggering(attempt: attempt + 1)
            self.state = .round(round)
            return [.recordRetry, self.sendTrigger(round, attempt: attempt + 1, now: now)]
        default:
            return []
        }
    }

    /// A caller went away (cancelled its request).
    public mutating func waiterCancelled(_ waiter: WaiterID, now: FlowTime) -> [FlowAction] {
        guard case .round(var round) = self.state, let w = round.waiters.removeValue(forKey: waiter) else { return [] }
        var actions: [FlowAction] = [.cancelTimer(w.timer), .fail([waiter], .cancelled)]
        if round.waiters.isEmpty && !round.background {
            actions += self.finishRound(round, outcome: .abandoned)
        } else {
            self.state = .round(round)
        }
        return actions
    }

    /// The installation was uninstalled: every caller gets 410 at once.
    public mutating func installationUninstalled(now: FlowTime) -> [FlowAction] {
        guard case .round(let round) = self.state else { return [] }
        return self.endRound(round, failing: .installationUninstalled, outcome: .abandoned)
    }

    /// The process is shutting down: callers still waiting get an error answer now.
    public mutating func shutdownRequested(now: FlowTime) -> [FlowAction] {
        guard case .round(let round) = self.state else { return [] }
        return self.endRound(round, failing: .shuttingDown, outcome: .abandoned)
    }

    // MARK: - Helpers

    /// The token a caller gets when a round trip brought no newer one, or while a hold is in
    /// force: `newest` when it has at least ``TokenFlowConfiguration/heldTokenMinimumValidity``
    /// left at `now`, else nil.
    public func servable(_ newest: AccessToken?, now: FlowTime) -> AccessToken? {
        let floor = now.unixSeconds + self.configuration.heldTokenMinimumValidity.components.seconds
        guard let token = newest, token.expiresAt >= floor else { return nil }
        return token
    }

    /// The answer for callers `ids` when a round trip brought no newer token or a hold is in
    /// force: the newest token if ``servable(_:now:)``, else `trigger_failed`.
    public func heldAnswer(for ids: [WaiterID], _ newest: AccessToken?, source: TokenSource, now: FlowTime)
        -> FlowAction
    {
        if let token = self.servable(newest, now: now) { return .succeed(ids, token, source) }
        return .fail(ids, .noUsableToken)
    }

    /// Answers the callers of `round` that do not force a refresh the held way.
    private func answerHeldWaiters(_ round: inout Round, hold: RoundTripHold, now: FlowTime) -> [FlowAction] {
        let ids = round.waiters.filter { !$0.value.forced }.keys.sorted { $0.raw < $1.raw }
        guard !ids.isEmpty else { return [] }
        var actions: [FlowAction] = ids.map { .cancelTimer(round.waiters[$0]!.timer) }
        for id in ids { round.waiters[id] = nil }
        actions.append(self.heldAnswer(for: ids, hold.newest, source: .cache, now: now))
        actions += ids.map { _ in .recordHold(.requestHeld) }
        return actions
    }

    private func leaseAction(_ round: Round, now: FlowTime) -> FlowAction {
        let ttl = self.leaseTTL(deadline: round.deadline, now: now)
        return round.ignoresHold
            ? .acquireLeaseIgnoringHold(requestID: round.requestID, ttl: ttl)
            : .acquireLease(requestID: round.requestID, ttl: ttl)
    }

    private func leaseTTL(deadline: FlowTime, now: FlowTime) -> Duration {
        max(deadline - now, .milliseconds(1)) + self.configuration.leaseGrace
    }

    private func sendTrigger(_ round: Round, attempt: Int, now: FlowTime) -> FlowAction {
        let remaining = max(round.deadline - now, .milliseconds(1))
        return .sendTrigger(
            requestID: round.requestID, attempt: attempt, expiresAt: round.deadline,
            timeout: min(self.configuration.attemptTimeout, remaining))
    }

    private mutating func attemptFailed(
        _ round: Round, attempt: Int, failure: TriggerFailure, now: FlowTime, jitter: Double
    ) -> [FlowAction] {
        var round = round
        round.lastFailure = failure
        var actions: [FlowAction] = []
        if case .awaitingDelivery(_, let grace, let poll, _) = round.phase {
            actions += [.cancelTimer(grace), .cancelTimer(poll)]
        }
        if attempt < self.configuration.maxAttempts {
            let delay = Backoff.delay(
                attempt: attempt, base: self.configuration.backoffBase, cap: self.configuration.backoffCap,
                jitter: jitter)
            if now + delay < round.deadline {
                let timer = self.makeTimer()
                round.phase = .backingOff(attempt: attempt, timer: timer)
                self.state = .round(round)
                return actions + [.scheduleTimer(timer, deadline: now + delay)]
            }
        }
        let error: FlowError
        switch failure {
        case .httpError, .transportError:
            error = FlowError(code: .triggerFailed, detail: "last attempt: \(failure.rawValue)")
        case .timeout, .noDelivery:
            error = FlowError(code: .tokenTimeout, detail: "last attempt: \(failure.rawValue)")
        }
        return actions + self.endRound(round, failing: error, outcome: .failed)
    }

    private mutating func endRound(_ round: Round, failing error: FlowError, outcome: RoundOutcome) -> [FlowAction] {
        var actions: [FlowAction] = []
        let ids = round.waiters.keys.sorted { $0.raw < $1.raw }
        for id in ids { actions.append(.cancelTimer(round.waiters[id]!.timer)) }
        if !ids.isEmpty { actions.append(.fail(ids, error)) }
        return actions + self.finishRound(round, outcome: outcome)
    }

    private mutating func finishRound(_ round: Round, outcome: RoundOutcome, hold: Duration? = nil) -> [FlowAction] {
        var actions: [FlowAction] = []
        switch round.phase {
        case .following(let poll, _): actions.append(.cancelTimer(poll))
        case .awaitingDelivery(_, let grace, let poll, _): actions += [.cancelTimer(grace), .cancelTimer(poll)]
        case .backingOff(_, let timer): actions.append(.cancelTimer(timer))
        case .acquiringLease, .triggering: break
        }
        if round.holdsLease && round.attempted {
            switch outcome {
            case .succeeded: actions.append(.roundFinished(succeeded: true))
            case .failed: actions.append(.roundFinished(succeeded: false))
            case .abandoned: break
            }
        }
        if let hold {
            actions.append(.placeHold(requestID: round.requestID, duration: hold, releasingLease: round.holdsLease))
        } else if round.holdsLease {
            actions.append(.releaseLease(requestID: round.requestID))
        }
        self.state = .idle
        return actions
    }
}

extension FlowError {
    /// A round trip brought no newer token and the newest one has too little time left to serve.
    public static let noUsableToken = FlowError(
        code: .triggerFailed, detail: "the auth trigger returned no newer token and the newest one expires within 60 s")
}
