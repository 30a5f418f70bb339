import FlowEngine
import ForgeEmulator
import Foundation
import Testing

@testable import TokenGateway

/// The answers written on the event loop (``FastAnswerHandler``) against the router's: the same
/// bytes, metrics, audit record and request log, in request order on a pipelined connection.
@Suite("Fast answers: the router's answer, written on the event loop")
struct FastAnswerTests {
    /// One answer read off a raw connection.
    struct RawAnswer {
        var statusLine: String
        var fields: [(name: String, value: String)]
        var body: String

        func field(_ name: String) -> String? {
            self.fields.first { $0.name.lowercased() == name.lowercased() }?.value
        }
    }

    /// Splits what a connection received into its answers (each with a `Content-Length`).
    static func answers(in raw: String) throws -> [RawAnswer] {
        var rest = Substring(raw)
        var out: [RawAnswer] = []
        while !rest.isEmpty {
            let headEnd = try #require(rest.range(of: "\r\n\r\n"), "no end of head in \(rest.prefix(200))")
            let lines = rest[..<headEnd.lowerBound].components(separatedBy: "\r\n")
            let fields = lines.dropFirst().map { line -> (name: String, value: String) in
                let colon = line.firstIndex(of: ":")!
                return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
            }
            let length = try #require(Int(fields.first { $0.name.lowercased() == "content-length" }?.value ?? ""))
            let bodyStart = headEnd.upperBound
            let bodyEnd = rest.utf8.index(bodyStart, offsetBy: length)
            out.append(RawAnswer(statusLine: lines[0], fields: fields, body: String(rest[bodyStart..<bodyEnd])))
            rest = rest[bodyEnd...]
        }
        return out
    }

    static func port(_ url: String) throws -> Int {
        try #require(Int(url.split(separator: ":").last ?? ""))
    }

    static func get(_ target: String, close: Bool = false, keepAlive: Bool = false) -> String {
        "GET \(target) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(GatewayHarness.callerSecret)\r\n"
            + (close ? "Connection: close\r\n" : "") + (keepAlive ? "Connection: keep-alive\r\n" : "") + "\r\n"
    }

