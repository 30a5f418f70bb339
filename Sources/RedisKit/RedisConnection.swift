import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

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
    ///   - tls: when set, the TLS handshake (with the server's certificate verified) completes before the
    ///     connection is returned; ``RedisChannelHandler`` sits behind the `NIOSSLClientHandler`.
    ///   - pushHandler: set for a subscriber connection; receives pushed messages on the event loop.
    /// - Throws: ``RedisConnectError`` (the reason, without secrets).
    static func connect(
        host: String,
        port: Int,
        tls: RedisTLS? = nil,
        eventLoop: any EventLoop,
        deadline: NIODeadline,
        stallTimeout: TimeAmount,
        logger: Logger,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil
    ) async throws(RedisConnectError) -> RedisConnection {
        let remaining = deadline - .now()
        guard remaining > .zero else {
            throw RedisConnectError(kind: .timeout, detail: "no time left to connect")
        }
        let address = hostPortDescription(host: host, port: port)
        let handshake = eventLoop.makePromise(of: Void.self)
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(remaining)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        // An IP address is not a valid SNI name; then NIOSSL verifies the peer's IP address instead.
                        let name = tls.serverName ?? host
                        let serverHostname = Self.isIPAddress(name) ? nil : name
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: tls.context, serverHostname: serverHostname)
                        )
                        try channel.pipeline.syncOperations.addHandler(RedisTLSHandshakeHandler(handshake: handshake))
                    } else {
                        handshake.succeed()
                    }
                    try channel.pipeline.syncOperations.addHandler(
                        RedisChannelHandler(logger: logger, stallTimeout: stallTimeout, pushHandler: pushHandler)
                    )
                }
            }
        let channel: any Channel
        let connecting = bootstrap.connect(host: host, port: port)
        do {
            // Cancellable: a connect to a host that drops packets would otherwise hold its caller until the
            // connect timeout. A connection that completes after its caller gave up is closed.
            channel = try await connecting.awaitRedisResult()
        } catch {
            handshake.fail(error)
            if error is CancellationError {
                connecting.whenSuccess { $0.close(promise: nil) }
                throw RedisConnectError(kind: .connect, detail: "cancelled")
            }
            throw RedisConnectError(kind: RedisConnectError.kind(of: error), detail: "\(error)")
        }
        do {
            try await handshake.futureResult.awaitRedisResult(deadline: deadline, timeoutError: .timeout)
        } catch {
            channel.close(promise: nil)
            if (error as? RedisError) == RedisError.timeout {
                throw RedisConnectError(kind: .timeout, detail: "the TLS handshake did not finish in time")
            }
            // The caller gave up (a sentinel outrun by another): no TLS problem to report.
            if error is CancellationError { throw RedisConnectError(kind: .connect, detail: "cancelled") }
            throw RedisConnectError(kind: .tls, detail: "\(error)")
        }
        return RedisConnection(channel: channel, address: address)
    }

    private static func isIPAddress(_ host: String) -> Bool {
        (try? SocketAddress(ipAddress: host, port: 0)) != nil
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

/// Why a connection could not be opened. The detail is the network or TLS library's message; it never holds
/// credentials.
struct RedisConnectError: Error, CustomStringConvertible {
    enum Kind {
        /// Nothing listens at the address (`ECONNREFUSED`).
        case refused
        /// The host name did not resolve.
        case nameNotResolved
        /// TCP connect failed otherwise (unreachable, reset, cancelled).
        case connect
        /// The TLS handshake failed (for example the server's certificate did not verify).
        case tls
        case timeout
    }

    let kind: Kind
    let detail: String

    /// The kind of a failed TCP connect, from SwiftNIO's error.
    static func kind(of error: any Error) -> Kind {
        if case ChannelError.connectTimeout = error {
            return .timeout
        }
        if let error = error as? IOError {
            return error.errnoCode == ECONNREFUSED ? .refused : .connect
        }
        guard let error = error as? NIOConnectionError else {
            return .connect
        }
        let failures = error.connectionErrors.map(\.error)
        if failures.isEmpty, error.dnsAError != nil || error.dnsAAAAError != nil {
            return .nameNotResolved
        }
        if failures.contains(where: { ($0 as? IOError)?.errnoCode == ECONNREFUSED }) {
            return .refused
        }
        if failures.contains(where: { if case ChannelError.connectTimeout = $0 { true } else { false } }) {
            return .timeout
        }
        return .connect
    }

    /// The cause a connect failure is reported with.
    var cause: RedisConnectFailure.Cause {
        switch self.kind {
        case .refused: .refused
        case .nameNotResolved: .dns
        case .connect: .network
        case .tls: .tls
        case .timeout: .timeout
        }
    }

    var description: String {
        switch self.kind {
        case .refused: "connection refused: \(self.detail)"
        case .nameNotResolved: "name not resolved: \(self.detail)"
        case .connect: "connect failed: \(self.detail)"
        case .tls: "TLS handshake failed: \(self.detail)"
        case .timeout: "connect timed out: \(self.detail)"
        }
    }
}

/// Completes `handshake` when the TLS handshake has finished, or fails it with the handshake's error (or when
/// the connection closes first). Sits right behind the `NIOSSLClientHandler`.
final class RedisTLSHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let handshake: EventLoopPromise<Void>

    init(handshake: EventLoopPromise<Void>) {
        self.handshake = handshake
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tlsEvent = event as? TLSUserEvent, case .handshakeCompleted = tlsEvent {
            self.handshake.succeed()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.handshake.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.handshake.fail(RedisError.unavailable)
        context.fireChannelInactive()
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
