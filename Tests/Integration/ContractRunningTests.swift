import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Testing

@testable import TokenGateway

#if canImport(Glibc)
    import Glibc
#endif

/// Contract §7 with the real binary: every flag means what its variable means, `CALLERS=@path`,
/// a malformed setting stops `serve` with exit 2 and one line naming it, and SIGTERM/SIGINT stop
/// accepting connections while the request in flight still gets its answer.
@Suite("Contract: running the gateway")
struct ContractRunningTests {
    /// A minimal valid environment (Redis is not reached before the settings are checked).
    static func validEnvironment() -> [String: String] {
        [
            "TOKEN_GATEWAY_REDIS_URL": GatewayHarness.redisURL,
            "TOKEN_GATEWAY_FORGE_APP_ID": ForgeEmulatorConfiguration.demoAppId,
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"caller-secret-0123456789","installations":["*"]}]"#,
            "TOKEN_GATEWAY_PORT": "0",
        ]
    }

    /// Runs `token-gateway serve` with `arguments` and `environment` and returns its exit status
    /// and stderr; a process still running after 60 s (it did not stop at its settings) is killed.
    static func serve(_ arguments: [String], environment: [String: String]) async throws -> (status: Int32, err: String)
    {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: GatewayProcess.binary)
        process.arguments = ["serve"] + arguments
        var env = ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
        for (k, v) in environment { env[k] = v }
        process.environment = env
        let errFile = FileManager.default.temporaryDirectory.appendingPathComponent("serve-\(UUID().uuidString).err")
        FileManager.default.createFile(atPath: errFile.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: errFile) }
        let handle = try FileHandle(forWritingTo: errFile)
        process.standardError = handle
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = ContinuousClock.now + .seconds(60)
        while process.isRunning {
            if ContinuousClock.now >= deadline { kill(process.processIdentifier, SIGKILL) }
            try await Task.sleep(for: .milliseconds(10))
        }
        try handle.close()
        let err = String(decoding: (try? Data(contentsOf: errFile)) ?? Data(), as: UTF8.self)
        return (process.terminationStatus, err)
    }

    /// A malformed value for each setting's flag (written `--flag=value`).
    static let malformed: [String: String] = [
        "TOKEN_GATEWAY_HOST": "gateway host",
        "TOKEN_GATEWAY_PORT": "eighty",
        "TOKEN_GATEWAY_REDIS_URL": "ftp://127.0.0.1:6379/0",
        "TOKEN_GATEWAY_FORGE_APP_ID": "not-an-app",
        "TOKEN_GATEWAY_FORGE_JWKS_URL": "jwks",
        "TOKEN_GATEWAY_TRIGGER_HOSTS": "http://trigger.example.com",
        "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:c2hvcnQtc2VjcmV0LWtleQ",
        "TOKEN_GATEWAY_CALLERS": "{\"callers\":\"not an array\"}",
        "TOKEN_GATEWAY_CONNECT_BASE_URL": "app.example.com",
        "TOKEN_GATEWAY_CONNECT_KEYS_URL": "keys",
        "TOKEN_GATEWAY_FORGE_GRAPHQL_URL": "graphql",
        "TOKEN_GATEWAY_USER_EXCHANGES_PER_MINUTE": "0",
        "TOKEN_GATEWAY_PUBLIC_URL": "gateway.example.com",
        "TOKEN_GATEWAY_LOG_LEVEL": "loud",
        "TOKEN_GATEWAY_LOG_FORMAT": "xml",
        "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS": "0",
        "TOKEN_GATEWAY_TRIGGER_ATTEMPT_TIMEOUT_MS": "5",
        "TOKEN_GATEWAY_DELIVERY_GRACE_MS": "-1",
        "TOKEN_GATEWAY_REFRESH_AHEAD_FRACTION": "0.95",
        "TOKEN_GATEWAY_BREAKER_THRESHOLD": "0",
        "TOKEN_GATEWAY_BREAKER_OPEN_MS": "1",
        "TOKEN_GATEWAY_FORGE_MODULE_KEYS": "gateway-endpoint,,other",
        "TOKEN_GATEWAY_OPS_HOST": "127.0.0.1",  // without TOKEN_GATEWAY_OPS_PORT
        "TOKEN_GATEWAY_OPS_PORT": "eighty",
        "TOKEN_GATEWAY_API_BASE_URL_PREFIXES": "https://api.atlassian.com/ex",
        "TOKEN_GATEWAY_INVOKE_MAX_CONCURRENCY": "0",
        "TOKEN_GATEWAY_EVENT_LOOP_AFFINITY": "sometimes",
        "TOKEN_GATEWAY_SHUTDOWN_TIMEOUT_MS": "500",
        "TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS": "999",
        "TOKEN_GATEWAY_MAX_CONNECTIONS": "0",
        // The TLS settings next to a Redis URL that is not rediss://.
        "TOKEN_GATEWAY_REDIS_TLS_CA_FILE": "/etc/token-gateway/redis-ca.pem",
        "TOKEN_GATEWAY_REDIS_TLS_CERT_FILE": "/etc/token-gateway/redis-client.pem",
        "TOKEN_GATEWAY_REDIS_TLS_KEY_FILE": "/etc/token-gateway/redis-client.key",
        "TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME": "redis.internal.example.com",
    ]

    static func expectOneLine(
        _ outcome: (status: Int32, err: String), naming variable: String, without secret: String? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let lines = outcome.err.split(separator: "\n").filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        #expect(
            outcome.status == 2, "\(variable): exit \(outcome.status): \(outcome.err)", sourceLocation: sourceLocation)
        #expect(lines.count == 1, "\(variable): \(outcome.err)", sourceLocation: sourceLocation)
        #expect(lines.first?.contains(variable) == true, "\(variable): \(outcome.err)", sourceLocation: sourceLocation)
        if let secret {
            #expect(!outcome.err.contains(secret), "\(variable) printed its value", sourceLocation: sourceLocation)
        }
    }

    @Test("every setting's flag means what its variable means: a malformed flag value is named by its variable")
    func flagsMeanTheirVariables() async throws {
        // Every setting has a malformed value here.
        let settings = GatewaySetting.all
        #expect(Set(settings.map(\.environment)) == Set(Self.malformed.keys))
        for setting in settings {
            let value = try #require(Self.malformed[setting.environment])
            // The environment holds a valid value (or none); the flag overrides it.
            let outcome = try await Self.serve(["--\(setting.flag)=\(value)"], environment: Self.validEnvironment())
            Self.expectOneLine(outcome, naming: setting.environment, without: setting.isSecret ? value : nil)
        }
    }

    @Test("a malformed or missing setting in the environment stops serve with exit 2 and one line naming it")
    func malformedEnvironmentForServe() async throws {
        for (variable, value) in Self.malformed {
            var environment = Self.validEnvironment()
            environment[variable] = value
            let secret = GatewaySetting.all.first { $0.environment == variable }?.isSecret == true ? value : nil
            Self.expectOneLine(try await Self.serve([], environment: environment), naming: variable, without: secret)
        }
        for required in ["TOKEN_GATEWAY_FORGE_APP_ID", "TOKEN_GATEWAY_ENCRYPTION_KEYS", "TOKEN_GATEWAY_CALLERS"] {
            var environment = Self.validEnvironment()
            environment[required] = nil
            Self.expectOneLine(try await Self.serve([], environment: environment), naming: required)
        }
        var unreadable = Self.validEnvironment()
        unreadable["TOKEN_GATEWAY_CALLERS"] = "@/nonexistent/callers-\(UUID().uuidString).json"
        Self.expectOneLine(try await Self.serve([], environment: unreadable), naming: "TOKEN_GATEWAY_CALLERS")
    }

    @Test("the --host flag overrides TOKEN_GATEWAY_HOST: the gateway listens where the flag says")
    func hostFlag() async throws {
        var settings = Self.validEnvironment()
        // 192.0.2.1 (TEST-NET-1) is no address of this machine: listening there would fail.
        settings["TOKEN_GATEWAY_HOST"] = "192.0.2.1"
        let process = try await GatewayProcess.start(settings: settings, arguments: ["--host=127.0.0.1"])
        #expect(try await Self.status(process.url + "/health/live") == 200)
        await process.stop()
    }

    @Test("--event-loop-affinity=pinned keeps each event-loop thread on one CPU of those the process may use")
    func pinnedEventLoops() async throws {
        let process = try await GatewayProcess.start(
            settings: Self.validEnvironment(), arguments: ["--event-loop-affinity=pinned"])
        #expect(try await Self.status(process.url + "/health/live") == 200)
        let allowed = try EventLoopPinning.allowedCPUs()
        // NIO names its event-loop threads NIO-ELT-… (NIO-SGLTN-… for the process-wide group).
        let loops = Self.threads(of: process.process.processIdentifier).filter { $0.name.hasPrefix("NIO-") }
        #expect(!loops.isEmpty)
        for thread in loops {
            #expect(thread.cpus.count == 1, "\(thread.name) may run on \(thread.cpus)")
            #expect(Set(thread.cpus).isSubset(of: Set(allowed)), "\(thread.name) on \(thread.cpus)")
        }
        #expect(Set(loops.flatMap(\.cpus)) == Set(allowed.prefix(loops.count)))
        #expect(process.lines.contains { $0.contains("msg=\"event loops pinned\"") })
        await process.stop()
    }

    /// The threads of process `pid` with their names and the CPUs each may run on (from /proc).
    static func threads(of pid: Int32) -> [(name: String, cpus: [Int])] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap { tid in
            guard let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8) else {
                return nil
            }
            var name = ""
            var cpus: [Int] = []
            for line in status.split(separator: "\n") {
                if line.hasPrefix("Name:") { name = line.dropFirst(5).trimmingCharacters(in: .whitespaces) }
                if line.hasPrefix("Cpus_allowed_list:") {
                    cpus = Self.cpuList(line.dropFirst(18).trimmingCharacters(in: .whitespaces))
                }
            }
            return (name, cpus)
        }
    }

    /// `0-2,5` → [0, 1, 2, 5].
    static func cpuList(_ text: String) -> [Int] {
        text.split(separator: ",").flatMap { part -> [Int] in
            let bounds = part.split(separator: "-").compactMap { Int($0) }
            guard let first = bounds.first else { return [] }
            return Array(first...(bounds.last ?? first))
        }
    }

    @Test("TOKEN_GATEWAY_CALLERS=@path reads the callers from that file")
    func callersFromFile() async throws {
        let secret = "file-caller-secret-" + UUID().uuidString.lowercased()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("callers-\(UUID().uuidString).json")
        try Data(#"[{"name":"from-file","secret":"\#(secret)","installations":["*"]}]"#.utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        var settings = Self.validEnvironment()
        settings["TOKEN_GATEWAY_CALLERS"] = "@" + file.path
        let process = try await GatewayProcess.start(settings: settings)
        #expect(try await Self.status(process.url + "/v1/installations?limit=1", bearer: secret) == 200)
        #expect(
            try await Self.status(process.url + "/v1/installations?limit=1", bearer: "caller-secret-0123456789") == 401)
        await process.stop()
        #expect(!process.lines.joined().contains(secret))
    }

    /// The status of a GET with AsyncHTTPClient's shared client.
    static func status(_ url: String, bearer: String? = nil) async throws -> Int {
        var request = HTTPClientRequest(url: url)
        if let bearer { request.headers.add(name: "authorization", value: "Bearer \(bearer)") }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
        _ = try await response.body.collect(upTo: 1 << 20)
        return Int(response.status.code)
    }

    @Test("on a separate operations port, readiness answers 503 until the main listener is up, though Redis answers")
    func readyWaitsForTheMainListener() async throws {
        try await GatewayHarness.run { h in
            // A second gateway on the same Redis of which only Redis and the operations listener run.
            var configuration = h.gateway.configuration
            configuration.port = 0
            let opsPort = try RedisServerProcess.freeLoopbackPort()
            configuration.operationsListener = OperationsListener(port: opsPort)
            let starting = Gateway(configuration: configuration, logger: h.gateway.logger)
            let up = AsyncStream<Void>.makeStream()
            let operations = try #require(
                starting.makeOperationsApplication { _ in
                    up.continuation.yield()
                    up.continuation.finish()
                })
            let group = ServiceGroup(
                services: [HTTPClientService(client: starting.httpClient), starting.redis, operations],
                logger: h.gateway.logger)
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                for await _ in up.stream {}
                try await starting.redis.ping(timeout: .seconds(5))
                let answer = try await h.http.execute(
                    HTTPClientRequest(url: "http://127.0.0.1:\(opsPort)/health/ready"), timeout: .seconds(5))
                #expect(answer.status == .serviceUnavailable)
                #expect(answer.headers.first(name: "Retry-After") == "1")
                let body = String(buffer: try await answer.body.collect(upTo: 1 << 16))
                #expect(body.contains(#""code":"store_unavailable""#) && body.contains("starting"), "\(body)")
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
            }
        }
    }

    @Test(
        "a drain longer than TOKEN_GATEWAY_SHUTDOWN_TIMEOUT_MS is cut off and the process exits 0; the operations listener's readiness answers 503 during the drain"
    )
    func shutdownTimeout() async throws {
        let holder = try await HoldingServer.start()
        let opsPort = try RedisServerProcess.freeLoopbackPort()
        do {
            try await ReplicaHarness.run(
                replicas: 1,
                extraSettings: [
                    "TOKEN_GATEWAY_TRIGGER_HOSTS": holder.baseURL, "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS": "1",
                    "TOKEN_GATEWAY_TRIGGER_ATTEMPT_TIMEOUT_MS": "60000", "TOKEN_GATEWAY_OPS_HOST": "127.0.0.1",
                    "TOKEN_GATEWAY_OPS_PORT": "\(opsPort)", "TOKEN_GATEWAY_SHUTDOWN_TIMEOUT_MS": "8000",
                ]
            ) { h in
                let installation = try await Self.installedWithHeldTrigger(h, holder)
                let gateway = h.replicas[0]
                let ready = HTTPClientRequest(url: "http://127.0.0.1:\(opsPort)/health/ready")
                #expect(try await h.http.execute(ready, timeout: .seconds(5)).status == .ok)
                // A client that never sends the rest of its body…
                let stalled = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connect(host: "127.0.0.1", port: gateway.port).get()
                try await stalled.writeAndFlush(
                    ByteBuffer(
                        string:
                            "POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                            + "\r\nContent-Length: 100\r\n\r\ngrant_type"))
                // …and a caller that waits up to 30 s for a trigger call that is never answered.
                let inFlight = Task { try? await h.token(0, installation, query: "timeout=30000") }
                #expect(await holder.waitForConnections(1))
                #expect(holder.connections == 1)
                gateway.signal(SIGTERM)
                #expect(try await Events.wait { await Self.refused(port: gateway.port) })
                // Draining: the operations listener still answers, and says the replica is going.
                let draining = try await h.http.execute(ready, timeout: .seconds(5))
                #expect(draining.status == .serviceUnavailable)
                let body = String(buffer: try await draining.body.collect(upTo: 1 << 16))
                #expect(body.contains(#""code":"store_unavailable""#) && body.contains("shutting down"), "\(body)")
                // The caller's 30 s are not waited out: after 8 s what is left is cut off, and the
                // process exits 0 (without the limit it would still run when this gives up at 25 s).
                #expect(await gateway.waitForExit(timeout: .seconds(25)) == 0)
                #expect(gateway.lines.contains { $0.contains("graceful shutdown took longer than allowed") })
                _ = await inFlight.value
                try? await stalled.close()
                await holder.stop()
            }
        } catch {
            await holder.stop()
            throw error
        }
    }

    /// An installation whose trigger URL is `holder`'s (which never answers).
    static func installedWithHeldTrigger(_ h: ReplicaHarness, _ holder: LoopbackListener) async throws
        -> EmulatedInstallation
    {
        let installation = h.emulator.makeInstallation()
        #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
        #expect(try await h.emulator.register(installation, authTriggerUrl: holder.baseURL + "/x1/held").status == 200)
        return installation
    }

    /// Whether a new TCP connection to `port` on the loopback is refused.
    static func refused(port: Int) async -> Bool {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.seconds(5))
                .connect(host: "127.0.0.1", port: port).get()
            try? await channel.close()
            return false
        } catch {
            return true
        }
    }

    @Test(
        "on SIGTERM or SIGINT the gateway stops accepting connections, answers the request in flight, exits 0",
        arguments: [SIGTERM, SIGINT])
    func shutdownSignal(signal: Int32) async throws {
        let holder = try await HoldingServer.start()
        do {
            try await ReplicaHarness.run(
                replicas: 1,
                extraSettings: [
                    "TOKEN_GATEWAY_TRIGGER_HOSTS": holder.baseURL, "TOKEN_GATEWAY_TRIGGER_MAX_ATTEMPTS": "1",
                    "TOKEN_GATEWAY_TRIGGER_ATTEMPT_TIMEOUT_MS": "60000",
                ]
            ) { h in
                let installation = try await Self.installedWithHeldTrigger(h, holder)
                let gateway = h.replicas[0]
                let inFlight = Task { try await h.token(0, installation, query: "timeout=30000") }
                // The trigger call is in flight (held, unanswered): the caller is waiting.
                #expect(await holder.waitForConnections(1))
                #expect(holder.connections == 1)
                gateway.signal(signal)
                // New connections are refused while the process still runs for its request in flight.
                #expect(try await Events.wait { await Self.refused(port: gateway.port) })
                #expect(gateway.process.isRunning)
                // The trigger's connection ends: the request in flight gets its answer, not a reset.
                await holder.stop()
                let answer = try await inFlight.value
                #expect(answer.status == 502)
                #expect(answer.errorCode == "trigger_failed")
                #expect(await gateway.waitForExit() == 0)
            }
        } catch {
            await holder.stop()
            throw error
        }
    }
}
