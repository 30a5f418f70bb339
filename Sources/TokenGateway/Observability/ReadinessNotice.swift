import FlowEngine
import Logging
import ServiceLifecycle
import Synchronization

/// Logs `ready` when the replica can serve: its listener is up *and* the store answers, the
/// moment `GET /health/ready` first answers 200. Until the store answers, one warning says why the
/// replica is not ready (the Redis client logs each failed connect on its own); the notice asks
/// the store again with a backoff (100 ms doubling to ``retryCap``) and logs `ready` once it does.
public final class ReadinessNotice: Service, Sendable {
    /// How far the replica has come.
    public enum Phase: Int, Sendable, Comparable {
        /// The listener is not up yet.
        case starting
        /// The listener is up; the store did not answer.
        case waitingForStore
        /// The listener is up and the store answered: `ready` was logged.
        case ready

        public static func < (lhs: Phase, rhs: Phase) -> Bool { lhs.rawValue < rhs.rawValue }
    }

    struct State {
        var phase = Phase.starting
        var ended = false
        var waiters: [(phase: Phase, continuation: CheckedContinuation<Bool, Never>)] = []
    }

    let redis: RedisClient
    let logger: Logger
    /// The longest wait between two asks of the store.
    let retryCap: Duration
    private let listening = AsyncStream<(host: String, port: Int)>.makeStream(bufferingPolicy: .bufferingNewest(1))
    private let state = Mutex(State())

    init(redis: RedisClient, logger: Logger, retryCap: Duration = .seconds(2)) {
        self.redis = redis
        self.logger = logger
        self.retryCap = retryCap
    }

    /// The main listener is up on `host`:`port` (its `onServerRunning`).
    func listenerUp(host: String, port: Int) {
        self.listening.continuation.yield((host, port))
        self.listening.continuation.finish()
    }

    /// Returns true once the replica has come as far as `phase`; false when the notice ended
    /// before (a shutdown).
    public func reached(_ phase: Phase) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let answer = self.state.withLock { s -> Bool? in
                if s.phase >= phase { return true }
                if s.ended { return false }
                s.waiters.append((phase, continuation))
                return nil
            }
            if let answer { continuation.resume(returning: answer) }
        }
    }

    public func run() async {
        await cancelWhenGracefulShutdown {
            var address: (host: String, port: Int)?
            for await up in self.listening.stream {
                address = up
                break
            }
            guard let address else { return }
            await self.waitForStore(address)
        }
        // A service that returns ends the whole group: this one stays until the shutdown.
        try? await gracefulShutdown()
        let waiters = self.state.withLock { s in
            s.ended = true
            defer { s.waiters = [] }
            return s.waiters
        }
        for waiter in waiters { waiter.continuation.resume(returning: false) }
    }

    /// Asks the store until it answers (or the task is cancelled), then logs `ready`.
    private func waitForStore(_ address: (host: String, port: Int)) async {
        var delay = Duration.milliseconds(100)
        while !Task.isCancelled {
            do {
                try await self.redis.ping(timeout: .milliseconds(500))
                self.logger.info(
                    "ready", metadata: ["listen.host": "\(address.host)", "listen.port": "\(address.port)"])
                self.advance(to: .ready)
                return
            } catch {
                if self.advance(to: .waitingForStore) {
                    self.logger.warning(
                        "listening but not ready: the store does not answer (GET /health/ready answers 503 until it does)",
                        metadata: [
                            "listen.host": "\(address.host)", "listen.port": "\(address.port)",
                            "store.error": "\(error)",
                        ])
                }
            }
            do { try await Task.sleep(for: delay) } catch { return }
            delay = min(delay * 2, self.retryCap)
        }
    }

    /// Moves to `phase` (never back) and wakes whoever waits for it; true when the phase is new.
    @discardableResult
    private func advance(to phase: Phase) -> Bool {
        let (new, woken) = self.state.withLock { s -> (Bool, [CheckedContinuation<Bool, Never>]) in
            guard s.phase < phase else { return (false, []) }
            s.phase = phase
            let woken = s.waiters.filter { $0.phase <= phase }.map(\.continuation)
            s.waiters.removeAll { $0.phase <= phase }
            return (true, woken)
        }
        for continuation in woken { continuation.resume(returning: true) }
        return new
    }
}
