import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import Testing
import _CryptoExtras

@testable import TokenGateway

/// A small deterministic PRNG (SplitMix64), so every fuzz run sees the same cases and a failure
/// can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64

    init(seed: UInt64) { self.state = seed }

    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension SplitMix64 {
    mutating func pick<T>(_ items: [T]) -> T { items[Int.random(in: 0..<items.count, using: &self)] }
    mutating func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &self) < p }
    mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8.random(in: 0...255, using: &self) } }

    /// A string of `count` characters drawn from `alphabet`.
    mutating func string(_ count: Int, from alphabet: [Character]) -> String {
        String((0..<count).map { _ in self.pick(alphabet) })
    }

    static let base64URLAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    static let nasty: [Character] = Array("=./+%:{}[]\"\\ ,;\t\u{0}\u{7f}é€😀") + ["\r\n"]

    /// A random JSON value `depth` levels deep at most, with hostile strings and numbers.
    mutating func jsonValue(depth: Int) -> Any {
        let kind = Int.random(in: 0..<(depth > 0 ? 9 : 6), using: &self)
        switch kind {
        case 0: return NSNull()
        case 1: return self.chance(0.5)
        case 2: return self.pick([0, -1, 1, Int.max, Int.min, 1_763_906_400, 99_999_999_999]) as Int
        case 3: return self.pick([0.5, -0.0, 1e308, -1e308, 1.7e10, 3.14]) as Double
        case 4: return self.string(Int.random(in: 0..<12, using: &self), from: Self.base64URLAlphabet + Self.nasty)
        case 5: return self.pick(["RS256", "none", "HS256", "forge/invocation-token", "avi:forge:uninstalled:app", ""])
        case 6, 7:
            var object: [String: Any] = [:]
            for _ in 0..<Int.random(in: 0..<4, using: &self) {
                let key = self.pick([
                    "exp", "iss", "aud", "app", "installationId", "requestId", "authTriggerUrl", "eventType", "x",
                ])
                object[key] = self.jsonValue(depth: depth - 1)
            }
            return object
        default:
            return (0..<Int.random(in: 0..<4, using: &self)).map { _ in self.jsonValue(depth: depth - 1) }
        }
    }

    /// `value` as JSON text, or a random document when it cannot be serialised.
    mutating func jsonText(_ value: Any) -> String {
        guard JSONSerialization.isValidJSONObject(value),
            let data = try? JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed])
        else { return "{\"x\":1}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// `text` with a few random edits (replace, delete, insert, duplicate).
    mutating func mutate(_ text: String, alphabet: [Character]) -> String {
        var chars = Array(text)
        for _ in 0..<Int.random(in: 1...4, using: &self) {
            switch Int.random(in: 0..<4, using: &self) {
            case 0 where !chars.isEmpty:
                chars[Int.random(in: 0..<chars.count, using: &self)] = self.pick(alphabet)
            case 1 where !chars.isEmpty:
                let start = Int.random(in: 0..<chars.count, using: &self)
                let end = min(chars.count, start + Int.random(in: 1...8, using: &self))
                chars.removeSubrange(start..<end)
            case 2:
                chars.insert(self.pick(alphabet), at: Int.random(in: 0...chars.count, using: &self))
            default:
                if !chars.isEmpty {
                    let start = Int.random(in: 0..<chars.count, using: &self)
                    let end = min(chars.count, start + Int.random(in: 1...16, using: &self))
                    chars.insert(contentsOf: chars[start..<end], at: Int.random(in: 0...chars.count, using: &self))
                }
            }
        }
        return String(chars)
    }
}

/// Issue #4 item 8: bounded, seeded fuzz runs over everything the gateway parses from outside.
/// Properties: no crash, only the documented error types, and nothing invalid accepted.
@Suite("Fuzz: parsers")
struct FuzzParserTests {
    static let appId = "ari:cloud:ecosystem::app/3e2b9c1a-7d6f-4b8e-a5c4-1f0e9d8c7b6a"
    static let installationId = "ari:cloud:ecosystem::installation/5c0d6a2e-8f1b-4e3c-9a7d-0b1c2d3e4f50"
    static let key = try! _RSA.Signing.PrivateKey(keySize: .bits2048)

