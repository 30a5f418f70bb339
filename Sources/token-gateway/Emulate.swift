import ArgumentParser
import ForgeEmulator
import Foundation
import Logging
import ServiceLifecycle
import TokenGateway

struct Emulate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the Forge emulator on its own (Atlassian's side, for local development).",
        discussion: """
            Serves a JWKS, mints Forge invocation tokens and access tokens, runs signed web triggers \
            that call the gateway back, and has a small admin API on loopback:
              POST /admin/installations                  create, install and register one
              GET  /admin/installations                  list them
              POST /admin/installations/{uuid}/push      push a fresh token
              POST /admin/installations/{uuid}/uninstall uninstall
              GET  /admin/stats                          trigger calls per installation
              PUT  /admin/installations/{uuid}/named-triggers/{key}  define and register a named trigger
              POST /admin/named-triggers/release         let held named-trigger calls answer
            """)

    @Option(help: "Listen address") var host = "127.0.0.1"
    @Option(help: "Listen port") var port = 8081
    @Option(help: "Base URL of the gateway the emulator calls") var gatewayUrl = "http://127.0.0.1:8080"
    @Option(help: "The app id (FIT audience)") var appId = ForgeEmulatorConfiguration.demoAppId
    @Option(help: "Lifetime of minted access tokens, seconds (60…14400: Forge tokens live at most 4 h)")
    var tokenLifetime = 3600
    @Option(help: "Push a fresh token to every installation every N seconds (0: never)") var pushInterval = 0
    @Option(help: "Install this many installations at start (after the gateway answers)") var install = 0
    @Option(help: "Log level") var logLevel = "info"
    @Flag(
        inversion: .prefixedNo,
        help: """
            Lifecycle events and the install handler's registration carry a fresh system token, as \
            Forge sends them with the companion's manifest (--no-install-tokens: an installation \
            starts without a token, so its first request makes the round trip)
            """)
    var installTokens = true
    @Option(name: .customLong("named-trigger"), help: "Register an echoing named trigger with this key (repeatable)")
    var namedTriggers: [String] = []

    func validate() throws {
        guard (60...14400).contains(self.tokenLifetime) else {
            throw ValidationError("--token-lifetime must be in 60…14400 seconds (Forge tokens live at most 4 h)")
        }
        guard (0...100_000).contains(self.install) else { throw ValidationError("--install must be in 0…100000") }
        guard self.pushInterval >= 0 else { throw ValidationError("--push-interval must be 0 (never) or more") }
        guard Logger.Level(rawValue: self.logLevel.lowercased()) != nil else {
            throw ValidationError("--log-level must be trace, debug, info, notice, warning, error or critical")
        }
    }

    func run() async throws {
        let logger = makeLogger(
            label: "forge-emulator", format: .logfmt, level: Logger.Level(rawValue: self.logLevel.lowercased()) ?? .info
        )
        var config = ForgeEmulatorConfiguration(appId: self.appId, gatewayURL: self.gatewayUrl)
        config.host = self.host
        config.port = self.port
        config.tokenLifetime = .seconds(self.tokenLifetime)
        if self.pushInterval > 0 { config.scheduledPushInterval = .seconds(self.pushInterval) }
        config.namedTriggerKeys = self.namedTriggers
        config.endpointsCarrySystemToken = self.installTokens
        let emulator = try ForgeEmulator(configuration: config, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: emulator)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        let count = self.install
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            tasks.addTask {
                _ = try await emulator.waitUntilReady()
                logger.info("emulator ready", metadata: ["url": "\(emulator.baseURL)", "jwks": "\(emulator.jwksURL)"])
                for _ in 0..<count {
                    let installation = emulator.makeInstallation()
                    try await emulator.install(installation)
                    print("installed \(installation.id)")
                }
            }
            try await tasks.waitForAll()
        }
    }
}
