import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTPTypes

/// An answer the gateway can give as soon as a request's head has arrived, with no task and no
/// store: a cached token, or `GET /health/live`. ``FastAnswerHandler`` writes it.
struct FastAnswer: Sendable {
    /// The header fields of the route (`Content-Type`, `Cache-Control`); the handler adds
    /// `Content-Length`, `X-Request-Id`, `Date` and `Server` as every other answer has them.
    var fields: HTTPFields
    var body: ByteBuffer
    /// The route's template, as the router's metrics and request log name it.
    var route: String
    /// The request's Forge trace ids (`x-b3-traceid`, `x-b3-spanid`), for the request log.
    var traceID: String? = nil
    var spanID: String? = nil
}

/// Answers the requests ``FastAnswer``s exist for on the connection's event loop, in the HTTP/1
/// pipeline, before they reach Hummingbird's request loop (which hands each request to a task and
/// its answer back to the event loop). Every other request, and every request a fast answer cannot
/// serve in full (an error, a token not held, a query it does not know), goes on to the router
/// untouched, which answers it as before.
///
/// The answer is byte for byte the router's: the same body, the same header fields in the same
/// order, the same metrics and audit record (``Gateway/fastAnswer(_:health:token:)`` makes it from the
/// functions the routes use). Answers stay in request order: a request is answered here only
/// when no request passed on to the router is still being answered on this connection.
///
/// The handler sits after the HTTP/1 codec (Hummingbird's `additionalChannelHandlers`).
final class FastAnswerHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    typealias Answerer = @Sendable (HTTPRequest) -> FastAnswer?

    private let answerer: Answerer
    private let serverName: String
    /// Logs each answer at debug level as the router's observability middleware does; nil when
    /// the level is above debug.
    private let requestLogger: Logger?
    /// Requests passed on to the router whose answer has not been fully written.
    private var requestsInProgress = 0
    /// The request being read is answered here: its body parts are dropped, and at its end this
    /// answer is written.
    private var pending: FastAnswer?
    /// Answers written since the last flush (flushed when the read burst ends).
    private var unflushed = false
    private var date = HTTPDate()

    init(serverName: String, logger: Logger, answerer: @escaping Answerer) {
        self.serverName = serverName
        self.requestLogger = logger.logLevel <= .debug ? logger : nil
        self.answerer = answerer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            if self.requestsInProgress == 0, self.pending == nil, let answer = self.answerer(head) {
                self.pending = answer
                return
            }
            self.requestsInProgress += 1
            context.fireChannelRead(data)
        case .body:
            if self.pending != nil { return }
            context.fireChannelRead(data)
        case .end:
            guard let answer = self.pending else {
                context.fireChannelRead(data)
                return
            }
            self.pending = nil
            self.write(answer, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.unflushed {
            self.unflushed = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = self.unwrapOutboundIn(data) { self.requestsInProgress = max(0, self.requestsInProgress - 1) }
        context.write(data, promise: promise)
    }

    private func write(_ answer: FastAnswer, context: ChannelHandlerContext) {
        var fields = answer.fields
        fields.reserveCapacity(fields.count + 4)
        fields.append(HTTPField(name: .contentLength, value: String(answer.body.readableBytes)))
        let requestID = RequestID().description
        fields.append(HTTPField(name: .requestID, value: requestID))
        fields.append(HTTPField(name: .date, value: self.date.now()))
        fields.append(HTTPField(name: .server, value: self.serverName))
        context.write(self.wrapOutboundOut(.head(HTTPResponse(status: .ok, headerFields: fields))), promise: nil)
        context.write(self.wrapOutboundOut(.body(answer.body)), promise: nil)
        context.write(self.wrapOutboundOut(.end(nil)), promise: nil)
        self.unflushed = true
        if let logger = self.requestLogger {
            var metadata: Logger.Metadata = [
                "hb.request.id": .string(requestID), "http.request_id": .string(requestID), "http.method": "GET",
                "http.route": .string(answer.route), "http.status": "200",
            ]
            if let trace = answer.traceID { metadata["trace.id"] = .string(String(trace.prefix(64))) }
            if let span = answer.spanID { metadata["span.id"] = .string(String(span.prefix(64))) }
            logger.debug("request", metadata: metadata)
        }
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
        let days = unixSeconds >= 0 ? unixSeconds / 86400 : (unixSeconds - 86399) / 86400
        let secondsOfDay = unixSeconds - days * 86400
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        let weekday = Int((days % 7 + 11) % 7)  // 1970-01-01 was a Thursday
        let names = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ v: Int64) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(names[weekday]), \(two(day)) \(months[Int(month) - 1]) \(year) "
            + "\(two(secondsOfDay / 3600)):\(two(secondsOfDay % 3600 / 60)):\(two(secondsOfDay % 60)) GMT"
    }
}
