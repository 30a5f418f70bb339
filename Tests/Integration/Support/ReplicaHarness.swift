import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

@testable import TokenGateway

/// Several real gateway processes sharing one Redis, with the Forge emulator (in this process)
/// playing Atlassian's side: what production looks like behind a load balancer.
final class ReplicaHarness: Sendable {
    let emulator: ForgeEmulator
    let replicas: [GatewayProcess]
    let settings: [String: String]
    let http: HTTPClient
    /// A store on the same Redis and key ring, for inspecting what the replicas wrote.
    let store: GatewayStore

    init(
        emulator: ForgeEmulator, replicas: [GatewayProcess], settings: [String: String], http: HTTPClient,
        store: GatewayStore
    ) {
        self.emulator = emulator
        self.replicas = replicas
        self.settings = settings
        self.http = http
        self.store = store
    }

    static func run(
        replicas count: Int,
        redisURL: String = GatewayHarness.redisURL,
        extraSettings: [String: String] = [:],
        _ body: @Sendable (ReplicaHarness) async throws -> Void
    ) async throws {
        let logger = Logger(label: "replica-test") { _ in SwallowHandler() }
        var emulatorConfig = ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1")
        // No redelivery of a failed event: a test sees the gateway's first answer (the emulator's
        // redeliveries are tested on their own).
        emulatorConfig.eventRetries = 0
        // Installations start without a token, so a test's first request makes the round trip.
        // Forge sends one with the install (the emulator's default): tests of that path turn it on.
        emulatorConfig.endpointsCarrySystemToken = false
        let emulator = try ForgeEmulator(configuration: emulatorConfig, logger: logger)
        let emulatorGroup = ServiceGroup(services: [emulator], logger: logger)
        let http = HTTPClient(eventLoopGroupProvider: .singleton)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await emulatorGroup.run() }
            var started: [GatewayProcess] = []
            do {
                _ = try await emulator.waitUntilReady()
                var settings = GatewayHarness.settings(emulator: emulator, redisURL: redisURL, scopedInstallations: [])
                settings["TOKEN_GATEWAY_LOG_LEVEL"] = "info"
                for (k, v) in extraSettings { settings[k] = v }
                for _ in 0..<count { started.append(try await GatewayProcess.start(settings: settings)) }
                emulator.setGatewayURL(started[0].url)
                let config = try GatewayConfiguration.load(environment: settings)
                let redis = RedisClient(configuration: config.redis, logger: logger)
                let store = GatewayStore(redis: redis, box: config.encryptionKeys)
                let harness = ReplicaHarness(
                    emulator: emulator, replicas: started, settings: settings, http: http, store: store)
                try await body(harness)
                await redis.shutdown()
            } catch {
                for r in started { await r.stop() }
                await emulatorGroup.triggerGracefulShutdown()
                try? await http.shutdown()
                throw error
            }
            for r in started { await r.stop() }
            await emulatorGroup.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        try await http.shutdown()
    }

    /// A GET/POST to a replica with the full caller's credential.
    func call(
        _ replica: Int, _ method: HTTPMethod, _ path: String, timeout: Duration = .seconds(35)
    ) async throws -> GatewayHarness.Answer {
        var request = HTTPClientRequest(url: self.replicas[replica].url + path)
        request.method = method
        request.headers.add(name: "authorization", value: "Bearer \(GatewayHarness.callerSecret)")
        let response = try await self.http.execute(request, timeout: .nanoseconds(timeout.nanoseconds))
        let bytes = try await response.body.collect(upTo: 4 << 20)
        var headers: [String: String] = [:]
        for h in response.headers { headers[h.name.lowercased()] = h.value }
        return GatewayHarness.Answer(status: Int(response.status.code), headers: headers, body: String(buffer: bytes))
    }

    func token(_ replica: Int, _ installation: EmulatedInstallation, query: String = "") async throws
        -> GatewayHarness.Answer
    {
        try await self.call(
            replica, .GET, GatewayHarness.path(installation) + "/token" + (query.isEmpty ? "" : "?" + query))
    }

    /// The installation id an emulator access token was minted for.
    static func installationOf(token: String) -> String? {
        let parts = token.split(separator: ".")
        guard parts.count == 3, let payload = Base64URL.decode(String(parts[1])),
            let json = try? JSONSerialization.jsonObject(with: Data(payload)) as? [String: Any]
        else { return nil }
        return json["installationId"] as? String
    }
}

struct SwallowHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .critical
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { nil }
        set {}
    }
    func log(event: LogEvent) {}
}
