import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

@Suite("RFC-34 flow end to end")
struct TokenFlowIntegrationTests {
    @Test("a cold fetch sends one correctly signed trigger and returns the emulator's token with source trigger")
    func coldFetch() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            let json = answer.json
            #expect(json["source"] as? String == "trigger")
            #expect(json["tokenType"] as? String == "Bearer")
            #expect(json["installationId"] as? String == installation.id)
            #expect(json["apiBaseUrl"] as? String == installation.apiBaseUrl)
            let stored = try await h.gateway.store.systemToken(installation.installationID)
            #expect(json["accessToken"] as? String == stored?.value)
            #expect(ReplicaHarness.installationOf(token: json["accessToken"] as? String ?? "") == installation.id)
            #expect(answer.headers["cache-control"] == "no-store")
            // The caller is answered once the delivery is stored, which can come before the emulator
            // has recorded its own answer to the trigger call: wait for that record.
            let answered = try await Events.wait(within: .seconds(10), on: h.emulator.callEvents()) {
                h.emulator.triggerRecords(for: installation).first?.answeredStatus != nil
            }
            #expect(answered)
            let records = h.emulator.triggerRecords(for: installation)
            #expect(records.count == 1)
            #expect(records.first?.signatureValid == true)
            #expect(records.first?.answeredStatus == 200)

            // Second fetch: from the cache, no trigger.
            let again = try await h.token(installation)
            #expect(again.status == 200)
            #expect(again.json["source"] as? String == "cache")
            #expect(again.json["accessToken"] as? String == json["accessToken"] as? String)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a token request's snapshot takes the lease when a round is needed and can run, and only then")
    func snapshotTakesTheLease() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            let leaseKey = "tg:{\(installation.id)}:lease"
            var round = 0
            func intent(minValidity: Int64 = 60, forced: Bool = false) -> SnapshotLeaseIntent {
                round += 1
                return SnapshotLeaseIntent(
                    requestID: "rq_ahead_\(round)", replicaID: "replica-t", ttl: .seconds(30), minValidity: minValidity,
                    forced: forced, now: FlowTime.now(), material: TriggerMaterialQuery(heldKeyID: nil))
            }
            func owner() async throws -> String? { try await h.gateway.redis.send(["GET", leaseKey]).string }
            func release() async throws { _ = try await h.gateway.redis.send(["DEL", leaseKey]) }

            // No token: taken, with the pending request and the trigger material.
            let first = try await store.snapshot(id, timeout: nil, takingLease: intent())
            #expect(first.snapshot.token == nil && first.snapshot.active && first.snapshot.triggerRegistered)
            let lease = try #require(first.lease)
            #expect(lease.requestID == "rq_ahead_1")
            #expect(try await owner() == "rq_ahead_1")
            #expect(try await store.roundProbe(id, requestID: "rq_ahead_1").pendingOpen)
            #expect(lease.material?.status == "active" && lease.material?.sealedKey != nil)
            // Held by that round: the next snapshot takes nothing.
            #expect(try await store.snapshot(id, timeout: nil, takingLease: intent()).lease == nil)
            #expect(try await owner() == "rq_ahead_1")
            try await release()

            // A token valid for the caller: nothing taken; a longer minValidity or a forced refresh takes it.
            let expiresAt = FlowTime.now().unixSeconds + 3600
            _ = try await h.gateway.store.storeDeliveredToken(
                id, token: AccessToken(value: "tok-held", expiresAt: expiresAt), requestID: nil,
                metadata: .init(appId: nil), now: FlowTime.now())
            let valid = try await store.snapshot(id, timeout: nil, takingLease: intent(minValidity: 60))
            #expect(valid.snapshot.token?.value == "tok-held")
            #expect(valid.lease == nil)
            #expect(try await owner() == nil)
            #expect(try await store.snapshot(id, timeout: nil, takingLease: intent(minValidity: 7200)).lease != nil)
            try await release()
            #expect(try await store.snapshot(id, timeout: nil, takingLease: intent(forced: true)).lease != nil)
            try await release()

