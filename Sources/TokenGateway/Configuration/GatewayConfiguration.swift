import FlowEngine
import Foundation
import Logging
import NIOCore
import NIOSSL

/// A setting that is missing or malformed. `description` is one line naming the setting and
/// never contains the value (it may be a secret).
public struct ConfigurationError: Error, Sendable, Hashable, CustomStringConvertible {
    public let setting: String
    public let problem: String

    public init(setting: String, problem: String) {
        self.setting = setting
        self.problem = problem
    }

    public var description: String {
        // Messages from the parsers may already begin with the setting's name.
        if self.problem.hasPrefix(self.setting) { return "configuration error: \(self.problem)" }
        return "configuration error: \(self.setting): \(self.problem)"
    }
}

/// One setting of the gateway: an environment variable and the command-line flag of the same meaning.
public struct GatewaySetting: Sendable, Hashable {
    public let environment: String
    public let flag: String
    public let summary: String
    public let isSecret: Bool

    public static let host = GatewaySetting("TOKEN_GATEWAY_HOST", "host", "listen address (default 127.0.0.1)")
    public static let port = GatewaySetting("TOKEN_GATEWAY_PORT", "port", "listen port (default 8080)")
    public static let redisURL = GatewaySetting(
        "TOKEN_GATEWAY_REDIS_URL", "redis-url",
        "redis://, redis-sentinel:// or redis-cluster:// URL, rediss… for TLS (default redis://127.0.0.1:6379/0)",
        secret: true)
    public static let redisTLSCAFile = GatewaySetting(
        "TOKEN_GATEWAY_REDIS_TLS_CA_FILE", "redis-tls-ca-file",
        "PEM bundle of the CAs that sign the Redis servers' certificates (default: the system's roots)")
    public static let redisTLSCertFile = GatewaySetting(
        "TOKEN_GATEWAY_REDIS_TLS_CERT_FILE", "redis-tls-cert-file", "client certificate (PEM) for mutual TLS with Redis"
    )
    public static let redisTLSKeyFile = GatewaySetting(
        "TOKEN_GATEWAY_REDIS_TLS_KEY_FILE", "redis-tls-key-file", "client key (PEM) for mutual TLS with Redis")
    public static let redisTLSServerName = GatewaySetting(
        "TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME", "redis-tls-server-name",
        "name to verify in the Redis servers' certificates (default: the URL's host)")
    public static let forgeAppID = GatewaySetting(
        "TOKEN_GATEWAY_FORGE_APP_ID", "forge-app-id",
        "the app ARI, the aud every Forge Invocation Token must carry (required)")
    public static let forgeJWKSURL = GatewaySetting(
        "TOKEN_GATEWAY_FORGE_JWKS_URL", "forge-jwks-url",
        "JWKS URL for Forge invocation tokens (default Forge production's)")
    public static let forgeModuleKeys = GatewaySetting(
        "TOKEN_GATEWAY_FORGE_MODULE_KEYS", "forge-module-keys",
        "comma-separated app.module.key values allowed on the Forge routes (default any)")
    public static let triggerHosts = GatewaySetting(
        "TOKEN_GATEWAY_TRIGGER_HOSTS", "trigger-hosts",
        "comma-separated allow-list of trigger URL hosts (default *.hello.atlassian-dev.net,*.webtrigger.atlassian.app)"
    )
    public static let encryptionKeys = GatewaySetting(
        "TOKEN_GATEWAY_ENCRYPTION_KEYS", "encryption-keys", "keyId:base64(32 bytes),… (required)", secret: true)
    public static let callers = GatewaySetting(
        "TOKEN_GATEWAY_CALLERS", "callers", "JSON array of callers, or @path (required)", secret: true)
    public static let connectBaseURL = GatewaySetting(
        "TOKEN_GATEWAY_CONNECT_BASE_URL", "connect-base-url", "the Connect app's baseUrl (unset: Connect routes off)")
    public static let connectKeysURL = GatewaySetting(
        "TOKEN_GATEWAY_CONNECT_KEYS_URL", "connect-keys-url",
        "base URL of Connect install public keys (default https://connect-install-keys.atlassian.com)")
    public static let forgeGraphQLURL = GatewaySetting(
        "TOKEN_GATEWAY_FORGE_GRAPHQL_URL", "forge-graphql-url",
        "GraphQL endpoint for user-token exchanges (default https://api.atlassian.com/graphql)")
    public static let userExchangesPerMinute = GatewaySetting(
        "TOKEN_GATEWAY_USER_EXCHANGES_PER_MINUTE", "user-exchanges-per-minute",
        "user-token exchange budget (default 1000)")
    public static let publicURL = GatewaySetting(
        "TOKEN_GATEWAY_PUBLIC_URL", "public-url",
        "the gateway's own base URL as callers reach it (default http://<host>:<port>)")
    public static let opsHost = GatewaySetting(
        "TOKEN_GATEWAY_OPS_HOST", "ops-host", "listen address of the operations listener (default 127.0.0.1)")
    public static let opsPort = GatewaySetting(
        "TOKEN_GATEWAY_OPS_PORT", "ops-port",
        "port of a separate listener for health, metrics and operator pages (unset: served on the main port)")
    public static let apiBaseURLPrefixes = GatewaySetting(
        "TOKEN_GATEWAY_API_BASE_URL_PREFIXES", "api-base-url-prefixes",
        "comma-separated prefixes an installation's apiBaseUrl must start with (default: any https URL or loopback http)"
    )
    public static let logLevel = GatewaySetting("TOKEN_GATEWAY_LOG_LEVEL", "log-level", "trace…critical (default info)")
    public static let logFormat = GatewaySetting(
        "TOKEN_GATEWAY_LOG_FORMAT", "log-format", "logfmt or json (default logfmt)")
    public static let triggerMaxAttempts = GatewaySetting(
        "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS", "trigger-max-attempts", "trigger attempts per round trip (default 4)")
    public static let triggerAttemptTimeout = GatewaySetting(
        "TOKEN_GATEWAY_TRIGGER_ATTEMPT_TIMEOUT_MS", "trigger-attempt-timeout-ms",
        "longest wait for one trigger call, ms (default 10000)")
    public static let deliveryGrace = GatewaySetting(
        "TOKEN_GATEWAY_DELIVERY_GRACE_MS", "delivery-grace-ms",
        "how long after a 2xx trigger answer the token may still arrive, ms (default 3000)")

