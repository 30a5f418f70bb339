/// A value a ``LeasedRoundStateMachine`` fetches in rounds: an access token, a user token, or any
/// other credential with an expiry.
public protocol LeasedRoundValue: Sendable, Hashable {
    /// Unix seconds after which the value is no longer valid.
    var expiresAt: Int64 { get }
    /// The round whose work produced the value, or nil when it arrived unasked (a push).
    var roundID: String? { get }
    /// True when the value is inside its refresh-ahead window at `now`.
    func isStale(at now: FlowTime, fraction: Double) -> Bool

    /// What a failed caller is answered with: ``FlowError`` for system tokens; a value type with
    /// failures of its own (a refusal, a rate limit) brings its own error type.
    associatedtype Failure: Error & Sendable & Hashable = FlowError
    /// The answer for a failure the machine itself decides (a deadline, the store, shutdown, the
    /// last attempt failed).
    static func failure(_ error: FlowError) -> Failure
}

extension LeasedRoundValue where Failure == FlowError {
    public static func failure(_ error: FlowError) -> FlowError { error }
}

/// One key's leased rounds in one process, as a value type: the state machine shared by system
/// tokens (the round's work is an auth-trigger call whose token arrives by delivery) and user-token
/// exchanges (the round's work is an exchange call that returns the value).
///
/// Events go in (a caller asked, the lease was won or lost or refused by a hold, an attempt ended,
/// a value was seen, a timer fired, a caller went away, the key was removed); actions come out.
/// Time (and the jitter of retries) comes in with every event; the machine does no I/O, reads no
/// clock and starts no task. Concurrent callers share one round (coalescing); the lease in the
/// store makes it one round across every process; the round retries failed attempts with capped,
/// jittered backoff inside the callers' deadline.
///
/// States (each carries only the data valid in it):
/// - `idle`: no round. A value the caller already has is *fresh* (answered at once) or *stale*
///   (answered, and one refresh-ahead round starts unless a cool-down after a failed one runs).
/// - `held`: a round brought no newer value; until the hold ends, requests that do not force a
///   refresh are answered with the newest value (or `trigger_failed`) and no round starts.
/// - `circuitOpen`: recent rounds failed; requests fail fast with `circuit_open` until it closes.
/// - `round`, in one of its phases: `acquiringLease`; `following` another process's round (woken
///   by a notification, with a re-read timer as a safety net); leading it: `attempting` N,
///   `awaitingDelivery` after a 2xx, or `backingOff` before attempt N+1. A round started by
///   refresh-ahead (the value stale, nobody waiting) is a round of kind `refreshAhead`.
///
/// How an executor drives it: keep one machine per key under a lock; feed each event with `now`;
/// run the returned actions after releasing the lock, in order: `acquireLease` / `extendLease` /
/// `releaseLease` / `placeHold` against the store, `startAttempt` as the round's work (send the
/// trigger, or call the exchange), `readStore` to re-read the value and answer with
/// ``valueObserved(_:solicitedBy:now:)`` or ``storeReadEmpty(requestID:now:)``, timers as child
/// tasks that call ``timerFired(_:now:jitter:)``, `succeed` / `fail` by resuming the callers'
/// continuations. Results come back as events. Drop the machine when ``isRetained(at:)`` is false.
public struct LeasedRoundStateMachine<Value: LeasedRoundValue>: Sendable {
    /// A hold on a key's rounds: a round ended with a value no newer than the stored one, so until
    /// `until` requests are answered with the newest value instead of starting another round.
    public struct Hold: Sendable, Hashable {
        /// When the hold ends.
        public var until: FlowTime
        /// The newest valid value known for the key (the stored one), if any.
        public var newest: Value?

        public init(until: FlowTime, newest: Value?) {
            self.until = until
            self.newest = newest
        }

        /// Whether the hold is still in force at `now`.
        public func isActive(at now: FlowTime) -> Bool { now < self.until }
    }

    /// What the owner must do.
    public enum Action: Sendable, Hashable {
        /// Try to take the key's lease with this owner value unless a hold is in force, or a value
        /// expiring after `unlessNewerThan` is stored (the round's callers would take it: read it
        /// instead); answer with `leaseAcquired` / `leaseDenied` / `leaseHeld` / `storeFailed`,
        /// or the value read. The check and the take are one step in the store: a round another
        /// process ends between this process's last read and its take starts no second round.
        case acquireLease(requestID: String, ttl: Duration, unlessNewerThan: Int64)
        /// Try to take the lease whether or not a hold is in force (a forced refresh).
        case acquireLeaseIgnoringHold(requestID: String, ttl: Duration, unlessNewerThan: Int64)
        /// Extend the lease (only if still ours).
        case extendLease(requestID: String, ttl: Duration)
        /// Release the lease (only if still ours).
        case releaseLease(requestID: String)
        /// Put the key's rounds on hold for `duration` (on every process, through the store) and,
        /// when `releasingLease`, release the lease in the same step. The actions after it (the
        /// callers' answers) run once the hold is in the store, or at `answerBy` (the earliest
        /// deadline of the callers they answer) if the write is still out then.
        case placeHold(requestID: String, duration: Duration, releasingLease: Bool, answerBy: FlowTime?)
        /// Do the round's work, attempt `attempt` (send the trigger; call the exchange); answer with
        /// `attemptSucceeded` (the value will arrive) / `valueObserved` (it came back) / `attemptFailed`.
        case startAttempt(requestID: String, attempt: Int, expiresAt: FlowTime, timeout: Duration)
        /// Re-read the key's value from the store; answer with `valueObserved` or `storeReadEmpty`.
        case readStore(requestID: String)
        /// Call `timerFired(id)` at `deadline`.
        case scheduleTimer(TimerID, deadline: FlowTime)
        /// A timer is no longer needed.
        case cancelTimer(TimerID)
        /// Answer these waiters with this value.
        case succeed([WaiterID], Value, TokenSource)
        /// Fail these waiters.
        case fail([WaiterID], Value.Failure)
        /// Count one finished attempt by outcome (metrics only).
        case recordAttempt(outcome: String)
        /// Count one retry being sent (metrics only).
        case recordRetry
        /// This process led a round that ended: record the outcome for circuit breaking (answer
        /// with ``circuitObserved(openUntil:now:)``).
        case roundFinished(succeeded: Bool)
        /// Count what a hold did (metrics only).
        case recordHold(HoldEvent)
    }

    /// The state's name, for tests, logs and status.
    public enum StateName: String, Sendable, Hashable, CaseIterable {
        case idle
        case held
        case circuitOpen = "circuit_open"
        case acquiringLease = "acquiring_lease"
        case following
        case attempting
        case awaitingDelivery = "awaiting_delivery"
        case backingOff = "backing_off"
    }

    struct Waiter: Sendable, Hashable {
        var deadline: FlowTime
        var minValidity: Int64
        /// The expiry of the value the caller found insufficient (0 if none): a later one is acceptable.
        var knownExpiry: Int64
        /// A forced refresh accepts only a value newer than `knownExpiry`.
        var forced: Bool
        var timer: TimerID
    }

