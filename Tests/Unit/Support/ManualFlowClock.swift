import Synchronization

@testable import FlowEngine

/// A ``FlowClock`` that only moves when a test advances it: sleepers wake when the time passes
/// their deadline, and a test can wait until a number of sleepers (timers) are armed.
final class ManualFlowClock: FlowClock {
    private struct Sleeper {
        var deadline: FlowTime
        var continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var now: FlowTime
        var sleepers: [UInt64: Sleeper] = [:]
        var cancelled: Set<UInt64> = []
        var next: UInt64 = 0
        var watchers: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    private let state: Mutex<State>

    init(start: FlowTime = FlowTime(unixSeconds: 1_763_906_400)) {
        self.state = Mutex(State(now: start))
    }

    func now() -> FlowTime { self.state.withLock { $0.now } }

    /// The number of sleepers waiting now.
    var sleeperCount: Int { self.state.withLock { $0.sleepers.count } }

    func sleep(until deadline: FlowTime) async throws {
        let id = self.state.withLock { s -> UInt64 in
            s.next += 1
            return s.next
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let (outcome, ready) = self.state.withLock {
                    s -> (Result<Void, any Error>?, [CheckedContinuation<Void, Never>]) in
                    if s.cancelled.remove(id) != nil { return (.failure(CancellationError()), []) }
                    if deadline <= s.now { return (.success(()), []) }
                    s.sleepers[id] = Sleeper(deadline: deadline, continuation: continuation)
                    return (nil, Self.takeWatchers(&s))
                }
                for watcher in ready { watcher.resume() }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            let sleeper = self.state.withLock { s -> Sleeper? in
                guard let sleeper = s.sleepers.removeValue(forKey: id) else {
                    s.cancelled.insert(id)
                    return nil
                }
                return sleeper
            }
            sleeper?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Moves time on by `duration` and wakes the sleepers whose deadline has come.
    func advance(by duration: Duration) {
        let due = self.state.withLock { s -> [Sleeper] in
            s.now = s.now + duration
            let now = s.now
            let due = s.sleepers.filter { $0.value.deadline <= now }
            for id in due.keys { s.sleepers[id] = nil }
            return Array(due.values)
        }
        for sleeper in due { sleeper.continuation.resume() }
    }

    /// Returns once at least `count` sleepers wait.
    func waitForSleepers(_ count: Int) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ready = self.state.withLock { s -> Bool in
                if s.sleepers.count >= count { return true }
                s.watchers.append((count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    private static func takeWatchers(_ s: inout State) -> [CheckedContinuation<Void, Never>] {
        let count = s.sleepers.count
        let ready = s.watchers.filter { $0.count <= count }.map(\.continuation)
        s.watchers.removeAll { $0.count <= count }
        return ready
    }
}
