import AsyncHTTPClient
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Testing

@testable import TokenGateway

/// The Connect app's base URL the gateway is configured with in these tests: a path prefix, as
/// behind a reverse proxy that strips it, so the `qsh` rules for the prefix are exercised.
let connectTestAppBaseURL = "https://connect-app.example.test/gateway"

extension GatewayHarness {
    /// A harness with Connect on (app base URL above, install keys served by the emulator).
    static func runConnect(
        configure: @Sendable (inout GatewayConfiguration) -> Void = { _ in },
        _ body: @Sendable (GatewayHarness) async throws -> Void
    ) async throws {
        try await self.run(connectBaseURL: connectTestAppBaseURL, configure: configure, body)
    }

    /// `POST` a JSON body to `path` on the gateway at `base` (default this harness's).
    func postJSON(
        _ path: String, _ object: [String: Any], secret: String? = GatewayHarness.callerSecret, base: String? = nil
    ) async throws -> Answer {
        let body = String(
            decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
        var request = HTTPClientRequest(url: (base ?? self.gatewayURL) + path)
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        if let secret { request.headers.add(name: "authorization", value: "Bearer \(secret)") }
        request.body = .bytes(ByteBuffer(string: body))
        let response = try await self.http.execute(request, timeout: .seconds(20))
        let bytes = try await response.body.collect(upTo: 1 << 20)
        var headers: [String: String] = [:]
        for h in response.headers { headers[h.name.lowercased()] = h.value }
        return Answer(status: Int(response.status.code), headers: headers, body: String(buffer: bytes))
    }

    /// `POST /v1/connect/verify`.
    func verifyConnect(
        _ jwt: String, method: String = "GET", url: String, secret: String = GatewayHarness.callerSecret,
        base: String? = nil
    ) async throws -> Answer {
        try await self.postJSON(
            "/v1/connect/verify", ["jwt": jwt, "method": method, "url": url], secret: secret, base: base)
    }

    /// `POST /v1/connect/sign`.
    func signConnect(
        _ clientKey: String, method: String = "GET", url: String, secret: String = GatewayHarness.callerSecret
    ) async throws -> Answer {
        try await self.postJSON(
            "/v1/connect/sign", ["clientKey": clientKey, "method": method, "url": url], secret: secret)
    }

    /// Every captured log line in one string.
    var allLogs: String { self.logs.captured.joined(separator: "\n") }
}

/// The `error.code` of an error body.
func connectErrorCode(_ body: String) -> String? {
    let object = (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any]
    return (object?["error"] as? [String: Any])?["code"] as? String
}

/// The claims of a JWT, unverified (for assertions).
func connectJWTClaims(_ token: String) -> [String: Any] {
    let parts = token.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count == 3, let bytes = Base64URL.decode(String(parts[1])) else { return [:] }
    return ((try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]) ?? [:]
}

@Suite("Connect tenants end to end")
struct ConnectIntegrationTests {
    @Test("a verified install is stored under its clientKey with the secret sealed; a product JWT then verifies")
    func installThenVerify() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            let install = try await h.emulator.connectInstall(tenant)
            #expect(install.status == 204)
            #expect(install.body.isEmpty)

            let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(record.status == .installed)
            #expect(record.appKey == h.emulator.connectAppKey)
            #expect(record.baseUrl == tenant.baseUrl)
            #expect(record.installationId == nil)
            #expect(record.sharedSecret?.bytes == Array(tenant.sharedSecret.utf8))
            #expect(!record.payloadJSON.contains("sharedSecret"))
            #expect(!record.payloadJSON.contains(tenant.sharedSecret))
            #expect(record.payloadJSON.contains(tenant.serviceEntitlementNumber))
            // Nothing in Redis holds the secret in the clear.
            let raw = try await h.gateway.redis.send(["HGETALL", h.gateway.store.connectTenantKey(tenant.clientKey)])
            let rawText = (raw.array ?? []).compactMap(\.string).joined(separator: " ")
            #expect(!rawText.contains(tenant.sharedSecret))
            #expect(rawText.contains("installed"))