    enum Phase: Sendable, Hashable {
        case acquiringLease
        case following(recheck: TimerID, delay: Duration)
        case attempting(attempt: Int)
        case awaitingDelivery(attempt: Int, grace: TimerID, recheck: TimerID, delay: Duration)
        /// Waiting before attempt N+1; `after` is how attempt N failed.
        case backingOff(attempt: Int, timer: TimerID, after: TriggerFailure)

        /// This process holds the lease and leads the round.
        var leads: Bool {
            switch self {
            case .acquiringLease, .following: return false
            case .attempting, .awaitingDelivery, .backingOff: return true
            }
        }

        /// The round's work is under way: an attempt, or the wait for the delivery after its 2xx.
        var hasWorkInFlight: Bool {
            switch self {
            case .attempting, .awaitingDelivery: return true
            case .acquiringLease, .following, .backingOff: return false
            }
        }
    }

    enum Kind: Sendable, Hashable {
        /// Callers wait for the round.
        case requested
        /// Refresh-ahead: runs (with or without waiters) until a value later than `knownExpiry`.
        case refreshAhead(knownExpiry: Int64)
    }

    struct Round: Sendable {
        var requestID: String
        var kind: Kind
        var waiters: [WaiterID: Waiter]
        var deadline: FlowTime
        /// The round's deadline when its lease was last set; the lease runs at least until this
        /// instant plus ``TokenFlowConfiguration/leaseGrace``.
        var leaseDeadline: FlowTime
        var phase: Phase
        /// The round takes the lease whether or not a hold is in force (a forced refresh started
        /// it, or only forced callers are left).
        var ignoresHold: Bool
        /// The last interval of the re-read timer while following.
        var followDelay: Duration = .zero
        /// No refresh-ahead round before this instant once the round ends (set when refresh-ahead
        /// started; cleared by a round that succeeded).
        var refreshNotBefore: FlowTime?
        /// A hold seen during the round, in force again once it ends.
        var hold: Hold?
        /// The latest expiry its callers (or its refresh-ahead) found insufficient: the value the
        /// round is to improve on. Kept as callers join, so a join costs no pass over the waiters.
        var knownExpiry: Int64 = 0
        /// When the work in flight ends at the latest: the attempt's timeout, or the delivery grace
        /// after its 2xx. A round whose callers are gone goes on until then (``lastCallerLeft``).
        var workEnds: FlowTime?
        /// The attempts this round has started, over every lease it held: a round that lost its
        /// lease and takes it again goes on counting (an old attempt's answer is not taken for a
        /// new one's, and ``TokenFlowConfiguration/maxAttempts`` bounds them all).
        var attemptsMade = 0
    }

    /// An attempt still in flight when its round lost its lease.
    struct LostAttempt: Hashable {
        var requestID: String
        var attempt: Int
    }

    enum RoundOutcome {
        case succeeded
        case failed
        /// Ended without a verdict on the work (callers went away before any was in flight, store
        /// down, shutdown).
        case abandoned
    }

    enum State: Sendable {
        case idle(refreshNotBefore: FlowTime?)
        case held(Hold)
        case circuitOpen(until: FlowTime, hold: Hold?)
        case round(Round)
    }

    private var state: State = .idle(refreshNotBefore: nil)
    private var nextTimer: UInt64 = 0
    /// Attempts in flight when their round lost its lease: they decide nothing any more, but each
    /// is counted once when it ends (``attemptFailed``, ``attemptSucceeded``, or its round's own
    /// value arriving first), whatever the round does meanwhile. Every call ends (its timeout), so
    /// this empties; kept to a few all the same.
    private var lostAttempts: Set<LostAttempt> = []
    public let configuration: TokenFlowConfiguration

    /// - Parameter firstTimerID: timer ids start after this value; an owner that creates many
    ///   machines passes distinct ranges so a stale timer of one never matches another's.
    public init(configuration: TokenFlowConfiguration, firstTimerID: UInt64 = 0) {
        self.configuration = configuration
        self.nextTimer = firstTimerID
    }

    // MARK: - Queries

    /// True while a round is in flight (led, followed or being started).
    public var isActive: Bool {
        if case .round = self.state { return true }
        return false
    }

    /// The current round's request id, if any.
    public var currentRequestID: String? {
        if case .round(let r) = self.state { return r.requestID }
        return nil
    }

    /// True while this process leads the current round (it holds the round's lease).
    public var isLeading: Bool {
        if case .round(let r) = self.state { return r.phase.leads }
        return false
    }

    /// Number of callers currently waiting.
    public var waiterCount: Int {
        if case .round(let r) = self.state { return r.waiters.count }
        return 0
    }

    /// True while the current round is a refresh-ahead round (the value stale, still served).
    public var isRefreshingAhead: Bool {
        if case .round(let r) = self.state, case .refreshAhead = r.kind { return true }
        return false
    }

    /// The state at `now` (a hold or an open circuit that has run out counts as `idle`).
    public func stateName(at now: FlowTime) -> StateName {
        switch self.state {
        case .idle: return .idle
        case .held(let hold): return hold.isActive(at: now) ? .held : .idle
        case .circuitOpen(let until, let hold):
            if now < until { return .circuitOpen }
            return hold?.isActive(at: now) == true ? .held : .idle
        case .round(let r):
            switch r.phase {
            case .acquiringLease: return .acquiringLease
            case .following: return .following
            case .attempting: return .attempting
            case .awaitingDelivery: return .awaitingDelivery
            case .backingOff: return .backingOff
            }
        }
    }

    /// The hold in force at `now`, if this machine knows of one.
    public func hold(at now: FlowTime) -> Hold? {
        switch self.state {
        case .held(let hold): return hold.isActive(at: now) ? hold : nil
        case .circuitOpen(_, let hold): return hold?.isActive(at: now) == true ? hold : nil
        case .round(let r): return r.hold?.isActive(at: now) == true ? r.hold : nil
        case .idle: return nil
        }
    }

    /// Whether the machine still knows something at `now` (a round, a hold, an open circuit, a
    /// refresh-ahead cool-down); when false, the owner may drop it.
    public func isRetained(at now: FlowTime) -> Bool {
        if !self.lostAttempts.isEmpty { return true }
        switch self.state {
        case .round: return true
        case .idle(let notBefore): return notBefore.map { now < $0 } ?? false
        case .held(let hold): return hold.isActive(at: now)
        case .circuitOpen(let until, let hold): return now < until || hold?.isActive(at: now) == true
        }
    }

    private mutating func makeTimer() -> TimerID {
        self.nextTimer += 1
        return TimerID(self.nextTimer)
    }

    /// The state with holds, circuits and cool-downs that ran out at `now` turned back to `idle`.
    private mutating func settle(now: FlowTime) {
        switch self.state {
        case .idle(let notBefore?) where now >= notBefore:
            self.state = .idle(refreshNotBefore: nil)
        case .held(let hold) where !hold.isActive(at: now):
            self.state = .idle(refreshNotBefore: nil)
        case .circuitOpen(let until, let hold) where now >= until:
            if let hold, hold.isActive(at: now) {
                self.state = .held(hold)
            } else {
                self.state = .idle(refreshNotBefore: nil)
            }
        default:
            break
        }
    }

