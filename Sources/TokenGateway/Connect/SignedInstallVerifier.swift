import AsyncHTTPClient
import Crypto
import Foundation
import Logging
import Synchronization
import _CryptoExtras

/// Why a signed install was refused. ``reason`` is a bounded word for logs; the description never
/// contains the token.
public struct SignedInstallError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The failed check (snake_case).
    public let reason: String

    private init(_ reason: String) { self.reason = reason }

    /// No `Authorization: JWT <token>` header.
    public static let missingToken = SignedInstallError("missing_token")
    /// Not a compact JWS with JSON header and claims.
    public static let malformed = SignedInstallError("malformed")
    /// The header `alg` is not exactly `RS256`, or it demands extensions (`crit`).
    public static let algorithmNotAllowed = SignedInstallError("algorithm_not_allowed")
    /// No usable `kid`, or no public key is published under it.
    public static let unknownKey = SignedInstallError("unknown_key")
    /// The key for the `kid` could not be fetched (and none is cached).
    public static let keyUnavailable = SignedInstallError("key_unavailable")
    /// The RS256 signature does not verify with the key named by `kid`.
    public static let badSignature = SignedInstallError("bad_signature")
    /// `iss` is absent or not the body's `clientKey`.
    public static let wrongIssuer = SignedInstallError("wrong_issuer")
    /// `aud` does not contain the app's base URL.
    public static let wrongAudience = SignedInstallError("wrong_audience")
    /// `exp` is absent or has passed; or `nbf` is still ahead.
    public static let expired = SignedInstallError("expired")
    /// `exp` lies more than ``SignedInstallVerifier/maximumLifetimeSeconds`` ahead.
    public static let lifetimeTooLong = SignedInstallError("lifetime_too_long")
    /// `qsh` does not match the request.
    public static let qshMismatch = SignedInstallError("qsh_mismatch")
    /// The body is not a JSON object with a string `clientKey`.
    public static let invalidBody = SignedInstallError("invalid_body")
    /// The body is larger than the gateway takes (64 KiB).
    public static let bodyTooLarge = SignedInstallError("body_too_large")

    public var description: String { "SignedInstallError(\(self.reason))" }
}

/// A lifecycle callback whose signed install verified. Its printed and reflected forms leave the
/// payload out: it holds the tenant's `sharedSecret`.
public struct VerifiedSignedInstall: Sendable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    /// The body's `clientKey`, equal to the token's `iss`.
    public let clientKey: String
    /// The whole body, as parsed (keys sorted).
    public let payload: [String: JSONValue]
    /// Names the token for the replay guard: hex SHA-256 of its issuer and `jti` when it carries
    /// one, else of its signed parts and decoded signature (however its base64url is spelt).
    public let replayDigest: String
    /// How earlier builds named a token without `jti` (hex SHA-256 of its text), for the replay
    /// guard during a rolling upgrade; nil for a token with a `jti` (named the same way by both).
    public let earlierReplayDigest: String?
    /// Names the body: hex SHA-256 of its bytes. The same token sent again with the same body is a
    /// retry; with another body, a replay.
    public let bodyDigest: String
    /// The token's `exp` (unix seconds): how long the replay guard must remember it.
    public let expiresAt: Int64
    /// The token's `iat` (unix seconds), when it carries one: orders callbacks that arrive out of
    /// order.
    public let issuedAt: Int64?
    /// The token carries a `jti` (so it names one callback).
    public let namesOneCallback: Bool

    public var description: String {
        "VerifiedSignedInstall(clientKey: \(self.clientKey), expiresAt: \(self.expiresAt))"
    }
    public var debugDescription: String { self.description }
    public var customMirror: Mirror {
        Mirror(self, children: ["clientKey": self.clientKey, "expiresAt": self.expiresAt])
    }
}

/// Verifies Connect lifecycle callbacks signed with `apiMigrations.signed-install` (contract §5,
/// protocol.md §3): `Authorization: JWT <token>`, RS256 only, the public key fetched by `kid` from
/// the install-keys URL and cached by `kid`; `iss` = the body's `clientKey`, `aud` contains the
/// app's base URL (trailing `/` ignored), `qsh` matches the request, `exp` not passed.
public final class SignedInstallVerifier: Sendable {
    /// Atlassian's install-keys service.
    public static let productionKeysURL = "https://connect-install-keys.atlassian.com"

