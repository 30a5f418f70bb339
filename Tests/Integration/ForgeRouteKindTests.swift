import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import Testing

@testable import TokenGateway

/// Contract §3 (v1.1): only FITs from the app's backend may use the Forge routes, `preUninstall`
/// uninstalls, lifecycle calls carry Forge's documented body and a system token, and delivered
/// tokens obey the lifetime rules. Real HTTP on loopback, real Redis.
@Suite("Forge routes: FIT kinds, preUninstall, lifecycle body, token lifetime")
struct ForgeRouteKindTests {
    /// The Forge routes and a body each would accept from the app's backend.
    static func routes(_ h: GatewayHarness, _ installation: EmulatedInstallation) -> [(path: String, body: String)] {
        [
            ("/forge/register", #"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))/elsewhere"}"#),
            ("/forge/auth-trigger", "{}"),
            ("/forge/lifecycle", GatewayHarness.documentedLifecycleBody(installation)),
            ("/forge/lifecycle", GatewayHarness.lifecycleBody(.uninstalled, installation)),
            (
                "/forge/pre-uninstall",
                #"{"context":{"cloudId":"\#(installation.cloudId)","moduleKey":"pre-uninstall"},"contextToken":"ct"}"#
            ),
        ]
    }

    /// The FIT kinds a browser can produce: (name, options, refused on pre-uninstall too).
    static func refusedKinds() -> [(name: String, options: FITOptions, refusedOnPreUninstall: Bool)] {
        var uiType = FITOptions()
        uiType.moduleType = "xen:macro"
        var withContext = FITOptions()
        withContext.context = FITUIContext(moduleKey: ForgeEmulator.endpointModuleKey)
        var withPrincipal = FITOptions()
        withPrincipal.principal = "5b10ac8d82e05b22cc7d4ef5"
        var noModule = FITOptions()
        noModule.moduleType = ""
        return [
            ("UI module type", uiType, true),
            ("context claim", withContext, true),
            ("principal claim", withPrincipal, false),
            ("a UI module's invokeRemote (type, principal, context)", .ui(), true),
            ("empty module type", noModule, true),
        ]
    }

    /// Everything a refused call could have changed: the installation's keys in Redis, its
    /// metadata answer, and the token answer a caller gets.
    struct Observed: Equatable {
        var store: [String: [String]]
        var installation: String
        var accessToken: String?
        var apiBaseUrl: String?
        var status: Int
    }

    static func observe(_ h: GatewayHarness, _ installation: EmulatedInstallation) async throws -> Observed {
        let metadata = try await h.call(.GET, GatewayHarness.path(installation))
        var fields = metadata.json
        fields.removeValue(forKey: "lastTokenAt")
        let token = try await h.token(installation)
        return Observed(
            store: try await Security.snapshot(of: installation, in: h.gateway.redis),
            installation: String(describing: fields.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }),
            accessToken: token.json["accessToken"] as? String, apiBaseUrl: token.json["apiBaseUrl"] as? String,
            status: token.status)
    }

    /// Whether the replay guard recorded `jti`.
    static func seen(_ h: GatewayHarness, _ installation: EmulatedInstallation, jti: String) async throws -> Bool {
        try await h.gateway.redis.send(["EXISTS", h.gateway.replayGuard.seenKey(installation.installationID, jti: jti)])
            .int == 1
    }