    // MARK: - Events: requests

    /// A caller asked for a value and the one it has (expiry `knownExpiry`, 0 for none) did not do.
    ///
    /// - `current`: the newest value known (for an answer under a hold, or when no round can start).
    /// - `hold`: the key's hold as last seen (also recorded, as ``holdObserved(_:now:)`` would).
    /// - `canStartRound`: false when no round can be run for the key (no trigger registered):
    ///   a caller that does not force a refresh then gets `current` while valid, else `no_trigger_url`.
    ///
    /// Decides, in order: a hold in force answers a caller that does not force a refresh at once;
    /// `current` answers it when it satisfies it and no round runs; an open circuit fails it
    /// (`circuit_open`); else it joins the running round or starts one (`requestID` names it).
    public mutating func tokenWasRequested(
        waiter: WaiterID,
        minValidity: Int64,
        knownExpiry: Int64,
        forced: Bool,
        deadline: FlowTime,
        requestID: String,
        hold: Hold? = nil,
        current: Value? = nil,
        canStartRound: Bool = true,
        now: FlowTime
    ) -> [Action] {
        // The hold the caller found is observed first, with what it asks for: a round following
        // another process's takes the lease for its forced callers (the round followed has
        // ended), and its other callers are answered the held way.
        let observed = hold.map { $0.isActive(at: now) ? self.holdObserved($0, now: now) : [] } ?? []
        return observed
            + self.request(
                waiter: waiter, minValidity: minValidity, knownExpiry: knownExpiry, forced: forced, deadline: deadline,
                requestID: requestID, current: current, canStartRound: canStartRound, now: now)
    }

    private mutating func request(
        waiter: WaiterID, minValidity: Int64, knownExpiry: Int64, forced: Bool, deadline: FlowTime,
        requestID: String, current: Value?, canStartRound: Bool, now: FlowTime
    ) -> [Action] {
        self.settle(now: now)
        if !forced, let active = self.hold(at: now) {
            // The hold's value, or a later one the caller knows of (pushed since the hold began).
            let newest = (current?.expiresAt ?? .min) > (active.newest?.expiresAt ?? .min) ? current : active.newest
            return [self.heldAnswer(for: [waiter], newest, source: .cache, now: now), .recordHold(.requestHeld)]
        }
        if !self.isActive, !forced, let value = current, value.expiresAt > now.unixSeconds,
            value.expiresAt >= now.unixSeconds + minValidity
        {
            return [.succeed([waiter], value, .cache)]
        }
        switch self.state {
        case .circuitOpen(let until, _):
            return [.fail([waiter], Value.failure(.circuitOpen(retryAfter: until - now)))]
        case .idle, .held:
            guard canStartRound else {
                if !forced, let value = current, value.expiresAt > now.unixSeconds {
                    return [.succeed([waiter], value, .cache)]
                }
                return [.fail([waiter], Value.failure(.noTriggerURL))]
            }
        case .round:
            break
        }
        let timer = self.makeTimer()
        let w = Waiter(
            deadline: deadline, minValidity: minValidity, knownExpiry: knownExpiry, forced: forced, timer: timer)
        switch self.state {
        case .round(var round):
            // A caller joining without having read the store (it knew of no value) judges values
            // against what the round's callers knew: the round's own re-read of a value they
            // found insufficient does not count as newer for it.
            var joined = w
            joined.knownExpiry = max(knownExpiry, round.knownExpiry)
            round.knownExpiry = joined.knownExpiry
            round.waiters[waiter] = joined
            var actions: [Action] = [.scheduleTimer(timer, deadline: deadline)]
            round.deadline = max(round.deadline, deadline)
            // The lease outlives the deadline it was set for by `leaseGrace`: callers that join
            // within half of that (a burst) need no extension; a later one extends it.
            if round.phase.leads, deadline > round.leaseDeadline + self.configuration.leaseGrace / 2 {
                round.leaseDeadline = round.deadline
                actions.append(
                    .extendLease(requestID: round.requestID, ttl: self.leaseTTL(deadline: round.deadline, now: now)))
            }
            self.state = .round(round)
            return actions
        case .idle(let notBefore):
            return self.startRound(
                Round(
                    requestID: requestID, kind: .requested, waiters: [waiter: w], deadline: deadline,
                    leaseDeadline: deadline,
                    phase: .acquiringLease, ignoresHold: forced, refreshNotBefore: notBefore,
                    knownExpiry: knownExpiry),
                timer: timer, now: now)
        case .held(let hold):
            // Only a forced refresh gets here: it runs a round regardless of the hold.
            return self.startRound(
                Round(
                    requestID: requestID, kind: .requested, waiters: [waiter: w], deadline: deadline,
                    leaseDeadline: deadline,
                    phase: .acquiringLease, ignoresHold: true, hold: hold, knownExpiry: knownExpiry),
                timer: timer, now: now)
        case .circuitOpen:
            return []
        }
    }

    private mutating func startRound(_ round: Round, timer: TimerID, now: FlowTime) -> [Action] {
        self.state = .round(round)
        return [.scheduleTimer(timer, deadline: round.deadline), self.leaseAction(round, now: now)]
    }

    /// `value` was served to a caller: when it is in its refresh-ahead window, start one
    /// refresh-ahead round (named `requestID`) unless a round runs, a hold is in force, the circuit
    /// is open, a cool-down after a failed refresh-ahead runs, or `canStartRound` is false.
    public mutating func valueServed(_ value: Value, requestID: String, canStartRound: Bool = true, now: FlowTime)
        -> [Action]
    {
        guard canStartRound, value.isStale(at: now, fraction: self.configuration.refreshAheadFraction) else {
            return []
        }
        return self.refreshAheadWasRequested(knownExpiry: value.expiresAt, requestID: requestID, now: now)
    }

    /// The value (expiry `knownExpiry`) sits in its refresh-ahead window: start one refresh-ahead
    /// round unless one runs, the circuit is open, a cool-down runs or a hold (`hold`, as last seen,
    /// or known) is in force. The round leaves a cool-down of
    /// ``TokenFlowConfiguration/refreshAheadCooldown`` behind unless it succeeds.
    public mutating func refreshAheadWasRequested(
        knownExpiry: Int64, requestID: String, hold: Hold? = nil, now: FlowTime
    ) -> [Action] {
        if let hold, hold.isActive(at: now) { _ = self.holdObserved(hold, now: now) }
        self.settle(now: now)
        switch self.state {
        case .held: return [.recordHold(.refreshAheadHeld)]
        case .circuitOpen, .round, .idle(.some): return []
        case .idle(.none): break
        }
        let deadline = now + self.configuration.backgroundDeadline
        let round = Round(
            requestID: requestID, kind: .refreshAhead(knownExpiry: knownExpiry), waiters: [:], deadline: deadline,
            leaseDeadline: deadline, phase: .acquiringLease, ignoresHold: false,
            refreshNotBefore: now + self.configuration.refreshAheadCooldown, knownExpiry: knownExpiry)
        return self.startRound(round, timer: self.makeTimer(), now: now)
    }