    public static let refreshAheadFraction = GatewaySetting(
        "TOKEN_GATEWAY_REFRESH_AHEAD_FRACTION", "refresh-ahead-fraction",
        "share of a token's lifetime at its end in which it is refreshed in the background, 0–0.9 (default 0.25; 0 off)"
    )
    public static let breakerThreshold = GatewaySetting(
        "TOKEN_GATEWAY_BREAKER_THRESHOLD", "breaker-threshold",
        "consecutive failed round trips that open an installation's circuit (default 5)")
    public static let breakerOpen = GatewaySetting(
        "TOKEN_GATEWAY_BREAKER_OPEN_MS", "breaker-open-ms",
        "first open window of a circuit, ms; doubles per reopening up to 5 min (default 5000)")

    public static let invokeMaxConcurrency = GatewaySetting(
        "TOKEN_GATEWAY_INVOKE_MAX_CONCURRENCY", "invoke-max-concurrency",
        "named-trigger calls of one installation in progress at once per process (default 8)")

    public static let eventLoopAffinity = GatewaySetting(
        "TOKEN_GATEWAY_EVENT_LOOP_AFFINITY", "event-loop-affinity",
        "shared (the scheduler places the event loops' threads) or pinned (one CPU each) (default shared)")

    public static let shutdownTimeout = GatewaySetting(
        "TOKEN_GATEWAY_SHUTDOWN_TIMEOUT_MS", "shutdown-timeout-ms",
        "longest graceful shutdown after SIGTERM/SIGINT, ms; then what is left is cut off (default 35000)")

    public static let httpIdleTimeout = GatewaySetting(
        "TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS", "http-idle-timeout-ms",
        "a client connection that sends nothing this long, ms, while no answer is due, is closed (default 75000)")

    public static let maxConnections = GatewaySetting(
        "TOKEN_GATEWAY_MAX_CONNECTIONS", "max-connections",
        "client connections each listener holds at once; more wait to be accepted (default 10000)")

    public static let all: [GatewaySetting] = [
        .host, .port, .redisURL, .redisTLSCAFile, .redisTLSCertFile, .redisTLSKeyFile, .redisTLSServerName,
        .forgeAppID, .forgeJWKSURL, .triggerHosts, .encryptionKeys, .callers,
        .connectBaseURL, .connectKeysURL, .forgeGraphQLURL, .userExchangesPerMinute, .publicURL, .logLevel,
        .logFormat, .triggerMaxAttempts, .triggerAttemptTimeout, .deliveryGrace, .refreshAheadFraction,
        .breakerThreshold, .breakerOpen, .forgeModuleKeys, .opsHost, .opsPort, .apiBaseURLPrefixes,
        .invokeMaxConcurrency, .eventLoopAffinity, .shutdownTimeout, .httpIdleTimeout, .maxConnections,
    ]

    init(_ environment: String, _ flag: String, _ summary: String, secret: Bool = false) {
        self.environment = environment
        self.flag = flag
        self.summary = summary
        self.isSecret = secret
    }
}

/// Where the operations surface (health, metrics, operator pages) listens when it is kept off the
/// main port.
public struct OperationsListener: Sendable, Hashable {
    public var host: String
    public var port: Int

    public init(host: String = "127.0.0.1", port: Int) {
        self.host = host
        self.port = port
    }
}

/// How log lines are written.
public enum LogFormat: String, Sendable, Hashable {
    case logfmt
    case json
}

