import AsyncHTTPClient
import Crypto
import Foundation
import Hummingbird
import Logging
import NIOCore
import Synchronization
import Testing
import _CryptoExtras

@testable import TokenGateway

/// Builds FITs signed with locally generated RSA keys.
private struct FITFactory {
    static let appId = "ari:cloud:ecosystem::app/3e2b9c1a-7d6f-4b8e-a5c4-1f0e9d8c7b6a"
    static let installationId = "ari:cloud:ecosystem::installation/5c0d6a2e-8f1b-4e3c-9a7d-0b1c2d3e4f50"
    static let cloudId = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"

    /// Two keys, generated once for the whole test run.
    static let keyOne = try! _RSA.Signing.PrivateKey(keySize: .bits2048)
    static let keyTwo = try! _RSA.Signing.PrivateKey(keySize: .bits2048)

    static func jwk(_ key: _RSA.Signing.PrivateKey, kid: String, alg: String? = "RS256") -> [String: Any] {
        let primitives = try! key.publicKey.getKeyPrimitives()
        var jwk: [String: Any] = [
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": Base64URL.encode(primitives.modulus), "e": Base64URL.encode(primitives.publicExponent),
        ]
        if let alg { jwk["alg"] = alg }
        return jwk
    }

    static func jwks(_ keys: [[String: Any]]) -> String {
        String(decoding: try! JSONSerialization.data(withJSONObject: ["keys": keys]), as: UTF8.self)
    }

    static func claims(now: Date = Date(), jti: String = UUID().uuidString) -> [String: Any] {
        let t = now.timeIntervalSince1970.rounded(.down)
        return [
            "iss": "forge/invocation-token",
            "aud": appId,
            "iat": t, "nbf": t, "exp": t + 25,
            "jti": jti,
            "app": [
                "id": appId,
                "installationId": installationId,
                "apiBaseUrl": "https://api.atlassian.com/ex/jira/\(cloudId)",
                "appVersion": "2.1.0",
                "environment": ["type": "PRODUCTION", "id": "env-1"],
                "module": ["type": "xen:remote", "key": "gateway"],
                "installation": [
                    "id": installationId,
                    "contexts": [["apiBaseUrl": "https://api.atlassian.com/ex/jira/\(cloudId)", "cloudId": cloudId]],
                ],
            ] as [String: Any],
            "principal": "557058:account",
        ]
    }

    static func encodeJSON(_ object: [String: Any]) -> String {
        Base64URL.encode(try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }

    static func token(
        claims: [String: Any],
        header: [String: Any] = ["alg": "RS256", "kid": "key-1", "typ": "JWT"],
        signingKey: _RSA.Signing.PrivateKey = keyOne
    ) -> String {
        let input = encodeJSON(header) + "." + encodeJSON(claims)
        let signature = try! signingKey.signature(
            for: SHA256.hash(data: Array(input.utf8)),
            padding: .insecurePKCS1v1_5
        )
        return input + "." + Base64URL.encode(signature.rawRepresentation)
    }
}

@Suite struct InvocationTokenVerifierTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    static func verifier(
        jwks: String = FITFactory.jwks([FITFactory.jwk(FITFactory.keyOne, kid: "key-1")])
    ) throws -> InvocationTokenVerifier {
        try InvocationTokenVerifier(
            configuration: .init(appId: FITFactory.appId),
            jwksJSON: jwks,
            logger: logger
        )
    }

    func expectRejection(
        _ token: String,
        _ expected: InvocationTokenError,
        verifier: InvocationTokenVerifier? = nil,
        now: Date = Date(),
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        let verifier = try verifier ?? Self.verifier()
        do {
            _ = try await verifier.verify(token, now: now)
            Issue.record("token accepted, expected \(expected.reason)", sourceLocation: sourceLocation)
        } catch let error as InvocationTokenError {
            #expect(error == expected, "got \(error)", sourceLocation: sourceLocation)
            #expect(!error.description.contains(token), sourceLocation: sourceLocation)
        }
    }