    static var jwks: String {
        let primitives = try! key.publicKey.getKeyPrimitives()
        let jwk: [String: Any] = [
            "kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
            "n": Base64URL.encode(primitives.modulus), "e": Base64URL.encode(primitives.publicExponent),
        ]
        return String(decoding: try! JSONSerialization.data(withJSONObject: ["keys": [jwk]]), as: UTF8.self)
    }

    static func sign(header: Any, claims: Any) -> String {
        let h = Base64URL.encode(try! JSONSerialization.data(withJSONObject: header, options: [.fragmentsAllowed]))
        let c = Base64URL.encode(try! JSONSerialization.data(withJSONObject: claims, options: [.fragmentsAllowed]))
        let input = h + "." + c
        let signature = try! key.signature(for: SHA256.hash(data: Array(input.utf8)), padding: .insecurePKCS1v1_5)
        return input + "." + Base64URL.encode(signature.rawRepresentation)
    }

    static func validClaims(now: Double) -> [String: Any] {
        [
            "iss": "forge/invocation-token", "aud": appId, "iat": now, "nbf": now, "exp": now + 25, "jti": "jti-fuzz",
            "app": [
                "id": appId, "installationId": installationId, "apiBaseUrl": "https://api.atlassian.com/ex/jira/c",
            ],
        ]
    }

