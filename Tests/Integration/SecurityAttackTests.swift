import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Issue #4 items 1 and 2: every forged, stale or misdirected Forge Invocation Token is refused with
/// 401 `invalid_invocation_token` on each Forge route, and nothing is stored.
@Suite("Security: Forge invocation token attacks", .serialized)
struct SecurityAttackTests {
    /// One way to get a FIT wrong.
    struct Attack: Sendable, CustomStringConvertible {
        let description: String
        let options: @Sendable (inout FITOptions) -> Void
    }

    static let attacks: [Attack] = [
        Attack(description: "alg none") { $0.algorithm = .none },
        Attack(description: "HS256 signed with the RSA public key") { $0.algorithm = .hs256WithPublicKey },
        Attack(description: "wrong aud") {
            $0.audience = "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000000"
        },
        Attack(description: "wrong iss") { $0.issuer = "forge/not-an-invocation-token" },
        Attack(description: "expired beyond the skew") {
            $0.issuedAt = Date().addingTimeInterval(-200)
            $0.expiresAt = Date().addingTimeInterval(-120)
        },
        Attack(description: "nbf in the future") { $0.notBefore = Date().addingTimeInterval(300) },
        Attack(description: "iat in the future") { $0.issuedAt = Date().addingTimeInterval(300) },
        Attack(description: "unknown kid") { $0.kid = "kid-nobody-published" },
        Attack(description: "tampered payload") { $0.tamperPayload = true },
        Attack(description: "signed with an unpublished key") { $0.signWithUnpublishedKey = true },
    ]

    /// The four Forge routes with a body each would accept from a genuine caller.
    static func forgeCalls(_ h: GatewayHarness, _ installation: EmulatedInstallation) -> [(path: String, body: String)]
    {
        [
            ("/forge/auth-trigger", "{}"),
            (
                "/forge/pre-uninstall",
                "{\"context\":{\"cloudId\":\"\(installation.cloudId)\",\"moduleKey\":\"m\"},\"contextToken\":\"t\"}"
            ),
            ("/forge/register", "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\"}"),
            (
                "/forge/lifecycle",
                "{\"eventType\":\"avi:forge:installed:app\",\"id\":\"\(installation.id)\",\"context\":\"\(installation.siteARI)\"}"
            ),
        ]
    }

    /// `POST path` as Forge would call it: `fit` as the bearer, `token` as `x-forge-oauth-system`.
    static func forgeCall(_ h: GatewayHarness, _ path: String, fit: String, token: String, body: String)
        async throws -> GatewayHarness.Answer
    {
        try await h.call(
            .POST, path, secret: nil,
            headers: [
                "authorization": "Bearer \(fit)", "content-type": "application/json", "x-forge-oauth-system": token,
            ], body: body)
    }

    static func expectRefusedAndNothingStored(
        _ answer: GatewayHarness.Answer, _ h: GatewayHarness, _ installation: EmulatedInstallation,
        _ comment: Comment
    ) async throws {
        #expect(answer.status == 401, comment)
        #expect(answer.errorCode == "invalid_invocation_token", comment)
        #expect(try await h.gateway.store.installation(installation.installationID) == nil, comment)
        #expect(try await h.gateway.store.systemToken(installation.installationID) == nil, comment)
        #expect(try await Security.keys(of: installation, in: h.gateway.redis).isEmpty, comment)
    }

