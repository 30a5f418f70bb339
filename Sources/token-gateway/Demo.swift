import ArgumentParser
import AsyncHTTPClient
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import ServiceLifecycle
import TokenGateway

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole RFC-34 flow once: gateway + Forge emulator on Redis, and show what happens.")

    @OptionGroup var redis: RedisOptions
    @Option(help: "Installations to create") var installations = 3
    @Option(help: "Concurrent callers in the coalescing step") var concurrency = 50
    @Flag(help: "Show the gateway's and emulator's logs") var verbose = false

    func validate() throws {
        guard (1...1000).contains(self.installations) else {
            throw ValidationError("--installations must be in 1…1000")
        }
        guard (1...10_000).contains(self.concurrency) else { throw ValidationError("--concurrency must be in 1…10000") }
    }

    func run() async throws {
        let (redisURL, redisTLS) = try self.redisSettings()
        let quiet = Logger(label: "demo") { _ in SwallowLogHandler() }
        let logger = self.verbose ? makeLogger(label: "demo", format: .logfmt, level: .info) : quiet
        let callerSecret = Base64URL.encode((0..<32).map { _ in UInt8.random(in: 0...255) })
        let emulator = try ForgeEmulator(
            configuration: .init(gatewayURL: "http://127.0.0.1:1"), logger: logger)
        let emulatorGroup = ServiceGroup(services: [emulator], logger: logger)
        // Its own keys, deleted when it is done: the Redis it is pointed at (a running gateway's,
        // say) keeps nothing of the demo.
        let storePrefix = "tgdemo" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let ran = try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await emulatorGroup.run() }
            _ = try await emulator.waitUntilReady()
            var config: GatewayConfiguration
            do {
                config = try GatewayConfiguration.load(
                    environment: Self.settings(redisURL: redisURL, callerSecret: callerSecret, emulator: emulator)
                        .merging(redisTLS) { own, _ in own })
                config.storePrefix = storePrefix
            } catch {
                FileHandle.standardError.write(Data("token-gateway demo: \(error)\n".utf8))
                throw ExitCode(2)
            }
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
            let gatewayURL = "http://127.0.0.1:\(port)"
            emulator.setGatewayURL(gatewayURL)
            emulator.setConnectAppBaseURL("https://connect-app.example.com")
            do {
                try await gateway.redis.ping(timeout: .seconds(2))
            } catch {
                // The configuration's description, never the URL given: it may hold a password.
                print(
                    "Redis is not reachable at \(gateway.configuration.redis): start one (scripts/run.sh does) or pass --redis-url."
                )
                await gatewayGroup.triggerGracefulShutdown()
                await emulatorGroup.triggerGracefulShutdown()
                throw ExitCode(1)
            }
            print(
                "gateway  \(gatewayURL)\nemulator \(emulator.baseURL)\nredis    \(gateway.configuration.redis)"
                    + " (keys \(storePrefix):*, deleted at the end)\n")
            let script = DemoScript(
                gatewayURL: gatewayURL, callerSecret: callerSecret, emulator: emulator,
                httpClient: gateway.httpClient, installations: self.installations, concurrency: self.concurrency)
            var failure = await Self.runInterruptibly { try await script.run() }
            await gatewayGroup.triggerGracefulShutdown()
            await emulatorGroup.triggerGracefulShutdown()
            do {
                try await tasks.waitForAll()
            } catch {
                failure = failure ?? error
            }
            return (redis: config.redis, failure: failure)
        }
        let redis = RedisClient(configuration: ran.redis, logger: quiet)
        let removed = await Self.deleteKeys(prefix: storePrefix, redis: redis)
        await redis.shutdown()
        print("\nremoved the demo's \(removed) keys (\(storePrefix):*) from Redis")
        if let failure = ran.failure { throw failure }
    }
}

extension Demo {
    /// The Redis URL (flag, else `TOKEN_GATEWAY_REDIS_URL`; `@path` reads a file) and the Redis TLS
    /// settings, as `serve` takes them; everything else is the demo's own.
    func redisSettings() throws -> (url: String, tls: [String: String]) {
        let environment = ProcessInfo.processInfo.environment
        let url: String
        do {
            url =
                try GatewayConfiguration.secretSetting(.redisURL, flag: self.redis.redisUrl, environment: environment)
                ?? "redis://127.0.0.1:6379/0"
        } catch {
            FileHandle.standardError.write(Data("token-gateway demo: \(error)\n".utf8))
            throw ExitCode(2)
        }
        var tls: [String: String] = [:]
        for setting in [GatewaySetting.redisTLSCAFile, .redisTLSCertFile, .redisTLSKeyFile, .redisTLSServerName] {
            tls[setting.environment] = self.redis.tlsSetting(setting, environment: environment)
        }
        return (url, tls)
    }

