import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization
import Testing

@testable import RedisKit
@testable import TokenGateway

/// The gateway against the Redis deployments of production: TLS (server-verified and mutual), ACL users and a
/// Redis Cluster, each a real server on loopback started here.
@Suite("Redis deployments: TLS, ACL users, Cluster", .serialized)
struct RedisDeploymentTests {
    static let logger = Logger(label: "redis-deployments") { _ in SwallowHandler() }

    static func tlsSettings(_ files: RedisTLSFiles, ca: String? = nil, clientCertificate: Bool) -> [String: String] {
        var settings = [
            "TOKEN_GATEWAY_REDIS_TLS_CA_FILE": ca ?? files.ca,
            // The server is reached by IP address; its certificate names `localhost`.
            "TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME": "localhost",
        ]
        if clientCertificate {
            settings["TOKEN_GATEWAY_REDIS_TLS_CERT_FILE"] = files.clientCertificate
            settings["TOKEN_GATEWAY_REDIS_TLS_KEY_FILE"] = files.clientKey
        }
        return settings
    }

    static func redisConfiguration(_ url: String, _ settings: [String: String] = [:]) throws -> RedisConfiguration {
        try GatewayConfiguration.redisConfiguration { setting in
            setting == .redisURL ? url : settings[setting.environment]
        }
    }

    /// The token flow across two gateway processes sharing the Redis at `url`: 40 concurrent callers on both
    /// make one trigger call; a delivery to the other process answers the caller on the first; several
    /// installations (spread over a cluster's primaries); uninstall answers 410 on both. Then refresh-ahead in
    /// one gateway. Returns the installation ids used.
    @discardableResult
    static func tokenFlow(redisURL: String, settings: [String: String] = [:]) async throws -> [InstallationID] {
        let ids = Mutex<[InstallationID]>([])
        try await ReplicaHarness.run(replicas: 2, redisURL: redisURL, extraSettings: settings) { h in
            let coalesced = h.emulator.makeInstallation()
            try await h.emulator.install(coalesced)
            let answers = try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                for i in 0..<40 { group.addTask { try await h.token(i % 2, coalesced) } }
                var all: [GatewayHarness.Answer] = []
                for try await a in group { all.append(a) }
                return all
            }
            #expect(answers.allSatisfy { $0.status == 200 })
            #expect(Set(answers.compactMap { $0.json["accessToken"] as? String }).count == 1)
            #expect(h.emulator.triggerCalls(for: coalesced) == 1)

            let elsewhere = h.emulator.makeInstallation()
            try await h.emulator.install(elsewhere)
            h.emulator.setFault(.deliverVia(gatewayURL: h.replicas[1].url), for: elsewhere)
            let delivered = try await h.token(0, elsewhere)
            #expect(delivered.status == 200)
            #expect(delivered.json["source"] as? String == "trigger")
            #expect(
                try await h.store.systemToken(elsewhere.installationID)?.value == delivered.json["accessToken"]
                    as? String)

