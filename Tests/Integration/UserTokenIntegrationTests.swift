import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization
import Testing

@testable import TokenGateway

/// User tokens end to end: a real gateway, the test Redis, and the emulator serving Atlassian's
/// GraphQL `offlineUserAuthToken` mutation.
@Suite("User tokens (asUser) end to end")
struct UserTokenIntegrationTests {
    /// A fresh app id, so a test's exchange budget (shared in Redis per app) is its own.
    static func isolatedApp() -> String {
        "ari:cloud:ecosystem::app/" + UUID().uuidString.lowercased()
    }

    static func account() -> String {
        "557058:" + UUID().uuidString.lowercased()
    }

    @Test("a cold ask gets a system token, exchanges once and answers the emulator's user token (source exchange)")
    func coldExchange() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let account = Self.account()
            let answer = try await h.userToken(installation, account)
            #expect(answer.status == 200)
            let json = answer.json
            #expect(json["source"] as? String == "exchange")
            #expect(json["accountId"] as? String == account)
            #expect(json["installationId"] as? String == installation.id)
            #expect(json["tokenType"] as? String == "Bearer")
            #expect(json["apiBaseUrl"] as? String == installation.apiBaseUrl)
            #expect(answer.headers["cache-control"] == "no-store")
            let token = try #require(json["accessToken"] as? String)
            #expect(token == h.emulator.lastUserToken(for: installation, accountId: account))
            let exp = try #require(TokenClaims.expiry(of: token))
            #expect(json["expiresAt"] as? String == RFC3339.string(unixSeconds: exp))
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            let record = try #require(h.emulator.userTokenExchangeRecords.last)
            #expect(record.contextIds == [installation.siteARI])
            #expect(record.outcome == "token")

            // The cache entry is sealed (the token is not stored in the clear) and indexed for uninstall.
            let key = h.gateway.userTokenStore.tokenKey(installation.installationID, accountId: account)
            let sealed = try await h.gateway.redis.send(["HGET", key, "v"]).string
            #expect(sealed != nil && sealed != token)
            // Cached until a minute before the token's expiry.
            let ttl = try await h.gateway.redis.send(["TTL", key]).int ?? 0
            let left = exp - Int64(Date().timeIntervalSince1970)
            #expect(ttl >= left - 62 && ttl <= left - 55)
            // Indexed until the cache entry expires (unix ms).
            let indexedUntil = try await h.gateway.redis.send([
                "ZSCORE", "tg:{\(installation.id)}:user-keys", key,
            ]).string.flatMap { Double($0) }
            let entryExpiry = try await h.gateway.redis.send(["PEXPIRETIME", key]).int
            #expect(indexedUntil.map { Int64($0) } == entryExpiry)

