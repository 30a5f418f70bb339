// HummingbirdCore comes with Hummingbird; it holds the HTTP/1 server's configuration types.
import HummingbirdCore
import NIOCore

extension Gateway {
    /// The `Server` header of every answer.
    static let serverName = "token-gateway"

    /// The HTTP/1 server settings: the header limits of the configuration, and parser errors
    /// answered with the contract's error body (``MalformedRequestHandler``).
    var http1Configuration: HTTP1Channel.Configuration {
        let limit = self.configuration.maxHeaderSize
        let metrics = self.metrics
        return HTTP1Channel.Configuration(
            additionalChannelHandlers: [
                MalformedRequestHandler { metrics.countRequest(route: "unmatched", status: 400) }
            ],
            httpDecoderConfiguration: .init(
                maxHeaderFieldSize: limit, maxHeaderListSize: limit,
                maxHeaderFieldCount: self.configuration.maxHeaderCount))
    }

    /// The HTTP/1 server of a listener: ``http1Configuration``, client connections silent for
    /// `httpIdleTimeout` with no answer due closed (``IdleClientHandler``), and the routes this
    /// listener answers on the event loop when it can (`health`, `token`: ``FastAnswerHandler``)
    /// if fast answers are enabled.
    func httpServer(health: Bool, token: Bool) -> HTTPServerBuilder {
        let configuration = self.http1Configuration
        let logger = self.logger
        let closed = self.metrics.idleConnectionsClosed
        var fast: (@Sendable () -> FastAnswerHandler)?
        if self.fastAnswersEnabled, health || token {
            fast = { @Sendable in
                FastAnswerHandler(serverName: Self.serverName, logger: logger) {
                    self.fastAnswer($0, health: health, token: token)
                }
            }
        }
        let fastHandler = fast
        let idleTimeout = TimeAmount(self.configuration.httpIdleTimeout)
        return HTTPServerBuilder { responder in
            GatewayHTTP1Channel(
                http1: HTTP1Channel(responder: responder, configuration: configuration),
                makeIdleHandler: { IdleClientHandler(timeout: idleTimeout, closed: closed, logger: logger) },
                makeFastHandler: fastHandler)
        }
    }
}
