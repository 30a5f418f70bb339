import FlowEngine
import Foundation
import Logging
import Testing

@testable import ForgeEmulator
@testable import TokenGateway

@Suite("User tokens: account ids, site context, the GraphQL exchange's wire format")
struct UserTokenExchangeTests {
    // MARK: Account ids and site context

    @Test("account ids are 1–128 letters, digits, ':', '_' and '-'")
    func accountIDs() {
        for good in [
            "a", "557058:0f5b7c1e-2d3a-4b5c-8d9e-0a1b2c3d4e5f", "5b10ac8d82e05b22cc7d4ef5", "A_b-C:9",
            String(repeating: "x", count: 128),
        ] {
            #expect(UserAccountID(good)?.value == good)
        }
        for bad in ["", " ", "a b", "a{b}", "a/b", "ä", "a.b", "a%3Ab", String(repeating: "x", count: 129), "a\nb"] {
            #expect(UserAccountID(bad) == nil, "\(bad)")
        }
    }

    @Test("the site context ARI comes from the apiBaseUrl's product and the record's cloud id")
    func siteContext() {
        let cloud = "0f5b7c1e-2d3a-4b5c-8d9e-0a1b2c3d4e5f"
        #expect(
            SiteContext(apiBaseUrl: "https://api.atlassian.com/ex/jira/\(cloud)", cloudId: cloud)?.ari
                == "ari:cloud:jira::site/\(cloud)")
        #expect(
            SiteContext(apiBaseUrl: "https://api.atlassian.com/ex/confluence/\(cloud)/", cloudId: nil)?.ari
                == "ari:cloud:confluence::site/\(cloud)")
        #expect(
            SiteContext(apiBaseUrl: "https://api.atlassian.com/ex/Jira/other", cloudId: cloud)?.ari
                == "ari:cloud:jira::site/\(cloud)")
        #expect(SiteContext(apiBaseUrl: "https://example.atlassian.net", cloudId: cloud) == nil)
        #expect(SiteContext(apiBaseUrl: "https://api.atlassian.com/ex/jira", cloudId: nil) == nil)
        #expect(SiteContext(apiBaseUrl: nil, cloudId: cloud) == nil)
        #expect(SiteContext(apiBaseUrl: "https://api.atlassian.com/ex/jira/x", cloudId: "a:b") == nil)
    }

    // MARK: The request

    @Test("the request body is Atlassian's documented mutation with contextIds and userId as variables")
    func requestBody() throws {
        let context = try #require(SiteContext(product: "jira", cloudId: "c1"))
        let account = try #require(UserAccountID("557058:abc"))
        let body = OfflineUserAuthTokenClient.body(context: context, accountId: account)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])
        #expect(json["operationName"] as? String == "forge_remote_offlineUserAuthToken")
        let query = try #require(json["query"] as? String)
        #expect(query.hasPrefix("mutation forge_remote_offlineUserAuthToken($input: OfflineUserAuthTokenInput!)"))
        #expect(query.contains("offlineUserAuthToken(input: $input)"))
        #expect(query.contains("success errors { message } authToken { token ttl }"))
        let input = try #require(((json["variables"] as? [String: Any])?["input"]) as? [String: Any])
        #expect(input["contextIds"] as? [String] == ["ari:cloud:jira::site/c1"])
        #expect(input["userId"] as? String == "557058:abc")
    }

    // MARK: Reading answers

    static func classify(_ status: Int, _ body: String, retryAfter: String? = nil) -> OfflineUserAuthTokenClient.Outcome
    {
        OfflineUserAuthTokenClient.classify(
            status: status, retryAfter: retryAfter, body: Array(body.utf8),
            now: Date(timeIntervalSince1970: 1_800_000_000))
    }

    @Test("success with a token is a token, with its ttl when there is one")
    func successAnswers() {
        #expect(
            Self.classify(
                200, #"{"data":{"offlineUserAuthToken":{"success":true,"authToken":{"token":"t0k","ttl":3600}}}}"#)
                == .token(value: "t0k", ttl: 3600))
        #expect(
            Self.classify(200, #"{"data":{"offlineUserAuthToken":{"success":true,"authToken":{"token":"t0k"}}}}"#)
                == .token(value: "t0k", ttl: nil))
        // A ttl that is no number (a string, a boolean Foundation reads as 1) is no ttl.
        for ttl in [#""3600""#, "true"] {
            #expect(
                Self.classify(
                    200,
                    #"{"data":{"offlineUserAuthToken":{"success":true,"authToken":{"token":"t0k","ttl":"# + ttl + "}}}}"
                )
                    == .token(value: "t0k", ttl: nil), "\(ttl)")
        }
        #expect(
            Self.classify(200, #"{"data":{"offlineUserAuthToken":{"success":true,"authToken":null}}}"#)
                == .failed(.invalidResponse))
        #expect(
            Self.classify(200, #"{"data":{"offlineUserAuthToken":{"success":true,"authToken":{"token":""}}}}"#)
                == .failed(.invalidResponse))
    }

    @Test("success false and 403 are refusals; the message is kept short")
    func refusals() {
        let long = String(repeating: "m", count: 500)
        let outcome = Self.classify(
            200,
            #"{"data":{"offlineUserAuthToken":{"success":false,"errors":[{"message":"\#(long)"}],"authToken":null}}}"#)
        #expect(outcome == .denied(message: String(repeating: "m", count: 200)))
        #expect(Self.classify(403, "") == .denied(message: nil))
        #expect(
            Self.classify(200, #"{"errors":[{"message":"no","extensions":{"statusCode":403}}]}"#)
                == .denied(message: "no"))
    }

    @Test("401 (or an UNAUTHENTICATED error) means the system token was refused")
    func systemTokenRefused() {
        #expect(Self.classify(401, "{}") == .systemTokenRefused)
        #expect(
            Self.classify(200, #"{"errors":[{"message":"x","extensions":{"statusCode":401}}]}"#) == .systemTokenRefused)
        #expect(
            Self.classify(200, #"{"errors":[{"message":"x","extensions":{"errorType":"UNAUTHENTICATED"}}]}"#)
                == .systemTokenRefused)
    }

    @Test("429 carries Retry-After in seconds or as an HTTP date")
    func rateLimits() {
        #expect(Self.classify(429, "", retryAfter: "30") == .rateLimited(retryAfter: .seconds(30)))
        // 1_800_000_000 is Fri, 15 Jan 2027 08:00:00 GMT.
        #expect(
            Self.classify(429, "", retryAfter: "Fri, 15 Jan 2027 08:00:45 GMT")
                == .rateLimited(retryAfter: .seconds(45)))
        #expect(Self.classify(429, "", retryAfter: "soon") == .rateLimited(retryAfter: nil))
        #expect(Self.classify(429, "") == .rateLimited(retryAfter: nil))
        #expect(
            Self.classify(
                200, #"{"errors":[{"message":"x","extensions":{"errorType":"RATE_LIMITED"}}]}"#, retryAfter: "5")
                == .rateLimited(retryAfter: .seconds(5)))
    }

    @Test("5xx and 408 are retryable, other 4xx and nonsense are not")
    func failures() {
        #expect(Self.classify(503, "") == .failed(.httpError(status: 503)))
        #expect(Self.classify(408, "") == .failed(.httpError(status: 408)))
        #expect(Self.classify(400, "") == .failed(.rejected(status: 400)))
        #expect(Self.classify(200, "not json") == .failed(.invalidResponse))
        #expect(Self.classify(200, #"{"data":null}"#) == .failed(.invalidResponse))
        #expect(
            Self.classify(200, #"{"errors":[{"message":"x","extensions":{"statusCode":502}}]}"#)
                == .failed(.httpError(status: 502)))
        #expect(OfflineUserAuthTokenClient.Failure.httpError(status: 503).isRetryable)
        #expect(OfflineUserAuthTokenClient.Failure.transportError.isRetryable)
        #expect(OfflineUserAuthTokenClient.Failure.timeout.isRetryable)
        #expect(!OfflineUserAuthTokenClient.Failure.rejected(status: 400).isRetryable)
        #expect(!OfflineUserAuthTokenClient.Failure.invalidResponse.isRetryable)
    }

    @Test("every outcome maps to a bounded metric word")
    func metricWords() {
        let outcomes: [OfflineUserAuthTokenClient.Outcome] = [
            .token(value: "t", ttl: 1), .denied(message: nil), .systemTokenRefused, .rateLimited(retryAfter: nil),
            .failed(.httpError(status: 500)), .failed(.rejected(status: 400)), .failed(.transportError),
            .failed(.timeout), .failed(.invalidResponse),
        ]
        for outcome in outcomes {
            #expect(UserExchangeMetrics.outcomes.contains(outcome.outcome))
        }
    }

    // MARK: Errors

    @Test("user-token errors become the contract's answers")
    func errorMapping() {
        let denied = GatewayError(UserTokenError.denied)
        #expect(denied.status == .forbidden)
        #expect(denied.code == "user_token_denied")
        #expect(denied.retryAfter == nil)
        let limited = GatewayError(UserTokenError.rateLimited(retryAfter: .milliseconds(1200)))
        #expect(limited.status == .tooManyRequests)
        #expect(limited.code == "rate_limited")
        #expect(limited.retryAfter == 2)
        let failed = GatewayError(UserTokenError.exchangeFailed("last attempt: HTTP 503"))
        #expect(failed.status == .badGateway)
        #expect(failed.code == "exchange_failed")
        #expect(failed.message.contains("HTTP 503"))
        #expect(GatewayError(UserTokenError.timeout).status == .gatewayTimeout)
        #expect(GatewayError(UserTokenError.timeout).code == "token_timeout")
        #expect(GatewayError(UserTokenError.storeUnavailable).retryAfter == 1)
        #expect(GatewayError(UserTokenError.flow(.installationUninstalled)).status == .gone)
        #expect(UserTokenError.flow(.tokenTimeout) == .timeout)
        #expect(UserTokenError.denied != .timeout)
    }

    // MARK: The emulator's GraphQL endpoint

    static func emulator() throws -> ForgeEmulator {
        try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1"), logger: Logger(label: "test"))
    }

    static func installed(_ emulator: ForgeEmulator) -> EmulatedInstallation {
        let installation = emulator.makeInstallation()
        emulator.state.withLock { $0.update(installation) { $0.status = .installed } }
        return installation
    }

    static func body(_ contexts: [String], _ account: String) -> Data {
        let json: [String: Any] = [
            "query": OfflineUserAuthTokenClient.mutation,
            "variables": ["input": ["contextIds": contexts, "userId": account]],
        ]
        return try! JSONSerialization.data(withJSONObject: json)
    }

    static func classify(_ answer: GraphQLAnswer) -> OfflineUserAuthTokenClient.Outcome {
        OfflineUserAuthTokenClient.classify(
            status: answer.status, retryAfter: answer.retryAfter.map(String.init), body: Array(answer.body), now: Date()
        )
    }

    @Test("the emulator exchanges a valid system token for a user token the gateway reads as such")
    func emulatorExchanges() async throws {
        let emulator = try Self.emulator()
        let installation = Self.installed(emulator)
        let system = try emulator.mintAccessToken(for: installation)
        let answer = await emulator.answerGraphQL(
            authorization: "Bearer " + system, body: Self.body([installation.siteARI], "557058:u1"))
        #expect(answer.status == 200)
        guard case .token(let token, let ttl) = Self.classify(answer) else {
            Issue.record("not a token: \(Self.classify(answer))")
            return
        }
        #expect(ttl == 3600)
        let exp = try #require(TokenClaims.expiry(of: token))
        #expect(abs(exp - Int64(Date().timeIntervalSince1970) - 3600) <= 2)
        #expect(emulator.lastUserToken(for: installation, accountId: "557058:u1") == token)
        #expect(emulator.userTokenExchanges(for: installation, accountId: "557058:u1") == 1)
        #expect(emulator.userTokenExchangeRecords.first?.outcome == "token")
    }

    @Test("the emulator refuses refused users, unknown sites and other installations' system tokens")
    func emulatorRefuses() async throws {
        let emulator = try Self.emulator()
        let installation = Self.installed(emulator)
        let other = Self.installed(emulator)
        let system = try emulator.mintAccessToken(for: installation)
        emulator.refuseUserTokens(for: "557058:no")
        let refused = await emulator.answerGraphQL(
            authorization: "Bearer " + system, body: Self.body([installation.siteARI], "557058:no"))
        guard case .denied = Self.classify(refused) else {
            Issue.record("refused user not denied")
            return
        }
        let unknown = await emulator.answerGraphQL(
            authorization: "Bearer " + system, body: Self.body(["ari:cloud:jira::site/nope"], "557058:u"))
        guard case .denied = Self.classify(unknown) else {
            Issue.record("unknown site not denied")
            return
        }
        let foreign = await emulator.answerGraphQL(
            authorization: "Bearer " + system, body: Self.body([other.siteARI], "557058:u"))
        guard case .denied = Self.classify(foreign) else {
            Issue.record("foreign system token not denied")
            return
        }
        emulator.allowUserTokens(for: "557058:no")
        let allowed = await emulator.answerGraphQL(
            authorization: "Bearer " + system, body: Self.body([installation.siteARI], "557058:no"))
        #expect(allowed.status == 200)
    }

    @Test("the emulator answers 401 to missing, forged and expired system tokens")
    func emulatorUnauthorized() async throws {
        let emulator = try Self.emulator()
        let installation = Self.installed(emulator)
        let body = Self.body([installation.siteARI], "557058:u")
        let expired = try emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(-5))
        let valid = try emulator.mintAccessToken(for: installation)
        let forged = String(valid.dropLast(4)) + (valid.hasSuffix("AAAA") ? "BBBB" : "AAAA")
        for authorization in [nil, "Bearer ", "Bearer " + expired, "Bearer " + forged, "Basic " + valid] {
            let answer = await emulator.answerGraphQL(authorization: authorization, body: body)
            #expect(answer.status == 401)
            #expect(Self.classify(answer) == .systemTokenRefused)
        }
    }

    @Test("the emulator's faults and its own rate limit")
    func emulatorFaults() async throws {
        let emulator = try Self.emulator()
        let installation = Self.installed(emulator)
        let system = "Bearer " + (try emulator.mintAccessToken(for: installation))
        let body = Self.body([installation.siteARI], "557058:u")

        emulator.setGraphQLFault(.failWith(status: 503, times: 2))
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 503)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 503)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 200)

        emulator.setGraphQLFault(.rejectSystemToken(times: 1))
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 401)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 200)
        emulator.setGraphQLFault(.none)

        emulator.setGraphQLRateLimit(perMinute: 2)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 200)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 200)
        let limited = await emulator.answerGraphQL(authorization: system, body: body)
        #expect(limited.status == 429)
        #expect((59...60).contains(limited.retryAfter ?? 0))
        guard case .rateLimited(let after?) = Self.classify(limited) else {
            Issue.record("not rate limited")
            return
        }
        #expect(after >= .seconds(59))
        emulator.setGraphQLRateLimit(perMinute: nil)
        #expect(await emulator.answerGraphQL(authorization: system, body: body).status == 200)
        #expect(emulator.totalUserTokenExchanges == 9)
    }

    @Test("the emulator's exchange is limited to 1,000 calls a minute by default, as Atlassian's is")
    func emulatorRateLimitDefault() {
        var state = EmulatorGraphQLState()
        let now = Date()
        for _ in 0..<1000 { #expect(state.admit(at: now) == nil) }
        #expect(state.admit(at: now) == 60)
        #expect(state.admit(at: now.addingTimeInterval(60)) == nil)
    }

    @Test("the emulator can answer opaque user tokens, whose expiry only the ttl tells")
    func emulatorOpaqueTokens() async throws {
        let emulator = try Self.emulator()
        let installation = Self.installed(emulator)
        emulator.setOpaqueUserTokens(true)
        emulator.setUserTokenLifetime(.seconds(600))
        let answer = await emulator.answerGraphQL(
            authorization: "Bearer " + (try emulator.mintAccessToken(for: installation)),
            body: Self.body([installation.siteARI], "557058:u"))
        guard case .token(let token, let ttl) = Self.classify(answer) else {
            Issue.record("not a token")
            return
        }
        #expect(ttl == 600)
        #expect(TokenClaims.expiry(of: token) == nil)
    }

    @Test("GraphQL faults round-trip through JSON")
    func faultCoding() throws {
        for fault: GraphQLFault in [
            .none, .failWith(status: 503, times: 2), .respondSlowly(.milliseconds(1500)), .rejectSystemToken(times: 1),
        ] {
            let data = try JSONEncoder().encode(fault)
            #expect(try JSONDecoder().decode(GraphQLFault.self, from: data) == fault)
        }
        #expect(throws: (any Error).self) {
            try JSONDecoder().decode(GraphQLFault.self, from: Data(#"{"type":"failWith","status":42}"#.utf8))
        }
    }
}
