import Crypto
import Foundation

/// Why a Connect JWT was refused. ``reason`` is a bounded word (for logs and metrics);
/// ``message`` names the failed check for the caller. Neither ever contains the token or a secret.
public struct ConnectJWTError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The failed check (snake_case).
    public let reason: String
    /// One sentence naming the failed check: unknown tenant, signature, expired or qsh.
    public let message: String

    private init(_ reason: String, _ message: String) {
        self.reason = reason
        self.message = message
    }

    /// Not a compact JWS with JSON header and claims, or no tenant (`iss` / `aud[0]`) in it.
    public static let malformed = ConnectJWTError("malformed", "the JWT is malformed or names no tenant (iss or aud)")
    /// No stored tenant for the token's `clientKey`.
    public static let unknownTenant = ConnectJWTError(
        "unknown_tenant", "unknown tenant: no Connect installation for this clientKey")
    /// The tenant has uninstalled the app.
    public static let uninstalledTenant = ConnectJWTError(
        "uninstalled_tenant", "unknown tenant: the app was uninstalled for this clientKey")
    /// The header `alg` is not `HS256`.
    public static let algorithmNotAllowed = ConnectJWTError(
        "algorithm_not_allowed", "signature check failed: only HS256 is accepted")
    /// The HMAC does not verify with the tenant's stored shared secret.
    public static let badSignature = ConnectJWTError(
        "bad_signature", "signature check failed: the JWT is not signed with the tenant's current shared secret")
    /// `exp` absent or not a number.
    public static let missingExpiry = ConnectJWTError("missing_exp", "expired check failed: the JWT has no numeric exp")
    /// `exp` has passed.
    public static let expired = ConnectJWTError("expired", "expired: the JWT's exp has passed")
    /// `qsh` absent or not a string.
    public static let missingQSH = ConnectJWTError("missing_qsh", "qsh check failed: the JWT has no qsh claim")
    /// `qsh` matches neither the request's canonical hash nor `context-qsh`.
    public static let qshMismatch = ConnectJWTError(
        "qsh_mismatch", "qsh check failed: the JWT's qsh does not match this method and URL")

    public static func == (lhs: ConnectJWTError, rhs: ConnectJWTError) -> Bool { lhs.reason == rhs.reason }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.reason) }

    public var description: String { "ConnectJWTError(\(self.reason))" }
}

/// What a verified Connect JWT says.
public struct VerifiedConnectJWT: Sendable, Hashable {
    /// The tenant the token was verified for.
    public let clientKey: String
    /// `sub`, else `context.user.accountId`; nil when neither is a string.
    public let accountId: String?
    /// The `context` claim, when it is an object.
    public let context: JSONValue?
    /// `exp`, unix seconds.
    public let expiresAt: Double
    /// Whether the token carried the literal `context-qsh`.
    public let isContextQSH: Bool
}

/// Atlassian Connect's HS256 JWTs (protocol.md §3): the product's inbound ones, verified with the
/// tenant's shared secret, and the app's outbound ones, signed with it.
public enum ConnectJWT {
    /// The literal `qsh` of context JWTs (`apiMigrations.context-qsh`).
    public static let contextQSH = "context-qsh"
    /// Tolerance for `exp`: 5 s, enough for whole-second rounding and a synchronised clock's
    /// drift; an `exp` further in the past is expired.
    public static let defaultClockSkew: TimeInterval = 5
    /// Longest lifetime ``sign(appKey:method:url:basePath:secret:now:lifetime:)`` hands out.
    public static let maximumLifetime: TimeInterval = 15 * 60

    /// The tenant a token names, read without verifying anything: the first `aud` entry when
    /// `aud` is present (session tokens), else `iss`. Only picks the secret to verify with.
    ///
    /// - Throws: ``ConnectJWTError/malformed``.
    public static func unverifiedTenant(of token: String) throws(ConnectJWTError) -> String {
        guard let jws = ConnectJWS(token) else { throw .malformed }
        return try self.tenant(of: jws)
    }