    @Test("every bad FIT is refused on every Forge route with 401 and stores nothing, not even its jti")
    func badInvocationTokensAreRefused() async throws {
        // One window for the whole test, however slow the machine: the log lines are counted below.
        try await GatewayHarness.run(configure: { $0.refusalLogWindow = .seconds(3600) }) { h in
            for attack in Self.attacks {
                let installation = h.emulator.makeInstallation()
                let token = try h.emulator.mintAccessToken(for: installation)
                for (path, body) in Self.forgeCalls(h, installation) {
                    var options = FITOptions()
                    attack.options(&options)
                    let jti = "attack-" + UUID().uuidString.lowercased()
                    options.jti = jti
                    let fit = try h.emulator.mintFIT(for: installation, options: options)
                    let answer = try await Self.forgeCall(h, path, fit: fit, token: token, body: body)
                    try await Self.expectRefusedAndNothingStored(answer, h, installation, "\(attack) on \(path)")
                    let seen = try await Security.scan(pattern: "tg:*seen-fit:\(jti)", in: h.gateway.redis)
                    #expect(seen.isEmpty, "\(attack) on \(path): the jti of a refused FIT is not recorded")
                }
            }
            // Forty refusals in a moment: a few log lines, not one each.
            let lines = h.logs.captured.filter { $0.contains("msg=\"invocation token refused\"") }.count
            #expect(lines == 20, "\(lines) lines")
        }
    }

