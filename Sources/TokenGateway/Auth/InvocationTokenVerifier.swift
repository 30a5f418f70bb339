import AsyncHTTPClient
import Foundation
import JWTKit
import Logging
import Synchronization

/// What a verified Forge Invocation Token (FIT) says about the call.
public struct InvocationContext: Sendable, Hashable {
    /// `app.installationId`: the installation ARI, the gateway's storage key.
    public let installationId: String
    /// `app.id`, or the audience the token was verified for when `app.id` is absent.
    public let appId: String
    /// `app.apiBaseUrl`: where the installation's tokens are used.
    public let apiBaseUrl: String?
    /// `app.installation.contexts[0].cloudId`, else the last segment of an
    /// `…/ex/<product>/<cloudId>` ``apiBaseUrl``.
    public let cloudId: String?
    /// `app.environment.type`.
    public let environmentType: String?
    /// `app.environment.id`.
    public let environmentId: String?
    /// The token's unique id.
    public let jti: String
    /// The token's `exp`.
    public let expiresAt: Date
    /// The last instant at which the token is still accepted: `exp` plus the clock skew. Its
    /// `jti` has to be remembered until then (the gateway does it when the call changes state).
    public let acceptedUntil: Date
    /// `principal` (the user's account id, on UI calls only).
    public let principal: String?
    /// `app.module.type`: `core:endpoint` for every backend invocation (a function's
    /// `invokeRemote`, a lifecycle event, a scheduled trigger, `preUninstall`), a UI module's type
    /// (for example `xen:macro`) for calls from a user's browser.
    public let moduleType: String?
    /// `app.module.key`: the manifest key of the module that made the call.
    public let moduleKey: String?
    /// Whether the token carries a `principal` claim (of any JSON type but `null`).
    public let hasPrincipal: Bool
    /// Whether the token carries a `context` claim (UI calls only).
    public let hasContext: Bool
    /// `app.installation.contexts[].name` (for example `jira` or `confluence`), in order.
    public let contextNames: [String]

    public init(
        installationId: String,
        appId: String,
        apiBaseUrl: String?,
        cloudId: String?,
        environmentType: String?,
        environmentId: String?,
        jti: String,
        expiresAt: Date,
        acceptedUntil: Date? = nil,
        principal: String?,
        moduleType: String? = nil,
        moduleKey: String? = nil,
        hasPrincipal: Bool? = nil,
        hasContext: Bool = false,
        contextNames: [String] = []
    ) {
        self.installationId = installationId
        self.appId = appId
        self.apiBaseUrl = apiBaseUrl
        self.cloudId = cloudId
        self.environmentType = environmentType
        self.environmentId = environmentId
        self.jti = jti
        self.expiresAt = expiresAt
        self.acceptedUntil = acceptedUntil ?? expiresAt
        self.principal = principal
        self.moduleType = moduleType
        self.moduleKey = moduleKey
        self.hasPrincipal = hasPrincipal ?? (principal != nil)
        self.hasContext = hasContext
        self.contextNames = contextNames
    }

    /// Whether the call comes from the app's backend: `app.module.type` is `core:endpoint` and no
    /// `context` claim; without a `principal` claim unless `allowingPrincipal`.
    public func isBackendInvocation(allowingPrincipal: Bool) -> Bool {
        self.moduleType == InvocationTokenVerifier.backendModuleType && !self.hasContext
            && (allowingPrincipal || !self.hasPrincipal)
    }
}

/// Which FITs a route accepts (contract §3 v1.1).
public struct InvocationPolicy: Sendable, Hashable {
    /// Only FITs from the app's backend (`core:endpoint`, no `context`); with the module-key
    /// allow-list applied.
    public var backendOnly: Bool
    /// Whether a `principal` claim is accepted (`preUninstall` runs with a non-user principal).
    public var allowsPrincipal: Bool

    public init(backendOnly: Bool, allowsPrincipal: Bool) {
        self.backendOnly = backendOnly
        self.allowsPrincipal = allowsPrincipal
    }

