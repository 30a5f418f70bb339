import Foundation
import Synchronization
import Testing

@testable import TokenGateway

/// Runs the real `token-gateway` binary with arguments and environment; returns exit status and output.
/// Output is collected by file-handle callbacks (never a blocking read on the concurrency pool,
/// which would starve the gateway running in this process).
func runCLI(_ arguments: [String], environment: [String: String]) async throws -> (
    status: Int32, out: String, err: String
) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: GatewayProcess.binary)
    process.arguments = arguments
    var env = ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    let collected = Mutex<(out: Data, err: Data, open: Int)>((Data(), Data(), 2))
    let (done, doneContinuation) = AsyncStream<Void>.makeStream()
    // Each pipe is read on its own thread with blocking reads until EOF (never on the concurrency
    // pool, which would starve the gateway running in this process; never with FileHandle's
    // readabilityHandler, which can crash libdispatch on Linux).
    func collect(_ handle: FileHandle, isOut: Bool) {
        Thread {
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                collected.withLock { c in
                    if isOut { c.out.append(data) } else { c.err.append(data) }
                }
            }
            let finished = collected.withLock { c -> Bool in
                c.open -= 1
                return c.open == 0
            }
            if finished { doneContinuation.finish() }
        }.start()
    }
    let (exited, exitedContinuation) = AsyncStream<Void>.makeStream()
    process.terminationHandler = { _ in exitedContinuation.finish() }
    try process.run()
    collect(out.fileHandleForReading, isOut: true)
    collect(err.fileHandleForReading, isOut: false)
    for await _ in done {}
    for await _ in exited {}
    let (o, e, _) = collected.withLock { $0 }
    return (process.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

@Suite("Operator command line")
struct OperatorCLITests {
    @Test("demo with Redis unreachable: exit 1 and a clear line, without the password of the Redis URL")
    func demoNeverPrintsTheRedisPassword() async throws {
        let port = try RedisServerProcess.freeLoopbackPort()
        let result = try await runCLI(
            ["demo", "--redis-url", "redis://:hunter2-demo-password@127.0.0.1:\(port)/0"], environment: [:])
        #expect(result.status == 1)
        #expect(result.out.contains("Redis is not reachable at redis://:***@127.0.0.1:\(port)/0"), "\(result.out)")
        #expect(!result.out.contains("hunter2") && !result.err.contains("hunter2"))
    }

    @Test("demo runs the whole flow on the Redis it is given and leaves nothing of its own there")
    func demoLeavesNoKeys() async throws {
        // A database of its own on the test Redis: the other tests, running at the same time, write
        // to theirs, so every key that comes and stays here is the demo's.
        let base = GatewayHarness.redisURL
        let url =
            base.range(of: "/[0-9]+$", options: .regularExpression).map { base.replacingCharacters(in: $0, with: "/9") }
            ?? base + "/9"
        try await RedisClientTests.withClient(url: url) { redis in
            let before = Set(try await Security.scan(pattern: "*", in: redis))
            let result = try await runCLI(
                ["demo", "--redis-url", url, "--installations", "2", "--concurrency", "5"], environment: [:])
            #expect(result.status == 0, "\(result.out)\n\(result.err)")
            #expect(result.out.contains("removed the demo's"), "\(result.out)")
            #expect(try await Security.scan(pattern: "tgdemo*", in: redis).isEmpty)
            // Nothing under the gateway's own prefix either (what expired meanwhile is gone, no more).
            let after = Set(try await Security.scan(pattern: "*", in: redis))
            #expect(after.subtracting(before).isEmpty, "\(after.subtracting(before).sorted())")
        }
    }

    @Test("bad arguments exit 2 with the reason, as bad settings do; help still exits 0")
    func badArgumentsExitTwo() async throws {
        let cases: [([String], String)] = [
            (["keys", "rewrap", "--batch-size", "0"], "--batch-size must be in 1…100000"),
            (["keys", "rewrap", "--cursor", "x"], "--cursor must be a SCAN cursor"),
            (["serve", "--no-such-flag"], "Unknown option '--no-such-flag'"),
            (["serve", "--port"], "Missing value for '--port"),
            (["no-such-command"], "Unexpected argument 'no-such-command'"),
            (["emulate", "--install=-1"], "--install must be in 0…100000"),
            (["emulate", "--push-interval=-5"], "--push-interval must be 0 (never) or more"),
            (["emulate", "--log-level", "loud"], "--log-level must be trace"),
            (["demo", "--installations=-1"], "--installations must be in 1…1000"),
            (["demo", "--concurrency", "0"], "--concurrency must be in 1…10000"),
            // The caller commands' gateway URL: http or https with a host, and never echoed (it
            // could hold a password).
            (["token", "x", "--gateway-url", "localhost:8080"], "--gateway-url / TOKEN_GATEWAY_URL must be"),
            (["installations", "list", "--gateway-url", "ftp://127.0.0.1"], "--gateway-url / TOKEN_GATEWAY_URL"),
            (["token", "x", "--gateway-url", "http://u:pw-in-url@127.0.0.1:1"], "--gateway-url / TOKEN_GATEWAY_URL"),
        ]
        for (arguments, reason) in cases {
            let result = try await runCLI(arguments, environment: ["TOKEN_GATEWAY_CALLER_SECRET": "unused-secret"])
            #expect(result.status == 2, "\(arguments): \(result.err)")
            #expect(result.err.contains(reason), "\(arguments): \(result.err)")
            #expect(!result.err.contains("pw-in-url"), "\(arguments): \(result.err)")
        }
        // TOKEN_GATEWAY_URL is held to the same rule; set but empty, it is unset (the default).
        let badVariable = try await runCLI(
            ["token", "x"], environment: ["TOKEN_GATEWAY_URL": "127.0.0.1:8080", "TOKEN_GATEWAY_CALLER_SECRET": "s"])
        #expect(badVariable.status == 2, "\(badVariable.err)")
        #expect(badVariable.err.contains("TOKEN_GATEWAY_URL must be"), "\(badVariable.err)")
        let emptyVariable = try await runCLI(
            ["token", "x", "--help"], environment: ["TOKEN_GATEWAY_URL": ""])
        #expect(emptyVariable.out.contains("default: http://127.0.0.1:8080"), "\(emptyVariable.out)")
        let help = try await runCLI(["keys", "rewrap", "--help"], environment: [:])
        #expect(help.status == 0)
        #expect(help.out.contains("USAGE"), "\(help.out)")
    }

    @Test("serve --help lists every setting: its flag, its summary and the variable it overrides")
    func helpListsEverySetting() async throws {
        let help = try await runCLI(["serve", "--help"], environment: [:])
        #expect(help.status == 0)
        // ArgumentParser wraps the text: compare with the whitespace folded.
        let folded = help.out.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        for setting in GatewaySetting.all {
            #expect(folded.contains("--\(setting.flag) <"), "\(setting.flag)")
            #expect(folded.contains("[\(setting.environment)]"), "\(setting.environment)")
            #expect(folded.contains(setting.summary.split(whereSeparator: \.isWhitespace).joined(separator: " ")))
        }
        let rewrap = try await runCLI(["keys", "rewrap", "--help"], environment: [:])
        for setting in [
            GatewaySetting.redisURL, .redisTLSCAFile, .redisTLSCertFile, .redisTLSKeyFile, .redisTLSServerName,
        ] {
            #expect(rewrap.out.contains("--\(setting.flag) <"), "\(setting.flag)")
        }
    }

    @Test("emulate refuses a token lifetime Forge never gives (over 4 h, or under a minute): exit 2, a clear line")
    func emulateRefusesAnUnrealTokenLifetime() async throws {
        for lifetime in ["14401", "59"] {
            let result = try await runCLI(["emulate", "--token-lifetime", lifetime, "--port", "0"], environment: [:])
            #expect(result.status == 2, "\(lifetime): \(result.err)")
            #expect(result.err.contains("--token-lifetime must be in 60…14400 seconds"), "\(result.err)")
        }
    }

    @Test("installations list/show and token work as a caller, with clear exit codes and no secret printed")
    func callerCommands() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let env = ["TOKEN_GATEWAY_URL": h.gatewayURL, "TOKEN_GATEWAY_CALLER_SECRET": GatewayHarness.callerSecret]
            let list = try await runCLI(["installations", "list", "--json", "--limit", "1000"], environment: env)
            #expect(list.status == 0)
            #expect(list.out.contains(installation.id))
            let show = try await runCLI(["installations", "show", installation.id], environment: env)
            #expect(show.status == 0)
            #expect(show.out.contains("\"triggerRegistered\" : true"))
            let token = try await runCLI(["token", installation.id], environment: env)
            #expect(token.status == 0)
            #expect(token.out.contains("\"source\" : \"trigger\""))
            // The stored token (the emulator records its own copy only after the gateway answered).
            let delivered = try #require(try await h.gateway.store.systemToken(installation.installationID)).value
            #expect(!token.out.contains(delivered))
            #expect(!(token.out + token.err + list.out + list.err).contains(GatewayHarness.callerSecret))
            let shown = try await runCLI(["token", installation.id, "--show-token"], environment: env)
            #expect(shown.out.contains(delivered))
            let unknown = try await runCLI(["token", h.emulator.makeInstallation().id], environment: env)
            #expect(unknown.status == 3)
            #expect(unknown.err.contains("installation_not_found"))
            let noSecret = try await runCLI(
                ["token", installation.id], environment: ["TOKEN_GATEWAY_URL": h.gatewayURL])
            #expect(noSecret.status == 2)
            let wrongSecret = try await runCLI(
                ["token", installation.id],
                environment: ["TOKEN_GATEWAY_URL": h.gatewayURL, "TOKEN_GATEWAY_CALLER_SECRET": "wrong"])
            #expect(wrongSecret.status == 3)
            // A value the gateway refuses (400 invalid_parameter) is a bad argument too.
            let tooMany = try await runCLI(["installations", "list", "--limit", "5000"], environment: env)
            #expect(tooMany.status == 2, "\(tooMany.err)")
            #expect(tooMany.err.contains("invalid_parameter"), "\(tooMany.err)")
        }
    }

    @Test("check-config validates settings, reaches Redis and the JWKS, and prints no secret")
    func checkConfig() async throws {
        try await GatewayHarness.run { h in
            let settings = GatewayHarness.settings(
                emulator: h.emulator, redisURL: GatewayHarness.redisURL, scopedInstallations: [])
            let ok = try await runCLI(["check-config"], environment: settings)
            #expect(ok.status == 0)
            #expect(ok.out.contains("redis reachable yes"))
            #expect(ok.out.contains("jwks reachable  yes"))
            let key = settings["TOKEN_GATEWAY_ENCRYPTION_KEYS"]!.split(separator: ":")[1]
            #expect(!(ok.out + ok.err).contains(String(key)))
            #expect(!(ok.out + ok.err).contains(GatewayHarness.callerSecret))
            // A JWKS URL that redirects (here to the real JWKS): serve would not follow it, so
            // check-config does not call it reachable either.
            let redirect = try await LoopbackListener.start(
                answering: "HTTP/1.1 301 Moved Permanently\r\nLocation: \(h.emulator.jwksURL)\r\n"
                    + "Content-Length: 0\r\nConnection: close\r\n\r\n")
            var redirected = settings
            redirected["TOKEN_GATEWAY_FORGE_JWKS_URL"] = redirect.baseURL + "/jwks.json"
            let moved = try await runCLI(["check-config"], environment: redirected)
            await redirect.stop()
            #expect(moved.status == 1, "\(moved.out)")
            #expect(moved.out.contains("jwks reachable  NO (HTTP 301"), "\(moved.out)")
            // A misspelt setting is named (its value never), and the rest still checks out.
            var misspelt = settings
            misspelt["TOKEN_GATEWAY_FORGE_JWKS_URI"] = "https://secret-looking.example/jwks"
            let typo = try await runCLI(["check-config"], environment: misspelt)
            #expect(typo.status == 0, "\(typo.err)")
            #expect(typo.err.contains("warning: TOKEN_GATEWAY_FORGE_JWKS_URI is no setting"), "\(typo.err)")
            #expect(!(typo.out + typo.err).contains("secret-looking"))
            #expect(!typo.err.contains("TOKEN_GATEWAY_PUBLIC_URL"), "\(typo.err)")
            // Listening on every address without a public URL: OAuth discovery would name 0.0.0.0.
            var everywhere = settings
            everywhere["TOKEN_GATEWAY_HOST"] = "0.0.0.0"
            let wildcard = try await runCLI(["check-config"], environment: everywhere)
            #expect(wildcard.status == 0, "\(wildcard.err)")
            #expect(wildcard.err.contains("warning: TOKEN_GATEWAY_PUBLIC_URL is unset"), "\(wildcard.err)")
            everywhere["TOKEN_GATEWAY_PUBLIC_URL"] = "https://tokens.example.com"
            let named = try await runCLI(["check-config"], environment: everywhere)
            #expect(!named.err.contains("TOKEN_GATEWAY_PUBLIC_URL"), "\(named.err)")
            var broken = settings
            broken["TOKEN_GATEWAY_ENCRYPTION_KEYS"] = "k1:c2hvcnQ="
            let bad = try await runCLI(["check-config"], environment: broken)
            #expect(bad.status == 2)
            #expect(bad.err.contains("TOKEN_GATEWAY_ENCRYPTION_KEYS"))
            #expect(bad.err.split(separator: "\n").count == 1)
            var missing = settings
            missing["TOKEN_GATEWAY_FORGE_APP_ID"] = nil
            let absent = try await runCLI(["serve"], environment: missing)
            #expect(absent.status == 2)
            #expect(absent.err.contains("TOKEN_GATEWAY_FORGE_APP_ID"))
            var down = settings
            down["TOKEN_GATEWAY_REDIS_URL"] = "redis://127.0.0.1:1/0"
            let unreachable = try await runCLI(["check-config"], environment: down)
            #expect(unreachable.status == 1)
            #expect(unreachable.out.contains("redis reachable NO"))
            // A password the server does not take: the reason is printed, never the password.
            var refused = settings
            refused["TOKEN_GATEWAY_REDIS_URL"] = GatewayHarness.redisURL.replacingOccurrences(
                of: "redis://", with: "redis://:check-config-wrong-pw@")
            let wrong = try await runCLI(["check-config"], environment: refused)
            #expect(wrong.status == 1)
            #expect(
                wrong.out.contains("redis reachable NO (Redis is unavailable: Redis refused the credentials"),
                "\(wrong.out)")
            #expect(!(wrong.out + wrong.err).contains("check-config-wrong-pw"))
        }
    }
}
