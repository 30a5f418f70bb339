import Testing

@testable import FlowEngine

/// A value of another kind than an access token (as a user-token exchange would use): the machine
/// is generic over what a round fetches.
private struct Credential: LeasedRoundValue {
    var expiresAt: Int64
    var roundID: String?
    func isStale(at now: FlowTime, fraction: Double) -> Bool { now.unixSeconds >= self.expiresAt - 100 }
}

private func config() -> TokenFlowConfiguration {
    var c = TokenFlowConfiguration()
    c.maxAttempts = 2
    c.backoffBase = .milliseconds(100)
    c.backoffCap = .seconds(1)
    c.deliveryGrace = .seconds(2)
    c.refreshAheadCooldown = .seconds(10)
    c.sameTokenHold = .seconds(60)
    return c
}

private typealias Machine = LeasedRoundStateMachine<Credential>

private func scheduled(_ actions: [Machine.Action]) -> [TimerID] {
    actions.compactMap { if case .scheduleTimer(let t, _) = $0 { return t } else { return nil } }
}

@Suite("LeasedRoundStateMachine")
struct LeasedRoundStateMachineTests {
    let start = FlowTime(unixSeconds: 1_763_906_400)

    private func request(
        _ m: inout Machine, _ w: UInt64, forced: Bool = false, current: Credential? = nil, canStart: Bool = true,
        rid: String = "r1", at now: FlowTime
    ) -> [Machine.Action] {
        m.tokenWasRequested(
            waiter: WaiterID(w), minValidity: 300, knownExpiry: current?.expiresAt ?? 0, forced: forced,
            deadline: now + .seconds(10), requestID: rid, current: current, canStartRound: canStart, now: now)
    }

    @Test("idle: a value that satisfies the caller answers it at once, without a round")
    func freshAnswersAtOnce() {
        var m = Machine(configuration: config())
        let fresh = Credential(expiresAt: self.start.unixSeconds + 3600)
        let a = self.request(&m, 1, current: fresh, at: self.start)
        #expect(a == [.succeed([WaiterID(1)], fresh, .cache)])
        #expect(m.stateName(at: self.start) == .idle)
        #expect(!m.isRetained(at: self.start))
    }

