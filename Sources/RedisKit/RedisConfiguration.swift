/// The address of one Redis Sentinel.
public struct RedisSentinelAddress: Sendable, Hashable, CustomStringConvertible {
    /// Host name or IP address.
    public var host: String
    /// TCP port (Sentinel's default is 26379).
    public var port: Int

    /// Creates a sentinel address.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String {
        hostPortDescription(host: self.host, port: self.port)
    }
}

/// How ``RedisClient`` reaches Redis, and its pool, timeouts and reconnect policy.
///
/// The password is never printed: ``description``, `debugDescription` and the mirror (`dump`) redact it.
public struct RedisConfiguration: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Where the Redis primary is.
    public enum Endpoint: Sendable, Hashable, CustomStringConvertible {
        /// One Redis server at a fixed address.
        case direct(host: String, port: Int)
        /// A Sentinel-managed primary: the sentinels are asked, in order, for the current address of `masterName`
        /// on every (re)connect, so the client follows a failover.
        case sentinel(sentinels: [RedisSentinelAddress], masterName: String)

        /// `host:port`, or `sentinel <master> via h1:p1,h2:p2`; never contains a password.
        public var description: String {
            switch self {
            case .direct(let host, let port):
                return hostPortDescription(host: host, port: port)
            case .sentinel(let sentinels, let masterName):
                return "sentinel \(masterName) via \(sentinels.map(\.description).joined(separator: ","))"
            }
        }
    }

    /// Where the Redis primary is.
    public var endpoint: Endpoint
    /// Sent with `AUTH` on every new connection to a data node (not to sentinels). Never printed.
    public var password: String?
    /// Selected with `SELECT` on every new connection. Default 0.
    public var database: Int
    /// Number of pooled connections for commands (subscriptions use their own connections). Default 4.
    public var poolSize: Int
    /// Time allowed to establish a connection: sentinel lookup, TCP connect, `AUTH`, `SELECT` and `ROLE`.
    /// Default 1 s.
    public var connectTimeout: Duration
    /// Default time within which a command (or pipeline) must be answered, connect time included. Default 2 s.
    public var commandTimeout: Duration
    /// First reconnect delay after a failed connect; doubles per further failure. Default 50 ms.
    public var reconnectBackoffBase: Duration
    /// Upper bound of the reconnect delay. Default 2 s.
    public var reconnectBackoffCap: Duration

    /// Creates a configuration; every parameter after `endpoint` has the documented default.
    public init(
        endpoint: Endpoint,
        password: String? = nil,
        database: Int = 0,
        poolSize: Int = 4,
        connectTimeout: Duration = .seconds(1),
        commandTimeout: Duration = .seconds(2),
        reconnectBackoffBase: Duration = .milliseconds(50),
        reconnectBackoffCap: Duration = .seconds(2)
    ) {
        self.endpoint = endpoint
        self.password = password
        self.database = database
        self.poolSize = poolSize
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.reconnectBackoffBase = reconnectBackoffBase
        self.reconnectBackoffCap = reconnectBackoffCap
    }

    /// Parses `redis://[:password@]host:port/db` and
    /// `redis-sentinel://[:password@]h1:p1,h2:p2/<master>[/db]`; the other settings keep their defaults.
    ///
    /// The port may be omitted (6379 for Redis, 26379 for a sentinel), IPv6 hosts are written in brackets, and
    /// the password may be percent-encoded. The password applies to the data nodes, not to the sentinels.
    ///
    /// - Throws: ``RedisConfigurationError`` naming the malformed part; it never contains the password.
    public init(url: String) throws {
        self = try RedisURLParser.parse(url)
    }

    /// The endpoint and settings, with the password replaced by `***`.
    public var description: String {
        let auth = self.password == nil ? "" : ":***@"
        let location: String
        switch self.endpoint {
        case .direct(let host, let port):
            location = "redis://\(auth)\(hostPortDescription(host: host, port: port))/\(self.database)"
        case .sentinel(let sentinels, let masterName):
            let hosts = sentinels.map(\.description).joined(separator: ",")
            location = "redis-sentinel://\(auth)\(hosts)/\(masterName)/\(self.database)"
        }
        return "\(location) (pool \(self.poolSize), connect timeout \(self.connectTimeout), "
            + "command timeout \(self.commandTimeout), "
            + "backoff \(self.reconnectBackoffBase)…\(self.reconnectBackoffCap))"
    }

    public var debugDescription: String {
        self.description
    }

    /// A mirror without the password, so `dump(configuration)` does not print it.
    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "endpoint": self.endpoint,
                "password": self.password == nil ? "nil" : "***",
                "database": self.database,
                "poolSize": self.poolSize,
                "connectTimeout": self.connectTimeout,
                "commandTimeout": self.commandTimeout,
                "reconnectBackoffBase": self.reconnectBackoffBase,
                "reconnectBackoffCap": self.reconnectBackoffCap,
            ],
            displayStyle: .struct
        )
    }
}

/// A Redis URL could not be parsed. The description names the malformed part and never repeats the URL, so a
/// password in it is never printed.
public struct RedisConfigurationError: Error, Hashable, CustomStringConvertible {
    /// What is wrong, for example `Redis URL: port must be a number from 1 to 65535`.
    public let description: String

    init(_ problem: String) {
        self.description = "invalid Redis URL: \(problem)"
    }
}

func hostPortDescription(host: String, port: Int) -> String {
    host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
}