    /// Any valid FIT (no kind check).
    public static let any = InvocationPolicy(backendOnly: false, allowsPrincipal: true)
    /// Backend invocations without a principal: every Forge route but `/forge/pre-uninstall`.
    public static let backend = InvocationPolicy(backendOnly: true, allowsPrincipal: false)
    /// Backend invocations that may name a (non-user) principal: `/forge/pre-uninstall`.
    public static let backendAllowingPrincipal = InvocationPolicy(backendOnly: true, allowsPrincipal: true)
}

/// Why a FIT was refused. ``reason`` is a bounded word, usable as the metric label `outcome`;
/// the description never contains the token.
public struct InvocationTokenError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The reason code (snake_case).
    public let reason: String
    /// A secret-free detail for logs (for example which claim was missing); not part of equality.
    public let detail: String?

    private init(_ reason: String, detail: String? = nil) {
        self.reason = reason
        self.detail = detail
    }

    /// Not a compact JWS with a JSON header and payload, or a claim of the wrong type.
    public static let malformed = InvocationTokenError("malformed")
    /// The header `alg` is not exactly `RS256`.
    public static let algorithmNotAllowed = InvocationTokenError("algorithm_not_allowed")
    /// No `kid`, or the JWKS has no usable key with that `kid`.
    public static let unknownKey = InvocationTokenError("unknown_key")
    /// The signature does not verify with the named key.
    public static let badSignature = InvocationTokenError("bad_signature")
    /// `iss` is not `forge/invocation-token`.
    public static let wrongIssuer = InvocationTokenError("wrong_issuer")
    /// `aud` does not name the configured app id.
    public static let wrongAudience = InvocationTokenError("wrong_audience")
    /// `exp` passed more than the allowed clock skew ago.
    public static let expired = InvocationTokenError("expired")
    /// `nbf` is later than now plus the allowed clock skew.
    public static let notYetValid = InvocationTokenError("not_yet_valid")
    /// `iat` is later than now plus the allowed clock skew.
    public static let issuedInFuture = InvocationTokenError("issued_in_future")
    /// A required claim (`iss`, `aud`, `exp`, `nbf`, `iat`, `jti`, `app.installationId`) is absent.
    public static let missingClaim = InvocationTokenError("missing_claim")
    /// The `jti` was used before within the token's lifetime (found when the call claims it).
    public static let replayed = InvocationTokenError("replayed")
    /// The JWKS could not be fetched and no cached key applies.
    public static let jwksUnavailable = InvocationTokenError("jwks_unavailable")
    /// The store could not be reached to claim the `jti`.
    public static let storeUnavailable = InvocationTokenError("store_unavailable")
    /// An `icLabel` claim: a FIT from an Isolated Cloud, whose keys come from a JWKS of its own.
    /// Not supported yet, so such FITs are refused (fail closed).
    public static let isolatedCloud = InvocationTokenError("isolated_cloud")
    /// A valid FIT that does not come from the app's backend (a UI module's type, a `context` or
    /// a `principal` claim): the route refuses it with 403.
    public static let notBackend = InvocationTokenError("not_backend")
    /// A valid backend FIT whose `app.module.key` is not in the configured allow-list: 403.
    public static let moduleKeyNotAllowed = InvocationTokenError("module_key_not_allowed")

    /// Whether the token was valid but may not make this call (403 rather than 401).
    public var isForbidden: Bool { self == .notBackend || self == .moduleKeyNotAllowed }

    static func notBackend(_ detail: String) -> InvocationTokenError {
        InvocationTokenError("not_backend", detail: detail)
    }

    static func moduleKeyNotAllowed(_ detail: String) -> InvocationTokenError {
        InvocationTokenError("module_key_not_allowed", detail: detail)
    }

    static func missingClaim(_ name: String) -> InvocationTokenError {
        InvocationTokenError("missing_claim", detail: "missing claim \(name)")
    }

    static func malformed(_ detail: String) -> InvocationTokenError {
        InvocationTokenError("malformed", detail: detail)
    }

    public static func == (lhs: InvocationTokenError, rhs: InvocationTokenError) -> Bool { lhs.reason == rhs.reason }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.reason) }

    public var description: String {
        if let detail { return "InvocationTokenError(\(self.reason): \(detail))" }
        return "InvocationTokenError(\(self.reason))"
    }
}