    @Test("a generic round: lease, attempt, the value returned by the work answers every caller")
    func genericRound() {
        var m = Machine(configuration: config())
        let a = self.request(&m, 1, at: self.start)
        #expect(a.contains(.acquireLease(requestID: "r1", ttl: .seconds(12), unlessNewerThan: 0)))
        #expect(m.stateName(at: self.start) == .acquiringLease)
        _ = self.request(&m, 2, at: self.start)
        #expect(m.waiterCount == 2)
        let b = m.leaseAcquired(requestID: "r1", now: self.start)
        #expect(
            b == [
                .startAttempt(requestID: "r1", attempt: 1, expiresAt: self.start + .seconds(10), timeout: .seconds(10))
            ])
        #expect(m.stateName(at: self.start) == .attempting)
        let value = Credential(expiresAt: self.start.unixSeconds + 3600, roundID: "r1")
        let c = m.valueObserved(value, solicitedBy: "r1", now: self.start)
        #expect(c.contains(.succeed([WaiterID(1), WaiterID(2)], value, .trigger)))
        #expect(c.contains(.roundFinished(succeeded: true)))
        #expect(c.contains(.releaseLease(requestID: "r1")))
        #expect(m.stateName(at: self.start) == .idle)
    }

    @Test("a lease taken for an earlier deadline than the round's is extended once acquired")
    func leaseExtendedOnAcquire() {
        // A caller that joins (deadline 30 s) while the lease for the first (10 s) is being taken.
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: 0, forced: false, deadline: self.start + .seconds(30),
            requestID: "r1", current: nil, canStartRound: true, now: self.start)
        let a = m.leaseAcquired(requestID: "r1", now: self.start + .seconds(1))
        #expect(a.first == .extendLease(requestID: "r1", ttl: .seconds(31)))
        #expect(a.contains { if case .startAttempt = $0 { true } else { false } })
        // A lease a snapshot took for its reader's deadline (1 s), taken over by a round whose
        // caller waits 10 s.
        var n = Machine(configuration: config())
        _ = self.request(&n, 1, at: self.start)
        let b = n.leaseAcquired(requestID: "r1", leaseDeadline: self.start + .seconds(1), now: self.start)
        #expect(b.first == .extendLease(requestID: "r1", ttl: .seconds(12)))
        // Within half the grace of the lease's own deadline: no extension.
        var o = Machine(configuration: config())
        _ = self.request(&o, 1, at: self.start)
        let c = o.leaseAcquired(requestID: "r1", leaseDeadline: self.start + .milliseconds(9500), now: self.start)
        #expect(!c.contains { if case .extendLease = $0 { true } else { false } })
    }

    @Test("attempting → awaiting delivery → (grace ends) backing off → attempting again")
    func leadingPhases() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let a = m.attemptSucceeded(requestID: "r1", attempt: 1, now: self.start)
        #expect(a.first == .readStore(requestID: "r1"))
        #expect(m.stateName(at: self.start) == .awaitingDelivery)
        let timers = scheduled(a)
        #expect(timers.count == 2)
        // The re-read timer: another store read, a longer interval.
        let later = self.start + .milliseconds(50)
        let b = m.timerFired(timers[1], now: later, jitter: 0)
        #expect(b.contains(.readStore(requestID: "r1")))
        #expect(m.stateName(at: later) == .awaitingDelivery)
        // The grace timer: no delivery → back off.
        let graceEnd = self.start + .seconds(2)
        let c = m.timerFired(timers[0], now: graceEnd, jitter: 0)
        #expect(c.contains(.recordAttempt(outcome: "no_delivery")))
        #expect(m.stateName(at: graceEnd) == .backingOff)
        let backoff = scheduled(c)
        #expect(backoff.count == 1)
        let d = m.timerFired(backoff[0], now: graceEnd + .milliseconds(50), jitter: 0)
        #expect(d.contains(.recordRetry))
        #expect(m.stateName(at: graceEnd) == .attempting)
        // Last attempt fails: the callers fail and the round's verdict is recorded.
        let e = m.attemptFailed(requestID: "r1", attempt: 2, failure: .httpError, now: graceEnd, jitter: 0)
        #expect(e.contains(.fail([WaiterID(1)], .triggerFailed)))
        #expect(e.contains(.roundFinished(succeeded: false)))
        #expect(m.stateName(at: graceEnd) == .idle)
    }

    @Test(
        "a caller's deadline while the round waits to retry a refused trigger is 502 and ends the round; during an attempt 504, and the round sees the attempt through"
    )
    func deadlineAnswers() throws {
        // Waiting to retry after a non-2xx: every attempt made was refused (contract §2: 502).
        var m = Machine(configuration: config())
        let callerTimer = try #require(scheduled(self.request(&m, 1, at: self.start)).first)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let failed = m.attemptFailed(
            requestID: "r1", attempt: 1, failure: .httpError, now: self.start + .seconds(1), jitter: 0)
        #expect(m.stateName(at: self.start + .seconds(1)) == .backingOff)
        #expect(failed.contains(.recordAttempt(outcome: "http_error")))
        let late = m.timerFired(callerTimer, now: self.start + .seconds(10), jitter: 0)
        #expect(late.contains(.fail([WaiterID(1)], .triggerFailed)))
        #expect(late.contains(.roundFinished(succeeded: false)))
        #expect(late.contains(.releaseLease(requestID: "r1")))
        #expect(!late.contains { if case .recordAttempt = $0 { return true } else { return false } })

        // During an attempt: no token in time (504). The attempt goes on (its timeout is its own),
        // the round keeps the lease, and its outcome is the round's verdict; nobody waits, so no
        // retry although one is left.
        var n = Machine(configuration: config())
        let timer = try #require(scheduled(self.request(&n, 1, at: self.start)).first)
        _ = n.leaseAcquired(requestID: "r1", now: self.start)
        let cut = n.timerFired(timer, now: self.start + .seconds(5), jitter: 0)
        #expect(cut == [.fail([WaiterID(1)], .tokenTimeout)])
        #expect(n.stateName(at: self.start + .seconds(5)) == .attempting)
        let ended = n.attemptFailed(
            requestID: "r1", attempt: 1, failure: .timeout, now: self.start + .seconds(10), jitter: 0)
        #expect(
            ended == [
                .recordAttempt(outcome: "timeout"), .roundFinished(succeeded: false), .releaseLease(requestID: "r1"),
            ])
        #expect(n.stateName(at: self.start + .seconds(10)) == .idle)
    }

    @Test(
        "callers gone, the attempt answers 2xx: the lease is extended over the delivery grace, and the delivery is the round's success"
    )
    func workOutlivesCallers() throws {
        var m = Machine(configuration: config())
        let old = Credential(expiresAt: self.start.unixSeconds + 100)
        let timer = try #require(scheduled(self.request(&m, 1, current: old, at: self.start)).first)
        let acquired = m.leaseAcquired(requestID: "r1", now: self.start)
        #expect(
            acquired.contains(
                .startAttempt(requestID: "r1", attempt: 1, expiresAt: self.start + .seconds(10), timeout: .seconds(10)))
        )
        _ = m.timerFired(timer, now: self.start + .seconds(10), jitter: 0)
        // The 2xx after the callers' deadline: the grace (2 s) would end after the lease (10 s + 2 s).
        let now = self.start + .milliseconds(10_500)
        let accepted = m.attemptSucceeded(requestID: "r1", attempt: 1, now: now)
        #expect(accepted.contains(.extendLease(requestID: "r1", ttl: .seconds(4))))
        #expect(m.stateName(at: now) == .awaitingDelivery)
        // A re-read of nothing new does not end it…
        #expect(m.valueObserved(old, solicitedBy: nil, now: now).isEmpty)
        // …its own value does, as a success.
        let delivered = m.valueObserved(
            Credential(expiresAt: now.unixSeconds + 3600, roundID: "r1"), solicitedBy: "r1", now: now)
        #expect(
            delivered == [
                .recordAttempt(outcome: "success"), .cancelTimer(TimerID(2)), .cancelTimer(TimerID(3)),
                .roundFinished(succeeded: true), .releaseLease(requestID: "r1"),
            ])
        #expect(m.stateName(at: now) == .idle)
    }

    @Test(
        "a refresh-ahead round a caller joined: the lease covers a retry that outlives the callers' deadline"
    )
    func refreshAheadLeaseCoversItsAttempt() throws {
        var m = Machine(configuration: config())
        let stale = Credential(expiresAt: self.start.unixSeconds + 50)
        _ = m.refreshAheadWasRequested(knownExpiry: stale.expiresAt, requestID: "bg", now: self.start)
        _ = m.leaseAcquired(requestID: "bg", now: self.start)
        // A caller joins 25 s in (deadline 35 s): the lease is extended to it.
        let joined = self.request(&m, 1, current: stale, rid: "r1", at: self.start + .seconds(25))
        #expect(joined.contains(.extendLease(requestID: "bg", ttl: .seconds(12))))
        // Attempt 1 fails at 29 s; the retry may run until 39 s: the lease is extended again.
        let failed = m.attemptFailed(
            requestID: "bg", attempt: 1, failure: .httpError, now: self.start + .seconds(29), jitter: 0)
        let backoff = try #require(scheduled(failed).first)
        let retryAt = self.start + .milliseconds(29_050)
        let retried = m.timerFired(backoff, now: retryAt, jitter: 0)
        #expect(retried.contains(.extendLease(requestID: "bg", ttl: .seconds(12))))
    }

    @Test("a refresh-ahead round whose deadline comes during an attempt sees the attempt through")
    func refreshAheadDeadlineDuringAnAttempt() throws {
        var m = Machine(configuration: config())
        let started = m.refreshAheadWasRequested(
            knownExpiry: self.start.unixSeconds + 50, requestID: "bg", now: self.start)
        let deadlineTimer = try #require(scheduled(started).first)
        _ = m.leaseAcquired(requestID: "bg", now: self.start)
        let failed = m.attemptFailed(
            requestID: "bg", attempt: 1, failure: .httpError, now: self.start + .seconds(25), jitter: 0)
        _ = m.timerFired(try #require(scheduled(failed).first), now: self.start + .seconds(25), jitter: 0)
        #expect(m.timerFired(deadlineTimer, now: self.start + .seconds(30), jitter: 0).isEmpty)
        #expect(m.stateName(at: self.start + .seconds(30)) == .attempting)
        let ended = m.attemptFailed(
            requestID: "bg", attempt: 2, failure: .timeout, now: self.start + .seconds(35), jitter: 0)
        #expect(ended.contains(.roundFinished(succeeded: false)))
        #expect(!m.isActive)
    }

    @Test(
        "callers gone while awaiting a delivery: the grace and the re-reads run on past their deadline, never due in the past"
    )
    func awaitingDeliveryPastTheDeadline() throws {
        var m = Machine(configuration: config())
        let timer = try #require(scheduled(self.request(&m, 1, at: self.start)).first)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let accepted = m.attemptSucceeded(requestID: "r1", attempt: 1, now: self.start + .milliseconds(9_900))
        let deadlines = accepted.compactMap {
            if case .scheduleTimer(let t, let d) = $0 { return (t, d) } else { return nil }
        }
        // The grace is not cut at the callers' deadline (10 s).
        let grace = try #require(deadlines.first)
        #expect(grace.1 == self.start + .milliseconds(11_900))
        let recheck = try #require(deadlines.last)
        _ = m.timerFired(timer, now: self.start + .seconds(10), jitter: 0)
        // A re-read after the deadline schedules the next one ahead of now.
        var now = self.start + .milliseconds(10_010)
        var next = recheck.0
        for _ in 0..<3 {
            let fired = m.timerFired(next, now: now, jitter: 0)
            #expect(fired.contains(.readStore(requestID: "r1")))
            let due = try #require(
                fired.compactMap { if case .scheduleTimer(let t, let d) = $0 { return (t, d) } else { return nil } }
                    .first)
            #expect(due.1 > now)
            (next, now) = (due.0, due.1)
        }
        let over = m.timerFired(grace.0, now: self.start + .milliseconds(11_900), jitter: 0)
        #expect(over.contains(.recordAttempt(outcome: "no_delivery")))
        #expect(over.contains(.roundFinished(succeeded: false)))
        #expect(!m.isActive)
    }

    @Test(
        "callers answered by the value they had while the work is in flight: the round goes on, and ends with the work's own value"
    )
    func olderValueLeavesTheWorkRunning() throws {
        var m = Machine(configuration: config())
        let old = Credential(expiresAt: self.start.unixSeconds + 200)
        let first = try #require(scheduled(self.request(&m, 1, current: old, at: self.start)).first)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        // The first caller's deadline: the attempt is seen through.
        _ = m.timerFired(first, now: self.start + .seconds(10), jitter: 0)
        // A caller asking for less validity joins without the value it had (knownExpiry 0), the
        // only one waiting…
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 60, knownExpiry: 0, forced: false, deadline: self.start + .seconds(20),
            requestID: "r2", now: self.start + .seconds(10))
        // …and a re-read of the old value answers it, but does not end the round.
        let reread = m.valueObserved(old, solicitedBy: nil, now: self.start + .seconds(11))
        #expect(reread.contains(.succeed([WaiterID(2)], old, .push)))
        #expect(!reread.contains(.roundFinished(succeeded: true)))
        #expect(!reread.contains(.releaseLease(requestID: "r1")))
        #expect(m.waiterCount == 0)
        #expect(m.isActive)
        // The round's own value ends it.
        let own = Credential(expiresAt: self.start.unixSeconds + 3600, roundID: "r1")
        let done = m.valueObserved(own, solicitedBy: "r1", now: self.start + .seconds(11))
        #expect(done.contains(.roundFinished(succeeded: true)))
        #expect(!m.isActive)
    }

    @Test("a lease taken once every caller's deadline has passed: no attempt, the lease goes back")
    func leaseAfterTheDeadline() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        let late = m.leaseAcquired(requestID: "r1", now: self.start + .seconds(10))
        #expect(!late.contains { if case .startAttempt = $0 { return true } else { return false } })
        #expect(late.contains(.fail([WaiterID(1)], .tokenTimeout)))
        #expect(late.contains(.releaseLease(requestID: "r1")))
        #expect(!m.isActive)
    }

    @Test("a caller joining a round whose callers are gone joins it: no second lease, no second attempt")
    func joinsARoundWhoseCallersAreGone() throws {
        var m = Machine(configuration: config())
        let timer = try #require(scheduled(self.request(&m, 1, at: self.start)).first)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        _ = m.timerFired(timer, now: self.start + .seconds(10), jitter: 0)
        let joined = self.request(&m, 2, rid: "r2", at: self.start + .seconds(10))
        #expect(!joined.contains { if case .acquireLease = $0 { return true } else { return false } })
        #expect(!joined.contains { if case .startAttempt = $0 { return true } else { return false } })
        #expect(m.waiterCount == 1)
        #expect(m.currentRequestID == "r1")
        // The attempt fails: the new caller's deadline leaves time, so the round tries again.
        let failed = m.attemptFailed(
            requestID: "r1", attempt: 1, failure: .httpError, now: self.start + .seconds(11), jitter: 0)
        #expect(m.stateName(at: self.start + .seconds(11)) == .backingOff)
        #expect(!failed.contains(.roundFinished(succeeded: false)))
    }

    @Test("no retry starts with less than 100 ms before the deadline: the callers get the last attempt's answer")
    func retryNeedsABudget() {
        // config(): 2 attempts, base 100 ms (50 ms at jitter 0); the caller's deadline is 10 s.
        for (failedAt, retried) in [(Duration.milliseconds(9_850), true), (.milliseconds(9_851), false)] {
            var m = Machine(configuration: config())
            _ = self.request(&m, 1, at: self.start)
            _ = m.leaseAcquired(requestID: "r1", now: self.start)
            let now = self.start + failedAt
            let a = m.attemptFailed(requestID: "r1", attempt: 1, failure: .transportError, now: now, jitter: 0)
            #expect((m.stateName(at: now) == .backingOff) == retried, "\(failedAt)")
            #expect(a.contains(.fail([WaiterID(1)], .triggerFailed)) == !retried, "\(failedAt)")
        }
    }

    @Test("following: woken by a value, or by the re-read timer; an empty re-read takes the lease over")
    func following() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        let a = m.leaseDenied(requestID: "r1", now: self.start)
        #expect(m.stateName(at: self.start) == .following)
        let recheck = scheduled(a)[0]
        #expect(m.timerFired(recheck, now: self.start + .milliseconds(50), jitter: 0) == [.readStore(requestID: "r1")])
        let b = m.storeReadEmpty(requestID: "r1", now: self.start + .milliseconds(60))
        #expect(b.contains(.acquireLease(requestID: "r1", ttl: .milliseconds(11_940), unlessNewerThan: 0)))
        #expect(m.stateName(at: self.start) == .acquiringLease)
        _ = m.leaseDenied(requestID: "r1", now: self.start + .milliseconds(70))
        let value = Credential(expiresAt: self.start.unixSeconds + 3600, roundID: "other")
        let c = m.valueObserved(value, solicitedBy: "other", now: self.start + .milliseconds(80))
        #expect(c.contains(.succeed([WaiterID(1)], value, .trigger)))
        // A followed round ends without a verdict of this process's own.
        #expect(!c.contains(.roundFinished(succeeded: true)))
        #expect(m.stateName(at: self.start) == .idle)
    }

    @Test("held: a hold puts an idle machine in `held`; requests are answered with the newest value until it ends")
    func held() {
        var m = Machine(configuration: config())
        let newest = Credential(expiresAt: self.start.unixSeconds + 90)
        #expect(m.holdObserved(Machine.Hold(until: self.start + .seconds(60), newest: newest), now: self.start).isEmpty)
        #expect(m.stateName(at: self.start) == .held)
        #expect(m.isRetained(at: self.start))
        let a = self.request(&m, 1, at: self.start + .seconds(1))
        #expect(a == [.succeed([WaiterID(1)], newest, .cache), .recordHold(.requestHeld)])
        // Refresh-ahead does not start either.
        #expect(
            m.valueServed(newest, requestID: "bg", now: self.start + .seconds(2)) == [.recordHold(.refreshAheadHeld)])
        // A forced refresh runs a round regardless, and the hold is in force again after it.
        let b = self.request(&m, 2, forced: true, rid: "rf", at: self.start + .seconds(3))
        #expect(b.contains(.acquireLeaseIgnoringHold(requestID: "rf", ttl: .seconds(12), unlessNewerThan: 0)))
        _ = m.leaseAcquired(requestID: "rf", now: self.start + .seconds(3))
        let fresh = Credential(expiresAt: self.start.unixSeconds + 3600, roundID: "rf")
        _ = m.valueObserved(fresh, solicitedBy: "rf", now: self.start + .seconds(4))
        #expect(m.stateName(at: self.start + .seconds(4)) == .held)
        // Once it ends: idle, and nothing left to remember.
        let after = self.start + .seconds(61)
        #expect(m.stateName(at: after) == .idle)
        #expect(!m.isRetained(at: after))
        #expect(
            self.request(&m, 3, rid: "r3", at: after).contains(
                .acquireLease(requestID: "r3", ttl: .seconds(12), unlessNewerThan: 0)))
    }

    @Test(
        "a led round that brought no newer value places the hold and enters `held`; its callers are answered once the hold is written, or by the earliest of their deadlines"
    )
    func sameValuePlacesHold() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        _ = self.request(&m, 2, rid: "r2", at: self.start + .seconds(2))
        let newest = Credential(expiresAt: self.start.unixSeconds + 600)
        let a = m.roundTripBroughtNoNewerToken(requestID: "r1", newest: newest, now: self.start + .seconds(3))
        let hold = a.firstIndex(
            of: .placeHold(
                requestID: "r1", duration: .seconds(60), releasingLease: true, answerBy: self.start + .seconds(10)))
        let answer = a.firstIndex(of: .succeed([WaiterID(1), WaiterID(2)], newest, .trigger))
        #expect(hold != nil && answer != nil && hold! < answer!)
        #expect(m.stateName(at: self.start) == .held)
        #expect(m.hold(at: self.start)?.newest == newest)
    }

    @Test("circuit open: requests fail fast with the time left; a fresh value is still served; it closes on time")
    func circuitOpen() {
        var m = Machine(configuration: config())
        #expect(m.circuitObserved(openUntil: self.start + .seconds(30), now: self.start).isEmpty)
        #expect(m.stateName(at: self.start) == .circuitOpen)
        let a = self.request(&m, 1, at: self.start + .seconds(10))
        #expect(a == [.fail([WaiterID(1)], .circuitOpen(retryAfter: .seconds(20)))])
        if case .fail(_, let error) = a.first { #expect(error.retryAfter == .seconds(20)) }
        // A forced refresh fails fast too.
        #expect(self.request(&m, 2, forced: true, at: self.start + .seconds(10)).count == 1)
        let fresh = Credential(expiresAt: self.start.unixSeconds + 3600)
        #expect(
            self.request(&m, 3, current: fresh, at: self.start + .seconds(10)) == [
                .succeed([WaiterID(3)], fresh, .cache)
            ])
        let stale = Credential(expiresAt: self.start.unixSeconds + 60)
        #expect(m.valueServed(stale, requestID: "bg", now: self.start + .seconds(10)).isEmpty)
        let after = self.start + .seconds(30)
        #expect(m.stateName(at: after) == .idle)
        #expect(
            self.request(&m, 4, rid: "r4", at: after).contains(
                .acquireLease(requestID: "r4", ttl: .seconds(12), unlessNewerThan: 0)))
        // A closed circuit read from the store leaves `circuitOpen` at once.
        var n = Machine(configuration: config())
        _ = n.circuitObserved(openUntil: self.start + .seconds(30), now: self.start)
        _ = n.circuitObserved(openUntil: nil, now: self.start + .seconds(1))
        #expect(n.stateName(at: self.start + .seconds(1)) == .idle)
    }

    @Test("stale: serving a value in its refresh-ahead window starts one refresh-ahead round; a failed one cools down")
    func staleRefreshAhead() {
        var m = Machine(configuration: config())
        let stale = Credential(expiresAt: self.start.unixSeconds + 50)
        #expect(
            m.valueServed(Credential(expiresAt: self.start.unixSeconds + 3600), requestID: "x", now: self.start).isEmpty
        )
        #expect(m.valueServed(stale, requestID: "bg", canStartRound: false, now: self.start).isEmpty)
        let a = m.valueServed(stale, requestID: "bg", now: self.start)
        #expect(a.contains(.acquireLease(requestID: "bg", ttl: .seconds(32), unlessNewerThan: stale.expiresAt)))
        #expect(m.isRefreshingAhead)
        #expect(m.valueServed(stale, requestID: "bg2", now: self.start).isEmpty)
        _ = m.leaseAcquired(requestID: "bg", now: self.start)
        let b = m.attemptFailed(requestID: "bg", attempt: 1, failure: .transportError, now: self.start, jitter: 0)
        #expect(m.stateName(at: self.start) == .backingOff)
        let t = scheduled(b)[0]
        _ = m.timerFired(t, now: self.start + .milliseconds(100), jitter: 0)
        let c = m.attemptFailed(
            requestID: "bg", attempt: 2, failure: .transportError, now: self.start + .seconds(1), jitter: 0)
        #expect(c.contains(.roundFinished(succeeded: false)))
        // Cool-down: no second refresh-ahead for 10 s, but a caller still gets a round.
        #expect(m.isRetained(at: self.start + .seconds(5)))
        #expect(m.valueServed(stale, requestID: "bg3", now: self.start + .seconds(5)).isEmpty)
        #expect(!m.valueServed(stale, requestID: "bg4", now: self.start + .seconds(11)).isEmpty)
    }

    @Test("no round possible (no trigger): a valid value is served even if short, else no_trigger_url")
    func noRoundPossible() {
        var m = Machine(configuration: config())
        let short = Credential(expiresAt: self.start.unixSeconds + 30)
        #expect(
            self.request(&m, 1, current: short, canStart: false, at: self.start) == [
                .succeed([WaiterID(1)], short, .cache)
            ])
        #expect(self.request(&m, 2, canStart: false, at: self.start) == [.fail([WaiterID(2)], .noTriggerURL)])
        #expect(
            self.request(&m, 3, forced: true, current: short, canStart: false, at: self.start) == [
                .fail([WaiterID(3)], .noTriggerURL)
            ])
        #expect(!m.isActive)
    }

    @Test("cancellation, uninstall and shutdown end the round for its callers")
    func endings() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = self.request(&m, 2, at: self.start)
        let a = m.waiterCancelled(WaiterID(1), now: self.start)
        #expect(a.contains(.fail([WaiterID(1)], .cancelled)))
        #expect(m.isActive)
        let b = m.installationUninstalled(now: self.start)
        #expect(b.contains(.fail([WaiterID(2)], .installationUninstalled)))
        #expect(!m.isActive)
        _ = self.request(&m, 3, rid: "r3", at: self.start)
        _ = m.leaseAcquired(requestID: "r3", now: self.start)
        let c = m.shutdownRequested(now: self.start)
        #expect(c.contains(.fail([WaiterID(3)], .shuttingDown)))
        #expect(c.contains(.releaseLease(requestID: "r3")))
        #expect(!c.contains(.roundFinished(succeeded: false)))
    }

    @Test("every state is reachable and named")
    func everyStateNamed() {
        var seen: Set<Machine.StateName> = []
        var m = Machine(configuration: config())
        seen.insert(m.stateName(at: self.start))
        _ = self.request(&m, 1, at: self.start)
        seen.insert(m.stateName(at: self.start))
        _ = m.leaseDenied(requestID: "r1", now: self.start)
        seen.insert(m.stateName(at: self.start))
        _ = m.storeReadEmpty(requestID: "r1", now: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        seen.insert(m.stateName(at: self.start))
        _ = m.attemptSucceeded(requestID: "r1", attempt: 1, now: self.start)
        seen.insert(m.stateName(at: self.start))
        var b = m
        _ = b.roundTripBroughtNoNewerToken(requestID: "r1", newest: nil, now: self.start)
        seen.insert(b.stateName(at: self.start))
        _ = m.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: self.start, jitter: 0)
        var grace = m
        _ = grace.installationUninstalled(now: self.start)
        _ = grace.circuitObserved(openUntil: self.start + .seconds(5), now: self.start)
        seen.insert(grace.stateName(at: self.start))
        // attemptFailed from awaitingDelivery is ignored (only the grace timer ends it): still awaiting.
        #expect(m.stateName(at: self.start) == .awaitingDelivery)
        var backing = Machine(configuration: config())
        _ = self.request(&backing, 1, at: self.start)
        _ = backing.leaseAcquired(requestID: "r1", now: self.start)
        _ = backing.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: self.start, jitter: 0)
        seen.insert(backing.stateName(at: self.start))
        #expect(seen == Set(Machine.StateName.allCases))
    }
}