    // MARK: - Events: the lease

    /// This process took the lease: it leads the round and starts attempt 1. `leaseDeadline` is the
    /// deadline the lease was taken for when that was not the round's own (a lease a snapshot took
    /// for its reader's deadline). The lease is extended to the round's deadline or the attempt's
    /// end, whichever is later, when that is later by more than half of
    /// ``TokenFlowConfiguration/leaseGrace``: callers that joined while it was being taken, a round
    /// led for a caller that waits longer than the one that took it, or callers that wait less than
    /// the attempt may take. A lease taken once every caller's deadline has passed goes back.
    public mutating func leaseAcquired(requestID: String, leaseDeadline: FlowTime? = nil, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID, case .acquiringLease = round.phase
        else { return [] }
        let outlives = self.configuration.workOutlivesCallers
        guard now < round.deadline || !outlives else {
            // Taken after every caller's deadline (their timers not fired yet): nobody can use an
            // attempt now, so none is made and the lease goes back.
            return self.endRound(round, failing: FlowError(code: .tokenTimeout), outcome: .abandoned, now: now)
                + [.releaseLease(requestID: requestID)]
        }
        if let leaseDeadline { round.leaseDeadline = leaseDeadline }
        guard round.attemptsMade < self.configuration.maxAttempts else {
            // Taken again after it was lost, every attempt made: none more, the lease goes back.
            return self.endRound(round, failing: FlowError(code: .tokenTimeout), outcome: .abandoned, now: now)
                + [.releaseLease(requestID: requestID)]
        }
        if !outlives {
            // Work bounded by the callers' deadline: the lease is extended to it, once.
            var actions: [Action] = []
            if round.deadline > round.leaseDeadline + self.configuration.leaseGrace / 2 {
                round.leaseDeadline = round.deadline
                actions.append(
                    .extendLease(requestID: round.requestID, ttl: self.leaseTTL(deadline: round.deadline, now: now)))
            }
            let attempt = self.startAttempt(&round, attempt: round.attemptsMade + 1, now: now)
            self.state = .round(round)
            return actions + attempt
        }
        // The lease is extended (in `startAttempt`) to the round's deadline or the attempt's end,
        // whichever is later, when that is more than half of the grace beyond what it was set for.
        let attempt = self.startAttempt(&round, attempt: round.attemptsMade + 1, now: now)
        self.state = .round(round)
        return attempt
    }

    /// Another process holds the lease: follow its round. Its value arrives as a notification
    /// (`valueObserved`); a re-read timer, growing from ``TokenFlowConfiguration/pollInitial`` to
    /// ``TokenFlowConfiguration/pollCap``, is the safety net for a lost one. When the owner knows
    /// how long the other process's lease has left (`leaseRemaining`), the re-read is due when it
    /// ends instead (again when fed while following), or after `pollCap` if that is sooner: the
    /// follower wakes on a notification, or then. A notification lost while the other round ends
    /// early (pub/sub delivers at most once) costs at most `pollCap`, not the rest of the lease.
    public mutating func leaseDenied(requestID: String, leaseRemaining: Duration? = nil, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID else { return [] }
        var cancelled: [Action] = []
        switch round.phase {
        case .acquiringLease: break
        case .following(let recheck, _):
            if leaseRemaining != nil { cancelled.append(.cancelTimer(recheck)) }
        default: return []
        }
        let delay: Duration
        if let leaseRemaining {
            delay = min(max(leaseRemaining, .zero), self.configuration.pollCap)
        } else {
            delay =
                round.followDelay == .zero
                ? self.configuration.pollInitial : min(round.followDelay * 2, self.configuration.pollCap)
            round.followDelay = delay
        }
        let timer = self.makeTimer()
        round.phase = .following(recheck: timer, delay: delay)
        self.state = .round(round)
        return cancelled + [.scheduleTimer(timer, deadline: min(now + delay, round.deadline))]
    }

    /// The lease was not taken because a hold is in force. Callers that do not force a refresh are
    /// answered at once the held way; forced ones go on and take the lease regardless of the hold.
    /// A refresh-ahead round without callers ends.
    public mutating func leaseHeld(requestID: String, hold: Hold, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID, case .acquiringLease = round.phase
        else { return [] }
        round.hold = hold
        var actions = self.answerHeldWaiters(&round, hold: hold, now: now)
        if round.waiters.isEmpty {
            if case .refreshAhead = round.kind { actions.append(.recordHold(.refreshAheadHeld)) }
            return actions + self.finishRound(round, outcome: .abandoned, now: now)
        }
        round.ignoresHold = true
        self.state = .round(round)
        return actions + [self.leaseAction(round, now: now)]
    }

    /// The lease was not taken because the key's circuit is open until `openUntil` (a round led by
    /// another process opened it while this one followed, or before this process read it). The
    /// round's callers get `circuit_open`, as callers arriving now do, and the machine enters
    /// `circuitOpen`: no process calls a trigger whose circuit is open.
    public mutating func leaseRefusedByOpenCircuit(requestID: String, openUntil: FlowTime, now: FlowTime) -> [Action] {
        guard case .round(let round) = self.state, round.requestID == requestID, case .acquiringLease = round.phase
        else { return [] }
        guard now < openUntil else {
            // Closed by this process's clock, not by the store's (two clocks apart, or the window
            // ending in between): follow, and the re-read tries the lease again, without a loop.
            return self.leaseDenied(requestID: requestID, now: now)
        }
        let actions = self.endRound(
            round, failingWith: Value.failure(.circuitOpen(retryAfter: openUntil - now)), outcome: .abandoned, now: now)
        switch self.state {
        case .held(let hold): self.state = .circuitOpen(until: openUntil, hold: hold)
        default: self.state = .circuitOpen(until: openUntil, hold: nil)
        }
        return actions
    }

    /// The lease of the round this process leads (`requestID`) is no longer its own: an extension
    /// found another owner, or none (a failover lost the key, or this process stalled past the
    /// lease's end). Another process may lead a round now, so this one stops leading: it gives no
    /// verdict, makes no retry, and an answer of its attempt in flight counts for nothing (its
    /// token, if one comes, reaches the callers as any value stored does). Its callers follow: the
    /// value comes by announcement or by the re-read timer, whose empty re-read takes the lease
    /// again if nobody holds it (the attempts go on counting). A round nobody waits for ends.
    public mutating func leaseLost(requestID: String, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID, round.phase.leads else { return [] }
        var actions: [Action] = []
        switch round.phase {
        case .awaitingDelivery(_, let grace, let recheck, _):
            // The attempt answered 2xx; its delivery, if it comes, answers as any value stored does.
            actions += [.cancelTimer(grace), .cancelTimer(recheck), .recordAttempt(outcome: "success")]
        case .backingOff(_, let timer, _): actions.append(.cancelTimer(timer))
        case .attempting(let attempt):
            if self.lostAttempts.count < 8 {
                self.lostAttempts.insert(LostAttempt(requestID: requestID, attempt: attempt))
            }
        case .acquiringLease, .following: break
        }
        round.phase = .acquiringLease
        round.workEnds = nil
        // A lease taken again is set for the callers' deadline: the work of the next attempt is
        // covered by an extension of its own.
        round.leaseDeadline = round.deadline
        guard !round.waiters.isEmpty else {
            return actions + self.finishRound(round, outcome: .abandoned, now: now)
        }
        self.state = .round(round)
        return actions + self.leaseDenied(requestID: requestID, now: now)
    }

