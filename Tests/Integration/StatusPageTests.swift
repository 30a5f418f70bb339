import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Runs `status_page_check.py` (headless Chromium driven by Selenium) against a running gateway.
enum StatusPageBrowser {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("status_page_check.py").path

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Runs the script with `arguments` (one JSON object); returns its output. Throws when it exits
    /// non-zero or does not finish within `deadline`.
    static func run(_ arguments: [String: Any], deadline: Duration = .seconds(180)) async throws -> String {
        let argument = String(decoding: try JSONSerialization.data(withJSONObject: arguments), as: UTF8.self)
        var environment = ProcessInfo.processInfo.environment
        environment["PYTHONDONTWRITEBYTECODE"] = "1"
        // Selenium must use the given chromedriver and never look for one online.
        environment["SE_OFFLINE"] = "true"
        for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
            environment.removeValue(forKey: proxy)
        }
        environment["NO_PROXY"] = "127.0.0.1,localhost"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", Self.script, argument]
        process.environment = environment
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        process.standardInput = FileHandle.nullDevice
        let exited = AsyncStream<Int32>.makeStream()
        process.terminationHandler = { finished in
            exited.continuation.yield(finished.terminationStatus)
            exited.continuation.finish()
        }
        let stdout = PipeCollector(output)
        let stderr = PipeCollector(errors)
        try process.run()
        let pid = process.processIdentifier
        let status: Int32? = try await withThrowingTaskGroup(of: Int32?.self) { group in
            group.addTask {
                await stdout.finished()
                await stderr.finished()
                for await status in exited.stream { return status }
                return nil
            }
            group.addTask {
                try await Task.sleep(for: deadline)
                return nil
            }
            let first = try await group.next() ?? nil
            group.cancelAll()
            return first
        }
        guard let status else {
            // SIGTERM: the script leaves through `finally`, which stops chromedriver and Chromium;
            // SIGKILL if it has not within 10 s.
            kill(pid, SIGTERM)
            for _ in 0..<100 where process.isRunning { try? await Task.sleep(for: .milliseconds(100)) }
            if process.isRunning { kill(pid, SIGKILL) }
            throw Failure(description: "status_page_check.py did not finish within \(deadline)")
        }
        let out = String(decoding: stdout.data, as: UTF8.self)
        let err = String(decoding: stderr.data, as: UTF8.self)
        guard status == 0 else {
            throw Failure(
                description: "status_page_check.py exited \(status):\n\(out.suffix(6000))\n\(err.suffix(3000))")
        }
        return out
    }
}

@Suite("Operator status page and its JSON", .serialized)
struct StatusPageTests {
    static let operatorName = "ops"
    static let operatorSecret = "operator-secret-0123456789abcdef"
    /// An operator whose set is one installation, of this id.
    static let scopedOperatorSecret = "operator-secret-scoped-0123456789"
    static let scopedUUID = "0f0f0f0f-0000-4000-8000-00000000abcd"

    /// The harness's callers plus an operator.
    static func callers() -> CallerRegistry {
        try! CallerRegistry(
            json: """
                [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"],"clientKeys":["*"]},
                 {"name":"\(operatorName)","secret":"\(operatorSecret)","installations":["*"],"operator":true},
                 {"name":"ops-scoped","secret":"\(scopedOperatorSecret)","installations":["\(scopedUUID)"],"operator":true}]
                """)
    }

    static func basic(_ name: String, _ secret: String) -> [String: String] {
        ["authorization": "Basic " + Data("\(name):\(secret)".utf8).base64EncodedString()]
    }

    /// A gateway on a Redis of its own (the page lists every installation of its store).
    static func run(_ body: @Sendable (GatewayHarness) async throws -> Void) async throws {
        let redis = try await RedisServerProcess.start()
        do {
            try await GatewayHarness.run(
                redisURL: redis.url,
                configure: {
                    $0.callers = Self.callers()
                    $0.flow.maxAttempts = 2
                    $0.flow.backoffBase = .milliseconds(20)
                    $0.flow.breakerThreshold = 1
                    $0.flow.breakerOpenBase = .seconds(300)
                    $0.flow.breakerOpenCap = .seconds(300)
                }, body)
        } catch {
            await redis.stop()
            throw error
        }
        await redis.stop()
    }

