import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// A small deterministic PRNG (SplitMix64) for reproducible fuzz runs.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64

    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func pick<T>(_ items: [T]) -> T { items[Int.random(in: 0..<items.count, using: &self)] }

    mutating func text(_ count: Int, _ alphabet: [String]) -> String {
        (0..<count).map { _ in self.pick(alphabet) }.joined()
    }

    static func pieces(_ s: String) -> [String] { s.map(String.init) }

    static let alphabet = pieces("abcXYZ019-_.:/{}[]\",\\ %=+@#?&é😀\t\n") + ["\\u0000", "\\ud800", "1e999"]

    /// A random JSON-ish document: mostly objects with the fields the routes read, of random types.
    mutating func body(triggerURL: String) -> String {
        func value(_ depth: Int) -> String {
            switch Int.random(in: 0..<(depth > 0 ? 10 : 8), using: &self) {
            case 0: return "null"
            case 1: return self.pick(["true", "false"])
            case 2: return self.pick(["0", "-1", "1e999", "1.5", "99999999999999999999", "-0"])
            case 3: return "\"" + self.text(Int.random(in: 0..<20, using: &self), Self.alphabet) + "\""
            case 4: return "\"" + triggerURL + self.pick(["", "/x", "@evil.test", "#x", "?a=b"]) + "\""
            case 5:
                return "\""
                    + self.pick([
                        "avi:forge:installed:app", "avi:forge:upgraded:app", "avi:forge:uninstalled:app", "", "r-1",
                    ]) + "\""
            case 6: return "\"" + String(repeating: "a", count: Int.random(in: 100..<300, using: &self)) + "\""
            case 7: return self.text(Int.random(in: 0..<6, using: &self), Self.alphabet)
            case 8:
                let fields = (0..<Int.random(in: 0..<4, using: &self)).map { _ in
                    "\"" + self.pick(["authTriggerUrl", "eventType", "requestId", "rotateKey", "id", "x"]) + "\":"
                        + value(depth - 1)
                }
                return "{" + fields.joined(separator: ",") + "}"
            default:
                return "["
                    + (0..<Int.random(in: 0..<4, using: &self)).map { _ in value(depth - 1) }.joined(separator: ",")
                    + "]"
            }
        }
        switch Int.random(in: 0..<10, using: &self) {
        case 0: return ""
        case 1: return value(3)
        case 2: return String(repeating: "[", count: Int.random(in: 10..<5000, using: &self))
        default:
            let fields = (0..<Int.random(in: 0..<5, using: &self)).map { _ in
                "\"" + self.pick(["authTriggerUrl", "eventType", "requestId", "rotateKey", "id", "x"]) + "\":"
                    + value(3)
            }
            return "{" + fields.joined(separator: ",") + "}"
        }
    }
}

/// Issue #4 item 8, over HTTP: a few hundred random bodies, headers, queries and paths against the
/// running gateway; every answer is 2xx or a 4xx with the contract's error body, never a 5xx.
@Suite("Fuzz: HTTP routes", .serialized)
struct SecurityFuzzTests {
    static func expectNoServerError(_ status: Int, _ body: String, _ what: String) {
        #expect(status < 500, "\(what) → \(status) \(body.prefix(200))")
        if status >= 400 {
            let json = (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any]
            #expect((json?["error"] as? [String: Any])?["code"] is String, "\(what) → \(status) without an error body")
        }
    }