    @Test("bad FITs for an installation that exists change nothing: its stored state, and another replica's answers")
    func badInvocationTokensChangeNothingOfAnInstallation() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let id = installation.installationID
            // A FIT naming another site, and a later token: were either taken, answers would change.
            var elsewhere = installation
            elsewhere.apiBaseUrl = "https://api.atlassian.com/ex/confluence/" + installation.cloudId
            let moved = elsewhere
            try await h.withSecondGateway { url, other in
                let path = GatewayHarness.path(installation)
                let served = try await h.call(.GET, path + "/token", at: url)
                #expect(served.status == 200)
                let before = try await Security.settledSnapshot(of: installation, in: h.gateway.redis)
                let metadata = try await h.call(.GET, path, at: url)
                for attack in Self.attacks {
                    for (route, body) in Self.forgeCalls(h, installation) {
                        var options = FITOptions()
                        attack.options(&options)
                        let fit = try h.emulator.mintFIT(for: moved, options: options)
                        let token = try h.emulator.mintAccessToken(
                            for: installation, expiresAt: Date().addingTimeInterval(7000))
                        let answer = try await Self.forgeCall(h, route, fit: fit, token: token, body: body)
                        #expect(answer.status == 401, "\(attack) on \(route)")
                        #expect(answer.errorCode == "invalid_invocation_token", "\(attack) on \(route)")
                    }
                }
                #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
                #expect(try await h.call(.GET, path, at: url).body == metadata.body)
                #expect(other.flow.remembered(id).apiBaseUrl == installation.apiBaseUrl)
                for base in [h.gatewayURL, url] {
                    let after = try await h.call(.GET, path + "/token", at: base)
                    #expect(after.body == served.body, "\(base)")
                }
            }
        }
    }

    @Test(
        "a token nobody signed learns nothing of the routes' policy: a UI module's kind or a principal is 401, not 403")
    func unsignedKindIsNotRevealed() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let token = try h.emulator.mintAccessToken(for: installation)
            let kinds: [(String, @Sendable (inout FITOptions) -> Void)] = [
                ("a UI module", { $0.moduleType = "jira:issuePanel" }),
                ("a principal", { $0.principal = "557058:someone" }),
                ("another module key", { $0.moduleKey = "not-the-endpoint" }),
            ]
            for (name, kind) in kinds {
                for (path, body) in Self.forgeCalls(h, installation) {
                    var options = FITOptions()
                    kind(&options)
                    options.signWithUnpublishedKey = true
                    let fit = try h.emulator.mintFIT(for: installation, options: options)
                    let answer = try await Self.forgeCall(h, path, fit: fit, token: token, body: body)
                    try await Self.expectRefusedAndNothingStored(answer, h, installation, "\(name) on \(path)")
                }
            }
        }
    }

    @Test("a missing, empty or non-bearer authorization is refused with 401 and stores nothing")
    func missingBearerIsRefused() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let token = try h.emulator.mintAccessToken(for: installation)
            let fit = try h.emulator.mintFIT(for: installation)
            let variants: [(String, String?)] = [
                ("no authorization", nil), ("empty bearer", "Bearer "), ("basic scheme", "Basic \(fit)"),
                ("bare token", fit), ("garbage bearer", "Bearer not.a.jwt"), ("two parts", "Bearer a.b"),
                ("caller secret as FIT", "Bearer \(GatewayHarness.callerSecret)"),
            ]
            for (name, authorization) in variants {
                for (path, body) in Self.forgeCalls(h, installation) {
                    var headers = ["content-type": "application/json", "x-forge-oauth-system": token]
                    if let authorization { headers["authorization"] = authorization }
                    let answer = try await h.call(.POST, path, secret: nil, headers: headers, body: body)
                    try await Self.expectRefusedAndNothingStored(answer, h, installation, "\(name) on \(path)")
                }
            }
        }
    }

    @Test("a replayed FIT is refused the second time and does not replace the stored token")
    func replayedJTIIsRefused() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let fit = try h.emulator.mintFIT(for: installation)
            let first = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(3600))
            let later = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7200))
            func deliver(_ fit: String, _ token: String) async throws -> GatewayHarness.Answer {
                try await h.call(
                    .POST, "/forge/auth-trigger", secret: nil,
                    headers: [
                        "authorization": "Bearer \(fit)", "content-type": "application/json",
                        "x-forge-oauth-system": token,
                    ], body: "{}")
            }
            let accepted = try await deliver(fit, first)
            #expect(accepted.status == 200)
            #expect(accepted.json["stored"] as? Bool == true)

            // The very same FIT again, carrying a newer token: refused, nothing replaced.
            let replay = try await deliver(fit, later)
            #expect(replay.status == 401)
            #expect(replay.errorCode == "invalid_invocation_token")
            #expect(try await h.gateway.store.systemToken(installation.installationID)?.value == first)

            // A fresh FIT that reuses the jti: refused too.
            let jti = try #require(Self.claims(of: fit)["jti"] as? String)
            var options = FITOptions()
            options.jti = jti
            let reused = try await h.emulator.deliver(installation, systemToken: later, requestId: nil, fit: options)
            #expect(reused.status == 401)
            #expect(try await h.gateway.store.systemToken(installation.installationID)?.value == first)

            // The guard lives in Redis for the token's remaining lifetime (plus the skew), no longer.
            let ttl =
                try await h.gateway.redis.send([
                    "PTTL", h.gateway.replayGuard.seenKey(installation.installationID, jti: jti),
                ]).int ?? -1
            #expect(ttl > 60_000 && ttl <= (25 + 60 + 61 + 1) * 1000)
        }
    }

    @Test("a Forge call refused for its body uses up nothing: the same FIT then goes through, once, on every route")
    func callRefusedForItsBodyKeepsItsFIT() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let later = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7200))
            let triggerURL = h.emulator.triggerURL(for: installation)
            let calls: [(path: String, refused: String, accepted: String)] = [
                ("/forge/auth-trigger", "{\"requestId\":7}", "{}"),
                ("/forge/register", "{\"authTriggerUrl\":7}", "{\"authTriggerUrl\":\"\(triggerURL)\"}"),
                ("/forge/lifecycle", "{\"eventType\":[]}", "{\"eventType\":\"avi:forge:upgraded:app\"}"),
                ("/forge/pre-uninstall", "[not json", "{}"),
            ]
            for call in calls {
                let fit = try h.emulator.mintFIT(for: installation)
                let jti = try #require(Self.claims(of: fit)["jti"] as? String)
                func send(_ body: String) async throws -> GatewayHarness.Answer {
                    try await h.call(
                        .POST, call.path, secret: nil,
                        headers: [
                            "authorization": "Bearer \(fit)", "content-type": "application/json",
                            "x-forge-oauth-system": later,
                        ], body: body)
                }
                let before = try await Security.snapshot(of: installation, in: h.gateway.redis)
                let refused = try await send(call.refused)
                #expect(refused.status == 400, "\(call.path): \(refused.status)")
                #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before, "\(call.path)")
                #expect(
                    try await h.gateway.redis.send(["EXISTS", h.gateway.replayGuard.seenKey(id, jti: jti)]).int == 0,
                    "\(call.path): the refused call recorded the jti")

                let accepted = try await send(call.accepted)
                #expect(accepted.status == 200, "\(call.path): \(accepted.status) \(accepted.errorCode ?? "")")
                #expect(
                    try await h.gateway.redis.send(["EXISTS", h.gateway.replayGuard.seenKey(id, jti: jti)]).int == 1,
                    "\(call.path): the accepted call claimed the jti")
                let again = try await send(call.accepted)
                #expect(again.status == 401, "\(call.path): a second use is a replay")
                #expect(again.errorCode == "invalid_invocation_token")
            }
            // What went through went through: the delivery stored its token, then pre-uninstall
            // uninstalled the installation.
            #expect(try await h.gateway.store.installation(id)?.status == .uninstalled)
        }
    }

    @Test("a FIT for installation B delivering A's pending request never touches A")
    func crossInstallationRequestIDIsIgnored() async throws {
        // One attempt whose delivery grace outlasts the caller's deadline: A's round trip stays
        // open for the delivery below until that deadline, however busy the machine.
        try await GatewayHarness.run(configure: { config in
            config.flow.maxAttempts = 1
            config.flow.deliveryGrace = .seconds(60)
        }) { h in
            let a = try await h.installed()
            let b = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: a)
            let waiting = Task { try await h.token(a, query: "timeout=15000") }
            let triggered = try await Events.wait(on: h.emulator.callEvents()) {
                h.emulator.triggerRecords(for: a).first?.requestId != nil
            }
            #expect(triggered)
            let requestID = try #require(h.emulator.triggerRecords(for: a).first?.requestId)
            let pendingA = "tg:{\(a.id)}:pending:\(requestID)"
            #expect(try await h.gateway.redis.send(["EXISTS", pendingA]).int == 1)

            let tokenB = try h.emulator.mintAccessToken(for: b)
            let delivery = try await h.emulator.deliver(b, systemToken: tokenB, requestId: requestID)
            #expect(delivery.status == 200)

            // A: its pending request is still open, it has no token, and its caller never sees B's.
            #expect(try await h.gateway.redis.send(["EXISTS", pendingA]).int == 1)
            #expect(try await h.gateway.store.systemToken(a.installationID) == nil)
            let answer = try await waiting.value
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
            #expect(!answer.body.contains(tokenB))
            #expect(try await h.gateway.store.systemToken(a.installationID) == nil)

            // B: the token is B's own, stored as a push (it answered no request of B's).
            let storedB = try await h.gateway.store.systemToken(b.installationID)
            #expect(storedB?.value == tokenB)
            #expect(storedB?.requestID == nil)
        }
    }

    @Test("the installation is taken from the FIT, never from the body")
    func installationComesFromTheFIT() async throws {
        try await GatewayHarness.run { h in
            let a = h.emulator.makeInstallation()
            let b = h.emulator.makeInstallation()
            let fitB = try h.emulator.mintFIT(for: b)
            let answer = try await h.call(
                .POST, "/forge/lifecycle", secret: nil,
                headers: ["authorization": "Bearer \(fitB)", "content-type": "application/json"],
                body: "{\"eventType\":\"avi:forge:installed:app\",\"id\":\"\(a.id)\",\"installationId\":\"\(a.id)\"}")
            #expect(answer.status == 200)
            #expect(try await h.gateway.store.installation(a.installationID) == nil)
            #expect(try await h.gateway.store.installation(b.installationID) != nil)

            let fitB2 = try h.emulator.mintFIT(for: b)
            let registered = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: ["authorization": "Bearer \(fitB2)", "content-type": "application/json"],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: a))\",\"installationId\":\"\(a.id)\"}")
            #expect(registered.status == 200)
            #expect(registered.json["installationId"] as? String == b.id)
            #expect(try await Security.keys(of: a, in: h.gateway.redis).isEmpty)
        }
    }

    static func claims(of jwt: String) -> [String: Any] {
        let parts = jwt.split(separator: ".")
        guard parts.count >= 2, let bytes = Base64URL.decode(String(parts[1])) else { return [:] }
        return ((try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]) ?? [:]
    }
}