            // Audit: one record of the exchange and one of the hand-out, with the account, never the token.
            let lines = h.logs.captured
            #expect(
                lines.contains {
                    $0.contains("token_received") && $0.contains("user_exchange") && $0.contains(account)
                        && $0.contains(AuditLog.fingerprint(token))
                })
            #expect(
                lines.contains { $0.contains("token_handed_out") && $0.contains(account) && $0.contains("caller=full") }
            )
            #expect(!lines.contains { $0.contains(token) })
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_user_exchanges_total", ["outcome": "success"]) == 1)
        }
    }

    @Test("a second ask is served from the cache; one asking for more validity than is left gets a new exchange")
    func cacheHit() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setUserTokenLifetime(.seconds(1200))
            let account = Self.account()
            let first = try await h.userToken(installation, account)
            #expect(first.json["source"] as? String == "exchange")
            let second = try await h.userToken(installation, account)
            #expect(second.status == 200)
            #expect(second.json["source"] as? String == "cache")
            #expect(second.json["accessToken"] as? String == first.json["accessToken"] as? String)
            #expect(second.json["expiresAt"] as? String == first.json["expiresAt"] as? String)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 1)

            // 1200 s left < minValidity 1800: a new exchange, returned as it is.
            let longer = try await h.userToken(installation, account, query: "minValidity=1800")
            #expect(longer.status == 200)
            #expect(longer.json["source"] as? String == "exchange")
            #expect(longer.json["accessToken"] as? String != first.json["accessToken"] as? String)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 2)
        }
    }

    @Test("50 concurrent asks for one user cause one exchange and get one token")
    func concurrentAsksShareOneExchange() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let account = Self.account()
            let answers = try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                for _ in 0..<50 { group.addTask { try await h.userToken(installation, account) } }
                var all: [GatewayHarness.Answer] = []
                for try await a in group { all.append(a) }
                return all
            }
            #expect(answers.allSatisfy { $0.status == 200 })
            #expect(Set(answers.compactMap { $0.json["accessToken"] as? String }).count == 1)
            #expect(answers.allSatisfy { ["exchange", "cache"].contains($0.json["source"] as? String ?? "") })
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("concurrent asks on two replicas sharing Redis cause one exchange")
    func concurrentAsksAcrossReplicas() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            // Slow answers keep the exchange in flight while the other replica asks.
            h.emulator.setGraphQLFault(.respondSlowly(.milliseconds(300)))
            let account = Self.account()
            try await h.withSecondGateway { secondURL in
                let answers = try await withThrowingTaskGroup(of: GatewayHarness.Answer.self) { group in
                    for i in 0..<20 {
                        group.addTask {
                            try await h.call(
                                .GET, GatewayHarness.path(installation) + "/token?asUser=\(account)",
                                baseURL: i % 2 == 0 ? h.gatewayURL : secondURL)
                        }
                    }
                    var all: [GatewayHarness.Answer] = []
                    for try await a in group { all.append(a) }
                    return all
                }
                #expect(answers.allSatisfy { $0.status == 200 })
                #expect(Set(answers.compactMap { $0.json["accessToken"] as? String }).count == 1)
                #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 1)
            }
        }
    }

    @Test("caching a user token, remembering a refusal and giving a lease up announce the user to every process")
    func storeAnnouncesUserChanges() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = h.gateway.userTokenStore
            let account = Self.account()
            let seen = NoticeLog()
            try await withThrowingTaskGroup(of: Void.self) { group throws -> Void in
                group.addTask { await store.watch { notice in seen.append(notice) } }
                #expect(await seen.wait { $0.contains(.resync) })
                let now = FlowTime.now()
                #expect(
                    try await store.store(
                        id, accountId: account,
                        token: AccessToken(value: "user-\(UUID())", expiresAt: now.unixSeconds + 3600),
                        cacheUntil: now.unixSeconds + 3000, now: now) == .stored)
                #expect(try await store.rememberDenial(id, accountId: account, for: .seconds(5)))
                #expect(try await store.acquireLease(id, accountId: account, owner: "o1", ttl: .seconds(5)))
                #expect(try await store.snapshot(id, accountId: account, timeout: nil).exchangeInFlight)
                #expect(try await !store.releaseLease(id, accountId: account, owner: "someone else"))
                #expect(try await store.releaseLease(id, accountId: account, owner: "o1"))
                let expected = UserTokenNotice.user(id, accountId: account)
                #expect(await seen.wait { $0.filter { $0 == expected }.count >= 3 })
                #expect(seen.notices.withLock { $0.filter { $0 == expected }.count } == 3)
                group.cancelAll()
            }
        }
    }

    @Test("a user's exchange lease extension only lengthens it, and only for its owner")
    func userLeaseExtensionOnlyLengthens() async throws {
        try await GatewayHarness.run { h in
            let id = try await h.installed().installationID
            let store = h.gateway.userTokenStore
            let account = Self.account()
            let key = store.leaseKey(id, accountId: account)
            func ttl() async throws -> Int64 { try await h.gateway.redis.send(["PTTL", key]).int ?? -3 }
            #expect(try await store.acquireLease(id, accountId: account, owner: "o1", ttl: .seconds(20)))
            // Extensions may land in any order: a shorter one after a longer one changes nothing.
            #expect(try await store.extendLease(id, accountId: account, owner: "o1", ttl: .seconds(40)))
            #expect(try await store.extendLease(id, accountId: account, owner: "o1", ttl: .seconds(5)))
            #expect(try await ttl() > 30_000)
            // Another owner's extension leaves the lease alone and says so.
            #expect(try await !store.extendLease(id, accountId: account, owner: "o2", ttl: .seconds(100)))
            #expect(try await ttl() <= 40_000)
            #expect(try await store.extendLease(id, accountId: account, owner: "o1", ttl: .seconds(60)))
            #expect(try await ttl() > 50_000)
            #expect(try await store.releaseLease(id, accountId: account, owner: "o1"))
            #expect(try await !store.extendLease(id, accountId: account, owner: "o1", ttl: .seconds(60)))
            #expect(try await ttl() == -2)
        }
    }

    @Test("different users get separate exchanges and separate tokens")
    func differentUsers() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let accounts = (0..<3).map { _ in Self.account() }
            let answers = try await withThrowingTaskGroup(of: (String, GatewayHarness.Answer).self) { group in
                for account in accounts { group.addTask { (account, try await h.userToken(installation, account)) } }
                var all: [String: GatewayHarness.Answer] = [:]
                for try await (account, answer) in group { all[account] = answer }
                return all
            }
            for account in accounts {
                let answer = try #require(answers[account])
                #expect(answer.status == 200)
                #expect(answer.json["accountId"] as? String == account)
                #expect(
                    answer.json["accessToken"] as? String
                        == h.emulator.lastUserToken(for: installation, accountId: account))
                #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 1)
            }
            #expect(Set(answers.values.compactMap { $0.json["accessToken"] as? String }).count == 3)
            // One system token served all three.
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("a refused user answers 403 user_token_denied, remembered for a minute without another call")
    func refusedUser() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let refused = Self.account()
            h.emulator.refuseUserTokens(for: refused)
            let answer = try await h.userToken(installation, refused)
            #expect(answer.status == 403)
            #expect(answer.errorCode == "user_token_denied")
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: refused) == 1)

            // Remembered: no call, even once Atlassian would agree, even when forced.
            h.emulator.allowUserTokens(for: refused)
            #expect(try await h.userToken(installation, refused).errorCode == "user_token_denied")
            let forced = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh?asUser=\(refused)")
            #expect(forced.status == 403)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: refused) == 1)
            let ttl =
                try await h.gateway.redis.send(["PTTL", "tg:{\(installation.id)}:user-denied:\(refused)"]).int ?? 0
            #expect(ttl > 50_000 && ttl <= 60_000)

            // Another user is unaffected.
            #expect(try await h.userToken(installation, Self.account()).status == 200)
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_user_exchanges_total", ["outcome": "denied"]) == 1)
        }
    }

    @Test("past the shared exchange budget the gateway answers 429 rate_limited with Retry-After and calls nobody")
    func budgetSpent() async throws {
        let app = Self.isolatedApp()
        try await GatewayHarness.run(
            configure: {
                $0.forgeAppID = app
                $0.userExchangesPerMinute = 2
            },
            emulatorConfigure: { $0.appId = app }
        ) { h in
            let installation = try await h.installed()
            let (a, b, c) = (Self.account(), Self.account(), Self.account())
            #expect(try await h.userToken(installation, a).status == 200)
            #expect(try await h.userToken(installation, b).status == 200)
            let limited = try await h.userToken(installation, c)
            #expect(limited.status == 429)
            #expect(limited.errorCode == "rate_limited")
            let retryAfter = Int(limited.headers["retry-after"] ?? "") ?? 0
            #expect((1...60).contains(retryAfter))
            #expect(h.emulator.totalUserTokenExchanges == 2)
            // Cached tokens are still served.
            let cached = try await h.userToken(installation, a)
            #expect(cached.status == 200)
            #expect(cached.json["source"] as? String == "cache")
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_user_exchanges_total", ["outcome": "budget_exhausted"]) == 1)
        }
    }

    @Test("Atlassian's 429 is answered 429 with its Retry-After, and holds every exchange back meanwhile")
    func atlassianRateLimit() async throws {
        let app = Self.isolatedApp()
        try await GatewayHarness.run(
            configure: { $0.forgeAppID = app },
            emulatorConfigure: { $0.appId = app }
        ) { h in
            let installation = try await h.installed()
            h.emulator.setGraphQLRateLimit(perMinute: 1)
            #expect(try await h.userToken(installation, Self.account()).status == 200)
            let limited = try await h.userToken(installation, Self.account())
            #expect(limited.status == 429)
            #expect(limited.errorCode == "rate_limited")
            let retryAfter = Int(limited.headers["retry-after"] ?? "") ?? 0
            #expect((50...60).contains(retryAfter))
            #expect(h.emulator.totalUserTokenExchanges == 2)
            // The hold is in Redis: the next ask (any user, any replica) makes no call.
            let held = try await h.userToken(installation, Self.account())
            #expect(held.status == 429)
            #expect(h.emulator.totalUserTokenExchanges == 2)
            let hold = try await h.gateway.redis.send(["PTTL", "tg:{user-exchanges:\(app)}:blocked"]).int ?? 0
            #expect(hold > 40_000)
        }
    }

    @Test("Atlassian failing twice then recovering: retried within the timeout, the caller gets its token")
    func failingThenRecovering() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setGraphQLFault(.failWith(status: 503, times: 2))
            let account = Self.account()
            let answer = try await h.userToken(installation, account)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "exchange")
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 3)
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(sample(metrics.body, "token_gateway_user_exchanges_total", ["outcome": "http_error"]) == 2)
            #expect(sample(metrics.body, "token_gateway_user_exchanges_total", ["outcome": "success"]) == 1)
        }
    }

    @Test("Atlassian failing on every attempt ends in 502 exchange_failed after the attempt budget")
    func failingForGood() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setGraphQLFault(.failWith(status: 500, times: 100))
            let account = Self.account()
            let answer = try await h.userToken(installation, account)
            #expect(answer.status == 502)
            #expect(answer.errorCode == "exchange_failed")
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 4)
            // Nothing remembered: once Atlassian recovers the next ask succeeds.
            h.emulator.setGraphQLFault(.none)
            #expect(try await h.userToken(installation, account).status == 200)
        }
    }

    @Test("an exchange slower than the caller's timeout ends in 504 token_timeout")
    func slowExchange() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            // The exchange answers long after the caller's deadline: only that deadline can end
            // the wait, and it ends in 504 (how fast is a benchmark's concern, not this test's).
            h.emulator.setGraphQLFault(.respondSlowly(.seconds(10)))
            let answer = try await h.userToken(installation, Self.account(), query: "timeout=800")
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
        }
    }

    @Test(
        "an exchange call answering its head at once and then holding its body ends at its timeout (timeout)",
        .timeLimit(.minutes(1)))
    func exchangeBodyHeldPastTheCallTimeout() async throws {
        let holder = try await LoopbackListener.start(
            answering: "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{", hold: true)
        let httpClient = HTTPClient(eventLoopGroupProvider: .singleton)
        let client = OfflineUserAuthTokenClient(
            httpClient: httpClient, url: holder.baseURL + "/graphql", logger: Logger(label: "test"))
        let outcome = await client.exchange(
            systemToken: "system-token", context: try #require(SiteContext(product: "jira", cloudId: "cloud-1")),
            accountId: try #require(UserAccountID("557058:user-1")), timeout: .milliseconds(300))
        #expect(outcome == .failed(.timeout))
        #expect(holder.connections == 1)
        await holder.stop()
        try await httpClient.shutdown()
    }

    @Test("a percent-encoded parameter name is read as a proxy in front reads it: as%55ser asks for a user token")
    func percentEncodedParameterName() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let account = Self.account()
            let answer = try await h.call(.GET, GatewayHarness.path(installation) + "/token?as%55ser=\(account)")
            #expect(answer.status == 200, "\(answer.body)")
            #expect(answer.json["accountId"] as? String == account)
            #expect(answer.json["source"] as? String == "exchange")
        }
    }

    @Test(
        "an error answer is read by its status line: a 429 or 401 whose body is large or never comes keeps its meaning",
        .timeLimit(.minutes(1)))
    func errorAnswersAreDecidedByTheirStatus() async throws {
        let cases: [(head: String, expected: OfflineUserAuthTokenClient.Outcome)] = [
            ("HTTP/1.1 429 Too Many Requests\r\nretry-after: 30\r\n", .rateLimited(retryAfter: .seconds(30))),
            ("HTTP/1.1 401 Unauthorized\r\n", .systemTokenRefused),
            ("HTTP/1.1 503 Service Unavailable\r\n", .failed(.httpError(status: 503))),
            ("HTTP/1.1 403 Forbidden\r\n", .denied(message: nil)),
        ]
        let httpClient = HTTPClient(eventLoopGroupProvider: .singleton)
        for (head, expected) in cases {
            // A body announced at 1 MB, of which one byte comes: the answer's head says it all.
            let holder = try await LoopbackListener.start(
                answering: head + "content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{", hold: true)
            let client = OfflineUserAuthTokenClient(
                httpClient: httpClient, url: holder.baseURL + "/graphql", logger: Logger(label: "test"))
            let outcome = await client.exchange(
                systemToken: "system-token", context: try #require(SiteContext(product: "jira", cloudId: "cloud-1")),
                accountId: try #require(UserAccountID("557058:user-1")), timeout: .milliseconds(300))
            #expect(outcome == expected, "\(head)")
            await holder.stop()
        }
        try await httpClient.shutdown()
    }

    @Test(
        "a system token refused mid-exchange is replaced once by a fresh round trip and the exchange retried; a refused token is not used again"
    )
    func expiredSystemToken() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            // The system token in hand expires before any the emulator mints now (a fresh one is newer).
            let pushed = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1800))
            #expect(pushed.status == 200)
            h.emulator.setGraphQLFault(.rejectSystemToken(times: 1))
            let account = Self.account()
            let answer = try await h.userToken(installation, account)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "exchange")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 2)

            // The fresh one refused too, for another user within the minute: 502 after that one
            // call. No second forced refresh, and no call with the token just refused.
            h.emulator.setGraphQLFault(.rejectSystemToken(times: 2))
            let other = Self.account()
            let failed = try await h.userToken(installation, other)
            #expect(failed.status == 502)
            #expect(failed.errorCode == "exchange_failed")
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: other) == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            // Nor for a third user: no call at all.
            let third = Self.account()
            #expect(try await h.userToken(installation, third).status == 502)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: third) == 0)
        }
    }

    @Test("POST /token/refresh?asUser= forces a new exchange")
    func forcedRefresh() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let account = Self.account()
            let first = try await h.userToken(installation, account)
            #expect(first.status == 200)
            let refreshed = try await h.call(
                .POST, GatewayHarness.path(installation) + "/token/refresh?asUser=\(account)")
            #expect(refreshed.status == 200)
            #expect(refreshed.json["source"] as? String == "exchange")
            #expect(refreshed.json["accessToken"] as? String != first.json["accessToken"] as? String)
            #expect(h.emulator.userTokenExchanges(for: installation, accountId: account) == 2)
            let cached = try await h.userToken(installation, account)
            #expect(cached.json["accessToken"] as? String == refreshed.json["accessToken"] as? String)
        }
    }

    @Test("an opaque user token expires ttl seconds from the exchange")
    func opaqueTokenUsesTTL() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            h.emulator.setOpaqueUserTokens(true)
            h.emulator.setUserTokenLifetime(.seconds(900))
            let before = Int64(Date().timeIntervalSince1970)
            let answer = try await h.userToken(installation, Self.account())
            let after = Int64(Date().timeIntervalSince1970)
            #expect(answer.status == 200)
            let token = try #require(answer.json["accessToken"] as? String)
            #expect(TokenClaims.expiry(of: token) == nil)
            let expiresAt = try #require(answer.json["expiresAt"] as? String)
            #expect(
                (before + 900...after + 900).map { RFC3339.string(unixSeconds: $0) }.contains(expiresAt))
        }
    }

    @Test("a malformed asUser answers 400 invalid_parameter; a percent-encoded one is decoded")
    func accountValidation() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            for bad in ["", "has%20space", "a%7Bb%7D", String(repeating: "a", count: 129), "x%2Fy"] {
                let answer = try await h.userToken(installation, bad)
                #expect(answer.status == 400, "asUser=\(bad)")
                #expect(answer.errorCode == "invalid_parameter")
            }
            #expect(h.emulator.totalUserTokenExchanges == 0)
            let encoded = try await h.userToken(installation, "557058%3Aabc-DEF_1")
            #expect(encoded.status == 200)
            #expect(encoded.json["accountId"] as? String == "557058:abc-DEF_1")
            // The other parameters are validated as for the system token.
            #expect(try await h.userToken(installation, "abc", query: "minValidity=9000").status == 400)
        }
    }

    @Test("uninstall drops the installation's user tokens; later asks answer 410")
    func uninstallDropsUserTokens() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let account = Self.account()
            #expect(try await h.userToken(installation, account).status == 200)
            let key = h.gateway.userTokenStore.tokenKey(installation.installationID, accountId: account)
            #expect(try await h.gateway.redis.send(["EXISTS", key]).int == 1)
            try await h.emulator.uninstall(installation)
            #expect(try await h.gateway.redis.send(["EXISTS", key]).int == 0)
            let answer = try await h.userToken(installation, account)
            #expect(answer.status == 410)
            #expect(answer.errorCode == "installation_uninstalled")
        }
    }

    @Test(
        "the index of user keys holds only live ones: entries past their time are dropped on every write; uninstall deletes what it and the earlier builds' set name"
    )
    func userKeyIndexIsTrimmed() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let users = h.gateway.userTokenStore
            let index = h.gateway.store.userKeysIndexKey(id)
            let now = FlowTime.now()
            let token = AccessToken(value: "user-token", expiresAt: now.unixSeconds + 3600)
            for n in 0..<20 {
                let outcome = try await users.store(
                    id, accountId: "557058:a\(n)", token: token, cacheUntil: now.unixSeconds + 3540, now: now)
                #expect(outcome == .stored)
            }
            for n in 0..<5 { try await users.rememberDenial(id, accountId: "557058:d\(n)", for: .seconds(60)) }
            #expect(try await h.gateway.redis.send(["ZCARD", index]).int == 25)
            // An hour later (as the writer's clock says) every entry above has run out: the next
            // write drops them all, and the index expires with its one live entry.
            let later = now + .seconds(3600)
            let fresh = AccessToken(value: "user-token-2", expiresAt: later.unixSeconds + 3600)
            _ = try await users.store(
                id, accountId: "557058:late", token: fresh, cacheUntil: later.unixSeconds + 3540, now: later)
            let lateKey = users.tokenKey(id, accountId: "557058:late")
            #expect(
                try await h.gateway.redis.send(["ZRANGE", index, "0", "-1"]).array?.compactMap(\.string) == [lateKey])
            #expect(
                try await h.gateway.redis.send(["PEXPIRETIME", index]).int
                    == (later.unixSeconds + 3540) * 1000)
            // A key named by the set earlier builds kept is deleted by the uninstall too.
            let legacyKey = users.tokenKey(id, accountId: "557058:legacy")
            _ = try await h.gateway.redis.send(["HSET", legacyKey, "exp", "1"])
            _ = try await h.gateway.redis.send(["SADD", h.gateway.store.legacyUserTokenIndexKey(id), legacyKey])
            try await h.emulator.uninstall(installation)
            for key in [lateKey, legacyKey, index, h.gateway.store.legacyUserTokenIndexKey(id)] {
                #expect(try await h.gateway.redis.send(["EXISTS", key]).int == 0, "\(key)")
            }
        }
    }

    @Test("unknown installations and callers outside their set get the system token's errors")
    func installationErrors() async throws {
        try await GatewayHarness.run { h in
            let unknown = h.emulator.makeInstallation()
            let missing = try await h.userToken(unknown, Self.account())
            #expect(missing.status == 404)
            #expect(missing.errorCode == "installation_not_found")
            let installation = try await h.installed()
            let scoped = try await h.userToken(installation, Self.account(), secret: GatewayHarness.scopedSecret)
            #expect(scoped.status == 403)
            #expect(scoped.errorCode == "forbidden")
            #expect(h.emulator.totalUserTokenExchanges == 0)
        }
    }
}

