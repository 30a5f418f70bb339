// HummingbirdCore comes with Hummingbird; it holds the HTTP/1 server's configuration types.
import HummingbirdCore

extension Gateway {
    /// The HTTP/1 server settings: the header limits of the configuration, and parser errors
    /// answered with the contract's error body (``MalformedRequestHandler``).
    var http1Configuration: HTTP1Channel.Configuration {
        let limit = self.configuration.maxHeaderSize
        return HTTP1Channel.Configuration(
            additionalChannelHandlers: [MalformedRequestHandler()],
            httpDecoderConfiguration: .init(
                maxHeaderFieldSize: limit, maxHeaderListSize: limit,
                maxHeaderFieldCount: self.configuration.maxHeaderCount))
    }
}