    public struct Configuration: Sendable {
        /// The app's `baseUrl` from its descriptor: the `aud` the tokens must carry. Its path (if
        /// any) is removed from request paths before the `qsh` is computed.
        public var appBaseURL: String
        /// Base URL of the PEM public keys; a key is fetched from `<keysURL>/<kid>`.
        public var keysURL: String = SignedInstallVerifier.productionKeysURL
        /// Tolerance for `exp` and `nbf`. Default 5 s (whole-second rounding, clock drift).
        public var clockSkew: Duration = .seconds(5)
        /// Timeout of one key fetch. Default 5 s.
        public var keyFetchTimeout: Duration = .seconds(5)
        /// A `kid` whose fetch failed is not fetched again for this long. Default 30 s.
        public var failedKeyRetryInterval: Duration = .seconds(30)
        /// Keys kept in memory; the least recently used goes first. Default 64.
        public var maximumCachedKeys: Int = 64
        /// At most this many key fetches per minute, whatever the `kid`s: an unauthenticated
        /// caller cannot make the gateway fetch without bound. Default 30.
        public var keyFetchesPerMinute: Int = 30

        public init(appBaseURL: String, keysURL: String = SignedInstallVerifier.productionKeysURL) {
            self.appBaseURL = appBaseURL
            self.keysURL = keysURL
        }
    }

    let configuration: Configuration
    let fetcher: any InstallKeyFetcher
    /// Where `kid`s whose key verified are remembered for every replica and across restarts.
    let registry: (any InstallKeyIDRegistry)?
    /// The registry's `kid`s as last read, and when.
    let registryKids = Mutex<(kids: Set<String>, at: ContinuousClock.Instant)?>(nil)
    let logger: Logger
    let cache: Mutex<InstallKeyCache>
    /// The app base URL without trailing `/`, compared with `aud` entries (also trimmed).
    let audience: String
    /// The path of the app base URL, removed from request paths for the `qsh`.
    let basePath: String

    /// A verifier that fetches keys with `httpClient`.
    public convenience init(
        configuration: Configuration, httpClient: HTTPClient, registry: (any InstallKeyIDRegistry)? = nil,
        logger: Logger
    ) {
        self.init(
            configuration: configuration,
            fetcher: HTTPInstallKeyFetcher(
                httpClient: httpClient, keysURL: configuration.keysURL, timeout: configuration.keyFetchTimeout,
                logger: logger),
            registry: registry, logger: logger)
    }

    /// A verifier that gets keys from `fetcher` (tests, other transports).
    public init(
        configuration: Configuration, fetcher: any InstallKeyFetcher, registry: (any InstallKeyIDRegistry)? = nil,
        logger: Logger
    ) {
        self.configuration = configuration
        self.fetcher = fetcher
        self.registry = registry
        self.logger = logger
        self.cache = Mutex(InstallKeyCache(fetchesPerMinute: configuration.keyFetchesPerMinute))
        self.audience = Self.trimmingTrailingSlashes(configuration.appBaseURL)
        self.basePath = URLComponents(string: configuration.appBaseURL)?.percentEncodedPath ?? ""
    }

