import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Issue #4 item 6: oversized, malformed or odd input gets a 4xx with the contract's error body,
/// never a 500, and changes nothing.
@Suite("Security: bad input", .serialized)
struct SecurityInputTests {
    static func port(_ h: GatewayHarness) -> Int { URLComponents(string: h.gatewayURL)!.port! }

    static func expectContractError(_ status: Int, _ code: String?, _ body: String, _ comment: Comment) {
        #expect((400..<500).contains(status), comment)
        #expect(code != nil, comment)
        #expect(!body.contains("internal_error"), comment)
    }

    @Test("request heads over the limit and unparsable requests get 400 invalid_request with the error body")
    func headerLimitsAndParserErrors() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/token"
            #expect(try await h.call(.GET, path).status == 200)
            let before = try await Security.settledSnapshot(of: installation, in: h.gateway.redis)
            let port = Self.port(h)

            // One header over the limit, and too many headers. (Written by hand: AsyncHTTPClient
            // traps when the answer arrives before it finished sending the head.)
            let auth = ("Authorization", "Bearer \(GatewayHarness.callerSecret)")
            let big = try await RawHTTP.request(
                "GET", path, headers: [auth, ("X-Padding", String(repeating: "a", count: 40 * 1024))], port: port)
            #expect(big.status == 400)
            #expect(big.errorCode == "invalid_request")
            #expect(big.raw.lowercased().contains("connection: close"))
            let crowded = try await RawHTTP.request(
                "GET", path, headers: [auth] + (0..<150).map { ("X-H\($0)", "v") }, port: port)
            #expect(crowded.status == 400)
            #expect(crowded.errorCode == "invalid_request")
            // A Forge call with a huge FIT header, and a huge request line.
            let fit = try await RawHTTP.request(
                "POST", "/forge/auth-trigger",
                headers: [("Authorization", "Bearer " + String(repeating: "e", count: 64 * 1024))],
                body: Array("{}".utf8),
                port: port)
            #expect(fit.status == 400)
            #expect(fit.errorCode == "invalid_request")
            let line = try await RawHTTP.request("GET", "/v1/" + String(repeating: "a", count: 100 * 1024), port: port)
            #expect(line.status == 400)
            #expect(line.errorCode == "invalid_request")

            // Just under the limit is fine.
            let fine = try await h.call(.GET, path, headers: ["x-padding": String(repeating: "a", count: 8 * 1024)])
            #expect(fine.status == 200)

