import Crypto
import Foundation
import Logging
import Testing

@testable import ForgeEmulator
@testable import TokenGateway

@Suite("Connect JWT (HS256) verify and sign")
struct ConnectJWTTests {
    static let secret = Array("tenant-shared-secret-0123456789abcdef".utf8)
    static let clientKey = "6f2a-client-key"

    /// An HS256 token with these claims, signed with `secret`.
    static func token(_ claims: JSONValue, secret: [UInt8] = Self.secret, alg: String = "HS256") -> String {
        let header = Base64URL.encode(Array(#"{"alg":"\#(alg)","typ":"JWT"}"#.utf8))
        let input = header + "." + Base64URL.encode(Array(claims.serialized().utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
        return input + "." + Base64URL.encode(Array(mac))
    }

    static func claims(
        iss: String = Self.clientKey, exp: Int64? = nil, qsh: String?, extra: [(String, JSONValue)] = []
    ) -> JSONValue {
        let now = Int64(Date().timeIntervalSince1970)
        var fields: [(String, JSONValue)] = [("iss", .string(iss)), ("sub", "557058:account"), ("iat", .int(now))]
        fields.append(("exp", .int(exp ?? now + 180)))
        if let qsh { fields.append(("qsh", .string(qsh))) }
        return .object(fields + extra)
    }

    func verify(_ token: String, method: String = "GET", url: String, basePath: String = "") throws(ConnectJWTError)
        -> VerifiedConnectJWT
    {
        try ConnectJWT.verify(
            token, clientKey: try ConnectJWT.unverifiedTenant(of: token), secret: Self.secret, method: method, url: url,
            basePath: basePath)
    }

    @Test("a token signed with the tenant's secret for this request verifies and says who sent it")
    func validToken() throws {
        let url = "/issue-glance?issueKey=ABC-1&projectKey=ABC"
        let token = Self.token(
            Self.claims(
                qsh: CanonicalRequest.qsh(method: "GET", url: url),
                extra: [("context", .object([("jira", .object([("issue", .object([("key", "ABC-1")]))]))]))]))
        let verified = try self.verify(token, url: url + "&jwt=" + token)
        #expect(verified.clientKey == Self.clientKey)
        #expect(verified.accountId == "557058:account")
        #expect(verified.isContextQSH == false)
        #expect(verified.context?.serialized() == #"{"jira":{"issue":{"key":"ABC-1"}}}"#)
    }

    @Test("the tenant is iss, or aud[0] when aud is present (string or array)")
    func tenantFromIssOrAud() throws {
        let plain = Self.token(Self.claims(qsh: "context-qsh"))
        #expect(try ConnectJWT.unverifiedTenant(of: plain) == Self.clientKey)
        let session = Self.token(
            Self.claims(iss: "com.example.app", qsh: "context-qsh", extra: [("aud", .array(["tenant-a", "x"]))]))
        #expect(try ConnectJWT.unverifiedTenant(of: session) == "tenant-a")
        let single = Self.token(Self.claims(iss: "com.example.app", qsh: "context-qsh", extra: [("aud", "tenant-b")]))
        #expect(try ConnectJWT.unverifiedTenant(of: single) == "tenant-b")
        #expect(throws: ConnectJWTError.malformed) { try ConnectJWT.unverifiedTenant(of: "not.a.jwt") }
        #expect(throws: ConnectJWTError.malformed) {
            try ConnectJWT.unverifiedTenant(of: Self.token(Self.claims(iss: "", qsh: nil)))
        }
    }

    @Test("the literal context-qsh is accepted for any request")
    func contextQSH() throws {
        let token = Self.token(Self.claims(qsh: "context-qsh"))
        let verified = try self.verify(token, method: "POST", url: "/anything?x=1")
        #expect(verified.isContextQSH)
    }

    @Test("a token signed with another secret fails the signature check")
    func wrongSecret() {
        let token = Self.token(Self.claims(qsh: "context-qsh"), secret: Array("old-secret".utf8))
        #expect(throws: ConnectJWTError.badSignature) { try self.verify(token, url: "/") }
        #expect(ConnectJWTError.badSignature.message.contains("signature"))
    }

    @Test("a tampered payload fails the signature check")
    func tamperedPayload() {
        let token = Self.token(Self.claims(qsh: "context-qsh"))
        let parts = token.split(separator: ".")
        let forged = Base64URL.encode(
            Array(Self.claims(iss: Self.clientKey, exp: 9_999_999_999, qsh: "context-qsh").serialized().utf8))
        #expect(throws: ConnectJWTError.badSignature) {
            try self.verify(String(parts[0]) + "." + forged + "." + String(parts[2]), url: "/")
        }
    }

    @Test("alg other than HS256 is refused before any HMAC")
    func algorithms() {
        for alg in ["none", "HS512", "RS256", "hs256"] {
            let token = Self.token(Self.claims(qsh: "context-qsh"), alg: alg)
            #expect(throws: ConnectJWTError.algorithmNotAllowed) { try self.verify(token, url: "/") }
        }
        let unsigned =
            Base64URL.encode(Array(#"{"alg":"none"}"#.utf8)) + "."
            + Base64URL.encode(Array(Self.claims(qsh: "context-qsh").serialized().utf8)) + "."
        #expect(throws: ConnectJWTError.algorithmNotAllowed) { try self.verify(unsigned, url: "/") }
    }

    @Test("an expired token, or one without exp, fails the expired check")
    func expiry() {
        let now = Int64(Date().timeIntervalSince1970)
        let expired = Self.token(Self.claims(exp: now - 120, qsh: "context-qsh"))
        #expect(throws: ConnectJWTError.expired) { try self.verify(expired, url: "/") }
        let justExpired = Self.token(Self.claims(exp: now - 10, qsh: "context-qsh"))
        #expect(throws: ConnectJWTError.expired) { try self.verify(justExpired, url: "/") }
        #expect(ConnectJWTError.expired.message.contains("expired"))
        let noExp = Self.token(.object([("iss", .string(Self.clientKey)), ("qsh", "context-qsh")]))
        #expect(throws: ConnectJWTError.missingExpiry) { try self.verify(noExp, url: "/") }
        #expect(ConnectJWTError.missingExpiry.message.contains("exp"))
    }

    @Test("a qsh for another method, path or query fails the qsh check")
    func qshMismatch() {
        let token = Self.token(Self.claims(qsh: CanonicalRequest.qsh(method: "GET", url: "/a?x=1")))
        #expect(throws: ConnectJWTError.qshMismatch) { try self.verify(token, method: "POST", url: "/a?x=1") }
        #expect(throws: ConnectJWTError.qshMismatch) { try self.verify(token, url: "/b?x=1") }
        #expect(throws: ConnectJWTError.qshMismatch) { try self.verify(token, url: "/a?x=2") }
        #expect(throws: Never.self) { try self.verify(token, url: "/a/?x=1&jwt=whatever") }
        let none = Self.token(Self.claims(qsh: nil))
        #expect(throws: ConnectJWTError.missingQSH) { try self.verify(none, url: "/") }
        #expect(ConnectJWTError.qshMismatch.message.contains("qsh"))
    }

    @Test("the app base URL's path is removed before the qsh is computed")
    func basePathRemoved() throws {
        let token = Self.token(Self.claims(qsh: CanonicalRequest.qsh(method: "GET", url: "/glance?a=1")))
        _ = try self.verify(token, url: "/gateway/glance?a=1", basePath: "/gateway")
        _ = try self.verify(token, url: "/glance?a=1", basePath: "/gateway")
    }

    @Test("messages name the failed check and never carry the token")
    func messages() {
        #expect(ConnectJWTError.unknownTenant.message.contains("unknown tenant"))
        #expect(ConnectJWTError.uninstalledTenant.message.contains("unknown tenant"))
        #expect(ConnectJWTError.badSignature.message.contains("signature"))
        #expect(ConnectJWTError.expired.message.contains("expired"))
        #expect(ConnectJWTError.qshMismatch.message.contains("qsh"))
        #expect("\(ConnectJWTError.badSignature)" == "ConnectJWTError(bad_signature)")
    }

    @Test("sign: HS256 with the secret, iss = app key, exp within 15 minutes, qsh relative to the tenant's base URL")
    func sign() throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let url = "https://acme.atlassian.net/wiki/rest/api/content?limit=5&start=0"
        let signed = ConnectJWT.sign(
            appKey: "com.example.app", method: "get", url: url, basePath: "/wiki", secret: Self.secret, now: now)
        let jws = try #require(ConnectJWS(signed.token))
        #expect(jws.algorithm == "HS256")
        #expect(jws.string("iss") == "com.example.app")
        #expect(jws.numericDate("iat") == 1_800_000_000)
        #expect(signed.expiresAt == 1_800_000_180)
        #expect(jws.numericDate("exp") == 1_800_000_180)
        // The vector for this request with the /wiki context path (atlassian-jwt).
        #expect(jws.string("qsh") == CanonicalRequest.qsh(method: "GET", url: "/rest/api/content?limit=5&start=0"))
        #expect(
            HMAC<SHA256>.isValidAuthenticationCode(
                jws.signature, authenticating: jws.signingInput, using: SymmetricKey(data: Self.secret)))
        let long = ConnectJWT.sign(
            appKey: "a", method: "GET", url: url, basePath: "/wiki", secret: Self.secret, now: now, lifetime: 86_400)
        #expect(long.expiresAt - 1_800_000_000 == 900)
    }

    @Test("a JWT the emulator mints as the product verifies with the gateway's implementation")
    func emulatorInterop() throws {
        let emulator = try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(gatewayURL: "https://app.example.test/gateway"),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        let tenant = emulator.makeConnectTenant(product: "confluence")
        let url = "/gateway/macro?b=2&a=x+y&a=%2A~&empty=&unicode=%C3%A9"
        let token = emulator.mintConnectJWT(for: tenant, method: "GET", url: url)
        let verified = try ConnectJWT.verify(
            token, clientKey: tenant.clientKey, secret: Array(tenant.sharedSecret.utf8), method: "GET", url: url,
            basePath: "/gateway")
        #expect(verified.clientKey == tenant.clientKey)
        #expect(verified.accountId == tenant.accountId)

        var old = ConnectJWTOptions()
        old.secret = "some-other-secret"
        #expect(throws: ConnectJWTError.badSignature) {
            try ConnectJWT.verify(
                emulator.mintConnectJWT(for: tenant, url: "/x", options: old), clientKey: tenant.clientKey,
                secret: Array(tenant.sharedSecret.utf8), method: "GET", url: "/x")
        }
    }

    @Test("the emulator's independent canonical request agrees with every vector")
    func emulatorCanonicalRequestMatchesVectors() throws {
        for vector in try CanonicalRequestTests.loadVectors() {
            #expect(
                ConnectCanonicalRequest.canonical(method: vector.method, url: vector.url) == vector.canonical,
                "\(vector.url)")
            #expect(ConnectCanonicalRequest.qsh(method: vector.method, url: vector.url) == vector.qsh)
        }
    }

    @Test(
        "delimiters are bytes: a '#', '?' or '&' followed by a combining mark still delimits, in both implementations",
        arguments: [
            ("/a&\u{301}b", "GET&/a%26\u{301}b&"),
            ("/q?a=1&\u{301}b=2", "GET&/q&%CC%81b=2&a=1"),
            ("/p?\u{301}x=1", "GET&/p&%CC%81x=1"),
            ("/p#\u{301}x?y=1", "GET&/p&"),
            ("https://tenant.example.test/p/?\u{301}=1", "GET&/p&%CC%81=1"),
            ("/p?a=\u{301}&b", "GET&/p&a=%CC%81&b="),
        ])
    func delimitersAreBytes(url: String, canonical: String) {
        #expect(CanonicalRequest.canonical(method: "GET", url: url) == canonical)
        #expect(ConnectCanonicalRequest.canonical(method: "GET", url: url) == canonical)
    }
}