            var more: [EmulatedInstallation] = []
            for _ in 0..<6 {
                let installation = h.emulator.makeInstallation()
                try await h.emulator.install(installation)
                more.append(installation)
            }
            for (index, installation) in more.enumerated() {
                let answer = try await h.token(index % 2, installation)
                #expect(answer.status == 200)
                #expect(
                    ReplicaHarness.installationOf(token: answer.json["accessToken"] as? String ?? "") == installation.id
                )
            }

            let gone = more[0]
            try await h.emulator.uninstall(gone)
            #expect(try await h.token(0, gone).status == 410)
            #expect(try await h.token(1, gone).status == 410)
            #expect(try await h.store.systemToken(gone.installationID) == nil)
            ids.withLock { $0 = ([coalesced, elsewhere] + more).map(\.installationID) }
        }

        let redis = try Self.redisConfiguration(redisURL, settings)
        try await GatewayHarness.run(
            redisURL: redisURL,
            configure: {
                $0.redis = redis
                $0.flow.refreshAheadFraction = 1.0
            }
        ) { h in
            let installation = try await h.installed()
            let pushed = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1800))
            #expect(pushed.status == 200)
            let first = try await h.token(installation)
            #expect(first.json["source"] as? String == "cache")
            #expect(first.json["accessToken"] as? String == pushed.token)
            let deadline = ContinuousClock.now + .seconds(20)
            var stored = try await h.gateway.store.systemToken(installation.installationID)
            while stored?.value == pushed.token, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
                stored = try await h.gateway.store.systemToken(installation.installationID)
            }
            #expect(stored != nil && stored?.value != pushed.token)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
        return ids.withLock { $0 }
    }

    // MARK: TLS

    @Test("TLS: rediss:// with the test CA, the whole token flow over TLS only (--port 0)")
    func tls() async throws {
        let files = try RedisTLSFiles.shared.get()
        let server = try await RedisServerProcess.startTLS(files, mutual: false)
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let settings = Self.tlsSettings(files, clientCertificate: false)

        let client = RedisClient(configuration: try Self.redisConfiguration(url, settings), logger: Self.logger)
        try await client.ping()
        _ = try await client.send(["SET", "tls-test", "v"])
        #expect(try await client.send(["GET", "tls-test"]).string == "v")
        await client.shutdown()

        // The certificate names `localhost`, not the address the URL names: without the server name setting, or
        // with another name, the server is not used.
        for serverName in [nil, "redis.example.com"] as [String?] {
            var other = settings
            other["TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME"] = serverName
            let misnamed = RedisClient(configuration: try Self.redisConfiguration(url, other), logger: Self.logger)
            await #expect(throws: RedisError.unavailable) { try await misnamed.ping() }
            await misnamed.shutdown()
        }

        try await Self.tokenFlow(redisURL: url, settings: settings)
    }

    @Test("mutual TLS: the client certificate is presented; without one the server refuses")
    func mutualTLS() async throws {
        let files = try RedisTLSFiles.shared.get()
        let server = try await RedisServerProcess.startTLS(files, mutual: true)
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let without = RedisClient(
            configuration: try Self.redisConfiguration(url, Self.tlsSettings(files, clientCertificate: false)),
            logger: Self.logger)
        await #expect(throws: RedisError.unavailable) { try await without.ping() }
        await without.shutdown()
        try await Self.tokenFlow(redisURL: url, settings: Self.tlsSettings(files, clientCertificate: true))
    }

    @Test("keys rewrap takes the Redis TLS settings as flags, and demo from the environment, as serve does")
    func tlsSettingsReachEveryCommand() async throws {
        let files = try RedisTLSFiles.shared.get()
        let server = try await RedisServerProcess.startTLS(files, mutual: false)
        let url = "rediss://127.0.0.1:\(server.port)/0"
        let key = Base64URL.encode([UInt8](repeating: 7, count: 32))
        let rewrap = ["keys", "rewrap", "--redis-url", url]
        let tlsFlags = ["--redis-tls-ca-file", files.ca, "--redis-tls-server-name", "localhost"]
        let keys = ["TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:\(key)"]
        let withFlags = try await runCLI(rewrap + tlsFlags, environment: keys)
        #expect(withFlags.status == 0, "\(withFlags.err)")
        // Without them the server's certificate (for `localhost`, from the test's own CA) is refused.
        let without = try await runCLI(rewrap, environment: keys)
        #expect(without.status == 1, "\(without.err)")
        let demo = try await runCLI(
            ["demo", "--installations", "1", "--concurrency", "2"],
            environment: ["TOKEN_GATEWAY_REDIS_URL": url].merging(Self.tlsSettings(files, clientCertificate: false)) {
                $1
            })
        #expect(demo.status == 0, "\(demo.err)")
    }

    @Test("a server certificate from another CA is never talked to: not ready (503), the log says why")
    func untrustedCertificate() async throws {
        let files = try RedisTLSFiles.shared.get()
        let server = try await RedisServerProcess.startTLS(files, mutual: false)
        let admin = [
            "--tls", "--cacert", files.ca, "--cert", files.clientCertificate, "--key", files.clientKey, "-p",
            "\(server.port)",
        ]
        try redisCLI(admin + ["CONFIG", "RESETSTAT"])
        let url = "rediss://:not-a-secret-pw@127.0.0.1:\(server.port)/0"
        let logs = LogSink.memory()
        let logger = Logger(label: "test") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: logs) }
        let client = RedisClient(
            configuration: try Self.redisConfiguration(
                url, Self.tlsSettings(files, ca: files.otherCA, clientCertificate: false)),
            logger: logger)
        for _ in 0..<3 {
            await #expect(throws: RedisError.unavailable) { try await client.ping() }
        }
        #expect(!client.isAvailable)
        await client.shutdown()
        let reports = logs.captured.filter { $0.contains("TLS handshake failed") }
        #expect(reports.count == 1, "\(logs.captured)")
        #expect(
            reports.first?.contains("CERTIFICATE_VERIFY_FAILED") == true
                || reports.first?.contains("certificate") == true)
        #expect(!logs.captured.joined().contains("not-a-secret-pw"))
        // Nothing but this test's own INFO reached the server: no AUTH, no PING.
        let stats = try redisCLI(admin + ["INFO", "commandstats"])
        let commands = stats.split(separator: "\n").filter { $0.hasPrefix("cmdstat_") }.map {
            $0.prefix(while: { $0 != ":" })
        }
        #expect(Set(commands).isSubset(of: ["cmdstat_info", "cmdstat_config"]), "\(commands)")

        let untrusted = try Self.redisConfiguration(
            url, Self.tlsSettings(files, ca: files.otherCA, clientCertificate: false))
        try await GatewayHarness.run(configure: { $0.redis = untrusted }) { h in
            let ready = try await h.call(.GET, "/health/ready", secret: nil)
            #expect(ready.status == 503)
        }
    }

    @Test("a missing TLS file is a malformed setting naming its variable")
    func missingTLSFile() throws {
        #expect(throws: ConfigurationError.self) {
            try Self.redisConfiguration(
                "rediss://127.0.0.1:1/0", ["TOKEN_GATEWAY_REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"])
        }
        do {
            _ = try Self.redisConfiguration(
                "rediss://127.0.0.1:1/0", ["TOKEN_GATEWAY_REDIS_TLS_KEY_FILE": "/nonexistent/k.pem"])
            Issue.record("accepted a missing key file")
        } catch {
            #expect("\(error)".contains("TOKEN_GATEWAY_REDIS_TLS_KEY_FILE"))
        }
        do {
            _ = try Self.redisConfiguration("redis://127.0.0.1:1/0", ["TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME": "x"])
            Issue.record("accepted TLS settings without rediss")
        } catch {
            #expect("\(error)".contains("TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME"))
        }
        // The server name is a host name or an IP address: what would fail every handshake is
        // refused at start-up.
        for bad in ["redis.example.com:6380", "https://redis.example.com", "redis.example.com/x", "a..b", "[::1]:6380"]
        {
            do {
                _ = try Self.redisConfiguration("rediss://127.0.0.1:1/0", ["TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME": bad])
                Issue.record("accepted the server name \(bad)")
            } catch {
                #expect("\(error)".contains("TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME: must be a host name"), "\(error)")
            }
        }
        for (given, taken) in [
            ("Redis-1.Internal.example.com\n", "redis-1.internal.example.com"),
            ("redis.example.com.", "redis.example.com"),
            ("redis_1.internal", "redis_1.internal"), ("10.0.0.7", "10.0.0.7"), ("::1", "::1"),
        ] {
            let named = try Self.redisConfiguration(
                "rediss://127.0.0.1:1/0", ["TOKEN_GATEWAY_REDIS_TLS_SERVER_NAME": given])
            #expect(named.tls?.serverName == taken, "\(given)")
        }
    }

    // MARK: ACL users

    @Test("an ACL user authenticates with AUTH user password; a wrong password is reported once, never printed")
    func aclUser() async throws {
        let server = try await RedisServerProcess.start()
        try redisCLI(["-p", "\(server.port)", "ACL", "SETUSER", "gateway", "on", ">gw-secret-1", "~*", "&*", "+@all"])
        try redisCLI(["-p", "\(server.port)", "ACL", "SETUSER", "default", "off"])

        let logs = LogSink.memory()
        let logger = Logger(label: "test") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: logs) }
        let wrong = RedisClient(
            configuration: try RedisConfiguration(url: "redis://gateway:wrong-pw-2@127.0.0.1:\(server.port)/0"),
            logger: logger)
        for _ in 0..<3 {
            await #expect(throws: RedisError.unavailable) { try await wrong.ping() }
        }
        await wrong.shutdown()
        let reports = logs.captured.filter { $0.contains("refused the credentials") && $0.contains("level=error") }
        #expect(reports.count == 1, "\(logs.captured)")
        #expect(reports.first?.contains("gateway") == true)
        #expect(!logs.captured.joined().contains("wrong-pw-2"))

        let url = "redis://gateway:gw-secret-1@127.0.0.1:\(server.port)/0"
        let refused = try RedisConfiguration(url: "redis://gateway:wrong-pw-2@127.0.0.1:\(server.port)/0")
        try await GatewayHarness.run(configure: { $0.redis = refused }) { h in
            let ready = try await h.call(.GET, "/health/ready", secret: nil)
            #expect(ready.status == 503)
        }
        try await Self.tokenFlow(redisURL: url)
    }

    @Test("Sentinel with credentials: sentinels that require the password get AUTH too; a wrong one is refused")
    func sentinelWithCredentials() async throws {
        let primary = try await RedisServerProcess.start(extraArguments: ["--requirepass", "sentinel-pw-3"])
        let sentinel = try await RedisServerProcess.startSentinel(
            monitoringPrimaryPort: primary.port,
            extraConfiguration: "sentinel auth-pass tg-primary sentinel-pw-3\nrequirepass sentinel-pw-3")
        try await Self.expectSentinelAccess(
            url: "redis-sentinel://:sentinel-pw-3@127.0.0.1:\(sentinel.port)/tg-primary/0",
            refused: "redis-sentinel://:nope@127.0.0.1:\(sentinel.port)/tg-primary/0")
    }

    /// A client for `url` reaches the primary and writes; one for `refused` is refused.
    static func expectSentinelAccess(url: String, refused: String) async throws {
        let client = RedisClient(configuration: try RedisConfiguration(url: url), logger: Self.logger)
        try await client.ping(timeout: .seconds(5))
        #expect(try await client.send(["SET", "sentinel-auth", "1"]) == .status("OK"))
        await client.shutdown()
        let wrong = RedisClient(configuration: try RedisConfiguration(url: refused), logger: Self.logger)
        await #expect(throws: RedisError.unavailable) { try await wrong.ping() }
        await wrong.shutdown()
    }

    @Test(
        "Sentinel with an ACL user: sentinels without a password are used without, the primary gets AUTH user password")
    func sentinelWithAnACLUser() async throws {
        let primary = try await RedisServerProcess.start()
        try redisCLI(["-p", "\(primary.port)", "ACL", "SETUSER", "gateway", "on", ">gw-acl-4", "~*", "&*", "+@all"])
        try redisCLI(["-p", "\(primary.port)", "ACL", "SETUSER", "default", "off"])
        let sentinel = try await RedisServerProcess.startSentinel(
            monitoringPrimaryPort: primary.port,
            extraConfiguration: "sentinel auth-user tg-primary gateway\nsentinel auth-pass tg-primary gw-acl-4")
        // A wrong password still fails, at the primary.
        try await Self.expectSentinelAccess(
            url: "redis-sentinel://gateway:gw-acl-4@127.0.0.1:\(sentinel.port)/tg-primary/0",
            refused: "redis-sentinel://gateway:nope@127.0.0.1:\(sentinel.port)/tg-primary/0")
        await sentinel.stop()
        await primary.stop()
    }

    // MARK: Cluster

    @Test(
        "Redis Cluster: keys spread over three primaries, cross-slot pipelines, SCAN of every primary, notifications across nodes, token flow, and a SIGKILLed primary"
    )
    func cluster() async throws {
        let cluster = try await RedisClusterProcesses.start()
        let client = RedisClient(configuration: try RedisConfiguration(url: cluster.url), logger: Self.logger)
        let subscriber = RedisClient(
            configuration: try RedisConfiguration(url: "redis-cluster://127.0.0.1:\(cluster.nodes[5].port)"),
            logger: Self.logger)
        try await Self.expectClusterCommands(client: client, subscriber: subscriber, cluster: cluster)
        await subscriber.shutdown()
        try await Self.expectACancelledCallerFailsNoNode(client, try #require(client.cluster))

        let ids = try await Self.tokenFlow(redisURL: cluster.url)
        let slots = Set(ids.map { RedisHashSlot.slot(of: $0.ari) })
        #expect(slots.count == ids.count)

        // Failover: SIGKILL the primary of a key mid-load; its replica is promoted and every answer is right.
        let key = "deploy:{failover}:n"
        let slot = RedisHashSlot.slot(of: key)
        let primaryPort = try #require(try Self.primaryPort(owning: slot, cluster: cluster))
        let victim = try #require(cluster.index(ofPort: primaryPort))
        _ = try await client.send(["SET", key, "0"])
        // A client that knows the map from before and sends nothing during the failover.
        let idle = RedisClient(configuration: try RedisConfiguration(url: cluster.url), logger: Self.logger)
        try await idle.ping(timeout: .seconds(2))
        let answers = FailoverCounts()
        let start = ContinuousClock.now
        // The writer says when the load is under way (20 answers), and the primary dies then.
        let (underLoad, loadStarted) = AsyncStream<Void>.makeStream()
        let recovered = try await withThrowingTaskGroup(of: Duration?.self) { group in
            group.addTask {
                defer { loadStarted.finish() }
                var expected = 0
                var lastFailure: ContinuousClock.Instant?
                var recoveredAfter: Duration?
                let deadline = ContinuousClock.now + .seconds(30)
                while ContinuousClock.now < deadline {
                    do {
                        let value = try await client.send(["INCR", key]).int
                        expected = Int(value ?? -1)
                        if answers.counts.withLock({
                            $0.good += 1
                            return $0.good
                        }) == 20 {
                            loadStarted.finish()
                        }
                        if let failedAt = lastFailure, recoveredAfter == nil {
                            recoveredAfter = ContinuousClock.now - failedAt
                        }
                        if recoveredAfter != nil, ContinuousClock.now - start > .seconds(1) { break }
                    } catch {
                        answers.counts.withLock { $0.failed += 1 }
                        if lastFailure == nil { lastFailure = ContinuousClock.now }
                        try await Task.sleep(for: .milliseconds(20))
                    }
                    let stored = try? await client.send(["GET", key]).int
                    if let stored, Int(stored) < expected { answers.counts.withLock { $0.wrong += 1 } }
                }
                return recoveredAfter
            }
            for await _ in underLoad {}
            await cluster.nodes[victim].kill()
            var result: Duration?
            for try await value in group { result = value }
            return result
        }
        let counts = answers.counts.withLock { $0 }
        #expect(counts.wrong == 0)
        #expect(counts.good > 0)
        #expect(recovered != nil, "requests did not recover after the primary was killed: \(counts)")
        try await Self.expectFailedOver(cluster, victim: victim, primaryPort: primaryPort, idle: idle)
        // The flow works after the failover too.
        try await Self.tokenFlowAfterFailover(redisURL: cluster.url)
        await client.shutdown()
        print(
            "cluster failover: \(counts.good) answers, \(counts.failed) failed while failing over, recovered after \(recovered.map { "\($0)" } ?? "never")"
        )
    }

    @Test(
        "Redis Cluster: readiness asks every primary; after a failover the first MOVED refreshes the whole slot map, so the primary's other slots cost no redirection; a failover under load loses no command"
    )
    func clusterMovedRefreshesTheMap() async throws {
        let cluster = try await RedisClusterProcesses.start()
        let client = RedisClient(configuration: try RedisConfiguration(url: cluster.url), logger: Self.logger)
        let router = try #require(client.cluster)
        _ = try await client.send(["GET", "moved:{0}"])
        try await Self.expectPingAsksEveryPrimary(cluster: cluster)
        let old = try #require(router.primary(forSlot: RedisHashSlot.slot(of: "moved:{0}")))
        // Keys of 100 slots of that primary.
        var slots: Set<Int> = []
        let keys = Array(
            (0..<20_000).map { "moved:{\($0)}" }.filter { key in
                let slot = RedisHashSlot.slot(of: key)
                return router.primary(forSlot: slot) == old && slots.insert(slot).inserted
            }.prefix(100))
        #expect(keys.count == 100)

        // A SCAN walk stopped halfway through that primary's keys, to be resumed after the failover.
        for key in keys { #expect(try await client.send(["SET", key, "v0"]) == .status("OK")) }
        var found: [String] = []
        var cursor = "0"
        repeat {
            let step = try await client.scan(cursor: cursor, match: "moved:*", count: 10)
            (cursor, found) = (step.cursor, found + step.keys)
        } while !(cursor.hasSuffix(":127.0.0.1:\(old.port)") && !cursor.contains(":0:")) && cursor != "0"
        #expect(cursor != "0", "the walk ended before reaching the primary's keys")

        // Its replica takes over (a manual failover: the old primary becomes its replica).
        let nodes = try redisCLI(["-p", "\(old.port)", "CLUSTER", "NODES"]).split(separator: "\n")
        let oldID = try #require(nodes.first { $0.contains("myself") }?.split(separator: " ").first)
        let replicaLine = try #require(nodes.first { $0.split(separator: " ").dropFirst(3).first == oldID })
        let replicaPort = try #require(
            Int(replicaLine.split(separator: " ")[1].split(separator: "@")[0].split(separator: ":").last ?? ""))
        try await Self.failOver(to: replicaPort, from: old.port, cluster: cluster)
        try redisCLI(["-p", "\(old.port)", "CONFIG", "RESETSTAT"])

        // The first key is redirected (one MOVED) and answered…
        #expect(try await client.send(["SET", keys[0], "v"]) == .status("OK"))
        // …and the map is refreshed in the background: every slot of the old primary is the new one's.
        #expect(await Self.mapNames(replicaPort, forSlotOf: keys[1], router))
        // The walk goes on: the old node's cursor means nothing to the new primary, whose walk starts
        // again; every key is found (some twice), none is skipped.
        while cursor != "0" {
            let step = try await client.scan(cursor: cursor, match: "moved:*", count: 10)
            (cursor, found) = (step.cursor, found + step.keys)
        }
        #expect(Set(keys).isSubset(of: Set(found)))
        for key in keys.dropFirst() {
            #expect(try await client.send(["SET", key, "v"]) == .status("OK"))
        }
        let errors = try redisCLI(["-p", "\(old.port)", "INFO", "errorstats"])
        #expect(
            errors.split(whereSeparator: \.isNewline).contains("errorstat_MOVED:count=1"), "\(errors)")

        // Back again while eight callers write to those slots: the demoted node's connections stay
        // until what was sent to it is answered (a MOVED, followed), so every write succeeds.
        let load = FailoverLoad()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    var index = worker
                    while !load.stop.load(ordering: .relaxed) {
                        do {
                            _ = try await client.send(["SET", keys[index % keys.count], "w"])
                        } catch {
                            load.failures.withLock { $0 += 1 }
                        }
                        index += 8
                    }
                }
            }
            defer { load.stop.store(true, ordering: .relaxed) }
            try await Self.failOver(to: old.port, from: replicaPort, cluster: cluster)
            #expect(await Self.mapNames(old.port, forSlotOf: keys[1], router))
            // A while longer: the retired connections close (one command timeout) under load.
            for key in keys { _ = try await client.send(["SET", key, "after"]) }
        }
        #expect(load.failures.withLock { $0 } == 0)
        await client.shutdown()
        for node in cluster.nodes { await node.stop() }
    }

    @Test(
        "Redis Cluster: the primary owning slot 0 hangs (SIGSTOP) and its replica takes over: the readiness ping (500 ms) answers again within a few attempts",
        .timeLimit(.minutes(3)))
    func clusterHungPrimaryFailover() async throws {
        let cluster = try await RedisClusterProcesses.start()
        let client = RedisClient(configuration: try RedisConfiguration(url: cluster.url), logger: Self.logger)
        try await client.ping(timeout: .seconds(2))
        let hungPort = try #require(try Self.primaryPort(owning: 0, cluster: cluster))
        let hung = try #require(cluster.index(ofPort: hungPort))
        let live = cluster.nodes.indices.filter { $0 != hung }.map { cluster.nodes[$0].port }
        cluster.nodes[hung].pause()
        // Every other node names a new owner of slot 0 (the hung primary's replica, promoted).
        #expect(
            await RedisClientTests.eventually(within: .seconds(30)) {
                live.allSatisfy { port in
                    let owner = try? Self.primaryPort(owning: 0, cluster: cluster, asking: port)
                    return owner != nil && owner != hungPort
                }
            })
        // The readiness probe's timeout: the client's map still names the hung node, which
        // answers nothing; the map is asked for again from the nodes that answer.
        var failures: [String] = []
        for _ in 0..<4 {
            do {
                try await client.ping(timeout: .milliseconds(500))
                break
            } catch {
                failures.append("\(error)")
            }
        }
        #expect(failures.count < 4, "\(failures)")
        #expect(client.cluster?.primary(forSlot: 0)?.port != hungPort)
        await client.shutdown()
        cluster.nodes[hung].resume()
        for node in cluster.nodes { await node.kill() }
    }

    @Test(
        "Redis Cluster: a slot-map refresh whose first caller is cancelled still ends for the callers waiting on it, with a RedisError, never the first caller's cancellation"
    )
    func aCancelledRefreshLeaderLeavesTheOthersARedisError() async throws {
        let silent = [try await SilentServer.start(), try await SilentServer.start()]
        var configuration = try RedisConfiguration(
            url: "redis-cluster://" + silent.map { "127.0.0.1:\($0.port)" }.joined(separator: ","))
        configuration.connectTimeout = .seconds(2)
        let client = RedisClient(configuration: configuration, logger: Self.logger)
        let router = try #require(client.cluster)
        let leader = Task { try await router.rediscover(deadline: .now() + .seconds(3)) }
        // The leader is asking the first seed (which never answers)…
        #expect(await RedisClientTests.eventually { silent[0].accepted == 1 })
        // …when another caller joins its refresh.
        let follower = Task { try await router.rediscover(deadline: .now() + .seconds(10)) }
        #expect(await RedisClientTests.eventually { router.callersWaitingForRediscovery == 1 })
        leader.cancel()
        await #expect(throws: CancellationError.self) { try await leader.value }
        let error = await #expect(throws: RedisError.self) { try await follower.value }
        #expect(error == .unavailable)
        await client.shutdown()
        for server in silent { await server.stop() }
    }

    /// A caller cancelled while its command is in flight (a `BLPOP` that waits) gets
    /// `CancellationError`, and its node does not count as failed: the map stays as it is.
    static func expectACancelledCallerFailsNoNode(_ client: RedisClient, _ router: RedisClusterRouter) async throws {
        let key = "cancelled:{0}"
        let owner = try #require(router.primary(forSlot: RedisHashSlot.slot(of: key)))
        let blockedClients = {
            (try? redisCLI(["-p", "\(owner.port)", "CLIENT", "LIST"]))?.split(whereSeparator: \.isNewline)
                .filter { $0.contains(" flags=b ") }.count
        }
        #expect(!router.isMapStale)
        let blocked = Task { try await client.send(["BLPOP", key, "0"]) }
        #expect(await RedisClientTests.eventually { blockedClients() == 1 })
        blocked.cancel()
        await #expect(throws: CancellationError.self) { try await blocked.value }
        #expect(!router.isMapStale)
        // The BLPOP is answered (and its reply dropped), which frees its connection.
        _ = try redisCLI(["-p", "\(owner.port)", "LPUSH", key, "x"])
        #expect(await RedisClientTests.eventually { blockedClients() == 0 })
    }

    /// After the primary at `primaryPort` (node `victim`) was killed: three primaries without it,
    /// and the readiness of `idle` (whose map still named the dead primary: the failed PING asks
    /// the cluster again, and the new primary answers).
    static func expectFailedOver(
        _ cluster: RedisClusterProcesses, victim: Int, primaryPort: Int, idle: RedisClient
    ) async throws {
        try await cluster.waitUntilHealthy(except: [victim])
        let primariesAfter = try cluster.primaryPorts()
        #expect(primariesAfter.count == 3)
        #expect(!primariesAfter.contains(primaryPort))
        try await idle.ping(timeout: .seconds(2))
        // The map the failed PING asked for names live primaries only: the killed one, still listed by
        // CLUSTER SHARDS as a master (health fail), is not taken for its shard.
        let router = try #require(idle.cluster)
        let known = try await router.primaries(deadline: .now() + .seconds(2))
        #expect(!known.contains { $0.port == primaryPort }, "\(known)")
        #expect(router.primary(forSlot: 0) != nil && router.primary(forSlot: 16383) != nil)
        await idle.shutdown()
    }

    /// Readiness (`ping`) answers for the whole cluster: a primary that does not answer (paused,
    /// without a failover) makes it fail, whichever primary that is; it answers again after.
    /// Each failed ping counts as a store error, as a failed command does.
    static func expectPingAsksEveryPrimary(cluster: RedisClusterProcesses) async throws {
        let registry = PrometheusCollectorRegistry()
        let client = RedisClient(
            configuration: try RedisConfiguration(url: cluster.url), logger: Self.logger,
            metricsFactory: PrometheusMetricsFactory(registry: registry),
            metricNames: RedisMetricNames(errors: "store_errors_total"))
        try await client.ping(timeout: .seconds(2))
        let primaries = try cluster.primaryPorts()
        #expect(primaries.count == 3)
        for port in primaries {
            try redisCLI(["-p", "\(port)", "CLIENT", "PAUSE", "3000", "ALL"])
            await #expect(throws: RedisError.self, "primary \(port) paused") {
                try await client.ping(timeout: .milliseconds(300))
            }
            try redisCLI(["-p", "\(port)", "CLIENT", "UNPAUSE"])
            try await client.ping(timeout: .seconds(2))
        }
        var text: [UInt8] = []
        registry.emit(into: &text)
        #expect(sample(String(decoding: text, as: UTF8.self), "store_errors_total") == 3)
        await client.shutdown()
    }

    /// A manual failover to the replica at `newPort`, waited for until every node sees it (so that
    /// whichever node the client asks gives the new map).
    static func failOver(to newPort: Int, from oldPort: Int, cluster: RedisClusterProcesses) async throws {
        #expect(try redisCLI(["-p", "\(newPort)", "CLUSTER", "FAILOVER"]).contains("OK"))
        @Sendable func everyNodeSeesTheFailover() -> Bool {
            cluster.nodes.allSatisfy { node in
                let lines = (try? redisCLI(["-p", "\(node.port)", "CLUSTER", "NODES"]))?.split(separator: "\n") ?? []
                let newLine = lines.first { $0.contains("127.0.0.1:\(newPort)@") }
                let oldLine = lines.first { $0.contains("127.0.0.1:\(oldPort)@") }
                return newLine?.contains("master") == true && oldLine?.contains("slave") == true
            }
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while !everyNodeSeesTheFailover(), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(everyNodeSeesTheFailover())
        try await cluster.waitUntilHealthy()
    }

    /// Whether the client's slot map comes to name the node at `port` for `key`'s slot (within 10 s).
    static func mapNames(_ port: Int, forSlotOf key: String, _ router: RedisClusterRouter) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(10)
        while router.primary(forSlot: RedisHashSlot.slot(of: key))?.port != port, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(10))
        }
        return router.primary(forSlot: RedisHashSlot.slot(of: key))?.port == port
    }

    /// Keys in every shard (one pipeline spanning slots), a script, SCAN and key rotation over
    /// every primary, and PUBLISH on one node reaching a subscriber connected to another.
    static func expectClusterCommands(
        client: RedisClient, subscriber: RedisClient, cluster: RedisClusterProcesses
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await subscriber.run() }
            defer { group.cancelAll() }

            // Keys in every shard, written and read back in one pipeline spanning slots.
            let keys = (0..<60).map { "deploy:{k\($0)}:v" }
            let written = try await client.pipeline(keys.map { ["SET", $0, $0] })
            #expect(written.allSatisfy { $0.string == "OK" })
            let read = try await client.pipeline(keys.map { ["GET", $0] })
            #expect(read.map(\.string) == keys)
            let primaries = try cluster.primaryPorts()
            #expect(primaries.count == 3)
            for port in primaries {
                let count = Int(try redisCLI(["-p", "\(port)", "DBSIZE"])) ?? 0
                #expect(count > 0, "primary \(port) holds no key")
            }
            // A script on one slot.
            let script = RedisScript("return redis.call('GET', KEYS[1])")
            #expect(try await client.eval(script, keys: [keys[7]], arguments: []).string == keys[7])

            // SCAN visits every primary: every key is found, none twice.
            var cursor = "0"
            var found: [String] = []
            repeat {
                let step = try await client.scan(cursor: cursor, match: "deploy:*", count: 10)
                found += step.keys
                cursor = step.cursor
            } while cursor != "0"
            #expect(found.sorted() == keys.sorted())
            // Key rotation walks the same way: every key of every primary is visited once.
            let ring = try EncryptionKeyRing(parsing: "k1:" + Data(repeating: 7, count: 32).base64EncodedString())
            let rewrap = KeyRewrap(redis: client, keys: ring, prefix: "deploy", batchSize: 10, logger: Self.logger)
            #expect(try await rewrap.run().keys == keys.count)

            // PUBLISH on one node reaches a subscriber connected to another.
            let events = subscriber.subscribe(channels: ["deploy:events"])
            var iterator = events.makeAsyncIterator()
            let confirmation = await iterator.next()
            #expect(confirmation == .subscribed)
            _ = try await client.send(["PUBLISH", "deploy:events", "hello"])
            let message = await iterator.next()
            #expect(message == .message(channel: "deploy:events", payload: "hello"))
        }
    }

    /// The port of the primary that owns `slot`, from `CLUSTER NODES` (of node 0, or of the node at `port`).
    static func primaryPort(owning slot: Int, cluster: RedisClusterProcesses, asking port: Int? = nil) throws -> Int? {
        let nodesText = try redisCLI(["-p", "\(port ?? cluster.nodes[0].port)", "CLUSTER", "NODES"])
        return
            nodesText.split(separator: "\n").compactMap { line -> Int? in
                let fields = line.split(separator: " ")
                guard fields.count >= 9, fields[2].contains("master") else { return nil }
                let owns = fields[8...].contains { range in
                    let bounds = range.split(separator: "-").compactMap { Int($0) }
                    return bounds.count == 2 ? (bounds[0]...bounds[1]).contains(slot) : bounds.first == slot
                }
                return owns ? Int(fields[1].split(separator: "@")[0].split(separator: ":").last ?? "") : nil
            }.first
    }

    static func tokenFlowAfterFailover(redisURL: String) async throws {
        try await ReplicaHarness.run(replicas: 2, redisURL: redisURL) { h in
            for index in 0..<6 {
                let installation = h.emulator.makeInstallation()
                try await h.emulator.install(installation)
                let answer = try await h.token(index % 2, installation)
                #expect(answer.status == 200)
            }
        }
    }
}

/// Answers seen while a primary fails over.
/// Writers under load during a failover: when to stop, and how many writes failed.
final class FailoverLoad: Sendable {
    let stop = Atomic(false)
    let failures = Mutex(0)
}

final class FailoverCounts: Sendable {
    let counts = Mutex<(good: Int, failed: Int, wrong: Int)>((0, 0, 0))
}