    static func tenant(of jws: ConnectJWS) throws(ConnectJWTError) -> String {
        let tenant: String?
        if let audience = jws.audience {
            tenant = audience.first
        } else {
            tenant = jws.string("iss")
        }
        guard let tenant, !tenant.isEmpty else { throw .malformed }
        return tenant
    }

    /// Verifies `token` for the request `method url`: HS256 with `secret`, then `exp`, then `qsh`
    /// (the canonical request's hash, with `basePath` removed from the path, or `context-qsh`).
    ///
    /// - Parameters:
    ///   - clientKey: the tenant whose `secret` this is; must be the tenant the token names.
    ///   - basePath: the path of the app's base URL, removed from the start of `url`'s path.
    /// - Throws: ``ConnectJWTError``.
    public static func verify(
        _ token: String, clientKey: String, secret: [UInt8], method: String, url: String, basePath: String = "",
        now: Date = Date(), clockSkew: TimeInterval = ConnectJWT.defaultClockSkew
    ) throws(ConnectJWTError) -> VerifiedConnectJWT {
        guard let jws = ConnectJWS(token) else { throw .malformed }
        guard try self.tenant(of: jws) == clientKey else { throw .unknownTenant }
        guard jws.algorithm == "HS256", jws.header["crit"] == nil else { throw .algorithmNotAllowed }
        guard
            HMAC<SHA256>.isValidAuthenticationCode(
                jws.signature, authenticating: jws.signingInput, using: SymmetricKey(data: secret))
        else { throw .badSignature }
        guard let exp = jws.numericDate("exp") else { throw .missingExpiry }
        guard now.timeIntervalSince1970 < exp + clockSkew else { throw .expired }
        guard let qsh = jws.string("qsh") else { throw .missingQSH }
        let isContextQSH = qsh == Self.contextQSH
        if !isContextQSH {
            let expected = CanonicalRequest.qsh(method: method, url: url, basePath: basePath)
            guard ConstantTime.equal(Array(qsh.utf8), Array(expected.utf8)) else { throw .qshMismatch }
        }
        let context = jws.claims["context"].flatMap { value -> JSONValue? in
            if case .object = value { return value }
            return nil
        }
        let accountId =
            jws.string("sub")
            ?? context?.connectObject?["user"]?.connectObject?["accountId"]?.connectString
        return VerifiedConnectJWT(
            clientKey: clientKey, accountId: accountId, context: context, expiresAt: exp, isContextQSH: isContextQSH)
    }

    /// A JWT for the app's own call `method url` to a tenant's product: HS256 with `secret`,
    /// `iss` = `appKey`, `iat` = now, `exp` = now + `lifetime` (capped at 15 minutes), and the
    /// `qsh` of the canonical request with `basePath` (the tenant's context path) removed.
    ///
    /// - Returns: the token and its `exp` (unix seconds).
    public static func sign(
        appKey: String, method: String, url: String, basePath: String, secret: [UInt8], now: Date = Date(),
        lifetime: TimeInterval = 180
    ) -> (token: String, expiresAt: Int64) {
        let iat = Int64(now.timeIntervalSince1970.rounded(.down))
        let exp = iat + Int64(min(max(lifetime, 1), Self.maximumLifetime))
        let claims = JSONValue.object([
            ("iss", .string(appKey)), ("iat", .int(iat)), ("exp", .int(exp)),
            ("qsh", .string(CanonicalRequest.qsh(method: method, url: url, basePath: basePath))),
        ])
        return (self.signHS256(claims: claims, secret: secret), exp)
    }

    /// `header.claims.signature` with header `{"alg":"HS256","typ":"JWT"}`.
    static func signHS256(claims: JSONValue, secret: [UInt8]) -> String {
        let header = Base64URL.encode(Array(#"{"alg":"HS256","typ":"JWT"}"#.utf8))
        let input = header + "." + Base64URL.encode(Array(claims.serialized().utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
        return input + "." + Base64URL.encode(Array(mac))
    }
}
