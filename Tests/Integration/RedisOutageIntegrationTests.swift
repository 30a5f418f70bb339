import ForgeEmulator
import Foundation
import Logging
import NIOHTTP1
import Synchronization
import Testing

@testable import FlowEngine
@testable import RedisKit
@testable import TokenGateway

/// Redis outages and failover with real gateway processes: a dedicated redis-server killed and restarted under
/// load, a gateway started while Redis is down, and a real Sentinel failover.
///
/// Serialized: each test starts and stops several gateway processes and Redis servers of its own.
@Suite("Redis outages and failover", .serialized)
struct RedisOutageIntegrationTests {
    /// The `timeout` every token request of these tests asks for, in milliseconds.
    static let requestTimeoutMilliseconds = 2000
    /// The HTTP client's own limit: an answer later than this counts as a hang (the request fails).
    /// That is the only time bound these tests put on an answer: how fast it comes is a benchmark's
    /// business, that it comes (an answer, not a hang or a reset) is the promise.
    static let hangLimit: Duration = .seconds(10)
    static let silent = Logger(label: "redis-outage-test") { _ in SwallowHandler() }

    // MARK: Kill and restart under load

    @Test(
        "Redis killed and restarted mid-load: only correct tokens or 503s, no hang, registrations intact",
        .timeLimit(.minutes(2)))
    func killAndRestartUnderLoad() async throws {
        let redis = try await RedisServerProcess.start(
            extraArguments: ["--appendonly", "yes", "--appendfsync", "always"])
        try await ReplicaHarness.run(replicas: 2, redisURL: redis.url) { h in
            let (warm, cold) = try await Self.warmAndColdInstallations(h)
            let load = OutageLoad(harness: h, warm: warm, cold: cold)
            let perPhase = OutageLoad.workers * OutageLoad.requestsPerPhase
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await load.run() }
                // Load with Redis up; halfway through, kill it (SIGKILL: no shutdown, connections reset).
                #expect(await load.waitForAnswers(perPhase / 2, in: .up))
                await redis.kill()
                load.setPhase(.down)

                try await Self.expectOutageAnswers(h, warm: warm, cold: cold)
                // The load's share for the outage is answered against the dead store.
                #expect(await load.waitForAnswers(perPhase, in: .down))

                try await redis.restart()
                load.setPhase(.restarted)
                await Self.expectRecovered(h, warm + cold)
                #expect(await load.waitForAnswers(perPhase, in: .restarted))
                load.stop()
                try await group.waitForAll()
            }

