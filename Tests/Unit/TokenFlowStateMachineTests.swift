import Testing

@testable import FlowEngine

/// A hand-driven clock: tests move time explicitly, so hours of retries run in microseconds.
struct ManualClock {
    var now = FlowTime(unixSeconds: 1_763_906_400)
    mutating func advance(_ d: Duration) { self.now = self.now + d }
}

private func config() -> TokenFlowConfiguration {
    var c = TokenFlowConfiguration()
    c.maxAttempts = 3
    c.attemptTimeout = .seconds(5)
    c.deliveryGrace = .seconds(2)
    c.backoffBase = .milliseconds(100)
    c.backoffCap = .seconds(1)
    c.leaseGrace = .seconds(2)
    return c
}

private func timers(_ actions: [FlowAction]) -> [(TimerID, FlowTime)] {
    actions.compactMap { if case .scheduleTimer(let t, let d) = $0 { return (t, d) } else { return nil } }
}

/// Adds waiter `waiter` (min validity 300 s) to the machine; returns its deadline timer.
private func requested(
    _ m: inout TokenFlowStateMachine, _ waiter: UInt64, knownExpiry: Int64, forced: Bool = false,
    deadline: FlowTime, requestID: String, now: FlowTime
) -> TimerID {
    let actions = m.tokenWasRequested(
        waiter: WaiterID(waiter), minValidity: 300, knownExpiry: knownExpiry, forced: forced, deadline: deadline,
        requestID: requestID, now: now)
    return timers(actions)[0].0
}

private func token(_ exp: Int64, rid: String? = nil) -> AccessToken {
    AccessToken(value: "tok-\(exp)", expiresAt: exp, requestID: rid)
}

