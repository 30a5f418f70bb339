import Base64URLCoding
import Crypto
import Foundation
import _CryptoExtras

/// How a FIT is signed.
public enum FITAlgorithm: Sendable, Hashable {
    /// RS256 with the published key (or the unpublished one, see ``FITOptions/signWithUnpublishedKey``).
    case rs256
    /// `alg: none` and an empty signature (`header.payload.`).
    case none
    /// `alg: HS256`, the HMAC key being the PEM text (`-----BEGIN PUBLIC KEY-----`, SPKI) of the
    /// published RSA public key: the classic algorithm-confusion attack.
    case hs256WithPublicKey
}

/// Every knob of a minted FIT, for attack tests. The defaults make a valid FIT.
public struct FITOptions: Sendable {
    /// Signing algorithm; default ``FITAlgorithm/rs256``.
    public var algorithm: FITAlgorithm = .rs256
    /// Header `kid`; default the published key's id. Set it to name a key the JWKS does not have.
    public var kid: String? = nil
    /// `iss`; default `forge/invocation-token`.
    public var issuer: String? = nil
    /// `aud`; default the app id.
    public var audience: String? = nil
    /// `iat`; default now.
    public var issuedAt: Date? = nil
    /// `nbf`; default `iat`.
    public var notBefore: Date? = nil
    /// `exp`; default `iat` + 25 s.
    public var expiresAt: Date? = nil
    /// `jti`; default a fresh UUID.
    public var jti: String? = nil
    /// After signing, replace `app.installationId` (and `app.installation.id`) with another
    /// installation's id, keeping the original signature.
    public var tamperPayload: Bool = false
    /// Sign RS256 with a second key the JWKS does not publish, under the published `kid`.
    public var signWithUnpublishedKey: Bool = false
    /// `app.apiBaseUrl` (and the context's); default the installation's.
    public var apiBaseUrl: String? = nil
    /// `app.module.type`; default `core:endpoint`, as on every backend invocation (a function's
    /// `invokeRemote`, a lifecycle event, a scheduled trigger, `preUninstall`).
    public var moduleType: String = ForgeEmulator.backendModuleType
    /// `app.module.key`; default ``ForgeEmulator/endpointModuleKey``.
    public var moduleKey: String = ForgeEmulator.endpointModuleKey
    /// `principal`: on UI calls the user's account id; absent by default.
    public var principal: String? = nil
    /// `context`: on UI calls the module's context; absent by default.
    public var context: FITUIContext? = nil
    /// `icLabel`: set on FITs from an Isolated Cloud (whose keys come from a JWKS of its own);
    /// absent by default.
    public var icLabel: String? = nil

    /// Options for a valid FIT.
    public init() {}

    /// A FIT as a UI module's `invokeRemote`/`requestRemote` sends it from a user's browser:
    /// `app.module.type` `moduleType`, `principal` (the user's account id) and `context`.
    public static func ui(
        moduleType: String = "xen:macro", moduleKey: String = "gateway-macro",
        principal: String = "5b10ac8d82e05b22cc7d4ef5"
    ) -> FITOptions {
        var options = FITOptions()
        options.moduleType = moduleType
        options.moduleKey = moduleKey
        options.principal = principal
        options.context = FITUIContext(moduleKey: moduleKey)
        return options
    }
}

/// The `context` claim of a FIT from a UI module (the installation's cloud id and site URL are
/// filled in when the FIT is minted).
public struct FITUIContext: Codable, Sendable, Hashable {
    public var cloudId: String?
    public var moduleKey: String
    public var siteUrl: String?
    public var localId: String

    public init(
        cloudId: String? = nil, moduleKey: String, siteUrl: String? = nil,
        localId: String = UUID().uuidString.lowercased()
    ) {
        self.cloudId = cloudId
        self.moduleKey = moduleKey
        self.siteUrl = siteUrl
        self.localId = localId
    }
}

/// The emulator's key material. Never logged or printed.
struct EmulatorKeys: Sendable, CustomStringConvertible {
    /// Signs FITs; published in the JWKS under ``keyId``.
    let signingKey: _RSA.Signing.PrivateKey
    let keyId: String
    /// Never published; for ``FITOptions/signWithUnpublishedKey``.
    let unpublishedKey: _RSA.Signing.PrivateKey
    /// Signs access tokens (HS256).
    let accessTokenKey: SymmetricKey
    /// The served JWKS document.
    let jwksDocument: Data

