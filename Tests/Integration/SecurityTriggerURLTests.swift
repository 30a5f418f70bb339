import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Issue #4 item 4: the gateway calls allow-listed trigger hosts only (https, or plain http on an
/// allow-listed loopback development host), never anything else, and a re-registration rotates
/// the URL.
@Suite("Security: trigger URLs", .serialized)
struct SecurityTriggerURLTests {
    @Test("a trigger URL off the allow-list is refused with 400 and never contacted, not even by a later token request")
    func refusedURLIsNeverContacted() async throws {
        let recorder = try await ConnectionRecorder.start()
        defer { Task { await recorder.stop() } }
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let emulatorPort = URLComponents(string: h.emulator.baseURL)!.port!
            let p = recorder.port
            let refused = [
                "http://127.0.0.1:\(p)/x1/trigger",
                "http://localhost:\(p)/x1/trigger",
                "https://127.0.0.1:\(p)/x1/trigger",
                "http://127.0.0.1:\(emulatorPort)@127.0.0.1:\(p)/x1/trigger",
                "http://u:p@127.0.0.1:\(emulatorPort)/x1/trigger",
                "http://127.0.0.1:\(emulatorPort)/x1/trigger#@127.0.0.1:\(p)",
                "http://127.0.0.2:\(emulatorPort)/x1/trigger",
                "http://[::1]:\(p)/x1/trigger",
                "ftp://127.0.0.1:\(p)/x1/trigger",
                "127.0.0.1:\(p)/x1/trigger",
                "//127.0.0.1:\(p)/x1/trigger",
                "http://127.0.0.1:\(p)\\@127.0.0.1:\(emulatorPort)/x1/trigger",
                "http://127.0.0.1:\(emulatorPort).nip.io:\(p)/x1/trigger",
            ]
            // A fresh installation: refused registrations create no trigger.
            let fresh = h.emulator.makeInstallation()
            try #require(try await h.emulator.sendLifecycleEvent(.installed, for: fresh).isSuccess)
            for url in refused {
                let answer = try await h.emulator.register(fresh, authTriggerUrl: url)
                #expect(answer.status == 400, "\(url)")
                #expect(answer.body.contains("\"trigger_url_not_allowed\""), "\(url)")
            }
            let cold = try await h.token(fresh, query: "timeout=1000")
            #expect(cold.status == 422)
            #expect(cold.errorCode == "no_trigger_url")
            #expect(try await h.gateway.store.installation(fresh.installationID)?.triggerRegistered == false)

            // A registered installation: a refused re-registration keeps the registered URL.
            let registered = try await h.installed()
            for url in refused {
                #expect(try await h.emulator.register(registered, authTriggerUrl: url).status == 400, "\(url)")
            }
            let answer = try await h.token(registered)
            #expect(answer.status == 200)
            #expect(h.emulator.triggerCalls(for: registered) == 1)
            #expect(recorder.connections == 0)
        }
        #expect(recorder.connections == 0)
    }

    @Test("plain http is refused at configuration for any host but loopback, and at registration for https entries")
    func httpsOnly() async throws {
        for entry in ["http://trigger.example.com", "http://trigger.example.com:8080", "http://10.0.0.1:80"] {
            #expect(throws: TriggerHostAllowList.ParseError.self) { try TriggerHostAllowList(parsing: entry) }
        }
        let emulatorLike = try TriggerHostAllowList(parsing: "http://127.0.0.1:9999")
        #expect(emulatorLike.allows("http://127.0.0.1:9999/x1/a"))

        try await GatewayHarness.run(configure: { config in
            config.triggerHosts = try! TriggerHostAllowList(
                parsing: config.triggerHosts.description + ",*.hello.atlassian-dev.net,trigger.example.com")
        }) { h in
            let installation = h.emulator.makeInstallation()
            try #require(try await h.emulator.sendLifecycleEvent(.installed, for: installation).isSuccess)
            for url in [
                "http://abc.hello.atlassian-dev.net/x1/a", "http://trigger.example.com/x1/a",
                "https://abc.hello.atlassian-dev.net:8443/x1/a", "https://hello.atlassian-dev.net/x1/a",
                "https://abchello.atlassian-dev.net/x1/a", "https://abc.hello.atlassian-dev.net.evil.test/x1/a",
                "https://trigger.example.com:444/x1/a", "https://sub.trigger.example.com/x1/a",
                "https://abc.hello.atlassian-dev.net./x1/a",
            ] {
                let answer = try await h.emulator.register(installation, authTriggerUrl: url)
                #expect(answer.status == 400, "\(url)")
                #expect(answer.body.contains("trigger_url_not_allowed"), "\(url)")
            }
            #expect(try await h.gateway.store.installation(installation.installationID)?.triggerRegistered == false)
        }
        #expect(throws: ConfigurationError.self) {
            try GatewayConfiguration.load(environment: [
                "TOKEN_GATEWAY_FORGE_APP_ID": ForgeEmulatorConfiguration.demoAppId,
                "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
                "TOKEN_GATEWAY_CALLERS": "[{\"name\":\"a\",\"secret\":\"caller-secret-0123456789\"}]",
                "TOKEN_GATEWAY_TRIGGER_HOSTS": "*.webtrigger.atlassian.app,http://trigger.example.com",
            ])
        }
    }

    @Test("re-registration rotates the URL: the next trigger goes to the new URL only")
    func reRegistrationRotatesTheURL() async throws {
        let recorder = try await ConnectionRecorder.start()
        defer { Task { await recorder.stop() } }
        try await GatewayHarness.run(configure: { config in
            config.flow.maxAttempts = 1
            config.triggerHosts = try! TriggerHostAllowList(
                parsing: config.triggerHosts.description + "," + recorder.baseURL)
        }) { h in
            let installation = try await h.installed()
            let keyID = try await h.gateway.store.installation(installation.installationID)?.triggerKeyId
            #expect(try await h.token(installation).status == 200)
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // Rotate to the recorder: the next round trip goes there, not to the old URL.
            let moved = try await h.emulator.register(installation, authTriggerUrl: recorder.baseURL + "/x1/moved")
            #expect(moved.status == 200)
            #expect(moved.triggerKeyId == keyID)
            // The recorder closes every connection at once: the one attempt fails as a transport
            // error, so the answer is 502 trigger_failed (a deadline far away keeps the clock out).
            let refresh = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh?timeout=30000")
            #expect(refresh.status == 502)
            #expect(refresh.errorCode == "trigger_failed")
            // One trigger attempt; its HTTP client may open a second connection when the first
            // closes before the request is written, so connections are at least one.
            #expect(recorder.connections >= 1)
            #expect(
                sample(
                    try await h.call(.GET, "/metrics", secret: nil).body, "token_gateway_trigger_attempts_total",
                    ["outcome": "transport_error"]) == 1)
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // Rotate to a second trigger path on the emulator: it answers there.
            let secondPath = EmulatedInstallation(
                id: installation.id, cloudId: installation.cloudId, product: installation.product,
                apiBaseUrl: installation.apiBaseUrl, siteARI: installation.siteARI,
                triggerPath: "/x1/rotated-" + UUID().uuidString.lowercased())
            let back = try await h.emulator.register(secondPath)
            #expect(back.status == 200)
            #expect(h.emulator.triggerURL(for: secondPath).hasSuffix(secondPath.triggerPath))
            let contacted = recorder.connections
            let again = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(again.status == 200)
            #expect(again.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 2)
            #expect(recorder.connections == contacted)
        }
    }
}
