import Crypto
import Foundation
import Logging
import Synchronization
import Testing
import _CryptoExtras

@testable import TokenGateway

/// Which FITs count as the app's backend (contract §3 v1.1): `core:endpoint`, no `context`, no
/// `principal` (except where a route allows one), and a module key from the allow-list.
@Suite struct InvocationKindTests {
    static let appId = "ari:cloud:ecosystem::app/3e2b9c1a-7d6f-4b8e-a5c4-1f0e9d8c7b6a"
    static let installationId = "ari:cloud:ecosystem::installation/5c0d6a2e-8f1b-4e3c-9a7d-0b1c2d3e4f50"
    static let key = try! _RSA.Signing.PrivateKey(keySize: .bits2048)
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    static func verifier(moduleKeys: Set<String>? = nil) throws
        -> InvocationTokenVerifier
    {
        let primitives = try Self.key.publicKey.getKeyPrimitives()
        let jwk: [String: Any] = [
            "kty": "RSA", "kid": "k1", "alg": "RS256", "n": Base64URL.encode(primitives.modulus),
            "e": Base64URL.encode(primitives.publicExponent),
        ]
        var configuration = InvocationTokenVerifier.Configuration(appId: Self.appId)
        configuration.allowedModuleKeys = moduleKeys
        return try InvocationTokenVerifier(
            configuration: configuration,
            jwksJSON: String(decoding: try JSONSerialization.data(withJSONObject: ["keys": [jwk]]), as: UTF8.self),
            logger: Self.logger)
    }

