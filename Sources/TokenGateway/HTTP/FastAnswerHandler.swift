import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypesHTTP1

/// A request the fast answers look at: its target and the few header fields they read.
struct FastRequest: Sendable {
    /// The request target as sent (origin form).
    var target: String
    /// The `Authorization` field, when the request has exactly one.
    var authorization: String?
}

/// An answer the gateway can give as soon as a request's head has arrived, with no task and no
/// store: a cached token, or `GET /health/live`. ``FastAnswerHandler`` writes it.
struct FastAnswer: Sendable {
    /// The route's header fields (`Content-Type`, `Cache-Control`); the handler adds
    /// `Content-Length`, `X-Request-Id`, `Date` and `Server` as every other answer has them.
    var fields: [(String, String)]
    var body: ByteBuffer
    /// The route's template, as the router's metrics and request log name it.
    var route: String
}

/// Answers the requests ``FastAnswer``s exist for on the connection's event loop, in the HTTP/1
/// pipeline between the HTTP/1 decoder and Hummingbird's codec, before they reach Hummingbird's
/// request loop (which hands each request to a task and its answer back to the event loop).
/// Every other request, and every request a fast answer cannot serve in full (an error, a token
/// not held, a query it does not read, a header it does not handle), goes on untouched, and the
/// router answers it as before.
///
/// The answer is byte for byte the router's: the same body, the same header fields in the same
/// order, the same metrics, audit record and debug request log (``Gateway/fastAnswer(_:health:token:)``
/// makes it from the functions the routes use). Answers stay in request order: a request is
/// answered here only when no request passed on to the router is still being answered on this
/// connection.
///
/// A fast answer is written at once, so a client that sends requests without reading answers
/// would have them queue up without bound: the connection reads no more while its answers wait
/// beyond the channel's write-buffer high watermark, and again once they drain.
final class FastAnswerHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    typealias Answerer = @Sendable (FastRequest) -> FastAnswer?

    private let answerer: Answerer
    private let serverName: String
    /// Logs each answer at debug level as the router's observability middleware does; nil when
    /// the level is above debug.
    private let requestLogger: Logger?
    /// Requests passed on to the router whose answer has not been fully written.
    private var requestsInProgress = 0
    /// The request being read is answered here: its body parts are dropped, and at its end this
    /// answer is written.
    private var pending: (answer: FastAnswer, head: HTTPRequestHead)?
    /// Answers written since the last flush (flushed when the read burst ends).
    private var unflushed = false
    private var date = HTTPDate()
    /// A read asked for while the channel was not writable, issued once it is again.
    private var readHeld = false

    init(serverName: String, logger: Logger, answerer: @escaping Answerer) {
        self.serverName = serverName
        self.requestLogger = logger.logLevel <= .debug ? logger : nil
        self.answerer = answerer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            // Not while answers already wait unread: requests read in one burst before reads were
            // held would each queue an answer; the router writes only as the client reads.
            if self.requestsInProgress == 0, self.pending == nil, context.channel.isWritable,
                let request = Self.fastRequest(head), let answer = self.answerer(request)
            {
                self.pending = (answer, head)
                return
            }
            self.requestsInProgress += 1
            context.fireChannelRead(data)
        case .body:
            if self.pending != nil { return }
            context.fireChannelRead(data)
        case .end:
            guard let pending = self.pending else {
                context.fireChannelRead(data)
                return
            }
            self.pending = nil
            self.write(pending.answer, for: pending.head, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.unflushed {
            self.unflushed = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        guard context.channel.isWritable else {
            self.readHeld = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if self.readHeld, context.channel.isWritable {
            self.readHeld = false
            context.read()
        }
        context.fireChannelWritabilityChanged()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) { self.requestsInProgress = max(0, self.requestsInProgress - 1) }
        context.write(data, promise: promise)
    }

    /// The request when it is one a fast answer may take: `GET` over HTTP/1.1 in origin form,
    /// without a body and without connection handling of its own (`Expect`, a `Connection` other
    /// than `keep-alive`), with at most one `Authorization` field.
    static func fastRequest(_ head: HTTPRequestHead) -> FastRequest? {
        guard head.method == .GET, head.version == .http1_1, head.uri.utf8.first == UInt8(ascii: "/") else {
            return nil
        }
        var authorization: String?
        for field in head.headers {
            switch field.name.utf8.count {
            case 6 where field.name.lowercased() == "expect": return nil
            case 10 where field.name.lowercased() == "connection":
                // Keep-alive is what the router does anyway; `close`, `upgrade` and the rest are its own.
                if field.value.lowercased() != "keep-alive" { return nil }
            case 13 where field.name.lowercased() == "authorization":
                if authorization != nil { return nil }
                authorization = field.value
            case 14 where field.name.lowercased() == "content-length": if field.value != "0" { return nil }
            case 17 where field.name.lowercased() == "transfer-encoding": return nil
            default: break
            }
        }
        return FastRequest(target: head.uri, authorization: authorization)
    }

    private func write(_ answer: FastAnswer, for head: HTTPRequestHead, context: ChannelHandlerContext) {
        var headers = HTTPHeaders(answer.fields)
        let requestID = RequestID().description
        headers.add(name: "Content-Length", value: String(answer.body.readableBytes))
        headers.add(name: "X-Request-Id", value: requestID)
        headers.add(name: "Date", value: self.date.now())
        headers.add(name: "Server", value: self.serverName)
        let responseHead = HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)
        context.write(self.wrapOutboundOut(.head(responseHead)), promise: nil)
        context.write(self.wrapOutboundOut(.body(.byteBuffer(answer.body))), promise: nil)
        context.write(self.wrapOutboundOut(.end(nil)), promise: nil)
        self.unflushed = true
        if let logger = self.requestLogger {
            var metadata: Logger.Metadata = [
                "hb.request.id": .string(requestID), "http.request_id": .string(requestID), "http.method": "GET",
                "http.route": .string(answer.route), "http.status": "200",
            ]
            if let trace = head.headers.first(name: "x-b3-traceid") {
                metadata["trace.id"] = .string(String(trace.prefix(64)))
            }
            if let span = head.headers.first(name: "x-b3-spanid") {
                metadata["span.id"] = .string(String(span.prefix(64)))
            }
            logger.debug("request", metadata: metadata)
        }
    }
}

