import Crypto
import FlowEngine
import Foundation
import Logging
import Testing
import _CryptoExtras

@testable import TokenGateway

/// Every parser an outsider (or a setting) reaches, fed random and mutated input from a fixed
/// seed with a bounded number of iterations: Connect JWTs, signed installs, OAuth forms, the
/// callers JSON, Redis URLs, trust-root URLs and log lines. They accept or refuse; they never
/// crash, and they never accept what they should not.
@Suite("Fuzz: outsider parsers")
struct FuzzOutsiderParserTests {
    static let secret = Array("connect-shared-secret-0123456789abcdef".utf8)

    static func hs256(header: Any, claims: Any, secret: [UInt8] = FuzzOutsiderParserTests.secret) -> String {
        let h = Base64URL.encode(try! JSONSerialization.data(withJSONObject: header, options: [.fragmentsAllowed]))
        let c = Base64URL.encode(try! JSONSerialization.data(withJSONObject: claims, options: [.fragmentsAllowed]))
        let mac = HMAC<SHA256>.authenticationCode(for: Array((h + "." + c).utf8), using: SymmetricKey(data: secret))
        return h + "." + c + "." + Base64URL.encode(Array(mac))
    }

    @Test("Connect JWTs: mutations of a valid token are refused; random signed claims pass only when every check does")
    func connectJWT() {
        var rng = SplitMix64(seed: 0x434F_4E4E)
        let now = Date()
        let qsh = CanonicalRequest.qsh(method: "GET", url: "/x?a=1", basePath: "")
        let valid = Self.hs256(
            header: ["alg": "HS256", "typ": "JWT"],
            claims: ["iss": "tenant-1", "exp": now.timeIntervalSince1970 + 60, "qsh": qsh, "sub": "acct"])
        #expect(
            (try? ConnectJWT.verify(valid, clientKey: "tenant-1", secret: Self.secret, method: "GET", url: "/x?a=1"))
                != nil)
        for _ in 0..<400 {
            let mutated = rng.mutate(valid, alphabet: SplitMix64.base64URLAlphabet + SplitMix64.nasty)
            if mutated == valid { continue }
            let result = try? ConnectJWT.verify(
                mutated, clientKey: "tenant-1", secret: Self.secret, method: "GET", url: "/x?a=1")
            // A mutation may only pass when it decodes to the very same header, claims and signature.
            if result != nil {
                #expect(
                    mutated.split(separator: ".").map { Base64URL.decode(String($0)) }
                        == valid.split(separator: ".").map { Base64URL.decode(String($0)) })
            }
            _ = try? ConnectJWT.unverifiedTenant(of: mutated)
        }
        for _ in 0..<300 {
            let header =
                rng.chance(0.7)
                ? ["alg": rng.pick(["HS256", "none", "RS256", "hs256"])] as Any : rng.jsonValue(depth: 2)
            var claims: [String: Any] = [:]
            if rng.chance(0.8) { claims["iss"] = rng.pick(["tenant-1", "tenant-2", ""]) as Any }
            if rng.chance(0.3) {
                claims["aud"] = rng.pick([["tenant-1"], ["tenant-2"], "tenant-1", [] as [String]]) as Any
            }
            if rng.chance(0.8) {
                claims["exp"] =
                    rng.pick([now.timeIntervalSince1970 + 60, now.timeIntervalSince1970 - 60, 0, -1]) as Any
            }
            if rng.chance(0.8) { claims["qsh"] = rng.pick([qsh, "context-qsh", "", "x"]) as Any }
            if rng.chance(0.2) { claims["context"] = rng.jsonValue(depth: 2) }
            let token = Self.hs256(header: header, claims: claims, secret: rng.chance(0.9) ? Self.secret : [1, 2, 3])
            guard
                let verified = try? ConnectJWT.verify(
                    token, clientKey: "tenant-1", secret: Self.secret, method: "GET", url: "/x?a=1")
            else { continue }
            #expect((header as? [String: String])?["alg"] == "HS256")
            #expect((claims["exp"] as? Double ?? 0) > now.timeIntervalSince1970)
            #expect(verified.clientKey == "tenant-1")
        }
    }

    struct NoKeys: InstallKeyFetcher {
        let key: _RSA.Signing.PublicKey
        func publicKeyPEM(kid: String) async throws -> String? { kid == "k1" ? self.key.pemRepresentation : nil }
    }

    @Test("signed installs: random tokens, headers and bodies are refused without a crash; mutations never verify")
    func signedInstall() async throws {
        var rng = SplitMix64(seed: 0x5349_4E53)
        let key = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        var configuration = SignedInstallVerifier.Configuration(
            appBaseURL: "https://app.example.com", keysURL: "https://keys.example")
        configuration.keyFetchesPerMinute = 1000
        let verifier = SignedInstallVerifier(
            configuration: configuration, fetcher: NoKeys(key: key.publicKey),
            logger: Logger(label: "fuzz") { _ in SwallowLogs() })
        let now = Date()
        let claims: [String: Any] = [
            "iss": "tenant-1", "aud": ["https://app.example.com"], "exp": now.timeIntervalSince1970 + 60,
            "qsh": CanonicalRequest.qsh(method: "POST", url: "/connect/installed", basePath: ""),
        ]
        func sign(_ header: Any, _ claims: Any) -> String {
            let h = Base64URL.encode(try! JSONSerialization.data(withJSONObject: header, options: [.fragmentsAllowed]))
            let c = Base64URL.encode(try! JSONSerialization.data(withJSONObject: claims, options: [.fragmentsAllowed]))
            let sig = try! key.signature(for: SHA256.hash(data: Array((h + "." + c).utf8)), padding: .insecurePKCS1v1_5)
            return h + "." + c + "." + Base64URL.encode(sig.rawRepresentation)
        }
        let valid = sign(["alg": "RS256", "kid": "k1"], claims)
        let body = Array(
            #"{"clientKey":"tenant-1","sharedSecret":"s","key":"app","baseUrl":"https://x.atlassian.net"}"#.utf8)
        let genuine = try await verifier.verify(
            authorization: "JWT " + valid, method: "POST", uri: "/connect/installed"
        ) { body }
        #expect(genuine.clientKey == "tenant-1")
        for round in 0..<300 {
            let token: String
            switch round % 3 {
            case 0: token = rng.mutate(valid, alphabet: SplitMix64.base64URLAlphabet + SplitMix64.nasty)
            case 1: token = sign(rng.jsonValue(depth: 2), rng.jsonValue(depth: 3))
            default:
                token = rng.string(Int.random(in: 0..<200, using: &rng), from: SplitMix64.base64URLAlphabet + ["."])
            }
            if token == valid { continue }
            let randomBody: [UInt8] = rng.chance(0.5) ? body : Array(rng.jsonText(rng.jsonValue(depth: 3)).utf8)
            let header = rng.pick(["JWT ", "jwt ", "Bearer ", "", "JWT  "]) + token
            let result = try? await verifier.verify(authorization: header, method: "POST", uri: "/connect/installed") {
                randomBody
            }
            if let result {
                // Only a token that decodes to the genuine one's parts can verify.
                #expect(
                    token.split(separator: ".").map { Base64URL.decode(String($0)) }
                        == valid.split(separator: ".").map { Base64URL.decode(String($0)) })
                #expect(result.clientKey == "tenant-1")
            }
        }
    }

    @Test("OAuth forms: random bodies parse or are refused with invalid_request; parsed values round-trip")
    func oauthForm() {
        var rng = SplitMix64(seed: 0x4F41_5554)
        let alphabet: [String] =
            Array("abc_=&%+2F0Az-.~ ").map(String.init) + ["%%", "%2", "%C3%A9", "%FF", "%00", "\u{0}", "é"]
        for _ in 0..<1000 {
            let text = (0..<Int.random(in: 0..<60, using: &rng)).map { _ in rng.pick(alphabet) }.joined()
            do {
                let form = try OAuthForm.parse(Array(text.utf8))
                #expect(form.names.count <= OAuthForm.maximumParameterCount)
                for name in form.names { #expect(!(form[name] ?? "").isEmpty) }
            } catch {
                #expect(error.code == "invalid_request")
            }
        }
        let parsed = try? OAuthForm.parse(
            Array("grant_type=client_credentials&resource=ari%3Acloud%3Aecosystem%3A%3Ainstallation%2F1&x=a+b".utf8))
        #expect(parsed?["resource"] == "ari:cloud:ecosystem::installation/1")
        #expect(parsed?["x"] == "a b")
    }

    @Test("callers JSON: random documents are refused with a message that names the setting and no secret")
    func callersJSON() {
        var rng = SplitMix64(seed: 0x4341_4C4C)
        let secret = "fuzz-caller-secret-do-not-print"
        for _ in 0..<500 {
            var entry: [String: Any] = [:]
            for key in ["name", "secret", "secretSha256", "installations", "clientKeys", "limits", "x"]
            where rng.chance(0.5) {
                switch key {
                case "secret": entry[key] = rng.chance(0.7) ? secret : rng.jsonValue(depth: 1)
                case "limits":
                    entry[key] =
                        rng.chance(0.5)
                        ? [
                            "refreshesPerMinute": rng.pick([0, 5, -1, 2_000_000]) as Any,
                            "userExchangesPerMinute": rng.jsonValue(depth: 0),
                        ]
                        : rng.jsonValue(depth: 2)
                case "installations": entry[key] = rng.chance(0.5) ? ["*"] : rng.jsonValue(depth: 2)
                default: entry[key] = rng.jsonValue(depth: 2)
                }
            }
            let document: Any = rng.chance(0.8) ? [entry] : rng.jsonValue(depth: 3)
            let text =
                rng.chance(0.9) ? rng.jsonText(document) : rng.mutate(rng.jsonText([entry]), alphabet: SplitMix64.nasty)
            do {
                let registry = try CallerRegistry(json: text)
                #expect(!registry.callers.isEmpty)
                #expect(!"\(registry)".contains(secret))
            } catch {
                #expect("\(error)".contains("TOKEN_GATEWAY_CALLERS"), "\(error)")
                #expect(!"\(error)".contains(secret), "\(error)")
            }
        }
    }

    @Test("Redis URLs: random URLs parse or are refused; a password never shows in the error or description")
    func redisURLs() {
        var rng = SplitMix64(seed: 0x5245_4449)
        let password = "fuzz-redis-password"
        let pieces = [
            "redis://", "redis-sentinel://", "rediss://", "redis-cluster://", "http://", ":", "@", password, "user",
            "127.0.0.1",
            "[::1]", "host", ":6379", ":0", ":99999", "/", "0", "15", "16", "-1", "master", ",", "%", "%41", "?", "#",
            " ", "\u{0}",
        ]
        for _ in 0..<1000 {
            let url = (0..<Int.random(in: 1..<9, using: &rng)).map { _ in rng.pick(pieces) }.joined()
            do {
                let configuration = try RedisConfiguration(url: url)
                #expect(!"\(configuration)".contains(password))
            } catch {
                #expect(!"\(error)".contains(password), "\(error)")
            }
        }
    }

    @Test("trust roots and loopback: no random host is taken for loopback unless written as such")
    func trustRootHosts() {
        var rng = SplitMix64(seed: 0x5452_5553)
        let pieces = [
            "127", ".", "0", "1", "255", "256", "localhost", "evil", "example", "[", "]", "::1", "x", "-", "00", "0x7f",
        ]
        for _ in 0..<2000 {
            let host = (0..<Int.random(in: 1..<8, using: &rng)).map { _ in rng.pick(pieces) }.joined()
            guard TrustRoot.isLoopback(host) else { continue }
            let bare = host.lowercased().trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
            let octets = bare.split(separator: ".", omittingEmptySubsequences: false)
            #expect(
                bare == "localhost" || bare == "::1"
                    || (octets.count == 4 && octets[0] == "127" && octets.allSatisfy { UInt8($0) != nil }), "\(host)")
        }
    }

    @Test(
        "log lines: random text never yields a control character or a second line, and JSON lines read back as written")
    func logLines() throws {
        var rng = SplitMix64(seed: 0x4C4F_4753)
        for _ in 0..<500 {
            let scalars = (0..<Int.random(in: 0..<40, using: &rng)).map { _ -> Character in
                let value = rng.pick([
                    UInt32.random(in: 0..<0x80, using: &rng), UInt32.random(in: 0x80..<0xA0, using: &rng),
                    UInt32.random(in: 0x2000..<0x2070, using: &rng), UInt32.random(in: 0..<0x11_0000, using: &rng),
                ])
                return Character(Unicode.Scalar(value) ?? "?")
            }
            let text = String(scalars)
            for format in [LogFormat.logfmt, .json] {
                let line = GatewayLogHandler.format(
                    format: format, timestamp: Date(), level: .info, label: "t", message: text,
                    metadata: ["k": "\(text)"])
                #expect(!line.unicodeScalars.contains { GatewayLogHandler.mustEscape($0) }, "\(text.debugDescription)")
                if format == .json {
                    let object = try #require(
                        try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])
                    #expect(object["msg"] == text)
                }
            }
        }
    }
}

/// Drops every log record.
struct SwallowLogs: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .critical
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { nil }
        set {}
    }
    func log(event: LogEvent) {}
}
