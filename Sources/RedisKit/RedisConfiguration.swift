/// The address of one Redis server or Sentinel.
public struct RedisNodeAddress: Sendable, Hashable, CustomStringConvertible {
    /// Host name or IP address.
    public var host: String
    /// TCP port.
    public var port: Int

    /// Creates an address.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String {
        hostPortDescription(host: self.host, port: self.port)
    }
}

/// The address of one Redis Sentinel.
public typealias RedisSentinelAddress = RedisNodeAddress

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
        /// A Redis Cluster: `seeds` are asked for the slot map (`CLUSTER SHARDS`); commands go to the primary of
        /// their key's slot, following `MOVED` and `ASK` redirections and failovers. Database 0 only.
        case cluster(seeds: [RedisNodeAddress])

        /// `host:port`, `sentinel <master> via h1:p1,h2:p2` or `cluster via h1:p1,…`; never contains a password.
        public var description: String {
            switch self {
            case .direct(let host, let port):
                return hostPortDescription(host: host, port: port)
            case .sentinel(let sentinels, let masterName):
                return "sentinel \(masterName) via \(sentinels.map(\.description).joined(separator: ","))"
            case .cluster(let seeds):
                return "cluster via \(seeds.map(\.description).joined(separator: ","))"
            }
        }
    }

    /// Where the Redis primary is.
    public var endpoint: Endpoint
    /// The ACL user to authenticate as (`AUTH user password`); `nil`: the default user (`AUTH password`).
    public var username: String?
    /// Sent with `AUTH` on every new connection, to data nodes and sentinels (a sentinel that has no password
    /// set is used without). Never printed.
    public var password: String?
    /// TLS for every connection (data nodes and sentinels); `nil`: plain TCP.
    public var tls: RedisTLS?
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
        username: String? = nil,
        password: String? = nil,
        tls: RedisTLS? = nil,
        database: Int = 0,
        poolSize: Int = 4,
        connectTimeout: Duration = .seconds(1),
        commandTimeout: Duration = .seconds(2),
        reconnectBackoffBase: Duration = .milliseconds(50),
        reconnectBackoffCap: Duration = .seconds(2)
    ) {
        self.endpoint = endpoint
        self.username = username
        self.password = password
        self.tls = tls
        self.database = database
        self.poolSize = poolSize
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.reconnectBackoffBase = reconnectBackoffBase
        self.reconnectBackoffCap = reconnectBackoffCap
    }

    /// Parses `redis://[[user]:password@]host:port/db`,
    /// `redis-sentinel://[[user]:password@]h1:p1,h2:p2/<master>[/db]` and
    /// `redis-cluster://[[user]:password@]h1:p1,h2:p2`; the `rediss` schemes are the same over TLS (verified
    /// against the system's roots; set ``tls`` for another CA, a client certificate or a server name). The other
    /// settings keep their defaults.
    ///
    /// The port may be omitted (6379 for Redis, 26379 for a sentinel), IPv6 hosts are written in brackets, and
    /// user and password may be percent-encoded.
    ///
    /// - Throws: ``RedisConfigurationError`` naming the malformed part; it never contains the password.
    public init(url: String) throws {
        self = try RedisURLParser.parse(url)
    }

    /// The endpoint and settings, with the password replaced by `***`.
    public var description: String {
        let auth = self.password == nil ? "" : "\(self.username ?? ""):***@"
        let scheme = self.tls == nil ? "redis" : "rediss"
        let location: String
        switch self.endpoint {
        case .direct(let host, let port):
            location = "\(scheme)://\(auth)\(hostPortDescription(host: host, port: port))/\(self.database)"
        case .sentinel(let sentinels, let masterName):
            let hosts = sentinels.map(\.description).joined(separator: ",")
            location = "\(scheme)-sentinel://\(auth)\(hosts)/\(masterName)/\(self.database)"
        case .cluster(let seeds):
            location = "\(scheme)-cluster://\(auth)\(seeds.map(\.description).joined(separator: ","))"
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
                "username": self.username as Any,
                "password": self.password == nil ? "nil" : "***",
                "tls": self.tls as Any,
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

    public init(_ problem: String) {
        self.description = "invalid Redis URL: \(problem)"
    }
}

func hostPortDescription(host: String, port: Int) -> String {
    host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
}