    @Test("FIT verification: random mutations of a valid token are all refused, without a crash")
    func invocationTokenMutations() async throws {
        var rng = SplitMix64(seed: 0x4649_5431)
        let verifier = try InvocationTokenVerifier(
            configuration: .init(appId: Self.appId), jwksJSON: Self.jwks,
            logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
        let now = Date().timeIntervalSince1970.rounded(.down)
        let valid = Self.sign(header: ["alg": "RS256", "kid": "k1", "typ": "JWT"], claims: Self.validClaims(now: now))
        let context = try await verifier.verify(valid, now: Date(timeIntervalSince1970: now))
        #expect(context.installationId == Self.installationId)

        let alphabet = SplitMix64.base64URLAlphabet + SplitMix64.nasty
        var refused = 0
        for _ in 0..<2000 {
            var token: String
            switch Int.random(in: 0..<4, using: &rng) {
            case 0:
                token = rng.mutate(valid, alphabet: alphabet)
            case 1:
                // Swap, drop or repeat whole segments.
                var parts = valid.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
                parts.shuffle(using: &rng)
                if rng.chance(0.5) { parts.append(rng.pick(parts)) } else { parts.removeLast() }
                token = parts.joined(separator: rng.pick([".", "..", ""]))
            case 2:
                token = (0..<Int.random(in: 0...5, using: &rng)).map { _ in
                    rng.string(Int.random(in: 0..<60, using: &rng), from: alphabet)
                }.joined(separator: ".")
            default:
                // A random header or payload glued to the valid signature.
                let parts = valid.split(separator: ".").map(String.init)
                let random = Base64URL.encode(Array(rng.jsonText(rng.jsonValue(depth: 4)).utf8))
                token =
                    rng.chance(0.5)
                    ? random + "." + parts[1] + "." + parts[2] : parts[0] + "." + random + "." + parts[2]
            }
            if token == valid { continue }
            do {
                _ = try await verifier.verify(token, now: Date(timeIntervalSince1970: now))
                Issue.record("a mutated token was accepted: \(token)")
            } catch let error as InvocationTokenError {
                #expect(!error.description.contains(token) || token.count < 8)
                refused += 1
            } catch {
                Issue.record("unexpected error type \(type(of: error))")
            }
        }
        #expect(refused > 1500)
    }

    @Test("FIT verification: correctly signed tokens with random headers and claims pass only when every check does")
    func invocationTokenSignedGarbage() async throws {
        var rng = SplitMix64(seed: 0x4649_5432)
        let verifier = try InvocationTokenVerifier(
            configuration: .init(appId: Self.appId), jwksJSON: Self.jwks,
            logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
        let now = Date().timeIntervalSince1970.rounded(.down)
        for _ in 0..<250 {
            var header: [String: Any] = ["typ": "JWT"]
            let alg = rng.pick(
                ["RS256", "RS256", "rs256", "none", "HS256", "RS512", "PS256", "", "RS256 "] as [String])
            if rng.chance(0.9) { header["alg"] = alg }
            let kid: Any = rng.pick(["k1", "k1", "k2", "", 1, NSNull(), ["k1"]] as [Any])
            if rng.chance(0.9) { header["kid"] = kid }
            if rng.chance(0.1) { header["crit"] = ["exp"] }
            var claims = Self.validClaims(now: now)
            let tampered = rng.chance(0.7)
            if tampered {
                let key = rng.pick(["iss", "aud", "exp", "nbf", "iat", "jti", "app"])
                if rng.chance(0.3) { claims[key] = nil } else { claims[key] = rng.jsonValue(depth: 2) }
            }
            let token = Self.sign(header: header, claims: claims)
            let headerValid =
                header["alg"] as? String == "RS256" && header["kid"] as? String == "k1" && header["crit"] == nil
            do {
                let context = try await verifier.verify(token, now: Date(timeIntervalSince1970: now))
                #expect(headerValid, "accepted with header \(header)")
                #expect(context.installationId == Self.installationId)
                #expect(claims["iss"] as? String == "forge/invocation-token")
                #expect((claims["app"] as? [String: Any])?["installationId"] as? String == Self.installationId)
            } catch is InvocationTokenError {
                #expect(!headerValid || tampered, "refused a valid token")
            }
        }
    }

    @Test("access-token expiry: random tokens give nil or a plausible exp, never a crash")
    func accessTokenExpiry() {
        var rng = SplitMix64(seed: 0x4558_5031)
        for _ in 0..<3000 {
            var segments: [String] = []
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                switch Int.random(in: 0..<4, using: &rng) {
                case 0:
                    segments.append(rng.string(Int.random(in: 0..<40, using: &rng), from: SplitMix64.base64URLAlphabet))
                case 1: segments.append(Base64URL.encode(rng.bytes(Int.random(in: 0..<40, using: &rng))))
                case 2:
                    var payload: [String: Any] = [:]
                    payload["exp"] = rng.jsonValue(depth: 1)
                    segments.append(Base64URL.encode(Array(rng.jsonText(payload).utf8)))
                default: segments.append(rng.string(Int.random(in: 0..<20, using: &rng), from: SplitMix64.nasty))
                }
            }
            let token = segments.joined(separator: ".")
            if let exp = TokenClaims.expiry(of: token) {
                #expect(exp > 0 && exp < 100_000_000_000, "\(token)")
            }
        }
        // The property in the other direction: a well-formed exp is read exactly.
        for exp in [1, 1_763_906_400, 99_999_999_999] as [Int64] {
            let token = "e30." + Base64URL.encode(Array("{\"exp\":\(exp)}".utf8)) + ".c2ln"
            #expect(TokenClaims.expiry(of: token) == exp)
        }
        #expect(TokenClaims.expiry(of: "e30." + Base64URL.encode(Array("{\"exp\":1e11}".utf8)) + ".x") == nil)
        // Only a JSON number is an exp: not a boolean, a string or null.
        for value in ["true", "\"1763906400\"", "null"] {
            #expect(TokenClaims.expiry(of: "e30." + Base64URL.encode(Array("{\"exp\":\(value)}".utf8)) + ".x") == nil)
        }
        #expect(TokenClaims.expiry(of: String(repeating: "a", count: TokenClaims.maxLength + 1)) == nil)
        // Only a compact JWT of three base64url parts: not five parts (whose second is no payload),
        // not two tokens joined as a repeated header reads (`a, b`), not padded.
        let jwt = "e30." + Base64URL.encode(Array("{\"exp\":1763906400}".utf8)) + ".c2ln"
        #expect(TokenClaims.expiry(of: jwt) == 1_763_906_400)
        #expect(TokenClaims.expiry(of: jwt + ".a.b") == nil)
        #expect(TokenClaims.expiry(of: jwt + ", " + jwt) == nil)
        #expect(TokenClaims.expiry(of: jwt + "=") == nil)
        #expect(TokenClaims.expiry(of: " " + jwt) == nil)
    }

    @Test("trigger signature header: only the exact format parses, and the Forge side reads what the gateway writes")
    func triggerSignatureHeader() throws {
        var rng = SplitMix64(seed: 0x5349_4731)
        let key = TriggerSigningKey.generate()
        let body = Array("{\"requestId\":\"r\"}".utf8)
        let valid = try key.signatureHeader(for: body)
        let parsed = try TriggerSignatureHeader(parsing: valid)
        #expect(parsed.verify(body: body, publicKey: key.publicKey))
        let alphabet = SplitMix64.base64URLAlphabet + SplitMix64.nasty + Array("keyIdsignature=, ")
        var accepted = 0
        for _ in 0..<3000 {
            let candidate: String
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: candidate = rng.mutate(valid, alphabet: alphabet)
            case 1:
                candidate =
                    rng.pick(["keyId=", "keyid=", "keyId =", ""])
                    + rng.string(Int.random(in: 0..<70, using: &rng), from: SplitMix64.base64URLAlphabet + Array(",= "))
                    + rng.pick([", signature=", ",signature=", ", signature =", ""])
                    + rng.string(Int.random(in: 80..<90, using: &rng), from: SplitMix64.base64URLAlphabet + Array("="))
            default: candidate = rng.string(Int.random(in: 0..<140, using: &rng), from: alphabet)
            }
            guard let header = try? TriggerSignatureHeader(parsing: candidate) else { continue }
            accepted += 1
            #expect(TriggerSigningKey.isValidKeyId(header.keyId))
            #expect(header.signature.count == 64)
            // What the gateway accepts, the Forge side parses to the same thing.
            let forge = try #require(TriggerSignature(headerValue: candidate))
            #expect(forge.keyId == header.keyId)
            #expect(Array(forge.signature) == header.signature)
            // A re-formatted header parses to the same value.
            #expect(
                try TriggerSignatureHeader(
                    parsing: TriggerSignatureHeader.format(keyId: header.keyId, signature: header.signature)) == header)
            if header.keyId == key.keyId && header.signature != parsed.signature {
                #expect(!header.verify(body: body, publicKey: key.publicKey))
            }
        }
        #expect(accepted > 0)
    }

    @Test("JSON bodies: random and hostile documents parse or fail with 400 invalid_request, never crash")
    func jsonBodies() {
        var rng = SplitMix64(seed: 0x4A53_4F4E)
        for round in 0..<3000 {
            var bytes: [UInt8]
            var depth = 0
            switch round % 4 {
            case 0:
                bytes = Array(rng.jsonText(rng.jsonValue(depth: 6)).utf8)
            case 1:
                depth = Int.random(in: 1...40, using: &rng)
                let open = (0..<depth).map { _ in rng.pick(["[", "{\"a\":"]) }
                let close = open.reversed().map { $0 == "[" ? "]" : "}" }
                bytes = Array((open.joined() + "1" + close.joined()).utf8)
            case 2:
                bytes = Array(
                    rng.mutate(rng.jsonText(rng.jsonValue(depth: 3)), alphabet: SplitMix64.nasty + Array("{}[]\",:0e-"))
                        .utf8)
            default:
                bytes = rng.bytes(Int.random(in: 0..<64, using: &rng))
            }
            do {
                let object = try JSONBody.object(bytes, emptyIsObject: rng.chance(0.5))
                #expect(depth <= JSONBody.maxDepth)
                _ = object.count
            } catch {
                #expect(error.status == .badRequest)
                #expect(error.code == "invalid_request")
            }
        }
    }

    @Test("installation ids in paths: only ids of the documented alphabet parse, and they round-trip")
    func installationPathSegments() {
        var rng = SplitMix64(seed: 0x5041_5448)
        let alphabet = SplitMix64.base64URLAlphabet + Array("%0123456789abcdefABCDEF:/.{}-_~*") + SplitMix64.nasty
        let prefix = InstallationID.ariPrefix
        var parsed = 0
        for _ in 0..<5000 {
            var segment = rng.string(Int.random(in: 0..<40, using: &rng), from: alphabet)
            if rng.chance(0.3) {
                segment = rng.pick([prefix, "ari%3Acloud%3Aecosystem%3A%3Ainstallation%2F"]) + segment
            }
            guard let id = InstallationID(pathSegment: segment) else { continue }
            parsed += 1
            #expect(id.ari.hasPrefix(prefix))
            #expect((1...128).contains(id.shortID.utf8.count))
            #expect(
                id.shortID.utf8.allSatisfy { b in
                    (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D
                        || b == 0x5F
                        || b == 0x2E
                })
            #expect(!id.shortID.hasPrefix("."))
            #expect(InstallationID(id.ari) == id)
            #expect(InstallationID(pathSegment: FuzzSupport.encodedSegment(id.ari)) == id)
        }
        #expect(parsed > 100)
    }

    @Test("base64url: canonical round trips, and nothing non-canonical decodes")
    func base64URL() {
        var rng = SplitMix64(seed: 0x4236_3455)
        for _ in 0..<3000 {
            let bytes = rng.bytes(Int.random(in: 0..<48, using: &rng))
            #expect(Base64URL.decode(Base64URL.encode(bytes)) == bytes)
            let text = rng.string(
                Int.random(in: 0..<24, using: &rng), from: SplitMix64.base64URLAlphabet + Array("=+/ "))
            if let decoded = Base64URL.decode(text) {
                var unpadded = Substring(text)
                while unpadded.hasSuffix("=") { unpadded = unpadded.dropLast() }
                #expect(Base64URL.encode(decoded) == String(unpadded), "\(text)")
            }
        }
    }

    @Test("trigger URL allow-list: whatever it allows, the HTTP client's URL parser reads as the same allowed host")
    func triggerURLAllowList() throws {
        var rng = SplitMix64(seed: 0x5552_4C53)
        let list = try TriggerHostAllowList(
            parsing: "*.hello.atlassian-dev.net,exact.example.com,http://127.0.0.1:8081")
        let schemes = ["https://", "http://", "HTTPS://", "ftp://", "//", "https:/", "https:\\\\", ""]
        let hosts = [
            "abc.hello.atlassian-dev.net", "hello.atlassian-dev.net", "exact.example.com", "127.0.0.1", "evil.test",
            "abc.hello.atlassian-dev.net.evil.test", "ABC.HELLO.atlassian-dev.net", "[::1]", "localhost",
            "127.0.0.1.nip.io",
        ]
        let extras = ["@", "#", "?", "\\", ":", ":443", ":8081", ":80", "%2e", "%40", "/", " ", "\t", ".", ""]
        var allowed = 0
        for _ in 0..<4000 {
            var url = rng.pick(schemes)
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                url += rng.pick(hosts) + rng.pick(extras)
            }
            url += rng.pick(["/x1/abc", "", "/a?b=c", "/a#f"])
            guard list.allows(url) else { continue }
            allowed += 1
            let parsed = try #require(URL(string: url), "\(url)")
            let host = (parsed.host ?? "").lowercased()
            let scheme = (parsed.scheme ?? "").lowercased()
            let okHost =
                (scheme == "https" && (host.hasSuffix(".hello.atlassian-dev.net") || host == "exact.example.com")
                    && (parsed.port == nil || parsed.port == 443))
                || (scheme == "http" && host == "127.0.0.1" && parsed.port == 8081)
            #expect(okHost, "allowed \(url) but the client would call \(scheme)://\(host):\(parsed.port ?? -1)")
            #expect(parsed.user == nil && parsed.password == nil, "\(url)")
        }
        #expect(allowed > 20)
    }
}

enum FuzzSupport {
    /// Percent-encodes everything but unreserved characters.
    static func encodedSegment(_ s: String) -> String {
        s.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~")))!
    }
}
