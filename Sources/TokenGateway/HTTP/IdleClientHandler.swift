import Logging
import Metrics
import NIOCore
import NIOHTTP1

/// Closes a client connection that has sent nothing for the idle timeout while no answer is due
/// to it: between requests (a kept-alive connection left open), or in the middle of a request's
/// head or body (a client that never finishes it). A connection whose request is complete and
/// being answered (a caller waiting for a token) is left alone however long that takes.
///
/// It sits in the HTTP/1 pipeline between the decoder and the request handlers (the fast answers
/// and Hummingbird's codec), so it sees every request and every answer; NIO's `IdleStateHandler`,
/// first in the pipeline, tells it when no byte has been read for the timeout.
final class IdleClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let closed: Counter
    private let logger: Logger
    /// Requests whose head has come and whose answer has not been fully written.
    private var answersDue = 0
    /// A request's head has come but not yet its end.
    private var reading = false

    init(closed: Counter, logger: Logger) {
        self.closed = closed
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head:
            self.answersDue += 1
            self.reading = true
        case .body:
            break
        case .end:
            self.reading = false
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) { self.answersDue = max(0, self.answersDue - 1) }
        context.write(data, promise: promise)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read else {
            return context.fireUserInboundEventTriggered(event)
        }
        // Silent while an answer is being worked on: the client waits, as it should.
        guard self.reading || self.answersDue == 0 else { return }
        self.closed.increment()
        self.logger.debug(
            "closed a client connection that sent nothing for the idle timeout",
            metadata: ["http.request_incomplete": "\(self.reading)"])
        context.close(promise: nil)
    }
}
