import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Synchronization
import Testing

@testable import TokenGateway

/// Runs `Tests/Integration/openapi_check.py` (see its header) and hands over what a real gateway
/// answered, so `Docs/` cannot drift from the code.
enum DocumentationCheck {
    /// The repository root (this file is `Tests/Integration/OpenAPIConformanceTests.swift`).
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    static func path(_ relative: String) -> String { root.appendingPathComponent(relative).path }

    static var script: String { path("Tests/Integration/openapi_check.py") }

    /// Removes a file made by ``temporaryFile(_:contents:)`` with its directory.
    static func removeTemporaryFile(_ path: String) {
        try? FileManager.default.removeItem(at: URL(fileURLWithPath: path).deletingLastPathComponent())
    }

    /// A new file in a fresh temporary directory (remove it with ``removeTemporaryFile(_:)``).
    static func temporaryFile(_ name: String, contents: Data) throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "tg-doc-check-" + UUID().uuidString)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let file = directory.appendingPathComponent(name)
        try contents.write(to: file)
        return file.path
    }

    struct Outcome: Sendable {
        let status: Int32
        let output: String
    }

    /// Runs the checker with `arguments`; its standard output and error together.
    static func run(_ arguments: [String]) async throws -> Outcome {
        let output = try temporaryFile("output.txt", contents: Data())
        defer { removeTemporaryFile(output) }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script] + arguments
        process.standardOutput = handle
        process.standardError = handle
        process.currentDirectoryURL = root
        let status: Int32 = try await withCheckedThrowingContinuation { continuation in
            process.terminationHandler = { continuation.resume(returning: $0.terminationStatus) }
            do {
                try process.run()
            } catch {
                process.terminationHandler = nil
                continuation.resume(throwing: error)
            }
        }
        try handle.close()
        let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        return Outcome(status: status, output: text)
    }

    /// Waits until `condition` holds, polling with a deadline (no fixed sleeps).
    static func eventually(
        within limit: Duration = .seconds(10), _ what: String, _ condition: @Sendable () async throws -> Bool
    ) async throws {
        let deadline = ContinuousClock.now + limit
        var delay = Duration.milliseconds(10)
        while ContinuousClock.now < deadline {
            if try await condition() { return }
            try await Task.sleep(for: delay)
            delay = min(delay * 2, .milliseconds(200))
        }
        Issue.record("timed out waiting for \(what)")
    }

    /// The routes `gateway`'s routers serve, as `{"method", "path"}`.
    static func servedRoutes(of gateway: Gateway) -> [[String: String]] {
        gateway.knownRoutes.flatMap { route in
            route.methods.map { ["method": $0.rawValue, "path": "/" + route.segments.joined(separator: "/")] }
        }
    }
}

/// Every answer a test gets from the gateway, with the path template it belongs to.
final class AnswerRecorder: Sendable {
    struct Entry: Sendable {
        let method: String
        let template: String
        let status: Int
        let headers: [String: String]
        let body: String
        let note: String
        let generic: Bool
    }

    private let entries = Mutex<[Entry]>([])
    /// The routes the gateway the answers came from serves (``DocumentationCheck/servedRoutes(of:)``).
    private let servedRoutes = Mutex<[[String: String]]>([])

    /// Notes the routes `gateway` serves, for the check that each of them is described.
    func noteServedRoutes(of gateway: Gateway) {
        self.servedRoutes.withLock { routes in
            if routes.isEmpty { routes = DocumentationCheck.servedRoutes(of: gateway) }
        }
    }

    /// Records `answer` as the answer to `method template`; `generic` answers (unknown route, wrong
    /// method) are checked against the common error body only.
    @discardableResult
    func record(
        _ method: HTTPMethod, _ template: String, _ answer: GatewayHarness.Answer, note: String, generic: Bool = false
    ) -> GatewayHarness.Answer {
        let entry = Entry(
            method: method.rawValue, template: template, status: answer.status, headers: answer.headers,
            body: answer.body, note: note, generic: generic)
        self.entries.withLock { $0.append(entry) }
        return answer
    }

    var count: Int { self.entries.withLock { $0.count } }

    /// The `(method template status)` triples recorded.
    var statuses: Set<String> {
        self.entries.withLock { Set($0.map { "\($0.method) \($0.template) \($0.status)" }) }
    }

    /// Validates every recorded answer against `Docs/openapi.yaml`; fails the test with the
    /// checker's full report when one does not match.
    func check(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        // Every 401 names its scheme (RFC 9110 §15.5.2), whatever the route.
        let unchallenged = self.entries.withLock { entries in
            entries.filter { entry in
                entry.status == 401 && !entry.headers.keys.contains { $0.lowercased() == "www-authenticate" }
            }.map { "\($0.method) \($0.template) (\($0.note))" }
        }
        #expect(unchallenged.isEmpty, "401 without WWW-Authenticate: \(unchallenged)", sourceLocation: sourceLocation)
        let records: [[String: Any]] = self.entries.withLock { entries in
            entries.map {
                [
                    "method": $0.method, "path": $0.template, "status": $0.status, "headers": $0.headers,
                    "body": $0.body, "note": $0.note, "generic": $0.generic,
                ]
            }
        }
        let recordsFile = try DocumentationCheck.temporaryFile(
            "records.json", contents: try JSONSerialization.data(withJSONObject: records, options: [.prettyPrinted]))
        let routesFile = try DocumentationCheck.temporaryFile(
            "routes.json", contents: try JSONSerialization.data(withJSONObject: self.servedRoutes.withLock { $0 }))
        defer {
            DocumentationCheck.removeTemporaryFile(recordsFile)
            DocumentationCheck.removeTemporaryFile(routesFile)
        }
        let outcome = try await DocumentationCheck.run([
            "responses", DocumentationCheck.path("Docs/openapi.yaml"), recordsFile, "--routes", routesFile,
        ])
        if outcome.status == 0 { print(outcome.output) }
        #expect(
            outcome.status == 0, "Docs/openapi.yaml does not describe what the gateway answered:\n\(outcome.output)",
            sourceLocation: sourceLocation)
    }
}

