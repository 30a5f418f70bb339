import Synchronization

/// The store check behind `GET /health/ready`, shared by the requests that ask at once and reused
/// for a moment: however many probes (or unauthenticated callers) ask, Redis sees at most one
/// check in flight and one per ``maximumAge``.
final class ReadinessCheck: Sendable {
    private struct State {
        /// The latest outcome and when it was known.
        var last: (ready: Bool, at: ContinuousClock.Instant)?
        /// Callers waiting for the check in flight; nil when none is.
        var waiting: [CheckedContinuation<Bool, Never>]?
    }

    private let state = Mutex(State())
    /// How long an outcome is answered again without a new check.
    let maximumAge: Duration

    init(maximumAge: Duration = .seconds(1)) {
        self.maximumAge = maximumAge
    }

    /// The latest outcome while it is recent; else the outcome of the check in flight, or of
    /// `probe`, run now by this caller for every caller that asks meanwhile.
    func isReady(probe: () async -> Bool) async -> Bool {
        enum Step {
            case answer(Bool)
            case follow
            case lead
        }
        let now = ContinuousClock.now
        let step = self.state.withLock { state -> Step in
            if let last = state.last, now - last.at < self.maximumAge { return .answer(last.ready) }
            if state.waiting != nil { return .follow }
            state.waiting = []
            return .lead
        }
        switch step {
        case .answer(let ready):
            return ready
        case .follow:
            return await withCheckedContinuation { continuation in
                // The check may have ended meanwhile: its outcome is then the answer.
                let ended = self.state.withLock { state -> Bool? in
                    guard state.waiting != nil else { return state.last?.ready ?? false }
                    state.waiting?.append(continuation)
                    return nil
                }
                if let ended { continuation.resume(returning: ended) }
            }
        case .lead:
            let ready = await probe()
            // A check cut short by its caller's cancellation tells nothing: handed to those who
            // waited for it, not kept for the next ones.
            let cancelled = Task.isCancelled
            let waiting = self.state.withLock { state in
                if !cancelled { state.last = (ready, ContinuousClock.now) }
                defer { state.waiting = nil }
                return state.waiting ?? []
            }
            for continuation in waiting { continuation.resume(returning: ready) }
            return ready
        }
    }
}