extension GatewayHarness {
    /// `GET …/token?asUser=<account>[&query]`; `account` goes into the query as given.
    func userToken(
        _ installation: EmulatedInstallation, _ account: String, query: String = "",
        secret: String = GatewayHarness.callerSecret
    ) async throws -> Answer {
        try await self.call(
            .GET, Self.path(installation) + "/token?asUser=\(account)" + (query.isEmpty ? "" : "&" + query),
            secret: secret)
    }

    /// One HTTP call to another gateway replica.
    func call(_ method: HTTPMethod, _ path: String, baseURL: String) async throws -> Answer {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        request.headers.add(name: "authorization", value: "Bearer \(Self.callerSecret)")
        let response = try await self.http.execute(request, timeout: .seconds(35))
        let bytes = try await response.body.collect(upTo: 4 << 20)
        var headerMap: [String: String] = [:]
        for h in response.headers { headerMap[h.name.lowercased()] = h.value }
        return Answer(status: Int(response.status.code), headers: headerMap, body: String(buffer: bytes))
    }
}

/// The notices a test saw.
final class NoticeLog: Sendable {
    let notices = Mutex<[UserTokenNotice]>([])
    private let signal = ChangeSignal()

    func append(_ notice: UserTokenNotice) {
        self.notices.withLock { $0.append(notice) }
        self.signal.changed()
    }

    /// Waits until the notices seen so far satisfy `condition`, for at most `timeout`.
    func wait(
        within timeout: Duration = .seconds(10), until condition: @escaping @Sendable ([UserTokenNotice]) -> Bool
    ) async -> Bool {
        await self.signal.wait(within: timeout) { condition(self.notices.withLock { $0 }) }
    }
}