    @Test func validTokenPassesWithItsContext() async throws {
        let now = Date()
        let verifier = try Self.verifier()
        let context = try await verifier.verify(
            FITFactory.token(claims: FITFactory.claims(now: now, jti: "jti-1")),
            now: now
        )
        #expect(context.installationId == FITFactory.installationId)
        #expect(context.appId == FITFactory.appId)
        #expect(context.apiBaseUrl == "https://api.atlassian.com/ex/jira/\(FITFactory.cloudId)")
        #expect(context.cloudId == FITFactory.cloudId)
        #expect(context.environmentType == "PRODUCTION")
        #expect(context.environmentId == "env-1")
        #expect(context.jti == "jti-1")
        #expect(context.principal == "557058:account")
        #expect(context.expiresAt == Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down) + 25))
        // Accepted until exp + skew: its jti has to be remembered that long.
        #expect(context.acceptedUntil == context.expiresAt.addingTimeInterval(60))
    }

    @Test func audienceArrayContainingTheAppIdPasses() async throws {
        var claims = FITFactory.claims()
        claims["aud"] = ["something-else", FITFactory.appId]
        let context = try await Self.verifier().verify(FITFactory.token(claims: claims))
        #expect(context.installationId == FITFactory.installationId)
    }

    @Test func cloudIdFallsBackToAPIBaseURLAndAppIdToAudience() async throws {
        var claims = FITFactory.claims()
        claims["app"] = [
            "installationId": FITFactory.installationId,
            "apiBaseUrl": "https://api.atlassian.com/ex/confluence/cloud-42",
        ]
        claims["principal"] = ["unexpected": "object"]
        let context = try await Self.verifier().verify(FITFactory.token(claims: claims))
        #expect(context.cloudId == "cloud-42")
        #expect(context.appId == FITFactory.appId)
        #expect(context.principal == nil)
        #expect(context.environmentType == nil)
    }

    @Test("a null principal or context counts as absent; any other value as present")
    func nullPrincipalAndContextAreAbsent() async throws {
        var claims = FITFactory.claims()
        claims["principal"] = NSNull()
        claims["context"] = NSNull()
        let absent = try await Self.verifier().verify(FITFactory.token(claims: claims))
        #expect(!absent.hasPrincipal && !absent.hasContext)
        claims["principal"] = "557058:account"
        claims["context"] = [String: Any]()
        let present = try await Self.verifier().verify(FITFactory.token(claims: claims))
        #expect(present.hasPrincipal && present.hasContext)
    }

    @Test func tokensWithinClockSkewPass() async throws {
        let now = Date()
        // Expired 50 s ago, issued/valid from 50 s in the future: both inside the 60 s skew.
        var claims = FITFactory.claims(now: now)
        claims["exp"] = now.timeIntervalSince1970.rounded(.down) - 50
        _ = try await Self.verifier().verify(FITFactory.token(claims: claims), now: now)
        claims = FITFactory.claims(now: now)
        claims["nbf"] = now.timeIntervalSince1970.rounded(.down) + 50
        claims["iat"] = now.timeIntervalSince1970.rounded(.down) + 50
        claims["exp"] = now.timeIntervalSince1970.rounded(.down) + 75
        _ = try await Self.verifier().verify(FITFactory.token(claims: claims), now: now)
    }

