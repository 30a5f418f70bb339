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
/// request is in progress on the connection, so two answers can never interleave. A parser error
/// while one is in progress is passed on (a route reading the body gets it: 400 `invalid_request`),
/// and the bare `400` Hummingbird then writes is rewritten: into the contract's error body when
/// the error came after that request's end (a malformed request behind it), or dropped when it
/// came inside that request's body (its route has answered it already: one answer per request),
/// the connection closing either way.
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
    /// A request's head was passed on and its end not yet read.
    private var bodyOpen = false
    /// What to make of the bare `400` Hummingbird writes after a parser error passed on to it.
    private var bareAnswer: BareAnswer = .none

    private enum BareAnswer {
        case none
        /// The error came after the last request's end: a malformed request of its own, answered
        /// with the contract's error body.
        case answer
        /// The error came inside a request's body: that request is answered by its route; the
        /// bare answer is dropped and the connection closed.
        case drop
        /// The bare answer's head was replaced by the contract's answer: the rest is not written.
        case replaced
        /// The bare answer's head was dropped: the rest is not written, its end closes the connection.
        case dropped
    }

    init(answered: @escaping @Sendable () -> Void = {}) {
        self.answeredOne = answered
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if self.answered { return }
        switch self.unwrapInboundIn(data) {
        case .head:
            self.requestsInProgress += 1
            self.bodyOpen = true
        case .end: self.bodyOpen = false
        case .body: break
        }
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
        let part = self.unwrapOutboundIn(data)
        switch (self.bareAnswer, part) {
        case (.answer, .head(let head)) where Self.isBare(head):
            // Hummingbird's answer to the malformed request behind the last one: the contract's.
            self.bareAnswer = .replaced
            promise?.succeed(())
            self.answer(context: context, message: "malformed HTTP request")
        case (.drop, .head(let head)) where Self.isBare(head):
            // A second answer to a request its route answered: not written.
            self.bareAnswer = .dropped
            promise?.succeed(())
        case (.replaced, _), (.dropped, .body):
            promise?.succeed(())
        case (.dropped, .end):
            self.bareAnswer = .none
            self.answered = true
            promise?.succeed(())
            context.close(promise: nil)
        default:
            if case .end = part { self.requestsInProgress = max(0, self.requestsInProgress - 1) }
            context.write(data, promise: promise)
        }
    }

    /// Hummingbird's answer to a parser error: 400, no body, `connection: close` (no route's
    /// answer has that shape: every error of the gateway's has a body).
    private static func isBare(_ head: HTTPResponse) -> Bool {
        head.status == .badRequest && head.headerFields[.contentLength] == "0" && head.headerFields[.contentType] == nil
            && head.headerFields[.connection] == "close"
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // While lingering, the parser reports every further read as an error: drop them.
        if self.answered { return }
        guard let parserError = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        guard self.requestsInProgress == 0 else {
            if case .none = self.bareAnswer { self.bareAnswer = self.bodyOpen ? .drop : .answer }
            context.fireErrorCaught(error)
            return
        }
        self.answer(
            context: context,
            message: parserError == .headerOverflow ? "request headers are too large" : "malformed HTTP request")
    }

    /// Writes the contract's 400 `invalid_request` with `message`, then closes the connection
    /// (lingering).
    private func answer(context: ChannelHandlerContext, message: String) {
        self.answered = true
        self.answeredOne()
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