    /// Verifies one lifecycle callback.
    ///
    /// Cheap checks (header, algorithm, `aud`, `exp`, `qsh`, `iss` against the body) run before
    /// any key is fetched; the signature last, with the key named by `kid` and no other.
    ///
    /// - Parameters:
    ///   - authorization: the `Authorization` header value.
    ///   - method: the request method.
    ///   - uri: the request's path and query as received.
    ///   - body: reads the request body; called only once the token's own claims passed.
    /// - Throws: ``SignedInstallError``, or what `body` throws (such as a too-large body).
    public func verify(
        authorization: String?, method: String, uri: String, now: Date = Date(),
        body: () async throws -> [UInt8]
    ) async throws -> VerifiedSignedInstall {
        guard let token = Self.jwtCredential(authorization) else { throw SignedInstallError.missingToken }
        guard let jws = ConnectJWS(token) else { throw SignedInstallError.malformed }
        guard jws.algorithm == "RS256", jws.header["crit"] == nil else {
            throw SignedInstallError.algorithmNotAllowed
        }
        guard let kid = jws.header["kid"]?.connectString, Self.isUsableKeyID(kid) else {
            throw SignedInstallError.unknownKey
        }
        guard let audience = jws.audience,
            audience.contains(where: { Self.trimmingTrailingSlashes($0) == self.audience })
        else { throw SignedInstallError.wrongAudience }
        let skew = Self.seconds(self.configuration.clockSkew)
        let nowSeconds = now.timeIntervalSince1970
        guard let exp = jws.numericDate("exp"), nowSeconds < exp + skew else { throw SignedInstallError.expired }
        guard exp - nowSeconds <= Self.maximumLifetimeSeconds else { throw SignedInstallError.lifetimeTooLong }
        if jws.claims["nbf"] != nil {
            guard let nbf = jws.numericDate("nbf"), nbf <= nowSeconds + skew else { throw SignedInstallError.expired }
        }
        let expectedQSH = CanonicalRequest.qsh(method: method, url: uri, basePath: self.basePath)
        guard let qsh = jws.string("qsh"), qsh == expectedQSH else { throw SignedInstallError.qshMismatch }
        guard let issuer = jws.string("iss"), !issuer.isEmpty else { throw SignedInstallError.wrongIssuer }

        let bytes = try await body()
        guard let payload = ConnectJSON.object(bytes) else { throw SignedInstallError.invalidBody }
        guard let clientKey = payload["clientKey"]?.connectString, !clientKey.isEmpty else {
            throw SignedInstallError.invalidBody
        }
        guard issuer == clientKey else { throw SignedInstallError.wrongIssuer }

        let key = try await self.publicKey(kid: kid)
        let signature = _RSA.Signing.RSASignature(rawRepresentation: jws.signature)
        guard key.isValidSignature(signature, for: jws.signingInput, padding: .insecurePKCS1v1_5) else {
            throw SignedInstallError.badSignature
        }
        await self.keyVerified(kid: kid)
        let named: [UInt8]
        let jti = jws.string("jti").flatMap { $0.isEmpty ? nil : $0 }
        if let jti {
            named = Array(("jti\u{0}" + issuer + "\u{0}" + jti).utf8)
        } else {
            // The token as signed, not as written: the same token with `=` padding added to a part
            // (base64url is read with or without it) is the same token to the guard.
            named = Array("token\u{0}".utf8) + jws.signingInput + [0] + jws.signature
        }
        // An `iat` ahead of now (beyond the skew), after the `exp` or before 1970 orders nothing: it
        // is left out, so one odd token cannot hold back the tenant's later callbacks.
        let issuedAt = jws.numericDate("iat").flatMap {
            (0...min(exp, nowSeconds + skew)).contains($0) ? Int64($0.rounded(.down)) : nil
        }
        return VerifiedSignedInstall(
            clientKey: clientKey, payload: payload, replayDigest: Self.hex(SHA256.hash(data: named)),
            earlierReplayDigest: jti == nil ? Self.hex(SHA256.hash(data: Array(("token\u{0}" + token).utf8))) : nil,
            bodyDigest: Self.hex(SHA256.hash(data: bytes)), expiresAt: Int64(exp.rounded(.up)), issuedAt: issuedAt,
            namesOneCallback: jti != nil)
    }

    /// Longest a signed-install token may still be valid, in seconds (24 h). Atlassian's live
    /// minutes; a later `exp` is refused rather than remembered by the replay guard for as long.
    public static let maximumLifetimeSeconds: Double = 86_400

    private static func hex(_ digest: SHA256.Digest) -> String {
        digest.map { String(format: "%02x", $0) }.joined()
    }

    /// The token of `JWT <token>` (the word `JWT`, case-insensitive), or nil.
    static func jwtCredential(_ header: String?) -> String? {
        guard let header else { return nil }
        let utf8 = Array(header.utf8)
        guard utf8.count > 4, String(decoding: utf8[0..<3], as: UTF8.self).lowercased() == "jwt",
            utf8[3] == UInt8(ascii: " ")
        else { return nil }
        let token = String(decoding: utf8[4...], as: UTF8.self).trimmingCharacters(in: .whitespaces)
        return token.isEmpty ? nil : token
    }

    /// A `kid` safe to put in a URL path: 1–128 characters of letters, digits, `-`, `_` and `.`,
    /// not only dots.
    static func isUsableKeyID(_ kid: String) -> Bool {
        guard (1...128).contains(kid.utf8.count), !kid.utf8.allSatisfy({ $0 == UInt8(ascii: ".") }) else {
            return false
        }
        // The characters of a JWT: the base64url alphabet and `.`.
        return kid.utf8.allSatisfy(TokenClaims.isJWTByte)
    }

    static func trimmingTrailingSlashes(_ value: String) -> String {
        var trimmed = Substring(value)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        return String(trimmed)
    }

    static func seconds(_ duration: Duration) -> Double {
        let (seconds, attoseconds) = duration.components
        return Double(seconds) + Double(attoseconds) / 1e18
    }
}