    @Test func algNoneIsRefused() async throws {
        let input =
            FITFactory.encodeJSON(["alg": "none", "kid": "key-1"]) + "." + FITFactory.encodeJSON(FITFactory.claims())
        try await expectRejection(input + ".", .algorithmNotAllowed)
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["alg": "none", "kid": "key-1"]),
            .algorithmNotAllowed
        )
    }

    @Test func hs256SignedWithThePublicKeyIsRefused() async throws {
        let input =
            FITFactory.encodeJSON(["alg": "HS256", "kid": "key-1"]) + "." + FITFactory.encodeJSON(FITFactory.claims())
        for secret in [
            Array(FITFactory.keyOne.publicKey.pemRepresentation.utf8),
            Array(FITFactory.keyOne.publicKey.derRepresentation),
        ] {
            let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
            try await expectRejection(input + "." + Base64URL.encode(Array(mac)), .algorithmNotAllowed)
        }
    }

    @Test func otherAlgorithmsAreRefused() async throws {
        for alg: Any in ["RS512", "PS256", "ES256", "rs256", "RS256 ", NSNull(), 256] {
            try await expectRejection(
                FITFactory.token(claims: FITFactory.claims(), header: ["alg": alg, "kid": "key-1"]),
                .algorithmNotAllowed
            )
        }
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["kid": "key-1"]),
            .algorithmNotAllowed
        )
    }

    @Test func criticalHeaderExtensionsAreRefused() async throws {
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256", "kid": "key-1", "crit": ["b64"]]),
            .malformed
        )
    }

    @Test func wrongAudienceIsRefused() async throws {
        for aud: Any in ["ari:cloud:ecosystem::app/other", ["ari:cloud:ecosystem::app/other"], [String]()] {
            var claims = FITFactory.claims()
            claims["aud"] = aud
            try await expectRejection(FITFactory.token(claims: claims), .wrongAudience)
        }
    }

    @Test("a FIT from an Isolated Cloud (an icLabel claim) is refused: not supported, so it fails closed")
    func isolatedCloudFailsClosed() async throws {
        for label: Any in ["ic-eu-1", "", 7] {
            var claims = FITFactory.claims()
            claims["icLabel"] = label
            try await expectRejection(FITFactory.token(claims: claims), .isolatedCloud)
        }
        var claims = FITFactory.claims()
        claims["icLabel"] = NSNull()
        _ = try await Self.verifier().verify(FITFactory.token(claims: claims))
    }

    @Test func wrongIssuerIsRefused() async throws {
        var claims = FITFactory.claims()
        claims["iss"] = "forge/other-token"
        try await expectRejection(FITFactory.token(claims: claims), .wrongIssuer)
    }

    @Test func expiredBeyondSkewIsRefused() async throws {
        let now = Date()
        var claims = FITFactory.claims(now: now)
        claims["exp"] = now.timeIntervalSince1970.rounded(.down) - 61
        try await expectRejection(FITFactory.token(claims: claims), .expired, now: now)
    }

    @Test func notBeforeInTheFutureIsRefused() async throws {
        let now = Date()
        var claims = FITFactory.claims(now: now)
        claims["nbf"] = now.timeIntervalSince1970.rounded(.down) + 120
        claims["exp"] = now.timeIntervalSince1970.rounded(.down) + 200
        try await expectRejection(FITFactory.token(claims: claims), .notYetValid, now: now)
    }

    @Test func issuedInTheFutureBeyondSkewIsRefused() async throws {
        let now = Date()
        var claims = FITFactory.claims(now: now)
        claims["iat"] = now.timeIntervalSince1970.rounded(.down) + 120
        claims["exp"] = now.timeIntervalSince1970.rounded(.down) + 200
        try await expectRejection(FITFactory.token(claims: claims), .issuedInFuture, now: now)
    }

    @Test func unknownKidIsRefusedEvenWithAnotherKeyInTheJWKS() async throws {
        let verifier = try Self.verifier(
            jwks: FITFactory.jwks([
                FITFactory.jwk(FITFactory.keyOne, kid: "key-1"), FITFactory.jwk(FITFactory.keyTwo, kid: "key-2"),
            ])
        )
        // Signed by key one, but naming a kid the JWKS does not have.
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256", "kid": "key-3"]),
            .unknownKey,
            verifier: verifier
        )
        // No kid at all: no default key is ever used.
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256"]),
            .unknownKey,
            verifier: verifier
        )
        try await expectRejection(
            FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256", "kid": ""]),
            .unknownKey,
            verifier: verifier
        )
        // Signed by key two but naming key one: only key one is tried.
        try await expectRejection(
            FITFactory.token(
                claims: FITFactory.claims(),
                header: ["alg": "RS256", "kid": "key-1"],
                signingKey: FITFactory.keyTwo
            ),
            .badSignature,
            verifier: verifier
        )
        // Both keys work under their own kid.
        _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
        _ = try await verifier.verify(
            FITFactory.token(
                claims: FITFactory.claims(),
                header: ["alg": "RS256", "kid": "key-2"],
                signingKey: FITFactory.keyTwo
            )
        )
    }

    @Test func unusableJWKSEntriesAreIgnored() async throws {
        let verifier = try Self.verifier(
            jwks: FITFactory.jwks([
                FITFactory.jwk(FITFactory.keyOne, kid: "key-ps", alg: "PS256"),
                ["kty": "oct", "kid": "key-oct", "k": Base64URL.encode(Array("secret".utf8))],
                ["kty": "EC", "kid": "key-ec", "crv": "P-256", "x": "AA", "y": "AA"],
                FITFactory.jwk(FITFactory.keyOne, kid: "key-1"),
            ])
        )
        _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
        for kid in ["key-ps", "key-oct", "key-ec"] {
            try await expectRejection(
                FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256", "kid": kid]),
                .unknownKey,
                verifier: verifier
            )
        }
    }

    @Test func tamperedPayloadIsRefused() async throws {
        let token = FITFactory.token(claims: FITFactory.claims())
        let parts = token.split(separator: ".").map(String.init)
        var claims = FITFactory.claims()
        claims["app"] = ["installationId": "ari:cloud:ecosystem::installation/someone-else"]
        let tampered = parts[0] + "." + FITFactory.encodeJSON(claims) + "." + parts[2]
        try await expectRejection(tampered, .badSignature)

        var signature = Base64URL.decode(parts[2])!
        signature[10] ^= 0x40
        try await expectRejection(parts[0] + "." + parts[1] + "." + Base64URL.encode(signature), .badSignature)
    }

    @Test func verifyingRecordsNothing() async throws {
        // The verifier accepts the same token twice: the call that changes state claims its jti
        // (the routes' replay guard, tested against Redis in SecurityAttackTests).
        let verifier = try Self.verifier()
        let token = FITFactory.token(claims: FITFactory.claims(jti: "once"))
        let first = try await verifier.verify(token)
        let second = try await verifier.verify(token)
        #expect(first == second)
        #expect(first.jti == "once")
    }

    @Test func missingClaimsAreRefused() async throws {
        for claim in ["iss", "aud", "exp", "nbf", "iat", "jti"] {
            var claims = FITFactory.claims()
            claims[claim] = nil
            try await expectRejection(FITFactory.token(claims: claims), .missingClaim)
        }
        var claims = FITFactory.claims()
        claims["jti"] = ""
        try await expectRejection(FITFactory.token(claims: claims), .missingClaim)
        claims = FITFactory.claims()
        claims["app"] = ["id": FITFactory.appId]
        try await expectRejection(FITFactory.token(claims: claims), .missingClaim)
        claims["app"] = nil
        try await expectRejection(FITFactory.token(claims: claims), .missingClaim)
    }

    @Test func claimsOfTheWrongTypeAreMalformed() async throws {
        for (claim, value) in [("exp", "tomorrow"), ("iss", 42), ("jti", 7)] as [(String, Any)] {
            var claims = FITFactory.claims()
            claims[claim] = value
            try await expectRejection(FITFactory.token(claims: claims), .malformed)
        }
    }

    @Test func malformedTokensAreRefused() async throws {
        let valid = FITFactory.token(claims: FITFactory.claims())
        let parts = valid.split(separator: ".").map(String.init)
        for token in [
            "", "abc", "a.b", parts[0] + "." + parts[1], valid + ".x", "!!." + parts[1] + "." + parts[2],
            parts[0] + ".%%." + parts[2], parts[0] + "." + parts[1] + ".+/",
            Base64URL.encode(Array("[]".utf8)) + "." + parts[1] + "." + parts[2],
            String(repeating: "a", count: 40_000),
        ] {
            try await expectRejection(token, .malformed)
        }
    }

    @Test func errorReasonsAreBoundedWords() {
        let all: [InvocationTokenError] = [
            .malformed, .algorithmNotAllowed, .unknownKey, .badSignature, .wrongIssuer, .wrongAudience, .expired,
            .notYetValid, .issuedInFuture, .missingClaim, .replayed, .jwksUnavailable, .storeUnavailable,
            .isolatedCloud,
        ]
        #expect(Set(all.map(\.reason)).count == all.count)
        for error in all {
            #expect(error.reason.allSatisfy { $0.isLowercase || $0 == "_" }, "\(error.reason)")
        }
    }

    @Test func invalidJWKSJSONIsRefused() {
        #expect(throws: InvocationTokenError.jwksUnavailable) { try Self.verifier(jwks: "not json") }
        #expect(throws: InvocationTokenError.jwksUnavailable) { try Self.verifier(jwks: "{\"nokeys\": []}") }
    }
}

