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
extension GatewaySetting {
    /// A flag's help: the setting's summary (with its default), where to keep a secret one, and the
    /// environment variable it overrides. One text for the flag, the variable and the docs' table.
    var help: ArgumentHelp {
        let secret = self.isSecret ? "; better @path of a file holding it (a value here shows in the process list)" : ""
        return ArgumentHelp("\(self.summary)\(secret) [\(self.environment)]")
    }
}

/// Where Redis is and how to reach it over TLS: the settings every command that opens the store
/// takes (`serve`, `check-config`, `keys rewrap`, `demo`).
struct RedisOptions: ParsableArguments {
    @Option(help: GatewaySetting.redisURL.help)
    var redisUrl: String?
    @Option(help: GatewaySetting.redisTLSCAFile.help) var redisTlsCaFile: String?
    @Option(help: GatewaySetting.redisTLSCertFile.help) var redisTlsCertFile: String?
    @Option(help: GatewaySetting.redisTLSKeyFile.help) var redisTlsKeyFile: String?
    @Option(help: GatewaySetting.redisTLSServerName.help)
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

    /// The TLS settings (not the URL): the flag, else the environment's value, without the
    /// whitespace around it, unless empty (as `serve` reads them).
    func tlsSetting(_ setting: GatewaySetting, environment: [String: String]) -> String? {
        let value = (self.flags[setting.environment] ?? environment[setting.environment])?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return value?.isEmpty == false ? value : nil
    }
}

struct SettingsOptions: ParsableArguments {
    @Option(help: GatewaySetting.host.help) var host: String?
    @Option(help: GatewaySetting.port.help) var port: String?
    @OptionGroup var redis: RedisOptions
    @Option(help: GatewaySetting.forgeAppID.help) var forgeAppId: String?
    @Option(help: GatewaySetting.forgeJWKSURL.help) var forgeJwksUrl: String?
    @Option(help: GatewaySetting.triggerHosts.help) var triggerHosts: String?
    @Option(help: GatewaySetting.forgeModuleKeys.help) var forgeModuleKeys: String?
    @Option(help: GatewaySetting.encryptionKeys.help)
    var encryptionKeys: String?
    @Option(help: GatewaySetting.callers.help) var callers: String?
    @Option(help: GatewaySetting.connectBaseURL.help) var connectBaseUrl: String?
    @Option(help: GatewaySetting.connectKeysURL.help) var connectKeysUrl: String?
    @Option(help: GatewaySetting.forgeGraphQLURL.help) var forgeGraphqlUrl: String?
    @Option(help: GatewaySetting.userExchangesPerMinute.help)
    var userExchangesPerMinute: String?
    @Option(help: GatewaySetting.publicURL.help) var publicUrl: String?
    @Option(help: GatewaySetting.logLevel.help) var logLevel: String?
    @Option(help: GatewaySetting.logFormat.help) var logFormat: String?
    @Option(help: GatewaySetting.triggerMaxAttempts.help) var triggerMaxAttempts: String?
    @Option(help: GatewaySetting.triggerAttemptTimeout.help) var triggerAttemptTimeoutMs: String?
    @Option(help: GatewaySetting.deliveryGrace.help)
    var deliveryGraceMs: String?
    @Option(help: GatewaySetting.refreshAheadFraction.help)
    var refreshAheadFraction: String?
    @Option(help: GatewaySetting.breakerThreshold.help) var breakerThreshold: String?
    @Option(help: GatewaySetting.opsHost.help) var opsHost: String?
    @Option(help: GatewaySetting.opsPort.help) var opsPort: String?
    @Option(help: GatewaySetting.apiBaseURLPrefixes.help) var apiBaseUrlPrefixes: String?
    @Option(help: GatewaySetting.breakerOpen.help) var breakerOpenMs: String?
    @Option(help: GatewaySetting.invokeMaxConcurrency.help)
    var invokeMaxConcurrency: String?
    @Option(help: GatewaySetting.eventLoopAffinity.help)
    var eventLoopAffinity: String?
    @Option(help: GatewaySetting.shutdownTimeout.help) var shutdownTimeoutMs: String?
    @Option(help: GatewaySetting.httpIdleTimeout.help)
    var httpIdleTimeoutMs: String?
    @Option(help: GatewaySetting.maxConnections.help)
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