    /// Runs `body`, cancelled by Ctrl-C (SIGINT) or SIGTERM, so the demo still deletes its keys
    /// and stops its servers; returns what it threw.
    static func runInterruptibly(_ body: @escaping @Sendable () async throws -> Void) async -> (any Error)? {
        let task = Task { try await body() }
        let sources = [SIGINT, SIGTERM].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler {
                FileHandle.standardError.write(Data("\ninterrupted: stopping and deleting the demo's keys\n".utf8))
                task.cancel()
            }
            source.resume()
            return source
        }
        defer { for source in sources { source.cancel() } }
        do {
            try await task.value
            return nil
        } catch {
            return error
        }
    }

    /// The demo gateway's settings: a fresh key ring, one caller, the emulator as Forge.
    static func settings(redisURL: String, callerSecret: String, emulator: ForgeEmulator) -> [String: String] {
        let key = Base64URL.encode((0..<32).map { _ in UInt8.random(in: 0...255) })
        return [
            "TOKEN_GATEWAY_PORT": "0",
            "TOKEN_GATEWAY_REDIS_URL": redisURL,
            "TOKEN_GATEWAY_FORGE_APP_ID": ForgeEmulatorConfiguration.demoAppId,
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "demo:\(key)",
            "TOKEN_GATEWAY_CALLERS":
                #"[{"name":"demo","secret":"\#(callerSecret)","installations":["*"],"clientKeys":["*"]}]"#,
            "TOKEN_GATEWAY_FORGE_JWKS_URL": emulator.jwksURL,
            "TOKEN_GATEWAY_TRIGGER_HOSTS": emulator.triggerHostEntry,
            "TOKEN_GATEWAY_FORGE_GRAPHQL_URL": emulator.baseURL + "/graphql",
            "TOKEN_GATEWAY_CONNECT_KEYS_URL": emulator.connectKeysURL,
            "TOKEN_GATEWAY_CONNECT_BASE_URL": "https://connect-app.example.com",
        ]
    }

    /// Deletes every key under `prefix` (bounded: at most 10 000 SCAN steps); returns how many.
    static func deleteKeys(prefix: String, redis: RedisClient) async -> Int {
        var cursor = "0"
        var removed = 0
        for _ in 0..<10_000 {
            guard let step = try? await redis.scan(cursor: cursor, match: prefix + ":*", count: 500) else { break }
            for key in step.keys where (try? await redis.send(["DEL", key])) != nil { removed += 1 }
            cursor = step.cursor
            if cursor == "0" { break }
        }
        return removed
    }
}

/// The scripted walk through the flow that `demo` prints.
struct DemoScript {
    let gatewayURL: String
    let callerSecret: String
    let emulator: ForgeEmulator
    let httpClient: HTTPClient
    let installations: Int
    let concurrency: Int

    func fetch(_ id: String, refresh: Bool = false, asUser: String? = nil) async throws -> (
        status: Int, source: String, expiresAt: String, ms: Double
    ) {
        let path = "/v1/installations/\(id.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? id)/token"
        var request = HTTPClientRequest(
            url: self.gatewayURL + path + (refresh ? "/refresh" : "") + (asUser.map { "?asUser=\($0)" } ?? ""))
        request.method = refresh ? .POST : .GET
        request.headers.add(name: "authorization", value: "Bearer \(self.callerSecret)")
        let started = ContinuousClock.now
        let response = try await self.httpClient.execute(request, timeout: .seconds(30))
        let body = try await response.body.collect(upTo: 1 << 20)
        let elapsed = ContinuousClock.now - started
        let object = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
        let error = (object["error"] as? [String: Any])?["code"] as? String
        return (
            Int(response.status.code), (object["source"] as? String) ?? error ?? "?",
            (object["expiresAt"] as? String) ?? "-",
            Double(elapsed.components.attoseconds) / 1e15 + Double(elapsed.components.seconds) * 1000
        )
    }

