import Logging
import NIOCore
import Synchronization

/// A fixed number of lazily connected Redis connections with per-slot reconnect backoff.
///
/// Connect attempts run as tasks owned by the pool (tracked, cancelled and awaited by ``shutDown()``); several
/// commands may wait for the same attempt, each within its own deadline.
final class RedisConnectionPool: Sendable {
    typealias Machine = RedisPoolStateMachine<RedisConnection>

    /// Establishes a ready connection (connected, authenticated, database selected) on the given event loop.
    typealias Connector = @Sendable (_ eventLoop: any EventLoop) async throws -> RedisConnection

    private struct ConnectAttemptState {
        var promise: EventLoopPromise<RedisConnection>
        var task: Task<Void, Never>?
    }

    private struct State {
        var machine: Machine
        var attempts: [Machine.ConnectAttempt: ConnectAttemptState] = [:]
    }

    private let state: Mutex<State>
    private let eventLoopGroup: any EventLoopGroup
    private let connector: Connector
    private let logger: Logger
    private let connectionStateChanged: @Sendable (_ isUp: Bool) -> Void

    /// - Parameter connectionStateChanged: called after every connect attempt (`true` on success) and when a
    ///   connection is lost (`false`).
    init(
        configuration: RedisConfiguration,
        eventLoopGroup: any EventLoopGroup,
        logger: Logger,
        connector: @escaping Connector,
        connectionStateChanged: @escaping @Sendable (_ isUp: Bool) -> Void
    ) {
        self.state = Mutex(
            State(
                machine: Machine(
                    size: configuration.poolSize,
                    backoffBase: configuration.reconnectBackoffBase,
                    backoffCap: configuration.reconnectBackoffCap
                )
            )
        )
        self.eventLoopGroup = eventLoopGroup
        self.connector = connector
        self.logger = logger
        self.connectionStateChanged = connectionStateChanged
    }

    /// A ready connection for one command or pipeline.
    ///
    /// - Throws: ``RedisError/unavailable`` when no connection can be had (backoff, failed connect, shut down),
    ///   ``RedisError/timeout`` when `deadline` passes while connecting, `CancellationError`.
    func connection(deadline: NIODeadline) async throws -> RedisConnection {
        let (action, future) = self.state.withLock {
            state -> (Machine.LeaseAction, EventLoopFuture<RedisConnection>?) in
            let action = state.machine.connectionRequested(now: .now())
            switch action {
            case .use(_, .some(let attempt)), .wait(let attempt, start: true):
                let promise = self.eventLoopGroup.any().makePromise(of: RedisConnection.self)
                state.attempts[attempt] = ConnectAttemptState(promise: promise)
                return (action, promise.futureResult)
            case .wait(let attempt, start: false):
                return (action, state.attempts[attempt]?.promise.futureResult)
            case .use(_, startConnecting: nil), .failFast:
                return (action, nil)
            }
        }

        switch action {
        case .use(let connection, let attempt):
            if let attempt {
                self.startConnecting(attempt)
            }
            return connection
        case .wait(let attempt, let start):
            if start {
                self.startConnecting(attempt)
            }
            guard let future else {
                throw RedisError.unavailable
            }
            return try await future.awaitRedisResult(deadline: deadline, timeoutError: .timeout)
        case .failFast:
            throw RedisError.unavailable
        }
    }

    private func startConnecting(_ attempt: Machine.ConnectAttempt) {
        guard let promise = self.state.withLock({ $0.attempts[attempt]?.promise }) else {
            return
        }
        let eventLoop = promise.futureResult.eventLoop
        let task = Task {
            let result: Result<RedisConnection, any Error>
            do {
                result = .success(try await self.connector(eventLoop))
            } catch {
                result = .failure(error)
            }
            self.connectAttemptFinished(attempt, result: result)
        }
        self.state.withLock { state in
            // The attempt may already have finished (and been removed); then there is nothing to track.
            state.attempts[attempt]?.task = task
        }
    }

