import Logging
import NIOCore
import NIOPosix

/// One TCP connection to a Redis server (or sentinel), with pipelined requests.
final class RedisConnection: Sendable {
    /// The underlying channel; its pipeline ends with a ``RedisChannelHandler``.
    let channel: any Channel
    /// `host:port` of the peer, for logs.
    let address: String

    private init(channel: any Channel, address: String) {
        self.channel = channel
        self.address = address
    }

    /// Opens a TCP connection (nothing is sent yet).
    ///
    /// - Parameters:
    ///   - deadline: the connect attempt fails with ``RedisError/unavailable`` if not connected by then.
    ///   - stallTimeout: how long the server may stay silent with requests outstanding before a timed-out
    ///     request closes the connection (see ``RedisChannelHandler``).
    ///   - pushHandler: set for a subscriber connection; receives pushed messages on the event loop.
    /// - Throws: ``RedisError/unavailable`` (the underlying reason is logged at debug level).
    static func connect(
        host: String,
        port: Int,
        eventLoop: any EventLoop,
        deadline: NIODeadline,
        stallTimeout: TimeAmount,
        logger: Logger,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil
    ) async throws -> RedisConnection {
        let remaining = deadline - .now()
        guard remaining > .zero else {
            throw RedisError.unavailable
        }
        let address = hostPortDescription(host: host, port: port)
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(remaining)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        RedisChannelHandler(logger: logger, stallTimeout: stallTimeout, pushHandler: pushHandler)
                    )
                }
            }
        do {
            let channel = try await bootstrap.connect(host: host, port: port).get()
            return RedisConnection(channel: channel, address: address)
        } catch {
            logger.debug(
                "Redis connect failed",
                metadata: ["redis.address": "\(address)", "redis.error": "\(error)"]
            )
            throw RedisError.unavailable
        }
    }

    /// Writes an encoded request; the future succeeds with `replyCount` replies in order (error replies included)
    /// or fails with ``RedisError``.
    ///
    /// `onSuccess` runs on the event loop as soon as the replies are complete, before any later reply or push on
    /// this connection is processed.
    func send(
        _ payload: ByteBuffer,
        replyCount: Int,
        deadline: NIODeadline,
        onSuccess: (@Sendable ([RedisValue]) -> Void)? = nil
    ) -> EventLoopFuture<[RedisValue]> {
        let promise = self.channel.eventLoop.makePromise(of: [RedisValue].self)
        if let onSuccess {
            // Registered before the write is issued (both hop to the event loop in order), so it cannot miss
            // the moment of completion.
            promise.futureResult.whenSuccess(onSuccess)
        }
        let request = RedisRequest(payload: payload, replyCount: replyCount, deadline: deadline, promise: promise)
        // If the handler is already gone (channel closed), the write fails without reaching it.
        self.channel.writeAndFlush(request).whenFailure { _ in
            promise.fail(RedisError.unavailable)
        }
        return promise.futureResult
    }

    /// Sends `commands` pipelined and waits for their replies (error replies are returned, not thrown).
    ///
    /// - Throws: ``RedisError/timeout``, ``RedisError/unavailable``, ``RedisError/protocolError``, or
    ///   `CancellationError` when the task is cancelled (the reply is then dropped when it arrives).
    func send(_ commands: [[String]], deadline: NIODeadline) async throws -> [RedisValue] {
        var payload = self.channel.allocator.buffer(capacity: 64 * commands.count)
        for command in commands {
            RedisCommandEncoder.encode(command, into: &payload)
        }
        return try await self.send(payload, replyCount: commands.count, deadline: deadline).awaitRedisResult()
    }

    /// Closes the connection; pending requests fail with ``RedisError/unavailable``.
    func close() {
        self.channel.close(promise: nil)
    }

    /// Completes when the connection is closed, for whatever reason.
    var closeFuture: EventLoopFuture<Void> {
        self.channel.closeFuture
    }
}

extension EventLoopFuture where Value: Sendable {
    /// Waits for the future; cancelling the waiting task fails the wait with `CancellationError` (the operation
    /// itself goes on and its result is dropped).
    func awaitRedisResult() async throws -> Value {
        let promise = self.eventLoop.makePromise(of: Value.self)
        self.cascade(to: promise)
        return try await withTaskCancellationHandler {
            try await promise.futureResult.get()
        } onCancel: {
            promise.fail(CancellationError())
        }
    }

    /// Waits for the future until `deadline`; then fails with `timeoutError` (the operation goes on).
    func awaitRedisResult(deadline: NIODeadline, timeoutError: RedisError) async throws -> Value {
        let promise = self.eventLoop.makePromise(of: Value.self)
        self.cascade(to: promise)
        let timer = self.eventLoop.scheduleTask(deadline: deadline) {
            promise.fail(timeoutError)
        }
        defer { timer.cancel() }
        return try await withTaskCancellationHandler {
            try await promise.futureResult.get()
        } onCancel: {
            promise.fail(CancellationError())
        }
    }
}