// MARK: - JWKS fetched over HTTP

/// A JWKS endpoint on 127.0.0.1 whose answers a test controls.
private final class JWKSTestServer: Sendable {
    struct State {
        var documents: [String: String] = [:]
        var status: HTTPResponse.Status = .ok
        var requests: [String] = []
        var latency: Duration = .zero
        /// While true, requests wait (in `waiting`) until ``release()``.
        var held = false
        var waiting: [CheckedContinuation<Void, Never>] = []
    }

    let state = Mutex(State())

    /// Requests from now on wait for ``release()``.
    func hold() { self.state.withLock { $0.held = true } }
    /// Lets every waiting request (and later ones) be answered.
    func release() {
        let waiting = self.state.withLock { state in
            state.held = false
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }

    func set(_ path: String, _ jwks: String) { self.state.withLock { $0.documents[path] = jwks } }
    func set(status: HTTPResponse.Status) { self.state.withLock { $0.status = status } }
    func set(latency: Duration) { self.state.withLock { $0.latency = latency } }
    var requestCount: Int { self.state.withLock { $0.requests.count } }
    var requests: [String] { self.state.withLock { $0.requests } }

    func run(_ body: (_ baseURL: String) async throws -> Void) async throws {
        let router = Router()
        router.get("/{document}") { request, _ -> Response in
            let path = request.uri.path
            let (document, status, latency) = self.state.withLock { state in
                state.requests.append(path)
                return (state.documents[path], state.status, state.latency)
            }
            if latency > .zero { try await Task.sleep(for: latency) }
            await withCheckedContinuation { continuation in
                let wait = self.state.withLock { state in
                    if state.held { state.waiting.append(continuation) }
                    return state.held
                }
                if !wait { continuation.resume() }
            }
            guard status == .ok, let document else { return Response(status: status == .ok ? .notFound : status) }
            return Response(
                status: .ok,
                headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(string: document))
            )
        }
        let (ports, portContinuation) = AsyncStream.makeStream(of: Int.self)
        let app = Application(
            router: router,
            configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in portContinuation.yield(channel.localAddress?.port ?? 0) },
            logger: Logger(label: "jwks-test-server", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await app.runService(gracefulShutdownSignals: []) }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            do {
                try await body("http://127.0.0.1:\(port)")
            } catch {
                group.cancelAll()
                throw error
            }
            group.cancelAll()
        }
    }
}

