import ArgumentParser
import Foundation
import Logging
import TokenGateway

@main
struct TokenGatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token-gateway",
        abstract: "Gets Atlassian access tokens for an app's remote backend whenever it needs one.",
        subcommands: [
            Serve.self, Emulate.self, Demo.self, Installations.self, Token.self, CheckConfig.self, Keys.self,
        ],
        defaultSubcommand: Serve.self
    )

    /// Runs the command. A usage error (an unknown flag, a missing or malformed value, a failed
    /// validation) exits 2, as a bad setting does; ArgumentParser's own code for it is 64.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            if exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }
}

/// The settings every gateway-running command accepts; each flag overrides the environment
/// variable of the same meaning (contract §7).
/// Where Redis is and how to reach it over TLS: the settings every command that opens the store
/// takes (`serve`, `check-config`, `keys rewrap`, `demo`).
struct RedisOptions: ParsableArguments {
    @Option(help: "Redis URL, or @path (a password here shows in the process list) [TOKEN_GATEWAY_REDIS_URL]")
    var redisUrl: String?
    @Option(help: "CA bundle for Redis TLS [TOKEN_GATEWAY_REDIS_TLS_CA_FILE]") var redisTlsCaFile: String?
    @Option(help: "Client certificate for Redis TLS [TOKEN_GATEWAY_REDIS_TLS_CERT_FILE]") var redisTlsCertFile: String?
    @Option(help: "Client key for Redis TLS [TOKEN_GATEWAY_REDIS_TLS_KEY_FILE]") var redisTlsKeyFile: String?
    @Option(help: "Name to verify in Redis certificates [TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME]")
    var redisTlsServerName: String?

    /// Flag values keyed by the environment variable they override.
    var flags: [String: String] {
        let pairs: [(GatewaySetting, String?)] = [
            (.redisURL, self.redisUrl), (.redisTLSCAFile, self.redisTlsCaFile),
            (.redisTLSCertFile, self.redisTlsCertFile), (.redisTLSKeyFile, self.redisTlsKeyFile),
            (.redisTLSServerName, self.redisTlsServerName),
        ]
        var out: [String: String] = [:]
        for (setting, value) in pairs { if let value { out[setting.environment] = value } }
        return out
    }

    /// The TLS settings (not the URL): the flag, else the environment's value unless empty.
    func tlsSetting(_ setting: GatewaySetting, environment: [String: String]) -> String? {
        if let flag = self.flags[setting.environment] { return flag }
        return environment[setting.environment].flatMap { $0.isEmpty ? nil : $0 }
    }
}

struct SettingsOptions: ParsableArguments {
    @Option(help: "Listen address [TOKEN_GATEWAY_HOST]") var host: String?
    @Option(help: "Listen port [TOKEN_GATEWAY_PORT]") var port: String?
    @OptionGroup var redis: RedisOptions
    @Option(help: "Expected FIT audience, the app ARI [TOKEN_GATEWAY_FORGE_APP_ID]") var forgeAppId: String?
    @Option(help: "JWKS URL for Forge invocation tokens [TOKEN_GATEWAY_FORGE_JWKS_URL]") var forgeJwksUrl: String?
    @Option(help: "Allow-list of trigger hosts [TOKEN_GATEWAY_TRIGGER_HOSTS]") var triggerHosts: String?
    @Option(help: "Module keys allowed on the Forge routes [TOKEN_GATEWAY_FORGE_MODULE_KEYS]") var forgeModuleKeys:
        String?
    @Option(help: "Encryption key ring, better @path of a file with it [TOKEN_GATEWAY_ENCRYPTION_KEYS]")
    var encryptionKeys: String?
    @Option(help: "Callers JSON, better @path of a file with it [TOKEN_GATEWAY_CALLERS]") var callers: String?
    @Option(help: "Connect app baseUrl [TOKEN_GATEWAY_CONNECT_BASE_URL]") var connectBaseUrl: String?
    @Option(help: "Connect install keys base URL [TOKEN_GATEWAY_CONNECT_KEYS_URL]") var connectKeysUrl: String?
    @Option(help: "GraphQL endpoint for user tokens [TOKEN_GATEWAY_FORGE_GRAPHQL_URL]") var forgeGraphqlUrl: String?
    @Option(help: "User-token exchange budget per minute [TOKEN_GATEWAY_USER_EXCHANGES_PER_MINUTE]")
    var userExchangesPerMinute: String?
    @Option(help: "The gateway's public base URL [TOKEN_GATEWAY_PUBLIC_URL]") var publicUrl: String?
    @Option(help: "Log level trace…critical [TOKEN_GATEWAY_LOG_LEVEL]") var logLevel: String?
    @Option(help: "Log format logfmt|json [TOKEN_GATEWAY_LOG_FORMAT]") var logFormat: String?
    @Option(help: "Trigger attempts per round trip [TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS]") var triggerMaxAttempts:
        String?
    @Option(help: "Trigger call timeout, ms [TOKEN_GATEWAY_TRIGGER_ATTEMPT_TIMEOUT_MS]") var triggerAttemptTimeoutMs:
        String?
    @Option(help: "Delivery grace after a 2xx trigger answer, ms [TOKEN_GATEWAY_DELIVERY_GRACE_MS]")
    var deliveryGraceMs: String?
    @Option(help: "Refresh-ahead share of a token's lifetime [TOKEN_GATEWAY_REFRESH_AHEAD_FRACTION]")
    var refreshAheadFraction: String?
    @Option(help: "Failed round trips that open a circuit [TOKEN_GATEWAY_BREAKER_THRESHOLD]") var breakerThreshold:
        String?
    @Option(help: "Operations listener address [TOKEN_GATEWAY_OPS_HOST]") var opsHost: String?
    @Option(help: "Operations listener port: health, metrics, operator pages [TOKEN_GATEWAY_OPS_PORT]") var opsPort:
        String?
    @Option(help: "Allowed apiBaseUrl prefixes [TOKEN_GATEWAY_API_BASE_URL_PREFIXES]") var apiBaseUrlPrefixes: String?
    @Option(help: "First open window of a circuit, ms [TOKEN_GATEWAY_BREAKER_OPEN_MS]") var breakerOpenMs: String?
    @Option(help: "Named-trigger calls of one installation at once per process [TOKEN_GATEWAY_INVOKE_MAX_CONCURRENCY]")
    var invokeMaxConcurrency: String?
    @Option(help: "Event-loop threads: shared|pinned (one CPU each) [TOKEN_GATEWAY_EVENT_LOOP_AFFINITY]")
    var eventLoopAffinity: String?
    @Option(help: "Longest graceful shutdown, ms [TOKEN_GATEWAY_SHUTDOWN_TIMEOUT_MS]") var shutdownTimeoutMs: String?
    @Option(
        help: "Close a client connection silent this long with no answer due, ms [TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS]")
    var httpIdleTimeoutMs: String?
    @Option(help: "Client connections each listener holds at once [TOKEN_GATEWAY_MAX_CONNECTIONS]")
    var maxConnections: String?

