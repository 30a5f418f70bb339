import Synchronization

/// The timers an executor's round machines ask for (``LeasedRoundStateMachine/Action/scheduleTimer(_:deadline:)``),
/// one per key: each is armed when scheduled, then waited for by one child task of the executor's
/// `run()` until its deadline or its cancellation, whichever comes first. ``TokenFlow`` and the
/// user-token exchanger both keep theirs here.
public final class RoundTimers<Key: Hashable & Sendable>: Sendable {
    /// An armed timer; `wake` ends its wait early when it is cancelled.
    private struct Entry {
        var wake: CheckedContinuation<Void, Never>?
    }

    private let entries = Mutex<[Key: Entry]>([:])
    private let clock: any FlowClock

    /// - Parameter clock: what the deadlines are waited for on (a manual clock in tests).
    public init(clock: any FlowClock) {
        self.clock = clock
    }

    /// Arms the timer `key`, before its wait starts: a cancellation that comes first ends it too.
    public func arm(_ key: Key) {
        self.entries.withLock { $0[key] = Entry() }
    }

    /// Ends the timer `key` if it is armed: its wait returns false.
    public func cancel(_ key: Key) {
        let wake = self.entries.withLock { $0.removeValue(forKey: key)?.wake }
        wake?.resume()
    }

    /// Ends every armed timer (shutdown).
    public func cancelAll() {
        let wakes = self.entries.withLock { entries -> [CheckedContinuation<Void, Never>] in
            defer { entries.removeAll() }
            return entries.values.compactMap(\.wake)
        }
        for wake in wakes { wake.resume() }
    }

    /// How many timers are armed.
    public var count: Int {
        self.entries.withLock { $0.count }
    }

    /// Waits until `deadline` or until the timer is cancelled (or the task is), whichever comes
    /// first; true when the deadline came while the timer was still armed. The timer is disarmed
    /// when this returns.
    public func wait(_ key: Key, until deadline: FlowTime) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask { (try? await self.clock.sleep(until: deadline)) != nil }
            group.addTask {
                await withCheckedContinuation { (wake: CheckedContinuation<Void, Never>) in
                    let gone = self.entries.withLock { entries -> Bool in
                        guard entries[key] != nil else { return true }
                        entries[key]?.wake = wake
                        return false
                    }
                    if gone { wake.resume() }
                }
                return false
            }
            let deadlineCame = await group.next() ?? false
            group.cancelAll()
            // The timer ends here: whoever removes its entry wakes the waiting half.
            let entry = self.entries.withLock { $0.removeValue(forKey: key) }
            entry?.wake?.resume()
            return deadlineCame && entry != nil
        }
    }
}