    /// The token requests of `installation` that the fast answer takes (its bare id, its
    /// percent-encoded ARI with `Connection: keep-alive`) and one the router takes (a query parameter the fast answer does not
    /// read, which the route ignores), pipelined on one connection: the three answers are the
    /// same but for their request ids, and each is counted, audited and logged once.
    static func expectFastEqualsRouter(
        _ h: GatewayHarness, gateway: Gateway, url: String, _ installation: EmulatedInstallation, token: String
    ) async throws {
        let bare = String(installation.id.split(separator: "/").last!)
        let route = "/v1/installations/{id}/token"
        let fastBefore = gateway.fastAnswerCount.load(ordering: .relaxed)
        let countedBefore = Self.requestCount(gateway, route: route)
        let auditedBefore = Self.audited(h, installation)
        let raw = try await RawHTTP.send(
            Array(
                (Self.get("/v1/installations/\(bare)/token")
                    + Self.get(GatewayHarness.path(installation) + "/token", keepAlive: true)
                    + Self.get("/v1/installations/\(bare)/token?minValidity=300&unknown=1")
                    + Self.get("/health/live", close: true)).utf8), port: try Self.port(url))
        let answers = try Self.answers(in: raw)
        try #require(answers.count == 4, "\(raw.prefix(400))")
        #expect(gateway.fastAnswerCount.load(ordering: .relaxed) - fastBefore == 2)
        #expect(Self.requestCount(gateway, route: route) - countedBefore == 3)
        #expect(Self.audited(h, installation) - auditedBefore == 3)
        let routed = answers[2]
        #expect(routed.statusLine == "HTTP/1.1 200 OK")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(routed.body.utf8)) as? [String: Any])
        #expect(json["accessToken"] as? String == token)
        #expect(json["apiBaseUrl"] as? String == installation.apiBaseUrl)
        #expect(json["installationId"] as? String == installation.id)
        #expect(json["source"] as? String == "cache")
        for fast in answers[0...1] {
            #expect(fast.statusLine == routed.statusLine)
            #expect(fast.body == routed.body)
            #expect(fast.fields.map(\.name) == routed.fields.map(\.name))
            let varying: Set<String> = ["x-request-id", "date"]
            #expect(
                fast.fields.filter { !varying.contains($0.name.lowercased()) }.map(\.value)
                    == routed.fields.filter { !varying.contains($0.name.lowercased()) }.map(\.value))
            // Its request log line carries its request id, as the router's does.
            let id = try #require(fast.field("X-Request-Id"))
            #expect(
                h.logs.captured.contains {
                    $0.contains("msg=request") && $0.contains("http.request_id=\(id)")
                        && $0.contains("http.route=\(route)") && $0.contains("http.status=200")
                })
        }
        #expect(answers[3].body == #"{"status":"ok"}"#)
    }

    /// `token_gateway_http_requests_total` of `route` with status 200, as the gateway exposes it.
    static func requestCount(_ gateway: Gateway, route: String) -> Int {
        var bytes: [UInt8] = []
        gateway.registry.emit(into: &bytes)
        let prefix = #"token_gateway_http_requests_total{route="\#(route)",status="200"} "#
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix(prefix) {
            return Int(Double(line.dropFirst(prefix.count)) ?? -1)
        }
        return 0
    }

    static func audited(_ h: GatewayHarness, _ installation: EmulatedInstallation) -> Int {
        h.logs.captured.filter {
            $0.contains("audit.event=token_handed_out") && $0.contains("installation.id=\(installation.id)")
        }.count
    }

    @Test("a fast answer is the router's, whichever way the token entered, on both replicas", arguments: TokenEntry.all)
    func sameAsRouter(entry: TokenEntry) async throws {
        // A round trip whose trigger delivers nothing waits for a push, not for the grace to end.
        try await GatewayHarness.run(configure: { $0.flow.deliveryGrace = .seconds(60) }) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            try await h.withSecondGateway { url, other in
                let entered = try await entry.enter(
                    TokenEntryContext(h: h, installation: installation, gatewayURL: h.gatewayURL, otherURL: url))
                try await Self.expectFastEqualsRouter(
                    h, gateway: h.gateway, url: h.gatewayURL, installation, token: entered.token)
                // Its first answer may read Redis (through the router); then it holds the token.
                let first = try await h.call(.GET, GatewayHarness.path(installation) + "/token", at: url)
                #expect(first.json["accessToken"] as? String == entered.token)
                try await Self.expectFastEqualsRouter(h, gateway: other, url: url, installation, token: entered.token)
            }
        }
    }

    @Test("GET /health/live answered fast is the router's answer but for its request id")
    func healthSameAsRouter() async throws {
        try await GatewayHarness.run { h in
            let before = h.gateway.fastAnswerCount.load(ordering: .relaxed)
            // Two Authorization fields: a request the fast answer leaves to the router.
            let routed =
                "GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n"
            let raw = try await RawHTTP.send(
                Array((Self.get("/health/live") + routed + Self.get("/health/ready", close: true)).utf8),
                port: try Self.port(h.gatewayURL))
            let answers = try Self.answers(in: raw)
            try #require(answers.count == 3, "\(raw.prefix(400))")
            #expect(h.gateway.fastAnswerCount.load(ordering: .relaxed) - before == 1)
            let (fast, router) = (answers[0], answers[1])
            #expect(fast.statusLine == router.statusLine)
            #expect(fast.body == router.body)
            #expect(fast.body == #"{"status":"ok"}"#)
            #expect(fast.fields.map(\.name) == router.fields.map(\.name))
            let varying: Set<String> = ["x-request-id", "date"]
            #expect(
                fast.fields.filter { !varying.contains($0.name.lowercased()) }.map(\.value)
                    == router.fields.filter { !varying.contains($0.name.lowercased()) }.map(\.value))
        }
    }

    @Test("answers on a pipelined connection come in request order, whichever path writes them")
    func pipelinedOrder() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let held = try await h.token(installation)
            let token = try #require(held.json["accessToken"] as? String)
            let bare = String(installation.id.split(separator: "/").last!)
            let target = "/v1/installations/\(bare)/token"
            // A fast one, one the router answers after a Redis round trip, a fast-eligible one
            // behind it, and the router again (closing).
            let raw = try await RawHTTP.send(
                Array(
                    (Self.get(target) + Self.get("/health/ready") + Self.get(target) + Self.get(target + "?x=1")
                        + Self.get("/health/live", close: true)).utf8), port: try Self.port(h.gatewayURL))
            let answers = try Self.answers(in: raw)
            try #require(answers.count == 5, "\(raw.prefix(400))")
            for index in [0, 2, 3] { #expect(answers[index].body.contains(token), "answer \(index)") }
            #expect(answers[1].body == #"{"status":"ok","store":"ok"}"#)
            #expect(answers[4].body == #"{"status":"ok"}"#)
            let ids = answers.compactMap { $0.field("X-Request-Id") }
            #expect(Set(ids).count == 5)
        }
    }

    @Test("what the fast answer cannot serve in full goes to the router: errors, a token not held")
    func declined() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let bare = String(installation.id.split(separator: "/").last!)
            let before = h.gateway.fastAnswerCount.load(ordering: .relaxed)
            // Not held yet, forced by validity, a wrong secret, a malformed query.
            let cold = try await h.call(.GET, "/v1/installations/\(bare)/token?minValidity=7200")
            #expect(cold.status == 200 && cold.json["source"] as? String == "trigger", "\(cold.body)")
            let wrong = try await h.call(.GET, "/v1/installations/\(bare)/token", secret: "not-the-secret")
            #expect(wrong.status == 401)
            let bad = try await h.call(.GET, "/v1/installations/\(bare)/token?minValidity=99999")
            #expect(bad.status == 400)
            let unknown = try await h.call(.GET, "/v1/installations/not-an-id!/token")
            #expect(unknown.status == 400)
            #expect(h.gateway.fastAnswerCount.load(ordering: .relaxed) == before)
            // Held now: answered fast.
            let held = try await h.call(.GET, "/v1/installations/\(bare)/token")
            #expect(held.status == 200 && held.json["source"] as? String == "cache")
            #expect(h.gateway.fastAnswerCount.load(ordering: .relaxed) == before + 1)
        }
    }
}
