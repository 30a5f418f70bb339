/// The clock of a ``TokenFlow``: what time it is and how to wait for an instant. Production uses
/// ``SystemFlowClock``; tests pass a manual clock that they advance by hand.
public protocol FlowClock: Sendable {
    /// The current wall-clock time.
    func now() -> FlowTime
    /// Returns at `deadline` (at once when it has passed). Throws `CancellationError` when the
    /// task is cancelled first.
    func sleep(until deadline: FlowTime) async throws
}

/// The wall clock, with `Task.sleep` for waiting.
public struct SystemFlowClock: FlowClock {
    public init() {}

    public func now() -> FlowTime { FlowTime.now() }

    public func sleep(until deadline: FlowTime) async throws {
        let delay = deadline - FlowTime.now()
        if delay > .zero {
            try await Task.sleep(for: delay)
        } else {
            try Task.checkCancellation()
        }
    }
}

extension FlowClock {
    /// Runs `work`, and `then` once it has ended, or at `deadline` if it is still running then
    /// (it goes on to its end, awaited here): callers answered after a store write are not kept
    /// past their deadline by a slow store. `then` runs once; without a deadline, after `work`.
    public func run(
        _ work: @escaping @Sendable () async -> Void, thenBy deadline: FlowTime?, _ then: @Sendable () -> Void
    ) async {
        guard let deadline else {
            await work()
            return then()
        }
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await work()
                return true
            }
            group.addTask {
                try? await self.sleep(until: deadline)
                return false
            }
            let done = await group.next() ?? true
            then()
            // Done: the wait for the deadline ends. Otherwise the work goes on to its end.
            if done { group.cancelAll() }
        }
    }
}
