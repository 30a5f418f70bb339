// HummingbirdCore comes with Hummingbird; it holds the HTTP/1 server's configuration types.
import HummingbirdCore

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

    /// The HTTP/1 server of a listener: ``http1Configuration``, and the routes this listener
    /// answers on the event loop when it can (`health`, `token`: ``FastAnswerHandler``) if fast
    /// answers are enabled.
    func httpServer(health: Bool, token: Bool) -> HTTPServerBuilder {
        let configuration = self.http1Configuration
        guard self.fastAnswersEnabled, health || token else { return .http1(configuration: configuration) }
        let logger = self.logger
        return HTTPServerBuilder { responder in
            FastAnswerHTTP1Channel(http1: HTTP1Channel(responder: responder, configuration: configuration)) {
                FastAnswerHandler(serverName: Self.serverName, logger: logger) {
                    self.fastAnswer($0, health: health, token: token)
                }
            }
        }
    }
}