extension LeasedRoundStateMachineTests {
    @Test(
        "a round that lost its lease stops leading: its callers follow, an empty re-read takes the lease again, the attempts go on counting"
    )
    func leaseLostFollows() throws {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let timers = scheduled(m.attemptSucceeded(requestID: "r1", attempt: 1, now: self.start))
        #expect(timers.count == 2)
        let t1 = self.start + .milliseconds(100)
        let lost = m.leaseLost(requestID: "r1", now: t1)
        #expect(lost.contains(.cancelTimer(timers[0])) && lost.contains(.cancelTimer(timers[1])))
        // No verdict, no release (the lease is another's), no attempt, no answer.
        let leading = lost.filter {
            switch $0 {
            case .roundFinished, .releaseLease, .startAttempt, .fail, .succeed, .placeHold: return true
            default: return false
            }
        }
        #expect(leading.isEmpty)
        #expect(m.stateName(at: t1) == .following)
        #expect(m.waiterCount == 1)
        // The old grace timer, were it to fire, does nothing.
        #expect(m.timerFired(timers[0], now: self.start + .seconds(2), jitter: 0).isEmpty)
        let recheck = try #require(scheduled(lost).first)
        let t2 = self.start + .seconds(2)
        #expect(m.timerFired(recheck, now: t2, jitter: 0) == [.readStore(requestID: "r1")])
        let retake = m.storeReadEmpty(requestID: "r1", now: t2)
        #expect(retake.count == 1)
        guard case .acquireLease(let requestID, _, _) = retake.first else {
            Issue.record("an empty re-read takes the lease again, got \(retake)")
            return
        }
        #expect(requestID == "r1")
        let again = m.leaseAcquired(requestID: "r1", now: t2)
        #expect(again.contains { if case .startAttempt("r1", 2, _, _) = $0 { true } else { false } })
        // The first attempt's answer, late, is not taken for the second's.
        #expect(m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: t2, jitter: 0).isEmpty)
        // Attempt 2 is the last of 2: its failure answers the caller.
        let last = m.attemptFailed(requestID: "r1", attempt: 2, failure: .httpError, now: t2, jitter: 0)
        #expect(last.contains(.fail([WaiterID(1)], .triggerFailed)))
        #expect(!m.isActive)
    }