/// Everything `token-gateway serve` needs, parsed and validated. `description` shows no secret.
public struct GatewayConfiguration: Sendable, CustomStringConvertible {
    public var host: String = "127.0.0.1"
    public var port: Int = 8080
    /// A separate listener for health, metrics and operator pages (`TOKEN_GATEWAY_OPS_HOST` /
    /// `TOKEN_GATEWAY_OPS_PORT`); nil (the default) serves them on the main listener.
    public var operationsListener: OperationsListener? = nil
    /// What an installation's `apiBaseUrl` (from verified FITs, handed to callers beside its
    /// token) must start with to be stored and served. Default ``anyAPIBaseURL``; a production app
    /// may narrow it to `https://api.atlassian.com/ex/`.
    public var apiBaseURLPrefixes: [String] = GatewayConfiguration.anyAPIBaseURL
    /// The default of ``apiBaseURLPrefixes``: any `https` URL, or `http` to loopback. A FIT is
    /// signed by Forge, so the `apiBaseUrl` it carries is taken as it is (contract §2: `null` only
    /// while no FIT carried one); the setting narrows it (`https://api.atlassian.com/ex/`, say).
    public static let anyAPIBaseURL = [
        "https://", "http://127.0.0.1:", "http://localhost:", "http://[::1]:", "http://127.0.0.1/",
        "http://localhost/", "http://[::1]/",
    ]
    /// Secret settings whose value was given inline on the command line (not as `@path`): used as
    /// given (contract §7: every setting is a flag too), and warned about at start-up, since every
    /// local user can read a process's arguments.
    public var secretsFromCommandLine: [String] = []
    /// `TOKEN_GATEWAY_*` environment variables the gateway does not know (a misspelt setting
    /// would otherwise fall back to its default without a word); warned about at start-up.
    public var unknownEnvironmentNames: [String] = []
    /// The first part of every Redis key the gateway writes (`tg`). Not a setting: replicas of one
    /// deployment share it; `token-gateway demo` uses its own and deletes its keys when done.
    public var storePrefix = "tg"
    public var redis: RedisConfiguration
    public var forgeAppID: String
    public var forgeJWKSURL: String = InvocationTokenVerifier.productionJWKSURL
    public var triggerHosts: TriggerHostAllowList = .forgeDefault
    /// `app.module.key` values a FIT must name on the Forge routes; nil accepts any key (of a
    /// `core:endpoint` FIT).
    public var forgeModuleKeys: Set<String>? = nil
    public var encryptionKeys: EncryptionKeyRing
    public var callers: CallerRegistry
    public var connectBaseURL: String? = nil
    public var connectKeysURL: String = "https://connect-install-keys.atlassian.com"
    public var forgeGraphQLURL: String = "https://api.atlassian.com/graphql"
    public var userExchangesPerMinute: Int = 1000
    public var publicURL: String? = nil
    public var logLevel: Logger.Level = .info
    public var logFormat: LogFormat = .logfmt
    /// Where the event loops' threads run: `shared` (default) or `pinned`, one CPU each.
    public var eventLoopAffinity: EventLoopAffinity = .shared
    /// The longest graceful shutdown: after SIGTERM/SIGINT, requests in flight have this long to
    /// finish (each within its own deadline, at most 30 s); then what is left (a client that never
    /// sends the rest of its body) is cancelled, so the process always exits.
    public var shutdownTimeout: Duration = .seconds(35)
    /// How long a client connection may send nothing while no answer is due to it (between
    /// requests, or in the middle of one's head or body) before it is closed: a client that
    /// opens connections and never finishes its requests cannot hold them.
    public var httpIdleTimeout: Duration = .seconds(75)
    /// Client connections each listener holds at once; more wait in the listen backlog until one
    /// closes: a flood of connections cannot exhaust the process's file descriptors or memory.
    public var maxConnections = 10_000
    /// The window in which the log lines of refused requests are kept to a few per message.
    public var refusalLogWindow: Duration = .seconds(10)
    public var flow = TokenFlowConfiguration()
    /// Largest request body accepted (bytes); larger bodies get 413 `payload_too_large`.
    public var maxBodySize: Int = 64 * 1024
    /// Largest request head accepted (bytes, request line and header fields together; also the
    /// largest single header field). Larger heads get 400 `invalid_request` and the connection is
    /// closed. Default 32 KiB: a FIT and a token are a few KiB each.
    public var maxHeaderSize: Int = 32 * 1024
    /// Most header fields accepted in one request. Default 100.
    public var maxHeaderCount: Int = 100
    /// Connect install public keys kept in memory (least recently used dropped). Default 64.
    public var connectInstallKeysCached: Int = 64
    /// Connect install-key fetches a minute, a third of them kept for keys seen before; each `kid`
    /// at most twice a minute. Default 30.
    public var connectInstallKeyFetchesPerMinute: Int = 30
    /// How long a rotated trigger-signing key is announced before the gateway signs with it
    /// (`POST /forge/register` with `"rotateKey": true`): the Forge side keeps both public keys
    /// for this long. Default 5 minutes.
    public var triggerKeyOverlap: Duration = .seconds(300)
    /// Named-trigger calls (`POST /v1/installations/{id}/invoke/{key}`).
    public var invoke = InvokeConfiguration()