            Self.expectOutcomes(load.outcomes, warm: warm, perPhase: perPhase)
            try await Self.expectRegistrationsSurvived(h, warm + cold)
        }
        await redis.stop()
    }

    /// Four warm installations (a token fetched on every replica, so each process holds one in
    /// memory) and two cold ones (installed, never asked for until Redis is down).
    static func warmAndColdInstallations(_ h: ReplicaHarness) async throws
        -> (warm: [EmulatedInstallation], cold: [EmulatedInstallation])
    {
        var warm: [EmulatedInstallation] = []
        for _ in 0..<4 {
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            warm.append(installation)
        }
        var cold: [EmulatedInstallation] = []
        for _ in 0..<2 {
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            cold.append(installation)
        }
        for installation in warm {
            for replica in 0..<2 {
                let answer = try await h.token(replica, installation)
                #expect(answer.status == 200)
                #expect(Self.tokenInstallation(answer) == installation.id)
            }
        }
        return (warm, cold)
    }

    /// With Redis dead, on every replica: not ready but live; cold installations and metadata 503
    /// at once, never a hang; a warm token served from memory, its forced refresh 503.
    static func expectOutageAnswers(
        _ h: ReplicaHarness, warm: [EmulatedInstallation], cold: [EmulatedInstallation]
    ) async throws {
        for replica in 0..<2 {
            #expect(
                await Self.eventually { (try? await h.call(replica, .GET, "/health/ready"))?.status == 503 })
            let live = try await h.call(replica, .GET, "/health/live")
            #expect(live.status == 200)
            // A cold installation has nothing in memory: 503 store_unavailable at once, never a hang.
            for installation in cold {
                let answer = try await h.token(
                    replica, installation, query: "timeout=\(Self.requestTimeoutMilliseconds)")
                Self.expectStoreUnavailable(answer)
            }
            let metadata = try await h.call(replica, .GET, GatewayHarness.path(cold[0]))
            Self.expectStoreUnavailable(metadata)
            // A warm installation's token is served from memory, but a forced refresh asks for another
            // one, which cannot be had without the store.
            let cached = try await h.token(
                replica, warm[0], query: "timeout=\(Self.requestTimeoutMilliseconds)")
            #expect(cached.status == 200)
            #expect(cached.json["source"] as? String == "cache")
            #expect(Self.tokenInstallation(cached) == warm[0].id)
            let refresh = try await h.call(
                replica, .POST,
                GatewayHarness.path(warm[0]) + "/token/refresh?timeout=\(Self.requestTimeoutMilliseconds)")
            Self.expectStoreUnavailable(refresh)
        }
    }

    /// Redis back, gateways not restarted: every replica is ready again and serves every
    /// installation, the cold ones through a round trip.
    static func expectRecovered(_ h: ReplicaHarness, _ installations: [EmulatedInstallation]) async {
        // Back without restarting the gateways: the pools reconnect (with backoff) on their own.
        for replica in 0..<2 {
            #expect(
                await Self.eventually(within: .seconds(15)) {
                    (try? await h.call(replica, .GET, "/health/ready"))?.status == 200
                })
        }
        // Every replica serves every installation again, the cold ones through a round trip.
        for installation in installations {
            for replica in 0..<2 {
                #expect(
                    await Self.eventually(within: .seconds(15)) {
                        let answer = try? await h.token(
                            replica, installation, query: "timeout=\(Self.requestTimeoutMilliseconds)")
                        return answer?.status == 200 && Self.tokenInstallation(answer!) == installation.id
                    })
            }
        }
    }

    /// Every answer of the load: a token of the right installation or 503 store_unavailable with
    /// Retry-After; warm installations never failed; cold ones got 503 while the store was gone.
    static func expectOutcomes(_ outcomes: [OutageLoad.Outcome], warm: [EmulatedInstallation], perPhase: Int) {
        #expect(outcomes.count { $0.phase == .down } == perPhase)
        for outcome in outcomes {
            #expect(outcome.failure == nil, "\(outcome)")
            switch outcome.status {
            case 200:
                // Never another installation's token.
                #expect(outcome.tokenInstallation == outcome.installation, "\(outcome)")
            case 503:
                #expect(outcome.errorCode == "store_unavailable", "\(outcome)")
                #expect((Int(outcome.retryAfter ?? "") ?? 0) >= 1, "\(outcome)")
            default:
                Issue.record("unexpected answer \(outcome)")
            }
        }
        // A valid token held in memory is served while Redis is down: the warm installations never failed.
        let warmIDs = Set(warm.map(\.id))
        #expect(outcomes.filter { warmIDs.contains($0.installation) }.allSatisfy { $0.status == 200 })
        // Without a token in memory the answer was 503 while the store was gone.
        #expect(outcomes.contains { $0.phase == .down && $0.status == 503 })
    }

    /// Registrations and signing keys survived the restart (AOF): the metadata is intact and a
    /// forced refresh makes a signed round trip the emulator accepts.
    static func expectRegistrationsSurvived(_ h: ReplicaHarness, _ installations: [EmulatedInstallation]) async throws {
        for installation in installations {
            let metadata = try await h.call(0, .GET, GatewayHarness.path(installation))
            #expect(metadata.status == 200)
            #expect(metadata.json["status"] as? String == "active")
            #expect(metadata.json["triggerRegistered"] as? Bool == true)
            #expect(metadata.json["triggerKeyId"] as? String != nil)
            let before = h.emulator.triggerCalls(for: installation)
            let refreshed = try await h.call(1, .POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200)
            #expect(refreshed.json["source"] as? String == "trigger")
            #expect(Self.tokenInstallation(refreshed) == installation.id)
            #expect(h.emulator.triggerCalls(for: installation) > before)
        }
    }

    // MARK: Started while Redis is down

    @Test(
        "a gateway started while Redis is down is live, not ready, answers 503 at once, and works once Redis starts",
        .timeLimit(.minutes(2)))
    func startedWhileRedisIsDown() async throws {
        // Take a port for the server, then stop it: the gateway starts against a Redis that is not there.
        let redis = try await RedisServerProcess.start()
        await redis.kill()
        try await ReplicaHarness.run(replicas: 1, redisURL: redis.url) { h in
            #expect(try await h.call(0, .GET, "/health/live").status == 200)
            // It says so: one warning naming the store, and no `ready` line.
            let replica = h.replicas[0]
            #expect(replica.lines.filter { $0.contains(GatewayProcess.notReadyMessage) }.count == 1)
            #expect(
                replica.lines.contains { $0.contains("listen.port=\(replica.port)") && $0.contains("store.error=") })
            #expect(!replica.lines.contains { $0.contains("msg=ready") })
            let ready = try await h.call(0, .GET, "/health/ready")
            Self.expectStoreUnavailable(ready)

            let installation = h.emulator.makeInstallation()
            for query in ["", "timeout=\(Self.requestTimeoutMilliseconds)"] {
                let answer = try await h.token(0, installation, query: query)
                Self.expectStoreUnavailable(answer)
            }
            let refresh = try await h.call(0, .POST, GatewayHarness.path(installation) + "/token/refresh")
            Self.expectStoreUnavailable(refresh)
            Self.expectStoreUnavailable(try await h.call(0, .GET, GatewayHarness.path(installation)))
            Self.expectStoreUnavailable(try await h.call(0, .GET, "/v1/installations"))
            // Forge's calls are not refused as unauthenticated because the replay guard cannot reach Redis: 503, so
            // Forge tries again.
            let lifecycle = try await h.emulator.sendLifecycleEvent(.installed, for: installation)
            #expect(lifecycle.status == 503, "\(lifecycle.body)")
            #expect(lifecycle.body.contains("store_unavailable"))

            try await redis.restart()
            #expect(
                await Self.eventually(within: .seconds(15)) {
                    (try? await h.call(0, .GET, "/health/ready"))?.status == 200
                })
            // Once the store answers, `ready` is logged (once) with the address it listens on.
            #expect(await replica.waitForLine(within: .seconds(20)) { $0.contains("msg=ready") })
            #expect(
                replica.lines.filter { $0.contains("msg=ready") && $0.contains("listen.port=\(replica.port)") }.count
                    == 1)
            try await h.emulator.install(installation)
            let answer = try await h.token(0, installation, query: "timeout=\(Self.requestTimeoutMilliseconds)")
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            #expect(Self.tokenInstallation(answer) == installation.id)
        }
        await redis.stop()
    }

    // MARK: Redis lost during a round trip this replica leads

    @Test(
        "Redis lost while this replica leads a round trip: Forge's delivery cannot be stored, and the caller gets the still-valid token held in memory (source cache), not a 502 or 504",
        .timeLimit(.minutes(2)))
    func lostWhileLeading() async throws {
        let redis = try await RedisServerProcess.start()
        try await ReplicaHarness.run(replicas: 1, redisURL: redis.url) { h in
            let (installation, pushed, served, calls) = try await Self.leadIntoOutage(h, redis, timeoutMs: 8000)
            TokenAnswerMatrixTests.expectWholeAnswer(
                served, installation, token: pushed.token, source: "cache", "served while Redis is down")
            // The delivery was refused (it could not be stored), so the trigger call failed; the
            // caller was answered without a second one.
            #expect(
                try await Events.wait(on: calls) {
                    h.emulator.triggerRecords(for: installation).first?.answeredStatus != nil
                })
            #expect(h.emulator.triggerRecords(for: installation).map(\.answeredStatus) == [502])
        }
        await redis.stop()
    }

    /// A token with 200 s left, pushed to replica 0, which holds it in memory; a caller that wants
    /// 300 s (the default, with `timeoutMs`) starts a round trip there; Forge's function starts
    /// slowly, and Redis is killed while it runs. Returns the installation, the push, the caller's
    /// answer and the emulator's call events.
    static func leadIntoOutage(_ h: ReplicaHarness, _ redis: RedisServerProcess, timeoutMs: Int) async throws
        -> (EmulatedInstallation, ForgeEmulator.DeliveryResult, GatewayHarness.Answer, AsyncStream<Void>)
    {
        let installation = h.emulator.makeInstallation()
        try await h.emulator.install(installation)
        let pushed = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(200))
        #expect(pushed.status == 200)
        h.emulator.setFault(.respondSlowly(.milliseconds(1500)), for: installation)
        let calls = h.emulator.callEvents()
        async let answer = h.token(0, installation, query: "timeout=\(timeoutMs)")
        #expect(try await Events.wait(on: calls) { h.emulator.triggerCalls(for: installation) == 1 })
        await redis.kill()
        return (installation, pushed, try await answer, calls)
    }

    @Test(
        "a round trip's lease this replica could not give back while Redis was down goes back once Redis is back, not when it runs out",
        .timeLimit(.minutes(2)))
    func leaseGoesBackAfterTheOutage() async throws {
        // Kept on disk: the lease taken before the outage is there again after the restart.
        let redis = try await RedisServerProcess.start(
            extraArguments: ["--appendonly", "yes", "--appendfsync", "always"])
        try await ReplicaHarness.run(replicas: 1, redisURL: redis.url) { h in
            // The lease is taken for the caller's 30 s (2 s more): it cannot run out in this test.
            let (installation, _, served, _) = try await Self.leadIntoOutage(h, redis, timeoutMs: 30000)
            #expect(served.json["source"] as? String == "cache")
            try await redis.restart()
            // Once the replica hears Redis again it gives the lease back, and says so.
            let replica = h.replicas[0]
            #expect(
                await replica.waitForLine(within: .seconds(20)) {
                    $0.contains("gave back the round-trip leases") && $0.contains("leases=1")
                })
            let admin = RedisClient(configuration: try RedisConfiguration(url: redis.url), logger: Self.silent)
            #expect(try await admin.send(["EXISTS", "tg:{\(installation.id)}:lease"]).int == 0)
            await admin.shutdown()
            // The next caller's round trip starts at once.
            h.emulator.setFault(.none, for: installation)
            let refreshed = try await h.call(0, .POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200, "\(refreshed.body)")
            #expect(refreshed.json["source"] as? String == "trigger")
        }
        await redis.stop()
    }

    // MARK: A store that refuses writes

    @Test(
        "a store that refuses writes (an ACL user without ZADD, then out of memory): the heartbeat and the round-trip history fail instead of passing for written, and the heartbeat says so"
    )
    func refusedStatusWritesFail() async throws {
        let server = try await RedisServerProcess.start()
        let admin = RedisClient(configuration: try RedisConfiguration(url: server.url), logger: Self.silent)
        _ = try await admin.send([
            "ACL", "SETUSER", "no-zadd", "on", ">no-zadd-password-1", "~*", "&*", "+@all", "-zadd",
        ])
        let ring = try EncryptionKeyRing(parsing: "k1:" + Data(repeating: 7, count: 32).base64EncodedString())
        let limited = RedisClient(
            configuration: try RedisConfiguration(url: "redis://no-zadd:no-zadd-password-1@127.0.0.1:\(server.port)/0"),
            logger: Self.silent)
        let installation = try #require(InstallationID(UUID().uuidString.lowercased()))
        let heartbeat = ReplicaHeartbeatRecord(replicaID: "r1", version: "test", startedAt: 1, lastSeenAt: 2)
        let roundTrip = RoundTripRecord(startedAt: 1, durationMs: 2, outcome: "success", attempts: 1, replica: "r1")
        for (client, refusal) in [(limited, "NOPERM"), (admin, "OOM")] {
            if refusal == "OOM" {
                _ = try await admin.send(["CONFIG", "SET", "maxmemory-policy", "noeviction"])
                _ = try await admin.send(["CONFIG", "SET", "maxmemory", "1"])
            }
            let store = GatewayStore(redis: client, box: ring, prefix: "refused")
            let written = await #expect(throws: RedisError.self) {
                try await store.writeHeartbeat(heartbeat, ttl: .seconds(15))
            }
            #expect(written?.serverErrorPrefix.map(String.init) == refusal)
            let recorded = await #expect(throws: RedisError.self) {
                try await store.recordRoundTrip(installation, roundTrip, now: FlowTime.now())
            }
            #expect(recorded?.serverErrorPrefix.map(String.init) == refusal)
            // The heartbeat service tells the first failure, with the store's reason.
            let logs = LogSink.memory()
            let logger = Logger(label: "test") {
                GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: logs)
            }
            let service = ReplicaHeartbeat(
                store: store, replicaID: "r1", version: "test", startedAt: FlowTime.now(), logger: logger)
            let running = Task { try await service.run() }
            let told = await Self.eventually {
                logs.captured.contains { $0.contains("could not write the replica heartbeat") && $0.contains(refusal) }
            }
            #expect(told, "\(logs.captured)")
            running.cancel()
            try? await running.value
        }
        #expect(try await admin.send(["EXISTS", "refused:replicas"]) == .integer(0))
        await limited.shutdown()
        await admin.shutdown()
        await server.stop()
    }

    // MARK: Sentinel failover

    @Test(
        "a Sentinel failover loses no registration; writes and installs land on the new primary",
        .timeLimit(.minutes(2)))
    func sentinelFailover() async throws {
        let masterName = "tg-outage"
        let primary = try await RedisServerProcess.start()
        let replica = try await RedisServerProcess.start(
            extraArguments: ["--replicaof", "127.0.0.1", "\(primary.port)"])
        let sentinel = try await Self.inSyncSentinel(primary: primary, replica: replica, masterName: masterName)
        try await Self.withAdminClients([primary.url, replica.url, sentinel.url]) { admins in
            try await Self.failover(
                primaryAdmin: admins[0], replicaAdmin: admins[1], sentinelAdmin: admins[2],
                replicaPort: replica.port, sentinelPort: sentinel.port, masterName: masterName)
        }
        await sentinel.stop()
        await replica.stop()
        await primary.stop()
    }

    /// Starts a sentinel for `primary` once `replica` is in sync with it, so the sentinel discovers it at once.
    static func inSyncSentinel(
        primary: RedisServerProcess, replica: RedisServerProcess, masterName: String
    ) async throws -> RedisServerProcess {
        try await Self.withAdminClients([replica.url]) { admins in
            #expect(
                await Self.eventually {
                    let role = try? await admins[0].send(["ROLE"]).array
                    return role?.first?.string == "slave" && role?[3].string == "connected"
                })
        }
        return try await RedisServerProcess.startSentinel(monitoringPrimaryPort: primary.port, masterName: masterName)
    }

    static func failover(
        primaryAdmin: RedisClient, replicaAdmin: RedisClient, sentinelAdmin: RedisClient,
        replicaPort: Int, sentinelPort: Int, masterName: String
    ) async throws {
        let url = "redis-sentinel://127.0.0.1:\(sentinelPort)/\(masterName)/0"
        try await ReplicaHarness.run(replicas: 2, redisURL: url) { h in
            var installations: [EmulatedInstallation] = []
            for _ in 0..<3 {
                let installation = h.emulator.makeInstallation()
                try await h.emulator.install(installation)
                installations.append(installation)
            }
            var tokens: [String: String] = [:]
            for (index, installation) in installations.enumerated() {
                let answer = try await h.token(index % 2, installation)
                #expect(answer.status == 200)
                #expect(Self.tokenInstallation(answer) == installation.id)
                tokens[installation.id] = answer.json["accessToken"] as? String
            }
            let fetchedInSecond = Int64(Date().timeIntervalSince1970)
            // Everything written so far has reached the replica before it is promoted.
            #expect(try await primaryAdmin.send(["WAIT", "1", "5000"]).int == 1)

            #expect(await RedisClientTests.sentinelFailover(sentinelAdmin, masterName, to: replicaPort))
            #expect(try await replicaAdmin.send(["ROLE"]).array?.first?.string == "master")
            // Once the sentinel names the new primary, writes go there: an installation registered right now is on
            // it (a write acknowledged by the old primary would be lost when the sentinel demotes it). A 503 while
            // the gateway switches is allowed (Forge retries), a lost registration is not.
            let early = h.emulator.makeInstallation()
            #expect(await Self.eventually { (try? await h.emulator.install(early)) != nil })
            #expect(
                try await replicaAdmin.send(["HGET", "tg:{\(early.id)}:installation", "status"]).string == "active")
            #expect(try await replicaAdmin.send(["HGET", "tg:{\(early.id)}:installation", "triggerUrl"]).string != nil)

            // Every registration is still there, on both replicas.
            for installation in installations + [early] {
                for gateway in 0..<2 {
                    let metadata = try await h.call(gateway, .GET, GatewayHarness.path(installation))
                    #expect(metadata.status == 200)
                    #expect(metadata.json["triggerRegistered"] as? Bool == true)
                    #expect(metadata.json["status"] as? String == "active")
                }
            }
            try await Self.expectRefreshesOnNewPrimary(
                h, installations, previous: tokens, fetchedInSecond: fetchedInSecond, replicaAdmin: replicaAdmin)
            // New installations can be installed; their records are on the new primary and their tokens flow.
            let newcomer = h.emulator.makeInstallation()
            try await h.emulator.install(newcomer)
            let newcomerStatus = try await replicaAdmin.send(["HGET", "tg:{\(newcomer.id)}:installation", "status"])
            #expect(newcomerStatus.string == "active")
            for gateway in 0..<2 {
                let answer = try await h.token(gateway, newcomer)
                #expect(answer.status == 200)
                #expect(Self.tokenInstallation(answer) == newcomer.id)
                #expect(try await h.call(gateway, .GET, "/health/ready").status == 200)
            }
            for gateway in h.replicas {
                #expect(gateway.lines.contains { $0.contains("Redis sentinel announced a new primary") })
            }
        }
    }

    /// Forced refreshes write new tokens, and the writes land on the new primary. The gateways follow the
    /// switch within a bounded time; until then an answer may be 503 (never a wrong token).
    static func expectRefreshesOnNewPrimary(
        _ h: ReplicaHarness, _ installations: [EmulatedInstallation], previous tokens: [String: String],
        fetchedInSecond: Int64, replicaAdmin: RedisClient
    ) async throws {
        // A token replaces the stored one only if it expires strictly later: wait for the next second, so the
        // emulator's new tokens do.
        #expect(await Self.eventually { Int64(Date().timeIntervalSince1970) > fetchedInSecond })
        for (index, installation) in installations.enumerated() {
            let gateway = index % 2
            var refreshed: GatewayHarness.Answer?
            #expect(
                await Self.eventually(within: .seconds(20)) {
                    let answer = try? await h.call(
                        gateway, .POST, GatewayHarness.path(installation) + "/token/refresh")
                    if let answer, answer.status != 200 {
                        Self.expectStoreUnavailable(answer)
                    }
                    refreshed = answer
                    return answer?.status == 200
                })
            guard let refreshed, refreshed.status == 200 else { continue }
            #expect(Self.tokenInstallation(refreshed) == installation.id)
            #expect(refreshed.json["source"] as? String == "trigger")
            // Should this fail: the answer's expiry against the stored one's tells a token that was
            // not newer (minted in the same second) from an old one served by mistake.
            #expect(
                refreshed.json["accessToken"] as? String != tokens[installation.id],
                "the forced refresh answered the previous token: expiresAt \(refreshed.json["expiresAt"] ?? "-"), source \(refreshed.json["source"] ?? "-"), fetched in second \(fetchedInSecond), now \(Int64(Date().timeIntervalSince1970))"
            )
            let stored = try await replicaAdmin.send(["HGET", "tg:{\(installation.id)}:token:system", "exp"])
            let expiresAt = refreshed.json["expiresAt"] as? String
            #expect(stored.string.flatMap { Int64($0) }.map { RFC3339.string(unixSeconds: $0) } == expiresAt)
        }
    }

    @Test("sentinel announcements of a new primary are read for the configured master only")
    func sentinelAnnouncements() {
        #expect(
            RedisClient.announcedPrimary(
                channel: "+promoted-slave", announcement: "slave 127.0.0.1:7001 127.0.0.1 7001 @ tg 127.0.0.1 7000",
                masterName: "tg") == "127.0.0.1:7001")
        #expect(
            RedisClient.announcedPrimary(
                channel: "+switch-master", announcement: "tg 127.0.0.1 7000 127.0.0.1 7001", masterName: "tg")
                == "127.0.0.1:7001")
        #expect(
            RedisClient.announcedPrimary(
                channel: "+switch-master", announcement: "other 127.0.0.1 7000 127.0.0.1 7001", masterName: "tg")
                == nil)
        #expect(
            RedisClient.announcedPrimary(
                channel: "+promoted-slave", announcement: "slave 127.0.0.1:7001 127.0.0.1 7001 @ tg2 127.0.0.1 7000",
                masterName: "tg") == nil)
        #expect(
            RedisClient.announcedPrimary(
                channel: "+switch-master", announcement: "tg 127.0.0.1 7000 127.0.0.1 port", masterName: "tg") == nil)
        #expect(
            RedisClient.announcedPrimary(
                channel: "+sdown", announcement: "master tg 127.0.0.1 7000", masterName: "tg") == nil)
    }

    // MARK: Helpers

    /// Runs `body` with one plain client per URL (commands need no `run()`), and closes them afterwards.
    static func withAdminClients<T: Sendable>(
        _ urls: [String], _ body: ([RedisClient]) async throws -> T
    ) async throws -> T {
        let logger = Logger(label: "redis-outage-test") { _ in SwallowHandler() }
        let clients = try urls.map { RedisClient(configuration: try RedisConfiguration(url: $0), logger: logger) }
        do {
            let result = try await body(clients)
            for client in clients { await client.shutdown() }
            return result
        } catch {
            for client in clients { await client.shutdown() }
            throw error
        }
    }

    /// The installation the answer's access token was minted for (the emulator's `installationId` claim).
    static func tokenInstallation(_ answer: GatewayHarness.Answer) -> String? {
        (answer.json["accessToken"] as? String).flatMap(ReplicaHarness.installationOf(token:))
    }

    static func expectStoreUnavailable(
        _ answer: GatewayHarness.Answer, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(answer.status == 503, "\(answer.status) \(answer.body)", sourceLocation: sourceLocation)
        #expect(answer.errorCode == "store_unavailable", "\(answer.body)", sourceLocation: sourceLocation)
        #expect((Int(answer.headers["retry-after"] ?? "") ?? 0) >= 1, sourceLocation: sourceLocation)
    }

    /// Polls `condition` until it holds or `timeout` passes (waiting for an event, with a deadline).
    static func eventually(within timeout: Duration = .seconds(20), _ condition: () async -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if await condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return await condition()
    }
}

