import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Where a token entry happens: the harness (gateway A, the emulator), the installation, gateway
/// A's base URL, which every entry delivers to unless it says otherwise, and the other replica's.
struct TokenEntryContext: Sendable {
    let h: GatewayHarness
    let installation: EmulatedInstallation
    let gatewayURL: String
    let otherURL: String
}

/// What a token entry left behind.
struct EnteredToken: Sendable {
    /// The token the gateway must now serve.
    let token: String
    /// The caller answer the entry itself produced (the trigger round trip), with its source.
    let answer: (GatewayHarness.Answer, source: String)?
}

/// One way a token enters the gateway (contract §2 *(v1.1)*: "whichever way the token entered").
struct TokenEntry: Sendable, CustomTestStringConvertible {
    let name: String
    /// Trigger calls the entry makes.
    let triggerCalls: Int
    let enter: @Sendable (TokenEntryContext) async throws -> EnteredToken

    var testDescription: String { self.name }

    /// Every way a token enters. Adding a way is one line here.
    static let all: [TokenEntry] = [
        .triggerRoundTrip,
        .deliveredToTheOtherReplica,
        .forcedRefresh,
        .pushWhileACallerWaits,
        .forgeCall("delivery naming an unknown requestId", path: "/forge/auth-trigger") { _, _ in
            #"{"requestId":"\#(UUID().uuidString)"}"#
        },
        .forgeCall("unasked push to /forge/auth-trigger with {}", path: "/forge/auth-trigger") { _, _ in "{}" },
        .forgeCall("unasked push to /forge/auth-trigger with no body", path: "/forge/auth-trigger") { _, _ in nil },
        .forgeCall("/forge/register with x-forge-oauth-system", path: "/forge/register") { e, i in
            #"{"authTriggerUrl":"\#(e.triggerURL(for: i))"}"#
        },
        // Forge's documented lifecycle body: no eventType, handled as installed/upgraded.
        .forgeCall("/forge/lifecycle (documented body) with x-forge-oauth-system", path: "/forge/lifecycle") { _, i in
            #"{"id":"\#(i.id)","installerAccountId":"557058:installer","app":{"id":"\#(ForgeEmulatorConfiguration.demoAppId)","version":"2.0.0","name":"token-gateway","ownerAccountId":"557058:installer"},"environment":{"id":"env-1"}}"#
        },
        .forgeCall("/forge/lifecycle avi:forge:upgraded:app with x-forge-oauth-system", path: "/forge/lifecycle") {
            _, i in
            #"{"eventType":"avi:forge:upgraded:app","id":"\#(i.id)","app":{"id":"\#(ForgeEmulatorConfiguration.demoAppId)","version":"3.0.0"}}"#
        },
    ]

    /// The trigger round trip, its delivery landing on the other replica (the caller waits on A).
    static let deliveredToTheOtherReplica = TokenEntry(
        name: "trigger round trip delivered to the other replica", triggerCalls: 1
    ) { ctx in
        ctx.h.emulator.setFault(.deliverVia(gatewayURL: ctx.otherURL), for: ctx.installation)
        defer { ctx.h.emulator.setFault(.none, for: ctx.installation) }
        let answer = try await ctx.h.token(ctx.installation, query: "minValidity=1800")
        let token = try #require(answer.json["accessToken"] as? String, "\(answer.status) \(answer.body)")
        return EnteredToken(token: token, answer: (answer, source: "trigger"))
    }

    /// `POST …/token/refresh`: a round trip although the stored token is valid.
    static let forcedRefresh = TokenEntry(name: "forced refresh", triggerCalls: 1) { ctx in
        let answer = try await ctx.h.call(
            .POST, GatewayHarness.path(ctx.installation) + "/token/refresh", at: ctx.gatewayURL)
        let token = try #require(answer.json["accessToken"] as? String, "\(answer.status) \(answer.body)")
        return EnteredToken(token: token, answer: (answer, source: "trigger"))
    }

