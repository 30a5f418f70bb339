import Base64URLCoding
import Crypto
import Foundation
import JWTKit
import Logging
import Testing
import _CryptoExtras

@testable import ForgeEmulator

/// The FIT claims as a gateway would read them.
private struct FITTestClaims: JWTPayload {
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

    var iss: IssuerClaim
    var aud: AudienceClaim
    var iat: IssuedAtClaim
    var nbf: NotBeforeClaim
    var exp: ExpirationClaim
    var jti: IDClaim
    var app: App
    var principal: String?
    var context: FITUIContext?

    func verify(using _: some JWTAlgorithm) async throws {
        try self.exp.verifyNotExpired()
        try self.nbf.verifyNotBefore()
    }
}

private struct AccessTokenTestClaims: Codable {
    var exp: Int
    var iat: Int
    var jti: String
}

/// Decodes one base64url JWT segment as JSON.
private func jwtSegment<T: Decodable>(_ token: String, _ index: Int, as _: T.Type) throws -> T {
    let segments = token.split(separator: ".", omittingEmptySubsequences: false)
    let data = Data(try #require(Base64URL.decode(segments[index])))
    return try JSONDecoder().decode(T.self, from: data)
}

private struct HeaderFields: Codable {
    var alg: String
    var kid: String?
    var typ: String?
}

@Suite struct ForgeEmulatorTokensTests {
    let emulator: ForgeEmulator
    let installation: EmulatedInstallation
    let appId = "ari:cloud:ecosystem::app/11111111-2222-4333-8444-555555555555"

    init() throws {
        self.emulator = try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(appId: self.appId, gatewayURL: "http://127.0.0.1:1"),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        self.installation = self.emulator.makeInstallation()
    }

    private func verifier() async throws -> JWTKeyCollection {
        try await JWTKeyCollection().add(jwksJSON: self.emulator.jwksJSON)
    }

    @Test func installationValuesFollowForgeShapes() {
        #expect(self.installation.id.hasPrefix("ari:cloud:ecosystem::installation/"))
        #expect(UUID(uuidString: self.installation.uuid) != nil)
        #expect(self.installation.product == "jira")
        #expect(self.installation.apiBaseUrl == "https://api.atlassian.com/ex/jira/\(self.installation.cloudId)")
        #expect(self.installation.siteARI == "ari:cloud:jira::site/\(self.installation.cloudId)")
        #expect(self.installation.triggerPath.hasPrefix("/x1/"))
        #expect(self.installation.triggerPath.count > 10)
        let other = self.emulator.makeInstallation(product: "confluence")
        #expect(other.id != self.installation.id && other.triggerPath != self.installation.triggerPath)
        #expect(other.apiBaseUrl.hasPrefix("https://api.atlassian.com/ex/confluence/"))
        #expect(self.emulator.installation(withId: self.installation.uuid) == self.installation)
        #expect(self.emulator.installation(withId: self.installation.id) == self.installation)
    }

    @Test func jwksPublishesOneRS256SigningKey() throws {
        let object = try #require(
            try JSONSerialization.jsonObject(with: Data(self.emulator.jwksJSON.utf8)) as? [String: Any])
        let keys = try #require(object["keys"] as? [[String: Any]])
        #expect(keys.count == 1)
        #expect(keys[0]["kty"] as? String == "RSA")
        #expect(keys[0]["alg"] as? String == "RS256")
        #expect(keys[0]["use"] as? String == "sig")
        #expect(keys[0]["kid"] as? String == self.emulator.signingKeyId)
        #expect(keys[0]["e"] as? String == "AQAB")
        let encodedModulus = try #require(keys[0]["n"] as? String)
        let modulus = try #require(Base64URL.decode(encodedModulus))
        #expect(modulus.count == 256)
        #expect(!self.emulator.jwksJSON.contains("\"d\""))
    }

    @Test func defaultFITVerifiesAgainstTheServedJWKSWithForgeClaims() async throws {
        let before = Date()
        let fit = try self.emulator.mintFIT(for: self.installation)
        let header = try jwtSegment(fit, 0, as: HeaderFields.self)
        #expect(header.alg == "RS256")
        #expect(header.typ == "JWT")
        #expect(header.kid == self.emulator.signingKeyId)

        let claims = try await self.verifier().verify(fit, as: FITTestClaims.self)
        #expect(claims.iss.value == "forge/invocation-token")
        try claims.aud.verifyIntendedAudience(includes: self.appId)
        #expect(claims.aud.value == [self.appId])
        #expect(abs(claims.iat.value.timeIntervalSince(before)) < 5)
        #expect(claims.nbf.value == claims.iat.value)
        #expect(claims.exp.value.timeIntervalSince(claims.iat.value) == 25)
        #expect(UUID(uuidString: claims.jti.value) != nil)
        #expect(claims.app.installationId == self.installation.id)
        #expect(claims.app.apiBaseUrl == self.installation.apiBaseUrl)
        #expect(claims.app.id == self.appId)
        #expect(claims.app.appVersion == "1.0.0")
        #expect(claims.app.environment.type == "DEVELOPMENT")
        #expect(UUID(uuidString: claims.app.environment.id) != nil)
        #expect(claims.app.module.type == "core:endpoint")
        #expect(claims.app.module.key == "token-gateway")
        #expect(claims.app.installation.id == self.installation.id)
        #expect(claims.app.installation.contexts.count == 1)
        #expect(claims.app.installation.contexts[0].apiBaseUrl == self.installation.apiBaseUrl)
        #expect(claims.app.installation.contexts[0].cloudId == self.installation.cloudId)
        #expect(claims.app.installation.contexts[0].name == self.installation.product)
        // A backend invocation: no principal, no context.
        #expect(claims.principal == nil)
        #expect(claims.context == nil)

        let second = try await self.verifier().verify(
            try self.emulator.mintFIT(for: self.installation), as: FITTestClaims.self)
        #expect(second.jti.value != claims.jti.value)
    }

    @Test func uiFITCarriesTheModuleTypePrincipalAndContext() async throws {
        let fit = try self.emulator.mintFIT(
            for: self.installation, options: .ui(moduleType: "xen:macro", moduleKey: "macro-1"))
        let claims = try await self.verifier().verify(fit, as: FITTestClaims.self)
        #expect(claims.app.module.type == "xen:macro")
        #expect(claims.app.module.key == "macro-1")
        #expect(claims.principal == "5b10ac8d82e05b22cc7d4ef5")
        let context = try #require(claims.context)
        #expect(context.cloudId == self.installation.cloudId)
        #expect(context.moduleKey == "macro-1")
        #expect(context.siteUrl?.hasPrefix("https://") == true)
        #expect(!context.localId.isEmpty)
    }

    @Test func algNoneHasNoSignatureAndFailsVerification() async throws {
        var options = FITOptions()
        options.algorithm = .none
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        #expect(try jwtSegment(fit, 0, as: HeaderFields.self).alg == "none")
        #expect(fit.hasSuffix("."))
        #expect(fit.split(separator: ".", omittingEmptySubsequences: false).count == 3)
        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
    }

    @Test func hs256WithPublicKeyIsAnHMACKeyedWithThePublicKeyPEM() async throws {
        var options = FITOptions()
        options.algorithm = .hs256WithPublicKey
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        let header = try jwtSegment(fit, 0, as: HeaderFields.self)
        #expect(header.alg == "HS256")
        #expect(header.kid == self.emulator.signingKeyId)

        // It really is the algorithm-confusion token: HMAC-SHA256 keyed with the public key's PEM.
        let segments = fit.split(separator: ".")
        let pem = self.emulator.keys.signingKey.publicKey.pemRepresentation
        #expect(pem.hasPrefix("-----BEGIN PUBLIC KEY-----"))
        let mac = HMAC<SHA256>.authenticationCode(
            for: Data("\(segments[0]).\(segments[1])".utf8),
            using: SymmetricKey(data: Data(pem.utf8))
        )
        #expect(Base64URL.encode(Data(mac)) == String(segments[2]))

        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
    }

    @Test func unknownKidIsInTheHeaderAndFailsVerification() async throws {
        var options = FITOptions()
        options.kid = "no-such-key"
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        #expect(try jwtSegment(fit, 0, as: HeaderFields.self).kid == "no-such-key")
        let jwks = try JSONDecoder().decode(JWKS.self, from: Data(self.emulator.jwksJSON.utf8))
        #expect(jwks.keys.allSatisfy { $0.keyIdentifier?.string != "no-such-key" })
        // A verifier that looks keys up strictly by kid (no default key) refuses it. (jwt-kit's
        // collection falls back to its default key for an unknown kid, so the signature, made with
        // the published key, would still verify there.)
        let strict = JWTKeyCollection()
        for jwk in jwks.keys { try await strict.add(jwk: jwk, isDefault: false) }
        await #expect(throws: (any Error).self) {
            try await strict.verify(fit, as: FITTestClaims.self)
        }
        _ = try await strict.verify(try self.emulator.mintFIT(for: self.installation), as: FITTestClaims.self)
    }

    @Test func unpublishedKeySignsUnderThePublishedKidAndFailsVerification() async throws {
        var options = FITOptions()
        options.signWithUnpublishedKey = true
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        let header = try jwtSegment(fit, 0, as: HeaderFields.self)
        #expect(header.alg == "RS256")
        #expect(header.kid == self.emulator.signingKeyId)
        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
        // It is a real RS256 signature, by the other key.
        let segments = fit.split(separator: ".")
        let signature = _RSA.Signing.RSASignature(rawRepresentation: try #require(Base64URL.decode(segments[2])))
        #expect(
            self.emulator.keys.unpublishedKey.publicKey.isValidSignature(
                signature,
                for: Data("\(segments[0]).\(segments[1])".utf8),
                padding: .insecurePKCS1v1_5
            )
        )
    }

    @Test func tamperedPayloadNamesAnotherInstallationAndFailsVerification() async throws {
        var options = FITOptions()
        options.tamperPayload = true
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        let payload = try jwtSegment(fit, 1, as: FITClaims.self)
        #expect(payload.app.installationId != self.installation.id)
        #expect(payload.app.installationId.hasPrefix("ari:cloud:ecosystem::installation/"))
        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
    }

    @Test func issuerAudienceTimesAndJtiAreOverridable() async throws {
        let issuedAt = Date(timeIntervalSince1970: 1_700_000_000)
        var options = FITOptions()
        options.issuer = "someone-else"
        options.audience = "ari:cloud:ecosystem::app/other"
        options.issuedAt = issuedAt
        options.notBefore = issuedAt.addingTimeInterval(10)
        options.expiresAt = issuedAt.addingTimeInterval(100)
        options.jti = "fixed-jti"
        options.apiBaseUrl = "https://api.atlassian.com/ex/jira/elsewhere"
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        let payload = try jwtSegment(fit, 1, as: FITClaims.self)
        #expect(payload.iss == "someone-else")
        #expect(payload.aud == "ari:cloud:ecosystem::app/other")
        #expect(payload.iat == 1_700_000_000)
        #expect(payload.nbf == 1_700_000_010)
        #expect(payload.exp == 1_700_000_100)
        #expect(payload.jti == "fixed-jti")
        #expect(payload.app.apiBaseUrl == "https://api.atlassian.com/ex/jira/elsewhere")
        #expect(payload.app.installation.contexts[0].apiBaseUrl == "https://api.atlassian.com/ex/jira/elsewhere")

        // Signed correctly, so only the claim checks catch it: it is expired and names another audience.
        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
        var fresh = FITOptions()
        fresh.audience = "ari:cloud:ecosystem::app/other"
        let claims = try await self.verifier().verify(
            try self.emulator.mintFIT(for: self.installation, options: fresh), as: FITTestClaims.self)
        #expect(throws: (any Error).self) { try claims.aud.verifyIntendedAudience(includes: self.appId) }
    }

    @Test func notYetValidFITFailsVerification() async throws {
        var options = FITOptions()
        options.notBefore = Date().addingTimeInterval(600)
        let fit = try self.emulator.mintFIT(for: self.installation, options: options)
        await #expect(throws: (any Error).self) {
            try await self.verifier().verify(fit, as: FITTestClaims.self)
        }
    }

    @Test func accessTokensCarryTheRequestedExpiryAndAreUnique() throws {
        let expiresAt = Date(timeIntervalSince1970: 1_900_000_123.7)
        let first = try self.emulator.mintAccessToken(for: self.installation, expiresAt: expiresAt)
        let second = try self.emulator.mintAccessToken(for: self.installation, expiresAt: expiresAt)
        #expect(first != second)
        let claims = try jwtSegment(first, 1, as: AccessTokenTestClaims.self)
        #expect(claims.exp == 1_900_000_123)
        #expect(try jwtSegment(second, 1, as: AccessTokenTestClaims.self).jti != claims.jti)
        #expect(try jwtSegment(first, 0, as: HeaderFields.self).alg == "HS256")
    }

    @Test func accessTokensDefaultToTheConfiguredLifetime() throws {
        var configuration = ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1")
        configuration.tokenLifetime = .seconds(7200)
        let emulator = try ForgeEmulator(
            configuration: configuration, logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        #expect(configuration.appId == ForgeEmulatorConfiguration.demoAppId)
        let now = Int(Date().timeIntervalSince1970)
        let claims = try jwtSegment(
            try emulator.mintAccessToken(for: emulator.makeInstallation()), 1, as: AccessTokenTestClaims.self)
        #expect(claims.exp - now >= 7199 && claims.exp - now <= 7201)
    }

    @Test func keysNeverAppearInDescriptions() {
        let description = "\(self.emulator.keys)"
        #expect(!description.contains("PRIVATE"))
        #expect(description.contains(self.emulator.signingKeyId))
    }
}
