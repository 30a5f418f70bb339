import Logging
import Metrics
import NIOCore
import NIOHTTP1

/// Closes a client connection that has sent nothing for the idle timeout while no answer is due
/// to it: between requests (a kept-alive connection left open; counted from the end of the last
/// answer), or in the middle of a request's head or body (a client that never finishes it). A
/// request's head must also arrive whole within the idle timeout of the connection's opening or
/// the last answer's end, and its body within the idle timeout of its head (of the end of the
/// answer before it, for a pipelined request read while that answer was due): a client that
/// trickles them a byte now and then is cut off too. (The decoder hands on a head only once it is
/// complete, so a head's bytes never count as activity.) A connection with a complete request being answered (a caller waiting for its
/// token) is left alone however long that takes.
///
/// A client that stops reading its answers is closed too: once the channel has stayed unwritable
/// (answers waiting beyond the write buffer's high watermark) for the idle timeout with none of
/// what waits taken, whatever is due to it. (A slow client still reading a large answer is not.)
///
/// It sits in the HTTP/1 pipeline between the decoder and the request handlers (the fast answers
/// and Hummingbird's codec), so it sees every request and every answer. (Hummingbird's own idle
/// timeout sits behind its codec and would not see the fast answers.)
final class IdleClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let timeout: TimeAmount
    private let closed: Counter
    private let logger: Logger
    /// Requests whose head has come and whose answer has not been fully written.
    private var answersDue = 0
    /// A request's head has come but not yet its end.
    private var reading = false
    /// The last request part read or answer ended: idleness counts from there.
    private var lastActivity = NIODeadline.now()
    /// When the head of the request being read came: its body must be in by the timeout after it.
    private var requestBegan = NIODeadline.now()
    private var check: Scheduled<Void>?
    /// Since when the channel has been unwritable with no progress (its answers not read), if it is.
    private var unwritableSince: NIODeadline?
    /// The bytes waiting to be written then: fewer later means the client reads.
    private var waitingBytes = 0

    init(timeout: TimeAmount, closed: Counter, logger: Logger) {
        self.timeout = timeout
        self.closed = closed
        self.logger = logger
    }

    /// No complete request waits for its answer: only a request still being read, if any.
    private var nothingToAnswer: Bool { self.answersDue == 0 || (self.reading && self.answersDue == 1) }

    /// When the connection is closed unless something happens first (while no answer is due): the
    /// idle timeout after the last activity, and for a request being read, after its head.
    private var due: NIODeadline {
        (self.reading ? self.requestBegan : self.lastActivity) + self.timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.lastActivity = .now()
        self.schedule(context, at: self.due)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.check?.cancel()
        self.check = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.lastActivity = .now()
        switch self.unwrapInboundIn(data) {
        case .head:
            self.answersDue += 1
            self.reading = true
            self.requestBegan = self.lastActivity
        case .body:
            break
        case .end:
            self.reading = false
        }
        context.fireChannelRead(data)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.unwritableSince = nil
        } else if self.unwritableSince == nil {
            let since = NIODeadline.now()
            self.unwritableSince = since
            self.waitingBytes = Self.waitingBytes(context)
            self.schedule(context, at: since + self.timeout)
        }
        context.fireChannelWritabilityChanged()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) {
            self.answersDue = max(0, self.answersDue - 1)
            self.lastActivity = .now()
            // A pipelined request read meanwhile has its whole timeout from here, when it is next.
            // (Not when the answer was to that very request, given before its body was in.)
            if self.reading && self.answersDue > 0 { self.requestBegan = max(self.requestBegan, self.lastActivity) }
            if self.nothingToAnswer { self.schedule(context, at: self.due) }
        }
        context.write(data, promise: promise)
    }

    /// The bytes written to the channel and not yet taken by the socket.
    private static func waitingBytes(_ context: ChannelHandlerContext) -> Int {
        (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
    }

    /// Checks at `deadline` (one check pending at a time; a later activity moves the next one).
    private func schedule(_ context: ChannelHandlerContext, at deadline: NIODeadline) {
        guard self.check == nil else { return }
        self.check = context.eventLoop.assumeIsolatedUnsafeUnchecked().scheduleTask(deadline: deadline) {
            self.check = nil
            self.timeUp(context)
        }
    }

    private func timeUp(_ context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        // Answers the client does not read: closed once they have waited the idle timeout.
        if var since = self.unwritableSince, !context.channel.isWritable {
            let waiting = Self.waitingBytes(context)
            if waiting < self.waitingBytes {
                // The client took some of it: a slow reader, not a stopped one. Counted afresh.
                since = NIODeadline.now()
                self.unwritableSince = since
            }
            self.waitingBytes = waiting
            guard NIODeadline.now() >= since + self.timeout else {
                return self.schedule(context, at: since + self.timeout)
            }
            self.closed.increment()
            self.logger.debug("closed a client connection that read no answer for the idle timeout")
            return context.close(promise: nil)
        }
        // A complete request is being answered: the client waits, as it should. The answer's end
        // schedules the next check.
        guard self.nothingToAnswer else { return }
        let due = self.due
        guard NIODeadline.now() >= due else { return self.schedule(context, at: due) }
        self.closed.increment()
        self.logger.debug(
            "closed a client connection that sent nothing for the idle timeout",
            metadata: ["http.request_incomplete": "\(self.reading)"])
        context.close(promise: nil)
    }
}