    /// A caller waits on a round trip whose trigger delivers nothing; Forge pushes a token unasked
    /// meanwhile, which answers the caller (source `push`).
    static let pushWhileACallerWaits = TokenEntry(name: "unasked push while a caller waits", triggerCalls: 1) { ctx in
        ctx.h.emulator.setFault(.acceptWithoutDelivery, for: ctx.installation)
        defer { ctx.h.emulator.setFault(.none, for: ctx.installation) }
        let (h, installation) = (ctx.h, ctx.installation)
        let waiting = Task { try await h.token(installation, query: "minValidity=1800&timeout=30000") }
        #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.triggerCalls(for: installation) == 1 })
        let pushed = try await h.emulator.push(installation, to: ctx.gatewayURL)
        #expect(pushed.status == 200, "\(pushed.body)")
        return EnteredToken(token: pushed.token, answer: (try await waiting.value, source: "push"))
    }

    /// A caller asks for more validity than the stored token has: one round trip, and the trigger's
    /// delivery (to gateway A) brings the token. The caller's own answer has source `trigger`.
    static let triggerRoundTrip = TokenEntry(name: "trigger round-trip delivery", triggerCalls: 1) { ctx in
        let answer = try await ctx.h.token(ctx.installation, query: "minValidity=1800")
        let token = try #require(answer.json["accessToken"] as? String, "\(answer.status) \(answer.body)")
        #expect(ctx.h.emulator.triggerCalls(for: ctx.installation) == 1)
        return EnteredToken(token: token, answer: (answer, source: "trigger"))
    }

    /// A Forge call to `path` with a FIT (from the emulator, naming the installation's apiBaseUrl),
    /// a freshly minted system token in `x-forge-oauth-system`, and `body` (no body at all when nil).
    static func forgeCall(
        _ name: String, path: String,
        body: @escaping @Sendable (ForgeEmulator, EmulatedInstallation) -> String?
    ) -> TokenEntry {
        TokenEntry(name: name, triggerCalls: 0) { ctx in
            let token = try ctx.h.emulator.mintAccessToken(for: ctx.installation)
            let fit = try ctx.h.emulator.mintFIT(for: ctx.installation)
            var headers = ["authorization": "Bearer " + fit, "x-forge-oauth-system": token]
            let text = body(ctx.h.emulator, ctx.installation)
            if text != nil { headers["content-type"] = "application/json" }
            let answer = try await ctx.h.call(.POST, path, at: ctx.gatewayURL, headers: headers, body: text)
            #expect(answer.status == 200, "\(name): \(answer.status) \(answer.body)")
            return EnteredToken(token: token, answer: nil)
        }
    }
}