@Suite("TokenFlowStateMachine")
struct TokenFlowStateMachineTests {
    @Test("a cold request takes the lease, triggers once and answers with the solicited token")
    func coldSuccess() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let deadline = clock.now + .seconds(10)
        let a1 = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: deadline, requestID: "r1",
            now: clock.now)
        #expect(a1.contains(.acquireLease(requestID: "r1", ttl: .seconds(12), unlessNewerThan: 0)))
        #expect(timers(a1).map(\.1) == [deadline])
        let a2 = m.leaseAcquired(requestID: "r1", now: clock.now)
        #expect(a2 == [.startAttempt(requestID: "r1", attempt: 1, expiresAt: deadline, timeout: .seconds(5))])
        clock.advance(.milliseconds(300))
        let a3 = m.attemptSucceeded(requestID: "r1", attempt: 1, now: clock.now)
        #expect(a3.contains(.readStore(requestID: "r1")))
        let exp = clock.now.unixSeconds + 3600
        let a4 = m.valueObserved(token(exp, rid: "r1"), solicitedBy: "r1", now: clock.now)
        #expect(a4.contains(.succeed([WaiterID(1)], token(exp, rid: "r1"), .trigger)))
        #expect(a4.contains(.releaseLease(requestID: "r1")))
        #expect(a4.contains(.recordAttempt(outcome: "success")))
        #expect(a4.contains(.roundFinished(succeeded: true)))
        #expect(!m.isActive)
    }

    @Test("a delivery that arrives before the trigger's own answer is counted as one successful attempt")
    func deliveryBeforeTriggerAnswer() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let a = m.valueObserved(token(clock.now.unixSeconds + 3600, rid: "r1"), solicitedBy: "r1", now: clock.now)
        #expect(a.filter { $0 == .recordAttempt(outcome: "success") }.count == 1)
        #expect(m.attemptSucceeded(requestID: "r1", attempt: 1, now: clock.now).isEmpty)
    }

    @Test("concurrent callers share one round trip")
    func coalescing() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        var leaseRequests = 0
        var triggers = 0
        for i in 2...100 {
            let actions = m.tokenWasRequested(
                waiter: WaiterID(UInt64(i)), minValidity: 300, knownExpiry: 0, forced: false,
                deadline: clock.now + .seconds(10), requestID: "r\(i)", now: clock.now)
            for a in actions {
                if case .acquireLease = a { leaseRequests += 1 }
                if case .startAttempt = a { triggers += 1 }
            }
        }
        #expect(leaseRequests == 0)
        #expect(triggers == 0)
        #expect(m.waiterCount == 100)
        let actions = m.valueObserved(token(clock.now.unixSeconds + 3600, rid: "r1"), solicitedBy: "r1", now: clock.now)
        let answered = actions.compactMap {
            if case .succeed(let ids, _, _) = $0 { return ids.count } else { return nil }
        }
        #expect(answered == [100])
        #expect(!m.isActive)
    }

    @Test("a later caller's deadline extends the round and the lease")
    func laterDeadlineExtendsLease() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 0, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(1),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let a = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 0, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(20),
            requestID: "r2", now: clock.now)
        #expect(a.contains(.extendLease(requestID: "r1", ttl: .seconds(22))))
    }

    @Test("a caller joining a round judges values against what the round's callers knew, not only its own")
    func joinerInheritsTheRoundsKnownExpiry() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let known = clock.now.unixSeconds + 100
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: known, forced: true, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        // Joins knowing of no value (it did not read the store), with a forced refresh and without.
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: 0, forced: true, deadline: clock.now + .seconds(10),
            requestID: "r2", now: clock.now)
        _ = m.tokenWasRequested(
            waiter: WaiterID(3), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r3", now: clock.now)
        // A re-read finds the value the round's first caller found insufficient: nobody takes it.
        let reread = m.valueObserved(token(known), solicitedBy: nil, now: clock.now)
        #expect(!reread.contains { if case .succeed = $0 { true } else { false } })
        #expect(m.waiterCount == 3)
        // A newer one answers all three.
        let newer = m.valueObserved(token(known + 3600), solicitedBy: nil, now: clock.now)
        let answered = newer.compactMap { action -> [UInt64]? in
            if case .succeed(let ids, _, _) = action { return ids.map(\.raw) }
            return nil
        }.flatMap { $0 }
        #expect(answered.sorted() == [1, 2, 3])
    }

    @Test("callers joining within half the lease grace of the lease's deadline do not extend it; a later one does")
    func burstJoinersDoNotExtendTheLease() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 0, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        // The lease runs until its deadline plus the grace (2 s); joiners up to 1 s later ride on it,
        // each judged against the deadline the lease was set for, not against the last joiner's.
        for (waiter, later) in [(2, 400), (3, 800), (4, 1000)] {
            let actions = m.tokenWasRequested(
                waiter: WaiterID(UInt64(waiter)), minValidity: 0, knownExpiry: 0, forced: false,
                deadline: clock.now + .seconds(10) + .milliseconds(later), requestID: "r\(waiter)", now: clock.now)
            #expect(!actions.contains { if case .extendLease = $0 { true } else { false } }, "joiner +\(later) ms")
        }
        let late = m.tokenWasRequested(
            waiter: WaiterID(5), minValidity: 0, knownExpiry: 0, forced: false,
            deadline: clock.now + .seconds(10) + .milliseconds(1001), requestID: "r5", now: clock.now)
        #expect(late.contains(.extendLease(requestID: "r1", ttl: .milliseconds(13_001))))
        // The extension moved the lease's deadline: the next joiner is judged against it.
        let next = m.tokenWasRequested(
            waiter: WaiterID(6), minValidity: 0, knownExpiry: 0, forced: false,
            deadline: clock.now + .seconds(11) + .milliseconds(900), requestID: "r6", now: clock.now)
        #expect(!next.contains { if case .extendLease = $0 { true } else { false } })
    }

    @Test("failed attempts are retried with capped jittered backoff, then fail with trigger_failed")
    func retriesThenFails() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(30),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        // Attempt 1 fails: backoff of attempt 1 with jitter 0 is half of 100 ms.
        let f1 = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: clock.now, jitter: 0)
        #expect(f1.contains(.recordAttempt(outcome: "http_error")))
        let t1 = timers(f1)
        #expect(t1.count == 1 && t1[0].1 == clock.now + .milliseconds(50))
        clock.advance(.milliseconds(50))
        let s2 = m.timerFired(t1[0].0, now: clock.now, jitter: 0)
        #expect(s2.count == 2 && s2.first == .recordRetry)
        guard case .startAttempt(_, 2, _, _) = s2.last else {
            Issue.record("expected attempt 2, got \(s2)")
            return
        }
        // Attempt 2 fails: with jitter 1 the full 200 ms.
        let f2 = m.attemptFailed(requestID: "r1", attempt: 2, failure: .transportError, now: clock.now, jitter: 1)
        #expect(f2.contains(.recordAttempt(outcome: "transport_error")))
        let t2 = timers(f2)
        #expect(t2.count == 1 && t2[0].1 == clock.now + .milliseconds(200))
        clock.advance(.milliseconds(200))
        _ = m.timerFired(t2[0].0, now: clock.now, jitter: 0)
        // Attempt 3 is the last one allowed.
        let f3 = m.attemptFailed(requestID: "r1", attempt: 3, failure: .httpError, now: clock.now, jitter: 0)
        #expect(f3.contains(.fail([WaiterID(1)], .triggerFailed)))
        #expect(f3.contains(.roundFinished(succeeded: false)))
        #expect(f3.contains(.releaseLease(requestID: "r1")))
        #expect(!m.isActive)
    }

    @Test("a stale or duplicate attempt result is ignored")
    func staleAttemptIgnored() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(30),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        #expect(m.attemptFailed(requestID: "r1", attempt: 2, failure: .httpError, now: clock.now, jitter: 0).isEmpty)
        #expect(m.attemptSucceeded(requestID: "other", attempt: 1, now: clock.now).isEmpty)
    }

    @Test("a retry that would not fit before the deadline is not scheduled")
    func noRetryPastDeadline() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false,
            deadline: clock.now + .milliseconds(500), requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        clock.advance(.milliseconds(480))
        let f = m.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: clock.now, jitter: 1)
        #expect(f.contains(.fail([WaiterID(1)], .tokenTimeout)))
        #expect(timers(f).isEmpty)
    }

    @Test(
        "the caller's deadline ends its wait with token_timeout; the round sees its attempt through, the lease extended to cover it"
    )
    func callerTimeout() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let a = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(2),
            requestID: "r1", now: clock.now)
        let deadlineTimer = timers(a)[0].0
        // The attempt (5 s) would end after the lease (2 s + 2 s of grace): extended to 5 s + 2 s.
        let acquired = m.leaseAcquired(requestID: "r1", now: clock.now)
        #expect(acquired.first == .extendLease(requestID: "r1", ttl: .seconds(7)))
        clock.advance(.seconds(2))
        let t = m.timerFired(deadlineTimer, now: clock.now, jitter: 0)
        #expect(t == [.fail([WaiterID(1)], .tokenTimeout)])
        #expect(m.isActive)
        clock.advance(.seconds(3))
        let f = m.attemptFailed(requestID: "r1", attempt: 1, failure: .timeout, now: clock.now, jitter: 0)
        #expect(
            f == [.recordAttempt(outcome: "timeout"), .roundFinished(succeeded: false), .releaseLease(requestID: "r1")])
        #expect(!m.isActive)
    }

    @Test("a 2xx without a delivery counts as no_delivery after the grace and is retried")
    func noDelivery() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(30),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let s = m.attemptSucceeded(requestID: "r1", attempt: 1, now: clock.now)
        let grace = timers(s).first { $0.1 == clock.now + .seconds(2) }!.0
        #expect(m.storeReadEmpty(requestID: "r1", now: clock.now).isEmpty)
        clock.advance(.seconds(2))
        let f = m.timerFired(grace, now: clock.now, jitter: 0)
        #expect(f.contains(.recordAttempt(outcome: "no_delivery")))
        #expect(timers(f).count == 1)
    }

    @Test(
        "a cancelled caller gets an answer at once; when none is left the round sees its attempt through and makes no other"
    )
    func cancellation() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(30),
            requestID: "r1", now: clock.now)
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(30),
            requestID: "r2", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let c1 = m.waiterCancelled(WaiterID(1), now: clock.now)
        #expect(c1.contains(.fail([WaiterID(1)], .cancelled)))
        #expect(m.isActive)
        let c2 = m.waiterCancelled(WaiterID(2), now: clock.now)
        #expect(c2 == [.cancelTimer(TimerID(2)), .fail([WaiterID(2)], .cancelled)])
        #expect(m.isActive)
        #expect(m.waiterCancelled(WaiterID(2), now: clock.now).isEmpty)
        // The attempt is refused: with nobody waiting, no retry; the round ends failed.
        let f = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: clock.now, jitter: 0)
        #expect(
            f == [
                .recordAttempt(outcome: "http_error"), .roundFinished(succeeded: false), .releaseLease(requestID: "r1"),
            ])
        #expect(!m.isActive)
    }

    @Test("a delivery arriving after every caller gave up ends the round a success, answering nobody")
    func lateDelivery() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let a = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(1),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        clock.advance(.seconds(1))
        _ = m.timerFired(timers(a)[0].0, now: clock.now, jitter: 0)
        #expect(m.isActive)
        #expect(
            m.valueObserved(token(clock.now.unixSeconds + 3600, rid: "r1"), solicitedBy: "r1", now: clock.now) == [
                .recordAttempt(outcome: "success"), .roundFinished(succeeded: true), .releaseLease(requestID: "r1"),
            ])
        #expect(m.attemptSucceeded(requestID: "r1", attempt: 1, now: clock.now).isEmpty)
        #expect(!m.isActive)
    }

    @Test("a push that arrives while waiting answers with source push")
    func pushWhileWaiting() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let exp = clock.now.unixSeconds + 3600
        let a = m.valueObserved(token(exp), solicitedBy: nil, now: clock.now)
        #expect(a.contains(.succeed([WaiterID(1)], token(exp), .push)))
    }

    @Test("a forced refresh accepts only a newer token; an expired one is never handed out")
    func forcedRefresh() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let known = clock.now.unixSeconds + 1000
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: known, forced: true, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        #expect(m.valueObserved(token(known), solicitedBy: nil, now: clock.now).isEmpty)
        #expect(m.valueObserved(token(clock.now.unixSeconds - 1, rid: "r1"), solicitedBy: "r1", now: clock.now).isEmpty)
        let a = m.valueObserved(token(known + 1), solicitedBy: nil, now: clock.now)
        #expect(a.contains(.succeed([WaiterID(1)], token(known + 1), .push)))
    }

    @Test("a follower polls the store and takes the lease over when the leader vanished")
    func follower() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        let d = m.leaseDenied(requestID: "r1", now: clock.now)
        let poll = timers(d)
        #expect(poll.count == 1 && poll[0].1 == clock.now + .milliseconds(50))
        clock.advance(.milliseconds(50))
        #expect(m.timerFired(poll[0].0, now: clock.now, jitter: 0) == [.readStore(requestID: "r1")])
        let retake = m.storeReadEmpty(requestID: "r1", now: clock.now)
        guard case .acquireLease("r1", _, 0) = retake.first else {
            Issue.record("expected a new lease attempt, got \(retake)")
            return
        }
        // Denied again: the poll interval doubles.
        let d2 = m.leaseDenied(requestID: "r1", now: clock.now)
        #expect(timers(d2)[0].1 == clock.now + .milliseconds(100))
        // The leader's delivery, announced by notification, answers the follower as a trigger answer.
        let exp = clock.now.unixSeconds + 3600
        let a = m.valueObserved(token(exp, rid: "leader"), solicitedBy: "leader", now: clock.now)
        #expect(a.contains(.succeed([WaiterID(1)], token(exp, rid: "leader"), .trigger)))
        #expect(!a.contains(.releaseLease(requestID: "r1")))
    }

    @Test(
        "a lease refused for an open circuit fails the round's callers, forced ones too, with circuit_open; none is taken"
    )
    func leaseRefusedByOpenCircuit() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let deadline = clock.now + .seconds(10)
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: deadline, requestID: "r1",
            now: clock.now)
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: 0, forced: true, deadline: deadline, requestID: "r2",
            now: clock.now)
        let openUntil = clock.now + .seconds(30)
        // Another round's answer, or a stale one, changes nothing.
        #expect(m.leaseRefusedByOpenCircuit(requestID: "other", openUntil: openUntil, now: clock.now).isEmpty)
        let a = m.leaseRefusedByOpenCircuit(requestID: "r1", openUntil: openUntil, now: clock.now)
        #expect(a.contains(.fail([WaiterID(1), WaiterID(2)], .circuitOpen(retryAfter: .seconds(30)))))
        #expect(!a.contains(.releaseLease(requestID: "r1")))
        #expect(!a.contains { if case .roundFinished = $0 { return true } else { return false } })
        #expect(m.stateName(at: clock.now) == .circuitOpen)
        // Callers that come now fail fast; once the window ends a round starts again.
        let next = m.tokenWasRequested(
            waiter: WaiterID(3), minValidity: 300, knownExpiry: 0, forced: true, deadline: deadline, requestID: "r3",
            now: clock.now)
        #expect(next == [.fail([WaiterID(3)], .circuitOpen(retryAfter: .seconds(30)))])
        clock.advance(.seconds(30))
        let later = m.tokenWasRequested(
            waiter: WaiterID(4), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r4", now: clock.now)
        #expect(later.contains { if case .acquireLease("r4", _, _) = $0 { return true } else { return false } })
    }

    @Test("a lease refused for a circuit whose window has ended by this clock: follow, the re-read tries again")
    func leaseRefusedByACircuitSinceClosed() {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        let openUntil = clock.now + .milliseconds(10)
        clock.advance(.milliseconds(10))
        // No take at once (the store's clock may still see the circuit open: no loop), a re-read timer.
        let a = m.leaseRefusedByOpenCircuit(requestID: "r1", openUntil: openUntil, now: clock.now)
        #expect(!a.contains { if case .acquireLease = $0 { return true } else { return false } })
        let poll = timers(a)
        #expect(poll.count == 1 && poll[0].1 == clock.now + .milliseconds(50))
        #expect(m.stateName(at: clock.now) == .following)
        clock.advance(.milliseconds(50))
        #expect(m.timerFired(poll[0].0, now: clock.now, jitter: 0) == [.readStore(requestID: "r1")])
        let retake = m.storeReadEmpty(requestID: "r1", now: clock.now)
        #expect(retake.contains { if case .acquireLease("r1", _, _) = $0 { return true } else { return false } })
    }

    @Test("the store failing while taking the lease fails callers with store_unavailable")
    func storeDownAtLease() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        let a = m.storeFailed(requestID: "r1", now: clock.now)
        #expect(a.contains(.fail([WaiterID(1)], .storeUnavailable)))
        #expect(!m.isActive)
    }

    @Test(
        "the store failing while taking the lease: a still-valid token in memory answers the callers that do not force a refresh (source cache); forced ones get store_unavailable"
    )
    func storeDownAtLeaseServesMemory() {
        let now = ManualClock().now
        let deadline = now + .seconds(10)
        var m = TokenFlowStateMachine(configuration: config())
        // The token in memory has 100 s left; both callers want 300 s.
        let memory = token(now.unixSeconds + 100)
        let t1 = requested(&m, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: now)
        let t2 = requested(
            &m, 2, knownExpiry: memory.expiresAt, forced: true, deadline: deadline, requestID: "r2", now: now)
        #expect(
            m.storeFailed(requestID: "r1", fallback: memory, now: now) == [
                .cancelTimer(t1), .succeed([WaiterID(1)], memory, .cache), .cancelTimer(t2),
                .fail([WaiterID(2)], .storeUnavailable),
            ])
        #expect(!m.isActive)
        // A token that has run out answers nobody.
        var n = TokenFlowStateMachine(configuration: config())
        let t = requested(&n, 1, knownExpiry: 0, deadline: deadline, requestID: "r1", now: now)
        #expect(
            n.storeFailed(requestID: "r1", fallback: token(now.unixSeconds), now: now) == [
                .cancelTimer(t), .fail([WaiterID(1)], .storeUnavailable),
            ])
    }

    @Test(
        "the store failing while following: a still-valid token in memory answers the callers that do not force a refresh; the round ends when none is left, else the re-read retries"
    )
    func storeDownWhileFollowingServesMemory() throws {
        var clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let deadline = clock.now + .seconds(10)
        let memory = token(clock.now.unixSeconds + 100)
        let t1 = requested(&m, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: clock.now)
        let reread = try #require(timers(m.leaseDenied(requestID: "r1", now: clock.now)).first)
        clock.advance(.milliseconds(50))
        // Without a token in memory: the next re-read retries.
        let retry = m.storeFailed(requestID: "r1", now: clock.now)
        let next = try #require(timers(retry).first)
        #expect(retry == [.cancelTimer(reread.0), .scheduleTimer(next.0, deadline: clock.now + .milliseconds(50))])
        #expect(m.stateName(at: clock.now) == .following)
        _ = requested(
            &m, 2, knownExpiry: memory.expiresAt, forced: true, deadline: deadline, requestID: "r2", now: clock.now)
        // With one: the caller that does not force is answered; the forced one goes on following.
        let first = m.storeFailed(requestID: "r1", fallback: memory, now: clock.now)
        let third = try #require(timers(first).first)
        #expect(
            first == [
                .cancelTimer(t1), .succeed([WaiterID(1)], memory, .cache), .cancelTimer(next.0),
                .scheduleTimer(third.0, deadline: clock.now + .milliseconds(50)),
            ])
        #expect(m.stateName(at: clock.now) == .following)
        #expect(m.waiterCount == 1)
        // Only callers that do not force: answered, and the round ends (no lease to give back).
        var n = TokenFlowStateMachine(configuration: config())
        let u = requested(&n, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: clock.now)
        let followed = try #require(timers(n.leaseDenied(requestID: "r1", now: clock.now)).first)
        #expect(
            n.storeFailed(requestID: "r1", fallback: memory, now: clock.now) == [
                .cancelTimer(u), .succeed([WaiterID(1)], memory, .cache), .cancelTimer(followed.0),
            ])
        #expect(!n.isActive)
    }

    @Test(
        "a failed attempt re-reads the store as its retry waits (unless the owner turns that off): a token stored all the same, or a store gone, is found then"
    )
    func failedAttemptRereads() throws {
        let now = ManualClock().now
        for rereads in [true, false] {
            var c = config()
            c.rereadsAfterFailedAttempt = rereads
            var m = TokenFlowStateMachine(configuration: c)
            _ = requested(&m, 1, knownExpiry: 0, deadline: now + .seconds(10), requestID: "r1", now: now)
            _ = m.leaseAcquired(requestID: "r1", now: now)
            let failed = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: now, jitter: 0)
            let backoff = try #require(timers(failed).first)
            let reread: [FlowAction] = rereads ? [.readStore(requestID: "r1")] : []
            #expect(
                failed
                    == [.recordAttempt(outcome: "http_error")] + reread + [
                        .scheduleTimer(backoff.0, deadline: backoff.1)
                    ])
            #expect(m.stateName(at: now) == .backingOff)
        }
    }

    @Test(
        "the store failing while this process leads the round: a still-valid token in memory answers the callers that do not force a refresh; the round's work goes on for the others, or for nobody once in flight, and no retry is made for nobody"
    )
    func storeDownWhileLeadingServesMemory() throws {
        let now = ManualClock().now
        let deadline = now + .seconds(10)
        let memory = token(now.unixSeconds + 100)
        // Backing off with a forced caller: the other is answered, the retry stays due.
        var m = TokenFlowStateMachine(configuration: config())
        let t1 = requested(&m, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: now)
        _ = requested(&m, 2, knownExpiry: memory.expiresAt, forced: true, deadline: deadline, requestID: "r2", now: now)
        _ = m.leaseAcquired(requestID: "r1", now: now)
        _ = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: now, jitter: 0)
        #expect(
            m.storeFailed(requestID: "r1", fallback: memory, now: now) == [
                .cancelTimer(t1), .succeed([WaiterID(1)], memory, .cache),
            ])
        #expect(m.stateName(at: now) == .backingOff)
        #expect(m.waiterCount == 1)
        // Without a token in memory, or with one that ran out: nobody is answered, nothing changes.
        #expect(m.storeFailed(requestID: "r1", now: now) == [])
        #expect(m.storeFailed(requestID: "r1", fallback: token(now.unixSeconds), now: now) == [])
        #expect(m.waiterCount == 1)
        // Backing off for callers that do not force: answered, and the round ends (no retry, the
        // lease goes back, no verdict for the circuit).
        var n = TokenFlowStateMachine(configuration: config())
        let u = requested(&n, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: now)
        _ = n.leaseAcquired(requestID: "r1", now: now)
        let failed = n.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: now, jitter: 0)
        let backoff = try #require(timers(failed).first)
        #expect(
            n.storeFailed(requestID: "r1", fallback: memory, now: now) == [
                .cancelTimer(u), .succeed([WaiterID(1)], memory, .cache), .cancelTimer(backoff.0),
                .releaseLease(requestID: "r1"),
            ])
        #expect(!n.isActive)
        // Awaiting a delivery: answered, and the work in flight is seen through for nobody.
        var o = TokenFlowStateMachine(configuration: config())
        let v = requested(&o, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: now)
        _ = o.leaseAcquired(requestID: "r1", now: now)
        _ = o.attemptSucceeded(requestID: "r1", attempt: 1, now: now)
        #expect(
            o.storeFailed(requestID: "r1", fallback: memory, now: now) == [
                .cancelTimer(v), .succeed([WaiterID(1)], memory, .cache),
            ])
        #expect(o.stateName(at: now) == .awaitingDelivery)
        #expect(o.waiterCount == 0)
    }

    @Test(
        "the store failing while leading, for callers all answered from memory: an attempt in flight is seen through for nobody; a refresh-ahead round goes on retrying"
    )
    func storeDownWhileLeadingKeepsWork() throws {
        let now = ManualClock().now
        let deadline = now + .seconds(10)
        let memory = token(now.unixSeconds + 100)
        var m = TokenFlowStateMachine(configuration: config())
        let t = requested(&m, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r1", now: now)
        _ = m.leaseAcquired(requestID: "r1", now: now)
        #expect(
            m.storeFailed(requestID: "r1", fallback: memory, now: now) == [
                .cancelTimer(t), .succeed([WaiterID(1)], memory, .cache),
            ])
        #expect(m.isAttempting("r1", attempt: 1))
        // Its failure then ends the round with a verdict and no retry.
        let failed = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: now, jitter: 0)
        #expect(failed.contains(.releaseLease(requestID: "r1")))
        #expect(timers(failed).isEmpty)
        #expect(!m.isActive)
        // A refresh-ahead round that a caller joined: the caller is answered, the retry stays due.
        var r = TokenFlowStateMachine(configuration: config())
        _ = r.refreshAheadWasRequested(knownExpiry: memory.expiresAt, requestID: "bg", now: now)
        let u = requested(&r, 1, knownExpiry: memory.expiresAt, deadline: deadline, requestID: "r2", now: now)
        _ = r.leaseAcquired(requestID: "bg", now: now)
        _ = r.attemptFailed(requestID: "bg", attempt: 1, failure: .timeout, now: now, jitter: 0)
        #expect(
            r.storeFailed(requestID: "bg", fallback: memory, now: now) == [
                .cancelTimer(u), .succeed([WaiterID(1)], memory, .cache),
            ])
        #expect(r.stateName(at: now) == .backingOff)
        #expect(r.isRefreshingAhead)
    }

    @Test("uninstall fails every waiting caller with installation_uninstalled")
    func uninstall() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: clock.now + .seconds(10),
            requestID: "r1", now: clock.now)
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let a = m.installationUninstalled(now: clock.now)
        #expect(a.contains(.fail([WaiterID(1)], .installationUninstalled)))
        #expect(a.contains(.releaseLease(requestID: "r1")))
    }

    @Test("a refresh-ahead round runs without callers until a newer token arrives")
    func refreshAhead() {
        let clock = ManualClock()
        var m = TokenFlowStateMachine(configuration: config())
        let known = clock.now.unixSeconds + 600
        let a = m.refreshAheadWasRequested(knownExpiry: known, requestID: "bg", now: clock.now)
        #expect(a.count == 2)
        #expect(m.refreshAheadWasRequested(knownExpiry: known, requestID: "bg2", now: clock.now).isEmpty)
        _ = m.leaseAcquired(requestID: "bg", now: clock.now)
        #expect(m.valueObserved(token(known), solicitedBy: nil, now: clock.now).isEmpty)
        #expect(m.isActive)
        let done = m.valueObserved(token(known + 3000, rid: "bg"), solicitedBy: "bg", now: clock.now)
        #expect(done.contains(.releaseLease(requestID: "bg")))
        #expect(!m.isActive)
    }
}