    @Test("only operators reach the status routes: 401 with a Basic challenge, 403 for other callers")
    func access() async throws {
        try await Self.run { h in
            let page = try await h.call(.GET, "/status", secret: nil)
            #expect(page.status == 401)
            #expect(page.headers["www-authenticate"] == "Basic realm=\"token-gateway\"")
            let wrong = try await h.call(
                .GET, "/status", secret: nil, headers: Self.basic(Self.operatorName, "not-the-secret"))
            #expect(wrong.status == 401)
            let notOperator = try await h.call(
                .GET, "/status", secret: nil, headers: Self.basic("full", GatewayHarness.callerSecret))
            #expect(notOperator.status == 403)
            #expect(notOperator.errorCode == "forbidden")
            let ok = try await h.call(
                .GET, "/status", secret: nil, headers: Self.basic(Self.operatorName, Self.operatorSecret))
            #expect(ok.status == 200)
            #expect(ok.headers["content-type"] == "text/html; charset=utf-8")
            #expect(ok.headers["content-security-policy"]?.contains("default-src 'none'") == true)

            let json = try await h.call(.GET, "/v1/status", secret: nil)
            #expect(json.status == 401)
            #expect(json.headers["www-authenticate"]?.hasPrefix("Bearer") == true)
            #expect(try await h.call(.GET, "/v1/status").status == 403)
            let status = try await h.call(.GET, "/v1/status", secret: Self.operatorSecret)
            #expect(status.status == 200)
            let installation = try await h.installed()
            let history = GatewayHarness.path(installation) + "/history"
            #expect(try await h.call(.GET, history).status == 403)
            #expect(try await h.call(.GET, history, secret: Self.operatorSecret).status == 200)
            #expect(
                try await h.call(.GET, "/v1/installations/bad%20id/history", secret: Self.operatorSecret).status == 400)
            let unknown = h.emulator.makeInstallation()
            let missing = try await h.call(.GET, GatewayHarness.path(unknown) + "/history", secret: Self.operatorSecret)
            #expect(missing.status == 404)
            #expect(missing.errorCode == "installation_not_found")
        }
    }

    @Test(
        "an operator scoped to some installations sees only those: other ids are 403, the overviews list none of them")
    func scopedOperator() async throws {
        try await Self.run { h in
            let mine = h.emulator.makeInstallation(uuid: Self.scopedUUID)
            try await h.emulator.install(mine)
            let other = try await h.installed()
            #expect(try await h.token(mine).status == 200)
            #expect(try await h.token(other).status == 200)
            let basic = Self.basic("ops-scoped", Self.scopedOperatorSecret)
            // The scoped overviews read the scope's own ids, never the whole installation index.
            @Sendable func indexReads() async throws -> Int {
                let info = try await h.gateway.redis.send(["INFO", "commandstats"]).string ?? ""
                let line = info.split(whereSeparator: \.isNewline).first { $0.hasPrefix("cmdstat_zrangebylex:") }
                return line.flatMap { $0.split(separator: "=").dropFirst().first?.split(separator: ",").first }
                    .flatMap { Int($0) } ?? 0
            }
            let readsBefore = try await indexReads()
            for (installation, expected) in [(mine, 200), (other, 403)] {
                let history = try await h.call(
                    .GET, GatewayHarness.path(installation) + "/history", secret: Self.scopedOperatorSecret)
                #expect(history.status == expected, "\(history.body.prefix(200))")
                let page = try await h.call(
                    .GET, "/status/installations/\(installation.uuid)", secret: nil, headers: basic)
                #expect(page.status == expected, "\(page.body.prefix(200))")
            }
            let status = try await h.call(.GET, "/v1/status", secret: Self.scopedOperatorSecret)
            #expect(status.status == 200)
            #expect((status.json["installations"] as? [String: Any])?["total"] as? Int == 1, "\(status.body)")
            let overview = try await h.call(.GET, "/status", secret: nil, headers: basic)
            #expect(overview.status == 200)
            #expect(overview.body.contains(mine.uuid))
            #expect(!overview.body.contains(other.uuid))
            #expect(try await indexReads() == readsBefore)
            // The unscoped operator sees both.
            let all = try await h.call(.GET, "/v1/status", secret: Self.operatorSecret)
            #expect((all.json["installations"] as? [String: Any])?["total"] as? Int == 2, "\(all.body)")
            let everything = try await h.call(
                .GET, "/status", secret: nil, headers: Self.basic(Self.operatorName, Self.operatorSecret))
            #expect(everything.body.contains(mine.uuid) && everything.body.contains(other.uuid))
        }
    }

    @Test("round trips are kept per installation without secrets; heartbeats list the replicas alive")
    func historyAndHeartbeats() async throws {
        try await Self.run { h in
            let healthy = try await h.installed()
            let failing = try await h.installed()
            let fresh = try await h.call(.POST, GatewayHarness.path(healthy) + "/token/refresh")
            #expect(fresh.status == 200)
            let token = try #require(fresh.json["accessToken"] as? String)
            h.emulator.setFault(.failWith(status: 500, times: 1000), for: failing)
            let failed = try await h.call(.POST, GatewayHarness.path(failing) + "/token/refresh")
            #expect(failed.status == 502)
            #expect(
                try await h.call(.POST, GatewayHarness.path(failing) + "/token/refresh").errorCode == "circuit_open")

            // The history is written after the answer: wait for it.
            try await DocumentationCheck.eventually("both round trips in the history") {
                let a = try await h.call(.GET, GatewayHarness.path(healthy) + "/history", secret: Self.operatorSecret)
                let b = try await h.call(.GET, GatewayHarness.path(failing) + "/history", secret: Self.operatorSecret)
                return (a.json["roundTrips"] as? [Any])?.count == 1 && (b.json["roundTrips"] as? [Any])?.count == 1
            }
            let good = try await h.call(.GET, GatewayHarness.path(healthy) + "/history", secret: Self.operatorSecret)
            let goodTrip = (good.json["roundTrips"] as? [[String: Any]])?.first ?? [:]
            #expect(goodTrip["outcome"] as? String == "success")
            #expect(goodTrip["attempts"] as? Int == 1)
            #expect(goodTrip["replica"] as? String == h.gateway.replicaID)
            let goodState = good.json["installation"] as? [String: Any] ?? [:]
            #expect(goodState["lastTokenVia"] as? String == "trigger")
            #expect(goodState["consecutiveFailures"] as? Int == 0)

            let bad = try await h.call(.GET, GatewayHarness.path(failing) + "/history", secret: Self.operatorSecret)
            let badTrip = (bad.json["roundTrips"] as? [[String: Any]])?.first ?? [:]
            #expect(badTrip["outcome"] as? String == "http_error")
            #expect(badTrip["attempts"] as? Int == 2)
            let badState = bad.json["installation"] as? [String: Any] ?? [:]
            #expect(badState["consecutiveFailures"] as? Int == 1)
            #expect(badState["circuitOpenUntil"] is String)
            #expect(badState["attention"] as? String == "circuit open")
            for text in [good.body, bad.body] {
                #expect(!text.contains(h.emulator.baseURL))
                #expect(!text.contains(token))
            }

            let status = try await h.call(.GET, "/v1/status", secret: Self.operatorSecret)
            let open = status.json["openCircuits"] as? [[String: Any]] ?? []
            #expect(open.map { $0["installationId"] as? String } == [failing.id])
            let byOutcome = (status.json["roundTrips"] as? [String: Any])?["byOutcome"] as? [String: Int]
            #expect(byOutcome == ["success": 1, "http_error": 1])

            // A second replica's heartbeat appears while it runs and goes with its graceful shutdown.
            @Sendable func replicas() async throws -> [String] {
                let s = try await h.call(.GET, "/v1/status", secret: Self.operatorSecret)
                return (s.json["replicas"] as? [[String: Any]] ?? []).compactMap { $0["id"] as? String }
            }
            try await DocumentationCheck.eventually("this replica's heartbeat") {
                try await replicas() == [h.gateway.replicaID]
            }
            try await h.withSecondGateway { _ in
                try await DocumentationCheck.eventually("two replicas") { try await replicas().count == 2 }
            }
            #expect(try await replicas() == [h.gateway.replicaID])
        }
    }

    @Test(
        "the status page in headless Chromium: failing installation first, numbers equal the API's, accessible at 1280 and 390 px"
    )
    func browser() async throws {
        try await Self.run { h in
            let healthy = try await h.installed()
            let failing = try await h.installed()
            let fresh = try await h.call(.POST, GatewayHarness.path(healthy) + "/token/refresh")
            #expect(fresh.status == 200)
            let token = try #require(fresh.json["accessToken"] as? String)
            h.emulator.setFault(.failWith(status: 500, times: 1000), for: failing)
            #expect(try await h.call(.POST, GatewayHarness.path(failing) + "/token/refresh").status == 502)
            try await DocumentationCheck.eventually("the failed round trip in the history") {
                let b = try await h.call(.GET, GatewayHarness.path(failing) + "/history", secret: Self.operatorSecret)
                return (b.json["roundTrips"] as? [Any])?.count == 1
            }
            let screenshots = FileManager.default.temporaryDirectory
                .appendingPathComponent("tg-status-page-" + UUID().uuidString).path
            let output = try await StatusPageBrowser.run([
                "base": h.gatewayURL, "operator": Self.operatorName, "secret": Self.operatorSecret,
                "failing": failing.id, "healthy": healthy.id, "screenshots": screenshots,
                "forbidden": [h.emulator.baseURL, Self.operatorSecret, GatewayHarness.callerSecret, token],
                "chromium": "/usr/bin/chromium", "chromedriver": "/usr/bin/chromedriver",
            ])
            print(output)
            #expect(output.hasSuffix("ok\n"))
            for name in ["status-1280.png", "status-390.png", "installation-1280.png", "installation-390.png"] {
                #expect(FileManager.default.fileExists(atPath: screenshots + "/" + name), "no screenshot \(name)")
            }
        }
    }
}