/// Verifies Forge Invocation Tokens (contract §3, protocol.md §2).
///
/// RS256 only: the header `alg` must be exactly `RS256` before any key is looked up. The key is
/// the JWKS entry whose `kid` the header names (RSA, ≥ 2048 bits, `alg` absent or `RS256`); no
/// other key is ever tried, and a `kid` missing from the cached JWKS refetches it at most once per
/// ``Configuration/jwksRefreshInterval``. Then `iss`, `aud`, `exp`/`nbf`/`iat` (within
/// ``Configuration/clockSkew``), `jti` and `app.installationId` are checked.
///
/// The verifier records nothing: a token is accepted once only because the call that changes
/// state claims its `jti` (``InvocationContext/jti``, until ``InvocationContext/acceptedUntil``)
/// in the same step as its change, after its body was checked, so a refused call uses nothing up.
public final class InvocationTokenVerifier: Sendable {
    /// Forge's production JWKS.
    public static let productionJWKSURL = "https://forge.cdn.prod.atlassian-dev.net/.well-known/jwks.json"
    /// Forge's staging JWKS.
    public static let stagingJWKSURL = "https://forge.cdn.stg.atlassian-dev.net/.well-known/jwks.json"
    /// The only accepted `iss`.
    public static let issuer = "forge/invocation-token"
    /// The `app.module.type` of every backend invocation.
    public static let backendModuleType = "core:endpoint"

    public struct Configuration: Sendable {
        /// The expected `aud` (`ari:cloud:ecosystem::app/<uuid>`).
        public var appId: String
        /// The JWKS to verify with. Default: Forge production.
        public var jwksURL: String
        /// Not trusted: a token whose (unverified) `app.apiBaseUrl` looks like Atlassian staging and
        /// would select this JWKS is refused (`unknownKey`). Only ``jwksURL`` is trusted; a staging
        /// app sets it to ``InvocationTokenVerifier/stagingJWKSURL``.
        public var stagingJWKSURL: String?
        /// Tolerance for `exp`, `nbf` and `iat`. Default 60 s.
        public var clockSkew: Duration = .seconds(60)
        /// An unknown `kid` refetches the JWKS at most once per this interval. Default 30 s.
        public var jwksRefreshInterval: Duration = .seconds(30)
        /// How long a fetched JWKS is used before it is fetched again. Its keys keep verifying while
        /// the refetch runs (a token naming another `kid` waits for it). Default 1 h.
        public var jwksCacheLifetime: Duration = .seconds(3600)
        /// After a failed fetch, the next one waits at least this long (requests meanwhile use the
        /// cached keys or fail with `jwks_unavailable`). Default 1 s.
        public var jwksFailureRetryInterval: Duration = .seconds(1)
        /// While the JWKS cannot be fetched, keys from the last successful fetch stay usable for
        /// this long after it. Default 24 h.
        public var jwksStaleIfErrorLifetime: Duration = .seconds(86_400)
        /// Timeout of one JWKS fetch (connect, head and body). Default 5 s.
        public var jwksFetchTimeout: Duration = .seconds(5)
        /// With a backend-only ``InvocationPolicy``, the `app.module.key` values accepted; nil
        /// accepts any key. Default nil.
        public var allowedModuleKeys: Set<String>? = nil

        public init(
            appId: String,
            jwksURL: String = InvocationTokenVerifier.productionJWKSURL,
            stagingJWKSURL: String? = nil,
            clockSkew: Duration = .seconds(60),
            jwksRefreshInterval: Duration = .seconds(30),
            jwksCacheLifetime: Duration = .seconds(3600)
        ) {
            self.appId = appId
            self.jwksURL = jwksURL
            self.stagingJWKSURL = stagingJWKSURL
            self.clockSkew = clockSkew
            self.jwksRefreshInterval = jwksRefreshInterval
            self.jwksCacheLifetime = jwksCacheLifetime
        }
    }

    /// Largest accepted token, in bytes (FITs are a few KB; headers are bounded anyway).
    static let maximumTokenLength = 32 * 1024
    /// Longest accepted `jti` (it becomes a store key).
    static let maximumJTILength = 256