    public init(
        redis: RedisConfiguration, forgeAppID: String, encryptionKeys: EncryptionKeyRing, callers: CallerRegistry
    ) {
        self.redis = redis
        self.forgeAppID = forgeAppID
        self.encryptionKeys = encryptionKeys
        self.callers = callers
    }

    /// The base URL used in OAuth discovery: `TOKEN_GATEWAY_PUBLIC_URL`, else `http://<host>:<port>`.
    public var effectivePublicURL: String { self.effectivePublicURL(boundPort: nil) }

    /// ``effectivePublicURL`` once the listener is up: with `port` 0 (any free port), the port it
    /// was given (`boundPort`) stands in the default URL.
    public func effectivePublicURL(boundPort: Int?) -> String {
        if let publicURL { return publicURL.hasSuffix("/") ? String(publicURL.dropLast()) : publicURL }
        let h = self.host.contains(":") ? "[\(self.host)]" : self.host
        let port = self.port == 0 ? (boundPort ?? 0) : self.port
        return "http://\(h):\(port)"
    }

    /// A start-up warning when OAuth discovery would name an address no client can reach (no
    /// `TOKEN_GATEWAY_PUBLIC_URL` while the gateway listens on every address, `0.0.0.0` or `::`),
    /// or an `http` URL on a host other than loopback (RFC 8414 asks for an `https` issuer: a stock
    /// client that follows it sends its secret unencrypted).
    public var publicURLWarning: String? {
        guard self.publicURL == nil, let address = try? SocketAddress(ipAddress: self.host, port: 0),
            address.ipAddress == "0.0.0.0" || address.ipAddress == "::"
        else { return self.plainHTTPWarning }
        return
            "TOKEN_GATEWAY_PUBLIC_URL is unset while TOKEN_GATEWAY_HOST is \(self.host): the OAuth discovery document names \(self.effectivePublicURL), which no client can reach; set TOKEN_GATEWAY_PUBLIC_URL to the URL callers use"
    }

    /// The warning of ``publicURLWarning`` for an `http` URL on a host other than loopback, set or
    /// the default.
    private var plainHTTPWarning: String? {
        let url = self.effectivePublicURL
        guard let c = URLComponents(string: url), c.scheme?.lowercased() == "http", let host = c.host,
            !TrustRoot.isLoopback(host)
        else { return nil }
        return
            "the OAuth discovery document names \(url): an http issuer and token endpoint off loopback, so clients that follow it send their client secrets unencrypted; put TLS in front of the gateway and set TOKEN_GATEWAY_PUBLIC_URL to its https URL"
    }

    public var description: String {
        "GatewayConfiguration(listen: \(self.host):\(self.port), redis: \(self.redis), app: \(self.forgeAppID), callers: \(self.callers.callers.map(\.name)), encryption keys: \(self.encryptionKeys.keyIds))"
    }

    /// Reads every setting: a flag value (in `flags`, keyed by environment name) wins over the
    /// environment. Throws the first missing or malformed setting.
    public static func load(environment: [String: String], flags: [String: String] = [:]) throws(ConfigurationError)
        -> GatewayConfiguration
    {
        let settings = SettingValues(environment: environment, flags: flags)
        var config = try Self.requiredSettings(settings)
        // A secret given inline as a flag is used, and noted: every local user can read
        // `/proc/<pid>/cmdline`. `@path` flags and a Redis URL without a password are no secret.
        config.unknownEnvironmentNames = Self.unknownEnvironmentNames(environment)
        config.secretsFromCommandLine = GatewaySetting.all.filter { s in
            s.isSecret && flags[s.environment].map { Self.isInlineSecret(s, flagValue: $0) } == true
        }.map(\.environment)
        try Self.applyListeners(settings, to: &config)
        try Self.applyTrustRoots(settings, to: &config)
        try Self.applyLogging(settings, to: &config)
        try Self.applyFlow(settings, to: &config)
        return config
    }

