import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Testing

@testable import TokenGateway

/// Runs a real gateway (real Redis, real HTTP on loopback) with the Forge emulator playing
/// Atlassian's side, for the length of one test.
final class GatewayHarness: Sendable {
    static let callerSecret = "caller-secret-0123456789abcdef-full"
    static let scopedSecret = "caller-secret-0123456789abcdef-scoped"

    let emulator: ForgeEmulator
    let gateway: Gateway
    let gatewayURL: String
    let http: HTTPClient
    let logs: LogSink

    init(emulator: ForgeEmulator, gateway: Gateway, gatewayURL: String, http: HTTPClient, logs: LogSink) {
        self.emulator = emulator
        self.gateway = gateway
        self.gatewayURL = gatewayURL
        self.http = http
        self.logs = logs
    }

    /// The Redis every integration test shares: the test command's, or one the tests start on a
    /// free port (never a Redis that happens to run on this machine).
    static var redisURL: String {
        RedisServerProcess.sharedURL()
    }

    static func settings(emulator: ForgeEmulator, redisURL: String, scopedInstallations: [String]) -> [String: String] {
        let key = Data((0..<32).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        let scoped = scopedInstallations.map { "\"\($0)\"" }.joined(separator: ",")
        return [
            "TOKEN_GATEWAY_PORT": "0",
            "TOKEN_GATEWAY_REDIS_URL": redisURL,
            "TOKEN_GATEWAY_FORGE_APP_ID": ForgeEmulatorConfiguration.demoAppId,
            "TOKEN_GATEWAY_FORGE_JWKS_URL": emulator.jwksURL,
            "TOKEN_GATEWAY_TRIGGER_HOSTS": emulator.triggerHostEntry,
            "TOKEN_GATEWAY_FORGE_GRAPHQL_URL": emulator.baseURL + "/graphql",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:\(key)",
            // Limits far above what any test asks for: every test shares one Redis and these names.
            "TOKEN_GATEWAY_CALLERS": """
            [{"name":"full","secret":"\(callerSecret)","installations":["*"],"clientKeys":["*"],\(Self.noLimits)},
             {"name":"scoped","secret":"\(scopedSecret)","installations":[\(scoped)],\(Self.noLimits)}]
            """,
            "TOKEN_GATEWAY_LOG_LEVEL": "debug",
        ]
    }

    static let noLimits = #""limits":{"refreshesPerMinute":1000000,"userExchangesPerMinute":1000000}"#

    /// Starts the emulator and a gateway, runs `body`, and shuts both down gracefully.
    static func run(
        redisURL: String = GatewayHarness.redisURL,
        scopedInstallations: [String] = [],
        connectBaseURL: String? = nil,
        configure: @Sendable (inout GatewayConfiguration) -> Void = { _ in },
        emulatorConfigure: @Sendable (inout ForgeEmulatorConfiguration) -> Void = { _ in },
        _ body: @Sendable (GatewayHarness) async throws -> Void
    ) async throws {
        let logs = LogSink.memory()
        let logger = Logger(label: "test") { GatewayLogHandler(label: $0, format: .logfmt, level: .debug, sink: logs) }
        var emulatorConfig = ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1")
        emulatorConfig.remoteCallTimeout = .seconds(10)
        // No redelivery of a failed event: a test sees the gateway's first answer (the emulator's
        // redeliveries are tested on their own).
        emulatorConfig.eventRetries = 0
        // Installations start without a token, so a test's first request makes the round trip.
        // Forge sends one with the install (the emulator's default): tests of that path turn it on.
        emulatorConfig.endpointsCarrySystemToken = false
        emulatorConfigure(&emulatorConfig)
        let emulator = try ForgeEmulator(configuration: emulatorConfig, logger: logger)
        let emulatorGroup = ServiceGroup(services: [emulator], logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await emulatorGroup.run() }
            _ = try await emulator.waitUntilReady()
            var config = try GatewayConfiguration.load(
                environment: Self.settings(
                    emulator: emulator, redisURL: redisURL, scopedInstallations: scopedInstallations))
            if let connectBaseURL {
                // Connect on: the emulator's Connect side signs installs for this app base URL.
                config.connectBaseURL = connectBaseURL
                config.connectKeysURL = emulator.connectKeysURL
                emulator.setConnectAppBaseURL(connectBaseURL)
            }
            configure(&config)
            let gateway = Gateway(configuration: config, logger: logger)
            let ready = AsyncStream<Int>.makeStream()
            let gatewayGroup = ServiceGroup(
                services: gateway.services { channel in
                    ready.continuation.yield(channel.localAddress?.port ?? 0)
                    ready.continuation.finish()
                }, logger: logger)
            tasks.addTask { try await gatewayGroup.run() }
            var port = 0
            for await p in ready.stream { port = p }
            await Self.subscribed(gateway)
            let url = "http://127.0.0.1:\(port)"
            emulator.setGatewayURL(url)
            let harness = GatewayHarness(
                emulator: emulator, gateway: gateway, gatewayURL: url, http: gateway.httpClient, logs: logs)
            do {
                try await body(harness)
            } catch {
                await gatewayGroup.triggerGracefulShutdown()
                await emulatorGroup.triggerGracefulShutdown()
                throw error
            }
            await gatewayGroup.triggerGracefulShutdown()
            await emulatorGroup.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    /// Returns once `gateway` has subscribed to the store's announcements, as a replica has
    /// shortly after it starts (what it remembers before that is read again before it is served,
    /// which tests counting store reads or fast answers would see). At once when Redis does not
    /// answer: a test of an outage has no subscription to wait for.
    static func subscribed(_ gateway: Gateway) async {
        guard (try? await gateway.redis.ping(timeout: .seconds(2))) != nil else { return }
        await gateway.flow.subscribed()
    }

    /// A new installation, installed and registered through the emulator.
    func installed() async throws -> EmulatedInstallation {
        let installation = self.emulator.makeInstallation()
        try await self.emulator.install(installation)
        return installation
    }

    struct Answer: Sendable {
        let status: Int
        let headers: [String: String]
        let body: String
        var json: [String: Any] {
            ((try? JSONSerialization.jsonObject(with: Data(self.body.utf8))) as? [String: Any]) ?? [:]
        }
        var errorCode: String? { (self.json["error"] as? [String: Any])?["code"] as? String }
    }

    /// One HTTP call to the gateway.
    func call(
        _ method: HTTPMethod, _ path: String, secret: String? = GatewayHarness.callerSecret,
        headers: [String: String] = [:], body: String? = nil, timeout: Duration = .seconds(35)
    ) async throws -> Answer {
        var request = HTTPClientRequest(url: self.gatewayURL + path)
        request.method = method
        if let secret { request.headers.add(name: "authorization", value: "Bearer \(secret)") }
        for (k, v) in headers { request.headers.replaceOrAdd(name: k, value: v) }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        let response = try await self.http.execute(request, timeout: .nanoseconds(timeout.nanoseconds))
        let bytes = try await response.body.collect(upTo: 4 << 20)
        var headerMap: [String: String] = [:]
        for h in response.headers { headerMap[h.name.lowercased()] = h.value }
        return Answer(status: Int(response.status.code), headers: headerMap, body: String(buffer: bytes))
    }

    static func path(_ installation: EmulatedInstallation) -> String {
        "/v1/installations/" + installation.id.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
    }

    func token(_ installation: EmulatedInstallation, query: String = "", secret: String = GatewayHarness.callerSecret)
        async throws -> Answer
    {
        try await self.call(
            .GET, Self.path(installation) + "/token" + (query.isEmpty ? "" : "?" + query), secret: secret)
    }
}

extension EmulatedInstallation {
    var installationID: InstallationID { InstallationID(self.id)! }
}

extension GatewayHarness {
    /// Runs a second gateway process (its own HTTP server, Redis pool, flow and caches) against the
    /// same Redis and the same settings, encryption keys included, as a second replica would be.
    func withSecondGateway(_ body: @Sendable (_ url: String) async throws -> Void) async throws {
        try await self.withSecondGateway { url, _ in try await body(url) }
    }

    /// ``withSecondGateway(_:)``, handing the second gateway itself to `body` as well (to look
    /// into its flow's memory).
    func withSecondGateway(_ body: @Sendable (_ url: String, _ gateway: Gateway) async throws -> Void) async throws {
        var configuration = self.gateway.configuration
        configuration.port = 0
        let second = Gateway(configuration: configuration, logger: self.gateway.logger)
        let ready = AsyncStream<Int>.makeStream()
        let group = ServiceGroup(
            services: second.services { channel in
                ready.continuation.yield(channel.localAddress?.port ?? 0)
                ready.continuation.finish()
            }, logger: self.gateway.logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var port = 0
            for await p in ready.stream { port = p }
            await Self.subscribed(second)
            do {
                try await body("http://127.0.0.1:\(port)", second)
            } catch {
                await group.triggerGracefulShutdown()
                throw error
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }
}