@Suite struct InvocationTokenVerifierJWKSTests {
    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    static let keyOneJWKS = FITFactory.jwks([FITFactory.jwk(FITFactory.keyOne, kid: "key-1")])
    static let bothKeysJWKS = FITFactory.jwks([
        FITFactory.jwk(FITFactory.keyOne, kid: "key-1"), FITFactory.jwk(FITFactory.keyTwo, kid: "key-2"),
    ])

    static func verifier(
        baseURL: String,
        configure: (inout InvocationTokenVerifier.Configuration) -> Void = { _ in }
    ) -> InvocationTokenVerifier {
        var configuration = InvocationTokenVerifier.Configuration(
            appId: FITFactory.appId,
            jwksURL: baseURL + "/jwks.json"
        )
        configure(&configuration)
        return InvocationTokenVerifier(
            configuration: configuration,
            httpClient: .shared,
            logger: logger
        )
    }

    static func keyTwoToken() -> String {
        FITFactory.token(
            claims: FITFactory.claims(),
            header: ["alg": "RS256", "kid": "key-2"],
            signingKey: FITFactory.keyTwo
        )
    }

    func expectRejection(
        _ verifier: InvocationTokenVerifier,
        _ token: String,
        _ expected: InvocationTokenError,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async {
        do {
            _ = try await verifier.verify(token)
            Issue.record("token accepted, expected \(expected.reason)", sourceLocation: sourceLocation)
        } catch {
            #expect(error as? InvocationTokenError == expected, "got \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func fetchesTheJWKSOnceAndCachesIt() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL)
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            #expect(server.requests == ["/jwks.json"])
        }
    }

    @Test(
        "an Isolated Cloud FIT signed by a key this JWKS lacks is refused as isolated_cloud, with no JWKS fetch"
    )
    func isolatedCloudNeedsNoKeyLookup() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) { $0.jwksRefreshInterval = .zero }
            var claims = FITFactory.claims()
            claims["icLabel"] = "ic-eu-1"
            let isolated = FITFactory.token(
                claims: claims, header: ["alg": "RS256", "kid": "ic-key-1"], signingKey: FITFactory.keyTwo)
            await expectRejection(verifier, isolated, .isolatedCloud)
            await expectRejection(verifier, isolated, .isolatedCloud)
            #expect(server.requestCount == 0)
        }
    }

    @Test func concurrentVerificationsShareOneFetch() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        server.set(latency: .milliseconds(300))
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL)
            try await withThrowingTaskGroup(of: String.self) { group in
                for _ in 0..<8 {
                    group.addTask {
                        try await verifier.verify(FITFactory.token(claims: FITFactory.claims())).installationId
                    }
                }
                for try await installationId in group { #expect(installationId == FITFactory.installationId) }
            }
            #expect(server.requestCount == 1)
        }
    }

    @Test func unknownKidRefetchesAtMostOncePerInterval() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL)  // refresh interval 30 s
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            server.set("/jwks.json", Self.bothKeysJWKS)
            // Just fetched: the unknown kid does not refetch yet.
            await expectRejection(verifier, Self.keyTwoToken(), .unknownKey)
            await expectRejection(verifier, Self.keyTwoToken(), .unknownKey)
            #expect(server.requestCount == 1)
        }
    }

    @Test func unknownKidPicksUpARotatedKey() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) { $0.jwksRefreshInterval = .zero }
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            server.set("/jwks.json", Self.bothKeysJWKS)
            _ = try await verifier.verify(Self.keyTwoToken())
            #expect(server.requestCount == 2)
            // A kid that is still unknown after the refetch stays refused.
            await expectRejection(
                verifier,
                FITFactory.token(claims: FITFactory.claims(), header: ["alg": "RS256", "kid": "key-9"]),
                .unknownKey
            )
        }
    }

    @Test func failingJWKSIsUnavailableThenRecovers() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        server.set(status: .internalServerError)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) { $0.jwksFailureRetryInterval = .zero }
            await expectRejection(verifier, FITFactory.token(claims: FITFactory.claims()), .jwksUnavailable)
            server.set(status: .ok)
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            #expect(server.requestCount == 2)
        }
    }

    @Test func failuresAreNotRetriedWithinTheRetryInterval() async throws {
        let server = JWKSTestServer()
        server.set(status: .serviceUnavailable)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) { $0.jwksFailureRetryInterval = .seconds(60) }
            await expectRejection(verifier, FITFactory.token(claims: FITFactory.claims()), .jwksUnavailable)
            await expectRejection(verifier, FITFactory.token(claims: FITFactory.claims()), .jwksUnavailable)
            #expect(server.requestCount == 1)
        }
    }

    @Test func unreachableJWKSIsUnavailable() async throws {
        let verifier = Self.verifier(baseURL: "http://127.0.0.1:1") { $0.jwksFetchTimeout = .milliseconds(500) }
        await expectRejection(verifier, FITFactory.token(claims: FITFactory.claims()), .jwksUnavailable)
    }

    @Test func cachedKeysServeWhileARefreshFails() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) {
                $0.jwksCacheLifetime = .zero
                $0.jwksRefreshInterval = .zero
            }
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            server.set(status: .internalServerError)
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            // The stale key served at once; the refetch it started fails, and the key still serves.
            if let refetch = verifier.jwksFetchInFlight(baseURL + "/jwks.json") { _ = await refetch.value }
            #expect(server.requestCount == 2)
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            // Stale keys never make an unknown kid valid.
            await expectRejection(verifier, Self.keyTwoToken(), .jwksUnavailable)
        }
    }

    @Test("a stale key set serves its keys at once while it is fetched again", .timeLimit(.minutes(1)))
    func staleKeysServeWhileRevalidating() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL) {
                $0.jwksCacheLifetime = .zero
                $0.jwksRefreshInterval = .zero
                $0.jwksFetchTimeout = .seconds(10)
            }
            let jwksURL = baseURL + "/jwks.json"
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            // The JWKS now hangs and no longer holds key-1. The stale key still verifies, without
            // waiting for the fetch it starts (still in flight when the answer comes).
            server.hold()
            server.set("/jwks.json", FITFactory.jwks([FITFactory.jwk(FITFactory.keyTwo, kid: "key-2")]))
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            let refetch = verifier.jwksFetchInFlight(jwksURL)
            #expect(refetch != nil, "the refetch is still in flight")
            _ = try? await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            server.release()
            if case .failure(let error) = await refetch?.value { Issue.record("refetch failed: \(error)") }
            #expect(server.requestCount == 2, "one refetch for the two lookups")
            // The fetched set is used from then on: key-2 verifies, key-1 no longer does.
            #expect(try await verifier.verify(Self.keyTwoToken()).appId == FITFactory.appId)
            await expectRejection(verifier, FITFactory.token(claims: FITFactory.claims()), .unknownKey)
        }
    }

    @Test("a token refused for its claims costs no key lookup and no signature check")
    func claimsBeforeKeys() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        try await server.run { baseURL in
            let verifier = Self.verifier(baseURL: baseURL)
            var wrongAudience = FITFactory.claims()
            wrongAudience["aud"] = "ari:cloud:ecosystem::app/00000000-0000-0000-0000-000000000000"
            await expectRejection(verifier, FITFactory.token(claims: wrongAudience), .wrongAudience)
            let expired = FITFactory.claims(now: Date().addingTimeInterval(-600))
            await expectRejection(verifier, FITFactory.token(claims: expired), .expired)
            #expect(server.requestCount == 0)
            // A good token then looks the key up, once.
            _ = try await verifier.verify(FITFactory.token(claims: FITFactory.claims()))
            #expect(server.requestCount == 1)
        }
    }

    @Test func theStagingJWKSIsTrustedOnlyWhenItIsTheConfiguredJWKS() async throws {
        let server = JWKSTestServer()
        server.set("/jwks.json", Self.keyOneJWKS)
        server.set("/staging.json", FITFactory.jwks([FITFactory.jwk(FITFactory.keyTwo, kid: "stg-key")]))
        var claims = FITFactory.claims()
        claims["app"] = [
            "id": FITFactory.appId, "installationId": FITFactory.installationId,
            "apiBaseUrl": "https://api.stg.atlassian.com/ex/jira/\(FITFactory.cloudId)",
        ]
        // A token that names a staging apiBaseUrl (an unverified claim) to pick the staging key set.
        let stagingToken = FITFactory.token(
            claims: claims,
            header: ["alg": "RS256", "kid": "stg-key"],
            signingKey: FITFactory.keyTwo
        )
        try await server.run { baseURL in
            // Production configured (even with a staging JWKS beside it): the claim selects nothing,
            // the staging key set is never fetched, and the token is refused.
            let production = Self.verifier(baseURL: baseURL) { $0.stagingJWKSURL = baseURL + "/staging.json" }
            await expectRejection(production, stagingToken, .unknownKey)
            _ = try await production.verify(FITFactory.token(claims: FITFactory.claims()))
            #expect(!server.requests.contains("/staging.json"))

            // A staging app configures the staging JWKS as its JWKS: staging tokens verify, and
            // tokens signed with production's keys do not.
            let staging = Self.verifier(baseURL: baseURL) { $0.jwksURL = baseURL + "/staging.json" }
            let context = try await staging.verify(stagingToken)
            #expect(context.cloudId == FITFactory.cloudId)
            await expectRejection(staging, FITFactory.token(claims: FITFactory.claims()), .unknownKey)
        }
    }
}
