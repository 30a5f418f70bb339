import NIOSSL

/// TLS for a ``RedisClient``'s connections: one `NIOSSLContext`, made once from a `TLSConfiguration`, and the
/// name to verify in the servers' certificates.
///
/// A server whose certificate does not verify (chain or name) is never sent a command: the connection fails
/// during the handshake and the reason is logged.
public struct RedisTLS: Sendable, CustomStringConvertible {
    /// Shared by every connection.
    public let context: NIOSSLContext
    /// Sent as SNI and verified in the certificate instead of the host a connection is made to (for servers
    /// reached by IP address, or cluster nodes announcing IP addresses). `nil`: the host of each connection
    /// (an IP address is verified against the certificate's IP addresses).
    public let serverName: String?

    /// Makes the context.
    ///
    /// - Parameter configuration: trust roots, client certificate and key; default: the system's roots, full
    ///   verification, no client certificate.
    /// - Throws: ``RedisConfigurationError`` when the context cannot be made (for example a key that does not
    ///   match its certificate); the message holds no key material.
    public init(
        configuration: TLSConfiguration = .makeClientConfiguration(),
        serverName: String? = nil
    ) throws(RedisConfigurationError) {
        do {
            self.context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw RedisConfigurationError("TLS could not be set up (\(error))")
        }
        self.serverName = serverName
    }

    public var description: String {
        "TLS" + (self.serverName.map { " (server name \($0))" } ?? "")
    }
}