    let configuration: Configuration
    let keySource: KeySource
    let logger: Logger
    /// Per-JWKS-URL key cache (see `InvocationTokenVerifier+JWKS.swift`).
    let keyCache: Mutex<[String: KeyCacheEntry]>

    /// A verifier that fetches the JWKS with `httpClient` (5 s timeout; concurrent fetches coalesce).
    public init(
        configuration: Configuration,
        httpClient: HTTPClient,
        logger: Logger
    ) {
        self.configuration = configuration
        self.keySource = .remote(httpClient)
        self.logger = logger
        self.keyCache = Mutex([:])
    }

    /// A verifier with a fixed key set given as JWKS JSON (no HTTP); for tests and offline use.
    ///
    /// - Throws: ``InvocationTokenError/jwksUnavailable`` when `jwksJSON` is not a JWKS.
    public init(
        configuration: Configuration,
        jwksJSON: String,
        logger: Logger
    ) throws {
        self.configuration = configuration
        self.keySource = .fixed(try Self.parseJWKS(Data(jwksJSON.utf8), logger: logger))
        self.logger = logger
        self.keyCache = Mutex([:])
    }

    /// Verifies `token` (the bearer value, without `Bearer `) at time `now`.
    ///
    /// `policy` says which kinds of FIT are accepted; a valid FIT of another kind throws
    /// ``InvocationTokenError/notBackend`` or ``InvocationTokenError/moduleKeyNotAllowed``.
    ///
    /// - Returns: the claims the gateway uses.
    /// - Throws: ``InvocationTokenError``. Nothing is recorded either way.
    public func verify(_ token: String, now: Date = Date(), policy: InvocationPolicy = .any) async throws
        -> InvocationContext
    {
        do {
            return try await self.verifyChecked(token, now: now, policy: policy)
        } catch {
            self.logger.debug(
                "Forge invocation token refused",
                metadata: ["fit.outcome": "\(error.reason)", "fit.detail": "\(error.detail ?? "")"]
            )
            throw error
        }
    }

    private func verifyChecked(_ token: String, now: Date, policy: InvocationPolicy) async throws(InvocationTokenError)
        -> InvocationContext
    {
        // 1–3. Structure, algorithm and which JWKS, before any key lookup.
        let (kid, unverified) = try Self.parseUnverified(token)
        // An Isolated Cloud's FIT is signed by a key of that cloud's own JWKS, which is not
        // supported: refused before any key lookup, so it neither reads as an unknown key nor
        // refetches the JWKS. (Refusing on a claim not yet verified can only refuse.)
        guard !unverified.hasICLabel else { throw .isolatedCloud }
        let jwksURL = self.jwksURL(forUnverifiedAPIBaseURL: unverified.app?.apiBaseUrl)

        // 4. Claims, checked before the (costly) key lookup and signature: refusing on claims not
        // yet verified can only refuse (401, as a bad signature is), and a forged token with a
        // wrong `aud` or an expiry past costs no RSA verification.
        let claims = unverified
        let checked = try self.checkClaims(claims, now: now)

        // 5. The key named by kid, and only that key.
        let publicKey = try await self.publicKey(kid: kid, jwksURL: jwksURL)

        // 6. Signature (jwt-kit, with a collection holding exactly this key), over the exact header
        // and payload bytes the claims were decoded from in step 3: once it holds, those claims are
        // the verified ones, and jwt-kit need not decode them a second time (``SignedPayload``).
        do {
            let collection = JWTKeyCollection()
            await collection.add(rsa: publicKey, digestAlgorithm: .sha256, kid: JWKIdentifier(string: kid))
            _ = try await collection.verify(token, as: SignedPayload.self)
        } catch let error as JWTError where error.errorType == .signatureVerificationFailed {
            throw .badSignature
        } catch {
            throw .malformed("token rejected by the JWT parser")
        }

        // 7. The caller's kind, only now: its refusal is a 403 that tells what the route accepts,
        // which a token nobody signed must not learn.
        try self.checkKind(claims, policy: policy)

        return self.context(
            claims, installationId: checked.installationId, jti: checked.jti,
            expiresAt: Date(timeIntervalSince1970: checked.exp),
            acceptedUntil: Date(timeIntervalSince1970: checked.exp + checked.skew))
    }

