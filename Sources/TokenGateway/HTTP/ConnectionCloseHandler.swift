import NIOCore
import NIOHTTP1

/// Ends a connection after the answer to a request that asks for it (RFC 9112 §9.3, §9.6): an
/// HTTP/1.0 request without `keep-alive`, or a `Connection: close` in any letter case. Hummingbird
/// closes only on a field that reads exactly `close` and cannot tell HTTP/1.0 from HTTP/1.1, so
/// such a request's `Connection` field is written as `close` on its way in, and its answer says
/// `Connection: close` on its way out.
///
/// A request asking to leave HTTP/1 (`CONNECT`, or `Connection: upgrade` with an `Upgrade` field,
/// such as h2c) is answered with `Connection: close`, and the connection is closed once that answer
/// is written: the gateway never switches protocols, and NIO's parser reads nothing more after
/// such a request, so what the client sends next would only pile up unread.
///
/// Sits in the HTTP/1 pipeline right after the codec's decoder and encoder, before every other
/// handler of the gateway's, so it sees every request head and every answer head, in order.
final class ConnectionCloseHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// One entry per request whose answer's head is not written yet: whether it closes the connection.
    private var closes = CircularBuffer<Bool>(initialCapacity: 4)
    /// A request asking to leave HTTP/1 was read: the last one the parser reads.
    private var upgradeRequested = false
    /// The answer being written is the upgrade request's: the connection closes after its end.
    private var closeAfterAnswer = false
    /// That answer is written: the connection is closing.
    private var lingering = false

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The client finished sending while the connection lingers: close it now.
        if self.lingering, let channelEvent = event as? ChannelEvent, case .inputClosed = channelEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(var head) = self.unwrapInboundIn(data) else {
            context.fireChannelRead(data)
            return
        }
        let upgrade = Self.asksToLeaveHTTP1(head)
        if upgrade { self.upgradeRequested = true }
        let closes = !head.isKeepAlive || upgrade
        self.closes.append(closes)
        if closes, head.headers["connection"] != ["close"] {
            head.headers.replaceOrAdd(name: "connection", value: "close")
            context.fireChannelRead(self.wrapInboundOut(.head(head)))
            return
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if self.closeAfterAnswer, case .end = self.unwrapOutboundIn(data) {
            self.closeAfterAnswer = false
            self.lingering = true
            let written = promise ?? context.eventLoop.makePromise()
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            written.futureResult.whenComplete { result in
                let context = loopBound.value
                guard case .success = result else { return context.close(promise: nil) }
                // The close lingers, as a malformed request's does: writing stops (the answer
                // reaches the client whole), what it still sends is left unread for a moment, then
                // the connection is closed. Closing at once, with input unread, would reset it.
                context.close(mode: .output, promise: nil)
                context.eventLoop.scheduleTask(in: MalformedRequestHandler.lingerTime) {
                    loopBound.value.close(promise: nil)
                }
            }
            context.write(data, promise: written)
            return
        }
        // An interim answer (1xx) is not the request's answer; an answer to no request (a parser
        // error's) closes the connection on its own.
        guard case .head(var head) = self.unwrapOutboundIn(data), head.status.code >= 200, !self.closes.isEmpty
        else {
            context.write(data, promise: promise)
            return
        }
        let closes = self.closes.removeFirst()
        if self.closes.isEmpty, self.upgradeRequested { self.closeAfterAnswer = true }
        if closes, !head.headers.contains(name: "connection") {
            head.headers.add(name: "Connection", value: "close")
            context.write(self.wrapOutboundOut(.head(head)), promise: promise)
            return
        }
        context.write(data, promise: promise)
    }

    /// `CONNECT`, or `Connection: upgrade` with an `Upgrade` field: what NIO's parser (llhttp)
    /// takes for a protocol switch, after which it parses nothing more.
    static func asksToLeaveHTTP1(_ head: HTTPRequestHead) -> Bool {
        if head.method == .CONNECT { return true }
        guard head.headers.contains(name: "upgrade") else { return false }
        return head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" }
    }
}