    private func connectAttemptFinished(
        _ attempt: Machine.ConnectAttempt,
        result: Result<RedisConnection, any Error>
    ) {
        switch result {
        case .success(let connection):
            let (kept, promise, outdated) = self.state.withLock { state in
                let kept = state.machine.connectSucceeded(attempt, connection: connection)
                // After a failover the primary has a new address: connections to the old one go, and their slots
                // reconnect (asking the sentinels again) on their next use.
                let outdated =
                    kept ? state.machine.connectedConnections.filter { $0.address != connection.address } : []
                return (kept, state.attempts.removeValue(forKey: attempt)?.promise, outdated)
            }
            guard kept else {
                connection.close()
                promise?.fail(RedisError.unavailable)
                return
            }
            self.logger.info("Redis connection up", metadata: ["redis.address": "\(connection.address)"])
            connection.closeFuture.whenComplete { _ in
                self.connectionClosed(connection)
            }
            for outdatedConnection in outdated {
                self.logger.notice(
                    "Closing a Redis connection to a former primary",
                    metadata: ["redis.address": "\(outdatedConnection.address)"]
                )
                outdatedConnection.close()
            }
            self.connectionStateChanged(true)
            promise?.succeed(connection)

        case .failure(let error):
            let (failure, promise) = self.state.withLock { state in
                let failure = state.machine.connectFailed(attempt, now: .now(), jitter: Double.random(in: 0...1))
                return (failure, state.attempts.removeValue(forKey: attempt)?.promise)
            }
            if let failure {
                let retryIn = failure.retryAfter - .now()
                var metadata: Logger.Metadata = [
                    "redis.error": "\(error)",
                    "redis.connect.failures": "\(failure.failures)",
                    "redis.connect.retry_in_ms": "\(max(retryIn.nanoseconds / 1_000_000, 0))",
                ]
                // Why, and where: refused, timed out, a name that did not resolve… (never credentials).
                if let cause = (error as? RedisError)?.connectFailure {
                    metadata["redis.cause"] = "\(cause.cause.rawValue)"
                    metadata["redis.address"] = "\(cause.address)"
                }
                // Log the transition once; repeated failures of an outage are debug noise.
                if failure.failures == 1 {
                    self.logger.warning("Redis connect failed", metadata: metadata)
                } else {
                    self.logger.debug("Redis connect failed again", metadata: metadata)
                }
            }
            self.connectionStateChanged(false)
            promise?.fail(RedisError.unavailable)
        }
    }

    private func connectionClosed(_ connection: RedisConnection) {
        let (wasPooled, isShutDown) = self.state.withLock { state in
            (state.machine.connectionClosed(connection), state.machine.isShutDown)
        }
        guard wasPooled, !isShutDown else {
            return
        }
        self.logger.notice("Redis connection down", metadata: ["redis.address": "\(connection.address)"])
        self.connectionStateChanged(false)
    }

    /// Closes every connection and ends connect attempts; later requests fail with ``RedisError/unavailable``.
    func shutDown() async {
        let (connections, tasks) = self.state.withLock { state in
            (state.machine.shutDown(), state.attempts.values.compactMap(\.task))
        }
        for task in tasks {
            task.cancel()
        }
        for task in tasks {
            await task.value
        }
        for connection in connections {
            connection.close()
        }
        for connection in connections {
            try? await connection.closeFuture.get()
        }
    }

    /// Closes every pooled connection (for example after a `READONLY` reply: the primary moved). Each slot
    /// reconnects, and so re-resolves the primary, on its next use.
    func closeAllConnections() {
        let connections = self.state.withLock { state in
            state.machine.connectedConnections
        }
        for connection in connections {
            connection.close()
        }
    }

    /// Closes every pooled connection whose peer is not `address` (`host:port`, as ``RedisConnection/address``
    /// writes it): the primary moved there. Each closed slot reconnects on its next use.
    @discardableResult
    func closeConnections(notTo address: String) -> Int {
        let connections = self.state.withLock { state in
            state.machine.connectedConnections.filter { $0.address != address }
        }
        for connection in connections {
            connection.close()
        }
        return connections.count
    }
}