            // Requests no client would send: refused before any route runs.
            for raw in [
                "GARBAGE\r\n\r\n", "GET /health/live HTTP/9.9\r\n\r\n",
                "GET /health/live HTTP/1.1\r\nno-colon-here\r\n\r\n",
                "GET /v1/installations/a\u{0}b/token HTTP/1.1\r\nHost: x\r\n\r\n",
                "POST /forge/auth-trigger HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}",
                "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Bad: a\u{1}b\r\n\r\n",
            ] {
                let answer = RawHTTP.Answer(raw: try await RawHTTP.send(Array(raw.utf8), port: port))
                #expect(answer.status == 400, "\(raw.debugDescription)")
                #expect(
                    answer.errorCode == "invalid_request", "\(raw.debugDescription): \(answer.raw.debugDescription)")
            }
            // Each of those ten answers is counted, under no route.
            let metrics = try await h.call(.GET, "/metrics")
            let unmatched = sample(
                metrics.body, "token_gateway_http_requests_total", ["route": "unmatched", "status": "400"])
            #expect((unmatched ?? 0) >= 10, "\(unmatched ?? -1)")
            // A body the parser refuses after a valid head: the route answers first (here: 401,
            // the FIT is checked before the body is read), then the connection is closed.
            let chunked = RawHTTP.Answer(
                raw: try await RawHTTP.send(
                    Array(
                        "POST /forge/auth-trigger HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".utf8),
                    port: port))
            #expect(chunked.status == 401)
            #expect(chunked.body.hasPrefix("{\"error\":{\"code\":\"invalid_invocation_token\""))
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            // The server still answers normally afterwards.
            #expect(try await h.call(.GET, "/health/live", secret: nil).status == 200)
        }
    }

    @Test("a request to switch protocols (h2c upgrade, CONNECT) is answered, then the connection is closed")
    func protocolSwitchesCloseTheConnection() async throws {
        try await GatewayHarness.run { h in
            let port = Self.port(h)
            for head in [
                "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
                "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            ] {
                // What follows is never parsed: sent after the switch, it must not pile up unread
                // on an open connection.
                let raw = head + "GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" + String(repeating: "x", count: 65536)
                let (received, closed) = try await RawHTTP.exchange(Array(raw.utf8), port: port, timeout: .seconds(10))
                #expect(closed, "\(head.debugDescription)")
                #expect(received.components(separatedBy: "HTTP/1.1 ").count == 2, "\(received.debugDescription)")
                #expect(received.lowercased().contains("\r\nconnection: close\r\n"), "\(head.debugDescription)")
            }
            #expect(try await h.call(.GET, "/health/live", secret: nil).status == 200)
        }
    }

    @Test(
        "HTTP framing: HTTP/1.0 and Connection: close end the connection; a malformed body or a malformed request after one gets one JSON 400 each"
    )
    func framingEdgeCases() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let port = Self.port(h)
            func answers(_ raw: String) -> [RawHTTP.Answer] {
                raw.components(separatedBy: "HTTP/1.1 ").dropFirst().map { RawHTTP.Answer(raw: "HTTP/1.1 " + $0) }
            }
            // HTTP/1.0 without keep-alive, and `Connection: Close` in any case: answered, then closed
            // (RFC 9112 §9.3, §9.6), the answer saying so.
            for raw in [
                "GET /health/live HTTP/1.0\r\n\r\n", "GET /health/live?x=1 HTTP/1.0\r\n\r\n",
                "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n",
                "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: CLOSE\r\n\r\n",
            ] {
                let (received, closed) = try await RawHTTP.exchange(Array(raw.utf8), port: port, timeout: .seconds(5))
                #expect(closed, "\(raw.debugDescription)")
                let all = answers(received)
                #expect(all.count == 1, "\(raw.debugDescription): \(received.debugDescription)")
                #expect(received.lowercased().contains("\r\nconnection: close\r\n"), "\(raw.debugDescription)")
            }
            // A malformed request right behind a well-formed one: each gets its JSON answer, in order.
            let pipelined = try await RawHTTP.send(
                Array("GET /nope HTTP/1.1\r\nHost: x\r\n\r\nFOO\r\n\r\n".utf8), port: port)
            let pair = answers(pipelined)
            #expect(pair.map(\.status) == [404, 400], "\(pipelined.debugDescription)")
            #expect(pair.map(\.errorCode) == ["not_found", "invalid_request"], "\(pipelined.debugDescription)")
            // A chunked body whose framing is malformed, on a route that reads its body: one answer,
            // 400 invalid_request (not 500), then the connection closes.
            let fit = try h.emulator.mintFIT(for: installation)
            let delivery = try await RawHTTP.send(
                Array(
                    ("POST /forge/auth-trigger HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(fit)\r\n"
                        + "x-forge-oauth-system: \(try h.emulator.mintAccessToken(for: installation))\r\n"
                        + "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").utf8),
                port: port)
            let refused = answers(delivery)
            #expect(refused.map(\.status) == [400], "\(delivery.debugDescription)")
            #expect(refused.first?.errorCode == "invalid_request")
            #expect(delivery.lowercased().contains("\r\nconnection: close\r\n"))
            // …and on a route that does not read it: one answer, then the connection closes.
            let token = try await RawHTTP.send(
                Array(
                    ("GET \(GatewayHarness.path(installation))/token HTTP/1.1\r\nHost: x\r\n"
                        + "Authorization: Bearer \(GatewayHarness.callerSecret)\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                        .utf8), port: port)
            #expect(answers(token).count == 1, "\(token.debugDescription)")
            // The server still answers normally afterwards.
            #expect(try await h.call(.GET, "/health/live", secret: nil).status == 200)
        }
    }

    /// What `/forge/auth-trigger` answers the bodies that are JSON objects: one without a string
    /// `requestId` is an unasked push (200, not stored: its token is older), one that is not valid
    /// JSON text is 400 `invalid_request`.
    static let authTriggerObjectStatus: [String: Int] = ["wrong type": 200, "lone surrogate": 400, "huge number": 400]

    /// One malformed body for the Forge routes: name, content type, body, expected status and code
    /// (nil code: any contract code), and whether it is a JSON object (which /forge/auth-trigger
    /// accepts as it is).
    typealias BadBody = (name: String, contentType: String?, body: String, status: Int, code: String?, object: Bool)

    /// The malformed bodies ``badBodies()`` sends to every Forge route.
    static func badBodyCases(triggerURL url: String) -> [BadBody] {
        let tooDeep =
            "{\"authTriggerUrl\":" + String(repeating: "[", count: 17) + String(repeating: "]", count: 17) + "}"
        let recursive = String(repeating: "[", count: 30_000) + String(repeating: "]", count: 30_000)
        return [
            ("truncated", "application/json", "{\"authTriggerUrl\":", 400, "invalid_request", false),
            ("not JSON", "application/json", "authTriggerUrl=x", 400, "invalid_request", false),
            ("array", "application/json", "[]", 400, "invalid_request", false),
            ("string", "application/json", "\"x\"", 400, "invalid_request", false),
            ("null", "application/json", "null", 400, "invalid_request", false),
            (
                "trailing garbage", "application/json", "{\"authTriggerUrl\":\"\(url)\"}x", 400,
                "invalid_request", false
            ),
            (
                "wrong type", "application/json", "{\"authTriggerUrl\":17,\"eventType\":17}", 400,
                "invalid_request", true
            ),
            ("too deep", "application/json", tooDeep, 400, "invalid_request", false),
            ("parser bomb", "application/json", recursive, 400, "invalid_request", false),
            ("lone surrogate", "application/json", "{\"authTriggerUrl\":\"\\ud800\"}", 400, nil, true),
            ("huge number", "application/json", "{\"authTriggerUrl\":1e999999}", 400, "invalid_request", true),
            ("text/plain", "text/plain", "{\"authTriggerUrl\":\"\(url)\"}", 400, "invalid_request", false),
            (
                "form", "application/x-www-form-urlencoded", "authTriggerUrl=\(url)", 400, "invalid_request",
                false
            ),
            ("no content type", nil, "{\"authTriggerUrl\":\"\(url)\"}", 400, "invalid_request", false),
            ("json-ish", "application/jsonx", "{\"authTriggerUrl\":\"\(url)\"}", 400, "invalid_request", false),
            (
                "too large", "application/json", "{\"x\":\"" + String(repeating: "a", count: 70 * 1024) + "\"}",
                413,
                "payload_too_large", false
            ),
            (
                "much too large", "application/json", String(repeating: " ", count: 2 << 20), 413,
                "payload_too_large",
                false
            ),
        ]
    }

    @Test("malformed JSON, deep JSON, wrong content types and huge bodies get 4xx and change nothing")
    func badBodies() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let url = h.emulator.triggerURL(for: installation)
            // A long-lived token first: the deliveries below carry an older one, so even those the
            // gateway accepts change nothing.
            #expect(
                try await h.emulator.push(installation, expiresAt: Date().addingTimeInterval(4 * 3600)).status == 200)
            let token = try h.emulator.mintAccessToken(for: installation)
            let before = try await Security.settledSnapshot(of: installation, in: h.gateway.redis)
            let cases = Self.badBodyCases(triggerURL: url)
            var accepted = 0
            for path in ["/forge/register", "/forge/lifecycle", "/forge/auth-trigger"] {
                for c in cases {
                    var headers = [
                        "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                        "x-forge-oauth-system": token,
                    ]
                    if let contentType = c.contentType { headers["content-type"] = contentType }
                    let answer = try await h.call(.POST, path, secret: nil, headers: headers, body: c.body)
                    if answer.status == 200 { accepted += 1 }
                    if path == "/forge/auth-trigger" && c.object {
                        // A JSON object is a delivery: never stored, the token is older than the stored one.
                        let expected = Self.authTriggerObjectStatus[c.name] ?? 0
                        #expect(answer.status == expected, "\(path) \(c.name): \(answer.body.prefix(200))")
                        if expected == 200 {
                            #expect(answer.json["stored"] as? Bool == false, "\(path) \(c.name)")
                        } else {
                            #expect(answer.errorCode == "invalid_request", "\(path) \(c.name)")
                        }
                    } else {
                        #expect(answer.status == c.status, "\(path) \(c.name): \(answer.body.prefix(200))")
                        if let code = c.code {
                            #expect(answer.errorCode == code, "\(path) \(c.name)")
                        } else {
                            Self.expectContractError(answer.status, answer.errorCode, answer.body, "\(path) \(c.name)")
                        }
                    }
                }
            }
            // A caller route given a body it does not expect: never a 500.
            let refresh = try await h.call(
                .GET, GatewayHarness.path(installation) + "/token", headers: ["content-type": "text/plain"],
                body: String(repeating: "[", count: 10_000))
            #expect(refresh.status == 200)
            // What the deliveries that were answered 200 left: the replay guard's note of their
            // FITs, and nothing else; a refused call's FIT was not used up.
            let after = try await Security.snapshot(of: installation, in: h.gateway.redis)
            func notes(_ snapshot: [String: [String]]) -> Int {
                snapshot.keys.filter { $0.contains(":seen-fit:") }.count
            }
            #expect(after.filter { !$0.key.contains(":seen-fit:") } == before.filter { !$0.key.contains(":seen-fit:") })
            #expect(notes(after) == notes(before) + accepted)
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test("odd installation ids in the path get 400 invalid_parameter (or 404 for another route), never 500")
    func oddPathSegments() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let before = try await Security.settledSnapshot(of: installation, in: h.gateway.redis)
            let port = Self.port(h)
            let auth = [("Authorization", "Bearer \(GatewayHarness.callerSecret)")]
            let invalid = [
                "%00", "a%00b", "..", "%2e%2e", ".hidden", String(repeating: "a", count: 129),
                String(repeating: "%41", count: 300), "%zz", "%", "%4", "%F0%28%8C%28", "%C0%AF", "caf%C3%A9", "a%20b",
                "a%2Fb", "ari%3Acloud%3Aecosystem%3A%3Ainstallation%2F", "ari:cloud:ecosystem::installation%2F..",
                "%7Bx%7D", "{x}", "a*b", "a%0Ab", "a%0D%0AX-Injected:%201", "%252e%252e",
                "ari%3Acloud%3Ajira%3A%3Asite%2F\(installation.uuid)",
            ]
            for segment in invalid {
                for (method, suffix) in [("GET", "/token"), ("POST", "/token/refresh"), ("GET", "")] {
                    let answer = try await RawHTTP.request(
                        method, "/v1/installations/\(segment)\(suffix)", headers: auth, port: port)
                    #expect(answer.status == 400, "\(method) \(segment)\(suffix)")
                    #expect(answer.errorCode == "invalid_parameter", "\(method) \(segment)\(suffix): \(answer.body)")
                    #expect(!answer.raw.contains("X-Injected"))
                }
            }
            for target in [
                "/v1/installations/../installations/x/token", "/v1/installations//token", "/v1/installations/a/b/token",
                "/v1//installations", "/%76%31/installations", "/v1/installations/a/token/../../b",
                "/" + String(repeating: "a/", count: 2000),
            ] {
                // Either the route it normalises to (`/v1//installations` is the listing) or a 4xx.
                let answer = try await RawHTTP.request("GET", target, headers: auth, port: port)
                if answer.status != 200 {
                    Self.expectContractError(answer.status, answer.errorCode, answer.body, "\(target)")
                }
            }
            // Unknown routes and wrong methods.
            let unknown = try await RawHTTP.request("GET", "/forge/register", port: port)
            #expect(unknown.status == 405)
            #expect(unknown.errorCode == "method_not_allowed")
            let nowhere = try await RawHTTP.request("DELETE", "/nowhere", port: port)
            #expect(nowhere.status == 404)
            #expect(nowhere.errorCode == "not_found")
            // Query parameters out of range.
            for query in [
                "minValidity=-1", "minValidity=7201", "minValidity=1e3", "timeout=99", "timeout=x", "timeout=30001",
                // Given twice, even with the same value.
                "minValidity=60&minValidity=60", "timeout=500&timeout=600", "asUser=557058:a&asUser=557058:b",
                "as%55ser=557058:a&asUser=557058:b", "min%56alidity=-1",
            ] {
                let answer = try await RawHTTP.request(
                    "GET", "/v1/installations/\(installation.uuid)/token?\(query)", headers: auth, port: port)
                #expect(answer.status == 400, "\(query)")
                #expect(answer.errorCode == "invalid_parameter", "\(query)")
            }
            for twice in ["limit=1&limit=2", "cursor=&cursor="] {
                let answer = try await RawHTTP.request("GET", "/v1/installations?\(twice)", headers: auth, port: port)
                #expect(answer.status == 400, "\(twice)")
                #expect(answer.errorCode == "invalid_parameter", "\(twice)")
            }
            for cursor in ["%zz", "not-base64!", Base64URL.encode(Array("ari:cloud:jira::site/x".utf8))] {
                let answer = try await RawHTTP.request(
                    "GET", "/v1/installations?cursor=\(cursor)", headers: auth, port: port)
                #expect(answer.status == 400, "cursor \(cursor)")
                #expect(answer.errorCode == "invalid_parameter", "cursor \(cursor)")
            }
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }
}