/// Every way a token enters × every way it is served: the whole answer, `apiBaseUrl` included,
/// on the replica that received the token, on another replica that was running, on a replica
/// started afterwards (Redis only), through `GET …/token`, `/oauth/token`, `?asUser=` and the
/// installation's metadata.
@Suite("Token answers: every entry × every serving path")
struct TokenAnswerMatrixTests {
    @Test(
        "the whole answer is right whichever way the token entered and whichever way it is served",
        arguments: TokenEntry.all)
    func wholeAnswer(entry: TokenEntry) async throws {
        // A round trip whose trigger delivers nothing waits for a push, not for the grace to end.
        try await GatewayHarness.run(configure: { $0.flow.deliveryGrace = .seconds(60) }) { h in
            let installation = h.emulator.makeInstallation()
            let id = installation.installationID
            try await h.withSecondGateway { otherURL, other in
                // Installed (lifecycle event and trigger registration), so Atlassian exchanges
                // user tokens for it. The other replica already serves an older token from its
                // memory, so it only serves the new one once the notification has reached it.
                try await h.emulator.install(installation)
                let older = try await h.emulator.push(
                    installation, expiresAt: Date().addingTimeInterval(1200), to: otherURL)
                #expect(older.status == 200, "\(older.body)")
                let primed = try await h.call(.GET, GatewayHarness.path(installation) + "/token", at: otherURL)
                Self.expectWholeAnswer(
                    primed, installation, token: older.token, source: "cache", "other replica, before")

                // The entry, on gateway A.
                let entered = try await entry.enter(
                    TokenEntryContext(h: h, installation: installation, gatewayURL: h.gatewayURL, otherURL: otherURL))
                #expect(entered.token != older.token)
                if let first = entered.answer {
                    Self.expectWholeAnswer(
                        first.0, installation, token: entered.token, source: first.source, "entering answer")
                }

                // 1. Memory of the replica that received it: the entry carries token and base URL together.
                let memory = h.gateway.flow.remembered(id)
                #expect(memory.token?.value == entered.token)
                #expect(memory.apiBaseUrl == installation.apiBaseUrl)
                let account = "557058:" + UUID().uuidString.lowercased()
                try await Self.expectEveryServingPath(
                    h, installation, token: entered.token, at: h.gatewayURL, account: account, userSource: "exchange",
                    "receiving replica")

                // 2. The other replica, which was running: told by the notification channel, it
                // replaces the older token in its memory, base URL included.
                #expect(
                    try await Events.wait(on: other.flow.notificationEvents()) {
                        other.flow.remembered(id).token?.value == entered.token
                    })
                #expect(other.flow.remembered(id).apiBaseUrl == installation.apiBaseUrl)
                try await Self.expectEveryServingPath(
                    h, installation, token: entered.token, at: otherURL, account: account, userSource: "cache",
                    "other replica")

                // 3. A replica started afterwards knows nothing but Redis.
                try await h.withSecondGateway { freshURL, fresh in
                    #expect(fresh.flow.remembered(id).token == nil)
                    try await Self.expectEveryServingPath(
                        h, installation, token: entered.token, at: freshURL, account: account, userSource: "cache",
                        "fresh replica")
                    // Served from memory now: the same whole answer.
                    #expect(fresh.flow.remembered(id).apiBaseUrl == installation.apiBaseUrl)
                    let again = try await h.call(.GET, GatewayHarness.path(installation) + "/token", at: freshURL)
                    Self.expectWholeAnswer(
                        again, installation, token: entered.token, source: "cache", "fresh replica's memory")
                }
            }
            #expect(h.emulator.triggerCalls(for: installation) == entry.triggerCalls)
        }
    }

    /// At the replica at `url`: `GET …/token` (source `cache`), `POST /oauth/token`, a user token
    /// for `account` (`?asUser=`, with `userSource`) and the installation's metadata, each whole.
    static func expectEveryServingPath(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, token: String, at url: String, account: String,
        userSource: String, _ what: String
    ) async throws {
        let answer = try await h.call(.GET, GatewayHarness.path(installation) + "/token", at: url)
        Self.expectWholeAnswer(answer, installation, token: token, source: "cache", what)
        try await Self.expectOAuthAnswer(h, installation, token: token, at: url, what)
        try await Self.expectUserAnswer(h, installation, account: account, at: url, source: userSource, what)
        try await Self.expectMetadata(h, installation, token: token, at: url, what)
        // What they served from leaves memory as it was.
        #expect(h.gateway.flow.remembered(installation.installationID).apiBaseUrl == installation.apiBaseUrl)
    }

    /// `POST /oauth/token` (client_credentials with the installation as resource) serves `token`.
    static func expectOAuthAnswer(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, token: String, at url: String, _ what: String
    ) async throws {
        let oauth = try await h.call(
            .POST, "/oauth/token", at: url,
            headers: [
                "content-type": "application/x-www-form-urlencoded",
                "authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret),
            ], body: "grant_type=client_credentials&resource=\(formEncoded(installation.id))")
        #expect(oauth.status == 200, "\(what): \(oauth.body)")
        #expect(Set(oauth.json.keys) == ["access_token", "token_type", "expires_in", "apiBaseUrl"], "\(what)")
        #expect(oauth.json["apiBaseUrl"] as? String == installation.apiBaseUrl, "\(what)")
        #expect(oauth.json["access_token"] as? String == token, "\(what)")
        #expect(oauth.json["token_type"] as? String == "Bearer", "\(what)")
        #expect(oauth.headers["cache-control"] == "no-store", "\(what)")
        #expect(oauth.headers["pragma"] == "no-cache", "\(what)")
        let exp = try #require(TokenClaims.expiry(of: token))
        let expiresIn = try #require(oauth.json["expires_in"] as? Int)
        let left = Int(exp - Int64(Date().timeIntervalSince1970))
        #expect(expiresIn >= left - 5 && expiresIn <= left + 1, "\(what)")
    }

    /// A user token (`?asUser=account`): the emulator's latest for that account, with the
    /// installation's apiBaseUrl, from `source`.
    static func expectUserAnswer(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, account: String, at url: String, source: String,
        _ what: String
    ) async throws {
        let user = try await h.call(.GET, GatewayHarness.path(installation) + "/token?asUser=\(account)", at: url)
        #expect(user.status == 200, "\(what): \(user.body)")
        #expect(
            Set(user.json.keys)
                == ["installationId", "accountId", "tokenType", "accessToken", "expiresAt", "apiBaseUrl", "source"],
            "\(what)")
        #expect(user.json["installationId"] as? String == installation.id, "\(what)")
        #expect(user.json["accountId"] as? String == account, "\(what)")
        #expect(user.json["tokenType"] as? String == "Bearer", "\(what)")
        let userToken = try #require(user.json["accessToken"] as? String)
        #expect(userToken == h.emulator.lastUserToken(for: installation, accountId: account), "\(what)")
        #expect(
            user.json["expiresAt"] as? String
                == TokenClaims.expiry(of: userToken).map { RFC3339.string(unixSeconds: $0) }, "\(what)")
        #expect(user.json["apiBaseUrl"] as? String == installation.apiBaseUrl, "\(what)")
        #expect(user.json["source"] as? String == source, "\(what)")
        #expect(user.headers["cache-control"] == "no-store", "\(what)")
    }

    /// `GET /v1/installations/{id}`: the stored token's expiry and the installation's apiBaseUrl.
    static func expectMetadata(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, token: String, at url: String, _ what: String
    ) async throws {
        let meta = try await h.call(.GET, GatewayHarness.path(installation), at: url)
        #expect(meta.status == 200, "\(what): \(meta.body)")
        #expect(
            Set(meta.json.keys) == [
                "installationId", "appId", "cloudId", "apiBaseUrl", "status", "triggerRegistered", "tokenExpiresAt",
                "lastTokenAt", "triggerKeyId", "createdAt", "updatedAt",
            ], "\(what)")
        #expect(meta.json["installationId"] as? String == installation.id, "\(what)")
        #expect(meta.json["apiBaseUrl"] as? String == installation.apiBaseUrl, "\(what)")
        #expect(meta.json["cloudId"] as? String == installation.cloudId, "\(what)")
        #expect(meta.json["status"] as? String == "active", "\(what)")
        #expect(meta.json["triggerRegistered"] as? Bool == true, "\(what)")
        #expect(
            meta.json["tokenExpiresAt"] as? String
                == TokenClaims.expiry(of: token).map { RFC3339.string(unixSeconds: $0) }, "\(what)")
    }

    @Test("a later FIT's apiBaseUrl replaces the earlier one in every answer, on both replicas")
    func latestFITWins() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let id = installation.installationID
            try await h.withSecondGateway { otherURL, other in
                let first = try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(1200))
                #expect(first.status == 200)
                _ = try await h.call(.GET, GatewayHarness.path(installation) + "/token", at: otherURL)
                #expect(other.flow.remembered(id).apiBaseUrl == installation.apiBaseUrl)

                // The site moved: Forge's next FIT names another apiBaseUrl (here on a push whose
                // token is no newer, so only the base URL changes).
                var moved = installation
                moved.apiBaseUrl = "https://api.atlassian.com/ex/confluence/" + installation.cloudId
                let again = try await h.emulator.deliver(moved, systemToken: first.token, requestId: nil)
                #expect(again.status == 200)
                #expect(again.body.contains("\"stored\":false"))
                let here = try await h.token(moved)
                Self.expectWholeAnswer(here, moved, token: first.token, source: "cache", "receiving replica")
                let movedURL = moved.apiBaseUrl
                #expect(
                    try await Events.wait(on: other.flow.notificationEvents()) {
                        other.flow.remembered(id).apiBaseUrl == movedURL
                    })
                let there = try await h.call(.GET, GatewayHarness.path(moved) + "/token", at: otherURL)
                Self.expectWholeAnswer(there, moved, token: first.token, source: "cache", "other replica")
                let meta = try await h.call(.GET, GatewayHarness.path(moved))
                #expect(meta.json["apiBaseUrl"] as? String == moved.apiBaseUrl)
            }
        }
    }

    @Test(
        "a first apiBaseUrl, from a lifecycle call or a registration, reaches answers from memory on both replicas",
        arguments: ["lifecycle", "register"])
    func firstAPIBaseURLReachesMemory(_ route: String) async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let id = installation.installationID
            try await h.withSecondGateway { otherURL, other in
                // A token stored while no FIT of the installation had named an apiBaseUrl yet.
                let token = try h.emulator.mintAccessToken(
                    for: installation, expiresAt: Date().addingTimeInterval(1200))
                let stored = try await h.gateway.store.storeDeliveredToken(
                    id, token: AccessToken(value: token, expiresAt: try #require(TokenClaims.expiry(of: token))),
                    requestID: nil, metadata: InstallationMetadata(appId: nil, apiBaseUrl: nil, cloudId: nil),
                    now: FlowTime.now())
                #expect(stored.outcome == .stored)
                let path = GatewayHarness.path(installation) + "/token"
                for url in [h.gatewayURL, otherURL] {
                    let before = try await h.call(.GET, path, at: url)
                    #expect(before.status == 200)
                    #expect(before.json["apiBaseUrl"] is NSNull, "\(before.body)")
                }
                #expect(h.gateway.flow.remembered(id).token != nil && other.flow.remembered(id).token != nil)

                // Then a FIT names it, on a call that brings no token.
                if route == "lifecycle" {
                    #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
                } else {
                    #expect(try await h.emulator.register(installation).status == 200)
                }
                let here = try await h.call(.GET, path)
                Self.expectWholeAnswer(here, installation, token: token, source: "cache", "receiving replica")
                #expect(
                    try await Events.wait(on: other.flow.notificationEvents()) {
                        other.flow.remembered(id).apiBaseUrl == installation.apiBaseUrl
                    })
                let there = try await h.call(.GET, path, at: otherURL)
                Self.expectWholeAnswer(there, installation, token: token, source: "cache", "other replica")
            }
        }
    }

    /// The whole `GET …/token` answer: every field, nothing else.
    static func expectWholeAnswer(
        _ answer: GatewayHarness.Answer, _ installation: EmulatedInstallation, token: String, source: String,
        _ what: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(answer.status == 200, "\(what): \(answer.status) \(answer.body)", sourceLocation: sourceLocation)
        let json = answer.json
        #expect(
            Set(json.keys) == ["installationId", "tokenType", "accessToken", "expiresAt", "apiBaseUrl", "source"],
            "\(what)", sourceLocation: sourceLocation)
        #expect(json["installationId"] as? String == installation.id, "\(what)", sourceLocation: sourceLocation)
        #expect(json["tokenType"] as? String == "Bearer", "\(what)", sourceLocation: sourceLocation)
        #expect(json["accessToken"] as? String == token, "\(what)", sourceLocation: sourceLocation)
        #expect(
            json["expiresAt"] as? String == TokenClaims.expiry(of: token).map { RFC3339.string(unixSeconds: $0) },
            "\(what)", sourceLocation: sourceLocation)
        #expect(json["apiBaseUrl"] as? String == installation.apiBaseUrl, "\(what)", sourceLocation: sourceLocation)
        #expect(json["source"] as? String == source, "\(what)", sourceLocation: sourceLocation)
        #expect(answer.headers["cache-control"] == "no-store", "\(what)", sourceLocation: sourceLocation)
        // Byte for byte what the general JSON writer makes of the same fields (answers from the
        // cache are written once per token and reused).
        if let expiry = TokenClaims.expiry(of: token), let tokenSource = TokenSource(rawValue: source) {
            let slow = TokenAnswerBodies.slowBody(
                installation: installation.id,
                answer: TokenAnswer(
                    token: AccessToken(value: token, expiresAt: expiry), source: tokenSource,
                    apiBaseUrl: installation.apiBaseUrl))
            #expect(answer.body == slow, "\(what)", sourceLocation: sourceLocation)
        } else {
            Issue.record(
                "\(what): no expiry in the token or an unknown source \(source)", sourceLocation: sourceLocation)
        }
    }
}

extension GatewayHarness {
    /// One HTTP call to the gateway at `baseURL` (another replica), with the full caller's
    /// credential unless `headers` name another `authorization`.
    func call(
        _ method: HTTPMethod, _ path: String, at baseURL: String, headers: [String: String] = [:], body: String? = nil
    ) async throws -> Answer {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        request.headers.add(name: "authorization", value: "Bearer \(GatewayHarness.callerSecret)")
        for (k, v) in headers { request.headers.replaceOrAdd(name: k, value: v) }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        let response = try await self.http.execute(request, timeout: .seconds(35))
        let bytes = try await response.body.collect(upTo: 4 << 20)
        var headerMap: [String: String] = [:]
        for h in response.headers { headerMap[h.name.lowercased()] = h.value }
        return Answer(status: Int(response.status.code), headers: headerMap, body: String(buffer: bytes))
    }
}