    /// 1. Structure: three base64url parts, JSON header and payload. 2. The algorithm and the key
    /// id. 3. The claims as sent, decoded once: unverified, they only choose the JWKS; once step 6
    /// has verified the signature over these bytes, they are the verified claims.
    private static func parseUnverified(_ token: String) throws(InvocationTokenError)
        -> (kid: String, claims: FITClaims)
    {
        let bytes = Array(token.utf8)
        guard !bytes.isEmpty, bytes.count <= Self.maximumTokenLength else {
            throw .malformed("token empty or too long")
        }
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3,
            let headerBytes = Base64URL.decode(utf8: Array(parts[0])),
            let payloadBytes = Base64URL.decode(utf8: Array(parts[1])),
            Base64URL.decode(utf8: Array(parts[2])) != nil
        else { throw .malformed("not a compact JWS") }
        let header: Header
        do {
            header = try JSONDecoder().decode(Header.self, from: Data(headerBytes))
        } catch {
            throw .malformed("header is not a JSON object")
        }

        guard header.alg == "RS256" else { throw .algorithmNotAllowed }
        guard header.crit == nil else { throw .malformed("critical header extensions are not supported") }
        guard let kid = header.kid, !kid.isEmpty else { throw .unknownKey }

        do {
            return (kid, try JSONDecoder().decode(FITClaims.self, from: Data(payloadBytes)))
        } catch {
            throw .malformed("payload is not a valid claims object")
        }
    }

    /// 6. The required claims, issuer, audience and times (with the configured clock skew).
    private func checkClaims(_ claims: FITClaims, now: Date) throws(InvocationTokenError)
        -> (jti: String, exp: Double, skew: Double, installationId: String)
    {
        guard let iss = claims.iss else { throw .missingClaim("iss") }
        guard let aud = claims.aud else { throw .missingClaim("aud") }
        guard let exp = claims.exp else { throw .missingClaim("exp") }
        guard let nbf = claims.nbf else { throw .missingClaim("nbf") }
        guard let iat = claims.iat else { throw .missingClaim("iat") }
        guard let jti = claims.jti, !jti.isEmpty else { throw .missingClaim("jti") }
        guard let installationId = claims.app?.installationId, !installationId.isEmpty else {
            throw .missingClaim("app.installationId")
        }
        guard jti.utf8.count <= Self.maximumJTILength else { throw .malformed("jti too long") }
        guard iss == Self.issuer else { throw .wrongIssuer }
        guard aud.values.contains(self.configuration.appId) else { throw .wrongAudience }

        let skew = Self.seconds(self.configuration.clockSkew)
        let nowSeconds = now.timeIntervalSince1970
        guard nowSeconds < exp + skew else { throw .expired }
        guard nbf <= nowSeconds + skew else { throw .notYetValid }
        guard iat <= nowSeconds + skew else { throw .issuedInFuture }
        return (jti, exp, skew, installationId)
    }

    /// 7. Kind: a valid FIT from a user's browser may not act for the app.
    private func checkKind(_ claims: FITClaims, policy: InvocationPolicy) throws(InvocationTokenError) {
        guard policy.backendOnly else { return }
        let moduleType = claims.app?.module?.type
        guard moduleType == Self.backendModuleType else {
            throw .notBackend("app.module.type is \(moduleType.map { String($0.prefix(64)) } ?? "absent")")
        }
        guard !claims.hasContext else { throw .notBackend("context claim present") }
        guard policy.allowsPrincipal || !claims.hasPrincipal else { throw .notBackend("principal claim present") }
        if let allowed = self.configuration.allowedModuleKeys {
            guard let key = claims.app?.module?.key, allowed.contains(key) else {
                throw .moduleKeyNotAllowed(
                    "app.module.key is \(claims.app?.module?.key.map { String($0.prefix(64)) } ?? "absent")")
            }
        }
    }