    /// The outcome of an attempt the round lost its lease during (``leaseLost``): counted (a 2xx as
    /// `success`: its delivery, if it comes, answers as any value stored does), and nothing else.
    /// Nil for any other attempt.
    private mutating func countLostAttempt(requestID: String, attempt: Int, outcome: String) -> [Action]? {
        guard self.lostAttempts.remove(LostAttempt(requestID: requestID, attempt: attempt)) != nil else { return nil }
        return [.recordAttempt(outcome: outcome)]
    }

    /// Whether the round `requestID` is making attempt `attempt` now (an attempt's outcome that
    /// arrives once its round moved on, such as a lost lease, counts for nothing).
    public func isAttempting(_ requestID: String, attempt: Int) -> Bool {
        guard case .round(let round) = self.state, round.requestID == requestID,
            case .attempting(let current) = round.phase
        else { return false }
        return current == attempt
    }

    /// The store could not be reached for the round `requestID`: while taking the lease (the
    /// round fails with `store_unavailable`), while following (the next re-read retries), or while
    /// this process leads it (its work goes on: a delivery cannot be stored meanwhile, but the
    /// store may come back). A still-valid value this process holds (`fallback`: its memory) first
    /// answers the callers that do not force a refresh, whatever validity they asked for, as a
    /// caller that finds the store unreachable is answered (source `cache`). A requested round
    /// whose callers are all answered so ends, as when its last caller leaves (a refresh-ahead
    /// round goes on).
    public mutating func storeFailed(requestID: String, fallback: Value? = nil, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID else { return [] }
        var answered: [Action] = []
        if let fallback, fallback.expiresAt > now.unixSeconds {
            let ids = round.waiters.filter { !$0.value.forced }.keys.sorted { $0.raw < $1.raw }
            if !ids.isEmpty {
                answered = ids.map { .cancelTimer(round.waiters[$0]!.timer) } + [.succeed(ids, fallback, .cache)]
                for id in ids { round.waiters[id] = nil }
            }
        }
        let everyoneAnswered = !answered.isEmpty && round.waiters.isEmpty && round.kind == .requested
        switch round.phase {
        case .acquiringLease:
            return answered + self.endRound(round, failing: .storeUnavailable, outcome: .abandoned, now: now)
        case .following where everyoneAnswered:
            // Nobody waits for the round followed.
            return answered + self.finishRound(round, outcome: .abandoned, now: now)
        case .following(let previous, let delay):
            // The next re-read (the previous timer cancelled: the failed read may not be its own).
            let timer = self.makeTimer()
            round.phase = .following(recheck: timer, delay: delay)
            self.state = .round(round)
            return answered + [
                .cancelTimer(previous), .scheduleTimer(timer, deadline: min(now + delay, round.deadline)),
            ]
        case .attempting, .awaitingDelivery, .backingOff:
            guard everyoneAnswered else {
                self.state = .round(round)
                return answered
            }
            // Work in flight is seen through; a retry is not made for nobody.
            return answered + self.lastCallerLeft(round, outcome: .abandoned, now: now)
        }
    }

    // MARK: - Events: the work

    /// Attempt `attempt` succeeded and its value will arrive by delivery (the trigger answered 2xx):
    /// wait up to ``TokenFlowConfiguration/deliveryGrace`` for it, re-reading the store as a safety net.
    public mutating func attemptSucceeded(requestID: String, attempt: Int, now: FlowTime) -> [Action] {
        if let counted = self.countLostAttempt(requestID: requestID, attempt: attempt, outcome: "success") {
            return counted
        }
        guard case .round(var round) = self.state, round.requestID == requestID,
            case .attempting(let current) = round.phase, current == attempt
        else { return [] }
        let grace = self.makeTimer()
        let recheck = self.makeTimer()
        let delay = self.configuration.pollInitial
        round.phase = .awaitingDelivery(attempt: attempt, grace: grace, recheck: recheck, delay: delay)
        // The grace runs out whatever the callers' deadline: a round whose callers are gone waits
        // for the delivery all the same (``lastCallerLeft``).
        round.workEnds = now + self.configuration.deliveryGrace
        let covered = self.coverWork(&round, now: now)
        self.state = .round(round)
        return [
            .readStore(requestID: requestID),
            .scheduleTimer(grace, deadline: now + self.configuration.deliveryGrace),
            .scheduleTimer(recheck, deadline: Self.recheck(after: delay, round, now: now)),
        ] + covered
    }

    /// Attempt `attempt` failed: back off and retry within the deadline, or fail the callers.
    public mutating func attemptFailed(
        requestID: String, attempt: Int, failure: TriggerFailure, now: FlowTime, jitter: Double
    ) -> [Action] {
        if let counted = self.countLostAttempt(requestID: requestID, attempt: attempt, outcome: failure.rawValue) {
            return counted
        }
        guard case .round(let round) = self.state, round.requestID == requestID,
            case .attempting(let current) = round.phase, current == attempt
        else { return [] }
        return [.recordAttempt(outcome: failure.rawValue)]
            + self.retryOrFail(round, attempt: attempt, failure: failure, now: now, jitter: jitter)
    }

    /// A value was seen: read from the store, delivered to this process, returned by the round's
    /// work, or announced by another process. `solicitedBy` is the round whose work it answered,
    /// if any. Callers it satisfies are answered; the round ends when none is left (a refresh-ahead
    /// round, or one whose work is in flight: once its own value, or one later than the one it
    /// was to improve on, arrived).
    public mutating func valueObserved(_ value: Value, solicitedBy: String?, now: FlowTime) -> [Action] {
        // A lost attempt's own value (stored before its trigger answers): the call succeeded.
        var counted: [Action] = []
        if let solicitedBy, let lost = self.lostAttempts.first(where: { $0.requestID == solicitedBy }) {
            self.lostAttempts.remove(lost)
            counted = [.recordAttempt(outcome: "success")]
        }
        return counted + self.observe(value, solicitedBy: solicitedBy, now: now)
    }