            // A hold or an open circuit: nothing taken.
            try await h.gateway.store.placeHold(id, requestID: "rq_hold", duration: .seconds(30), releasingLease: false)
            #expect(try await store.snapshot(id, timeout: nil, takingLease: intent(forced: true)).lease == nil)
            _ = try await h.gateway.redis.send(["DEL", "tg:{\(installation.id)}:hold"])
            _ = try await store.recordRoundOutcome(
                id, succeeded: false, threshold: 1, openBase: .seconds(30), openCap: .seconds(30), now: FlowTime.now())
            #expect(try await store.snapshot(id, timeout: nil, takingLease: intent(forced: true)).lease == nil)
            #expect(try await owner() == nil)

            // Uninstalled: nothing taken.
            let other = try await h.installed()
            try await h.gateway.store.uninstall(other.installationID, now: FlowTime.now())
            let gone = try await store.snapshot(other.installationID, timeout: nil, takingLease: intent())
            #expect(!gone.snapshot.active)
            #expect(gone.lease == nil)
        }
    }

    @Test(
        "a delivery marks the round's pending request answered (its time to live kept) until the round ends: a re-read tells it from one that expired unanswered, a redelivery answers nothing, and the lease's release deletes it"
    )
    func pendingAnsweredIsTold() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            func pendingKey(_ rid: String) -> String { "tg:{\(installation.id)}:pending:\(rid)" }
            func take(_ rid: String) async throws -> Bool {
                try await store.takeLease(
                    id, requestID: rid, replicaID: "replica-t", ttl: .seconds(20), respectingHold: false) == .taken
            }
            func deliver(_ value: String, expiresIn: Int64, _ rid: String?) async throws -> GatewayStore.DeliveryResult
            {
                try await h.gateway.store.storeDeliveredToken(
                    id, token: AccessToken(value: value, expiresAt: FlowTime.now().unixSeconds + expiresIn),
                    requestID: rid, metadata: .init(appId: nil), now: FlowTime.now())
            }
            // A token is stored; Forge answers the round with an older one (not stored).
            #expect(try await deliver("tok-stored", expiresIn: 3600, nil).outcome == .stored)
            #expect(try await take("rq_answer_1"))
            var probe = try await store.roundProbe(id, requestID: "rq_answer_1")
            #expect(probe.pendingOpen && !probe.pendingAnswered)
            let answered = try await deliver("tok-cached", expiresIn: 1800, "rq_answer_1")
            #expect(answered.outcome == .notNewer && answered.solicited)
            probe = try await store.roundProbe(id, requestID: "rq_answer_1")
            #expect(!probe.pendingOpen && probe.pendingAnswered)
            #expect(probe.token?.value == "tok-stored" && probe.token?.requestID != "rq_answer_1")
            let left = try await h.gateway.redis.send(["PTTL", pendingKey("rq_answer_1")]).int ?? -3
            #expect(left > 0 && left <= 20_000)
            // A redelivery answers nothing more (a newer token is stored as a push).
            let again = try await deliver("tok-newer", expiresIn: 3700, "rq_answer_1")
            #expect(again.outcome == .stored && !again.solicited)
            #expect(try await store.roundProbe(id, requestID: "rq_answer_1").token?.requestID == nil)
            // The round ends: lease and pending request go together.
            try await store.releaseLease(id, requestID: "rq_answer_1")
            #expect(try await h.gateway.redis.send(["EXISTS", pendingKey("rq_answer_1")]).int == 0)
            // Expired unanswered (deleted here): neither open nor answered.
            #expect(try await take("rq_answer_2"))
            _ = try await h.gateway.redis.send(["DEL", pendingKey("rq_answer_2")])
            probe = try await store.roundProbe(id, requestID: "rq_answer_2")
            #expect(!probe.pendingOpen && !probe.pendingAnswered)
            try await store.releaseLease(id, requestID: "rq_answer_2")
            // A verdict and a hold that release the lease take the pending request with it.
            for (rid, end) in [("rq_answer_3", "verdict"), ("rq_answer_4", "hold")] {
                #expect(try await take(rid))
                if end == "verdict" {
                    _ = try await store.recordRoundOutcome(
                        id, succeeded: true, threshold: 5, openBase: .seconds(5), openCap: .seconds(300),
                        now: FlowTime.now(), releasingLease: rid)
                } else {
                    try await store.placeHold(id, requestID: rid, duration: .seconds(1), releasingLease: true)
                }
                #expect(try await h.gateway.redis.send(["EXISTS", pendingKey(rid)]).int == 0, "\(end)")
                #expect(try await h.gateway.redis.send(["EXISTS", "tg:{\(installation.id)}:lease"]).int == 0, "\(end)")
            }
        }
    }

    @Test("a lease extension only lengthens, lease and pending request alike, and only for its owner")
    func leaseExtensionOnlyLengthens() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            let leaseKey = "tg:{\(installation.id)}:lease"
            let pendingKey = "tg:{\(installation.id)}:pending:rq_extend_1"
            func ttl(_ key: String) async throws -> Int64 { try await h.gateway.redis.send(["PTTL", key]).int ?? -3 }
            #expect(
                try await store.takeLease(
                    id, requestID: "rq_extend_1", replicaID: "replica-t", ttl: .seconds(20), respectingHold: false)
                    == .taken)
            // Extensions may land in any order: a shorter one after a longer one changes nothing.
            try await store.extendLease(id, requestID: "rq_extend_1", ttl: .seconds(40))
            try await store.extendLease(id, requestID: "rq_extend_1", ttl: .seconds(5))
            #expect(try await ttl(leaseKey) > 30_000)
            #expect(try await ttl(pendingKey) > 30_000)
            // Another owner's extension leaves the lease alone.
            #expect(try await !h.gateway.store.extendLease(id, owner: "rq_other", ttl: .seconds(100)))
            #expect(try await ttl(leaseKey) <= 40_000)
            #expect(try await h.gateway.store.extendLease(id, owner: "rq_extend_1", ttl: .seconds(60)))
            #expect(try await ttl(leaseKey) > 50_000)
            #expect(try await ttl(pendingKey) > 50_000)
        }
    }

    @Test("a round's verdict and its lease's release are one step: the lease goes only with its owner")
    func verdictReleasesTheLease() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            let now = FlowTime.now()
            let leaseKey = "tg:{\(installation.id)}:lease"
            func failure(releasing owner: String) async throws -> FlowTime? {
                try await store.recordRoundOutcome(
                    id, succeeded: false, threshold: 2, openBase: .seconds(30), openCap: .seconds(300), now: now,
                    releasingLease: owner)
            }
            #expect(
                try await store.takeLease(
                    id, requestID: "rq_verdict_1", replicaID: "replica-t", ttl: .seconds(30), respectingHold: false)
                    == .taken)
            // Another round's verdict leaves this lease alone; its failure counts.
            #expect(try await failure(releasing: "rq_other") == nil)
            #expect(try await h.gateway.redis.send(["GET", leaseKey]).string == "rq_verdict_1")
            // The owner's verdict releases it; the second failure opens the circuit.
            let openUntil = try #require(try await failure(releasing: "rq_verdict_1"))
            #expect(openUntil.unixMilliseconds == (now + .seconds(30)).unixMilliseconds)
            #expect(try await h.gateway.redis.send(["GET", leaseKey]).isNull)
            #expect(
                try await store.snapshot(id, timeout: nil).circuitOpenUntil?.unixMilliseconds
                    == openUntil.unixMilliseconds)
            // While it is open no round takes the lease (a follower of the round that opened it
            // included), with or without a hold to respect, and nothing is written.
            for respectingHold in [true, false] {
                #expect(
                    try await store.takeLease(
                        id, requestID: "rq_verdict_2", replicaID: "replica-t", ttl: .seconds(30),
                        respectingHold: respectingHold) == .circuitOpen(until: openUntil))
            }
            #expect(try await h.gateway.redis.send(["GET", leaseKey]).isNull)
            #expect(
                try await h.gateway.redis.send(["EXISTS", "tg:{\(installation.id)}:pending:rq_verdict_2"]).int == 0)
            // A token later than the one the round's callers found beats the open circuit: they take it.
            #expect(try await h.emulator.push(installation).status == 200)
            #expect(
                try await store.takeLease(
                    id, requestID: "rq_verdict_2", replicaID: "replica-t", ttl: .seconds(30), respectingHold: true,
                    unlessNewerThan: now.unixSeconds) == .newerStored)
            // A success (a trial round's) closes it; the next lease is taken and released with the
            // next verdict.
            #expect(
                try await store.recordRoundOutcome(
                    id, succeeded: true, threshold: 2, openBase: .seconds(30), openCap: .seconds(300), now: now,
                    releasingLease: "rq_none") == nil)
            #expect(
                try await store.takeLease(
                    id, requestID: "rq_verdict_2", replicaID: "replica-t", ttl: .seconds(30), respectingHold: false)
                    == .taken)
            #expect(
                try await store.recordRoundOutcome(
                    id, succeeded: true, threshold: 2, openBase: .seconds(30), openCap: .seconds(300), now: now,
                    releasingLease: "rq_verdict_2") == nil)
            #expect(try await h.gateway.redis.send(["GET", leaseKey]).isNull)
            #expect(try await store.snapshot(id, timeout: nil).circuitOpenUntil == nil)
        }
    }

    @Test("a round's re-read says whether the installation was uninstalled")
    func roundProbeReadsTheUninstall() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            #expect(try await !store.roundProbe(id, requestID: nil).uninstalled)
            try await h.gateway.store.uninstall(id, now: FlowTime.now())
            let probe = try await store.roundProbe(id, requestID: "rq_gone")
            #expect(probe.uninstalled)
            #expect(probe.token == nil)
            #expect(!probe.pendingOpen)
        }
    }

    @Test("a lease take stops at a stored token later than the round's: nothing taken, nothing recorded")
    func leaseTakeStopsAtANewerToken() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            let leaseKey = "tg:{\(installation.id)}:lease"
            func take(_ requestID: String, unlessNewerThan: Int64?) async throws -> TokenStoreLeaseOutcome {
                try await store.takeLease(
                    id, requestID: requestID, replicaID: "replica-t", ttl: .seconds(30), respectingHold: true,
                    unlessNewerThan: unlessNewerThan)
            }
            // No token stored: taken.
            #expect(try await take("rq_newer_1", unlessNewerThan: 0) == .taken)
            _ = try await store.releaseLease(id, requestID: "rq_newer_1")
            let expiresAt = Int64(Date().timeIntervalSince1970) + 3600
            let token = AccessToken(
                value: try h.emulator.mintAccessToken(
                    for: installation, expiresAt: Date(timeIntervalSince1970: TimeInterval(expiresAt))),
                expiresAt: expiresAt)
            _ = try await h.gateway.store.storeDeliveredToken(
                id, token: token, requestID: nil, metadata: InstallationMetadata(), now: FlowTime.now())
            let before = try await Security.snapshot(of: installation, in: h.gateway.redis)
            // A token later than the round's: no lease, no pending request, nothing else changed.
            #expect(try await take("rq_newer_2", unlessNewerThan: expiresAt - 1) == .newerStored)
            #expect(try await h.gateway.redis.send(["GET", leaseKey]).isNull)
            #expect(try await !store.roundProbe(id, requestID: "rq_newer_2").pendingOpen)
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            // The round's own token (not later), or no check asked for: taken.
            #expect(try await take("rq_newer_3", unlessNewerThan: expiresAt) == .taken)
            _ = try await store.releaseLease(id, requestID: "rq_newer_3")
            #expect(try await take("rq_newer_4", unlessNewerThan: nil) == .taken)
            // Held by another round: a later token still says so first.
            #expect(try await take("rq_newer_5", unlessNewerThan: expiresAt - 1) == .newerStored)
            #expect(try await take("rq_newer_6", unlessNewerThan: expiresAt) == .busy)
        }
    }

    @Test("a delivery whose first-use key exists changes nothing; otherwise the key is set with it, in one step")
    func deliveryClaimsItsFirstUseKey() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            #expect(
                try await store.takeLease(
                    id, requestID: "rq_claim", replicaID: "replica-t", ttl: .seconds(30), respectingHold: false)
                    == .taken)
            let token = AccessToken(
                value: try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(3600)),
                expiresAt: Int64(Date().timeIntervalSince1970) + 3600)
            let claim = GatewayStore.FirstUseKey(
                key: h.gateway.store.tag(id) + ":seen-fit:claim-1", lifetime: .seconds(120))
            func deliver() async throws -> GatewayStore.DeliveryResult {
                try await h.gateway.store.storeDeliveredToken(
                    id, token: token, requestID: "rq_claim", metadata: InstallationMetadata(), now: FlowTime.now(),
                    firstUse: claim)
            }

            // Taken already: nothing at all changes (the token, the pending request, the record).
            _ = try await h.gateway.redis.send(["SET", claim.key, "1", "PX", "60000"])
            let before = try await Security.snapshot(of: installation, in: h.gateway.redis)
            await #expect(throws: GatewayStore.FirstUseKeyTaken.self) { try await deliver() }
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            #expect(try await store.roundProbe(id, requestID: "rq_claim").pendingOpen)

            // Free: stored, the pending request answered, the key set for its lifetime.
            _ = try await h.gateway.redis.send(["DEL", claim.key])
            let result = try await deliver()
            #expect(result.outcome == .stored && result.solicited)
            let ttl = try await h.gateway.redis.send(["PTTL", claim.key]).int ?? -1
            #expect(ttl > 60_000 && ttl <= 120_000)
            #expect(try await h.gateway.store.systemToken(id)?.value == token.value)
        }
    }

    @Test("100 concurrent callers on a cold installation cause one trigger and get one token")
    func coalescedColdFetch() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let answers = try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                for _ in 0..<100 { group.addTask { try await h.token(installation) } }
                var all: [GatewayHarness.Answer] = []
                for try await a in group { all.append(a) }
                return all
            }
            #expect(answers.allSatisfy { $0.status == 200 })
            #expect(Set(answers.compactMap { $0.json["accessToken"] as? String }).count == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a pushed token is served with no trigger")
    func pushedTokenServed() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let push = try await h.emulator.push(installation)
            #expect(push.status == 200)
            #expect(push.body.contains("\"stored\":true"))
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "cache")
            #expect(answer.json["accessToken"] as? String == push.token)
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test("a push for an installation never seen before creates its record")
    func pushCreatesRecord() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let push = try await h.emulator.push(installation)
            #expect(push.status == 200)
            let meta = try await h.call(.GET, GatewayHarness.path(installation))
            #expect(meta.status == 200)
            #expect(meta.json["status"] as? String == "active")
            #expect(meta.json["triggerRegistered"] as? Bool == false)
            let answer = try await h.token(installation)
            #expect(answer.json["accessToken"] as? String == push.token)
        }
    }

    @Test("an older token never replaces a newer one")
    func olderNeverReplacesNewer() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let newer = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(7200))
            #expect(newer.body.contains("\"stored\":true"))
            let older = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(3600))
            #expect(older.status == 200)
            #expect(older.body.contains("\"stored\":false"))
            let same = try await h.emulator.deliver(installation, systemToken: newer.token, requestId: nil)
            #expect(same.body.contains("\"stored\":false"))
            let answer = try await h.token(installation)
            #expect(answer.json["accessToken"] as? String == newer.token)
            let stored = try await h.gateway.store.systemToken(installation.installationID)
            #expect(stored?.value == newer.token)
        }
    }

    @Test("an unknown installation answers 404 installation_not_found")
    func unknownInstallation() async throws {
        try await GatewayHarness.run { h in
            let answer = try await h.token(h.emulator.makeInstallation())
            #expect(answer.status == 404)
            #expect(answer.errorCode == "installation_not_found")
        }
    }

    @Test("a trigger that answers 2xx but never delivers ends in 504 token_timeout after its attempts")
    func neverDelivers() async throws {
        try await GatewayHarness.run(configure: {
            $0.flow.deliveryGrace = .milliseconds(300)
            $0.flow.maxAttempts = 2
        }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            // A deadline far beyond two attempts: the attempt budget, not the clock, ends the wait.
            let answer = try await h.token(installation, query: "timeout=30000")
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
            #expect(h.emulator.triggerCalls(for: installation) == 2)
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_trigger_attempts_total", ["outcome": "no_delivery"]) == 2)
        }
    }

    @Test("a trigger answering 5xx on every attempt ends in 502 trigger_failed")
    func triggerFails() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 3 }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.failWith(status: 500, times: 100), for: installation)
            let answer = try await h.token(installation)
            #expect(answer.status == 502)
            #expect(answer.errorCode == "trigger_failed")
            #expect(h.emulator.triggerCalls(for: installation) == 3)
        }
    }

    @Test("a trigger failing twice then succeeding is retried and the caller gets its token")
    func retryThenSuccess() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setFault(.failWith(status: 503, times: 2), for: installation)
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 3)
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_trigger_retries_total") == 2)
        }
    }

    @Test("a forced refresh makes a new round trip and returns a newer token")
    func forcedRefresh() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let first = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1800))
            let refreshed = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200)
            #expect(refreshed.json["source"] as? String == "trigger")
            #expect(refreshed.json["accessToken"] as? String != first.token)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a bad invocation token gets 401 and nothing is stored")
    func badFIT() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let token = try h.emulator.mintAccessToken(for: installation)
            var options = FITOptions()
            options.algorithm = .none
            let none = try await h.emulator.deliver(installation, systemToken: token, requestId: nil, fit: options)
            #expect(none.status == 401)
            #expect(none.body.contains("invalid_invocation_token"))
            var wrongAud = FITOptions()
            wrongAud.audience = "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000000"
            let aud = try await h.emulator.deliver(installation, systemToken: token, requestId: nil, fit: wrongAud)
            #expect(aud.status == 401)
            #expect(try await h.gateway.store.installation(installation.installationID) == nil)
            #expect(try await h.gateway.store.systemToken(installation.installationID) == nil)
            let missing = try await h.call(
                .POST, "/forge/auth-trigger", secret: nil, headers: ["x-forge-oauth-system": token], body: "{}")
            #expect(missing.status == 401)
        }
    }

    @Test("uninstall answers 410 afterwards and deletes the installation's tokens")
    func uninstall() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            try await h.emulator.uninstall(installation)
            let answer = try await h.token(installation)
            #expect(answer.status == 410)
            #expect(answer.errorCode == "installation_uninstalled")
            #expect(try await h.gateway.store.systemToken(installation.installationID) == nil)
            let meta = try await h.call(.GET, GatewayHarness.path(installation))
            #expect(meta.json["status"] as? String == "uninstalled")
            #expect(meta.json["triggerRegistered"] as? Bool == false)
            // Its signing keys are gone, and so is the id the metadata named.
            #expect(meta.json["triggerKeyId"] is NSNull, "\(meta.body)")
            #expect(meta.json["tokenExpiresAt"] is NSNull, "\(meta.body)")
            let push = try await h.emulator.push(installation)
            #expect(push.status == 410)
            // Lifecycle is idempotent: a retried uninstall answers 200 again.
            try await h.emulator.uninstall(installation)
        }
    }

    @Test(
        "an uninstall whose announcement was lost: once the replica's subscription drops and comes back, its next request reads the store and answers 410"
    )
    func uninstallAnnouncementLostThenResubscribed() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            #expect(try await h.token(installation).status == 200)
            // The installation goes as the uninstall script leaves it, but without its announcement.
            let store = h.gateway.store
            _ = try await h.gateway.redis.send(["HSET", store.installationKey(id), "status", "uninstalled"])
            _ = try await h.gateway.redis.send(["DEL", store.systemTokenKey(id)])
            // Memory, which heard nothing, still answers.
            #expect(try await h.token(installation).status == 200)
            // The subscription drops (as on a network blip or a failover) and comes back.
            _ = try await h.gateway.redis.send(["CLIENT", "KILL", "TYPE", "pubsub"])
            await h.gateway.flow.subscribed(times: 2)
            let answer = try await h.token(installation)
            #expect(answer.status == 410)
            #expect(answer.errorCode == "installation_uninstalled")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("delivery headers and bodies are validated: missing token 400, unreadable exp 400")
    func deliveryValidation() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let noToken = try await h.emulator.deliver(installation, systemToken: nil, requestId: nil)
            #expect(noToken.status == 400)
            #expect(noToken.body.contains("missing_token"))
            let opaque = try await h.emulator.deliver(installation, systemToken: "not-a-jwt", requestId: nil)
            #expect(opaque.status == 400)
            #expect(opaque.body.contains("invalid_token"))
            #expect(try await h.gateway.store.systemToken(installation.installationID) == nil)
        }
    }

    @Test("a token in its refresh-ahead window is served at once while one background round trip fetches the next")
    func refreshAhead() async throws {
        try await GatewayHarness.run(configure: { $0.flow.refreshAheadFraction = 1.0 }) { h in
            let installation = try await h.installed()
            let pushed = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1800))
            #expect(pushed.status == 200)
            // Inside the window (here: its whole lifetime): served from the cache without waiting…
            let first = try await h.token(installation)
            #expect(first.status == 200)
            #expect(first.json["source"] as? String == "cache")
            #expect(first.json["accessToken"] as? String == pushed.token)
            // …while exactly one background round trip stores the next token (its announcement,
            // heard by this process, wakes the wait).
            let replaced = try await Events.wait(within: .seconds(20), on: h.gateway.flow.notificationEvents()) {
                try await h.gateway.store.systemToken(installation.installationID)?.value != pushed.token
            }
            #expect(replaced)
            let stored = try await h.gateway.store.systemToken(installation.installationID)
            #expect(stored?.value != pushed.token)
            let second = try await h.token(installation)
            #expect(second.json["source"] as? String == "cache")
            #expect(second.json["accessToken"] as? String == stored?.value)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a trigger that delivers twice stores the token once and answers the caller once")
    func deliversTwice() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setFault(.deliverTwice, for: installation)
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            let stored = try await h.gateway.store.systemToken(installation.installationID)
            #expect(answer.json["accessToken"] as? String == stored?.value)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("Forge's trace ids are carried into the audit record of a received token")
    func traceIDsInAudit() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let token = try h.emulator.mintAccessToken(for: installation)
            let fit = try h.emulator.mintFIT(for: installation)
            let answer = try await h.call(
                .POST, "/forge/auth-trigger", secret: nil,
                headers: [
                    "authorization": "Bearer \(fit)", "x-forge-oauth-system": token,
                    "x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
                    "content-type": "application/json",
                ], body: "{}")
            #expect(answer.status == 200)
            let audit = h.logs.captured.filter {
                $0.contains("audit.event=token_received") && $0.contains(installation.id)
            }
            #expect(
                audit.contains {
                    $0.contains("trace.id=463ac35c9f6413ad48485a3953bb6124") && $0.contains("span.id=a2fb4a1d1a96d312")
                })
            #expect(!h.logs.captured.joined().contains(token))
        }
    }
}