/// Hummingbird's HTTP/1 child channel with the gateway's handlers put into each connection's
/// pipeline right before Hummingbird's codec (`HTTP1ToHTTPServerCodec`): an ``IdleClientHandler``,
/// then, when fast answers are on, a
/// ``FastAnswerHandler``, so fast answers skip the conversion of every request and answer to HTTP
/// types too. The rest of the pipeline is Hummingbird's own.
struct GatewayHTTP1Channel: ServerChildChannel {
    typealias Value = HTTP1Channel.Value

    let http1: HTTP1Channel
    let makeIdleHandler: @Sendable () -> IdleClientHandler
    let makeFastHandler: (@Sendable () -> FastAnswerHandler)?

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        self.http1.setup(channel: channel, logger: logger).flatMapThrowing { value in
            let pipeline = channel.pipeline.syncOperations
            let codec = try pipeline.handler(type: HTTP1ToHTTPServerCodec.self)
            try pipeline.addHandler(ConnectionCloseHandler(), position: .before(codec))
            try pipeline.addHandler(self.makeIdleHandler(), position: .before(codec))
            if let makeFastHandler = self.makeFastHandler {
                try pipeline.addHandler(makeFastHandler(), position: .before(codec))
            }
            return value
        }
    }

    func handle(value: Value, logger: Logger) async {
        await self.http1.handle(value: value, logger: logger)
    }
}

/// The `Date` header's value (RFC 9110 IMF-fixdate), written once per second.
struct HTTPDate {
    private var second: Int = -1
    private var text = ""

    mutating func now() -> String {
        let second = time(nil)
        if second != self.second {
            self.second = second
            self.text = Self.string(unixSeconds: Int64(second))
        }
        return self.text
    }

    static func string(unixSeconds: Int64) -> String {
        var t = time_t(unixSeconds)
        var tm = tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return
            "\(Self.weekdays[Int(tm.tm_wday)]), \(two(tm.tm_mday)) \(Self.months[Int(tm.tm_mon)]) \(tm.tm_year + 1900) "
            + "\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec)) GMT"
    }

    private static let weekdays = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
}