@Suite("AccessToken refresh-ahead window")
struct RefreshWindowTests {
    @Test("a token is stale in the last quarter of its lifetime")
    func staleWindow() {
        let received: Int64 = 1_000_000
        let token = AccessToken(value: "t", expiresAt: received + 3600, receivedAt: received)
        #expect(!token.isStale(at: FlowTime(unixSeconds: received + 2699), fraction: 0.25))
        #expect(token.isStale(at: FlowTime(unixSeconds: received + 2700), fraction: 0.25))
        #expect(!token.isStale(at: FlowTime(unixSeconds: received + 3599), fraction: 0))
    }
}

@Suite("Backoff")
struct BackoffTests {
    @Test("delays double, are capped, and jitter stays within half to full")
    func bounds() {
        let base = Duration.milliseconds(100)
        let cap = Duration.seconds(2)
        #expect(Backoff.delay(attempt: 1, base: base, cap: cap, jitter: 0) == .milliseconds(50))
        #expect(Backoff.delay(attempt: 1, base: base, cap: cap, jitter: 1) == .milliseconds(100))
        #expect(Backoff.delay(attempt: 3, base: base, cap: cap, jitter: 1) == .milliseconds(400))
        #expect(Backoff.delay(attempt: 10, base: base, cap: cap, jitter: 1) == .seconds(2))
        #expect(Backoff.delay(attempt: 10, base: base, cap: cap, jitter: 0) == .seconds(1))
        #expect(Backoff.delay(attempt: 200, base: base, cap: cap, jitter: 0.5) <= cap)
        for attempt in 1...20 {
            for j in stride(from: 0.0, through: 1.0, by: 0.25) {
                let d = Backoff.delay(attempt: attempt, base: base, cap: cap, jitter: j)
                #expect(d >= .milliseconds(50) && d <= cap)
            }
        }
    }
}