    @Test(
        "an attempt in flight when the round lost its lease is counted once when it ends (a 2xx as success), and decides nothing; one already answered 2xx is counted at the loss"
    )
    func lostAttemptCounted() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let t1 = self.start + .milliseconds(100)
        #expect(!m.leaseLost(requestID: "r1", now: t1).contains { if case .recordAttempt = $0 { true } else { false } })
        // The round takes the lease again and makes attempt 2; attempt 1 then fails: counted only.
        _ = m.storeReadEmpty(requestID: "r1", now: t1)
        _ = m.leaseAcquired(requestID: "r1", now: t1)
        #expect(m.isAttempting("r1", attempt: 2))
        #expect(
            m.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: t1, jitter: 0) == [
                .recordAttempt(outcome: "timeout")
            ])
        #expect(m.isAttempting("r1", attempt: 2))
        // Once.
        #expect(m.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: t1, jitter: 0).isEmpty)
        // Attempt 2 answers 2xx and the lease is lost again while its delivery is awaited: counted
        // as a success at once.
        _ = m.attemptSucceeded(requestID: "r1", attempt: 2, now: t1)
        let lost = m.leaseLost(requestID: "r1", now: t1)
        #expect(
            lost.filter { if case .recordAttempt = $0 { true } else { false } } == [.recordAttempt(outcome: "success")])
        // A lost attempt that answers 2xx: a success, and the round goes on following.
        var n = Machine(configuration: config())
        _ = self.request(&n, 1, at: self.start)
        _ = n.leaseAcquired(requestID: "r1", now: self.start)
        _ = n.leaseLost(requestID: "r1", now: t1)
        #expect(n.attemptSucceeded(requestID: "r1", attempt: 1, now: t1) == [.recordAttempt(outcome: "success")])
        #expect(n.stateName(at: t1) == .following)
        // Its own value arriving first (stored before the trigger answers) counts it, once, though
        // the round ends with it; the late 2xx counts nothing more.
        var o = Machine(configuration: config())
        _ = self.request(&o, 1, at: self.start)
        _ = o.leaseAcquired(requestID: "r1", now: self.start)
        _ = o.leaseLost(requestID: "r1", now: t1)
        let own = Credential(expiresAt: self.start.unixSeconds + 3600, roundID: "r1")
        let delivered = o.valueObserved(own, solicitedBy: "r1", now: t1)
        #expect(delivered.filter { if case .recordAttempt = $0 { true } else { false } }.count == 1)
        #expect(!o.isActive)
        #expect(o.attemptSucceeded(requestID: "r1", attempt: 1, now: t1).isEmpty)
        #expect(!o.isRetained(at: t1))
        // A round that ends before its lost call does (nobody waits): the call is counted when it
        // ends all the same, and the machine is kept until then.
        var q = Machine(configuration: config())
        _ = q.refreshAheadWasRequested(knownExpiry: self.start.unixSeconds + 50, requestID: "bg", now: self.start)
        _ = q.leaseAcquired(requestID: "bg", now: self.start)
        _ = q.leaseLost(requestID: "bg", now: t1)
        #expect(!q.isActive)
        #expect(q.isRetained(at: t1 + .seconds(3600)))
        #expect(
            q.attemptFailed(requestID: "bg", attempt: 1, failure: .transportError, now: t1, jitter: 0) == [
                .recordAttempt(outcome: "transport_error")
            ])
    }

    @Test(
        "a round nobody waits for ends when it loses its lease; a loss reported for another round, or while following, is ignored"
    )
    func leaseLostWithoutCallers() {
        var m = Machine(configuration: config())
        _ = m.refreshAheadWasRequested(knownExpiry: self.start.unixSeconds + 50, requestID: "bg", now: self.start)
        #expect(m.leaseLost(requestID: "bg", now: self.start).isEmpty)
        _ = m.leaseAcquired(requestID: "bg", now: self.start)
        #expect(m.leaseLost(requestID: "other", now: self.start).isEmpty)
        #expect(m.stateName(at: self.start) == .attempting)
        let lost = m.leaseLost(requestID: "bg", now: self.start + .seconds(1))
        #expect(!lost.contains(.releaseLease(requestID: "bg")))
        #expect(!lost.contains(.roundFinished(succeeded: false)))
        #expect(!m.isActive)
        // Its answer, late, decides nothing (it is only counted).
        #expect(
            m.attemptSucceeded(requestID: "bg", attempt: 1, now: self.start + .seconds(2)) == [
                .recordAttempt(outcome: "success")
            ])
        #expect(!m.isActive)
    }
}

