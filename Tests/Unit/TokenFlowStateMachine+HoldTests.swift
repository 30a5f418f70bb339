import Testing

@testable import FlowEngine

/// The same-token round trip and the hold that follows it (contract §2): a round trip that brings
/// no newer token answers its callers with the newest one and stops further round trips for 60 s.
@Suite("TokenFlowStateMachine: same-token round trip and hold")
struct TokenFlowStateMachineHoldTests {
    private static func configuration() -> TokenFlowConfiguration {
        var c = TokenFlowConfiguration()
        c.maxAttempts = 3
        c.attemptTimeout = .seconds(5)
        c.deliveryGrace = .seconds(2)
        c.leaseGrace = .seconds(2)
        return c
    }

    private static func token(_ exp: Int64, rid: String? = nil) -> AccessToken {
        AccessToken(value: "tok-\(exp)", expiresAt: exp, requestID: rid)
    }

    /// A machine leading round trip `r1` for callers 1…`callers` (minValidity 3600, the stored
    /// token expiring at `known`), its trigger answered 2xx.
    private static func leading(
        callers: Int, known: Int64, clock: ManualClock, forced: Set<Int> = []
    ) -> TokenFlowStateMachine {
        var m = TokenFlowStateMachine(configuration: configuration())
        for i in 1...callers {
            _ = m.tokenWasRequested(
                waiter: WaiterID(UInt64(i)), minValidity: 3600, knownExpiry: known, forced: forced.contains(i),
                deadline: clock.now + .seconds(10), requestID: "r\(i)", now: clock.now)
        }
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        _ = m.attemptSucceeded(requestID: "r1", attempt: 1, now: clock.now)
        return m
    }