    @Test("random bodies and token headers on every Forge route: never a 5xx")
    func forgeRoutes() async throws {
        try await GatewayHarness.run { h in
            var rng = SeededRandom(state: 0x464F_5247)
            let installations = [try await h.installed(), try await h.installed(), try await h.installed()]
            for (index, path) in ["/forge/register", "/forge/lifecycle", "/forge/auth-trigger"].enumerated() {
                let installation = installations[index]
                let triggerURL = h.emulator.triggerURL(for: installation)
                for round in 0..<100 {
                    let body = rng.body(triggerURL: triggerURL)
                    var headers = [
                        "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                        "content-type": rng.pick([
                            "application/json", "application/json", "text/plain", "application/json; charset=utf-8",
                        ]),
                    ]
                    switch round % 4 {
                    case 0: headers["x-forge-oauth-system"] = try h.emulator.mintAccessToken(for: installation)
                    case 1:
                        headers["x-forge-oauth-system"] = rng.text(
                            Int.random(in: 1..<80, using: &rng), SeededRandom.pieces("abc.XYZ_-=09 "))
                    case 2:
                        let exp = rng.pick(["1", "-5", "\"x\"", "1e300", "null", "9999999999", "{}"])
                        headers["x-forge-oauth-system"] =
                            "e30." + Base64URL.encode(Array("{\"exp\":\(exp)}".utf8)) + "."
                            + rng.text(8, SeededRandom.pieces("abc"))
                    default: break
                    }
                    let answer = try await h.call(.POST, path, secret: nil, headers: headers, body: body)
                    Self.expectNoServerError(answer.status, answer.body, "\(path) \(body.prefix(80))")
                }
            }
            #expect(try await h.call(.GET, "/health/ready", secret: nil).status == 200)
        }
    }

    @Test("random query strings and path segments on the caller routes: never a 5xx")
    func callerRoutes() async throws {
        try await GatewayHarness.run { h in
            var rng = SeededRandom(state: 0x4341_4C4C)
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let port = URLComponents(string: h.gatewayURL)!.port!
            let auth = [("Authorization", "Bearer \(GatewayHarness.callerSecret)")]
            let queryAlphabet = SeededRandom.pieces("minValidtyoeurslcLmi=&%0123456789-+.eE;,xyz")
            for _ in 0..<100 {
                let query =
                    rng.pick(["minValidity=", "timeout=", "limit=", "cursor=", ""])
                    + rng.text(Int.random(in: 0..<24, using: &rng), queryAlphabet)
                let answer = try await RawHTTP.request(
                    "GET", "/v1/installations/\(installation.uuid)/token?\(query)", headers: auth, port: port)
                Self.expectNoServerError(answer.status, answer.body, "query \(query)")
                let list = try await RawHTTP.request("GET", "/v1/installations?\(query)", headers: auth, port: port)
                Self.expectNoServerError(list.status, list.body, "list query \(query)")
            }
            let segmentAlphabet =
                SeededRandom.pieces("abcXYZ019-_.:%2F3Aa{}~*!$'()+,;=@") + ["%00", "%zz", "%C3%A9", "%2e%2e", "%25"]
            for _ in 0..<150 {
                let segment = rng.text(Int.random(in: 0..<40, using: &rng), segmentAlphabet)
                let method = rng.pick(["GET", "POST", "PUT", "DELETE", "PATCH"])
                let suffix = rng.pick(["/token", "/token/refresh", "", "/x"])
                let answer = try await RawHTTP.request(
                    method, "/v1/installations/\(segment)\(suffix)", headers: auth, port: port)
                Self.expectNoServerError(answer.status, answer.body, "\(method) \(segment)\(suffix)")
            }
            #expect(try await h.call(.GET, "/health/live", secret: nil).status == 200)
        }
    }

    @Test("random signed installs, Connect JWTs and OAuth forms over HTTP: never a 5xx, nothing stored")
    func connectAndOAuthRoutes() async throws {
        try await GatewayHarness.runConnect { h in
            var rng = SeededRandom(state: 0x434F_4E46)
            let installation = try await h.installed()
            let tenant = h.emulator.makeConnectTenant(linkedTo: installation)
            #expect(try await h.emulator.connectInstall(tenant).status == 204)
            let tokenAlphabet = SeededRandom.pieces("eyJhbGciOiJSUzI1NiJ9._-abcXYZ019=+/ ")
            let formAlphabet =
                SeededRandom.pieces("abc_=&%+2F0Az-.~:") + ["grant_type=", "client_credentials", "%zz", "&&"]
            var strangers: [String] = []
            for round in 0..<120 {
                // Signed installs: a genuine token with a random body, or a random token.
                let clientKey = "fuzz-\(round)-\(UUID().uuidString.prefix(8))"
                strangers.append(clientKey)
                let authorization =
                    round % 2 == 0
                    ? "JWT " + (try h.emulator.mintSignedInstall(for: tenant, path: "/connect/installed"))
                    : rng.pick(["JWT ", "Bearer ", ""]) + rng.text(Int.random(in: 0..<200, using: &rng), tokenAlphabet)
                let body = rng.pick([
                    #"{"clientKey":"\#(clientKey)","sharedSecret":"s","key":"k","baseUrl":"https://x.atlassian.net"}"#,
                    rng.body(triggerURL: "https://x"), "", "[]", "{",
                ])
                let install = try await h.call(
                    .POST, rng.pick(["/connect/installed", "/connect/uninstalled"]), secret: nil,
                    headers: ["authorization": authorization, "content-type": "application/json"], body: body)
                Self.expectNoServerError(install.status, install.body, "signed install \(body.prefix(60))")

                // Connect JWTs on the caller routes.
                let jwt = rng.pick([
                    h.emulator.mintConnectJWT(for: tenant, method: "GET", url: "/x"),
                    rng.text(Int.random(in: 0..<160, using: &rng), tokenAlphabet),
                ])
                let verify = try await h.call(
                    .POST, "/v1/connect/verify", headers: ["content-type": "application/json"],
                    body: rng.pick([
                        #"{"jwt":"\#(jwt)","method":"GET","url":"/x"}"#, #"{"jwt":"\#(jwt)"}"#,
                        rng.body(triggerURL: "/x"),
                    ]))
                Self.expectNoServerError(verify.status, verify.body, "verify")
                let sign = try await h.call(
                    .POST, "/v1/connect/sign", headers: ["content-type": "application/json"],
                    body: rng.pick([
                        #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"\#(tenant.baseUrl)/\#(rng.text(8, tokenAlphabet))"}"#,
                        rng.body(triggerURL: tenant.baseUrl),
                    ]))
                Self.expectNoServerError(sign.status, sign.body, "sign")

                // OAuth forms, with and without client authentication.
                let form = rng.text(Int.random(in: 0..<120, using: &rng), formAlphabet)
                let oauth = try await h.call(
                    .POST, "/oauth/token", secret: nil,
                    headers: ["content-type": rng.pick(["application/x-www-form-urlencoded", "text/plain"])],
                    body: rng.pick([form, "grant_type=client_credentials&" + form, "subject_token=\(jwt)&" + form]))
                #expect(oauth.status < 500, "oauth \(form) → \(oauth.status)")
                if oauth.status >= 400 { #expect(oauth.json["error"] is String, "oauth \(form) → \(oauth.body)") }
            }
            // Nothing a refused request sent was stored.
            for clientKey in strangers {
                #expect(try await h.gateway.store.connectTenant(clientKey) == nil)
            }
            #expect(try await h.call(.GET, "/health/ready", secret: nil).status == 200)
        }
    }
}