    private mutating func observe(_ value: Value, solicitedBy: String?, now: FlowTime) -> [Action] {
        if case .held(var hold) = self.state, value.expiresAt > (hold.newest?.expiresAt ?? .min) {
            // A later value (a push) during a hold: held callers get it from now on.
            hold.newest = value
            self.state = .held(hold)
        }
        guard case .round(var round) = self.state else { return [] }
        let answersThisRound = solicitedBy != nil && solicitedBy == round.requestID
        guard value.expiresAt > now.unixSeconds else { return [] }
        let source: TokenSource = (solicitedBy != nil || value.roundID != nil) ? .trigger : .push
        var answered: [WaiterID] = []
        var actions: [Action] = []
        for (id, w) in round.waiters {
            let newer = value.expiresAt > w.knownExpiry
            let acceptable =
                answersThisRound
                || (w.forced ? newer : (newer || value.expiresAt >= now.unixSeconds + w.minValidity))
            if acceptable {
                answered.append(id)
                actions.append(.cancelTimer(w.timer))
            }
        }
        for id in answered { round.waiters[id] = nil }
        if !answered.isEmpty {
            actions.append(.succeed(answered.sorted { $0.raw < $1.raw }, value, source))
        }
        var refreshed = true
        if case .refreshAhead(let knownExpiry) = round.kind {
            refreshed = answersThisRound || value.expiresAt > knownExpiry
        } else if round.phase.hasWorkInFlight, self.configuration.workOutlivesCallers {
            // Work in flight ends with its own value, or one later than its callers found
            // insufficient; callers satisfied by an older one (a re-read of what they had) leave
            // it running, as callers whose deadline passed do (``lastCallerLeft``).
            refreshed = answersThisRound || value.expiresAt > round.knownExpiry
        }
        guard round.waiters.isEmpty, refreshed else {
            self.state = .round(round)
            return actions
        }
        // The attempt in flight (or just answered) delivered: count it as a success once.
        switch round.phase {
        case .attempting, .awaitingDelivery: actions.append(.recordAttempt(outcome: "success"))
        default: break
        }
        return actions + self.finishRound(round, outcome: .succeeded, now: now)
    }

    /// A store re-read left callers waiting: no value, or none they accept (a forced refresh's own).
    /// A follower then tries to take the lease over (the round followed may be over, or its leader
    /// dead; its lease expires after its deadline); the take is refused while that round runs.
    public mutating func storeReadEmpty(requestID: String, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, round.requestID == requestID, case .following = round.phase
        else { return [] }
        // A re-read timer still pending is ignored once it fires (the phase has no re-read).
        round.phase = .acquiringLease
        self.state = .round(round)
        return [self.leaseAction(round, now: now)]
    }

    /// The round this process leads (`requestID`) was answered with a value no newer than the
    /// stored one (Forge hands out a cached token). `newest` is the newest valid value known. Every
    /// caller gets `newest` when it has at least ``TokenFlowConfiguration/heldTokenMinimumValidity``
    /// left (its expiry tells the truth), else `trigger_failed`; and the key's rounds are put on
    /// hold for ``TokenFlowConfiguration/sameTokenHold`` (state `held`).
    public mutating func roundTripBroughtNoNewerToken(requestID: String, newest: Value?, now: FlowTime)
        -> [Action]
    {
        guard case .round(let round) = self.state, round.requestID == requestID, round.phase.leads else { return [] }
        var actions: [Action] = []
        switch round.phase {
        case .attempting, .awaitingDelivery: actions.append(.recordAttempt(outcome: "success"))
        default: break
        }
        let ids = round.waiters.keys.sorted { $0.raw < $1.raw }
        for id in ids { actions.append(.cancelTimer(round.waiters[id]!.timer)) }
        let servable = self.servable(newest, now: now)
        // The hold first: a caller that comes back the moment it is answered finds it in force.
        // A slow write does not keep the callers past their deadline.
        actions += self.finishRound(
            round, outcome: servable != nil ? .succeeded : .failed, now: now,
            placingHold: Hold(until: now + self.configuration.sameTokenHold, newest: newest),
            answerBy: round.waiters.values.map(\.deadline).min())
        if !ids.isEmpty { actions.append(self.heldAnswer(for: ids, newest, source: .trigger, now: now)) }
        actions.append(.recordHold(servable != nil ? .sameTokenServed : .sameTokenExpiring))
        return actions
    }

    /// The round `requestID` ended with `error` for every caller, whether this process leads it
    /// (its work ended with a failure of the value's own: a refusal, a rate limit; recorded in the
    /// store before this event) or follows it (the other process's outcome was read). A led round
    /// counts as failed for circuit breaking and gives the lease up.
    public mutating func roundEnded(requestID: String, failing error: Value.Failure, now: FlowTime) -> [Action] {
        guard case .round(let round) = self.state, round.requestID == requestID else { return [] }
        return self.endRound(round, failingWith: error, outcome: round.phase.leads ? .failed : .abandoned, now: now)
    }

    // MARK: - Events: holds, circuits, timers, callers

    /// A hold was seen (announced by the process that placed it, or read from the store). Without a
    /// round the machine enters `held`. While following another process's round, callers that do
    /// not force a refresh are answered the held way; if only forced ones are left they take the
    /// lease regardless of the hold (the round followed has ended: a hold is placed when one ends).
    public mutating func holdObserved(_ hold: Hold, now: FlowTime) -> [Action] {
        guard hold.isActive(at: now) else { return [] }
        switch self.state {
        case .idle:
            self.state = .held(hold)
            return []
        case .held(let known):
            if hold.until >= known.until { self.state = .held(hold) }
            return []
        case .circuitOpen(let until, _):
            self.state = .circuitOpen(until: until, hold: hold)
            return []
        case .round(var round):
            // A hold the round knows already (its own, handed back by a caller served from
            // memory, or the same one read again by another caller) is nothing new: what it asked
            // for was done when it first came.
            let known = round.hold.map { $0.isActive(at: now) && hold.until <= $0.until + .seconds(1) } ?? false
            if hold.until > (round.hold?.until ?? hold.until - .seconds(1)) { round.hold = hold }
            guard !round.phase.leads, !known else {
                self.state = .round(round)
                return []
            }
            var actions = self.answerHeldWaiters(&round, hold: hold, now: now)
            if round.waiters.isEmpty {
                if case .refreshAhead = round.kind { actions.append(.recordHold(.refreshAheadHeld)) }
                return actions + self.finishRound(round, outcome: .abandoned, now: now)
            }
            if case .following(let recheck, _) = round.phase {
                actions.append(.cancelTimer(recheck))
                round.ignoresHold = true
                round.phase = .acquiringLease
                self.state = .round(round)
                return actions + [self.leaseAction(round, now: now)]
            }
            self.state = .round(round)
            return actions
        }
    }

    /// The key's circuit as the store records it: open until `openUntil`, or closed (nil). Without
    /// a round an open circuit puts the machine in `circuitOpen`; a closed one leaves it.
    public mutating func circuitObserved(openUntil: FlowTime?, now: FlowTime) -> [Action] {
        switch self.state {
        case .idle(let notBefore):
            if let openUntil, now < openUntil {
                _ = notBefore
                self.state = .circuitOpen(until: openUntil, hold: nil)
            }
        case .held(let hold):
            if let openUntil, now < openUntil { self.state = .circuitOpen(until: openUntil, hold: hold) }
        case .circuitOpen(_, let hold):
            if let openUntil, now < openUntil {
                self.state = .circuitOpen(until: openUntil, hold: hold)
            } else if let hold, hold.isActive(at: now) {
                self.state = .held(hold)
            } else {
                self.state = .idle(refreshNotBefore: nil)
            }
        case .round:
            break
        }
        return []
    }