    /// Sends `body` to `path` with a FIT made with `options` (a fresh `jti`, a different
    /// `apiBaseUrl`) and a later system token, and expects 403 `forbidden`.
    static func expectRefused(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, path: String, body: String, options: FITOptions,
        note: String, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        var options = options
        let jti = UUID().uuidString.lowercased()
        options.jti = jti
        options.apiBaseUrl = "https://api.atlassian.com/ex/jira/" + UUID().uuidString.lowercased()
        let later = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(3 * 3600))
        let answer = try await h.call(
            .POST, path, secret: nil,
            headers: [
                "authorization": "Bearer " + (try h.emulator.mintFIT(for: installation, options: options)),
                "content-type": "application/json", "x-forge-oauth-system": later,
            ],
            body: body)
        #expect(answer.status == 403, "\(path) \(note): \(answer.body)", sourceLocation: sourceLocation)
        #expect(answer.errorCode == "forbidden", "\(path) \(note)", sourceLocation: sourceLocation)
        #expect(!answer.body.contains(later), sourceLocation: sourceLocation)
        #expect(
            try await !Self.seen(h, installation, jti: jti), "\(path) \(note): the refused FIT's jti was recorded",
            sourceLocation: sourceLocation)
    }

    @Test("a FIT from a user's browser is refused with 403 on every Forge route and changes nothing")
    func browserFITsChangeNothing() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let before = try await Self.observe(h, installation)
            #expect(before.status == 200)
            #expect(before.apiBaseUrl == installation.apiBaseUrl)
            let triggerCalls = h.emulator.triggerCalls(for: installation)

            for (path, body) in Self.routes(h, installation) {
                for kind in Self.refusedKinds() where path != "/forge/pre-uninstall" || kind.refusedOnPreUninstall {
                    try await Self.expectRefused(
                        h, installation, path: path, body: body, options: kind.options, note: kind.name)
                }
            }
            // The emulator's admin route plays the same browser call.
            let fromBrowser = try await h.emulator.invokeFromUI(
                installation, path: "/forge/register",
                body: Data(#"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))/x"}"#.utf8),
                systemToken: try h.emulator.mintAccessToken(for: installation))
            #expect(fromBrowser.status == 403)
            // And so does the emulator's admin route, as `token-gateway emulate` users drive it.
            var admin = HTTPClientRequest(
                url: h.emulator.baseURL + "/admin/installations/\(installation.uuid)/ui-invoke")
            admin.method = .POST
            admin.body = .bytes(
                ByteBuffer(
                    string:
                        #"{"path":"/forge/lifecycle","body":{"eventType":"avi:forge:uninstalled:app"},"systemToken":true}"#
                ))
            let adminAnswer = try await h.http.execute(admin, timeout: .seconds(30))
            #expect(adminAnswer.status.code == 200)
            let adminBody = String(buffer: try await adminAnswer.body.collect(upTo: 1 << 20))
            #expect(adminBody.contains(#""status":403"#), "\(adminBody)")

            let after = try await Self.observe(h, installation)
            #expect(after == before)
            #expect(h.emulator.triggerCalls(for: installation) == triggerCalls)
            // The installation still works: the backend's own calls are accepted.
            #expect(try await h.emulator.push(installation).status == 200)
        }
    }

    @Test("a refused FIT for an installation never seen creates no record")
    func browserFITCreatesNoRecord() async throws {
        try await GatewayHarness.run { h in
            let unknown = h.emulator.makeInstallation()
            for (path, body) in Self.routes(h, unknown) {
                try await Self.expectRefused(h, unknown, path: path, body: body, options: .ui(), note: "UI FIT")
            }
            #expect(try await Security.keys(of: unknown, in: h.gateway.redis).isEmpty)
            #expect(try await h.gateway.redis.send(["ZSCORE", "tg:installations", unknown.id]).string == nil)
            #expect(try await h.call(.GET, GatewayHarness.path(unknown)).status == 404)
        }
    }

    @Test("with TOKEN_GATEWAY_FORGE_MODULE_KEYS set, another module key gets 403 on every route and changes nothing")
    func moduleKeyAllowList() async throws {
        try await GatewayHarness.run(configure: { $0.forgeModuleKeys = [ForgeEmulator.endpointModuleKey, "other-ok"] })
        { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let before = try await Self.observe(h, installation)
            var otherKey = FITOptions()
            otherKey.moduleKey = "some-other-endpoint"
            for (path, body) in Self.routes(h, installation) {
                try await Self.expectRefused(
                    h, installation, path: path, body: body, options: otherKey, note: "module key")
            }
            #expect(try await Self.observe(h, installation) == before)
            // A listed key is accepted.
            var listed = FITOptions()
            listed.moduleKey = "other-ok"
            let push = try await h.emulator.deliver(
                installation, systemToken: try h.emulator.mintAccessToken(for: installation), requestId: nil,
                fit: listed)
            #expect(push.status == 200)
        }
    }

    @Test("the setting is read from the environment and a blank entry is a configuration error")
    func moduleKeySetting() throws {
        var environment = [
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/00000000-0000-4000-8000-000000000000",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"0123456789abcdef0123","installations":["*"]}]"#,
        ]
        #expect(try GatewayConfiguration.load(environment: environment).forgeModuleKeys == nil)
        environment["TOKEN_GATEWAY_FORGE_MODULE_KEYS"] = "token-gateway, lifecycle-endpoint"
        #expect(
            try GatewayConfiguration.load(environment: environment).forgeModuleKeys == [
                "token-gateway", "lifecycle-endpoint",
            ])
        #expect(
            try GatewayConfiguration.load(environment: environment, flags: ["TOKEN_GATEWAY_FORGE_MODULE_KEYS": "x"])
                .forgeModuleKeys == ["x"])
        environment["TOKEN_GATEWAY_FORGE_MODULE_KEYS"] = "a,,b"
        #expect(throws: ConfigurationError.self) { try GatewayConfiguration.load(environment: environment) }
    }

    @Test("preUninstall deletes tokens, user tokens and signing keys; later requests get 410; idempotent")
    func preUninstall() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let account = "557058:" + UUID().uuidString.lowercased()
            #expect(try await h.userToken(installation, account).status == 200)
            let userKey = h.gateway.userTokenStore.tokenKey(installation.installationID, accountId: account)
            let systemKey = h.gateway.store.systemTokenKey(installation.installationID)
            #expect(try await h.gateway.redis.send(["EXISTS", userKey]).int == 1)
            #expect(try await h.gateway.redis.send(["EXISTS", systemKey]).int == 1)
            #expect(
                try await Security.keys(of: installation, in: h.gateway.redis).contains {
                    $0.hasSuffix(":signing-keys")
                })

            // Forge runs preUninstall with a principal that is not a user: accepted here.
            var fit = FITOptions()
            fit.principal = "unidentified"
            let answer = try await h.emulator.preUninstall(installation, fit: fit)
            #expect(answer.status == 200, "\(answer.body)")

            // Left: the record (marked uninstalled), the round-trip history the status page shows
            // (outcomes and durations, no token, no URL) and the replay guard's note of each FIT
            // the installation's calls used (until that FIT could no longer be accepted).
            let keys = try await Self.keysLeft(installation, h)
            #expect(keys == [h.gateway.store.installationKey(installation.installationID)], "\(keys)")
            #expect(try await h.gateway.redis.send(["EXISTS", userKey]).int == 0)
            let token = try await h.token(installation)
            #expect(token.status == 410)
            #expect(token.errorCode == "installation_uninstalled")
            #expect(try await h.userToken(installation, account).status == 410)
            #expect(
                try await h.call(.GET, GatewayHarness.path(installation)).json["status"] as? String == "uninstalled")
            #expect(try await h.emulator.push(installation).status == 410)

            // Idempotent: again through the emulator's uninstall, and nothing comes back.
            try await h.emulator.uninstall(installation)
            #expect(try await h.emulator.preUninstall(installation).status == 200)
            #expect(try await Self.keysLeft(installation, h) == keys)
            #expect(try await h.token(installation).status == 410)
        }
    }

    /// An installation's keys but its round-trip history and the replay guard's notes.
    static func keysLeft(_ installation: EmulatedInstallation, _ h: GatewayHarness) async throws -> [String] {
        try await Security.keys(of: installation, in: h.gateway.redis).filter {
            !$0.hasSuffix(":history") && !$0.contains(":seen-fit:")
        }
    }

    @Test("preUninstall of an installation never seen records it as uninstalled")
    func preUninstallUnknown() async throws {
        try await GatewayHarness.run { h in
            let unknown = h.emulator.makeInstallation()
            #expect(try await h.token(unknown).status == 404)
            #expect(try await h.emulator.preUninstall(unknown).status == 200)
            let metadata = try await h.call(.GET, GatewayHarness.path(unknown))
            #expect(metadata.status == 200)
            #expect(metadata.json["status"] as? String == "uninstalled")
            #expect(try await h.token(unknown).status == 410)
            // A later registration or delivery cannot bring it back.
            #expect(try await h.emulator.register(unknown).status == 410)
            #expect(try await h.emulator.push(unknown).status == 410)
        }
    }

    @Test("lifecycle: Forge's documented body without eventType records the installation")
    func lifecycleWithoutEventType() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let installed = try await h.emulator.sendLifecycleEvent(.installed, for: installation)
            #expect(installed.status == 200, "\(installed.body)")
            #expect(installed.body == #"{"ok":true}"#)
            let metadata = try await h.call(.GET, GatewayHarness.path(installation))
            #expect(metadata.status == 200)
            #expect(metadata.json["apiBaseUrl"] as? String == installation.apiBaseUrl)
            #expect(metadata.json["cloudId"] as? String == installation.cloudId)
            #expect(metadata.json["status"] as? String != "uninstalled")
            // An upgrade (permissions, no eventType) refreshes it; the old uninstalled event still works.
            #expect(try await h.emulator.sendLifecycleEvent(.upgraded, for: installation).status == 200)
            #expect(try await h.emulator.register(installation).status == 200)
            #expect(try await h.token(installation).status == 200)
            #expect(try await h.emulator.sendLifecycleEvent(.uninstalled, for: installation).status == 200)
            #expect(try await h.token(installation).status == 410)
        }
    }

    @Test("lifecycle with a system token: the token is stored and served with the full answer, on both replicas")
    func lifecycleSystemToken() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let expiresAt = Date().addingTimeInterval(2 * 3600)
            let token = try h.emulator.mintAccessToken(for: installation, expiresAt: expiresAt)
            let answer = try await h.emulator.sendLifecycleEvent(.installed, for: installation, systemToken: token)
            #expect(answer.status == 200, "\(answer.body)")
            #expect(try await h.emulator.register(installation).status == 200)

            @Sendable func check(_ served: GatewayHarness.Answer) {
                TokenAnswerMatrixTests.expectWholeAnswer(served, installation, token: token, source: "cache", "served")
                #expect(
                    served.json["expiresAt"] as? String
                        == RFC3339.string(unixSeconds: Int64(expiresAt.timeIntervalSince1970)))
            }
            check(try await h.token(installation))
            try await h.withSecondGateway { url in
                check(try await h.token(installation, at: url))
            }
            #expect(h.emulator.triggerCalls(for: installation) == 0)

            // The emulator's install can carry one too.
            let other = h.emulator.makeInstallation()
            try await h.emulator.install(other, lifecycleSystemToken: true)
            #expect(try await h.token(other).json["source"] as? String == "cache")
            #expect(h.emulator.triggerCalls(for: other) == 0)
        }
    }

    /// A delivery of a token with under 60 s left, unasked: `{"stored":false}`, its FIT's `jti`
    /// claimed (a replay is 401) and the FIT's `apiBaseUrl` recorded; the token is never served.
    static func expectNearlyExpiredDelivery(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, before: Observed
    ) async throws {
        func unclaimed(_ observed: Observed) -> Observed {
            var observed = observed
            observed.store = observed.store.filter { !$0.key.contains(":seen-fit:") }
            return observed
        }
        let nearlyExpired = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(30))
        var fit = FITOptions()
        fit.jti = "nearly-" + UUID().uuidString.lowercased()
        let dropped = try await h.emulator.deliver(installation, systemToken: nearlyExpired, requestId: nil, fit: fit)
        #expect(dropped.status == 200)
        #expect(dropped.body == #"{"stored":false}"#)
        #expect(try await Self.seen(h, installation, jti: fit.jti!))
        #expect(unclaimed(try await Self.observe(h, installation)) == unclaimed(before))
        let replayed = try await h.emulator.deliver(installation, systemToken: nearlyExpired, requestId: nil, fit: fit)
        #expect(replayed.status == 401, "\(replayed.body)")
        // A FIT naming another site: recorded, though the token it came with is not.
        var moved = FITOptions()
        moved.apiBaseUrl = "https://api.atlassian.com/ex/confluence/" + installation.cloudId
        let short = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(30))
        let recorded = try await h.emulator.deliver(installation, systemToken: short, requestId: nil, fit: moved)
        #expect(recorded.body == #"{"stored":false}"#)
        let metadata = try await h.call(.GET, GatewayHarness.path(installation))
        #expect(metadata.json["apiBaseUrl"] as? String == moved.apiBaseUrl)
        let served = try await h.token(installation)
        #expect(served.json["accessToken"] as? String == before.accessToken)
        #expect(served.json["apiBaseUrl"] as? String == moved.apiBaseUrl)
    }

    @Test(
        "auth-trigger: a token more than 24 h ahead is 400 and stores nothing; under 60 s is stored:false and never served (410 once uninstalled)"
    )
    func deliveryLifetime() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let before = try await Self.observe(h, installation)

            let tooLong = try h.emulator.mintAccessToken(
                for: installation, expiresAt: Date().addingTimeInterval(25 * 3600))
            let refused = try await h.emulator.deliver(installation, systemToken: tooLong, requestId: nil)
            #expect(refused.status == 400)
            #expect(refused.body.contains("invalid_token"))
            #expect(try await Self.observe(h, installation) == before)

            // Under 60 s: not stored, but its FIT is spent (a replay is refused) and its apiBaseUrl
            // recorded, as for any verified FIT; nothing else changes.
            try await Self.expectNearlyExpiredDelivery(h, installation, before: before)

            // An installation never seen: the short token creates nothing and is not served.
            let unknown = h.emulator.makeInstallation()
            let short = try h.emulator.mintAccessToken(for: unknown, expiresAt: Date().addingTimeInterval(30))
            #expect(
                try await h.emulator.deliver(unknown, systemToken: short, requestId: nil).body == #"{"stored":false}"#)
            #expect(try await Security.keys(of: unknown, in: h.gateway.redis).isEmpty)
            #expect(try await h.token(unknown).status == 404)
            // Nor with a request id (no round trip of this gateway asked for it).
            let answering = try await h.emulator.deliver(unknown, systemToken: short, requestId: "rq_unknown")
            #expect(answering.body == #"{"stored":false}"#, "\(answering.body)")
            #expect(try await Security.keys(of: unknown, in: h.gateway.redis).isEmpty)
            #expect(try await h.call(.GET, GatewayHarness.path(unknown)).status == 404)
            let long = try h.emulator.mintAccessToken(for: unknown, expiresAt: Date().addingTimeInterval(48 * 3600))
            #expect(try await h.emulator.deliver(unknown, systemToken: long, requestId: nil).status == 400)
            #expect(try await Security.keys(of: unknown, in: h.gateway.redis).isEmpty)

            // An uninstalled installation: the short token is refused like any delivery (410), and
            // nothing changes.
            try await h.emulator.uninstall(installation)
            let afterUninstall = try await Security.snapshot(of: installation, in: h.gateway.redis)
            let late = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(30))
            let gone = try await h.emulator.deliver(installation, systemToken: late, requestId: nil)
            #expect(gone.status == 410, "\(gone.body)")
            #expect(gone.body.contains("installation_uninstalled"))
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == afterUninstall)
            #expect(try await h.token(installation).status == 410)
        }
    }

    @Test(
        "auth-trigger: x-forge-oauth-system or x-forge-oauth-user given twice, or not a three-part JWT, is 400 invalid_token and changes nothing"
    )
    func systemTokenHeaderMustBeOneJWT() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            // The round trip's history is written after its callers are answered: wait for it, so
            // the snapshot taken next is the settled state.
            let history = h.gateway.store.historyKey(installation.installationID)
            #expect(try await Events.wait { try await h.gateway.redis.send(["EXISTS", history]).int == 1 })
            let before = try await Self.observe(h, installation)
            let later = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7000))
            let other = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7100))
            let payload = later.split(separator: ".")[1]
            let tooLong = try h.emulator.mintAccessToken(
                for: installation, expiresAt: Date().addingTimeInterval(48 * 3600))
            // (system tokens, user tokens): twice, a five-part token, and a user token twice (the
            // first more than 24 h ahead, which alone refuses the delivery).
            let cases: [([String], [String])] = [
                ([later, other], []), (["e30.\(payload).c2ln.a.b"], []), ([later], [tooLong, other]),
            ]
            for (tokens, userTokens) in cases {
                var request = HTTPClientRequest(url: h.gatewayURL + "/forge/auth-trigger")
                request.method = .POST
                request.headers.add(
                    name: "authorization", value: "Bearer " + (try h.emulator.mintFIT(for: installation)))
                request.headers.add(name: "content-type", value: "application/json")
                for token in tokens { request.headers.add(name: "x-forge-oauth-system", value: token) }
                for token in userTokens { request.headers.add(name: "x-forge-oauth-user", value: token) }
                request.body = .bytes(ByteBuffer(string: "{}"))
                let response = try await h.http.execute(request, timeout: .seconds(30))
                let body = String(buffer: try await response.body.collect(upTo: 1 << 16))
                #expect(response.status.code == 400, "\(body)")
                #expect(body.contains("invalid_token"))
                #expect(!body.contains(later) && !body.contains(payload))
                #expect(try await Self.observe(h, installation) == before)
            }
            #expect(try await h.token(installation).json["accessToken"] as? String != later)
        }
    }

    @Test(
        "auth-trigger: a user token (x-forge-oauth-user) more than 24 h ahead refuses the delivery with 400 and stores nothing; a nearly expired one makes it 200 stored:false with nothing kept; one without a readable exp is ignored"
    )
    func deliveredUserTokenLifetime() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let before = try await Self.observe(h, installation)
            let newer = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7000))
            let tooLong = try h.emulator.mintAccessToken(
                for: installation, expiresAt: Date().addingTimeInterval(25 * 3600))
            let refused = try await h.emulator.deliver(
                installation, systemToken: newer, requestId: nil, userToken: tooLong)
            #expect(refused.status == 400)
            #expect(refused.body.contains("invalid_token"))
            #expect(!refused.body.contains(tooLong))
            #expect(try await Self.observe(h, installation) == before)
            // A user token whose exp cannot be read is ignored (no user token of a delivery is
            // kept): the system token it came with is stored and served.
            let opaque = try await h.emulator.deliver(
                installation, systemToken: newer, requestId: nil, userToken: "opaque-user-token")
            #expect(opaque.status == 200, "\(opaque.body)")
            #expect(opaque.body == #"{"stored":true}"#)
            // A nearly expired user token makes the delivery one of a nearly expired token: 200
            // `{"stored":false}`, and the newer system token it came with is not kept either.
            let short = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(30))
            let newest = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(8000))
            let notKept = try await h.emulator.deliver(
                installation, systemToken: newest, requestId: nil, userToken: short)
            #expect(notKept.status == 200)
            #expect(notKept.body == #"{"stored":false}"#)
            let served = try await h.token(installation)
            #expect(served.json["accessToken"] as? String == newer)
            #expect(served.json["source"] as? String == "cache")
        }
    }

    @Test(
        "register and lifecycle drop a token outside the lifetime rules, or without a readable exp, and still apply the call"
    )
    func registerAndLifecycleDropTokens() async throws {
        try await GatewayHarness.run { h in
            for (name, seconds) in [("more than 24 h", 25.0 * 3600), ("under 60 s", 30.0), ("no readable exp", 0)] {
                // Lifecycle: the installation is recorded, the token is not.
                let installation = h.emulator.makeInstallation()
                let lifecycleToken =
                    seconds == 0
                    ? "opaque-system-token"
                    : try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(seconds))
                let lifecycle = try await h.emulator.sendLifecycleEvent(
                    .installed, for: installation, systemToken: lifecycleToken)
                #expect(lifecycle.status == 200, "\(name): \(lifecycle.body)")
                #expect(lifecycle.body == #"{"ok":true}"#)
                let metadata = try await h.call(.GET, GatewayHarness.path(installation))
                #expect(metadata.json["apiBaseUrl"] as? String == installation.apiBaseUrl, "\(name)")
                let systemKey = h.gateway.store.systemTokenKey(installation.installationID)
                #expect(try await h.gateway.redis.send(["EXISTS", systemKey]).int == 0, "\(name)")

                // Register: the trigger is registered, the token is not stored.
                let registerToken =
                    seconds == 0
                    ? "opaque-system-token"
                    : try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(seconds))
                let registered = try await h.emulator.register(installation, systemToken: registerToken)
                #expect(registered.status == 200, "\(name): \(registered.body)")
                #expect(registered.triggerKeyId != nil)
                #expect(
                    try await h.call(.GET, GatewayHarness.path(installation)).json["triggerRegistered"] as? Bool == true
                )
                #expect(try await h.gateway.redis.send(["EXISTS", systemKey]).int == 0, "\(name)")

                // Neither is served: the first request makes a round trip for a fresh token.
                let served = try await h.token(installation)
                #expect(served.status == 200)
                #expect(served.json["source"] as? String == "trigger", "\(name)")
                #expect(served.json["accessToken"] as? String != lifecycleToken)
                #expect(served.json["accessToken"] as? String != registerToken)
                #expect(h.emulator.triggerCalls(for: installation) == 1)
            }
        }
    }
}

extension GatewayHarness {
    /// `GET …/token` for `installation` on the gateway at `base` (another replica).
    func token(_ installation: EmulatedInstallation, at base: String) async throws -> Answer {
        try await self.call(.GET, Self.path(installation) + "/token", at: base)
    }
}