@Suite("InstallationID")
struct InstallationIDTests {
    @Test("the ARI and the bare id name the same installation; odd segments are refused")
    func parsing() {
        let ari = "ari:cloud:ecosystem::installation/0d6a1c4e-7f5b-4b8e-9a43-2f1e6c1d7b90"
        #expect(InstallationID(ari)?.ari == ari)
        #expect(InstallationID("0d6a1c4e-7f5b-4b8e-9a43-2f1e6c1d7b90")?.ari == ari)
        #expect(
            InstallationID(
                pathSegment: "ari%3Acloud%3Aecosystem%3A%3Ainstallation%2F0d6a1c4e-7f5b-4b8e-9a43-2f1e6c1d7b90")?.ari
                == ari)
        #expect(
            InstallationID(pathSegment: "ari:cloud:ecosystem::installation%2F0d6a1c4e-7f5b-4b8e-9a43-2f1e6c1d7b90")?.ari
                == ari)
        #expect(InstallationID("") == nil)
        #expect(InstallationID("a/b") == nil)
        #expect(InstallationID("..") == nil)
        #expect(InstallationID(pathSegment: "%zz") == nil)
        #expect(InstallationID(pathSegment: "%00") == nil)
        #expect(InstallationID(String(repeating: "a", count: 129)) == nil)
        #expect(InstallationID("ari:cloud:ecosystem::app/123") == nil)
    }
}
