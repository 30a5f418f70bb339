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
