import NIOCore
import Testing

@testable import RedisKit

@Suite struct RedisConnectionPoolStateMachineTests {
    final class FakeConnection: CustomStringConvertible {
        let name: String
        init(_ name: String) { self.name = name }
        var description: String { self.name }
    }

    typealias Machine = RedisPoolStateMachine<FakeConnection>

    struct UnexpectedAction: Error {}

    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func makeMachine(size: Int = 2) -> Machine {
        Machine(size: size, backoffBase: .milliseconds(50), backoffCap: .seconds(2))
    }

    func at(_ milliseconds: Int64) -> NIODeadline {
        self.start + .milliseconds(milliseconds)
    }

    /// Requests a connection and expects the request to start (and wait for) a new connect attempt.
    func requestStartingAttempt(
        _ machine: inout Machine,
        now: NIODeadline,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws -> Machine.ConnectAttempt {
        let action = machine.connectionRequested(now: now)
        guard case .wait(let attempt, start: true) = action else {
            Issue.record("expected a new connect attempt, got \(action)", sourceLocation: sourceLocation)
            throw UnexpectedAction()
        }
        return attempt
    }

    /// Reports a failed attempt and expects it to be current.
    func fail(
        _ machine: inout Machine,
        _ attempt: Machine.ConnectAttempt,
        now: NIODeadline,
        jitter: Double = 1,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws -> (failures: Int, retryAfter: NIODeadline) {
        let failure = machine.connectFailed(attempt, now: now, jitter: jitter)
        return try #require(failure, sourceLocation: sourceLocation)
    }

    @Test func connectsLazilyOneSlotPerConcurrentRequest() throws {
        var machine = self.makeMachine()
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        let second = try self.requestStartingAttempt(&machine, now: self.at(0))
        #expect(first.slot == 0)
        #expect(second.slot == 1)
        // Both slots are connecting: the third request waits for one of them instead of starting more.
        let third = machine.connectionRequested(now: self.at(0))
        guard case .wait(let attempt, start: false) = third else {
            Issue.record("expected to wait, got \(third)")
            return
        }
        #expect(attempt == first || attempt == second)
    }

    @Test func usesConnectedSlotsRoundRobin() throws {
        var machine = self.makeMachine()
        let a = FakeConnection("a")
        let b = FakeConnection("b")
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        let second = try self.requestStartingAttempt(&machine, now: self.at(0))
        let keptA = machine.connectSucceeded(first, connection: a)
        let keptB = machine.connectSucceeded(second, connection: b)
        #expect(keptA && keptB)
        var used: [String] = []
        for _ in 0..<4 {
            if case .use(let connection, startConnecting: nil) = machine.connectionRequested(now: self.at(1)) {
                used.append(connection.name)
            }
        }
        #expect(used == ["a", "b", "a", "b"])
    }

    @Test func aNotYetConnectedSlotStartsConnectingWhileAnotherServes() throws {
        var machine = self.makeMachine()
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        let a = FakeConnection("a")
        _ = machine.connectSucceeded(first, connection: a)
        // Round robin picks slot 1 (never connected): it starts connecting, and the command uses slot 0.
        let action = machine.connectionRequested(now: self.at(1))
        guard case .use(let connection, .some(let attempt)) = action else {
            Issue.record("expected to use slot 0 and connect slot 1, got \(action)")
            return
        }
        #expect(connection === a)
        #expect(attempt.slot == 1)
    }

    @Test func failedConnectsBackOffAndFailFastMeanwhile() throws {
        var machine = self.makeMachine(size: 1)
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        let failure = try self.fail(&machine, first, now: self.at(10))
        #expect(failure.failures == 1)
        #expect(failure.retryAfter == self.at(60))

        let during = machine.connectionRequested(now: self.at(59))
        guard case .failFast = during else {
            Issue.record("expected to fail fast during the backoff, got \(during)")
            return
        }
        let second = try self.requestStartingAttempt(&machine, now: self.at(60))
        let secondFailure = try self.fail(&machine, second, now: self.at(70))
        #expect(secondFailure.failures == 2)
        #expect(secondFailure.retryAfter == self.at(170))

        let third = try self.requestStartingAttempt(&machine, now: self.at(170))
        #expect(try self.fail(&machine, third, now: self.at(170), jitter: 0).retryAfter == self.at(270))
    }

    @Test func backoffIsCapped() throws {
        var machine = self.makeMachine(size: 1)
        var now = self.at(0)
        var lastDelay = TimeAmount.zero
        for _ in 0..<12 {
            let attempt = try self.requestStartingAttempt(&machine, now: now)
            let failure = try self.fail(&machine, attempt, now: now)
            lastDelay = failure.retryAfter - now
            #expect(lastDelay <= .seconds(2))
            now = failure.retryAfter
        }
        #expect(lastDelay == .seconds(2))
    }

    @Test func aSuccessfulConnectResetsTheBackoff() throws {
        var machine = self.makeMachine(size: 1)
        var now = self.at(0)
        for _ in 0..<5 {
            let attempt = try self.requestStartingAttempt(&machine, now: now)
            now = try self.fail(&machine, attempt, now: now).retryAfter
        }
        let attempt = try self.requestStartingAttempt(&machine, now: now)
        let connection = FakeConnection("a")
        let kept = machine.connectSucceeded(attempt, connection: connection)
        let closed = machine.connectionClosed(connection)
        #expect(kept && closed)

        // A lost connection reconnects on the next use without waiting...
        let reconnect = try self.requestStartingAttempt(&machine, now: now)
        // ...and a failure afterwards starts the backoff from the base again.
        let failure = try self.fail(&machine, reconnect, now: now)
        #expect(failure.failures == 1)
        #expect(failure.retryAfter - now == .milliseconds(50))
    }

    @Test func waitsForAConnectingSlotRatherThanFailingFast() throws {
        var machine = self.makeMachine()
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        _ = try self.fail(&machine, first, now: self.at(0))
        let second = try self.requestStartingAttempt(&machine, now: self.at(1))
        #expect(second.slot == 1)
        // Slot 0 backs off, slot 1 is connecting: wait for slot 1.
        let action = machine.connectionRequested(now: self.at(2))
        guard case .wait(let attempt, start: false) = action else {
            Issue.record("expected to wait for slot 1, got \(action)")
            return
        }
        #expect(attempt == second)
    }

    @Test func ignoresStaleAttemptsAndForeignConnections() throws {
        var machine = self.makeMachine(size: 1)
        let attempt = try self.requestStartingAttempt(&machine, now: self.at(0))
        let stale = Machine.ConnectAttempt(slot: 0, id: attempt.id + 1)
        let staleSuccess = machine.connectSucceeded(stale, connection: FakeConnection("x"))
        let staleFailure = machine.connectFailed(stale, now: self.at(0), jitter: 0)
        let foreignClosed = machine.connectionClosed(FakeConnection("y"))
        let current = machine.connectSucceeded(attempt, connection: FakeConnection("a"))
        #expect(!staleSuccess)
        #expect(staleFailure == nil)
        #expect(!foreignClosed)
        #expect(current)
    }

    @Test func shutdownReturnsConnectionsAndRejectsLaterWork() throws {
        var machine = self.makeMachine()
        let first = try self.requestStartingAttempt(&machine, now: self.at(0))
        let second = try self.requestStartingAttempt(&machine, now: self.at(0))
        let a = FakeConnection("a")
        _ = machine.connectSucceeded(first, connection: a)
        let toClose = machine.shutDown()
        #expect(toClose.count == 1 && toClose[0] === a)
        #expect(machine.isShutDown)
        let late = machine.connectSucceeded(second, connection: FakeConnection("late"))
        #expect(!late)
        let action = machine.connectionRequested(now: self.at(1))
        guard case .failFast = action else {
            Issue.record("expected to fail fast after shutdown, got \(action)")
            return
        }
    }
}
