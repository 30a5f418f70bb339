/// An error from ``RedisClient``.
///
/// `==` compares the kind of error and, for ``server(_:)``, the error reply's text.
/// The description never contains command arguments or credentials.
public struct RedisError: Error, Hashable, CustomStringConvertible {
    private enum Code: Hashable {
        case unavailable
        case connectionLost
        case timeout
        case server
        case protocolError
        case invalidCommand
        case topologyChanged
    }

    private let code: Code

    /// The text of the error reply (for example `NOSCRIPT No matching script.`) for a ``server(_:)`` error;
    /// `nil` for every other error.
    public let serverMessage: String?

    /// Why connecting failed, for an ``unavailable`` error made where the connect failed (not compared).
    let connectFailure: RedisConnectFailure?

    private init(code: Code, serverMessage: String? = nil, connectFailure: RedisConnectFailure? = nil) {
        self.code = code
        self.serverMessage = serverMessage
        self.connectFailure = connectFailure
    }

    /// ``unavailable``, saying why connecting to `address` failed.
    static func unavailable(_ cause: RedisConnectFailure.Cause, address: String) -> RedisError {
        RedisError(code: .unavailable, connectFailure: RedisConnectFailure(cause: cause, address: address))
    }

    public static func == (lhs: RedisError, rhs: RedisError) -> Bool {
        lhs.code == rhs.code && lhs.serverMessage == rhs.serverMessage
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.code)
        hasher.combine(self.serverMessage)
    }

    /// Redis cannot be reached and the command was not sent: connecting failed, the connection was already
    /// closed, the connection slot is waiting out its reconnect backoff, or the client was shut down.
    public static let unavailable = RedisError(code: .unavailable)

    /// The connection was lost, or closed as dead (silent past the stall timeout, or closed by the client on
    /// a failover), after the command was written: the command may have run, its reply was not read.
    public static let connectionLost = RedisError(code: .connectionLost)

    /// `true` for ``unavailable`` and ``connectionLost``: Redis could not be reached, or not to the end.
    public var isConnectionFailure: Bool {
        self.code == .unavailable || self.code == .connectionLost
    }

    /// No reply arrived within the command timeout (connect time included).
    public static let timeout = RedisError(code: .timeout)

    /// The server sent bytes that are not valid RESP, or a reply nobody asked for; the connection is closed.
    public static let protocolError = RedisError(code: .protocolError)

    /// The command was empty (or a pipeline contained an empty command), or it would change the
    /// state of a shared connection (`MULTI`, `SELECT`, `SUBSCRIBE`, `CLIENT REPLY`, …); nothing was sent.
    public static let invalidCommand = RedisError(code: .invalidCommand)

    /// A cluster-wide walk (``RedisClient/scan(cursor:match:count:timeout:)``) cannot go on from its cursor: the
    /// cluster's slots were moved between shards since the cursor was made. Start again from the beginning.
    public static let topologyChanged = RedisError(code: .topologyChanged)

    /// Redis answered with an error reply (`-ERR …`, `-NOSCRIPT …`, `-READONLY …`).
    public static func server(_ message: String) -> RedisError {
        RedisError(code: .server, serverMessage: message)
    }

    /// `true` when Redis answered with an error reply; the command reached the server.
    public var isServerError: Bool {
        self.code == .server
    }

    /// The first word of a server error reply (`ERR`, `NOSCRIPT`, `READONLY`, `WRONGTYPE`), if any.
    public var serverErrorPrefix: Substring? {
        self.serverMessage.map { $0.prefix(while: { $0 != " " }) }
    }

    public var description: String {
        switch self.code {
        case .unavailable:
            guard let failure = self.connectFailure else { return "Redis is unavailable" }
            return "Redis is unavailable: \(failure)"
        case .connectionLost:
            return "the Redis connection was lost with the command in flight (it may have run)"
        case .timeout:
            return "Redis did not answer in time"
        case .protocolError:
            return "Redis sent an invalid or unexpected reply"
        case .invalidCommand:
            return "empty Redis command, or one that would change a shared connection's state"
        case .topologyChanged:
            return "the Redis Cluster's slots moved during the walk; start it again from the beginning"
        case .server:
            return "Redis error reply: \(Self.redacted(self.serverMessage ?? ""))"
        }
    }

    /// Redis echoes the arguments of an unknown command (`… with args beginning with: 'a' 'b'`); those are cut off
    /// so that a value never reaches a log line through this error.
    private static func redacted(_ message: String) -> String {
        var text = Substring(message)
        if let range = text.firstRange(of: ", with args beginning with:") {
            text = text[..<range.lowerBound]
        }
        if text.count > 200 {
            return text.prefix(200) + "…"
        }
        return String(text)
    }
}

/// Why a connection to Redis could not be made: a cause from a fixed set, for logs and metrics, and
/// the address tried (`host:port`, or the sentinels'); never credentials.
struct RedisConnectFailure: Sendable, CustomStringConvertible {
    enum Cause: String, Sendable {
        /// Nothing listens at the address (`ECONNREFUSED`).
        case refused
        /// The host name did not resolve.
        case dns
        /// No connection, or no answer to the handshake, within the connect timeout.
        case timeout
        /// Another network error (unreachable host or network, reset).
        case network
        /// The TLS handshake failed (a certificate that does not verify, …).
        case tls
        /// The connection closed or broke during the handshake.
        case handshake
        /// The server answered the handshake with an error (`maxclients` reached, protected mode, …).
        case rejected
        /// The server refused the user or password.
        case credentials
        /// The node named as the primary is not one (a failover under way).
        case notPrimary = "not_primary"
        /// No sentinel named the primary.
        case noPrimaryNamed = "no_primary_named"
    }

    let cause: Cause
    let address: String

    var description: String {
        switch self.cause {
        case .refused: "connection refused by \(self.address)"
        case .dns: "the name of \(self.address) did not resolve"
        case .timeout: "\(self.address) did not answer in time"
        case .network: "network error reaching \(self.address)"
        case .tls: "TLS handshake with \(self.address) failed"
        case .handshake: "the connection to \(self.address) closed during the handshake"
        case .rejected: "\(self.address) rejected the connection handshake"
        case .credentials: "\(self.address) refused the credentials"
        case .notPrimary: "\(self.address) is not the primary"
        case .noPrimaryNamed: "no sentinel (\(self.address)) named the primary"
        }
    }
}