    init() throws {
        self.signingKey = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        self.unpublishedKey = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        self.keyId = UUID().uuidString.lowercased()
        self.accessTokenKey = SymmetricKey(size: .bits256)
        let primitives = try self.signingKey.publicKey.getKeyPrimitives()
        let jwk = JWKSDocument.Key(
            kty: "RSA",
            kid: self.keyId,
            use: "sig",
            alg: "RS256",
            n: Base64URL.encode(primitives.modulus),
            e: Base64URL.encode(primitives.publicExponent)
        )
        self.jwksDocument = try JSONEncoder.emulator.encode(JWKSDocument(keys: [jwk]))
    }

    var description: String { "EmulatorKeys(kid: \(self.keyId))" }
}

struct JWKSDocument: Codable, Sendable {
    struct Key: Codable, Sendable {
        let kty: String
        let kid: String
        let use: String
        let alg: String
        let n: String
        let e: String
    }

    let keys: [Key]
}

/// The FIT's claims (`spec/protocol.md` §2).
struct FITClaims: Codable, Sendable {
    struct App: Codable, Sendable {
        struct Environment: Codable, Sendable {
            var type: String
            var id: String
        }

        struct Module: Codable, Sendable {
            var type: String
            var key: String
        }

        struct Installation: Codable, Sendable {
            struct Context: Codable, Sendable {
                var name: String
                var apiBaseUrl: String
                var cloudId: String
            }

            var id: String
            var contexts: [Context]
        }

        var installationId: String
        var apiBaseUrl: String
        var id: String
        var appVersion: String
        var environment: Environment
        var module: Module
        var installation: Installation
    }

    var iss: String
    var aud: String
    var iat: Int
    var nbf: Int
    var exp: Int
    var jti: String
    var app: App
    /// UI calls only.
    var principal: String? = nil
    /// UI calls only.
    var context: FITUIContext? = nil
    /// Isolated Cloud only.
    var icLabel: String? = nil
}

struct AccessTokenClaims: Codable, Sendable {
    var iss: String
    var sub: String
    var aud: String
    var iat: Int
    var exp: Int
    var jti: String
    /// The installation the token is for, so tests can tell tokens of different tenants apart.
    var installationId: String
    /// Filler that brings the token to a requested size (absent unless asked for).
    var padding: String? = nil
}

struct EmulatorJWTHeader: Codable, Sendable {
    var alg: String
    var kid: String?
    var typ: String
}

extension JSONEncoder {
    /// Compact JSON with sorted keys and unescaped slashes.
    static var emulator: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }
}

extension ForgeEmulator {
    /// The version every emulated installation runs.
    static let appVersion = "1.0.0"
    /// How long a FIT lives by default.
    static let fitLifetime: TimeInterval = 25
    /// The `app.module.type` of every backend invocation.
    public static let backendModuleType = "core:endpoint"
    /// The key of the app's `endpoint` module that points at the gateway (the FIT's `app.module.key`).
    public static let endpointModuleKey = "token-gateway"

    /// The `kid` of the published FIT signing key.
    public var signingKeyId: String { self.keys.keyId }

    /// The JWKS the emulator serves at `/.well-known/jwks.json`.
    public var jwksJSON: String { String(decoding: self.keys.jwksDocument, as: UTF8.self) }