    /// A timer fired.
    public mutating func timerFired(_ timer: TimerID, now: FlowTime, jitter: Double) -> [Action] {
        guard case .round(var round) = self.state else { return [] }
        if case .refreshAhead = round.kind, round.waiters.isEmpty, now >= round.deadline,
            !(round.phase.hasWorkInFlight && self.configuration.workOutlivesCallers)
        {
            return self.finishRound(round, outcome: round.phase.leads ? .failed : .abandoned, now: now)
        }
        // A caller's deadline.
        if let (id, _) = round.waiters.first(where: { $0.value.timer == timer }) {
            round.waiters[id] = nil
            var actions: [Action] = [.fail([id], Value.failure(Self.deadlineError(round.phase)))]
            if round.waiters.isEmpty, case .requested = round.kind {
                actions += self.lastCallerLeft(round, outcome: round.phase.leads ? .failed : .abandoned, now: now)
            } else {
                self.state = .round(round)
            }
            return actions
        }
        switch round.phase {
        case .following(let recheck, _) where recheck == timer:
            return [.readStore(requestID: round.requestID)]
        case .awaitingDelivery(let attempt, let grace, let recheck, let delay):
            if grace == timer {
                return [.recordAttempt(outcome: TriggerFailure.noDelivery.rawValue)]
                    + self.retryOrFail(round, attempt: attempt, failure: .noDelivery, now: now, jitter: jitter)
            }
            guard recheck == timer else { return [] }
            let next = self.makeTimer()
            let longer = min(delay * 2, self.configuration.pollCap)
            round.phase = .awaitingDelivery(attempt: attempt, grace: grace, recheck: next, delay: longer)
            self.state = .round(round)
            return [
                .readStore(requestID: round.requestID),
                .scheduleTimer(next, deadline: Self.recheck(after: longer, round, now: now)),
            ]
        case .backingOff(let attempt, let t, _) where t == timer:
            let started = self.startAttempt(&round, attempt: attempt + 1, now: now)
            self.state = .round(round)
            return [.recordRetry] + started
        default:
            return []
        }
    }

    /// A caller went away (cancelled its request).
    public mutating func waiterCancelled(_ waiter: WaiterID, now: FlowTime) -> [Action] {
        guard case .round(var round) = self.state, let w = round.waiters.removeValue(forKey: waiter) else { return [] }
        var actions: [Action] = [.cancelTimer(w.timer), .fail([waiter], Value.failure(.cancelled))]
        if round.waiters.isEmpty, case .requested = round.kind {
            actions += self.lastCallerLeft(round, outcome: .abandoned, now: now)
        } else {
            self.state = .round(round)
        }
        return actions
    }

    /// The key was removed (the installation uninstalled): every caller gets 410 at once.
    public mutating func installationUninstalled(now: FlowTime) -> [Action] {
        guard case .round(let round) = self.state else {
            self.state = .idle(refreshNotBefore: nil)
            return []
        }
        let actions = self.endRound(round, failing: .installationUninstalled, outcome: .abandoned, now: now)
        self.state = .idle(refreshNotBefore: nil)
        return actions
    }

    /// The process is shutting down: callers still waiting get an error answer now.
    public mutating func shutdownRequested(now: FlowTime) -> [Action] {
        guard case .round(let round) = self.state else { return [] }
        return self.endRound(round, failing: .shuttingDown, outcome: .abandoned, now: now)
    }

    // MARK: - Helpers

    /// The value a caller gets when a round brought no newer one, or while a hold is in force:
    /// `newest` when it has at least ``TokenFlowConfiguration/heldTokenMinimumValidity`` left.
    public func servable(_ newest: Value?, now: FlowTime) -> Value? {
        let floor = now.unixSeconds + self.configuration.heldTokenMinimumValidity.components.seconds
        guard let value = newest, value.expiresAt >= floor else { return nil }
        return value
    }

    /// The answer for callers `ids` under a hold: the newest value if ``servable(_:now:)``, else
    /// `trigger_failed`.
    public func heldAnswer(for ids: [WaiterID], _ newest: Value?, source: TokenSource, now: FlowTime) -> Action {
        if let value = self.servable(newest, now: now) { return .succeed(ids, value, source) }
        return .fail(ids, Value.failure(.noUsableToken))
    }

    private func answerHeldWaiters(_ round: inout Round, hold: Hold, now: FlowTime) -> [Action] {
        let ids = round.waiters.filter { !$0.value.forced }.keys.sorted { $0.raw < $1.raw }
        guard !ids.isEmpty else { return [] }
        var actions: [Action] = ids.map { .cancelTimer(round.waiters[$0]!.timer) }
        for id in ids { round.waiters[id] = nil }
        actions.append(self.heldAnswer(for: ids, hold.newest, source: .cache, now: now))
        actions += ids.map { _ in .recordHold(.requestHeld) }
        return actions
    }

    private func leaseAction(_ round: Round, now: FlowTime) -> Action {
        let ttl = self.leaseTTL(deadline: round.deadline, now: now)
        return round.ignoresHold
            ? .acquireLeaseIgnoringHold(requestID: round.requestID, ttl: ttl, unlessNewerThan: round.knownExpiry)
            : .acquireLease(requestID: round.requestID, ttl: ttl, unlessNewerThan: round.knownExpiry)
    }

    private func leaseTTL(deadline: FlowTime, now: FlowTime) -> Duration {
        max(deadline - now, .milliseconds(1)) + self.configuration.leaseGrace
    }

    /// Starts attempt `attempt` of `round`. The attempt has ``TokenFlowConfiguration/attemptTimeout``
    /// whatever its callers' deadline (they are answered at theirs; the round sees its work
    /// through, ``lastCallerLeft``), unless ``TokenFlowConfiguration/workOutlivesCallers`` is off;
    /// `expiresAt` is when this process stops waiting for it, the callers' deadline or the
    /// attempt's end, whichever is later.
    private func startAttempt(_ round: inout Round, attempt: Int, now: FlowTime) -> [Action] {
        var timeout = self.configuration.attemptTimeout
        var expiresAt = max(round.deadline, now + timeout)
        if !self.configuration.workOutlivesCallers {
            timeout = min(timeout, max(round.deadline - now, .milliseconds(1)))
            expiresAt = round.deadline
        }
        round.phase = .attempting(attempt: attempt)
        round.attemptsMade = attempt
        round.workEnds = now + timeout
        let covered = self.coverWork(&round, now: now)
        return covered + [
            .startAttempt(requestID: round.requestID, attempt: attempt, expiresAt: expiresAt, timeout: timeout)
        ]
    }

