import Crypto
import Foundation
import Logging
import Synchronization
import Testing
import _CryptoExtras

@testable import ForgeEmulator
@testable import TokenGateway

/// Serves the emulator's published install keys, counting fetches per `kid`.
final class EmulatorKeyFetcher: InstallKeyFetcher {
    let emulator: ForgeEmulator
    let fetches = Mutex<[String: Int]>([:])
    let failing = Mutex(false)

    init(emulator: ForgeEmulator) { self.emulator = emulator }

    struct Unreachable: Error {}

    func publicKeyPEM(kid: String) async throws -> String? {
        self.fetches.withLock { $0[kid, default: 0] += 1 }
        if self.failing.withLock({ $0 }) { throw Unreachable() }
        return self.emulator.installKeyPEM(kid: kid)
    }

    func count(_ kid: String) -> Int { self.fetches.withLock { $0[kid] ?? 0 } }
}

@Suite("Connect signed install verification")
struct ConnectSignedInstallTests {
    static let appBaseURL = "https://app.example.test/gateway"
    static let path = "/connect/installed"

    let emulator: ForgeEmulator
    let fetcher: EmulatorKeyFetcher
    let verifier: SignedInstallVerifier
    let tenant: EmulatedConnectTenant

    static let logger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

    /// One emulator for the suite (RSA key generation is slow); tests that rotate its install key
    /// make their own.
    static let sharedEmulator = Result { try ConnectSignedInstallTests.makeEmulator() }

    static func makeEmulator() throws -> ForgeEmulator {
        let emulator = try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1"), logger: Self.logger)
        emulator.setConnectAppBaseURL(Self.appBaseURL)
        return emulator
    }

    init() throws {
        try self.init(emulator: Self.sharedEmulator.get())
    }

    init(emulator: ForgeEmulator) {
        let logger = Self.logger
        self.emulator = emulator
        self.fetcher = EmulatorKeyFetcher(emulator: self.emulator)
        // The configured base URL has a trailing slash: it is ignored when comparing with aud.
        self.verifier = SignedInstallVerifier(
            configuration: .init(appBaseURL: Self.appBaseURL + "/", keysURL: "http://keys.invalid"),
            fetcher: self.fetcher, logger: logger)
        self.tenant = self.emulator.makeConnectTenant()
    }

    func verify(
        _ options: SignedInstallOptions = SignedInstallOptions(), scheme: String = "JWT", uri: String = Self.path,
        method: String = "POST", body: Data? = nil
    ) async throws -> VerifiedSignedInstall {
        let token = try self.emulator.mintSignedInstall(for: self.tenant, path: Self.path, options: options)
        let bytes = Array(body ?? self.emulator.connectLifecyclePayload(.installed, tenant: self.tenant))
        return try await self.verifier.verify(authorization: scheme + " " + token, method: method, uri: uri) { bytes }
    }

    func expectRefused(
        _ expected: SignedInstallError, _ options: SignedInstallOptions = SignedInstallOptions(),
        scheme: String = "JWT",
        uri: String = Self.path, method: String = "POST", body: Data? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async {
        await #expect(throws: expected, sourceLocation: sourceLocation) {
            try await self.verify(options, scheme: scheme, uri: uri, method: method, body: body)
        }
    }

    @Test("a signed install as Atlassian sends it verifies and yields the whole payload")
    func valid() async throws {
        let verified = try await self.verify()
        #expect(verified.clientKey == self.tenant.clientKey)
        #expect(verified.payload["sharedSecret"]?.connectString == self.tenant.sharedSecret)
        #expect(verified.payload["baseUrl"]?.connectString == self.tenant.baseUrl)
        #expect(verified.payload["key"]?.connectString == self.emulator.connectAppKey)
    }

    @Test("aud as a single string, and the base URL path still in the request path, are accepted")
    func audienceStringAndPrefixedPath() async throws {
        var options = SignedInstallOptions()
        options.audienceAsString = true
        _ = try await self.verify(options)
        _ = try await self.verify(uri: "/gateway/connect/installed")
    }