    /// What a verified token says about its invocation.
    private func context(
        _ claims: FITClaims, installationId: String, jti: String, expiresAt: Date, acceptedUntil: Date
    ) -> InvocationContext {
        let app = claims.app
        let apiBaseUrl = app?.apiBaseUrl
        let cloudId =
            app?.installation?.contexts?.first?.cloudId.flatMap { $0.isEmpty ? nil : $0 }
            ?? apiBaseUrl.flatMap(Self.cloudId(fromAPIBaseURL:))
        return InvocationContext(
            installationId: installationId,
            appId: app?.id.flatMap { $0.isEmpty ? nil : $0 } ?? self.configuration.appId,
            apiBaseUrl: apiBaseUrl,
            cloudId: cloudId,
            environmentType: app?.environment?.type,
            environmentId: app?.environment?.id,
            jti: jti,
            expiresAt: expiresAt,
            acceptedUntil: acceptedUntil,
            principal: claims.principal,
            moduleType: app?.module?.type,
            moduleKey: app?.module?.key,
            hasPrincipal: claims.hasPrincipal,
            hasContext: claims.hasContext,
            contextNames: app?.installation?.contexts?.compactMap(\.name) ?? []
        )
    }

    func jwksURL(forUnverifiedAPIBaseURL apiBaseUrl: String?) -> String {
        guard let staging = self.configuration.stagingJWKSURL,
            let apiBaseUrl,
            let host = URLComponents(string: apiBaseUrl)?.host?.lowercased(),
            host.contains(".stg.") || host.contains("stg.atlassian")
        else { return self.configuration.jwksURL }
        return staging
    }

    /// The cloud id of an `…/ex/<product>/<cloudId>` API base URL.
    static func cloudId(fromAPIBaseURL apiBaseUrl: String) -> String? {
        guard let path = URLComponents(string: apiBaseUrl)?.path else { return nil }
        let segments = path.split(separator: "/")
        guard segments.count >= 3, segments[segments.count - 3] == "ex" else { return nil }
        return String(segments[segments.count - 1])
    }

    static func seconds(_ duration: Duration) -> Double {
        let (seconds, attoseconds) = duration.components
        return Double(seconds) + Double(attoseconds) / 1e18
    }
}

// MARK: - Token shapes

extension InvocationTokenVerifier {
    struct Header: Decodable {
        var alg: String?
        var kid: String?
        /// Present only to refuse tokens that demand extensions this verifier does not implement.
        var crit: [String]?