            let url = "/gateway/issue-glance?issueKey=ABC-1&lic=active"
            let jwt = h.emulator.mintConnectJWT(
                for: tenant, method: "GET", url: url,
                options: {
                    var o = ConnectJWTOptions()
                    o.contextJSON = #"{"jira":{"issue":{"key":"ABC-1"}}}"#
                    return o
                }())
            let answer = try await h.verifyConnect(jwt, url: url + "&jwt=" + jwt)
            #expect(answer.status == 200)
            #expect(answer.json["clientKey"] as? String == tenant.clientKey)
            #expect(answer.json["accountId"] as? String == tenant.accountId)
            #expect(answer.json["installationId"] is NSNull)
            let context = answer.json["context"] as? [String: Any]
            #expect(((context?["jira"] as? [String: Any])?["issue"] as? [String: Any])?["key"] as? String == "ABC-1")

            // The same path without the app's prefix hashes the same; context-qsh needs no URL match.
            #expect(try await h.verifyConnect(jwt, url: "/issue-glance?lic=active&issueKey=ABC-1").status == 200)
            var context2 = ConnectJWTOptions()
            context2.qsh = .context
            let contextJWT = h.emulator.mintConnectJWT(for: tenant, options: context2)
            #expect(try await h.verifyConnect(contextJWT, method: "POST", url: "/anything").status == 200)
            // A session token names the tenant in aud[0].
            var session = ConnectJWTOptions()
            session.sessionToken = true
            let sessionJWT = h.emulator.mintConnectJWT(for: tenant, options: session)
            let sessionAnswer = try await h.verifyConnect(sessionJWT, url: "/x")
            #expect(sessionAnswer.status == 200)
            #expect(sessionAnswer.json["clientKey"] as? String == tenant.clientKey)

