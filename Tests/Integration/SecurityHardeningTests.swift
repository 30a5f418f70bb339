import AsyncHTTPClient
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Synchronization
import Testing

@testable import TokenGateway

/// Attacks on the gateway's edges performed over real HTTP against real Redis: log injection,
/// secrets on the command line, the operations listener, trust roots, the install-key budget,
/// signed-install replays, per-caller limits, undecryptable and forged store data, and waiter caps.
@Suite("Security: hardening", .serialized)
struct SecurityHardeningTests {
    /// Whether `line` (one log line without its newline) holds a character a terminal or a log
    /// viewer would act on: any control character, DEL, C1, U+2028/U+2029 or a format character.
    static func holdsControl(_ line: String) -> Bool {
        line.unicodeScalars.contains { GatewayLogHandler.mustEscape($0) }
    }

    @Test("an event type full of control characters cannot forge or break log lines (logfmt and JSON)")
    func logInjectionThroughEventType() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let hostile =
                "x\u{1B}[2J\u{1B}]0;owned\u{07}\r\nts=2026-01-01T00:00:00Z level=critical msg=forged\ttab\u{2028}ls\u{2029}ps"
                + "\u{85}nel\u{7F}del\u{9B}csi\u{202E}rtl\u{200B}zw\u{0}nul"
            let fit = try h.emulator.mintFIT(for: installation)
            let body = String(
                decoding: try JSONSerialization.data(withJSONObject: ["eventType": hostile]), as: UTF8.self)
            let answer = try await h.call(
                .POST, "/forge/lifecycle", secret: fit, headers: ["content-type": "application/json"], body: body)
            #expect(answer.status == 200)
            let lines = h.logs.captured.filter { $0.contains("lifecycle") && $0.contains("ignored") }
            #expect(!lines.isEmpty)
            for line in lines {
                let text = String(line.dropLast())  // the line's own newline
                #expect(!text.contains("\n"))
                #expect(!Self.holdsControl(text), "control character in \(text.debugDescription)")
                // The forged record stays inside the one quoted value.
                #expect(text.hasPrefix("ts=") && text.hasSuffix("\""), "\(text)")
                #expect(text.components(separatedBy: " level=").count == 3, "\(text)")  // its own, and the quoted one
                #expect(text.contains("\\u001b[2J"))
            }
            // The same value through the JSON format stays one parseable object that reads back as sent.
            let json = GatewayLogHandler.format(
                format: .json, timestamp: Date(), level: .info, label: "t", message: "m",
                metadata: ["lifecycle.event": "\(hostile.prefix(64))"])
            #expect(!Self.holdsControl(json))
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: String])
            #expect(object["lifecycle.event"] == String(hostile.prefix(64)))
        }
    }

    @Test(
        "secrets given inline as flags are used, with a warning that names the variable, never the value; @file flags work"
    )
    func secretsFromFlagsAreUsedWithAWarning() async throws {
        try await GatewayHarness.run { h in
            let settings = GatewayHarness.settings(
                emulator: h.emulator, redisURL: GatewayHarness.redisURL, scopedInstallations: [])
            let callers = settings["TOKEN_GATEWAY_CALLERS"]!
            let keys = settings["TOKEN_GATEWAY_ENCRYPTION_KEYS"]!
            var withoutSecrets = settings
            withoutSecrets["TOKEN_GATEWAY_CALLERS"] = nil
            withoutSecrets["TOKEN_GATEWAY_ENCRYPTION_KEYS"] = nil
            // contract §7: every setting is a flag too. The secret is used from the flag (the
            // environment does not have it) and the warning names the variable only.
            let attempts: [(flags: [String], variable: String, secret: String)] = [
                (["--callers", callers], "TOKEN_GATEWAY_CALLERS", GatewayHarness.callerSecret),
                (["--encryption-keys", keys], "TOKEN_GATEWAY_ENCRYPTION_KEYS", String(keys.dropFirst(3))),
            ]
            for attempt in attempts {
                var environment = withoutSecrets
                environment[
                    attempt.variable == "TOKEN_GATEWAY_CALLERS"
                        ? "TOKEN_GATEWAY_ENCRYPTION_KEYS" : "TOKEN_GATEWAY_CALLERS"] =
                    attempt.variable == "TOKEN_GATEWAY_CALLERS" ? keys : callers
                let run = try await runCLI(["check-config"] + attempt.flags, environment: environment)
                #expect(run.status == 0, "\(attempt.flags[0]): \(run.err)")
                #expect(run.err.contains("warning: \(attempt.variable) was given on the command line"), "\(run.err)")
                #expect(!(run.out + run.err).contains(attempt.secret))
            }
            let redisWithPassword = try await runCLI(
                ["check-config", "--redis-url", "redis://:hunter2-redis-password@127.0.0.1:1/0"], environment: settings)
            #expect(redisWithPassword.err.contains("warning: TOKEN_GATEWAY_REDIS_URL was given on the command line"))
            #expect(!(redisWithPassword.out + redisWithPassword.err).contains("hunter2"))
            let rewrap = try await runCLI(
                ["keys", "rewrap", "--encryption-keys", keys, "--redis-url", GatewayHarness.redisURL],
                environment: withoutSecrets)
            // The ring came from the flag: no "required" exit 2. (The walk's own exit depends on what
            // other suites left in the shared Redis under other rings.)
            #expect(rewrap.status != 2, "\(rewrap.err)")
            #expect(rewrap.out.contains("done"), "\(rewrap.out)")
            #expect(rewrap.err.contains("warning: TOKEN_GATEWAY_ENCRYPTION_KEYS was given on the command line"))
            #expect(!(rewrap.out + rewrap.err).contains(String(keys.dropFirst(3))))

            // serve: ready with both secrets from flags, callers authenticated with them, one
            // warning line each.
            let gateway = try await GatewayProcess.start(
                settings: withoutSecrets, arguments: ["--callers", callers, "--encryption-keys", keys])
            let listed = try await h.call(.GET, "/v1/installations", at: gateway.url)
            #expect(listed.status == 200, "\(listed.body)")
            gateway.signal(SIGTERM)
            _ = await gateway.waitForExit()
            let warnings = gateway.lines.filter { $0.contains("secret setting given on the command line") }
            #expect(warnings.count == 2, "\(gateway.lines)")
            #expect(warnings.contains { $0.contains("TOKEN_GATEWAY_CALLERS") })
            #expect(warnings.contains { $0.contains("TOKEN_GATEWAY_ENCRYPTION_KEYS") })
            #expect(!gateway.lines.joined().contains(String(keys.dropFirst(3))))
            #expect(!gateway.lines.joined().contains(GatewayHarness.callerSecret))

            // The same secrets from files named on the command line (or in the environment) are fine.
            let directory = try RedisServerProcess.makeTemporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            try Data((callers + "\n").utf8).write(to: URL(fileURLWithPath: directory + "/callers.json"))
            try Data((keys + "\n").utf8).write(to: URL(fileURLWithPath: directory + "/keys"))
            let fromFiles = try await runCLI(
                ["check-config", "--callers", "@\(directory)/callers.json", "--encryption-keys", "@\(directory)/keys"],
                environment: withoutSecrets)
            #expect(fromFiles.status == 0, "\(fromFiles.err)")
            var fileEnvironment = withoutSecrets
            fileEnvironment["TOKEN_GATEWAY_CALLERS"] = "@\(directory)/callers.json"
            fileEnvironment["TOKEN_GATEWAY_ENCRYPTION_KEYS"] = "@\(directory)/keys"
            let fromEnvironment = try await runCLI(["check-config"], environment: fileEnvironment)
            #expect(fromEnvironment.status == 0, "\(fromEnvironment.err)")
            // A Redis URL without a password is no secret: the flag stays usable.
            let plainRedis = try await runCLI(
                ["check-config", "--redis-url", GatewayHarness.redisURL], environment: settings)
            #expect(plainRedis.status == 0, "\(plainRedis.err)")
        }
    }

    /// `GET url` with no credential: status and body.
    static func get(_ h: GatewayHarness, _ url: String) async throws -> (status: Int, body: String) {
        let response = try await h.http.execute(HTTPClientRequest(url: url), timeout: .seconds(10))
        let body = try await response.body.collect(upTo: 1 << 22)
        return (Int(response.status.code), String(buffer: body))
    }

    @Test("without an operations listener, health and metrics are on the main port")
    func operationsOnTheMainPortByDefault() async throws {
        try await GatewayHarness.run { h async throws in
            #expect(h.gateway.configuration.operationsListener == nil)
            for path in ["/metrics", "/health/live", "/health/ready"] {
                #expect(try await Self.get(h, h.gatewayURL + path).status == 200, "\(path)")
            }
        }
    }

    @Test(
        "with TOKEN_GATEWAY_OPS_PORT, health, metrics and the operator pages are served only on the operations listener"
    )
    func operationsListenerKeepsMetricsOffTheMainPort() async throws {
        let opsPort = try RedisServerProcess.freeLoopbackPort()
        try await GatewayHarness.run(configure: { $0.operationsListener = .init(host: "127.0.0.1", port: opsPort) }) {
            h in
            let opsURL = "http://127.0.0.1:\(opsPort)"
            #expect(try await Security.eventually { (try? await Self.get(h, opsURL + "/health/live"))?.status == 200 })
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            for path in ["/metrics", "/health/live", "/health/ready"] {
                let main = try await Self.get(h, h.gatewayURL + path)
                #expect(main.status == 404, "\(path) on the main port")
                #expect(main.body.contains("not_found"))
                #expect(!main.body.contains("token_gateway_"))
                #expect(try await Self.get(h, opsURL + path).status == 200, "\(path) on the operations port")
            }
            let metrics = try await Self.get(h, opsURL + "/metrics")
            #expect(metrics.body.contains("token_gateway_http_requests_total"))
            // The operator pages too: not even their login is offered on the main port.
            let history = GatewayHarness.path(installation) + "/history"
            let page = GatewayHarness.path(installation).replacingOccurrences(
                of: "/v1/installations/", with: "/status/installations/")
            for path in ["/status", "/v1/status", page, history] {
                let main = try await h.call(.GET, path, at: h.gatewayURL)
                #expect(main.status == 404, "\(path) on the main port")
                #expect(main.errorCode == "not_found", "\(path) on the main port")
                #expect(main.headers["www-authenticate"] == nil, "\(path) on the main port")
                let ops = try await h.call(.GET, path, at: opsURL)
                #expect(ops.status != 404, "\(path) on the operations port")
            }
            // The operations listener serves nothing else: no caller, Forge or OAuth route.
            #expect(try await Self.get(h, opsURL + GatewayHarness.path(installation) + "/token").status == 404)
            #expect(try await Self.get(h, opsURL + "/.well-known/oauth-authorization-server").status == 404)
            let token = try await h.call(
                .POST, "/oauth/token", at: opsURL, headers: ["content-type": "application/x-www-form-urlencoded"],
                body: "grant_type=client_credentials")
            #expect(token.status == 404, "\(token.body)")
            #expect(token.body.contains("not_found"))
            #expect(token.headers["allow"] == nil)
        }
        // The setting itself: a port turns it on, a host alone is a configuration error.
        var environment = [
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000001",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"0123456789abcdef0123","installations":["*"]}]"#,
            "TOKEN_GATEWAY_OPS_PORT": "9090",
        ]
        #expect(
            try GatewayConfiguration.load(environment: environment).operationsListener
                == .init(host: "127.0.0.1", port: 9090))
        // The main port again: refused at once, naming the setting (it could never bind).
        environment["TOKEN_GATEWAY_PORT"] = "9090"
        #expect(throws: ConfigurationError.self) { try GatewayConfiguration.load(environment: environment) }
        do {
            _ = try GatewayConfiguration.load(environment: environment)
        } catch {
            #expect("\(error)".contains("TOKEN_GATEWAY_OPS_PORT"), "\(error)")
        }
        // Two specific addresses may share a port number.
        environment["TOKEN_GATEWAY_HOST"] = "10.0.0.5"
        #expect(try GatewayConfiguration.load(environment: environment).operationsListener?.port == 9090)
        environment["TOKEN_GATEWAY_HOST"] = "0.0.0.0"
        #expect(throws: ConfigurationError.self) { try GatewayConfiguration.load(environment: environment) }
        environment["TOKEN_GATEWAY_HOST"] = nil
        environment["TOKEN_GATEWAY_PORT"] = "0"
        environment["TOKEN_GATEWAY_OPS_PORT"] = "0"
        #expect(try GatewayConfiguration.load(environment: environment).operationsListener?.port == 0)
        environment["TOKEN_GATEWAY_OPS_PORT"] = nil
        environment["TOKEN_GATEWAY_OPS_HOST"] = "0.0.0.0"
        #expect(throws: ConfigurationError.self) { try GatewayConfiguration.load(environment: environment) }
    }

    @Test("plain-http trust roots outside loopback, and look-alike loopback hosts, stop start-up with exit 2")
    func trustRootsMustBeHTTPSOrLoopback() async throws {
        try await GatewayHarness.run { h in
            let settings = GatewayHarness.settings(
                emulator: h.emulator, redisURL: GatewayHarness.redisURL, scopedInstallations: [])
            // The harness's own loopback URLs start fine.
            #expect(try await runCLI(["check-config"], environment: settings).status == 0)
            let bad: [(String, String)] = [
                ("TOKEN_GATEWAY_FORGE_JWKS_URL", "http://127.evil.example/.well-known/jwks.json"),
                ("TOKEN_GATEWAY_FORGE_JWKS_URL", "http://forge.example/.well-known/jwks.json"),
                ("TOKEN_GATEWAY_CONNECT_KEYS_URL", "http://connect-install-keys.example"),
                ("TOKEN_GATEWAY_FORGE_GRAPHQL_URL", "http://127.0.0.1.nip.io/graphql"),
                ("TOKEN_GATEWAY_TRIGGER_HOSTS", "http://127.evil.example:8080"),
            ]
            for (variable, value) in bad {
                var environment = settings
                environment[variable] = value
                let run = try await runCLI(["serve"], environment: environment)
                #expect(run.status == 2, "\(variable)=\(value)")
                #expect(run.err.contains(variable), "\(run.err)")
            }
        }
    }

    @Test("a gateway trusts no JWKS but the configured one, whatever a token's apiBaseUrl says")
    func stagingJWKSIsNotTrustedBesideProduction() throws {
        let configuration = try GatewayConfiguration.load(environment: [
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000001",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"0123456789abcdef0123","installations":["*"]}]"#,
        ])
        #expect(configuration.forgeJWKSURL == InvocationTokenVerifier.productionJWKSURL)
        let gateway = Gateway(configuration: configuration, logger: .init(label: "t") { _ in SwallowHandler() })
        defer { try? gateway.httpClient.syncShutdown() }
        #expect(gateway.verifier.configuration.stagingJWKSURL == nil)
        #expect(
            gateway.verifier.jwksURL(forUnverifiedAPIBaseURL: "https://api.stg.atlassian.com/ex/jira/x")
                == InvocationTokenVerifier.productionJWKSURL)
    }

    // MARK: Connect signed installs

    /// `POST /connect/<event>` with `Authorization: JWT <token>` and `body`.
    static func postSignedInstall(
        _ h: GatewayHarness, token: String, body: Data, event: String = "installed"
    ) async throws -> GatewayHarness.Answer {
        try await h.call(
            .POST, "/connect/\(event)", secret: nil,
            headers: ["authorization": "JWT \(token)", "content-type": "application/json"],
            body: String(decoding: body, as: UTF8.self))
    }

    /// The install payload of `tenant` with some fields replaced.
    static func payload(_ h: GatewayHarness, _ tenant: EmulatedConnectTenant, _ changes: [String: Any?]) throws -> Data
    {
        var object = try #require(
            try JSONSerialization.jsonObject(with: h.emulator.connectLifecyclePayload(.installed, tenant: tenant))
                as? [String: Any])
        for (k, v) in changes { object[k] = v }
        return try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    }

    @Test("random kids cannot spend the install-key budget that keys seen before need")
    func installKeyBudgetKeepsAShareForKnownKeys() async throws {
        try await GatewayHarness.runConnect(configure: { $0.connectInstallKeysCached = 1 }) { h in
            let first = try h.emulator.currentInstallKeyId()
            #expect(try await h.emulator.connectInstall(h.emulator.makeConnectTenant()).status == 204)
            // A rotation pushes the first key out of the (one-key) cache; it stays known by name.
            try h.emulator.rotateInstallKey()
            #expect(try await h.emulator.connectInstall(h.emulator.makeConnectTenant()).status == 204)

            // An unauthenticated flood of random kids (nothing can be verified before the key is there).
            var randomKids: [String] = []
            for _ in 0..<40 {
                var options = SignedInstallOptions()
                options.kid = UUID().uuidString.lowercased()
                randomKids.append(options.kid!)
                let answer = try await h.emulator.connectInstall(h.emulator.makeConnectTenant(), options: options)
                #expect(answer.status == 401)
            }
            let fetched = randomKids.reduce(0) { $0 + h.emulator.installKeyFetches(kid: $1) }
            #expect(fetched <= 20, "random kids may spend only the open two thirds of 30 fetches a minute")

            // The first key is needed again: it is fetched from the reserved share.
            #expect(h.emulator.signInstalls(withKid: first))
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey) != nil)
            #expect(h.emulator.installKeyFetches(kid: first) == 2)

            // One kid is fetched at most twice a minute, however often it is named.
            var repeated = SignedInstallOptions()
            repeated.kid = "kid-\(UUID().uuidString.lowercased())"
            for _ in 0..<5 {
                _ = try await h.emulator.connectInstall(h.emulator.makeConnectTenant(), options: repeated)
            }
            #expect(h.emulator.installKeyFetches(kid: repeated.kid!) <= 2)
        }
    }

    @Test(
        "a replica that just started fetches a key id another replica verified with from the reserved share, whatever a flood of made-up key ids spent"
    )
    func installKeyIdsKnownAcrossReplicas() async throws {
        // Three fetches a minute: one kept for key ids seen before, two open (one more every 30 s).
        try await GatewayHarness.runConnect(configure: { $0.connectInstallKeyFetchesPerMinute = 3 }) { h in
            let known = try h.emulator.currentInstallKeyId()
            #expect(try await h.emulator.connectInstall(h.emulator.makeConnectTenant()).status == 204)
            #expect(try await h.gateway.store.isKnownInstallKeyID(known))
            let madeUpKids = Mutex<[String]>([])
            try await h.withSecondGateway { otherURL in
                var madeUp: [String] = []
                defer { madeUpKids.withLock { $0 = madeUp } }
                // The new replica has verified nothing yet; made-up key ids spend its open share.
                for _ in 0..<6 {
                    var options = SignedInstallOptions()
                    options.kid = UUID().uuidString.lowercased()
                    madeUp.append(options.kid!)
                    let answer = try await h.emulator.connectInstall(
                        h.emulator.makeConnectTenant(), options: options, gatewayURL: otherURL)
                    #expect(answer.status == 401)
                }
                let tenant = h.emulator.makeConnectTenant()
                let answer = try await h.emulator.connectInstall(tenant, gatewayURL: otherURL)
                #expect(answer.status == 204, "\(answer.body)")
                #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .installed)
            }
            // Made-up key ids are never recorded.
            for kid in madeUpKids.withLock({ $0 }) {
                #expect(try await !h.gateway.store.isKnownInstallKeyID(kid))
            }
        }
    }

    @Test(
        "a captured signed install cannot be replayed with another body; a retry, or a same-second reinstall without jti, is stored"
    )
    func signedInstallReplayIsRefused() async throws {
        try await GatewayHarness.runConnect { h in
            let installation = try await h.installed()
            let attacker = "attacker-chosen-shared-secret-0123456789"
            for withJTI in [true, false] {
                let tenant = h.emulator.makeConnectTenant(linkedTo: installation)
                var options = SignedInstallOptions()
                options.jti = withJTI ? UUID().uuidString.lowercased() : nil
                let issuedAt = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down))
                options.issuedAt = issuedAt
                let token = try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed", options: options)
                let body = h.emulator.connectLifecyclePayload(.installed, tenant: tenant)
                #expect(try await Self.postSignedInstall(h, token: token, body: body).status == 204)
                let before = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
                #expect(before.installationId?.ari == installation.id)
                // The very same request again (a retry whose answer was lost): 204, the same record.
                #expect(try await Self.postSignedInstall(h, token: token, body: body).status == 204)
                #expect(
                    try await h.gateway.store.connectTenant(tenant.clientKey)?.sharedSecret?.bytes
                        == before.sharedSecret?.bytes)
                if !withJTI {
                    // Install, uninstall and install again within one second, the first token used
                    // twice (a signer without jti): the tenant ends installed.
                    var sameSecond = SignedInstallOptions()
                    sameSecond.jti = nil
                    sameSecond.issuedAt = issuedAt
                    let uninstallToken = try h.emulator.mintSignedInstall(
                        for: tenant, path: "/connect/uninstalled", options: sameSecond)
                    let uninstalled = try await Self.postSignedInstall(
                        h, token: uninstallToken,
                        body: h.emulator.connectLifecyclePayload(.uninstalled, tenant: tenant),
                        event: "uninstalled")
                    #expect(uninstalled.status == 204)
                    #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .uninstalled)
                    #expect(try await Self.postSignedInstall(h, token: token, body: body).status == 204)
                    #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .installed)
                    // Without a jti, a reinstall signed in the same second has the very same token:
                    // its new secret is stored (contract §5: every verified install overwrites).
                    let reinstall = try Self.payload(h, tenant, ["sharedSecret": "reinstalled-secret-0123456789abcdef"])
                    #expect(try await Self.postSignedInstall(h, token: token, body: reinstall).status == 204)
                    let now = try await h.gateway.store.connectTenant(tenant.clientKey)?.sharedSecret?.bytes
                    #expect(now == Array("reinstalled-secret-0123456789abcdef".utf8))
                    // …but not a second after the token was first seen: the guard's first-seen
                    // time is moved back (instead of waiting) to show it.
                    try await Self.ageSignedInstallGuard(of: tenant.clientKey, by: 10, redis: h.gateway.redis)
                }
                // The same header with the attacker's shared secret: refused, nothing changes. So
                // is the same token spelt with `=` padding (read with or without it, contract §1),
                // which a guard keyed by the token's text would take for another token.
                let kept = try await h.gateway.store.connectTenant(tenant.clientKey)
                #expect(Self.padded(token) != token)
                for spelling in [token, Self.padded(token)] {
                    let replay = try await Self.postSignedInstall(
                        h, token: spelling, body: try Self.payload(h, tenant, ["sharedSecret": attacker]))
                    #expect(replay.status == 401, "jti: \(withJTI)")
                    #expect(replay.errorCode == "invalid_signed_install")
                }
                let after = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
                #expect(after.sharedSecret?.bytes == kept?.sharedSecret?.bytes)
                #expect(after.updatedAt == kept?.updatedAt)
            }
        }
    }

    @Test(
        "a token without jti that a replica of the build before accepted is refused with another body here, and the other way round"
    )
    func signedInstallGuardAcrossBuilds() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            var options = SignedInstallOptions()
            options.jti = nil
            let token = try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed", options: options)
            // How the build before named the token: a digest of its text, in the tenant's slot.
            let earlier = SHA256.hash(data: Array(("token\u{0}" + token).utf8)).map { String(format: "%02x", $0) }
                .joined()
            let earlierKey = "tg:connect:{\(tenant.clientKey)}:seen-install:\(earlier)"
            // That build accepted it ten seconds ago.
            let tenSecondsAgo = Int64(Date().timeIntervalSince1970) - 10
            _ = try await h.gateway.redis.send(["SET", earlierKey, "earlier-body:\(tenSecondsAgo)", "PX", "600000"])
            let replay = try await Self.postSignedInstall(
                h, token: token, body: try Self.payload(h, tenant, ["sharedSecret": "attacker-secret-0123456789abcdef"])
            )
            #expect(replay.status == 401)
            #expect(replay.errorCode == "invalid_signed_install")
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey) == nil)
            // A token this build accepts is recorded under both names, so the build before refuses
            // it with another body as well.
            let other = h.emulator.makeConnectTenant()
            let second = try h.emulator.mintSignedInstall(for: other, path: "/connect/installed", options: options)
            let accepted = try await Self.postSignedInstall(
                h, token: second, body: h.emulator.connectLifecyclePayload(.installed, tenant: other))
            #expect(accepted.status == 204)
            let secondEarlier = SHA256.hash(data: Array(("token\u{0}" + second).utf8))
                .map { String(format: "%02x", $0) }.joined()
            let recorded = "tg:connect:{\(other.clientKey)}:seen-install:\(secondEarlier)"
            #expect(try await h.gateway.redis.send(["EXISTS", recorded]).int == 1)
            #expect(try await h.gateway.redis.send(["PTTL", recorded]).int ?? -1 > 0)
            _ = try await h.gateway.redis.send(["DEL", earlierKey])
        }
    }

    @Test("a signed lifecycle callback whose body is over the size limit is 401 invalid_signed_install; nothing stored")
    func oversizedSignedInstallBody() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            let token = try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed", options: .init())
            // Contract §5: "Any failure: 401 `invalid_signed_install` and nothing stored."
            let padding = String(repeating: "x", count: h.gateway.configuration.maxBodySize)
            let body = try Self.payload(h, tenant, ["padding": padding])
            let answer = try await Self.postSignedInstall(h, token: token, body: body)
            #expect(answer.status == 401)
            #expect(answer.errorCode == "invalid_signed_install")
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey) == nil)
            // So is a body whose chunked framing is malformed.
            let port = try #require(URLComponents(string: h.gatewayURL)?.port)
            let malformed = RawHTTP.Answer(
                raw: try await RawHTTP.send(
                    Array(
                        ("POST /connect/installed HTTP/1.1\r\nHost: x\r\nAuthorization: JWT \(token)\r\n"
                            + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").utf8),
                    port: port))
            #expect(malformed.status == 401, "\(malformed.raw.debugDescription)")
            #expect(malformed.errorCode == "invalid_signed_install")
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey) == nil)
            // The same token with the payload as Atlassian sends it is stored.
            let stored = try await Self.postSignedInstall(
                h, token: token, body: h.emulator.connectLifecyclePayload(.installed, tenant: tenant))
            #expect(stored.status == 204)
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .installed)
        }
    }

    /// `token` with its signature padded with `=` to a multiple of four characters (an RSA-2048
    /// signature, 256 bytes, is 342 characters unpadded).
    static func padded(_ token: String) -> String {
        token + String(repeating: "=", count: (4 - token.split(separator: ".").last!.count % 4) % 4)
    }

    /// Moves the first-seen time of `clientKey`'s signed-install guard keys `seconds` back.
    static func ageSignedInstallGuard(of clientKey: String, by seconds: Int64, redis: RedisClient) async throws {
        for key in try await Security.scan(pattern: "tg:connect:{\(clientKey)}:seen-install:*", in: redis) {
            let value = try #require(try await redis.send(["GET", key]).string)
            let parts = value.split(separator: ":")
            let firstSeen = try #require(parts.last.flatMap { Int64($0) })
            _ = try await redis.send(["SET", key, "\(parts[0]):\(firstSeen - seconds)", "KEEPTTL"])
        }
    }

    @Test("a tenant is linked to the installation its payload names, unless the payload's cloudId is another site's")
    func connectLinkNeedsNoOtherSite() async throws {
        try await GatewayHarness.runConnect { h in
            let victim = try await h.installed()
            let victimCloudId = try #require(try await h.gateway.store.installation(victim.installationID)?.cloudId)
            let neverSeen = "ari:cloud:ecosystem::installation/\(UUID().uuidString.lowercased())"
            let cases: [(String, [String: Any?], String?)] = [
                ("another site's cloudId", ["cloudId": UUID().uuidString.lowercased()], nil),
                ("no cloudId (Atlassian's payload)", [:], victim.id),
                ("the installation's cloudId", ["cloudId": victimCloudId], victim.id),
                ("an installation not seen yet", ["installationId": neverSeen], neverSeen),
                ("no installationId", ["installationId": nil], nil),
            ]
            for (name, changes, linked) in cases {
                let tenant = h.emulator.makeConnectTenant(linkedTo: victim)
                let token = try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed")
                let answer = try await Self.postSignedInstall(
                    h, token: token, body: try Self.payload(h, tenant, changes))
                #expect(answer.status == 204, "\(name)")
                let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
                #expect(record.installationId?.ari == linked, "\(name)")
            }
        }
    }

    @Test("lifecycle callbacks that arrive out of order: the one issued last decides, whatever the arrival order")
    func connectCallbacksOutOfOrder() async throws {
        try await GatewayHarness.runConnect { h in
            let now = Date()
            // An uninstall issued before a reinstall, arriving after it: the tenant stays installed
            // with the reinstall's secret.
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            var early = SignedInstallOptions()
            early.issuedAt = now.addingTimeInterval(-10)
            let uninstallToken = try h.emulator.mintSignedInstall(
                for: tenant, path: "/connect/uninstalled", options: early)
            let uninstallBody = h.emulator.connectLifecyclePayload(.uninstalled, tenant: tenant)
            let rotated = h.emulator.rotateSharedSecret(of: tenant)
            #expect(try await h.emulator.connectInstall(rotated).status == 204)
            let late = try await Self.postSignedInstall(
                h, token: uninstallToken, body: uninstallBody, event: "uninstalled")
            #expect(late.status == 204)
            let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(record.status == .installed)
            #expect(record.sharedSecret?.bytes == Array(rotated.sharedSecret.utf8))

            // An install issued before the current one, arriving after it, keeps the newer secret,
            // and is answered as a failed install: Atlassian must not count on its secret.
            var older = SignedInstallOptions()
            older.issuedAt = now.addingTimeInterval(-5)
            let stale = try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed", options: older)
            let staleBody = try Self.payload(h, rotated, ["sharedSecret": "an-older-shared-secret-0123456789abcdef"])
            let refused = try await Self.postSignedInstall(h, token: stale, body: staleBody)
            #expect(refused.status == 401)
            #expect(refused.errorCode == "invalid_signed_install")
            #expect(!refused.body.contains("an-older-shared-secret"))
            let after = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(after.sharedSecret?.bytes == Array(rotated.sharedSecret.utf8))
            #expect(after.updatedAt == record.updatedAt)

            // In order, an uninstall still applies.
            var inOrder = SignedInstallOptions()
            let uninstalledAt = Date()
            inOrder.issuedAt = uninstalledAt
            #expect(try await h.emulator.connectUninstall(rotated, options: inOrder).status == 204)
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .uninstalled)

            // A reinstall signed a second before that uninstall (the signer's clock behind) is
            // refused, not answered 204 with nothing kept; installing again then works.
            var skewed = SignedInstallOptions()
            skewed.issuedAt = uninstalledAt.addingTimeInterval(-1)
            let again = h.emulator.rotateSharedSecret(of: rotated)
            let skewedToken = try h.emulator.mintSignedInstall(for: again, path: "/connect/installed", options: skewed)
            let skewedAnswer = try await Self.postSignedInstall(
                h, token: skewedToken, body: h.emulator.connectLifecyclePayload(.installed, tenant: again))
            #expect(skewedAnswer.status == 401)
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .uninstalled)
            #expect(try await h.emulator.connectInstall(again).status == 204)
            #expect(
                try await h.gateway.store.connectTenant(tenant.clientKey)?.sharedSecret?.bytes
                    == Array(again.sharedSecret.utf8))
        }
    }

    // MARK: Per-caller limits

    /// One call to a gateway at `base` as the full-scope caller.
    static func call(
        _ h: GatewayHarness, base: String, _ method: HTTPMethod, _ path: String,
        secret: String = GatewayHarness.callerSecret
    ) async throws -> GatewayHarness.Answer {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        request.headers.add(name: "authorization", value: "Bearer \(secret)")
        let response = try await h.http.execute(request, timeout: .seconds(35))
        let bytes = try await response.body.collect(upTo: 1 << 20)
        var headers: [String: String] = [:]
        for header in response.headers { headers[header.name.lowercased()] = header.value }
        return .init(status: Int(response.status.code), headers: headers, body: String(buffer: bytes))
    }

    static let limitedSecret = "caller-secret-0123456789abcdef-limited"

    /// A gateway (and the emulator) whose callers are `json` (`TOKEN_GATEWAY_CALLERS`).
    static func run(callers json: String, _ body: @Sendable (GatewayHarness) async throws -> Void) async throws {
        try await GatewayHarness.run(configure: { $0.callers = try! CallerRegistry(json: json) }, body)
    }

    @Test("per-caller limits hold across two gateways sharing Redis; 429 starts no round trip or exchange")
    func perCallerLimitsAcrossReplicas() async throws {
        try await Self.run(
            callers: """
                [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"],\(GatewayHarness.noLimits)},
                 {"name":"limited-\(UUID().uuidString)","secret":"\(Self.limitedSecret)","installations":["*"],
                  "limits":{"refreshesPerMinute":3,"userExchangesPerMinute":4}}]
                """
        ) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)
            #expect(try await h.token(installation).status == 200)
            try await h.withSecondGateway { second in
                let replicas = [h.gatewayURL, second]
                // Three forced refreshes, spread over both replicas, go through.
                for n in 0..<3 {
                    let answer = try await Self.call(
                        h, base: replicas[n % 2], .POST, path + "/token/refresh", secret: Self.limitedSecret)
                    #expect(answer.status == 200, "refresh \(n): \(answer.body)")
                }
                let triggers = h.emulator.triggerCalls(for: installation)
                for base in replicas {
                    let refused = try await Self.call(
                        h, base: base, .POST, path + "/token/refresh", secret: Self.limitedSecret)
                    #expect(refused.status == 429)
                    #expect(refused.errorCode == "rate_limited")
                    let retryAfter = try #require(refused.headers["retry-after"].flatMap { Int($0) })
                    #expect((1...60).contains(retryAfter))
                    // The refusal's log line is the request's: it names the answer's request id.
                    let requestID = try #require(refused.headers["x-request-id"])
                    #expect(
                        h.logs.captured.contains {
                            $0.contains("caller limit reached") && $0.contains("http.request_id=\(requestID)")
                        })
                }
                #expect(
                    h.emulator.triggerCalls(for: installation) == triggers, "a refused refresh starts no round trip")
                // Cached answers are never limited; other callers have their own limits.
                for base in replicas {
                    #expect(
                        try await Self.call(h, base: base, .GET, path + "/token", secret: Self.limitedSecret).status
                            == 200)
                }
                #expect(try await Self.call(h, base: second, .POST, path + "/token/refresh").status == 200)

                // User tokens: four exchanges for four accounts (varying asUser), then 429 on either replica.
                for n in 0..<4 {
                    let answer = try await Self.call(
                        h, base: replicas[n % 2], .GET, path + "/token?asUser=acct-\(n)", secret: Self.limitedSecret)
                    #expect(answer.status == 200, "exchange \(n): \(answer.body)")
                }
                let exchanges = h.emulator.totalUserTokenExchanges
                for base in replicas {
                    let refused = try await Self.call(
                        h, base: base, .GET, path + "/token?asUser=acct-new", secret: Self.limitedSecret)
                    #expect(refused.status == 429)
                    #expect(refused.errorCode == "rate_limited")
                    // The message names the caller's own limit, not the app's exchange budget.
                    #expect(refused.errorMessage.contains("this caller's per-minute limit"), "\(refused.body)")
                    #expect(refused.headers["retry-after"] != nil)
                }
                #expect(h.emulator.totalUserTokenExchanges == exchanges, "a refused request starts no exchange")
                // A cached user token is still served.
                let cached = try await Self.call(
                    h, base: second, .GET, path + "/token?asUser=acct-0", secret: Self.limitedSecret)
                #expect(cached.status == 200)
                #expect(cached.json["source"] as? String == "cache")
            }
        }
    }

    static let refreshLimitedSecret = "caller-secret-0123456789abcdef-refresh-1"
    static let exchangeLimitedSecret = "caller-secret-0123456789abcdef-exchange-1"

    @Test("a forced asUser refresh counts toward both the caller's refresh and exchange limits")
    func forcedUserRefreshCountsTwice() async throws {
        try await Self.run(
            callers: """
                [{"name":"refresh-1-\(UUID().uuidString)","secret":"\(Self.refreshLimitedSecret)","installations":["*"],
                  "limits":{"refreshesPerMinute":1,"userExchangesPerMinute":5}},
                 {"name":"exchange-1-\(UUID().uuidString)","secret":"\(Self.exchangeLimitedSecret)","installations":["*"],
                  "limits":{"refreshesPerMinute":5,"userExchangesPerMinute":1}}]
                """
        ) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)
            let base = h.gatewayURL
            // Refreshes limited to one: the forced user-token refresh takes it.
            let forced = try await Self.call(
                h, base: base, .POST, path + "/token/refresh?asUser=acct-a", secret: Self.refreshLimitedSecret)
            #expect(forced.status == 200, "\(forced.body)")
            #expect(forced.json["source"] as? String == "exchange")
            let (triggers, exchanges) = (h.emulator.triggerCalls(for: installation), h.emulator.totalUserTokenExchanges)
            let refresh = try await Self.call(
                h, base: base, .POST, path + "/token/refresh", secret: Self.refreshLimitedSecret)
            #expect(refresh.status == 429)
            #expect(refresh.errorCode == "rate_limited")
            // Exchanges limited to one: the forced user-token refresh takes it.
            let again = try await Self.call(
                h, base: base, .POST, path + "/token/refresh?asUser=acct-b", secret: Self.exchangeLimitedSecret)
            #expect(again.status == 200, "\(again.body)")
            let exchangesNow = h.emulator.totalUserTokenExchanges
            let user = try await Self.call(
                h, base: base, .GET, path + "/token?asUser=acct-c", secret: Self.exchangeLimitedSecret)
            #expect(user.status == 429)
            #expect(user.errorCode == "rate_limited")
            // Refused requests started nothing.
            #expect(h.emulator.triggerCalls(for: installation) == triggers)
            #expect(h.emulator.totalUserTokenExchanges == exchangesNow)
            #expect(exchangesNow == exchanges + 1)
        }
    }

    @Test("a forced refresh refused with 404 or 410 starts nothing and costs the caller nothing")
    func refusedRefreshIsNotCharged() async throws {
        try await Self.run(
            callers: """
                [{"name":"refresh-0-\(UUID().uuidString)","secret":"\(Self.refreshLimitedSecret)","installations":["*"],
                  "limits":{"refreshesPerMinute":1,"userExchangesPerMinute":5}}]
                """
        ) { h in
            let gone = try await h.installed()
            try await h.emulator.uninstall(gone)
            let unknown = GatewayHarness.path(h.emulator.makeInstallation())
            for (path, status, code) in [
                (unknown, 404, "installation_not_found"),
                (GatewayHarness.path(gone), 410, "installation_uninstalled"),
            ] {
                for query in ["", "?asUser=acct-a"] {
                    let refused = try await Self.call(
                        h, base: h.gatewayURL, .POST, path + "/token/refresh" + query, secret: Self.refreshLimitedSecret
                    )
                    #expect(refused.status == status, "\(path)\(query): \(refused.body)")
                    #expect(refused.errorCode == code)
                }
            }
            // The caller's one refresh is still there: taken now, then spent.
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)
            let refresh = try await Self.call(
                h, base: h.gatewayURL, .POST, path + "/token/refresh", secret: Self.refreshLimitedSecret)
            #expect(refresh.status == 200, "\(refresh.body)")
            #expect(refresh.json["source"] as? String == "trigger")
            let spent = try await Self.call(
                h, base: h.gatewayURL, .POST, path + "/token/refresh", secret: Self.refreshLimitedSecret)
            #expect(spent.status == 429)
        }
    }

    @Test("while the app's exchanges are held back (Atlassian's 429), refused asUser requests cost the caller nothing")
    func heldBackExchangesAreNotCharged() async throws {
        try await Self.run(
            callers: """
                [{"name":"exchange-3-\(UUID().uuidString)","secret":"\(Self.exchangeLimitedSecret)","installations":["*"],
                  "limits":{"refreshesPerMinute":5,"userExchangesPerMinute":3}}]
                """
        ) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)
            let scope = h.gateway.userTokens.configuration.budgetScope
            try await h.gateway.userTokenStore.blockExchanges(scope: scope, for: .seconds(60))
            let exchanges = h.emulator.totalUserTokenExchanges
            for n in 0..<4 {
                let refused = try await Self.call(
                    h, base: h.gatewayURL, .GET, path + "/token?asUser=held-\(n)", secret: Self.exchangeLimitedSecret)
                #expect(refused.status == 429)
                #expect(refused.errorCode == "rate_limited")
                #expect(refused.errorMessage.contains("the app's user-token exchange budget"), "\(refused.body)")
            }
            #expect(h.emulator.totalUserTokenExchanges == exchanges)
            // The hold ends: the caller still has its whole allowance (three exchanges).
            _ = try await h.gateway.redis.send(["DEL", h.gateway.userTokenStore.exchangeBlockedKey(scope: scope)])
            for n in 0..<3 {
                let answer = try await Self.call(
                    h, base: h.gatewayURL, .GET, path + "/token?asUser=after-\(n)", secret: Self.exchangeLimitedSecret)
                #expect(answer.status == 200, "\(answer.body)")
                #expect(answer.json["source"] as? String == "exchange")
            }
            let over = try await Self.call(
                h, base: h.gatewayURL, .GET, path + "/token?asUser=after-3", secret: Self.exchangeLimitedSecret)
            #expect(over.status == 429)
            #expect(over.errorMessage.contains("this caller's per-minute limit"), "\(over.body)")
            #expect(h.emulator.totalUserTokenExchanges == exchanges + 3)
        }
    }

    // MARK: Undecryptable tokens

    @Test("a stored token no key of the ring opens is treated as absent: a new round trip, counted")
    func undecryptableTokenIsFetchedAgain() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let pushed = try await h.emulator.push(installation)
            #expect(pushed.status == 200)
            // The stored token sealed under a key the ring no longer has (removed too early).
            let store = h.gateway.store
            let key = store.systemTokenKey(installation.installationID)
            let retired = try EncryptionKeyRing(
                parsing: "retired:" + Data(repeating: 9, count: 32).base64EncodedString())
            let resealed = try retired.seal(Array(pushed.token.utf8), context: key)
            _ = try await h.gateway.redis.send(["HSET", key, "v", resealed])
            // A replica with nothing in memory reads it.
            try await h.withSecondGateway { second in
                let answer = try await Self.call(h, base: second, .GET, GatewayHarness.path(installation) + "/token")
                #expect(answer.status == 200, "\(answer.body)")
                #expect(answer.json["source"] as? String == "trigger")
                #expect(answer.json["accessToken"] as? String != pushed.token)
                #expect(h.emulator.triggerCalls(for: installation) >= 1)
                let metrics = try await Self.get(h, second + "/metrics").body
                let line = metrics.split(separator: "\n").first {
                    $0.hasPrefix(#"token_gateway_undecryptable_secrets_total{kind="system_token"}"#)
                }
                #expect((line?.split(separator: " ").last).flatMap { Double($0) }.map { $0 >= 1 } == true, "\(metrics)")
                // The new token is readable by every replica, again from the cache.
                let again = try await Self.call(h, base: second, .GET, GatewayHarness.path(installation) + "/token")
                #expect(again.json["source"] as? String == "cache")
            }
        }
    }

    // MARK: Routing data in Redis

    @Test("an apiBaseUrl or Connect link written into Redis without the key ring is never served")
    func forgedRoutingDataIsRefused() async throws {
        try await GatewayHarness.runConnect { h in
            let victim = try await h.installed()
            let path = GatewayHarness.path(victim)
            let genuine = try await h.token(victim)
            #expect(genuine.json["apiBaseUrl"] as? String == victim.apiBaseUrl)
            let store = h.gateway.store
            let installationKey = store.installationKey(victim.installationID)
            let sealed = try #require(try await h.gateway.redis.send(["HGET", installationKey, "apiBaseUrl"]).string)
            #expect(!sealed.contains("atlassian.com"), "stored sealed")

            // Someone with write access to Redis points the installation at their own host.
            _ = try await h.gateway.redis.send([
                "HSET", installationKey, "apiBaseUrl", "https://evil.example/ex/jira/x",
            ])
            try await h.withSecondGateway { second in
                for answer in [
                    try await Self.call(h, base: second, .GET, path + "/token"),
                    try await Self.call(h, base: second, .GET, path),
                ] {
                    #expect(answer.status == 200)
                    #expect(!answer.body.contains("evil.example"), "\(answer.body)")
                }
            }

            // A tenant of the attacker's, linked in Redis to the victim's installation: its Connect
            // JWT must not buy the victim's token through the OAuth token exchange.
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            _ = try await h.gateway.redis.send([
                "HSET", store.connectTenantKey(tenant.clientKey), "installationId", victim.id,
            ])
            #expect(try await store.connectTenant(tenant.clientKey)?.installationId == nil)
            let jwt = h.emulator.mintConnectJWT(for: tenant, method: "GET", url: "/x")
            var form = URLComponents()
            form.queryItems = [
                .init(name: "grant_type", value: "urn:ietf:params:oauth:grant-type:token-exchange"),
                .init(name: "client_id", value: "full"),
                .init(name: "client_secret", value: GatewayHarness.callerSecret),
                .init(name: "subject_token", value: jwt),
                .init(name: "subject_token_type", value: "urn:ietf:params:oauth:token-type:jwt"),
                .init(name: "connect_method", value: "GET"), .init(name: "connect_url", value: "/x"),
            ]
            let body = (form.percentEncodedQuery ?? "").replacingOccurrences(of: "+", with: "%2B")
            let exchanged = try await h.call(
                .POST, "/oauth/token", secret: nil, headers: ["content-type": "application/x-www-form-urlencoded"],
                body: body)
            #expect(exchanged.status == 400, "\(exchanged.body)")
            #expect(exchanged.json["error"] as? String == "invalid_target")
            #expect(!exchanged.body.contains(genuine.json["accessToken"] as? String ?? "-"))
        }
    }

    @Test("apiBaseUrls outside the configured prefixes are neither stored nor served")
    func apiBaseURLMustBeAtlassians() throws {
        let allowed = ["https://api.atlassian.com/ex/"]
        for url in [
            "https://api.atlassian.com/ex/jira/1b7c", "https://api.atlassian.com/ex/confluence/x/y",
            "https://api.atlassian.com/ex/jira/..x", "https://api.atlassian.com/ex/jira/x..",
            "https://api.atlassian.com/ex/" + String(repeating: "a", count: 483),
        ] {
            #expect(RoutingPolicy.hasAllowedPrefix(url, prefixes: allowed), "\(url)")
        }
        for url in [
            "https://evil.example/ex/jira/1", "https://api.atlassian.com.evil.example/ex/jira/1",
            "https://api.atlassian.com/ex/", "https://api.atlassian.com/ex//evil.example",
            "http://api.atlassian.com/ex/jira/1",
            "https://api.atlassian.com/ex/jira/1@evil.example", "https://api.atlassian.com/ex/../x",
            "https://api.atlassian.com/ex/jira/%2e%2e/x", "https://api.atlassian.com/ex/jira/1?x",
            "https://api.atlassian.com/exx/1", "https://api.atlassian.com/ex/jira/..",
            "https://api.atlassian.com/ex/jira/a b", "https://api.atlassian.com/ex/jira/\u{7}",
            "https://api.atlassian.com/ex/jira/\u{e9}", "https://api.atlassian.com/ex/jira\\x",
            "https://api.atlassian.com/ex/jira/1#x",
            "https://api.atlassian.com/ex/" + String(repeating: "a", count: 484),
        ] {
            #expect(!RoutingPolicy.hasAllowedPrefix(url, prefixes: allowed), "\(url)")
        }
        var environment = [
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000001",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"0123456789abcdef0123","installations":["*"]}]"#,
            "TOKEN_GATEWAY_API_BASE_URL_PREFIXES": "https://api.stg.atlassian.com/ex/, http://127.0.0.1:9999/ex/",
        ]
        #expect(
            try GatewayConfiguration.load(environment: environment).apiBaseURLPrefixes == [
                "https://api.stg.atlassian.com/ex/", "http://127.0.0.1:9999/ex/",
            ])
        for bad in ["http://evil.example/ex/", "https://api.atlassian.com/ex", ""] {
            environment["TOKEN_GATEWAY_API_BASE_URL_PREFIXES"] = bad
            if bad.isEmpty { environment["TOKEN_GATEWAY_API_BASE_URL_PREFIXES"] = "," }
            #expect(throws: ConfigurationError.self, "\(bad)") {
                try GatewayConfiguration.load(environment: environment)
            }
        }
    }

    // MARK: Unbounded state

    /// The value of an unlabelled counter in a `/metrics` answer (0 when absent).
    static func counter(_ metrics: String, _ name: String) -> Double {
        let line = metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }
        return line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) } ?? 0
    }

    @Test("callers beyond the waiter caps (per installation, in total) get 503 overloaded with Retry-After at once")
    func waiterCapsAnswerOverloaded() async throws {
        try await GatewayHarness.run(configure: {
            $0.flow.maxWaitersPerInstallation = 2
            $0.flow.maxWaiters = 3
        }) { h in
            let (a, b, c) = (try await h.installed(), try await h.installed(), try await h.installed())
            for installation in [a, b, c] { h.emulator.setFault(.respondSlowly(.seconds(4)), for: installation) }
            try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                group.addTask { try await h.token(a) }
                #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: a) >= 1 })
                group.addTask { try await h.token(a) }
                #expect(
                    try await Security.eventually {
                        Self.counter(
                            try await Self.get(h, h.gatewayURL + "/metrics").body,
                            "token_gateway_coalesced_waiters_total")
                            >= 1
                    })
                // A third caller of the same installation is over the per-installation cap.
                let third = try await h.token(a)
                #expect(third.status == 503)
                #expect(third.errorCode == "overloaded")
                #expect(third.headers["retry-after"] != nil)

                group.addTask { try await h.token(b) }
                #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: b) >= 1 })
                // Three wait in this process: a fourth, of any installation, is over the total cap.
                let fourth = try await h.token(c)
                #expect(fourth.status == 503)
                #expect(fourth.errorCode == "overloaded")
                #expect(h.emulator.triggerCalls(for: c) == 0)

                // Those that waited get their tokens.
                for try await answer in group { #expect(answer.status == 200, "\(answer.body)") }
            }
            // The caps count waiters, not requests: once they are answered there is room again.
            #expect(try await h.token(c).status == 200)
            #expect(try await h.token(a).status == 200)
            let metrics = try await Self.get(h, h.gatewayURL + "/metrics").body
            #expect(Self.counter(metrics, "token_gateway_overloaded_requests_total") == 2)
            // Counted among the answered token requests too, under their outcome.
            let overloaded = metrics.split(separator: "\n").first {
                $0.hasPrefix("token_gateway_token_requests_total{") && $0.contains(#"outcome="overloaded""#)
                    && $0.contains(#"source="none""#)
            }
            #expect(overloaded.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) } == 2)
        }
    }

    @Test("a narrow-scope caller's listing costs in proportion to its scope, not to the whole index")
    func narrowScopeListingReadsOnlyItsScope() async throws {
        let redis = try await RedisServerProcess.start()
        do {
            try await Self.narrowScopeListing(redisURL: redis.url)
        } catch {
            await redis.stop()
            throw error
        }
        await redis.stop()
    }

    static func narrowScopeListing(redisURL: String) async throws {
        let scope = (0..<3).map { _ in "ari:cloud:ecosystem::installation/\(UUID().uuidString.lowercased())" }
        try await GatewayHarness.run(redisURL: redisURL, scopedInstallations: scope) { h in
            // Someone else's thousands of installations in the index.
            let others = (0..<3000).map { _ in "ari:cloud:ecosystem::installation/\(UUID().uuidString.lowercased())" }
            _ = try await h.gateway.redis.send(["ZADD", "tg:installations"] + others.flatMap { ["0", $0] })
            // Two of the scoped installations exist.
            for ari in scope.prefix(2) {
                _ = try await h.gateway.store.upsertInstallation(
                    InstallationID(ari)!, metadata: .init(appId: "app"), now: FlowTime.now())
            }
            func calls(_ command: String) async throws -> Int {
                let info = try await h.gateway.redis.send(["INFO", "commandstats"]).string ?? ""
                guard let line = info.split(separator: "\r\n").first(where: { $0.hasPrefix("cmdstat_\(command):") }),
                    let range = line.range(of: "calls=")
                else { return 0 }
                return Int(line[range.upperBound...].prefix { $0.isNumber }) ?? 0
            }
            _ = try await h.gateway.redis.send(["CONFIG", "RESETSTAT"])
            var seen: [String] = []
            var cursor = ""
            repeat {
                let page = try await h.call(
                    .GET, "/v1/installations?limit=1" + (cursor.isEmpty ? "" : "&cursor=\(cursor)"),
                    secret: GatewayHarness.scopedSecret)
                #expect(page.status == 200)
                seen += ((page.json["installations"] as? [[String: Any]]) ?? []).compactMap {
                    $0["installationId"] as? String
                }
                cursor = page.json["nextCursor"] as? String ?? ""
            } while !cursor.isEmpty && seen.count < 10
            #expect(seen == scope.prefix(2).sorted())
            #expect(try await calls("zrangebylex") == 0, "the whole index was walked")
            #expect(try await calls("zscore") <= 3 * 3)
            // The full-scope caller still pages the index.
            let all = try await h.call(.GET, "/v1/installations?limit=1000")
            #expect(all.status == 200)
        }
    }
}
