import FlowEngine
import Synchronization

/// Counts the invocations in progress per installation on this process and refuses more than the cap.
public final class InvocationLimiter: Sendable {
    private let limit: Int
    private let totalLimit: Int
    private let inFlight = Mutex<(total: Int, counts: [String: Int])>((0, [:]))

    /// - Parameters:
    ///   - limit: most invocations of one installation in progress at once (at least 1).
    ///   - total: most invocations in progress at once in this process, all installations together
    ///     (each may hold a payload and an answer in memory).
    public init(limit: Int, total: Int = InvokeConfiguration().maxConcurrencyTotal) {
        self.limit = max(1, limit)
        self.totalLimit = max(1, total)
    }

    /// Why ``acquire(_:)`` took no slot.
    public enum Refusal: Sendable, Equatable {
        /// `limit` calls of that installation are in progress.
        case installationBusy
        /// `total` calls are in progress in all.
        case processBusy
    }

    /// Takes a slot for `id`; nil when taken, else why not.
    public func acquire(_ id: InstallationID) -> Refusal? {
        self.inFlight.withLock { state in
            let current = state.counts[id.ari, default: 0]
            guard current < self.limit else { return .installationBusy }
            guard state.total < self.totalLimit else { return .processBusy }
            state.counts[id.ari] = current + 1
            state.total += 1
            return nil
        }
    }

    /// Takes a slot for `id`; false when `limit` calls of that installation, or `total` calls in
    /// all, are already in progress.
    public func tryAcquire(_ id: InstallationID) -> Bool { self.acquire(id) == nil }

    /// Gives back a slot taken with ``tryAcquire(_:)``.
    public func release(_ id: InstallationID) {
        self.inFlight.withLock { state in
            let current = state.counts[id.ari, default: 0]
            guard current > 0 else { return }
            if current == 1 { state.counts[id.ari] = nil } else { state.counts[id.ari] = current - 1 }
            state.total -= 1
        }
    }

    /// Invocations of `id` in progress now.
    public func inProgress(_ id: InstallationID) -> Int {
        self.inFlight.withLock { $0.counts[id.ari, default: 0] }
    }
}
