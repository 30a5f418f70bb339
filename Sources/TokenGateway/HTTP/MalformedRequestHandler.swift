import HTTPTypes
import NIOCore
// NIOHTTP1 (for `HTTPParserError`) and NIOHTTPTypes (for the HTTP parts) come with Hummingbird,
// whose HTTP/1 server pipeline this handler is part of.
import NIOHTTP1
import NIOHTTPTypes

/// Answers a request the HTTP/1 parser refused (headers over the size limit, a malformed request
/// line or header, …) with the contract's error body (`400 invalid_request`), then closes the
/// connection.
///
/// Without it Hummingbird answers such a request with a bare `400` and no body. The handler sits
/// after the HTTP/1 codec (Hummingbird's `additionalChannelHandlers`). It answers only when no
/// request is in progress on the connection: a parser error in the middle of a request (after its
/// head) is left to Hummingbird, so two answers can never interleave.
///
/// The close lingers: after the answer the gateway stops writing (half-close) but reads and drops
/// what the client still sends, for at most ``lingerTime``, then closes. Closing at once would make
/// the kernel reset the connection while the client is still sending its oversized head, and the
/// client would lose the answer.
final class MalformedRequestHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    /// Longest time input is drained after the answer.
    static let lingerTime: TimeAmount = .seconds(2)

    /// Told of each answer given here (for `token_gateway_http_requests_total`, route `unmatched`).
    private let answeredOne: @Sendable () -> Void
    /// Requests whose head arrived and whose answer has not been fully written.
    private var requestsInProgress = 0
    /// The connection was answered here and is being closed: everything inbound is dropped.
    private var answered = false

    init(answered: @escaping @Sendable () -> Void = {}) {
        self.answeredOne = answered
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if self.answered { return }
        if case .head = self.unwrapInboundIn(data) { self.requestsInProgress += 1 }
        context.fireChannelRead(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The client finished sending while the connection lingers: close it now.
        if self.answered, let channelEvent = event as? ChannelEvent, case .inputClosed = channelEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) { self.requestsInProgress = max(0, self.requestsInProgress - 1) }
        context.write(data, promise: promise)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // While lingering, the parser reports every further read as an error: drop them.
        if self.answered { return }
        guard let parserError = error as? HTTPParserError, self.requestsInProgress == 0 else {
            context.fireErrorCaught(error)
            return
        }
        self.answered = true
        self.answeredOne()
        let message =
            parserError == .headerOverflow
            ? "request headers are too large" : "malformed HTTP request"
        let body = GatewayError.invalidRequest(message).body
        let head = HTTPResponse(
            status: .badRequest,
            headerFields: [
                .contentType: "application/json", .cacheControl: "no-store", .connection: "close",
                .contentLength: String(body.readableBytes),
            ])
        context.write(self.wrapOutboundOut(.head(head)), promise: nil)
        context.write(self.wrapOutboundOut(.body(body)), promise: nil)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { result in
            let context = loopBound.value
            guard case .success = result else {
                context.close(promise: nil)
                return
            }
            context.close(mode: .output, promise: nil)
            context.eventLoop.scheduleTask(in: Self.lingerTime) { loopBound.value.close(promise: nil) }
        }
    }
}