        private enum CodingKeys: String, CodingKey { case alg, kid, crit }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            // A non-string `alg` is simply not "RS256"; a non-string `kid` names no key.
            self.alg = try? container.decodeIfPresent(String.self, forKey: .alg)
            self.kid = try? container.decodeIfPresent(String.self, forKey: .kid)
            // Any `crit` value, well-formed or not, leads to refusal.
            self.crit = container.contains(.crit) ? ((try? container.decode([String].self, forKey: .crit)) ?? []) : nil
        }
    }

    /// The payload type jwt-kit verifies the signature for: it reads nothing, since the verifier has
    /// decoded the claims (``FITClaims``) from the same bytes before.
    struct SignedPayload: JWTPayload {
        init(from decoder: any Decoder) throws {}
        func encode(to encoder: any Encoder) throws {}
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    /// `aud`: one string or an array of strings.
    struct Audience: Codable, Sendable {
        var values: [String]

        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let single = try? container.decode(String.self) {
                self.values = [single]
            } else {
                self.values = try container.decode([String].self)
            }
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            if self.values.count == 1 {
                try container.encode(self.values[0])
            } else {
                try container.encode(self.values)
            }
        }
    }

    /// The FIT claims the gateway reads. Required claims must have the right JSON type (else the
    /// token is malformed); informational ones are read leniently.
    struct FITClaims: JWTPayload {
        var iss: String?
        var aud: Audience?
        var exp: Double?
        var nbf: Double?
        var iat: Double?
        var jti: String?
        var app: App?
        var principal: String?
        /// A `principal` claim of any JSON type but `null` is present.
        var hasPrincipal = false
        /// A `context` claim of any JSON type but `null` is present.
        var hasContext = false
        /// An `icLabel` claim of any JSON type but `null` is present (an Isolated Cloud's FIT).
        var hasICLabel = false

        struct App: Codable, Sendable {
            var id: String?
            var installationId: String?
            var apiBaseUrl: String?
            var environment: Environment?
            var installation: Installation?
            var module: Module?

            private enum CodingKeys: String, CodingKey {
                case id, installationId, apiBaseUrl, environment, installation, module
            }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                self.installationId = try container.decodeIfPresent(String.self, forKey: .installationId)
                self.id = try? container.decodeIfPresent(String.self, forKey: .id)
                self.apiBaseUrl = try? container.decodeIfPresent(String.self, forKey: .apiBaseUrl)
                self.environment = try? container.decodeIfPresent(Environment.self, forKey: .environment)
                self.installation = try? container.decodeIfPresent(Installation.self, forKey: .installation)
                self.module = try? container.decodeIfPresent(Module.self, forKey: .module)
            }
        }

        /// `app.module`: `type` and `key`, read leniently (a wrong type reads as absent, which a
        /// backend-only route refuses).
        struct Module: Codable, Sendable {
            var type: String?
            var key: String?

            private enum CodingKeys: String, CodingKey { case type, key }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                self.type = try? container.decodeIfPresent(String.self, forKey: .type)
                self.key = try? container.decodeIfPresent(String.self, forKey: .key)
            }
        }

        struct Environment: Codable, Sendable {
            var type: String?
            var id: String?

            private enum CodingKeys: String, CodingKey { case type, id }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                self.type = try? container.decodeIfPresent(String.self, forKey: .type)
                self.id = try? container.decodeIfPresent(String.self, forKey: .id)
            }
        }

        struct Installation: Codable, Sendable {
            var contexts: [Context]?

            private enum CodingKeys: String, CodingKey { case contexts }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                self.contexts = try? container.decodeIfPresent([Context].self, forKey: .contexts)
            }
        }

        /// One `app.installation.contexts[]` entry: `name` (Forge documents it as required),
        /// `apiBaseUrl`, and `cloudId` (Jira, Confluence) or `workspaceId` (Bitbucket). Read
        /// leniently: a missing or mistyped field reads as absent.
        struct Context: Codable, Sendable {
            var name: String?
            var apiBaseUrl: String?
            var cloudId: String?
            var workspaceId: String?

            private enum CodingKeys: String, CodingKey { case name, apiBaseUrl, cloudId, workspaceId }

            init(from decoder: any Decoder) throws {
                let container = try decoder.container(keyedBy: CodingKeys.self)
                self.name = try? container.decodeIfPresent(String.self, forKey: .name)
                self.apiBaseUrl = try? container.decodeIfPresent(String.self, forKey: .apiBaseUrl)
                self.cloudId = try? container.decodeIfPresent(String.self, forKey: .cloudId)
                self.workspaceId = try? container.decodeIfPresent(String.self, forKey: .workspaceId)
            }
        }

        private enum CodingKeys: String, CodingKey { case iss, aud, exp, nbf, iat, jti, app, principal }
        /// Claims only checked for presence.
        private enum PresenceKeys: String, CodingKey { case principal, context, icLabel }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            self.iss = try container.decodeIfPresent(String.self, forKey: .iss)
            self.aud = try container.decodeIfPresent(Audience.self, forKey: .aud)
            self.exp = try container.decodeIfPresent(Double.self, forKey: .exp)
            self.nbf = try container.decodeIfPresent(Double.self, forKey: .nbf)
            self.iat = try container.decodeIfPresent(Double.self, forKey: .iat)
            self.jti = try container.decodeIfPresent(String.self, forKey: .jti)
            self.app = try container.decodeIfPresent(App.self, forKey: .app)
            self.principal = try? container.decodeIfPresent(String.self, forKey: .principal)
            let presence = try decoder.container(keyedBy: PresenceKeys.self)
            self.hasPrincipal =
                presence.contains(.principal) && !((try? presence.decodeNil(forKey: .principal)) ?? false)
            self.hasContext = presence.contains(.context) && !((try? presence.decodeNil(forKey: .context)) ?? false)
            self.hasICLabel = presence.contains(.icLabel) && !((try? presence.decodeNil(forKey: .icLabel)) ?? false)
        }

        /// Claims are checked by ``InvocationTokenVerifier`` against an explicit clock.
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }
}