/// Concurrent token requests spread over the replicas and installations, each answer recorded with the phase of the
/// outage it was asked in. The load is bounded: each worker sends at most ``requestsPerPhase`` requests per phase and
/// then waits for the test to move on to the next phase (or to stop).
final class OutageLoad: Sendable {
    enum Phase: Sendable, Hashable {
        case up
        case down
        case restarted
    }

    struct Outcome: Sendable, CustomStringConvertible {
        var phase: Phase
        var replica: Int
        var installation: String
        var status: Int
        var errorCode: String?
        var retryAfter: String?
        var tokenInstallation: String?
        var elapsed: Duration
        /// The request itself failed (no answer within the hang limit, connection reset).
        var failure: String?

        var description: String {
            "\(phase) replica \(replica) \(installation.suffix(8)): \(status) \(errorCode ?? "-") "
                + "retry-after \(retryAfter ?? "-") in \(elapsed)\(failure.map { " failed: \($0)" } ?? "")"
        }
    }

    private struct State {
        var phase = Phase.up
        var stopped = false
        var outcomes: [Outcome] = []
        /// Workers done with the current phase, waiting for the next one.
        var idle: [CheckedContinuation<Void, Never>] = []
    }

    static let workers = 8
    static let requestsPerPhase = 15

    let harness: ReplicaHarness
    let warm: [EmulatedInstallation]
    let cold: [EmulatedInstallation]
    private let state = Mutex(State())
    /// Told of every answer recorded.
    private let answered = ChangeSignal()

