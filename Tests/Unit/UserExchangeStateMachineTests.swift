import FlowEngine
import Testing

@testable import TokenGateway

@Suite("User-token exchange state machine: each state and transition")
struct UserExchangeStateMachineTests {
    static let t0 = FlowTime(unixSeconds: 1_900_000_000)
    static let deadline = t0 + .seconds(10)
    static let system = AccessToken(value: "sys", expiresAt: 1_900_003_600)

    static func machine() -> UserExchangeStateMachine {
        UserExchangeStateMachine(configuration: .init(), deadline: Self.deadline, ignoring: "stale", apiBaseUrl: "base")
    }

    static func snapshot(token: String? = nil, denied: Bool = false, lease: Duration? = nil) -> UserTokenSnapshot {
        UserTokenSnapshot(
            exists: true, status: .active, apiBaseUrl: "base", cloudId: "cloud",
            token: token.map { AccessToken(value: $0, expiresAt: 1_900_003_600) },
            deniedFor: denied ? .seconds(30) : nil, leaseRemaining: lease)
    }

    /// A machine that won the lease, read nothing and has exchange call 1 out.
    static func exchanging() -> UserExchangeStateMachine {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        _ = m.leaseAnswered(won: true, now: Self.t0)
        _ = m.storeRead(Self.snapshot(), now: Self.t0)
        _ = m.systemTokenArrived(.success(Self.system), now: Self.t0)
        _ = m.admission(.admitted, now: Self.t0)
        return m
    }

