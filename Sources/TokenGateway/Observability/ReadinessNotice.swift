import FlowEngine
import Logging
import ServiceLifecycle

/// Logs `ready` when the replica can serve: its main listener is up *and* the store answers.
/// Until the store answers, one warning says why the replica is not ready (the Redis client logs
/// each failed connect on its own); the notice asks the store again with a backoff (100 ms
/// doubling to ``retryCap``) and logs `ready` once it does.
public struct ReadinessNotice: Service {
    let redis: RedisClient
    let logger: Logger
    /// The longest wait between two asks of the store.
    let retryCap: Duration
    private let listening = AsyncStream<(host: String, port: Int)>.makeStream(bufferingPolicy: .bufferingNewest(1))

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
    }

    /// Asks the store until it answers (or the task is cancelled), then logs `ready`.
    private func waitForStore(_ address: (host: String, port: Int)) async {
        var delay = Duration.milliseconds(100)
        var warned = false
        while !Task.isCancelled {
            do {
                try await self.redis.ping(timeout: .milliseconds(500))
                self.logger.info(
                    "ready", metadata: ["listen.host": "\(address.host)", "listen.port": "\(address.port)"])
                return
            } catch {
                // A ping cut short by the shutdown says nothing about the store.
                guard !Task.isCancelled else { return }
                if !warned {
                    warned = true
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
}