    init(harness: ReplicaHarness, warm: [EmulatedInstallation], cold: [EmulatedInstallation]) {
        self.harness = harness
        self.warm = warm
        self.cold = cold
    }

    var outcomes: [Outcome] { self.state.withLock { $0.outcomes } }

    /// Answers to requests sent in `phase`.
    func answers(in phase: Phase) -> Int {
        self.state.withLock { $0.outcomes.count { $0.phase == phase } }
    }

    /// Waits (woken by each answer recorded) until at least `count` answers to requests sent in
    /// `phase` came; false after 20 s.
    func waitForAnswers(_ count: Int, in phase: Phase) async -> Bool {
        await self.answered.wait(within: .seconds(20)) { self.answers(in: phase) >= count }
    }

    func setPhase(_ phase: Phase) {
        let idle = self.state.withLock { state in
            state.phase = phase
            defer { state.idle.removeAll() }
            return state.idle
        }
        for worker in idle { worker.resume() }
    }

    func stop() {
        let idle = self.state.withLock { state in
            state.stopped = true
            defer { state.idle.removeAll() }
            return state.idle
        }
        for worker in idle { worker.resume() }
    }

    /// Runs all workers until ``stop()``.
    func run() async {
        await withDiscardingTaskGroup { group in
            for worker in 0..<Self.workers {
                group.addTask { await self.work(worker: worker) }
            }
        }
    }