    @Test("lease won: check the store, system token, budget, then the call with the lease extended")
    func leader() {
        var m = Self.machine()
        #expect(m.start(now: Self.t0) == [.acquireLease(ttl: .seconds(12))])
        #expect(m.leaseAnswered(won: true, now: Self.t0) == [.readStore])
        #expect(m.state == .checking)
        #expect(m.storeRead(Self.snapshot(token: "stale"), now: Self.t0) == [.fetchSystemToken(forceRefresh: false, timeout: .seconds(10))])
        #expect(m.systemTokenArrived(.success(Self.system), now: Self.t0) == [.admit])
        let t1 = Self.t0 + .seconds(1)
        #expect(
            m.admission(.admitted, now: t1) == [
                .extendLease(ttl: .seconds(11)), .exchange(systemToken: Self.system, attempt: 1, timeout: .seconds(9)),
            ])
        #expect(m.state == .exchanging(attempt: 1))
    }

    @Test("lease won but another process finished meanwhile: its answer, and the lease goes back")
    func leaderFindsAnAnswer() {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        _ = m.leaseAnswered(won: true, now: Self.t0)
        #expect(m.storeRead(Self.snapshot(token: "fresh"), now: Self.t0) == [.releaseLease])
        let answer = UserTokenExchanger.Answer(
            token: AccessToken(value: "fresh", expiresAt: 1_900_003_600), source: .exchange, apiBaseUrl: "base")
        #expect(m.leaseReleased() == [.finish(.success(answer))])
        #expect(m.isFinished)
    }

    @Test("lease busy: read, follow until the lease's end; a notice re-reads; one during a read reads again")
    func follower() {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        #expect(m.leaseAnswered(won: false, now: Self.t0) == [.readStore])
        #expect(m.storeRead(Self.snapshot(lease: .seconds(3)), now: Self.t0) == [.scheduleTimer(TimerID(1), deadline: Self.t0 + .seconds(3))])
        #expect(m.state == .following(wake: TimerID(1)))
        #expect(m.noticed() == [.readStore])
        #expect(m.noticed() == [])
        #expect(m.state == .reading(again: true))
        #expect(m.storeRead(Self.snapshot(lease: .seconds(2)), now: Self.t0) == [.readStore])
        #expect(m.storeRead(Self.snapshot(lease: .seconds(20)), now: Self.t0) == [.scheduleTimer(TimerID(2), deadline: Self.deadline)])
        // The first timer is stale now.
        #expect(m.timerFired(TimerID(1), now: Self.t0 + .seconds(3)) == [])
        #expect(m.timerFired(TimerID(2), now: Self.deadline) == [.readStore])
        #expect(m.storeRead(Self.snapshot(lease: .seconds(1)), now: Self.deadline) == [.finish(.failure(.timeout))])
    }

    @Test("a follower whose leader let the lease go without an answer takes the lease")
    func followerTakesOver() {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        _ = m.leaseAnswered(won: false, now: Self.t0)
        #expect(m.storeRead(Self.snapshot(), now: Self.t0 + .seconds(1)) == [.acquireLease(ttl: .seconds(11))])
        #expect(m.state == .acquiringLease)
    }

    @Test("a follower ends on the leader's token or refusal")
    func followerSettles() {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        _ = m.leaseAnswered(won: false, now: Self.t0)
        #expect(m.storeRead(Self.snapshot(denied: true, lease: .seconds(1)), now: Self.t0) == [.finish(.failure(.denied))])
    }

    @Test("401: one fresh system token, then the next call; a second 401 ends the flight")
    func systemTokenRefused() {
        var m = Self.exchanging()
        #expect(
            m.exchanged(.systemTokenRefused, now: Self.t0, jitter: 0)
                == [.recordOutcome("unauthorized"), .fetchSystemToken(forceRefresh: true, timeout: .seconds(10))])
        _ = m.systemTokenArrived(.success(Self.system), now: Self.t0)
        #expect(m.admission(.admitted, now: Self.t0).last == .exchange(systemToken: Self.system, attempt: 2, timeout: .seconds(10)))
        #expect(m.exchanged(.systemTokenRefused, now: Self.t0, jitter: 0) == [.recordOutcome("unauthorized"), .releaseLease])
        #expect(m.leaseReleased().first.map { if case .finish(.failure(let e)) = $0 { e.errorCode == "exchange_failed" } else { false } } == true)
    }

    @Test("5xx: back off by the jittered delay, then a new attempt; the last attempt gives up")
    func backoff() {
        var m = Self.exchanging()
        let delay = Backoff.delay(attempt: 1, base: .milliseconds(100), cap: .seconds(2), jitter: 0.5)
        #expect(
            m.exchanged(.failed(.httpError(status: 503)), now: Self.t0, jitter: 0.5)
                == [.recordOutcome("http_error"), .scheduleTimer(TimerID(1), deadline: Self.t0 + delay)])
        #expect(m.state == .backingOff(attempt: 1, timer: TimerID(1)))
        #expect(m.timerFired(TimerID(1), now: Self.t0 + delay) == [.fetchSystemToken(forceRefresh: false, timeout: Self.deadline - (Self.t0 + delay))])
        var last = Self.exchanging()
        for attempt in 1..<4 {
            _ = last.exchanged(.failed(.timeout), now: Self.t0, jitter: 0)
            _ = last.timerFired(TimerID(UInt64(attempt)), now: Self.t0)
            _ = last.systemTokenArrived(.success(Self.system), now: Self.t0)
            _ = last.admission(.admitted, now: Self.t0)
        }
        #expect(last.state == .exchanging(attempt: 4))
        #expect(last.exchanged(.failed(.timeout), now: Self.t0, jitter: 0) == [.recordOutcome("timeout"), .releaseLease])
        #expect(last.leaseReleased() == [.finish(.failure(.timeout))])
    }

    @Test("a refusal and a 429 are recorded before the lease goes and the callers hear of it")
    func recordsBeforeAnswering() {
        var denied = Self.exchanging()
        #expect(denied.exchanged(.denied(message: nil), now: Self.t0, jitter: 0) == [.recordOutcome("denied"), .rememberDenial(.seconds(60))])
        #expect(denied.recorded() == [.releaseLease])
        #expect(denied.leaseReleased() == [.finish(.failure(.denied))])
        var limited = Self.exchanging()
        #expect(
            limited.exchanged(.rateLimited(retryAfter: nil), now: Self.t0, jitter: 0)
                == [.recordOutcome("rate_limited"), .blockExchanges(.seconds(60))])
        #expect(limited.recorded() == [.releaseLease])
        #expect(limited.leaseReleased().first.map { if case .finish(.failure(let e)) = $0 { e.retryAfter == .seconds(60) } else { false } } == true)
    }

    @Test("the shared budget spent: no call, 429 with its wait")
    func budgetSpent() {
        var m = Self.machine()
        _ = m.start(now: Self.t0)
        _ = m.leaseAnswered(won: true, now: Self.t0)
        _ = m.storeRead(Self.snapshot(), now: Self.t0)
        _ = m.systemTokenArrived(.success(Self.system), now: Self.t0)
        #expect(m.admission(.refused(retryAfter: .seconds(5)), now: Self.t0) == [.recordOutcome("budget_exhausted"), .releaseLease])
    }

    @Test("shutdown answers at once and gives the lease up; a decided outcome is kept")
    func shutdown() {
        var m = Self.exchanging()
        #expect(m.shutdownRequested() == [.releaseLease, .finish(.failure(.flow(.shuttingDown)))])
        #expect(m.shutdownRequested() == [])
        var denied = Self.exchanging()
        _ = denied.exchanged(.denied(message: nil), now: Self.t0, jitter: 0)
        #expect(denied.shutdownRequested() == [.releaseLease, .finish(.failure(.denied))])
    }
}