    @Test("no header, or a scheme other than JWT, is refused")
    func scheme() async throws {
        await #expect(throws: SignedInstallError.missingToken) {
            try await self.verifier.verify(authorization: nil, method: "POST", uri: Self.path) { [] }
        }
        await self.expectRefused(.missingToken, scheme: "Bearer")
        _ = try await self.verify(scheme: "jwt")
    }

    @Test("alg none and HS256 keyed with the public key are refused")
    func algorithms() async {
        var none = SignedInstallOptions()
        none.algorithm = .none
        await self.expectRefused(.algorithmNotAllowed, none)
        var confusion = SignedInstallOptions()
        confusion.algorithm = .hs256WithPublicKey
        await self.expectRefused(.algorithmNotAllowed, confusion)
    }

    @Test("a kid the key service does not know, or an unsafe kid, is refused")
    func unknownKid() async {
        var unknown = SignedInstallOptions()
        unknown.kid = "0e50fccb-239d-4991-a5db-dc850ba3f236"
        await self.expectRefused(.unknownKey, unknown)
        for bad in ["../etc/passwd", "..", "a/b", "a b", String(repeating: "k", count: 129)] {
            var options = SignedInstallOptions()
            options.kid = bad
            await self.expectRefused(.unknownKey, options)
        }
    }

    @Test("a signature by a key other than the one named by kid is refused")
    func unpublishedKey() async {
        var options = SignedInstallOptions()
        options.signWithUnpublishedKey = true
        await self.expectRefused(.badSignature, options)
    }

    @Test("iss other than the body's clientKey is refused")
    func issuer() async {
        var options = SignedInstallOptions()
        options.issuer = "another-tenant"
        await self.expectRefused(.wrongIssuer, options)
        // The token names the tenant, the body another one.
        var body = SignedInstallOptions()
        body.bodyClientKey = "victim-tenant"
        let payload = try? JSONSerialization.data(
            withJSONObject: [
                "clientKey": "victim-tenant", "sharedSecret": "attacker", "key": "k", "baseUrl": "https://x",
            ])
        await self.expectRefused(.wrongIssuer, body: payload)
    }

    @Test("aud without the app base URL is refused")
    func audience() async {
        for audience in [
            ["https://other.example.test"], [], ["https://app.example.test"], ["https://app.example.test/gateway/x"],
        ] {
            var options = SignedInstallOptions()
            options.audience = audience
            await self.expectRefused(.wrongAudience, options)
        }
    }

    @Test("an exp that has passed is refused")
    func expired() async {
        var options = SignedInstallOptions()
        options.expiresAt = Date().addingTimeInterval(-120)
        await self.expectRefused(.expired, options)
        options.expiresAt = Date().addingTimeInterval(-10)
        await self.expectRefused(.expired, options)
    }

    @Test("an exp more than a day ahead is refused before anything is remembered for it")
    func lifetimeTooLong() async throws {
        var options = SignedInstallOptions()
        options.expiresAt = Date().addingTimeInterval(2 * 86_400)
        await self.expectRefused(.lifetimeTooLong, options)
        options.expiresAt = Date(timeIntervalSince1970: 1e13)
        await self.expectRefused(.lifetimeTooLong, options)
        options.expiresAt = Date().addingTimeInterval(3600)
        #expect(try await self.verify(options).expiresAt > 0)
    }

    @Test("the verified install carries iat and digests of token and body; its printed forms hold no secret")
    func verifiedInstallFields() async throws {
        var options = SignedInstallOptions()
        options.issuedAt = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down) - 30)
        let verified = try await self.verify(options)
        #expect(verified.issuedAt == Int64(options.issuedAt!.timeIntervalSince1970))
        // An iat ahead of now orders nothing: left out.
        options.issuedAt = Date().addingTimeInterval(600)
        #expect(try await self.verify(options).issuedAt == nil)
        let body = self.emulator.connectLifecyclePayload(.installed, tenant: self.tenant)
        #expect(verified.bodyDigest == SHA256.hash(data: body).map { String(format: "%02x", $0) }.joined())
        #expect(verified.replayDigest.count == 64)
        var dumped = ""
        dump(verified, to: &dumped)
        for printed in [String(describing: verified), String(reflecting: verified), dumped] {
            #expect(!printed.contains(self.tenant.sharedSecret))
            #expect(printed.contains(self.tenant.clientKey))
        }
    }

    @Test("the replay guard names a token as signed: the same token with `=` padding has the same digest")
    func replayDigestIgnoresPadding() async throws {
        let token = try self.emulator.mintSignedInstall(for: self.tenant, path: Self.path, options: .init())
        let signature = try #require(token.split(separator: ".").last)
        let padded = token + String(repeating: "=", count: (4 - signature.count % 4) % 4)
        #expect(padded != token)
        let bytes = Array(self.emulator.connectLifecyclePayload(.installed, tenant: self.tenant))
        let plain = try await self.verifier.verify(authorization: "JWT " + token, method: "POST", uri: Self.path) {
            bytes
        }
        let spelt = try await self.verifier.verify(authorization: "JWT " + padded, method: "POST", uri: Self.path) {
            bytes
        }
        #expect(plain.replayDigest == spelt.replayDigest)
        // Another token (another iat) has another digest.
        var later = SignedInstallOptions()
        later.issuedAt = Date().addingTimeInterval(-60)
        #expect(try await self.verify(later).replayDigest != plain.replayDigest)
    }

    @Test("a qsh for another request is refused")
    func qsh() async {
        var options = SignedInstallOptions()
        options.qsh = CanonicalRequest.qsh(method: "POST", url: "/connect/uninstalled")
        await self.expectRefused(.qshMismatch, options)
        await self.expectRefused(.qshMismatch, method: "PUT")
        await self.expectRefused(.qshMismatch, uri: "/connect/installed?extra=1")
    }

    @Test("a body that is not a JSON object with a clientKey is refused")
    func body() async {
        await self.expectRefused(.invalidBody, body: Data("not json".utf8))
        await self.expectRefused(.invalidBody, body: Data("[1]".utf8))
        await self.expectRefused(.invalidBody, body: Data(#"{"clientKey": 5}"#.utf8))
    }

    @Test("the body is not read when the token's own claims already fail")
    func bodyNotReadForBadToken() async throws {
        var options = SignedInstallOptions()
        options.expiresAt = Date().addingTimeInterval(-3600)
        let token = try self.emulator.mintSignedInstall(for: self.tenant, path: Self.path, options: options)
        let reads = Mutex(0)
        await #expect(throws: SignedInstallError.expired) {
            try await self.verifier.verify(authorization: "JWT " + token, method: "POST", uri: Self.path) {
                reads.withLock { $0 += 1 }
                return []
            }
        }
        #expect(reads.withLock { $0 } == 0)
        #expect(self.fetcher.fetches.withLock { $0.isEmpty })
    }

    @Test("keys are fetched once per kid and cached; a rotated kid is fetched once more")
    func cachedByKid() async throws {
        let own = Self(emulator: try Self.makeEmulator())
        try await own.assertCachedByKid()
    }

    func assertCachedByKid() async throws {
        let first = try self.emulator.currentInstallKeyId()
        for _ in 0..<3 { _ = try await self.verify() }
        #expect(self.fetcher.count(first) == 1)
        let second = try self.emulator.rotateInstallKey()
        for _ in 0..<3 { _ = try await self.verify() }
        #expect(self.fetcher.count(second) == 1)
        #expect(self.fetcher.count(first) == 1)
    }

    @Test("a key service failure refuses the install and the kid is not refetched at once")
    func fetchFailure() async throws {
        self.fetcher.failing.withLock { $0 = true }
        await self.expectRefused(.keyUnavailable)
        self.fetcher.failing.withLock { $0 = false }
        await self.expectRefused(.keyUnavailable)
        #expect(self.fetcher.count(try self.emulator.currentInstallKeyId()) == 1)
    }

    @Test("the key cache shares one fetch per kid, evicts the least recently used key, and budgets fetches")
    func cacheStateMachine() async throws {
        var cache = InstallKeyCache(fetchesPerMinute: 2)
        let now = ContinuousClock.now
        let pem = try #require(self.emulator.installKeyPEM(kid: try self.emulator.currentInstallKeyId()))
        let key = try await SignedInstallVerifierTestKey.parse(pem)
        let task = InstallKeyCache.FetchTask { .success(key) }

        guard case .fetch = cache.lookup(kid: "a", now: now, makeTask: { task }) else {
            Issue.record("first lookup must fetch")
            return
        }
        guard case .wait = cache.lookup(kid: "a", now: now, makeTask: { task }) else {
            Issue.record("a concurrent lookup must wait for the fetch in flight")
            return
        }
        cache.fetchCompleted(kid: "a", result: .success(key), retryAt: now, maximumKeys: 1)
        guard case .found = cache.lookup(kid: "a", now: now, makeTask: { task }) else {
            Issue.record("a fetched key must be cached")
            return
        }
        guard case .fetch = cache.lookup(kid: "b", now: now, makeTask: { task }) else {
            Issue.record("another kid must fetch")
            return
        }
        cache.fetchCompleted(kid: "b", result: .success(key), retryAt: now, maximumKeys: 1)
        #expect(cache.keyCount == 1)
        // Budget of 2 per minute is spent: a third kid is refused without a fetch.
        guard case .fail(.keyUnavailable) = cache.lookup(kid: "c", now: now, makeTask: { task }) else {
            Issue.record("fetches beyond the budget must be refused")
            return
        }
        // A minute later the budget has refilled.
        guard case .fetch = cache.lookup(kid: "c", now: now + .seconds(60), makeTask: { task }) else {
            Issue.record("the budget must refill")
            return
        }
        cache.fetchCompleted(
            kid: "c", result: .failure(.unknownKey), retryAt: ContinuousClock.now + .seconds(30), maximumKeys: 1)
        guard case .fail(.unknownKey) = cache.lookup(kid: "c", now: .now, makeTask: { task }) else {
            Issue.record("a failed kid is not refetched before its retry time")
            return
        }
    }
}