    /// Mints a Forge Invocation Token for `installation`, as Forge puts it in
    /// `authorization: Bearer …` (`spec/protocol.md` §2). `options` make defective ones.
    /// - Throws: if signing fails.
    public func mintFIT(for installation: EmulatedInstallation, options: FITOptions = FITOptions()) throws -> String {
        let issuedAt = options.issuedAt ?? Date()
        let apiBaseUrl = options.apiBaseUrl ?? installation.apiBaseUrl
        var claims = FITClaims(
            iss: options.issuer ?? "forge/invocation-token",
            aud: options.audience ?? self.configuration.appId,
            iat: Self.unixSeconds(issuedAt),
            nbf: Self.unixSeconds(options.notBefore ?? issuedAt),
            exp: Self.unixSeconds(options.expiresAt ?? issuedAt.addingTimeInterval(Self.fitLifetime)),
            jti: options.jti ?? UUID().uuidString.lowercased(),
            app: .init(
                installationId: installation.id,
                apiBaseUrl: apiBaseUrl,
                id: self.configuration.appId,
                appVersion: Self.appVersion,
                environment: .init(type: "DEVELOPMENT", id: self.environmentId),
                module: .init(type: options.moduleType, key: options.moduleKey),
                installation: .init(
                    id: installation.id,
                    contexts: [.init(name: installation.product, apiBaseUrl: apiBaseUrl, cloudId: installation.cloudId)]
                )
            ),
            principal: options.principal,
            icLabel: options.icLabel
        )
        if var context = options.context {
            context.cloudId = context.cloudId ?? installation.cloudId
            context.siteUrl = context.siteUrl ?? "https://\(installation.cloudId.prefix(8)).atlassian.net"
            claims.context = context
        }

        let algorithmName =
            switch options.algorithm {
            case .rs256: "RS256"
            case .none: "none"
            case .hs256WithPublicKey: "HS256"
            }
        let header = EmulatorJWTHeader(alg: algorithmName, kid: options.kid ?? self.keys.keyId, typ: "JWT")
        let encoder = JSONEncoder.emulator
        let encodedHeader = Base64URL.encode(try encoder.encode(header))
        var encodedPayload = Base64URL.encode(try encoder.encode(claims))
        let signingInput = encodedHeader + "." + encodedPayload

        let signature: Data
        switch options.algorithm {
        case .rs256:
            let key = options.signWithUnpublishedKey ? self.keys.unpublishedKey : self.keys.signingKey
            signature = try key.signature(for: Data(signingInput.utf8), padding: .insecurePKCS1v1_5).rawRepresentation
        case .none:
            signature = Data()
        case .hs256WithPublicKey:
            let secret = SymmetricKey(data: Data(self.keys.signingKey.publicKey.pemRepresentation.utf8))
            signature = Data(HMAC<SHA256>.authenticationCode(for: Data(signingInput.utf8), using: secret))
        }

        if options.tamperPayload {
            let otherInstallation = "ari:cloud:ecosystem::installation/" + UUID().uuidString.lowercased()
            claims.app.installationId = otherInstallation
            claims.app.installation.id = otherInstallation
            encodedPayload = Base64URL.encode(try encoder.encode(claims))
        }
        return encodedHeader + "." + encodedPayload + "." + Base64URL.encode(signature)
    }

    /// Mints an app system access token: a JWT (HS256 with a key of the emulator's) whose `exp` is
    /// `expiresAt` (default now + the configured token lifetime), unique on every call (`jti`).
    /// The gateway treats everything but `exp` as opaque. With `minimumLength`, a `padding` claim
    /// makes the token about that many bytes long (real system tokens are 1–2 KB).
    /// - Throws: if encoding fails.
    public func mintAccessToken(
        for installation: EmulatedInstallation, expiresAt: Date? = nil, minimumLength: Int = 0
    ) throws -> String {
        let now = Date()
        let expiry = expiresAt ?? now.addingTimeInterval(Self.seconds(self.configuration.tokenLifetime))
        var claims = AccessTokenClaims(
            iss: "forge-emulator",
            sub: self.configuration.appId,
            aud: "api.atlassian.com",
            iat: Self.unixSeconds(now),
            exp: Self.unixSeconds(expiry),
            jti: UUID().uuidString.lowercased(),
            installationId: installation.id
        )
        let encoder = JSONEncoder.emulator
        let encodedHeader = Base64URL.encode(try encoder.encode(EmulatorJWTHeader(alg: "HS256", kid: nil, typ: "JWT")))
        // header.payload.signature: the HS256 signature is 43 characters of base64url.
        let unpadded = encodedHeader.utf8.count + 1 + Base64URL.encode(try encoder.encode(claims)).utf8.count + 44
        if minimumLength > unpadded {
            // Each 3 bytes of JSON become 4 of base64url; `,"padding":""` adds 14 bytes of JSON.
            claims.padding = String(repeating: "x", count: max(0, (minimumLength - unpadded) * 3 / 4 - 14))
        }
        let signingInput = encodedHeader + "." + Base64URL.encode(try encoder.encode(claims))
        let mac = HMAC<SHA256>.authenticationCode(for: Data(signingInput.utf8), using: self.keys.accessTokenKey)
        return signingInput + "." + Base64URL.encode(Data(mac))
    }

    static func unixSeconds(_ date: Date) -> Int {
        Int(date.timeIntervalSince1970.rounded(.down))
    }

    static func seconds(_ duration: Duration) -> TimeInterval {
        TimeInterval(duration.components.seconds) + TimeInterval(duration.components.attoseconds) / 1e18
    }
}