    /// Sends this worker's share of each phase: warm installations always, cold ones only while Redis is down
    /// (before that they would be fetched, and so held in memory).
    private func work(worker: Int) async {
        var sent: [Phase: Int] = [:]
        var round = 0
        while true {
            let (phase, stopped) = self.state.withLock { ($0.phase, $0.stopped) }
            if stopped { return }
            if sent[phase, default: 0] >= Self.requestsPerPhase {
                await self.waitForChange(from: phase)
                continue
            }
            sent[phase, default: 0] += 1
            let candidates = phase == .down ? self.warm + self.cold : self.warm
            let installation = candidates[(worker + round) % candidates.count]
            let replica = (worker + round / candidates.count) % self.harness.replicas.count
            round += 1
            let started = ContinuousClock.now
            var outcome = Outcome(
                phase: phase, replica: replica, installation: installation.id, status: 0, elapsed: .zero)
            do {
                let answer = try await self.harness.call(
                    replica, .GET,
                    GatewayHarness.path(installation)
                        + "/token?timeout=\(RedisOutageIntegrationTests.requestTimeoutMilliseconds)",
                    timeout: RedisOutageIntegrationTests.hangLimit)
                outcome.status = answer.status
                outcome.errorCode = answer.errorCode
                outcome.retryAfter = answer.headers["retry-after"]
                outcome.tokenInstallation = RedisOutageIntegrationTests.tokenInstallation(answer)
            } catch {
                outcome.failure = "\(error)"
            }
            outcome.elapsed = ContinuousClock.now - started
            self.state.withLock { $0.outcomes.append(outcome) }
            self.answered.changed()
        }
    }

    /// Returns once the phase is no longer `phase` (or the load stopped).
    private func waitForChange(from phase: Phase) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let current = self.state.withLock { state in
                if state.phase == phase, !state.stopped { state.idle.append(continuation) }
                return state.phase == phase && !state.stopped
            }
            if !current { continuation.resume() }
        }
    }
}