extension GatewayHarness {
    /// Calls the gateway, records the answer under `template`, and expects `status`.
    @discardableResult
    func recorded(
        _ recorder: AnswerRecorder, _ method: HTTPMethod, _ path: String, template: String, status: Int, note: String,
        secret: String? = GatewayHarness.callerSecret, headers: [String: String] = [:], body: String? = nil,
        generic: Bool = false, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws -> Answer {
        let answer = try await self.call(method, path, secret: secret, headers: headers, body: body)
        #expect(
            answer.status == status, "\(note): expected \(status), got \(answer.status) \(answer.body)",
            sourceLocation: sourceLocation)
        recorder.noteServedRoutes(of: self.gateway)
        return recorder.record(method, template, answer, note: note, generic: generic)
    }

    /// Headers of a call Forge makes through `invokeRemote`: a fresh FIT, JSON, and `extra`.
    func forgeHeaders(_ installation: EmulatedInstallation, _ extra: [String: String] = [:]) throws -> [String: String]
    {
        var headers = [
            "authorization": "Bearer " + (try self.emulator.mintFIT(for: installation)),
            "content-type": "application/json",
        ]
        headers.merge(extra) { $1 }
        return headers
    }

    /// Forge's documented lifecycle body: no `eventType` (installed or upgraded).
    static func documentedLifecycleBody(_ installation: EmulatedInstallation) -> String {
        """
        {"id":"\(installation.id)","installerAccountId":"557058:installer","app":{"id":"\(ForgeEmulatorConfiguration.demoAppId)",\
        "version":"1.0.0","name":"Companion","ownerAccountId":"557058:owner"},"environment":{"id":"env-1"}}
        """
    }

    /// Headers of a call from a UI module in a user's browser: a FIT with a UI module type,
    /// `principal` and `context`, JSON, and `extra`.
    func uiHeaders(_ installation: EmulatedInstallation, _ extra: [String: String] = [:]) throws -> [String: String] {
        var headers = [
            "authorization": "Bearer " + (try self.emulator.mintFIT(for: installation, options: .ui())),
            "content-type": "application/json",
        ]
        headers.merge(extra) { $1 }
        return headers
    }

    /// A Forge lifecycle body with an `eventType`.
    static func lifecycleBody(_ event: ForgeLifecycleEvent, _ installation: EmulatedInstallation) -> String {
        """
        {"eventType":"\(event.rawValue)","id":"\(installation.id)","app":{"id":"\(ForgeEmulatorConfiguration.demoAppId)","version":"1.0.0"},\
        "environment":{"id":"env-1"},"context":"\(installation.siteARI)"}
        """
    }
}

@Suite("OpenAPI description matches real answers")
struct OpenAPIConformanceTests {
    static let token = "/v1/installations/{installationId}/token"
    static let refresh = "/v1/installations/{installationId}/token/refresh"
    static let installation = "/v1/installations/{installationId}"
    static let list = "/v1/installations"

    @Test("Docs/openapi.yaml is a valid OpenAPI 3.1 document")
    func documentIsValid() async throws {
        let outcome = try await DocumentationCheck.run(["spec", DocumentationCheck.path("Docs/openapi.yaml")])
        #expect(outcome.status == 0, "\(outcome.output)")
    }

    @Test("the caller routes answer as described: token, metadata, list and every error of the token flow")
    func callerRoutes() async throws {
        let r = AnswerRecorder()
        try await GatewayHarness.run(configure: {
            $0.flow.maxAttempts = 2
            $0.flow.deliveryGrace = .milliseconds(300)
            $0.flow.breakerThreshold = 1
            // Long enough that the circuit is still open for the OAuth 503 at the end.
            $0.flow.breakerOpenBase = .seconds(120)
            $0.flow.breakerOpenCap = .seconds(120)
        }) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)

            // 200: cold (trigger), cached, forced refresh, by bare id.
            try await h.recorded(r, .GET, path + "/token", template: Self.token, status: 200, note: "cold fetch")
            try await h.recorded(
                r, .GET, path + "/token?minValidity=60&timeout=5000", template: Self.token, status: 200, note: "cached")
            try await h.recorded(
                r, .POST, path + "/token/refresh", template: Self.refresh, status: 200, note: "forced refresh")
            try await h.recorded(
                r, .GET, "/v1/installations/\(installation.uuid)/token", template: Self.token, status: 200,
                note: "bare id")