    /// Flag values keyed by the environment variable they override.
    var flags: [String: String] {
        let pairs: [(GatewaySetting, String?)] = [
            (.host, self.host), (.port, self.port), (.forgeAppID, self.forgeAppId), (.forgeJWKSURL, self.forgeJwksUrl),
            (.triggerHosts, self.triggerHosts),
            (.encryptionKeys, self.encryptionKeys), (.callers, self.callers), (.connectBaseURL, self.connectBaseUrl),
            (.connectKeysURL, self.connectKeysUrl), (.forgeGraphQLURL, self.forgeGraphqlUrl),
            (.userExchangesPerMinute, self.userExchangesPerMinute), (.publicURL, self.publicUrl),
            (.logLevel, self.logLevel), (.logFormat, self.logFormat), (.triggerMaxAttempts, self.triggerMaxAttempts),
            (.triggerAttemptTimeout, self.triggerAttemptTimeoutMs), (.deliveryGrace, self.deliveryGraceMs),
            (.refreshAheadFraction, self.refreshAheadFraction), (.breakerThreshold, self.breakerThreshold),
            (.breakerOpen, self.breakerOpenMs), (.forgeModuleKeys, self.forgeModuleKeys), (.opsHost, self.opsHost),
            (.opsPort, self.opsPort), (.apiBaseURLPrefixes, self.apiBaseUrlPrefixes),
            (.invokeMaxConcurrency, self.invokeMaxConcurrency), (.eventLoopAffinity, self.eventLoopAffinity),
            (.shutdownTimeout, self.shutdownTimeoutMs), (.httpIdleTimeout, self.httpIdleTimeoutMs),
            (.maxConnections, self.maxConnections),
        ]
        var out = self.redis.flags
        for (setting, value) in pairs { if let value { out[setting.environment] = value } }
        return out
    }

    /// The validated configuration, or exit 2 with one line naming the bad setting.
    func load() throws -> GatewayConfiguration {
        do {
            return try GatewayConfiguration.load(environment: ProcessInfo.processInfo.environment, flags: self.flags)
        } catch {
            FileHandle.standardError.write(Data("token-gateway: \(error)\n".utf8))
            throw ExitCode(2)
        }
    }
}

func makeLogger(label: String, format: LogFormat, level: Logger.Level) -> Logger {
    Logger(label: label) { label in GatewayLogHandler(label: label, format: format, level: level) }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the gateway.")

    @OptionGroup var settings: SettingsOptions

    func run() async throws {
        let config = try self.settings.load()
        let logger = makeLogger(label: "token-gateway", format: config.logFormat, level: config.logLevel)
        for name in config.unknownEnvironmentNames {
            logger.warning(
                "unknown setting in the environment, ignored (misspelt?)",
                metadata: ["setting": "\(name)", "advice": "token-gateway serve --help lists every setting"])
        }
        for name in config.secretsFromCommandLine {
            logger.warning(
                "secret setting given on the command line",
                metadata: ["setting": "\(name)", "advice": "\(GatewayConfiguration.commandLineSecretWarning(name))"])
        }
        if let warning = config.publicURLWarning {
            logger.warning(
                "OAuth discovery names an address clients should not use", metadata: ["advice": "\(warning)"])
        }
        let gateway = Gateway(configuration: config, logger: logger)
        gateway.bootstrapMetrics()
        logger.info(
            "starting",
            metadata: ["listen": "\(config.host):\(config.port)", "callers": "\(config.callers.callers.count)"])
        try await gateway.run(
            // `ready` is logged by the gateway's readiness notice, once the store answers too.
            onOperationsServerRunning: { channel in
                logger.info(
                    "operations listener up",
                    metadata: [
                        "ops.host": "\(config.operationsListener?.host ?? "")",
                        "ops.port": "\(channel.localAddress?.port ?? config.operationsListener?.port ?? 0)",
                    ])
            })
        logger.info("stopped")
    }
}