    /// Redis, the app, the encryption keys and the callers: the settings without which nothing runs.
    private static func requiredSettings(_ settings: SettingValues) throws(ConfigurationError) -> GatewayConfiguration {
        // The Redis URL may carry a password: from the environment or a file (`@path`) only.
        let redisText = try settings.secretValue(.redisURL) ?? "redis://127.0.0.1:6379/0"
        let redis = try Self.redisConfiguration { setting in setting == .redisURL ? redisText : settings.raw(setting) }
        let appID = try settings.required(.forgeAppID)
        // Forge's FITs carry the app ARI as their audience; anything else would refuse every FIT.
        // No whitespace or braces either (the value names Redis keys and their Cluster hash tags).
        let prefix = "ari:cloud:ecosystem::app/"
        guard appID.hasPrefix(prefix), (prefix.utf8.count + 1...256).contains(appID.utf8.count),
            appID.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "{") && $0 != UInt8(ascii: "}") })
        else {
            throw ConfigurationError(
                setting: GatewaySetting.forgeAppID.environment,
                problem: "must be an app ARI (ari:cloud:ecosystem::app/<uuid>), the audience of the app's FITs")
        }
        let keys: EncryptionKeyRing
        do {
            _ = try settings.required(.encryptionKeys)
            keys = try EncryptionKeyRing(parsing: try settings.secretValue(.encryptionKeys) ?? "")
        } catch let e as ConfigurationError {
            throw e
        } catch {
            throw ConfigurationError(setting: GatewaySetting.encryptionKeys.environment, problem: "\(error)")
        }
        _ = try settings.required(.callers)
        let callersText = try settings.secretValue(.callers) ?? ""
        let callers: CallerRegistry
        do {
            callers = try CallerRegistry(json: callersText)
        } catch {
            throw ConfigurationError(setting: GatewaySetting.callers.environment, problem: "\(error)")
        }
        return GatewayConfiguration(redis: redis, forgeAppID: appID, encryptionKeys: keys, callers: callers)
    }

    /// The main and the operations listener.
    private static func applyListeners(_ settings: SettingValues, to config: inout GatewayConfiguration)
        throws(ConfigurationError)
    {
        if let host = settings.raw(.host) { config.host = try Self.listenHost(host, setting: .host) }
        if let port = try settings.integer(.port, range: 0...65535) { config.port = port }
        if let opsPort = try settings.integer(.opsPort, range: 0...65535) {
            var opsHost = "127.0.0.1"
            if let raw = settings.raw(.opsHost) { opsHost = try Self.listenHost(raw, setting: .opsHost) }
            // Port 0 asks for any free port, twice is fine; the same fixed port twice binds only on
            // two different specific addresses.
            let wildcard: Set<String> = ["0.0.0.0", "::"]
            if opsPort != 0, opsPort == config.port,
                opsHost == config.host || wildcard.contains(opsHost) || wildcard.contains(config.host)
            {
                throw ConfigurationError(
                    setting: GatewaySetting.opsPort.environment,
                    problem:
                        "must differ from TOKEN_GATEWAY_PORT (\(opsPort)) on the same address: a second listener needs its own port"
                )
            }
            config.operationsListener = OperationsListener(host: opsHost, port: opsPort)
        } else if settings.raw(.opsHost) != nil {
            throw ConfigurationError(
                setting: GatewaySetting.opsHost.environment, problem: "needs TOKEN_GATEWAY_OPS_PORT as well")
        }
    }

    /// A listen address: an IPv4 or IPv6 literal (`0.0.0.0`, `::`, `[::1]`), or a host name
    /// (letters, digits and hyphens in dot-separated labels of at most 63 characters, 253 in all).
    static func listenHost(_ raw: String, setting: GatewaySetting) throws(ConfigurationError) -> String {
        var host = raw
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if (try? SocketAddress(ipAddress: host, port: 0)) != nil { return host }
        let labels = host.split(separator: ".", omittingEmptySubsequences: false)
        let isName =
            !host.isEmpty && host.utf8.count <= 253
            && labels.allSatisfy { label in
                (1...63).contains(label.utf8.count) && label.first != "-" && label.last != "-"
                    && label.utf8.allSatisfy { c in
                        (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) || c == 0x2D
                    }
            }
        guard isName else {
            throw ConfigurationError(
                setting: setting.environment, problem: "not an IP address or host name to listen on")
        }
        return host
    }

    /// Whom the gateway trusts and calls: JWKS, trigger hosts, module keys, API base URLs, Connect
    /// and GraphQL endpoints; the user-exchange limit and the public URL.
    private static func applyTrustRoots(_ settings: SettingValues, to config: inout GatewayConfiguration)
        throws(ConfigurationError)
    {
        // Trust roots (contract §7): https, or http only to a loopback host written as such.
        if let jwks = settings.raw(.forgeJWKSURL) {
            config.forgeJWKSURL = try TrustRoot.validate(jwks, setting: GatewaySetting.forgeJWKSURL.environment)
        }
        if let hosts = settings.raw(.triggerHosts) {
            do {
                config.triggerHosts = try TriggerHostAllowList(parsing: hosts)
            } catch {
                throw ConfigurationError(setting: GatewaySetting.triggerHosts.environment, problem: error.problem)
            }
        }
        if let v = settings.raw(.forgeModuleKeys) {
            let keys = v.split(separator: ",", omittingEmptySubsequences: false).map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            guard !keys.isEmpty, keys.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 256 }) else {
                throw ConfigurationError(
                    setting: GatewaySetting.forgeModuleKeys.environment,
                    problem: "must be a comma-separated list of non-empty module keys (a doubled or trailing comma?)")
            }
            config.forgeModuleKeys = Set(keys)
        }
        if let v = settings.raw(.apiBaseURLPrefixes) {
            let setting = GatewaySetting.apiBaseURLPrefixes.environment
            var prefixes: [String] = []
            for entry in v.split(separator: ",", omittingEmptySubsequences: false).map({
                $0.trimmingCharacters(in: .whitespacesAndNewlines)
            }) {
                guard !entry.isEmpty else {
                    throw ConfigurationError(
                        setting: setting, problem: "has an empty entry (a doubled or trailing comma?)")
                }
                guard entry.hasSuffix("/"), URLComponents(string: entry)?.query == nil else {
                    throw ConfigurationError(setting: setting, problem: "each prefix must be a URL ending in /")
                }
                prefixes.append(try TrustRoot.validate(entry, setting: setting))
            }
            guard !prefixes.isEmpty else { throw ConfigurationError(setting: setting, problem: "names no prefix") }
            config.apiBaseURLPrefixes = prefixes
        }
        if let v = settings.raw(.connectBaseURL) { config.connectBaseURL = try settings.url(.connectBaseURL, v) }
        if let v = settings.raw(.connectKeysURL) {
            config.connectKeysURL = try TrustRoot.validate(v, setting: GatewaySetting.connectKeysURL.environment)
        }
        if let v = settings.raw(.forgeGraphQLURL) {
            config.forgeGraphQLURL = try TrustRoot.validate(v, setting: GatewaySetting.forgeGraphQLURL.environment)
        }
        if let v = try settings.integer(.userExchangesPerMinute, range: 1...1_000_000) {
            config.userExchangesPerMinute = v
        }
        if let v = settings.raw(.publicURL) { config.publicURL = try settings.url(.publicURL, v) }
    }

    /// Log level and format.
    private static func applyLogging(_ settings: SettingValues, to config: inout GatewayConfiguration)
        throws(ConfigurationError)
    {
        if let v = settings.raw(.logLevel) {
            guard let level = Logger.Level(rawValue: v.lowercased()) else {
                throw ConfigurationError(
                    setting: GatewaySetting.logLevel.environment,
                    problem: "must be one of trace, debug, info, notice, warning, error, critical")
            }
            config.logLevel = level
        }
        if let v = settings.raw(.logFormat) {
            guard let format = LogFormat(rawValue: v.lowercased()) else {
                throw ConfigurationError(
                    setting: GatewaySetting.logFormat.environment, problem: "must be logfmt or json")
            }
            config.logFormat = format
        }
    }

    /// The flow's trigger attempts, refresh-ahead and circuit, and the named-trigger concurrency.
    private static func applyFlow(_ settings: SettingValues, to config: inout GatewayConfiguration)
        throws(ConfigurationError)
    {
        if let v = try settings.integer(.triggerMaxAttempts, range: 1...20) { config.flow.maxAttempts = v }
        if let v = try settings.integer(.triggerAttemptTimeout, range: 100...60_000) {
            config.flow.attemptTimeout = .milliseconds(v)
        }
        if let v = try settings.integer(.deliveryGrace, range: 0...60_000) {
            config.flow.deliveryGrace = .milliseconds(v)
        }
        if let v = settings.raw(.refreshAheadFraction) {
            guard let f = Double(v.trimmingCharacters(in: .whitespaces)), f >= 0, f <= 0.9 else {
                throw ConfigurationError(
                    setting: GatewaySetting.refreshAheadFraction.environment, problem: "must be a number in 0…0.9")
            }
            config.flow.refreshAheadFraction = f
        }
        if let v = try settings.integer(.breakerThreshold, range: 1...1000) { config.flow.breakerThreshold = v }
        if let v = try settings.integer(.breakerOpen, range: 10...3_600_000) {
            config.flow.breakerOpenBase = .milliseconds(v)
            config.flow.breakerOpenCap = max(.milliseconds(v), .seconds(300))
        }
        if let v = try settings.integer(.invokeMaxConcurrency, range: 1...10_000) {
            config.invoke.maxConcurrencyPerInstallation = v
        }
        if let v = settings.raw(.eventLoopAffinity) {
            guard let affinity = EventLoopAffinity(rawValue: v.lowercased()) else {
                throw ConfigurationError(
                    setting: GatewaySetting.eventLoopAffinity.environment, problem: "must be shared or pinned")
            }
            config.eventLoopAffinity = affinity
        }
        if let v = try settings.integer(.shutdownTimeout, range: 1000...600_000) {
            config.shutdownTimeout = .milliseconds(v)
        }
        if let v = try settings.integer(.httpIdleTimeout, range: 1000...3_600_000) {
            config.httpIdleTimeout = .milliseconds(v)
        }
        if let v = try settings.integer(.maxConnections, range: 1...1_000_000) {
            config.maxConnections = Int(v)
        }
    }

    /// The raw values of the settings: a flag (keyed by environment name) wins over the environment;
    /// an empty environment value counts as unset. Whitespace around a value is not part of it (a
    /// value from a file or a YAML block often ends in a newline), so a value of only whitespace is
    /// an empty one.
    private struct SettingValues {
        let environment: [String: String]
        let flags: [String: String]

        func raw(_ s: GatewaySetting) -> String? {
            if let v = self.flags[s.environment] { return v.trimmingCharacters(in: .whitespacesAndNewlines) }
            if let v = self.environment[s.environment]?.trimmingCharacters(in: .whitespacesAndNewlines), !v.isEmpty {
                return v
            }
            return nil
        }

        /// The value of a secret setting; `@path` reads it from that file (one trailing newline dropped).
        func secretValue(_ s: GatewaySetting) throws(ConfigurationError) -> String? {
            guard let v = self.raw(s) else { return nil }
            guard v.hasPrefix("@") else { return v }
            return try GatewayConfiguration.readSettingFile(String(v.dropFirst()), setting: s)
        }

        func required(_ s: GatewaySetting) throws(ConfigurationError) -> String {
            guard let v = self.raw(s), !v.trimmingCharacters(in: .whitespaces).isEmpty else {
                throw ConfigurationError(setting: s.environment, problem: "is required but not set")
            }
            return v
        }

        func integer(_ s: GatewaySetting, range: ClosedRange<Int>) throws(ConfigurationError) -> Int? {
            guard let v = self.raw(s) else { return nil }
            guard let i = Int(v.trimmingCharacters(in: .whitespaces)), range.contains(i) else {
                throw ConfigurationError(
                    setting: s.environment, problem: "must be an integer in \(range.lowerBound)…\(range.upperBound)")
            }
            return i
        }

        func url(_ s: GatewaySetting, _ value: String) throws(ConfigurationError) -> String {
            guard let c = URLComponents(string: value), let scheme = c.scheme?.lowercased(),
                scheme == "http" || scheme == "https", let host = c.host, !host.isEmpty
            else {
                throw ConfigurationError(setting: s.environment, problem: "must be an absolute http(s) URL")
            }
            // A base URL that other URLs are built on (`<url>/oauth/token`, the OAuth issuer, the
            // Connect `aud`) has no query, fragment or credentials.
            guard c.query == nil, c.fragment == nil, c.user == nil, c.password == nil else {
                throw ConfigurationError(
                    setting: s.environment,
                    problem:
                        "must be a base URL: scheme, host, optional port and path, with no query, fragment or credentials"
                )
            }
            return value
        }
    }

    /// Variables of the `TOKEN_GATEWAY_` family that are no setting: the caller commands' own
    /// (`TOKEN_GATEWAY_URL`, `TOKEN_GATEWAY_CALLER_SECRET`) and the test suite's (`TOKEN_GATEWAY_TEST_*`).
    static let otherEnvironmentNames: Set<String> = ["TOKEN_GATEWAY_URL", "TOKEN_GATEWAY_CALLER_SECRET"]

    /// The `TOKEN_GATEWAY_*` names in `environment` that are neither a setting nor one of
    /// ``otherEnvironmentNames``, sorted.
    public static func unknownEnvironmentNames(_ environment: [String: String]) -> [String] {
        let known = Set(GatewaySetting.all.map(\.environment)).union(Self.otherEnvironmentNames)
        return environment.keys.filter { name in
            name.hasPrefix("TOKEN_GATEWAY_") && !name.hasPrefix("TOKEN_GATEWAY_TEST_") && !known.contains(name)
        }.sorted()
    }

    /// Whether `flagValue`, given for secret setting `s` on the command line, carries the secret
    /// itself (not `@path`; for the Redis URL, one with a password).
    public static func isInlineSecret(_ s: GatewaySetting, flagValue: String) -> Bool {
        guard s.isSecret, !flagValue.hasPrefix("@") else { return false }
        if s == .redisURL { return (try? RedisConfiguration(url: flagValue))?.password != nil }
        return true
    }

    /// The warning for a secret given inline on the command line (names the setting, never the value).
    public static func commandLineSecretWarning(_ environmentName: String) -> String {
        let flag = GatewaySetting.all.first { $0.environment == environmentName }.map { "--" + $0.flag } ?? "its flag"
        return "\(environmentName) was given on the command line (\(flag)), where every local user can read it in "
            + "the process list; set \(environmentName) in the environment, or pass \(flag) @/path/to/file"
    }

    /// The text of the file a setting names as `@path`, without one trailing newline.
    static func readSettingFile(_ path: String, setting: GatewaySetting) throws(ConfigurationError) -> String {
        guard !path.isEmpty, let data = FileManager.default.contents(atPath: path),
            var text = String(data: data, encoding: .utf8)
        else {
            throw ConfigurationError(setting: setting.environment, problem: "cannot read file \(path)")
        }
        if text.last?.isNewline == true { text.removeLast() }
        return text
    }

    /// The value of secret setting `s` for a command other than `serve`: the flag's value, else
    /// the environment's; `@path` reads the file. Nil when neither is set. (The caller warns about
    /// an inline secret flag: ``isInlineSecret(_:flagValue:)``.)
    /// - Throws: ``ConfigurationError`` naming the setting (an unreadable file); never the value.
    public static func secretSetting(
        _ s: GatewaySetting, flag: String?, environment: [String: String]
    ) throws(ConfigurationError) -> String? {
        // As `serve` reads it: whitespace around the value is not part of it; empty is unset.
        guard let v = (flag ?? environment[s.environment])?.trimmingCharacters(in: .whitespacesAndNewlines), !v.isEmpty
        else { return nil }
        guard v.hasPrefix("@") else { return v }
        return try Self.readSettingFile(String(v.dropFirst()), setting: s)
    }
}

