// HummingbirdCore comes with Hummingbird; it holds the HTTP/1 server's configuration types.
import HummingbirdCore

extension Gateway {
    /// The `Server` header of every answer.
    static let serverName = "token-gateway"

    /// The HTTP/1 server settings: the header limits of the configuration, and parser errors
    /// answered with the contract's error body (``MalformedRequestHandler``).
    ///
    /// `health` and `token`: the routes this listener answers on the event loop when it can
    /// (``FastAnswerHandler``), if fast answers are enabled.
    func http1Configuration(health: Bool, token: Bool) -> HTTP1Channel.Configuration {
        let limit = self.configuration.maxHeaderSize
        let fast = self.fastAnswersEnabled && (health || token)
        return HTTP1Channel.Configuration(
            additionalChannelHandlers: fast
                ? [
                    MalformedRequestHandler(),
                    FastAnswerHandler(serverName: Self.serverName, logger: self.logger) {
                        self.fastAnswer($0, health: health, token: token)
                    },
                ] : [MalformedRequestHandler()],
            httpDecoderConfiguration: .init(
                maxHeaderFieldSize: limit, maxHeaderListSize: limit,
                maxHeaderFieldCount: self.configuration.maxHeaderCount))
    }
}