    /// A machine whose one caller (`forced` or not) follows another process's round trip `r1`.
    private static func following(
        forced: Bool, minValidity: Int64, known: Int64, clock: ManualClock, requestID: String = "r1"
    ) -> TokenFlowStateMachine {
        var m = TokenFlowStateMachine(configuration: configuration())
        _ = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: minValidity, knownExpiry: known, forced: forced,
            deadline: clock.now + .seconds(10), requestID: requestID, now: clock.now)
        _ = m.leaseDenied(requestID: requestID, now: clock.now)
        return m
    }

    private static func succeeded(_ actions: [FlowAction]) -> [([WaiterID], AccessToken, TokenSource)] {
        actions.compactMap { if case .succeed(let ids, let t, let s) = $0 { return (ids, t, s) } else { return nil } }
    }

    private static func failed(_ actions: [FlowAction]) -> [([WaiterID], FlowError)] {
        actions.compactMap { if case .fail(let ids, let e) = $0 { return (ids, e) } else { return nil } }
    }

    private static func startsRoundTrip(_ actions: [FlowAction]) -> Bool {
        actions.contains {
            switch $0 {
            case .acquireLease, .acquireLeaseIgnoringHold, .startAttempt: true
            default: false
            }
        }
    }

    @Test("during a hold, a later token (pushed since it began) is what held callers get")
    func holdServesALaterPush() throws {
        let clock = ManualClock()
        let known = clock.now.unixSeconds + 100
        var m = Self.leading(callers: 1, known: known, clock: clock)
        _ = m.roundTripBroughtNoNewerToken(requestID: "r1", newest: Self.token(known), now: clock.now)
        // Known to the caller (from memory): answered with it, not the hold's.
        let pushed = Self.token(known + 3000)
        let a = m.tokenWasRequested(
            waiter: WaiterID(20), minValidity: 3600, knownExpiry: pushed.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r20", current: pushed, now: clock.now)
        #expect(Self.succeeded(a).first?.1 == pushed)
        // Observed by the machine: answered with it even by a caller that knew of none.
        _ = m.valueObserved(pushed, solicitedBy: nil, now: clock.now)
        let b = m.tokenWasRequested(
            waiter: WaiterID(21), minValidity: 3600, knownExpiry: 0, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r21", now: clock.now)
        #expect(Self.succeeded(b).first?.1 == pushed)
    }

    @Test(
        "a round trip that brings no newer token answers every caller with the newest token, below their minValidity, and places the hold while releasing the lease"
    )
    func sameTokenServesEveryCaller() throws {
        let clock = ManualClock()
        let known = clock.now.unixSeconds + 600
        var m = Self.leading(callers: 10, known: known, clock: clock)
        #expect(m.waiterCount == 10)
        let actions = m.roundTripBroughtNoNewerToken(requestID: "r1", newest: Self.token(known), now: clock.now)
        let answers = Self.succeeded(actions)
        #expect(answers.count == 1)
        #expect(answers.first?.0 == (1...10).map { WaiterID(UInt64($0)) })
        // The true expiry: 600 s left although every caller asked for 3600.
        #expect(answers.first?.1 == Self.token(known))
        #expect(answers.first?.2 == .trigger)
        #expect(
            actions.contains(
                .placeHold(
                    requestID: "r1", duration: .seconds(60), releasingLease: true, answerBy: clock.now + .seconds(10))))
        #expect(!actions.contains(.releaseLease(requestID: "r1")))
        #expect(actions.filter { $0 == .recordAttempt(outcome: "success") }.count == 1)
        #expect(actions.contains(.recordHold(.sameTokenServed)))
        #expect(actions.contains(.roundFinished(succeeded: true)))
        #expect(Self.failed(actions).isEmpty)
        #expect(!m.isActive)
        // Reported again (the notification after the route's own report): nothing more happens.
        #expect(m.roundTripBroughtNoNewerToken(requestID: "r1", newest: Self.token(known), now: clock.now).isEmpty)
    }

    @Test("forced callers of the round get the newest token too: their round trip happened")
    func sameTokenAnswersForcedCallers() {
        let clock = ManualClock()
        let known = clock.now.unixSeconds + 900
        var m = Self.leading(callers: 2, known: known, clock: clock, forced: [2])
        let actions = m.roundTripBroughtNoNewerToken(requestID: "r1", newest: Self.token(known), now: clock.now)
        #expect(Self.succeeded(actions).first?.0 == [WaiterID(1), WaiterID(2)])
    }

    @Test("the newest token must have 60 s left: at 60 s it is served, at 59 s the callers get trigger_failed")
    func sameTokenFloor() {
        let clock = ManualClock()
        var served = Self.leading(callers: 1, known: clock.now.unixSeconds + 60, clock: clock)
        let a = served.roundTripBroughtNoNewerToken(
            requestID: "r1", newest: Self.token(clock.now.unixSeconds + 60), now: clock.now)
        #expect(Self.succeeded(a).first?.1 == Self.token(clock.now.unixSeconds + 60))

        var short = Self.leading(callers: 3, known: clock.now.unixSeconds + 59, clock: clock)
        let b = short.roundTripBroughtNoNewerToken(
            requestID: "r1", newest: Self.token(clock.now.unixSeconds + 59), now: clock.now)
        #expect(Self.succeeded(b).isEmpty)
        let failures = Self.failed(b)
        #expect(failures.count == 1)
        #expect(failures.first?.0 == [WaiterID(1), WaiterID(2), WaiterID(3)])
        #expect(failures.first?.1.code == .triggerFailed)
        #expect(b.contains(.recordHold(.sameTokenExpiring)))
        #expect(b.contains(.roundFinished(succeeded: false)))
        // The hold is placed all the same: one round trip a minute, not one per request.
        #expect(
            b.contains(
                .placeHold(
                    requestID: "r1", duration: .seconds(60), releasingLease: true, answerBy: clock.now + .seconds(10))))

        // No token at all (the re-delivered one had expired): trigger_failed as well.
        var none = Self.leading(callers: 1, known: 0, clock: clock)
        let c = none.roundTripBroughtNoNewerToken(requestID: "r1", newest: nil, now: clock.now)
        #expect(Self.failed(c).first?.1.code == .triggerFailed)
    }

    @Test(
        "during the hold a request is answered at once with source cache and starts nothing; after it, one round trip starts"
    )
    func requestsDuringHold() {
        var clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        let hold = RoundTripHold(until: clock.now + .seconds(60), newest: newest)
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        for i in 1...20 {
            clock.advance(.seconds(2))
            let a = m.tokenWasRequested(
                waiter: WaiterID(UInt64(i)), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
                deadline: clock.now + .seconds(10), requestID: "r\(i)", hold: hold, now: clock.now)
            #expect(a == [.succeed([WaiterID(UInt64(i))], newest, .cache), .recordHold(.requestHeld)])
            #expect(!m.isActive)
        }
        // The hold has ended (60 s after it was placed): the next request starts one round trip.
        clock.advance(.seconds(20))
        let after = m.tokenWasRequested(
            waiter: WaiterID(99), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r99", hold: hold, now: clock.now)
        #expect(after.contains(.acquireLease(requestID: "r99", ttl: .seconds(12), unlessNewerThan: newest.expiresAt)))
        #expect(m.isActive)
    }

    @Test("during the hold a token with under 60 s left is not served: trigger_failed at once, no round trip")
    func heldTokenTooShort() {
        let clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 59)
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        let a = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r1",
            hold: RoundTripHold(until: clock.now + .seconds(30), newest: newest), now: clock.now)
        #expect(a == [.fail([WaiterID(1)], .noUsableToken), .recordHold(.requestHeld)])
        #expect(Self.failed(a).first?.1.code == .triggerFailed)
        #expect(!m.isActive)
    }

    @Test("a forced refresh during the hold still starts a round trip, taking the lease regardless of the hold")
    func forcedRefreshDuringHold() {
        let clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        let a = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: newest.expiresAt, forced: true,
            deadline: clock.now + .seconds(10), requestID: "r1",
            hold: RoundTripHold(until: clock.now + .seconds(60), newest: newest), now: clock.now)
        #expect(
            a.contains(.acquireLeaseIgnoringHold(requestID: "r1", ttl: .seconds(12), unlessNewerThan: newest.expiresAt))
        )
        #expect(m.isActive)
        // A caller that does not force, arriving meanwhile, is answered at once.
        let b = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r2",
            hold: RoundTripHold(until: clock.now + .seconds(60), newest: newest), now: clock.now)
        #expect(b == [.succeed([WaiterID(2)], newest, .cache), .recordHold(.requestHeld)])
        #expect(m.waiterCount == 1)
        // The forced round trip brings the same token again: the hold starts anew.
        _ = m.leaseAcquired(requestID: "r1", now: clock.now)
        let c = m.roundTripBroughtNoNewerToken(requestID: "r1", newest: newest, now: clock.now)
        #expect(c.contains(.succeed([WaiterID(1)], newest, .trigger)))
        #expect(
            c.contains(
                .placeHold(
                    requestID: "r1", duration: .seconds(60), releasingLease: true, answerBy: clock.now + .seconds(10))))
    }

    @Test("refresh-ahead starts nothing during the hold, and a refresh-ahead that brings the same token does not loop")
    func refreshAheadDoesNotLoop() {
        var clock = ManualClock()
        let known = clock.now.unixSeconds + 600
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        _ = m.refreshAheadWasRequested(knownExpiry: known, requestID: "bg1", now: clock.now)
        _ = m.leaseAcquired(requestID: "bg1", now: clock.now)
        _ = m.attemptSucceeded(requestID: "bg1", attempt: 1, now: clock.now)
        let a = m.roundTripBroughtNoNewerToken(requestID: "bg1", newest: Self.token(known), now: clock.now)
        // No caller waits on it: nothing to answer by a deadline.
        #expect(a.contains(.placeHold(requestID: "bg1", duration: .seconds(60), releasingLease: true, answerBy: nil)))
        #expect(a.contains(.recordHold(.sameTokenServed)))
        #expect(!m.isActive)
        let hold = RoundTripHold(until: clock.now + .seconds(60), newest: Self.token(known))
        for _ in 0..<59 {
            clock.advance(.seconds(1))
            let b = m.refreshAheadWasRequested(knownExpiry: known, requestID: "bg2", hold: hold, now: clock.now)
            #expect(b == [.recordHold(.refreshAheadHeld)])
            #expect(!m.isActive)
        }
        clock.advance(.seconds(1))
        let c = m.refreshAheadWasRequested(knownExpiry: known, requestID: "bg3", hold: hold, now: clock.now)
        #expect(c.contains(.acquireLease(requestID: "bg3", ttl: .seconds(32), unlessNewerThan: known)))
    }

    @Test(
        "a lease refused because of a hold answers the callers that do not force and lets forced ones take it regardless"
    )
    func leaseHeld() {
        let clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        let a = m.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r1", now: clock.now)
        #expect(a.contains(.acquireLease(requestID: "r1", ttl: .seconds(12), unlessNewerThan: newest.expiresAt)))
        _ = m.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: newest.expiresAt, forced: true,
            deadline: clock.now + .seconds(10), requestID: "r2", now: clock.now)
        let hold = RoundTripHold(until: clock.now + .seconds(45), newest: newest)
        let b = m.leaseHeld(requestID: "r1", hold: hold, now: clock.now)
        #expect(b.contains(.succeed([WaiterID(1)], newest, .cache)))
        #expect(
            b.contains(.acquireLeaseIgnoringHold(requestID: "r1", ttl: .seconds(12), unlessNewerThan: newest.expiresAt))
        )
        #expect(m.waiterCount == 1)
        let c = m.leaseAcquired(requestID: "r1", now: clock.now)
        #expect(c.contains { if case .startAttempt = $0 { true } else { false } })

        // Only callers that do not force: the round ends without a verdict on the trigger.
        var n = TokenFlowStateMachine(configuration: Self.configuration())
        _ = n.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "r1", now: clock.now)
        let d = n.leaseHeld(requestID: "r1", hold: hold, now: clock.now)
        #expect(Self.succeeded(d).first?.0 == [WaiterID(1)])
        #expect(!d.contains { if case .roundFinished = $0 { true } else { false } })
        #expect(!Self.startsRoundTrip(d))
        #expect(!n.isActive)

        // A refresh-ahead round refused by a hold just ends.
        var bg = TokenFlowStateMachine(configuration: Self.configuration())
        _ = bg.refreshAheadWasRequested(knownExpiry: newest.expiresAt, requestID: "bg", now: clock.now)
        let e = bg.leaseHeld(requestID: "bg", hold: hold, now: clock.now)
        #expect(e.contains(.recordHold(.refreshAheadHeld)))
        #expect(!bg.isActive)
    }

    @Test("a process following another's round trip answers its callers the held way when the hold appears")
    func followerSeesHold() {
        let clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        var m = TokenFlowStateMachine(configuration: Self.configuration())
        for i in 1...3 {
            _ = m.tokenWasRequested(
                waiter: WaiterID(UInt64(i)), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
                deadline: clock.now + .seconds(10), requestID: "r\(i)", now: clock.now)
        }
        _ = m.leaseDenied(requestID: "r1", now: clock.now)
        // Only the leader may decide on the round trip's delivery: a follower ignores such a report.
        #expect(m.roundTripBroughtNoNewerToken(requestID: "r1", newest: newest, now: clock.now).isEmpty)
        // The stored token is not newer and not valid long enough: no answer from it.
        #expect(Self.succeeded(m.valueObserved(newest, solicitedBy: nil, now: clock.now)).isEmpty)
        let hold = RoundTripHold(until: clock.now + .seconds(60), newest: newest)
        let a = m.holdObserved(hold, now: clock.now)
        #expect(a.contains(.succeed([WaiterID(1), WaiterID(2), WaiterID(3)], newest, .cache)))
        #expect(a.filter { $0 == .recordHold(.requestHeld) }.count == 3)
        #expect(a.contains { if case .cancelTimer = $0 { true } else { false } })
        #expect(!Self.startsRoundTrip(a))
        #expect(!m.isActive)

        // A forced follower goes on to a round trip of its own, regardless of the hold.
        var f = Self.following(forced: true, minValidity: 300, known: newest.expiresAt, clock: clock, requestID: "f1")
        let g = f.holdObserved(hold, now: clock.now)
        #expect(
            g.contains(.acquireLeaseIgnoringHold(requestID: "f1", ttl: .seconds(12), unlessNewerThan: newest.expiresAt))
        )
        #expect(Self.succeeded(g).isEmpty)
        #expect(f.isActive)
    }

    @Test(
        "a caller that brings a hold to a following round: the forced round takes the lease, plain callers are answered held"
    )
    func callerBringsHoldToFollower() {
        let clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        let hold = RoundTripHold(until: clock.now + .seconds(60), newest: newest)
        // A forced caller follows another process's round; a second forced caller's store read
        // found the hold that round placed when it ended.
        var f = Self.following(forced: true, minValidity: 300, known: newest.expiresAt, clock: clock, requestID: "f1")
        let joined = f.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 300, knownExpiry: newest.expiresAt, forced: true,
            deadline: clock.now + .seconds(10), requestID: "f2", hold: hold, now: clock.now)
        // The round takes the lease (its re-read timer goes): it is not left waiting for a re-read
        // that was cancelled, with no lease asked for.
        #expect(
            joined.contains(
                .acquireLeaseIgnoringHold(requestID: "f1", ttl: .seconds(12), unlessNewerThan: newest.expiresAt)))
        #expect(joined.contains { if case .cancelTimer = $0 { true } else { false } })
        #expect(f.stateName(at: clock.now) == .acquiringLease)
        #expect(f.waiterCount == 2)
        // The lease is busy (another forced round took it): the round follows that one. The same
        // hold brought again (a caller served from memory hands back the machine's own) is nothing
        // new: no second take-over, the re-read timer kept.
        _ = f.leaseDenied(requestID: "f1", now: clock.now)
        #expect(f.holdObserved(hold, now: clock.now).isEmpty)
        let again = f.tokenWasRequested(
            waiter: WaiterID(3), minValidity: 300, knownExpiry: newest.expiresAt, forced: true,
            deadline: clock.now + .seconds(10), requestID: "f3", hold: hold, now: clock.now)
        #expect(!Self.startsRoundTrip(again))
        #expect(!again.contains { if case .cancelTimer = $0 { true } else { false } })
        #expect(f.stateName(at: clock.now) == .following)

        // Plain callers following a round are answered the held way when a caller brings the hold.
        var p = Self.following(forced: false, minValidity: 3600, known: newest.expiresAt, clock: clock, requestID: "p1")
        let held = p.tokenWasRequested(
            waiter: WaiterID(2), minValidity: 3600, knownExpiry: newest.expiresAt, forced: false,
            deadline: clock.now + .seconds(10), requestID: "p2", hold: hold, now: clock.now)
        let answered = Self.succeeded(held).flatMap(\.0)
        #expect(Set(answered) == [WaiterID(1), WaiterID(2)])
        #expect(!Self.startsRoundTrip(held))
        #expect(!p.isActive)
    }

    @Test("the leader ignores a hold it sees while its own trigger is in flight, and an ended hold changes nothing")
    func holdIgnoredByLeader() {
        var clock = ManualClock()
        let newest = Self.token(clock.now.unixSeconds + 600)
        var m = Self.leading(callers: 1, known: newest.expiresAt, clock: clock)
        #expect(m.holdObserved(RoundTripHold(until: clock.now + .seconds(60), newest: newest), now: clock.now).isEmpty)
        #expect(m.waiterCount == 1)
        var follower = Self.following(forced: false, minValidity: 3600, known: newest.expiresAt, clock: clock)
        let ended = RoundTripHold(until: clock.now, newest: newest)
        clock.advance(.milliseconds(1))
        #expect(follower.holdObserved(ended, now: clock.now).isEmpty)
        #expect(follower.waiterCount == 1)
    }
}
