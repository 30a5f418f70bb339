import Logging
import NIOCore

/// One write to a Redis connection: the encoded commands and the promise for their `replyCount` replies.
struct RedisRequest: Sendable {
    /// One or more RESP-encoded commands.
    var payload: ByteBuffer
    /// Number of replies the commands produce (one per command; `SUBSCRIBE` produces one per channel).
    var replyCount: Int
    /// When the request fails with ``RedisError/timeout`` if not all replies have arrived.
    var deadline: NIODeadline
    /// Succeeds with the replies in order, or fails with a ``RedisError``.
    var promise: EventLoopPromise<[RedisValue]>
}

/// Pipelined request/reply handling on one connection: requests are answered strictly in order (a FIFO of
/// promises); hiredis parses the replies.
///
/// A request that times out keeps its place in the FIFO, so a late reply is consumed by it and never delivered
/// to a later caller. When a request times out and the server has been silent for `stallTimeout` while requests
/// were outstanding, the connection is considered dead (a half-open TCP connection is otherwise only noticed
/// after many minutes) and closed; every pending request then fails with `connectionLost` (it may have run). A server that is merely
/// slow for a while (a blocking command, a long script) keeps the connection.
///
/// With a `pushHandler`, the connection is a subscriber: `message` pushes go to the handler and everything else
/// (subscribe confirmations, `PING` answers) answers requests.
final class RedisChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = RedisRequest
    typealias OutboundOut = ByteBuffer

    private struct PendingRequest {
        let id: UInt64
        let promise: EventLoopPromise<[RedisValue]>
        var remainingReplies: Int
        var replies: [RedisValue]
        let writtenAt: NIODeadline
        var timeout: Scheduled<Void>?
        /// The caller was already answered (timeout); its replies are consumed and dropped.
        var abandoned: Bool
    }

    private let parser = RedisReplyParser()
    private let pushHandler: (@Sendable (RedisPubSubEvent) -> Void)?
    private let logger: Logger
    private let stallTimeout: TimeAmount
    private var pending = CircularBuffer<PendingRequest>(initialCapacity: 8)
    private var nextRequestID: UInt64 = 0
    private var lastReadAt = NIODeadline.uptimeNanoseconds(0)
    private var context: ChannelHandlerContext?
    /// Set once the channel is closing or closed; new requests fail immediately.
    private var isClosed = false

    init(logger: Logger, stallTimeout: TimeAmount, pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil) {
        self.logger = logger
        self.stallTimeout = stallTimeout
        self.pushHandler = pushHandler
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.failAll(with: .unavailable)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.failAll(with: .unavailable)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("Redis connection error", metadata: ["redis.error": "\(error)"])
        self.close(context: context, failingWith: .unavailable)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = self.unwrapOutboundIn(data)
        if self.isClosed {
            request.promise.fail(RedisError.unavailable)
            promise?.fail(RedisError.unavailable)
            return
        }
        let now = NIODeadline.now()
        if request.deadline <= now {
            request.promise.fail(RedisError.timeout)
            promise?.succeed()
            return
        }

        let id = self.nextRequestID
        self.nextRequestID &+= 1
        let timeout = context.eventLoop.assumeIsolated().scheduleTask(deadline: request.deadline) {
            self.requestTimedOut(id: id)
        }
        self.pending.append(
            PendingRequest(
                id: id,
                promise: request.promise,
                remainingReplies: request.replyCount,
                replies: [],
                writtenAt: now,
                timeout: timeout,
                abandoned: false
            )
        )

        // A write that fails leaves the server without the request while its promise waits in the FIFO: the
        // replies would no longer line up, so the connection must go.
        let writePromise = promise ?? context.eventLoop.makePromise()
        writePromise.futureResult.assumeIsolated().whenFailure { error in
            self.logger.debug("Redis write failed", metadata: ["redis.error": "\(error)"])
            self.close(context: context, failingWith: .unavailable)
        }
        context.write(self.wrapOutboundOut(request.payload), promise: writePromise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = self.unwrapInboundIn(data)
        self.lastReadAt = .now()
        do {
            try self.parser.feed(buffer)
            while let reply = try self.parser.next() {
                try self.deliver(reply)
                if self.isClosed {
                    return
                }
            }
        } catch let error where error.isServerError {
            // An error nobody asked for: the server refuses the connection as it closes it
            // (`maxclients` reached, protected mode). Its text says why; it holds no command argument.
            self.logger.warning("Redis refused the connection", metadata: ["redis.error": "\(error)"])
            self.close(context: context, failingWith: .unavailable)
        } catch {
            self.logger.warning("Redis sent an invalid or unexpected reply; closing the connection")
            self.close(context: context, failingWith: .protocolError)
        }
    }

    private func deliver(_ reply: RedisValue) throws(RedisError) {
        if let pushHandler, let event = Self.pubSubMessage(reply) {
            pushHandler(event)
            return
        }
        guard var request = self.pending.first else {
            if case .error(let message) = reply { throw .server(message) }
            throw .protocolError
        }
        request.replies.append(reply)
        request.remainingReplies -= 1
        if request.remainingReplies > 0 {
            self.pending[self.pending.startIndex] = request
            return
        }
        self.pending.removeFirst()
        request.timeout?.cancel()
        if !request.abandoned {
            request.promise.succeed(request.replies)
        }
    }

    /// `["message", channel, payload]` from a subscriber connection.
    private static func pubSubMessage(_ reply: RedisValue) -> RedisPubSubEvent? {
        guard case .array(let elements) = reply, elements.count == 3, elements[0].string == "message",
            let channel = elements[1].string, case .bulk(let payload) = elements[2]
        else {
            return nil
        }
        return .message(channel: channel, payload: String(decoding: payload, as: UTF8.self))
    }

    private func requestTimedOut(id: UInt64) {
        guard let index = self.pending.firstIndex(where: { $0.id == id }) else {
            return
        }
        self.pending[index].abandoned = true
        self.pending[index].timeout = nil
        self.pending[index].promise.fail(RedisError.timeout)
        // Silent since the oldest outstanding request was written, or since the last read after that.
        let silentSince = max(self.lastReadAt, self.pending[self.pending.startIndex].writtenAt)
        if NIODeadline.now() - silentSince >= self.stallTimeout, let context {
            self.logger.notice("Redis connection silent for too long with requests outstanding; closing it")
            self.close(context: context, failingWith: .unavailable)
        }
    }

    private func close(context: ChannelHandlerContext, failingWith error: RedisError) {
        guard !self.isClosed else {
            return
        }
        self.failAll(with: error)
        context.close(promise: nil)
    }

    /// Fails every pending request. Those were written, so a lost connection fails them with
    /// ``RedisError/connectionLost`` (they may have run), not ``RedisError/unavailable``.
    private func failAll(with reason: RedisError) {
        self.isClosed = true
        let error = reason == .unavailable ? RedisError.connectionLost : reason
        while let request = self.pending.popFirst() {
            request.timeout?.cancel()
            if !request.abandoned {
                request.promise.fail(error)
            }
        }
    }
}