extension GatewayConfiguration {
    /// A DNS name (labels of letters, digits, `-` and `_`) or an IP address.
    static func isTLSServerName(_ name: String) -> Bool {
        (try? SocketAddress(ipAddress: name, port: 0)) != nil
            || TriggerHostAllowList.isHostname(name, underscores: true)
    }

    /// The Redis settings: `TOKEN_GATEWAY_REDIS_URL` and, for a `rediss` URL, the TLS files and server name. The
    /// TLS context is made here, once. `raw` gives a setting's value (flag, then environment).
    ///
    /// - Throws: ``ConfigurationError`` naming the setting: a malformed URL, TLS settings without a `rediss` URL,
    ///   a missing or unreadable file, or files that do not make a TLS context.
    public static func redisConfiguration(raw: (GatewaySetting) -> String?) throws(ConfigurationError)
        -> RedisConfiguration
    {
        var redis: RedisConfiguration
        do {
            redis = try RedisConfiguration(url: raw(.redisURL) ?? "redis://127.0.0.1:6379/0")
        } catch {
            throw ConfigurationError(setting: GatewaySetting.redisURL.environment, problem: "\(error)")
        }
        let tlsSettings: [GatewaySetting] = [.redisTLSCAFile, .redisTLSCertFile, .redisTLSKeyFile, .redisTLSServerName]
        guard redis.tls != nil else {
            if let setting = tlsSettings.first(where: { raw($0) != nil }) {
                throw ConfigurationError(
                    setting: setting.environment, problem: "is set, but the Redis URL is not a rediss URL (TLS)")
            }
            return redis
        }
        func readableFile(_ setting: GatewaySetting) throws(ConfigurationError) -> String? {
            guard let path = raw(setting) else { return nil }
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw ConfigurationError(setting: setting.environment, problem: "file is missing or unreadable")
            }
            return path
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        if let caFile = try readableFile(.redisTLSCAFile) {
            do {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            } catch {
                throw ConfigurationError(
                    setting: GatewaySetting.redisTLSCAFile.environment, problem: "is not a PEM certificate bundle")
            }
        }
        let certFile = try readableFile(.redisTLSCertFile)
        let keyFile = try readableFile(.redisTLSKeyFile)
        switch (certFile, keyFile) {
        case (let certFile?, let keyFile?):
            do {
                tls.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
            } catch {
                throw ConfigurationError(
                    setting: GatewaySetting.redisTLSCertFile.environment, problem: "is not a PEM certificate")
            }
            do {
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            } catch {
                // Never the key's content.
                throw ConfigurationError(
                    setting: GatewaySetting.redisTLSKeyFile.environment, problem: "is not a PEM private key")
            }
        case (nil, nil):
            break
        case (nil, _):
            throw ConfigurationError(
                setting: GatewaySetting.redisTLSCertFile.environment,
                problem: "is required with TOKEN_GATEWAY_REDIS_TLS_KEY_FILE")
        case (_, nil):
            throw ConfigurationError(
                setting: GatewaySetting.redisTLSKeyFile.environment,
                problem: "is required with TOKEN_GATEWAY_REDIS_TLS_CERT_FILE")
        }
        var serverName = raw(.redisTLSServerName)?.trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
        if serverName?.hasSuffix(".") == true { serverName?.removeLast() }  // a fully qualified name
        // A name to send as SNI and look for in the certificates (an IP address: the connected
        // address is checked instead, as without the setting). A scheme, a port or a path here
        // would fail every handshake at run time instead of here.
        if let serverName, !serverName.isEmpty, !Self.isTLSServerName(serverName) {
            throw ConfigurationError(
                setting: GatewaySetting.redisTLSServerName.environment,
                problem: "must be a host name or an IP address (no scheme, port or path)")
        }
        do {
            redis.tls = try RedisTLS(configuration: tls, serverName: serverName?.isEmpty == false ? serverName : nil)
        } catch {
            let setting: GatewaySetting = keyFile != nil ? .redisTLSKeyFile : .redisTLSCAFile
            throw ConfigurationError(setting: setting.environment, problem: "\(error)")
        }
        return redis
    }
}