            // Metadata and pages.
            try await h.recorded(r, .GET, path, template: Self.installation, status: 200, note: "metadata")
            let page = try await h.recorded(
                r, .GET, "/v1/installations?limit=1", template: Self.list, status: 200, note: "first page")
            if let cursor = page.json["nextCursor"] as? String {
                try await h.recorded(
                    r, .GET, "/v1/installations?limit=2&cursor=\(cursor)", template: Self.list, status: 200,
                    note: "next page")
            }
            try await h.recorded(r, .GET, "/v1/installations", template: Self.list, status: 200, note: "default page")

            try await Self.recordCallerRefusals(r, h, path: path)
            let failing = try await Self.recordTokenFailures(r, h)

            // Answers every route can give.
            try await h.recorded(
                r, .GET, "/no/such/route", template: "/no/such/route", status: 404, note: "unknown route", generic: true
            )
            try await h.recorded(
                r, .DELETE, path + "/token", template: Self.token, status: 405, note: "wrong method", generic: true)
            // Connect is off in this harness: its routes answer 404 not_found, as described.
            try await h.recorded(
                r, .POST, "/v1/connect/sign", template: "/v1/connect/sign", status: 404, note: "Connect off",
                headers: ["content-type": "application/json"],
                body: #"{"clientKey":"c","method":"GET","url":"https://x.test/"}"#)

            // Operations.
            try await h.recorded(
                r, .GET, "/health/live", template: "/health/live", status: 200, note: "live", secret: nil)
            try await h.recorded(
                r, .GET, "/health/ready", template: "/health/ready", status: 200, note: "ready", secret: nil)
            try await h.recorded(r, .GET, "/metrics", template: "/metrics", status: 200, note: "metrics", secret: nil)

            try await Self.recordOAuth(r, h, installation: installation, unavailable: failing)
        }
        #expect(r.count >= 35)
        try await r.check()
    }

    @Test("the Forge routes answer as described: register, auth-trigger, lifecycle and their errors")
    func forgeRoutes() async throws {
        let r = AnswerRecorder()
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let register = #"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))"}"#

            try await Self.recordForgeLifecycle(r, h, installation: installation)
            try await Self.recordForgeRegister(r, h, installation: installation, register: register)
            try await Self.recordForgeAuthTrigger(r, h, installation: installation)
            try await Self.recordForgeUninstall(r, h, installation: installation, register: register)
        }
        try await r.check()
    }

    @Test("the Connect routes answer as described: lifecycle, verify, sign and their errors")
    func connectRoutes() async throws {
        let r = AnswerRecorder()
        try await GatewayHarness.runConnect { h in
            let tenant = h.emulator.makeConnectTenant()
            let installBody = String(
                decoding: h.emulator.connectLifecyclePayload(.installed, tenant: tenant), as: UTF8.self)
            func signed(_ path: String) throws -> [String: String] {
                [
                    "authorization": "JWT " + (try h.emulator.mintSignedInstall(for: tenant, path: path)),
                    "content-type": "application/json",
                ]
            }
            try await h.recorded(
                r, .POST, "/connect/installed", template: "/connect/installed", status: 204, note: "installed",
                secret: nil,
                headers: try signed("/connect/installed"), body: installBody)
            var unpublished = SignedInstallOptions()
            unpublished.signWithUnpublishedKey = true
            try await h.recorded(
                r, .POST, "/connect/installed", template: "/connect/installed", status: 401, note: "bad signature",
                secret: nil,
                headers: [
                    "authorization": "JWT "
                        + (try h.emulator.mintSignedInstall(
                            for: tenant, path: "/connect/installed", options: unpublished)),
                    "content-type": "application/json",
                ], body: installBody)

            try await Self.recordConnectVerify(r, h, tenant: tenant)
            try await Self.recordConnectSign(r, h, tenant: tenant)

            // Token exchange needs a tenant linked to an installed Forge installation.
            let installation = try await h.installed()
            let linked = h.emulator.makeConnectTenant(linkedTo: installation)
            #expect(try await h.emulator.connectInstall(linked).status == 204)
            try await Self.recordTokenExchange(r, h, tenant: linked)

            try await h.recorded(
                r, .POST, "/connect/uninstalled", template: "/connect/uninstalled", status: 204, note: "uninstalled",
                secret: nil, headers: try signed("/connect/uninstalled"),
                body: String(decoding: h.emulator.connectLifecyclePayload(.uninstalled, tenant: tenant), as: UTF8.self))
            try await h.recorded(
                r, .POST, "/v1/connect/sign", template: "/v1/connect/sign", status: 404, note: "uninstalled tenant",
                headers: ["content-type": "application/json"],
                body: #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"\#(tenant.baseUrl)/x"}"#)
        }
        try await r.check()
    }

    @Test("with Redis unreachable the answers are as described: 503 store_unavailable with Retry-After")
    func storeDown() async throws {
        let r = AnswerRecorder()
        // Nothing listens on port 1 of the loopback: every connection is refused at once.
        try await GatewayHarness.run(redisURL: "redis://127.0.0.1:1/0") { h in
            let installation = h.emulator.makeInstallation()
            let path = GatewayHarness.path(installation)
            try await h.recorded(
                r, .GET, "/health/ready", template: "/health/ready", status: 503, note: "not ready", secret: nil)
            try await h.recorded(
                r, .GET, "/health/live", template: "/health/live", status: 200, note: "still live", secret: nil)
            try await h.recorded(r, .GET, path + "/token", template: Self.token, status: 503, note: "token, store down")
            try await h.recorded(
                r, .POST, path + "/token/refresh", template: Self.refresh, status: 503, note: "refresh, store down")
            try await h.recorded(r, .GET, path, template: Self.installation, status: 503, note: "metadata, store down")
            try await h.recorded(
                r, .GET, "/v1/installations", template: Self.list, status: 503, note: "list, store down")
            // The FIT replay guard needs Redis too: Forge's calls get 503 (Forge may retry), nothing is stored.
            try await h.recorded(
                r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 503,
                note: "delivery, store down",
                secret: nil,
                headers: try h.forgeHeaders(
                    installation, ["x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation)]),
                body: "{}")
        }
        try await r.check()
    }

    @Test("user tokens (asUser) answer as described: exchange, cache and their errors")
    func userTokens() async throws {
        let r = AnswerRecorder()
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/token"
            try await h.recorded(
                r, .GET, path + "?asUser=557058:alice", template: Self.token, status: 200, note: "exchange")
            try await h.recorded(
                r, .GET, path + "?asUser=557058:alice", template: Self.token, status: 200, note: "cached user token")
            try await h.recorded(
                r, .POST, GatewayHarness.path(installation) + "/token/refresh?asUser=557058:alice",
                template: Self.refresh,
                status: 200, note: "forced exchange")
            try await h.recorded(
                r, .GET, path + "?asUser=bad%20account", template: Self.token, status: 400, note: "malformed account")
            h.emulator.refuseUserTokens(for: "557058:bob")
            try await h.recorded(
                r, .GET, path + "?asUser=557058:bob", template: Self.token, status: 403, note: "refused user")
            h.emulator.setGraphQLFault(.failWith(status: 503, times: 100))
            try await h.recorded(
                r, .GET, path + "?asUser=557058:carol", template: Self.token, status: 502, note: "exchange fails")
            h.emulator.setGraphQLFault(.none)
        }
        // A budget of one exchange a minute (counted in Redis per app, so a fresh app id keeps it
        // this test's own): the second exchange within the minute is 429 rate_limited.
        let app = "ari:cloud:ecosystem::app/" + UUID().uuidString.lowercased()
        try await GatewayHarness.run(
            configure: {
                $0.forgeAppID = app
                $0.userExchangesPerMinute = 1
            },
            emulatorConfigure: { $0.appId = app }
        ) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/token"
            try await h.recorded(
                r, .GET, path + "?asUser=557058:budget-1", template: Self.token, status: 200, note: "within budget")
            try await h.recorded(
                r, .GET, path + "?asUser=557058:budget-2", template: Self.token, status: 429, note: "budget spent")
        }
        try await r.check()
    }

    /// The OAuth face (contract §8), once its routes are served: discovery, both grants, and
    /// the RFC 6749 errors.
    static func recordOAuth(
        _ r: AnswerRecorder, _ h: GatewayHarness, installation: EmulatedInstallation,
        unavailable: EmulatedInstallation
    ) async throws {
        // The OAuth face is always served (contract §8): a missing discovery document is a failure,
        // never a reason to skip the checks below.
        let discovery = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
        try #require(discovery.status == 200, "discovery answered \(discovery.status)")
        r.record(.GET, "/.well-known/oauth-authorization-server", discovery, note: "discovery")
        let form = ["content-type": "application/x-www-form-urlencoded"]
        let basic = "Basic " + Data("full:\(GatewayHarness.callerSecret)".utf8).base64EncodedString()
        let resource = installation.id.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 200, note: "client credentials (basic)",
            secret: nil, headers: form.merging(["authorization": basic]) { $1 },
            body: "grant_type=client_credentials&resource=\(resource)")
        let secret = GatewayHarness.callerSecret.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 200, note: "client credentials (post)",
            secret: nil, headers: form,
            body: "grant_type=client_credentials&client_id=full&client_secret=\(secret)&resource=\(resource)")
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 401, note: "invalid client", secret: nil,
            headers: form, body: "grant_type=client_credentials&client_id=full&client_secret=wrong&resource=\(resource)"
        )
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 400, note: "unsupported grant", secret: nil,
            headers: form.merging(["authorization": basic]) { $1 }, body: "grant_type=password&resource=\(resource)")
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 400, note: "missing resource", secret: nil,
            headers: form.merging(["authorization": basic]) { $1 }, body: "grant_type=client_credentials")
        let unknown = h.emulator.makeInstallation().id.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 400, note: "unknown installation", secret: nil,
            headers: form.merging(["authorization": basic]) { $1 },
            body: "grant_type=client_credentials&resource=\(unknown)")
        let open = unavailable.id.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 503, note: "circuit open", secret: nil,
            headers: form.merging(["authorization": basic]) { $1 },
            body: "grant_type=client_credentials&resource=\(open)")
    }

    /// `POST /forge/lifecycle`: each event kind and each refusal.
    static func recordForgeLifecycle(
        _ r: AnswerRecorder, _ h: GatewayHarness, installation: EmulatedInstallation
    ) async throws {
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200, note: "installed", secret: nil,
            headers: try h.forgeHeaders(installation), body: GatewayHarness.lifecycleBody(.installed, installation))
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200, note: "upgraded", secret: nil,
            headers: try h.forgeHeaders(installation), body: GatewayHarness.lifecycleBody(.upgraded, installation))
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200, note: "ignored event", secret: nil,
            headers: try h.forgeHeaders(installation), body: #"{"eventType":"avi:forge:something:else"}"#)
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200,
            note: "documented body, no eventType",
            secret: nil, headers: try h.forgeHeaders(installation),
            body: GatewayHarness.documentedLifecycleBody(installation))
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200, note: "with a system token",
            secret: nil,
            headers: try h.forgeHeaders(
                installation, ["x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation)]),
            body: GatewayHarness.documentedLifecycleBody(installation))
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 400, note: "eventType not a string",
            secret: nil, headers: try h.forgeHeaders(installation), body: #"{"eventType":42}"#)
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 403, note: "UI module FIT", secret: nil,
            headers: try h.uiHeaders(installation), body: GatewayHarness.documentedLifecycleBody(installation))
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 401, note: "no FIT", secret: nil,
            headers: ["content-type": "application/json"], body: GatewayHarness.lifecycleBody(.installed, installation))
    }

    /// `POST /forge/register`: registration, a pushed token, key rotation and each refusal.
    static func recordForgeRegister(
        _ r: AnswerRecorder, _ h: GatewayHarness, installation: EmulatedInstallation, register: String
    ) async throws {
        // /forge/register.
        let first = try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 200, note: "register", secret: nil,
            headers: try h.forgeHeaders(installation), body: register)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 200, note: "register with a pushed token",
            secret: nil,
            headers: try h.forgeHeaders(
                installation, ["x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation)]),
            body: register)
        let rotated = try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 200, note: "key rotation", secret: nil,
            headers: try h.forgeHeaders(installation),
            body: #"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))","rotateKey":true}"#)
        #expect(rotated.json["triggerKeyId"] as? String == first.json["triggerKeyId"] as? String)
        #expect(rotated.json["nextTriggerKeyId"] is String)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 400, note: "URL off the allow-list",
            secret: nil, headers: try h.forgeHeaders(installation),
            body: #"{"authTriggerUrl":"https://attacker.example.com/x"}"#)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 400, note: "no URL", secret: nil,
            headers: try h.forgeHeaders(installation), body: "{}")
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 400, note: "wrong content type",
            secret: nil, headers: try h.forgeHeaders(installation, ["content-type": "text/plain"]), body: register)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 403, note: "UI module FIT", secret: nil,
            headers: try h.uiHeaders(installation), body: register)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 401, note: "bad FIT", secret: nil,
            headers: ["authorization": "Bearer not.a.fit", "content-type": "application/json"], body: register)
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 413, note: "body too large",
            secret: nil, headers: try h.forgeHeaders(installation),
            body: #"{"authTriggerUrl":""# + String(repeating: "a", count: 70 * 1024) + #""}"#)
    }

    /// `POST /forge/auth-trigger`: stored, not newer, and each refusal or lifetime rule.
    static func recordForgeAuthTrigger(
        _ r: AnswerRecorder, _ h: GatewayHarness, installation: EmulatedInstallation
    ) async throws {
        // /forge/auth-trigger.
        let token = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7200))
        let stored = try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 200, note: "push", secret: nil,
            headers: try h.forgeHeaders(installation, ["x-forge-oauth-system": token]), body: "{}")
        #expect(stored.json["stored"] as? Bool == true)
        let again = try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 200, note: "not newer",
            secret: nil,
            headers: try h.forgeHeaders(installation, ["x-forge-oauth-system": token]),
            body: #"{"requestId":"rq_unknown"}"#)
        #expect(again.json["stored"] as? Bool == false)
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 200, note: "no body",
            secret: nil,
            headers: [
                "authorization": "Bearer " + (try h.emulator.mintFIT(for: installation)),
                "x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation),
            ])
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 400, note: "no token",
            secret: nil, headers: try h.forgeHeaders(installation), body: "{}")
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 400, note: "token without exp",
            secret: nil, headers: try h.forgeHeaders(installation, ["x-forge-oauth-system": "opaque"]), body: "{}")
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 400, note: "malformed requestId",
            secret: nil, headers: try h.forgeHeaders(installation, ["x-forge-oauth-system": token]),
            body: #"{"requestId":42}"#)
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 400, note: "token lives > 24 h",
            secret: nil,
            headers: try h.forgeHeaders(
                installation,
                [
                    "x-forge-oauth-system": try h.emulator.mintAccessToken(
                        for: installation, expiresAt: Date().addingTimeInterval(25 * 3600))
                ]),
            body: "{}")
        let nearlyExpired = try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 200, note: "token < 60 s left",
            secret: nil,
            headers: try h.forgeHeaders(
                installation,
                [
                    "x-forge-oauth-system": try h.emulator.mintAccessToken(
                        for: installation, expiresAt: Date().addingTimeInterval(30))
                ]),
            body: "{}")
        #expect(nearlyExpired.json["stored"] as? Bool == false)
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 403, note: "UI module FIT",
            secret: nil, headers: try h.uiHeaders(installation, ["x-forge-oauth-system": token]), body: "{}")
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 401, note: "no FIT",
            secret: nil, headers: ["x-forge-oauth-system": token, "content-type": "application/json"], body: "{}")
    }

    /// `POST /forge/pre-uninstall`, the uninstalled event, and the 410s after it.
    static func recordForgeUninstall(
        _ r: AnswerRecorder, _ h: GatewayHarness, installation: EmulatedInstallation, register: String
    ) async throws {
        // /forge/pre-uninstall refusals, then the uninstalled event and preUninstall; then 410
        // from delivery and registration.
        let preUninstallBody =
            #"{"context":{"cloudId":"\#(installation.cloudId)","moduleKey":"pre-uninstall"},"contextToken":"ct"}"#
        try await h.recorded(
            r, .POST, "/forge/pre-uninstall", template: "/forge/pre-uninstall", status: 403, note: "UI module FIT",
            secret: nil, headers: try h.uiHeaders(installation), body: preUninstallBody)
        try await h.recorded(
            r, .POST, "/forge/pre-uninstall", template: "/forge/pre-uninstall", status: 401, note: "no FIT",
            secret: nil, headers: ["content-type": "application/json"], body: preUninstallBody)
        try await h.recorded(
            r, .POST, "/forge/pre-uninstall", template: "/forge/pre-uninstall", status: 400, note: "not JSON",
            secret: nil, headers: try h.forgeHeaders(installation), body: "{")
        try await h.recorded(
            r, .POST, "/forge/lifecycle", template: "/forge/lifecycle", status: 200, note: "uninstalled", secret: nil,
            headers: try h.forgeHeaders(installation), body: GatewayHarness.lifecycleBody(.uninstalled, installation))
        try await h.recorded(
            r, .POST, "/forge/pre-uninstall", template: "/forge/pre-uninstall", status: 200, note: "preUninstall",
            secret: nil, headers: try h.forgeHeaders(installation), body: preUninstallBody)
        try await h.recorded(
            r, .POST, "/forge/auth-trigger", template: "/forge/auth-trigger", status: 410,
            note: "delivery after uninstall",
            secret: nil,
            headers: try h.forgeHeaders(
                installation, ["x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation)]),
            body: "{}")
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 410, note: "register after uninstall",
            secret: nil, headers: try h.forgeHeaders(installation), body: register)
        try await h.recorded(
            r, .GET, "/forge/register", template: "/forge/register", status: 405, note: "wrong method", secret: nil,
            generic: true)
    }

    /// The caller routes' refusals: 400 invalid_parameter, 401, 403 and 404.
    static func recordCallerRefusals(_ r: AnswerRecorder, _ h: GatewayHarness, path: String) async throws {
        // 400 invalid_parameter.
        try await h.recorded(
            r, .GET, path + "/token?minValidity=7201", template: Self.token, status: 400,
            note: "minValidity out of range")
        try await h.recorded(
            r, .GET, path + "/token?timeout=99", template: Self.token, status: 400, note: "timeout out of range")
        try await h.recorded(
            r, .GET, "/v1/installations/bad%20id/token", template: Self.token, status: 400, note: "malformed id")
        try await h.recorded(
            r, .GET, "/v1/installations?limit=0", template: Self.list, status: 400, note: "limit out of range")
        try await h.recorded(
            r, .GET, "/v1/installations?cursor=%21%21", template: Self.list, status: 400, note: "malformed cursor")

        // 401 and 403.
        try await h.recorded(
            r, .GET, path + "/token", template: Self.token, status: 401, note: "no credential", secret: nil)
        try await h.recorded(
            r, .POST, path + "/token/refresh", template: Self.refresh, status: 401, note: "wrong secret", secret: "nope"
        )
        try await h.recorded(
            r, .GET, "/v1/installations", template: Self.list, status: 401, note: "list without credential", secret: nil
        )
        try await h.recorded(
            r, .GET, path + "/token", template: Self.token, status: 403, note: "outside the caller's set",
            secret: GatewayHarness.scopedSecret)
        try await h.recorded(
            r, .GET, path, template: Self.installation, status: 403, note: "metadata outside the caller's set",
            secret: GatewayHarness.scopedSecret)

        // 404 installation_not_found.
        let unknown = GatewayHarness.path(h.emulator.makeInstallation())
        try await h.recorded(
            r, .GET, unknown + "/token", template: Self.token, status: 404, note: "unknown installation")
        try await h.recorded(r, .GET, unknown, template: Self.installation, status: 404, note: "unknown metadata")
    }

    /// The token route's failures: 410, 422, 502, 503 circuit_open and 504. Returns the installation
    /// whose circuit is left open.
    static func recordTokenFailures(_ r: AnswerRecorder, _ h: GatewayHarness) async throws -> EmulatedInstallation {
        // 410 installation_uninstalled (and 200 metadata with status uninstalled).
        let gone = try await h.installed()
        try await h.emulator.uninstall(gone)
        try await h.recorded(
            r, .GET, GatewayHarness.path(gone) + "/token", template: Self.token, status: 410, note: "uninstalled")
        let goneMeta = try await h.recorded(
            r, .GET, GatewayHarness.path(gone), template: Self.installation, status: 200, note: "uninstalled metadata")
        #expect(goneMeta.json["status"] as? String == "uninstalled")

        // 422 no_trigger_url: installed, never registered.
        let unregistered = h.emulator.makeInstallation()
        #expect(try await h.emulator.sendLifecycleEvent(.installed, for: unregistered).status == 200)
        try await h.recorded(
            r, .GET, GatewayHarness.path(unregistered) + "/token", template: Self.token, status: 422, note: "no trigger"
        )

        // 502 trigger_failed, then 503 circuit_open (threshold 1).
        let failing = try await h.installed()
        h.emulator.setFault(.failWith(status: 500, times: 100), for: failing)
        try await h.recorded(
            r, .GET, GatewayHarness.path(failing) + "/token", template: Self.token, status: 502, note: "trigger 5xx")
        try await DocumentationCheck.eventually("the circuit to open") {
            try await h.gateway.store.snapshot(failing.installationID).circuitOpenUntil > 0
        }
        let open = try await h.recorded(
            r, .GET, GatewayHarness.path(failing) + "/token", template: Self.token, status: 503, note: "circuit open")
        #expect(open.errorCode == "circuit_open")

        // 504 token_timeout: the trigger answers 2xx but never delivers.
        let silent = try await h.installed()
        h.emulator.setFault(.acceptWithoutDelivery, for: silent)
        try await h.recorded(
            r, .GET, GatewayHarness.path(silent) + "/token?timeout=1500", template: Self.token, status: 504,
            note: "never delivered")
        return failing
    }

    /// `POST /v1/connect/verify`: genuine (with and without context) and each refusal.
    static func recordConnectVerify(
        _ r: AnswerRecorder, _ h: GatewayHarness, tenant: EmulatedConnectTenant
    ) async throws {
        let verifyTemplate = "/v1/connect/verify"
        let url = "/gateway/issue-glance?issueKey=ABC-1"
        let jwt = h.emulator.mintConnectJWT(for: tenant, method: "GET", url: url)
        func verifyBody(_ jwt: String) -> String { #"{"jwt":"\#(jwt)","method":"GET","url":"\#(url)"}"# }
        let json = ["content-type": "application/json"]
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 200, note: "genuine", headers: json,
            body: verifyBody(jwt))
        var context = ConnectJWTOptions()
        context.contextJSON = #"{"jira":{"issue":{"key":"ABC-1"}}}"#
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 200, note: "with context", headers: json,
            body: verifyBody(h.emulator.mintConnectJWT(for: tenant, method: "GET", url: url, options: context)))
        var wrongSecret = ConnectJWTOptions()
        wrongSecret.secret = "not-the-shared-secret"
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 401, note: "wrong secret", headers: json,
            body: verifyBody(h.emulator.mintConnectJWT(for: tenant, method: "GET", url: url, options: wrongSecret)))
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 401, note: "no caller credential", secret: nil,
            headers: json, body: verifyBody(jwt))
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 403, note: "tenant outside the caller's set",
            secret: GatewayHarness.scopedSecret, headers: json, body: verifyBody(jwt))
        try await h.recorded(
            r, .POST, verifyTemplate, template: verifyTemplate, status: 400, note: "no jwt", headers: json,
            body: #"{"method":"GET","url":"/x"}"#)
    }

    /// `POST /v1/connect/sign`: a signed JWT and each refusal.
    static func recordConnectSign(
        _ r: AnswerRecorder, _ h: GatewayHarness, tenant: EmulatedConnectTenant
    ) async throws {
        let json = ["content-type": "application/json"]
        let signTemplate = "/v1/connect/sign"
        try await h.recorded(
            r, .POST, signTemplate, template: signTemplate, status: 200, note: "sign", headers: json,
            body:
                #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"\#(tenant.baseUrl)/rest/api/3/myself?x=1"}"#
        )
        try await h.recorded(
            r, .POST, signTemplate, template: signTemplate, status: 400, note: "URL off the tenant", headers: json,
            body: #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"https://elsewhere.example.com/x"}"#)
        try await h.recorded(
            r, .POST, signTemplate, template: signTemplate, status: 404, note: "unknown tenant", headers: json,
            body: #"{"clientKey":"no-such-tenant","method":"GET","url":"https://x.atlassian.net/x"}"#)
        try await h.recorded(
            r, .POST, signTemplate, template: signTemplate, status: 401, note: "no caller credential", secret: nil,
            headers: json, body: #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"\#(tenant.baseUrl)/x"}"#)
        try await h.recorded(
            r, .POST, signTemplate, template: signTemplate, status: 403, note: "tenant outside the caller's set",
            secret: GatewayHarness.scopedSecret, headers: json,
            body: #"{"clientKey":"\#(tenant.clientKey)","method":"GET","url":"\#(tenant.baseUrl)/x"}"#)
    }

    /// Token exchange of a Connect JWT on `/oauth/token`, once the route is served.
    static func recordTokenExchange(
        _ r: AnswerRecorder, _ h: GatewayHarness, tenant: EmulatedConnectTenant
    ) async throws {
        let discovery = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
        try #require(discovery.status == 200, "discovery answered \(discovery.status)")
        let grants = discovery.json["grant_types_supported"] as? [String] ?? []
        try #require(grants.contains(OAuthMetadata.tokenExchangeGrant), "token exchange not announced with Connect on")
        r.record(.GET, "/.well-known/oauth-authorization-server", discovery, note: "discovery with Connect")
        let url = "/gateway/issue-glance?issueKey=ABC-1"
        let jwt = h.emulator.mintConnectJWT(for: tenant, method: "GET", url: url)
        func form(_ subject: String) -> String {
            let allowed = CharacterSet.alphanumerics
            return [
                "grant_type=" + OAuthMetadata.tokenExchangeGrant.addingPercentEncoding(withAllowedCharacters: allowed)!,
                "subject_token=" + subject,
                "subject_token_type=" + OAuthMetadata.jwtTokenType.addingPercentEncoding(
                    withAllowedCharacters: allowed)!,
                "connect_method=GET",
                "connect_url=" + url.addingPercentEncoding(withAllowedCharacters: allowed)!,
            ].joined(separator: "&")
        }
        let headers = [
            "content-type": "application/x-www-form-urlencoded",
            "authorization": "Basic " + Data("full:\(GatewayHarness.callerSecret)".utf8).base64EncodedString(),
        ]
        let exchanged = try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 200, note: "token exchange", secret: nil,
            headers: headers, body: form(jwt))
        #expect(exchanged.json["issued_token_type"] as? String == OAuthMetadata.accessTokenType)
        var wrongSecret = ConnectJWTOptions()
        wrongSecret.secret = "not-the-shared-secret"
        try await h.recorded(
            r, .POST, "/oauth/token", template: "/oauth/token", status: 400, note: "subject token refused", secret: nil,
            headers: headers,
            body: form(h.emulator.mintConnectJWT(for: tenant, method: "GET", url: url, options: wrongSecret)))
    }
}

extension OpenAPIConformanceTests {
    @Test("the operator routes answer as described: status, history, the HTML pages and their errors")
    func statusRoutes() async throws {
        let r = AnswerRecorder()
        let ops = StatusPageTests.operatorSecret
        let basic = StatusPageTests.basic(StatusPageTests.operatorName, ops)
        try await StatusPageTests.run { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation)
            try await h.recorded(
                r, .POST, path + "/token/refresh", template: Self.refresh, status: 200, note: "a round trip")
            let history = "/v1/installations/{installationId}/history"
            let page = "/status/installations/{installationId}"
            try await DocumentationCheck.eventually("the round trip in the history") {
                let a = try await h.call(.GET, path + "/history", secret: ops)
                return (a.json["roundTrips"] as? [Any])?.count == 1
            }
            try await h.recorded(
                r, .GET, "/v1/status", template: "/v1/status", status: 200, note: "status", secret: ops)
            try await h.recorded(
                r, .GET, "/v1/status", template: "/v1/status", status: 401, note: "no credential", secret: nil)
            try await h.recorded(r, .GET, "/v1/status", template: "/v1/status", status: 403, note: "not an operator")
            try await h.recorded(
                r, .GET, path + "/history", template: history, status: 200, note: "history", secret: ops)
            try await h.recorded(r, .GET, path + "/history", template: history, status: 403, note: "not an operator")
            try await h.recorded(
                r, .GET, path + "/history", template: history, status: 401, note: "no credential", secret: nil)
            try await h.recorded(
                r, .GET, "/v1/installations/bad%20id/history", template: history, status: 400, note: "malformed id",
                secret: ops)
            try await h.recorded(
                r, .GET, GatewayHarness.path(h.emulator.makeInstallation()) + "/history", template: history,
                status: 404,
                note: "unknown installation", secret: ops)
            try await h.recorded(
                r, .GET, "/status", template: "/status", status: 200, note: "page", secret: nil, headers: basic)
            try await h.recorded(
                r, .GET, "/status?state=attention&q=abc&page=2", template: "/status", status: 200,
                note: "filtered page",
                secret: nil, headers: basic)
            try await h.recorded(
                r, .GET, "/status?state=bogus", template: "/status", status: 400, note: "unknown state", secret: nil,
                headers: basic)
            try await h.recorded(
                r, .GET, "/status?page=0", template: "/status", status: 400, note: "page 0", secret: nil, headers: basic
            )
            try await h.recorded(
                r, .GET, "/status", template: "/status", status: 401, note: "no credentials", secret: nil)
            try await h.recorded(
                r, .GET, "/status", template: "/status", status: 403, note: "not an operator", secret: nil,
                headers: StatusPageTests.basic("full", GatewayHarness.callerSecret))
            try await h.recorded(
                r, .GET, path.replacingOccurrences(of: "/v1/installations/", with: "/status/installations/"),
                template: page, status: 200, note: "installation page", secret: nil, headers: basic)
            try await h.recorded(
                r, .GET, "/status/installations/" + h.emulator.makeInstallation().uuid, template: page, status: 404,
                note: "unknown installation", secret: nil, headers: basic)
            try await h.recorded(
                r, .GET, "/status/installations/bad%20id", template: page, status: 400, note: "malformed id",
                secret: nil,
                headers: basic)
            try await h.recorded(
                r, .GET, "/status/installations/" + installation.uuid, template: page, status: 401,
                note: "no credentials", secret: nil)
        }
        try await r.check()
    }
}