            #expect(!h.allLogs.contains(tenant.sharedSecret))
            #expect(!h.allLogs.contains(jwt))
        }
    }

    @Test("a payload naming a Forge installation links the tenant to it")
    func linkedInstallation() async throws {
        try await GatewayHarness.runConnect { h in
            let installation = try await h.installed()
            let tenant = h.emulator.makeConnectTenant(product: "confluence", linkedTo: installation)
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(record.installationId?.ari == installation.id)
            let jwt = h.emulator.mintConnectJWT(for: tenant, method: "POST", url: "/gateway/webhook?x=1")
            let answer = try await h.verifyConnect(jwt, method: "POST", url: "/gateway/webhook?x=1")
            #expect(answer.status == 200)
            #expect(answer.json["installationId"] as? String == installation.id)
        }
    }

    @Test("every signed-install failure answers 401 invalid_signed_install and stores nothing")
    func signedInstallFailures() async throws {
        try await GatewayHarness.runConnect { h in
            var cases: [(String, SignedInstallOptions)] = []
            var o = SignedInstallOptions()
            o.omitAuthorization = true
            cases.append(("no authorization", o))
            o = SignedInstallOptions()
            o.scheme = "Bearer"
            cases.append(("Bearer instead of JWT", o))
            o = SignedInstallOptions()
            o.algorithm = .none
            cases.append(("alg none", o))
            o = SignedInstallOptions()
            o.algorithm = .hs256WithPublicKey
            cases.append(("HS256 with the public key", o))
            o = SignedInstallOptions()
            o.kid = "11111111-2222-4333-8444-555555555555"
            cases.append(("unknown kid", o))
            o = SignedInstallOptions()
            o.signWithUnpublishedKey = true
            cases.append(("unpublished key", o))
            o = SignedInstallOptions()
            o.issuer = "someone-else"
            cases.append(("iss is not the clientKey", o))
            o = SignedInstallOptions()
            o.audience = ["https://other-app.example.test"]
            cases.append(("aud without the app base URL", o))
            o = SignedInstallOptions()
            o.expiresAt = Date().addingTimeInterval(-300)
            cases.append(("expired", o))
            o = SignedInstallOptions()
            o.qsh = "0000000000000000000000000000000000000000000000000000000000000000"
            cases.append(("qsh mismatch", o))
            o = SignedInstallOptions()
            o.rawBody = "this is not JSON"
            cases.append(("malformed body", o))

            for (name, options) in cases {
                let tenant = h.emulator.makeConnectTenant()
                let answer = try await h.emulator.connectInstall(tenant, options: options)
                #expect(answer.status == 401, "\(name)")
                #expect(connectErrorCode(answer.body) == "invalid_signed_install", "\(name)")
                #expect(try await h.gateway.store.connectTenant(tenant.clientKey) == nil, "\(name)")
            }

            try await Self.expectIncompletePayloadsRefused(h)

            // The token names one tenant, the body another: neither is stored.
            let attacker = h.emulator.makeConnectTenant()
            let victim = h.emulator.makeConnectTenant()
            var swapped = SignedInstallOptions()
            swapped.bodyClientKey = victim.clientKey
            let answer = try await h.emulator.connectInstall(attacker, options: swapped)
            #expect(answer.status == 401)
            #expect(try await h.gateway.store.connectTenant(victim.clientKey) == nil)
            #expect(try await h.gateway.store.connectTenant(attacker.clientKey) == nil)

            // An uninstall that fails verification leaves an installed tenant as it was.
            let installed = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(installed).status == 204)
            var expired = SignedInstallOptions()
            expired.expiresAt = Date().addingTimeInterval(-300)
            #expect(try await h.emulator.connectUninstall(installed, options: expired).status == 401)
            #expect(try await h.gateway.store.connectTenant(installed.clientKey)?.status == .installed)
        }
    }

    @Test("a refused re-install (new secret, new link) leaves an installed tenant as it was, on both replicas")
    func refusedReinstallChangesNothing() async throws {
        try await GatewayHarness.runConnect { h in
            let (linked, other) = (try await h.installed(), try await h.installed())
            let tenant = h.emulator.makeConnectTenant(product: "confluence", linkedTo: linked)
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let key = h.gateway.store.connectTenantKey(tenant.clientKey)
            let stored = try await h.gateway.redis.send(["HGETALL", key]).array?.compactMap(\.string)
            let url = "/gateway/issue-panel?issueKey=ABC-8"
            let jwt = h.emulator.mintConnectJWT(for: tenant, url: url)
            // The re-install would bring a new secret and link the tenant to another installation.
            let rotated = h.emulator.rotateSharedSecret(of: tenant)
            let payload: [String: String] = [
                "clientKey": tenant.clientKey, "sharedSecret": rotated.sharedSecret, "key": tenant.appKey,
                "baseUrl": tenant.baseUrl, "eventType": "installed", "productType": "confluence",
                "installationId": other.id,
            ]
            let body = String(
                decoding: try JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys]), as: UTF8.self)
            let failures: [(String, (inout SignedInstallOptions) -> Void)] = [
                ("expired", { $0.expiresAt = Date().addingTimeInterval(-300) }),
                ("unknown kid", { $0.kid = "11111111-2222-4333-8444-555555555555" }),
                ("unpublished key", { $0.signWithUnpublishedKey = true }),
                ("alg none", { $0.algorithm = .none }),
                ("iss is not the clientKey", { $0.issuer = "someone-else" }),
                ("qsh mismatch", { $0.qsh = String(repeating: "0", count: 64) }),
            ]
            for (name, change) in failures {
                var options = SignedInstallOptions()
                options.rawBody = body
                change(&options)
                let answer = try await h.emulator.connectInstall(rotated, options: options)
                #expect(answer.status == 401, "\(name)")
                #expect(connectErrorCode(answer.body) == "invalid_signed_install", "\(name)")
            }
            #expect(try await h.gateway.redis.send(["HGETALL", key]).array?.compactMap(\.string) == stored)
            // The old secret still verifies, on both replicas, with the old link; the new one does not.
            let forged = h.emulator.mintConnectJWT(for: rotated, url: url)
            try await h.withSecondGateway { second in
                for base in [h.gatewayURL, second] {
                    let accepted = try await h.verifyConnect(jwt, url: url, base: base)
                    #expect(accepted.status == 200, "\(base): \(accepted.body)")
                    #expect(accepted.json["installationId"] as? String == linked.id)
                    #expect(try await h.verifyConnect(forged, url: url, base: base).status == 401)
                }
            }
            // The same payload, signed as it should be, is taken: the refusals were the signature's.
            var good = SignedInstallOptions()
            good.rawBody = body
            #expect(try await h.emulator.connectInstall(rotated, options: good).status == 204)
            let now = try await h.verifyConnect(forged, url: url)
            #expect(now.json["installationId"] as? String == other.id, "\(now.body)")
        }
    }

    /// A payload, signed and verified, without what an install needs: the same 401, naming it,
    /// and nothing stored.
    static func expectIncompletePayloadsRefused(_ h: GatewayHarness) async throws {
        for missing in ["sharedSecret", "key", "baseUrl"] {
            let tenant = h.emulator.makeConnectTenant()
            var payload: [String: String] = [
                "clientKey": tenant.clientKey, "sharedSecret": tenant.sharedSecret, "key": "connect-app",
                "baseUrl": "https://connect-tenant.example.test", "eventType": "installed",
            ]
            payload[missing] = nil
            var options = SignedInstallOptions()
            options.rawBody = String(
                decoding: try JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys]), as: UTF8.self)
            let answer = try await h.emulator.connectInstall(tenant, options: options)
            #expect(answer.status == 401, "without \(missing)")
            #expect(connectErrorCode(answer.body) == "invalid_signed_install", "without \(missing)")
            #expect(answer.body.contains(missing), "without \(missing): \(answer.body)")
            #expect(!answer.body.contains(tenant.sharedSecret))
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey) == nil, "without \(missing)")
        }
    }

    @Test("install keys are fetched by kid and cached: one fetch per kid")
    func keysCachedByKid() async throws {
        try await GatewayHarness.runConnect { h in
            let first = try h.emulator.currentInstallKeyId()
            for _ in 0..<3 {
                #expect(try await h.emulator.connectInstall(h.emulator.makeConnectTenant()).status == 204)
            }
            #expect(h.emulator.installKeyFetches(kid: first) == 1)
            let second = try h.emulator.rotateInstallKey()
            for _ in 0..<2 {
                #expect(try await h.emulator.connectInstall(h.emulator.makeConnectTenant()).status == 204)
            }
            #expect(h.emulator.installKeyFetches(kid: second) == 1)
            #expect(h.emulator.installKeyFetches(kid: first) == 1)
        }
    }

    @Test("verify names the failed check: unknown tenant, signature, expired, qsh")
    func verifyFailures() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)

            let stranger = h.emulator.makeConnectTenant()
            let unknown = try await h.verifyConnect(h.emulator.mintConnectJWT(for: stranger, url: "/x"), url: "/x")
            #expect(unknown.status == 401)
            #expect(unknown.errorCode == "invalid_connect_jwt")
            #expect(unknown.errorMessage.contains("unknown tenant"))

            var wrongSecret = ConnectJWTOptions()
            wrongSecret.secret = "not-the-shared-secret"
            let badSignature = try await h.verifyConnect(
                h.emulator.mintConnectJWT(for: tenant, url: "/x", options: wrongSecret), url: "/x")
            #expect(badSignature.status == 401)
            #expect(badSignature.errorCode == "invalid_connect_jwt")
            #expect(badSignature.errorMessage.contains("signature"))

            var old = ConnectJWTOptions()
            old.issuedAt = Date().addingTimeInterval(-900)
            old.expiresAt = Date().addingTimeInterval(-600)
            let expired = try await h.verifyConnect(
                h.emulator.mintConnectJWT(for: tenant, url: "/x", options: old), url: "/x")
            #expect(expired.status == 401)
            #expect(expired.errorMessage.contains("expired"))

            let qsh = try await h.verifyConnect(h.emulator.mintConnectJWT(for: tenant, url: "/x?a=1"), url: "/x?a=2")
            #expect(qsh.status == 401)
            #expect(qsh.errorMessage.contains("qsh"))

            let malformed = try await h.verifyConnect("not-a-jwt", url: "/x")
            #expect(malformed.status == 401)
            #expect(malformed.errorCode == "invalid_connect_jwt")

            for answer in [unknown, badSignature, expired, qsh, malformed] {
                #expect(!answer.body.contains(tenant.sharedSecret))
            }

            let missing = try await h.postJSON("/v1/connect/verify", ["method": "GET", "url": "/x"])
            #expect(missing.status == 400)
            #expect(missing.errorCode == "invalid_request")
        }
    }

    @Test("callers need their credential, and the tenant in their clientKeys, on verify and sign")
    func callerAuthorization() async throws {
        let allowed = "tenant-allowed-" + UUID().uuidString.lowercased()
        try await GatewayHarness.runConnect(configure: { config in
            config.callers = try! CallerRegistry(
                json: """
                    [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"],"clientKeys":["*"]},
                     {"name":"scoped","secret":"\(GatewayHarness.scopedSecret)","installations":["*"]},
                     {"name":"one","secret":"caller-secret-one-0123456789","clientKeys":["\(allowed)"]}]
                    """)
        }) { h in
            let mine = h.emulator.makeConnectTenant(clientKey: allowed)
            let other = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(mine).status == 204)
            #expect(try await h.emulator.connectInstall(other).status == 204)
            let never = h.emulator.makeConnectTenant()

            let jwt = h.emulator.mintConnectJWT(for: mine, url: "/x")
            let unauthenticated = try await h.postJSON(
                "/v1/connect/verify", ["jwt": jwt, "method": "GET", "url": "/x"], secret: nil)
            #expect(unauthenticated.status == 401)
            #expect(unauthenticated.errorCode == "unauthenticated")
            #expect(try await h.verifyConnect(jwt, url: "/x", secret: "wrong").errorCode == "unauthenticated")
            #expect(try await h.verifyConnect(jwt, url: "/x", secret: "caller-secret-one-0123456789").status == 200)

            // Outside the caller's clientKeys: 403, the same for an existing and a never-seen tenant.
            let existing = try await h.verifyConnect(
                h.emulator.mintConnectJWT(for: other, url: "/x"), url: "/x", secret: "caller-secret-one-0123456789")
            let absent = try await h.verifyConnect(
                h.emulator.mintConnectJWT(for: never, url: "/x"), url: "/x", secret: "caller-secret-one-0123456789")
            #expect(existing.status == 403)
            #expect(existing.errorCode == "forbidden")
            #expect(existing.body == absent.body)
            #expect(existing.status == absent.status)
            #expect(try await h.verifyConnect(jwt, url: "/x", secret: GatewayHarness.scopedSecret).status == 403)

            let url = mine.baseUrl + "/rest/api/3/myself"
            #expect(
                try await h.signConnect(mine.clientKey, url: url, secret: "caller-secret-one-0123456789").status == 200)
            let signExisting = try await h.signConnect(
                other.clientKey, url: other.baseUrl + "/rest", secret: "caller-secret-one-0123456789")
            let signAbsent = try await h.signConnect(
                never.clientKey, url: never.baseUrl + "/rest", secret: "caller-secret-one-0123456789")
            #expect(signExisting.status == 403)
            #expect(signExisting.body == signAbsent.body)
            #expect(
                try await h.signConnect(mine.clientKey, url: url, secret: GatewayHarness.scopedSecret).status == 403)
            let signUnauthenticated = try await h.postJSON(
                "/v1/connect/sign", ["clientKey": mine.clientKey, "method": "GET", "url": url], secret: nil)
            #expect(signUnauthenticated.status == 401)
        }
    }

    @Test("sign hands out a short-lived HS256 JWT for the tenant's product, qsh without the context path")
    func sign() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant(product: "confluence")
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let url = tenant.baseUrl + "/rest/api/content?start=0&limit=5&expand=body.storage"
            let started = Int64(Date().timeIntervalSince1970)
            let answer = try await h.signConnect(tenant.clientKey, method: "get", url: url)
            #expect(answer.status == 200)
            #expect(answer.headers["cache-control"] == "no-store")
            let jwt = try #require(answer.json["jwt"] as? String)
            let claims = connectJWTClaims(jwt)
            #expect(claims["iss"] as? String == h.emulator.connectAppKey)
            let iat = try #require((claims["iat"] as? NSNumber)?.int64Value)
            let exp = try #require((claims["exp"] as? NSNumber)?.int64Value)
            #expect(iat >= started - 1)
            #expect(exp > iat && exp - iat <= 900)
            #expect(answer.json["expiresAt"] as? String == RFC3339.string(unixSeconds: exp))
            #expect(
                claims["qsh"] as? String
                    == CanonicalRequest.qsh(method: "GET", url: "/rest/api/content?start=0&limit=5&expand=body.storage")
            )
            // Signed with the tenant's shared secret.
            let parts = jwt.split(separator: ".")
            #expect(
                HMAC<SHA256>.isValidAuthenticationCode(
                    Base64URL.decode(String(parts[2])) ?? [], authenticating: Array((parts[0] + "." + parts[1]).utf8),
                    using: SymmetricKey(data: Data(tenant.sharedSecret.utf8))))

            for outside in [
                "https://evil.example.test/wiki/rest",
                tenant.baseUrl.replacingOccurrences(of: "https:", with: "http:") + "/rest",
                tenant.baseUrl.replacingOccurrences(of: "/wiki", with: "") + "/rest/api/3/myself",
                tenant.baseUrl.replacingOccurrences(of: ".net", with: ".net:8443") + "/rest", "/wiki/rest",
            ] {
                let refused = try await h.signConnect(tenant.clientKey, url: outside)
                #expect(refused.status == 400, "\(outside)")
                #expect(refused.errorCode == "invalid_request", "\(outside)")
            }

            let unknown = try await h.signConnect("never-installed-" + UUID().uuidString, url: tenant.baseUrl + "/rest")
            #expect(unknown.status == 404)
            #expect(unknown.errorCode == "tenant_not_found")
            #expect(!h.allLogs.contains(jwt))
            #expect(!h.allLogs.contains(tenant.sharedSecret))
        }
    }

    @Test("uninstall keeps the record marked uninstalled: verify says so, sign answers tenant_not_found")
    func uninstall() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let jwt = h.emulator.mintConnectJWT(for: tenant, url: "/x")
            #expect(try await h.verifyConnect(jwt, url: "/x").status == 200)

            let answer = try await h.emulator.connectUninstall(tenant)
            #expect(answer.status == 204)
            let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(record.status == .uninstalled)
            #expect(record.sharedSecret == nil)
            #expect(record.uninstalledAt != nil)
            #expect(record.baseUrl == tenant.baseUrl)

            let late = try await h.verifyConnect(jwt, url: "/x")
            #expect(late.status == 401)
            #expect(late.errorCode == "invalid_connect_jwt")
            #expect(late.errorMessage.contains("uninstalled"))
            let sign = try await h.signConnect(tenant.clientKey, url: tenant.baseUrl + "/rest/api/3/myself")
            #expect(sign.status == 404)
            #expect(sign.errorCode == "tenant_not_found")

            // Installing again brings it back.
            #expect(try await h.emulator.connectInstall(h.emulator.rotateSharedSecret(of: tenant)).status == 204)
            #expect(try await h.gateway.store.connectTenant(tenant.clientKey)?.status == .installed)

            // An uninstall for a tenant never seen is recorded as uninstalled, without a secret.
            let stranger = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectUninstall(stranger).status == 204)
            let strangerRecord = try #require(try await h.gateway.store.connectTenant(stranger.clientKey))
            #expect(strangerRecord.status == .uninstalled)
            #expect(strangerRecord.sharedSecret == nil)
            #expect(!strangerRecord.payloadJSON.contains(stranger.sharedSecret))
            let strangerJWT = h.emulator.mintConnectJWT(for: stranger, url: "/x")
            #expect(try await h.verifyConnect(strangerJWT, url: "/x").errorMessage.contains("uninstalled"))
        }
    }

    @Test(
        "the seed's bug: after a reinstall with a new secret, old-secret JWTs fail and new ones pass, on both replicas")
    func reinstallRotatesSecretAcrossReplicas() async throws {
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            let secret1 = tenant.sharedSecret
            #expect(try await h.emulator.connectInstall(tenant, gatewayURL: h.gatewayURL).status == 204)

            try await h.withSecondGateway { second in
                let url = "/gateway/issue-panel?issueKey=ABC-7"
                let oldJWT = h.emulator.mintConnectJWT(for: tenant, url: url)
                #expect(try await h.verifyConnect(oldJWT, url: url, base: h.gatewayURL).status == 200)
                #expect(try await h.verifyConnect(oldJWT, url: url, base: second).status == 200)

                // Reinstall through the second replica with a new secret.
                let rotated = h.emulator.rotateSharedSecret(of: tenant)
                #expect(rotated.sharedSecret != secret1)
                #expect(try await h.emulator.connectInstall(rotated, gatewayURL: second).status == 204)

                let newJWT = h.emulator.mintConnectJWT(for: rotated, url: url)
                var withOld = ConnectJWTOptions()
                withOld.secret = secret1
                let oldAgain = h.emulator.mintConnectJWT(for: rotated, url: url, options: withOld)
                for base in [h.gatewayURL, second] {
                    for stale in [oldJWT, oldAgain] {
                        let refused = try await h.verifyConnect(stale, url: url, base: base)
                        #expect(refused.status == 401, "\(base)")
                        #expect(refused.errorMessage.contains("signature"), "\(base)")
                    }
                    let accepted = try await h.verifyConnect(newJWT, url: url, base: base)
                    #expect(accepted.status == 200, "\(base)")
                    #expect(accepted.json["clientKey"] as? String == tenant.clientKey)
                }

                // Sign on the first replica uses the new secret too.
                let signed = try await h.signConnect(tenant.clientKey, url: tenant.baseUrl + "/rest/api/3/myself")
                let jwt = try #require(signed.json["jwt"] as? String)
                let parts = jwt.split(separator: ".")
                let input = Array((parts[0] + "." + parts[1]).utf8)
                let mac = Base64URL.decode(String(parts[2])) ?? []
                #expect(
                    HMAC<SHA256>.isValidAuthenticationCode(
                        mac, authenticating: input, using: SymmetricKey(data: Data(rotated.sharedSecret.utf8))))
                #expect(
                    !HMAC<SHA256>.isValidAuthenticationCode(
                        mac, authenticating: input, using: SymmetricKey(data: Data(secret1.utf8))))
            }
            let logs = h.allLogs
            #expect(!logs.contains(secret1))
            #expect(!logs.contains(h.emulator.connectTenant(clientKey: tenant.clientKey)!.sharedSecret))
            #expect(logs.contains("Connect tenant installed"))
        }
    }

    @Test(
        "with Redis down the Connect routes answer 503 store_unavailable with Retry-After, and a refused install sent again is stored"
    )
    func storeDown() async throws {
        let server = try await RedisServerProcess.start()
        try await GatewayHarness.run(redisURL: server.url, connectBaseURL: connectTestAppBaseURL) { h in
            let tenant = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let jwt = h.emulator.mintConnectJWT(for: tenant, url: "/x")
            #expect(try await h.verifyConnect(jwt, url: "/x").status == 200)
            // A reinstall with a new secret, signed while Redis is down.
            let rotated = h.emulator.rotateSharedSecret(of: tenant)
            let token = try h.emulator.mintSignedInstall(for: rotated, path: "/connect/installed")
            let body = String(
                decoding: h.emulator.connectLifecyclePayload(.installed, tenant: rotated), as: UTF8.self)
            func install() async throws -> GatewayHarness.Answer {
                try await h.call(
                    .POST, "/connect/installed", secret: nil,
                    headers: ["authorization": "JWT \(token)", "content-type": "application/json"], body: body)
            }
            await server.stop()
            let answers: [(String, GatewayHarness.Answer)] = [
                ("installed", try await install()),
                ("verify", try await h.verifyConnect(jwt, url: "/x")),
                ("sign", try await h.signConnect(tenant.clientKey, url: tenant.baseUrl + "/rest/api/3/myself")),
            ]
            for (name, answer) in answers {
                #expect(answer.status == 503, "\(name): \(answer.status) \(answer.body)")
                #expect(answer.errorCode == "store_unavailable", "\(name)")
                #expect(answer.headers["retry-after"].flatMap(Int.init) != nil, "\(name)")
                #expect(!answer.body.contains(rotated.sharedSecret), "\(name)")
            }
            // Back up (empty: the server keeps nothing on disk): the same install, sent again, is stored.
            try await server.restart()
            #expect(try await Security.eventually { (try? await h.gateway.redis.ping(timeout: .seconds(1))) != nil })
            let again = try await install()
            #expect(again.status == 204, "\(again.body)")
            let record = try #require(try await h.gateway.store.connectTenant(tenant.clientKey))
            #expect(record.sharedSecret?.bytes == Array(rotated.sharedSecret.utf8))
            #expect(!h.allLogs.contains(rotated.sharedSecret))
        }
        await server.stop()
    }

    @Test("without a Connect base URL the Connect routes answer 404 not_found")
    func disabled() async throws {
        try await GatewayHarness.run { h in
            for path in ["/connect/installed", "/connect/uninstalled", "/v1/connect/verify", "/v1/connect/sign"] {
                let answer = try await h.postJSON(path, ["clientKey": "x"])
                #expect(answer.status == 404, "\(path)")
                #expect(answer.errorCode == "not_found", "\(path)")
            }
        }
    }
}

extension GatewayHarness.Answer {
    /// The error message of an error answer, or "".
    var errorMessage: String { ((self.json["error"] as? [String: Any])?["message"] as? String) ?? "" }
}