extension LeasedRoundStateMachineTests {
    @Test(
        "a lease taken again after it was lost is set for the callers' deadline: the next attempt's work is covered by an extension of its own"
    )
    func leaseRetakenCoversTheNextAttempt() {
        var c = config()
        c.attemptTimeout = .seconds(10)
        var m = Machine(configuration: c)
        // A caller with 3 s: the first attempt (10 s) extends the lease past its deadline.
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: self.start + .seconds(3),
            requestID: "r1", now: self.start)
        let first = m.leaseAcquired(requestID: "r1", now: self.start)
        #expect(first.contains { if case .extendLease("r1", _) = $0 { true } else { false } })
        #expect(m.isAttempting("r1", attempt: 1))
        let t1 = self.start + .milliseconds(100)
        _ = m.leaseLost(requestID: "r1", now: t1)
        #expect(!m.isAttempting("r1", attempt: 1))
        _ = m.storeReadEmpty(requestID: "r1", now: t1)
        let again = m.leaseAcquired(requestID: "r1", now: t1)
        #expect(again.contains { if case .startAttempt("r1", 2, _, _) = $0 { true } else { false } })
        #expect(again.contains(.extendLease(requestID: "r1", ttl: .seconds(12))))
    }

    @Test("a lease taken again after it was lost, with every attempt made, makes none more and goes back")
    func leaseRetakenAtTheAttemptCap() {
        var m = Machine(configuration: config())
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let failed = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: self.start, jitter: 0)
        guard case .scheduleTimer(let backoff, _) = failed.last else {
            Issue.record("a retry is scheduled, got \(failed)")
            return
        }
        _ = m.timerFired(backoff, now: self.start + .milliseconds(100), jitter: 0)
        #expect(m.isAttempting("r1", attempt: 2))
        let t1 = self.start + .milliseconds(200)
        _ = m.leaseLost(requestID: "r1", now: t1)
        _ = m.storeReadEmpty(requestID: "r1", now: t1)
        let again = m.leaseAcquired(requestID: "r1", now: t1)
        #expect(!again.contains { if case .startAttempt = $0 { true } else { false } })
        #expect(again.contains(.releaseLease(requestID: "r1")))
        #expect(again.contains(.fail([WaiterID(1)], .tokenTimeout)))
        #expect(!again.contains(.roundFinished(succeeded: false)))
        #expect(!m.isActive)
    }
}