    /// POSTs JSON as the caller.
    func post(_ path: String, _ body: [String: Any]) async throws -> (status: Int, json: [String: Any]) {
        var request = HTTPClientRequest(url: self.gatewayURL + path)
        request.method = .POST
        request.headers.add(name: "authorization", value: "Bearer \(self.callerSecret)")
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let response = try await self.httpClient.execute(request, timeout: .seconds(30))
        let bytes = try await response.body.collect(upTo: 1 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: bytes))) as? [String: Any] ?? [:]
        return (Int(response.status.code), json)
    }

    func connect(linkedTo installation: EmulatedInstallation) async throws {
        print("")
        let tenant = self.emulator.makeConnectTenant(linkedTo: installation)
        let installed = try await self.emulator.connectInstall(tenant)
        print("connect     signed install of clientKey \(tenant.clientKey) → \(installed.status)")
        let jwt = self.emulator.mintConnectJWT(for: tenant, method: "GET", url: "/issue-panel?issueKey=DEMO-1")
        let verified = try await self.post(
            "/v1/connect/verify", ["jwt": jwt, "method": "GET", "url": "/issue-panel?issueKey=DEMO-1"])
        print(
            "connect     verify an inbound product JWT → \(verified.status) clientKey=\(verified.json["clientKey"] ?? "-") installationId=\(verified.json["installationId"] ?? "-")"
        )
        let signed = try await self.post(
            "/v1/connect/sign",
            ["clientKey": tenant.clientKey, "method": "GET", "url": tenant.baseUrl + "/rest/api/3/myself"])
        print(
            "connect     sign an outbound call → \(signed.status) (a JWT valid until \(signed.json["expiresAt"] ?? "-"))"
        )
        let rotated = self.emulator.rotateSharedSecret(of: tenant)
        _ = try await self.emulator.connectInstall(rotated)
        let stale = try await self.post(
            "/v1/connect/verify", ["jwt": jwt, "method": "GET", "url": "/issue-panel?issueKey=DEMO-1"])
        print(
            "connect     reinstall with a new shared secret: the old secret's JWT → \(stale.status) \((stale.json["error"] as? [String: Any])?["code"] ?? "")"
        )
    }

    func run() async throws {
        var created: [EmulatedInstallation] = []
        for _ in 0..<self.installations {
            let installation = self.emulator.makeInstallation()
            try await self.emulator.install(installation)
            created.append(installation)
            print(
                "installed   \(installation.id)  (lifecycle + register: Ed25519 trigger key issued, a system token delivered)"
            )
        }
        print("")
        for installation in created {
            let first = try await self.fetch(installation.id)
            print(
                String(
                    format: "first fetch %@  → %d source=%@ expiresAt=%@ (%.1f ms, trigger calls: %d)",
                    installation.id, first.status, first.source, first.expiresAt, first.ms,
                    self.emulator.triggerCalls(for: installation)))
            let warm = try await self.fetch(installation.id)
            print(
                String(
                    format: "cached      %@  → %d source=%@ (%.2f ms, trigger calls: %d)",
                    installation.id, warm.status, warm.source, warm.ms, self.emulator.triggerCalls(for: installation)))
        }
        if let first = created.first {
            print("")
            let refreshing = try await self.fetch(first.id, refresh: true)
            print(
                String(
                    format: "refresh     %@  → %d source=%@ (%.1f ms, trigger calls: %d)",
                    first.id, refreshing.status, refreshing.source, refreshing.ms,
                    self.emulator.triggerCalls(for: first)))
        }
        if let first = created.first {
            let user = "5b10ac8d82e05b22cc7d4ef5"
            let exchanged = try await self.fetch(first.id, asUser: user)
            print(
                String(
                    format: "user token  %@  asUser=%@ → %d source=%@ (%.1f ms)", first.id, user, exchanged.status,
                    exchanged.source, exchanged.ms))
            let again = try await self.fetch(first.id, asUser: user)
            print(
                String(
                    format: "user token  %@  asUser=%@ → %d source=%@ (%.2f ms)", first.id, user, again.status,
                    again.source, again.ms))
        }
        if let first = created.first { try await self.connect(linkedTo: first) }
        // An installation whose install brought no token: its first callers make the round trip.
        let extra = self.emulator.makeInstallation()
        try await self.emulator.install(extra, lifecycleSystemToken: false)
        let before = self.emulator.totalTriggerCalls
        let results = try await withThrowingTaskGroup(
            of: (status: Int, source: String, expiresAt: String, ms: Double).self
        ) { group in
            for _ in 0..<self.concurrency { group.addTask { try await self.fetch(extra.id) } }
            var all: [(status: Int, source: String, expiresAt: String, ms: Double)] = []
            for try await r in group { all.append(r) }
            return all
        }
        let ok = results.filter { $0.status == 200 }.count
        let distinct = Set(results.map(\.expiresAt)).count
        print("")
        print(
            "\(self.concurrency) concurrent callers on an installation without a token yet → \(ok) answered 200, \(distinct) distinct token(s), \(self.emulator.totalTriggerCalls - before) trigger call(s)"
        )
        let push = try await self.emulator.push(extra, expiresAt: Date().addingTimeInterval(7200))
        print("pushed a token with 2 h left → gateway answered \(push.status) \(push.body)")
        let afterPush = try await self.fetch(extra.id)
        print("fetch after push → \(afterPush.status) source=\(afterPush.source) expiresAt=\(afterPush.expiresAt)")
        let fromBrowser = try await self.emulator.invokeFromUI(
            extra, path: "/forge/register", body: Data(#"{"authTriggerUrl":"https://elsewhere.example/x1/a"}"#.utf8))
        print("re-pointing the trigger from a UI module (xen:macro FIT) → gateway answered \(fromBrowser.status)")
        try await self.emulator.uninstall(extra)
        let gone = try await self.fetch(extra.id)
        print("after preUninstall (POST /forge/pre-uninstall) → \(gone.status) \(gone.source)")
    }
}

/// Drops every log record (the demo prints its own summary).
struct SwallowLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .critical
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }
    func log(event: LogEvent) {}
}