    /// The round's last caller left: its deadline passed (`outcome` `failed` when this process
    /// leads) or it went away (`abandoned`). Work in flight, an attempt or the wait for its
    /// delivery, is seen through: the round goes on without callers, holding the lease (extended
    /// to cover the work when needed), so no other process starts a second trigger call while
    /// this one may still bring a token, the round's verdict is what the work did, and callers
    /// that arrive meanwhile join it. It makes no further attempt for nobody. Otherwise the
    /// round ends now.
    private mutating func lastCallerLeft(_ round: Round, outcome: RoundOutcome, now: FlowTime) -> [Action] {
        guard round.phase.hasWorkInFlight, self.configuration.workOutlivesCallers else {
            return self.finishRound(round, outcome: outcome, now: now)
        }
        var round = round
        let covered = self.coverWork(&round, now: now)
        self.state = .round(round)
        return covered
    }

    /// The lease of a round this process leads, extended when the callers' deadline or the work
    /// in flight ends more than half of ``TokenFlowConfiguration/leaseGrace`` after the instant
    /// it was set for: it outlives both by the grace. The callers' default deadline (10 s) and the
    /// attempt timeout (10 s) end together, so a cold round with such callers extends nothing.
    private func coverWork(_ round: inout Round, now: FlowTime) -> [Action] {
        let ends = max(round.deadline, round.workEnds ?? round.deadline)
        guard self.configuration.workOutlivesCallers, round.phase.leads,
            ends > round.leaseDeadline + self.configuration.leaseGrace / 2
        else { return [] }
        round.leaseDeadline = ends
        return [.extendLease(requestID: round.requestID, ttl: self.leaseTTL(deadline: ends, now: now))]
    }

    /// When the re-read while awaiting a delivery is due: after `delay`, and not after the callers'
    /// deadline while they wait (once it has passed, the grace timer ends the wait).
    private static func recheck(after delay: Duration, _ round: Round, now: FlowTime) -> FlowTime {
        now < round.deadline ? min(now + delay, round.deadline) : now + delay
    }

    private mutating func retryOrFail(
        _ round: Round, attempt: Int, failure: TriggerFailure, now: FlowTime, jitter: Double
    ) -> [Action] {
        var round = round
        var actions: [Action] = []
        if case .awaitingDelivery(_, let grace, let recheck, _) = round.phase {
            actions += [.cancelTimer(grace), .cancelTimer(recheck)]
        }
        var anyoneWaits = !round.waiters.isEmpty
        if case .refreshAhead = round.kind { anyoneWaits = true }
        if attempt < self.configuration.maxAttempts, anyoneWaits {
            let delay = Backoff.delay(
                attempt: attempt, base: self.configuration.backoffBase, cap: self.configuration.backoffCap,
                jitter: jitter)
            // A retry needs time to be of use: one that would start with less than
            // ``minimumRetryBudget`` before the deadline is not made.
            if now + delay + Self.minimumRetryBudget <= round.deadline {
                let timer = self.makeTimer()
                round.phase = .backingOff(attempt: attempt, timer: timer, after: failure)
                self.state = .round(round)
                if self.configuration.rereadsAfterFailedAttempt {
                    actions.append(.readStore(requestID: round.requestID))
                }
                return actions + [.scheduleTimer(timer, deadline: now + delay)]
            }
        }
        return actions + self.endRound(round, failing: Self.error(after: failure), outcome: .failed, now: now)
    }

    /// Least time left before the deadline, once the backoff pause is over, for a retry to be made.
    static var minimumRetryBudget: Duration { .milliseconds(100) }

    /// The answer for callers of a round whose last attempt failed this way (contract §2): the
    /// trigger refused or unreachable is 502 `trigger_failed`; no token in time is 504.
    static func error(after failure: TriggerFailure) -> FlowError {
        switch failure {
        case .httpError, .transportError:
            return FlowError(code: .triggerFailed, detail: "last attempt: \(failure.rawValue)")
        case .timeout, .noDelivery:
            return FlowError(code: .tokenTimeout, detail: "last attempt: \(failure.rawValue)")
        }
    }

    /// What a caller whose deadline passes gets: while the round waits to try again after an
    /// attempt the trigger refused or could not be reached, every attempt made failed so (502);
    /// otherwise no token came in time (504).
    static func deadlineError(_ phase: Phase) -> FlowError {
        if case .backingOff(_, _, let failure) = phase { return Self.error(after: failure) }
        return FlowError(code: .tokenTimeout)
    }

    private mutating func endRound(_ round: Round, failing error: FlowError, outcome: RoundOutcome, now: FlowTime)
        -> [Action]
    {
        self.endRound(round, failingWith: Value.failure(error), outcome: outcome, now: now)
    }

    private mutating func endRound(
        _ round: Round, failingWith error: Value.Failure, outcome: RoundOutcome, now: FlowTime
    ) -> [Action] {
        var actions: [Action] = []
        let ids = round.waiters.keys.sorted { $0.raw < $1.raw }
        for id in ids { actions.append(.cancelTimer(round.waiters[id]!.timer)) }
        if !ids.isEmpty { actions.append(.fail(ids, error)) }
        return actions + self.finishRound(round, outcome: outcome, now: now)
    }

    /// Ends the round: cancels its timers, reports the verdict of a led round, releases the lease
    /// (or places `placingHold`, releasing it in the same step) and moves to `held` (a hold placed
    /// or seen during the round) or `idle` (with the refresh-ahead cool-down unless it succeeded).
    private mutating func finishRound(
        _ round: Round, outcome: RoundOutcome, now: FlowTime, placingHold: Hold? = nil, answerBy: FlowTime? = nil
    ) -> [Action] {
        var actions: [Action] = []
        switch round.phase {
        case .following(let recheck, _): actions.append(.cancelTimer(recheck))
        case .awaitingDelivery(_, let grace, let recheck, _): actions += [.cancelTimer(grace), .cancelTimer(recheck)]
        case .backingOff(_, let timer, _): actions.append(.cancelTimer(timer))
        case .acquiringLease, .attempting: break
        }
        if round.phase.leads, self.configuration.circuitBreaking {
            switch outcome {
            case .succeeded: actions.append(.roundFinished(succeeded: true))
            case .failed: actions.append(.roundFinished(succeeded: false))
            case .abandoned: break
            }
        }
        if let placingHold {
            actions.append(
                .placeHold(
                    requestID: round.requestID, duration: placingHold.until - now, releasingLease: round.phase.leads,
                    answerBy: answerBy))
        } else if round.phase.leads {
            actions.append(.releaseLease(requestID: round.requestID))
        }
        if let hold = placingHold ?? round.hold, hold.isActive(at: now) {
            self.state = .held(hold)
        } else if outcome == .succeeded && round.phase.leads {
            self.state = .idle(refreshNotBefore: nil)
        } else {
            self.state = .idle(refreshNotBefore: round.refreshNotBefore.flatMap { now < $0 ? $0 : nil })
        }
        return actions
    }
}