/// An ``InstallKeyIDRegistry`` whose reads can fail.
final class TestInstallKeyRegistry: InstallKeyIDRegistry {
    let state = Mutex((kids: Set<String>(), failNext: false, reads: 0))

    func knownInstallKeyIDs() async throws -> Set<String> {
        let (kids, fail) = self.state.withLock { state in
            state.reads += 1
            defer { state.failNext = false }
            return (state.kids, state.failNext)
        }
        if fail { throw CancellationError() }
        return kids
    }

    func rememberInstallKeyID(_ kid: String) async throws { self.state.withLock { _ = $0.kids.insert(kid) } }
}

@Suite("Connect install keys: the registry of known kids")
struct InstallKeyRegistryTests {
    @Test("a failed registry read is not an empty registry: the next lookup reads it again")
    func failedReadIsNotEmpty() async throws {
        let registry = TestInstallKeyRegistry()
        registry.state.withLock {
            $0.kids = ["known-kid"]
            $0.failNext = true
        }
        let pem = try _RSA.Signing.PrivateKey(keySize: .bits2048).publicKey.pemRepresentation
        let verifier = SignedInstallVerifier(
            configuration: .init(appBaseURL: "https://x.test"),
            fetcher: SignedInstallVerifierTestKey.StaticFetcher(pem: pem), registry: registry,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        _ = try await verifier.publicKey(kid: "made-up-kid")
        #expect(verifier.cache.withLock { $0.seenKids["made-up-kid"] } == nil)
        // Redis answers again: the kid another replica verified with is known here too.
        _ = try await verifier.publicKey(kid: "known-kid")
        #expect(registry.state.withLock { $0.reads } == 2)
        #expect(verifier.cache.withLock { $0.seenKids["known-kid"] } != nil)
    }
}

/// Parses a PEM public key through the verifier's own fetch path.
enum SignedInstallVerifierTestKey {
    struct StaticFetcher: InstallKeyFetcher {
        let pem: String
        func publicKeyPEM(kid: String) async throws -> String? { self.pem }
    }

    static func parse(_ pem: String) async throws -> InstallKeyCache.PublicKey {
        let verifier = SignedInstallVerifier(
            configuration: .init(appBaseURL: "https://x.test"), fetcher: StaticFetcher(pem: pem),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        return try await verifier.publicKey(kid: "k")
    }
}
