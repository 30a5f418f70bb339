import FlowEngine
import Synchronization

/// Counts the invocations in progress per installation on this process and refuses more than the cap.
public final class InvocationLimiter: Sendable {
    private let limit: Int
    private let inFlight = Mutex<[String: Int]>([:])

    /// - Parameter limit: most invocations of one installation in progress at once (at least 1).
    public init(limit: Int) { self.limit = max(1, limit) }

    /// Takes a slot for `id`; false when `limit` calls of that installation are already in progress.
    public func tryAcquire(_ id: InstallationID) -> Bool {
        self.inFlight.withLock { counts in
            let current = counts[id.ari, default: 0]
            guard current < self.limit else { return false }
            counts[id.ari] = current + 1
            return true
        }
    }

    /// Gives back a slot taken with ``tryAcquire(_:)``.
    public func release(_ id: InstallationID) {
        self.inFlight.withLock { counts in
            let current = counts[id.ari, default: 0]
            if current <= 1 { counts[id.ari] = nil } else { counts[id.ari] = current - 1 }
        }
    }

    /// Invocations of `id` in progress now.
    public func inProgress(_ id: InstallationID) -> Int {
        self.inFlight.withLock { $0[id.ari, default: 0] }
    }
}
