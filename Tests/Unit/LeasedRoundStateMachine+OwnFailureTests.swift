import Testing

@testable import FlowEngine

/// A value whose rounds fail in ways of their own (a refusal, a rate limit), as user tokens do.
private struct Pass: LeasedRoundValue {
    struct Refusal: Error, Hashable, Sendable {
        var code: String
    }
    typealias Failure = Refusal

    var expiresAt: Int64
    var roundID: String?
    func isStale(at now: FlowTime, fraction: Double) -> Bool { false }
    static func failure(_ error: FlowError) -> Refusal { Refusal(code: error.code.rawValue) }
}

private typealias Machine = LeasedRoundStateMachine<Pass>

private func scheduled(_ actions: [Machine.Action]) -> [(TimerID, FlowTime)] {
    actions.compactMap { if case .scheduleTimer(let t, let d) = $0 { return (t, d) } else { return nil } }
}

@Suite("LeasedRoundStateMachine: failures of the value's own, following to the lease's end, no circuit")
struct LeasedRoundStateMachineOwnFailureTests {
    let start = FlowTime(unixSeconds: 1_763_906_400)

    private func machine(circuitBreaking: Bool = true) -> Machine {
        var c = TokenFlowConfiguration()
        c.maxAttempts = 2
        c.circuitBreaking = circuitBreaking
        return Machine(configuration: c)
    }

    private func request(_ m: inout Machine, _ w: UInt64, at now: FlowTime) -> [Machine.Action] {
        m.tokenWasRequested(
            waiter: WaiterID(w), minValidity: 300, knownExpiry: 0, forced: false, deadline: now + .seconds(10),
            requestID: "r1", now: now)
    }

    @Test("a led round ended with the value's own failure fails every caller with it and gives the lease up")
    func ledRoundEnds() {
        var m = self.machine()
        _ = self.request(&m, 1, at: self.start)
        _ = self.request(&m, 2, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let a = m.roundEnded(requestID: "r1", failing: Pass.Refusal(code: "denied"), now: self.start)
        #expect(a.contains(.fail([WaiterID(1), WaiterID(2)], Pass.Refusal(code: "denied"))))
        #expect(a.contains(.roundFinished(succeeded: false)))
        #expect(a.contains(.releaseLease(requestID: "r1")))
        #expect(m.stateName(at: self.start) == .idle)
        // Another round's end is ignored.
        #expect(m.roundEnded(requestID: "r1", failing: Pass.Refusal(code: "late"), now: self.start).isEmpty)
    }

    @Test("a followed round ended with a failure read from the store: callers fail, no lease to give up")
    func followedRoundEnds() {
        var m = self.machine()
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseDenied(requestID: "r1", now: self.start)
        let a = m.roundEnded(requestID: "r1", failing: Pass.Refusal(code: "denied"), now: self.start)
        #expect(a.contains(.fail([WaiterID(1)], Pass.Refusal(code: "denied"))))
        #expect(!a.contains(.releaseLease(requestID: "r1")))
        #expect(!a.contains(.roundFinished(succeeded: false)))
        #expect(!m.isRetained(at: self.start))
    }

    @Test("the machine's own failures reach callers as the value's failure type")
    func ownFailuresConverted() {
        var m = self.machine()
        let a = self.request(&m, 1, at: self.start)
        let deadline = scheduled(a)[0].0
        let b = m.timerFired(deadline, now: self.start + .seconds(10), jitter: 0)
        #expect(b.contains(.fail([WaiterID(1)], Pass.Refusal(code: "token_timeout"))))
        _ = self.request(&m, 2, at: self.start)
        let c = m.storeFailed(requestID: "r1", now: self.start)
        #expect(c.contains(.fail([WaiterID(2)], Pass.Refusal(code: "store_unavailable"))))
    }

    @Test(
        "following a lease with known time left: a re-read when it ends, or after pollCap if sooner (a lost notice), capped by the deadline"
    )
    func followsToTheLeaseEnd() {
        var m = self.machine()
        _ = self.request(&m, 1, at: self.start)
        // Less than pollCap (1 s) left: the re-read is due when the lease ends.
        let a = m.leaseDenied(requestID: "r1", leaseRemaining: .milliseconds(600), now: self.start)
        #expect(m.stateName(at: self.start) == .following)
        let (wake, at) = scheduled(a)[0]
        #expect(at == self.start + .milliseconds(600))
        #expect(m.timerFired(wake, now: at, jitter: 0) == [.readStore(requestID: "r1")])
        // The lease was extended meanwhile: the old re-read goes, a new one is due after pollCap
        // (the other round may end early and its notice be lost), not at the lease's new end.
        let b = m.leaseDenied(requestID: "r1", leaseRemaining: .seconds(30), now: at)
        #expect(b.contains(.cancelTimer(wake)))
        let (wake2, at2) = scheduled(b)[0]
        #expect(at2 == at + .seconds(1))
        #expect(m.timerFired(wake2, now: at2, jitter: 0) == [.readStore(requestID: "r1")])
        // Near the callers' deadline: the re-read is due then at the latest.
        let late = self.start + .milliseconds(9_500)
        let c = m.leaseDenied(requestID: "r1", leaseRemaining: .seconds(30), now: late)
        #expect(scheduled(c)[0].1 == self.start + .seconds(10))
        // Gone without an answer: take it.
        let d = m.storeReadEmpty(requestID: "r1", now: late)
        #expect(d.contains(.acquireLease(requestID: "r1", ttl: .milliseconds(2_500), unlessNewerThan: 0)))
    }

    @Test("circuit breaking off: a led round's verdict is not reported")
    func noCircuit() {
        var m = self.machine(circuitBreaking: false)
        _ = self.request(&m, 1, at: self.start)
        _ = m.leaseAcquired(requestID: "r1", now: self.start)
        let a = m.attemptFailed(requestID: "r1", attempt: 1, failure: .httpError, now: self.start, jitter: 0)
        let retry = scheduled(a)[0]
        _ = m.timerFired(retry.0, now: retry.1, jitter: 0)
        let b = m.attemptFailed(requestID: "r1", attempt: 2, failure: .httpError, now: retry.1, jitter: 0)
        #expect(b.contains(.fail([WaiterID(1)], Pass.Refusal(code: "trigger_failed"))))
        #expect(!b.contains(.roundFinished(succeeded: false)))
        #expect(b.contains(.releaseLease(requestID: "r1")))
    }
}