    /// A backend FIT's claims; `change` edits them.
    static func token(_ change: (inout [String: Any], inout [String: Any]) -> Void = { _, _ in }) throws -> String {
        let t = Date().timeIntervalSince1970.rounded(.down)
        var app: [String: Any] = [
            "id": Self.appId, "installationId": Self.installationId,
            "apiBaseUrl": "https://api.atlassian.com/ex/jira/cloud-1",
            "module": ["type": "core:endpoint", "key": "token-gateway"],
            "installation": [
                "id": Self.installationId,
                "contexts": [
                    ["name": "jira", "apiBaseUrl": "https://api.atlassian.com/ex/jira/cloud-1", "cloudId": "cloud-1"]
                ],
            ],
        ]
        var claims: [String: Any] = [
            "iss": "forge/invocation-token", "aud": Self.appId, "iat": t, "nbf": t, "exp": t + 25,
            "jti": UUID().uuidString,
        ]
        change(&claims, &app)
        claims["app"] = app
        func encode(_ object: [String: Any]) throws -> String {
            Base64URL.encode(Array(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])))
        }
        let input = try encode(["alg": "RS256", "kid": "k1", "typ": "JWT"]) + "." + encode(claims)
        let signature = try Self.key.signature(for: SHA256.hash(data: Array(input.utf8)), padding: .insecurePKCS1v1_5)
        return input + "." + Base64URL.encode(Array(signature.rawRepresentation))
    }

    func expect(
        _ token: String, _ policy: InvocationPolicy, refusedWith expected: InvocationTokenError,
        verifier: InvocationTokenVerifier, sourceLocation: SourceLocation = #_sourceLocation
    ) async {
        do {
            _ = try await verifier.verify(token, policy: policy)
            Issue.record("accepted, expected \(expected.reason)", sourceLocation: sourceLocation)
        } catch let error as InvocationTokenError {
            #expect(error == expected, "got \(error)", sourceLocation: sourceLocation)
            #expect(error.isForbidden, sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func backendFITPassesWithItsModuleAndContexts() async throws {
        let context = try await Self.verifier().verify(try Self.token(), policy: .backend)
        #expect(context.moduleType == "core:endpoint")
        #expect(context.moduleKey == "token-gateway")
        #expect(!context.hasPrincipal)
        #expect(!context.hasContext)
        #expect(context.contextNames == ["jira"])
        #expect(context.cloudId == "cloud-1")
        #expect(context.isBackendInvocation(allowingPrincipal: false))
    }

    @Test func bitbucketContextsWithWorkspaceIdAreRead() async throws {
        let token = try Self.token { _, app in
            app["apiBaseUrl"] = "https://api.atlassian.com/ex/bitbucket/ws-1"
            app["installation"] = [
                "id": Self.installationId,
                "contexts": [
                    [
                        "name": "bitbucket", "apiBaseUrl": "https://api.atlassian.com/ex/bitbucket/ws-1",
                        "workspaceId": "ws-1",
                    ]
                ],
            ]
        }
        let context = try await Self.verifier().verify(token, policy: .backend)
        #expect(context.contextNames == ["bitbucket"])
        #expect(context.apiBaseUrl == "https://api.atlassian.com/ex/bitbucket/ws-1")
        // A context entry of odd shape is tolerated, not fatal.
        let odd = try Self.token { _, app in
            app["installation"] = ["id": Self.installationId, "contexts": [["name": 7, "cloudId": ["x"]]]]
        }
        #expect(try await Self.verifier().verify(odd, policy: .backend).contextNames == [])
    }

    @Test func browserFITsAreRefused() async throws {
        let verifier = try Self.verifier()
        let uiType = try Self.token { _, app in app["module"] = ["type": "xen:macro", "key": "macro"] }
        let noModule = try Self.token { _, app in app.removeValue(forKey: "module") }
        let moduleNotObject = try Self.token { _, app in app["module"] = "core:endpoint" }
        let withContext = try Self.token { claims, _ in claims["context"] = ["cloudId": "cloud-1", "localId": "x"] }
        let withPrincipal = try Self.token { claims, _ in claims["principal"] = "5b10ac8d82e05b22cc7d4ef5" }
        let principalObject = try Self.token { claims, _ in claims["principal"] = ["accountId": "x"] }
        let contextString = try Self.token { claims, _ in claims["context"] = "" }
        for token in [uiType, noModule, moduleNotObject, withContext, withPrincipal, principalObject, contextString] {
            await self.expect(token, .backend, refusedWith: .notBackend, verifier: verifier)
        }
        // preUninstall: a principal is allowed, the rest is not.
        for token in [uiType, noModule, withContext, contextString] {
            await self.expect(token, .backendAllowingPrincipal, refusedWith: .notBackend, verifier: verifier)
        }
        _ = try await verifier.verify(withPrincipal, policy: .backendAllowingPrincipal)
        _ = try await verifier.verify(principalObject, policy: .backendAllowingPrincipal)
        // A null claim is no claim.
        let nulls = try Self.token { claims, _ in
            claims["principal"] = NSNull()
            claims["context"] = NSNull()
        }
        _ = try await verifier.verify(nulls, policy: .backend)
        // Without a policy (other uses of the verifier) nothing is checked.
        _ = try await verifier.verify(uiType)
    }

    @Test func moduleKeyAllowList() async throws {
        let verifier = try Self.verifier(moduleKeys: ["token-gateway", "lifecycle"])
        _ = try await verifier.verify(try Self.token(), policy: .backend)
        let lifecycle = try Self.token { _, app in app["module"] = ["type": "core:endpoint", "key": "lifecycle"] }
        _ = try await verifier.verify(lifecycle, policy: .backend)
        let other = try Self.token { _, app in app["module"] = ["type": "core:endpoint", "key": "other"] }
        let noKey = try Self.token { _, app in app["module"] = ["type": "core:endpoint"] }
        await self.expect(other, .backend, refusedWith: .moduleKeyNotAllowed, verifier: verifier)
        await self.expect(noKey, .backendAllowingPrincipal, refusedWith: .moduleKeyNotAllowed, verifier: verifier)
    }

    @Test func refusalsKeepTheirOtherReasons() async throws {
        // An invalid token stays a 401 reason even when it is also of the wrong kind.
        let expired = try Self.token { claims, app in
            claims["exp"] = Date().timeIntervalSince1970 - 3600
            app["module"] = ["type": "xen:macro", "key": "m"]
        }
        do {
            _ = try await Self.verifier().verify(expired, policy: .backend)
            Issue.record("accepted")
        } catch let error as InvocationTokenError {
            #expect(error == .expired)
            #expect(!error.isForbidden)
        }
    }
}
