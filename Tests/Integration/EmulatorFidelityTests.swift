import AsyncHTTPClient
import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import Testing

@testable import TokenGateway

/// The emulator does what Forge and the companion of `Docs/forge-companion.md` do, and the gateway
/// works with it: an install brings a system token (protocol §2a: "a remote starts off with one"),
/// and a trigger-key rotation started from the Forge side keeps the trigger working throughout.
/// Real HTTP on loopback, real Redis.
@Suite("The emulator as Forge: tokens with the install, trigger-key rotation")
struct EmulatorFidelityTests {
    static func received(_ h: GatewayHarness, _ installation: EmulatedInstallation) -> Int {
        h.logs.captured.filter {
            $0.contains("audit.event=token_received") && $0.contains("installation.id=\(installation.id)")
        }.count
    }

    @Test(
        "an install as Forge sends it carries a system token with the lifecycle event and the registration: served from the cache on both replicas, no trigger call; a refresh makes the round trip"
    )
    func installBringsAToken() async throws {
        try await GatewayHarness.run(emulatorConfigure: { $0.endpointsCarrySystemToken = true }) { h in
            let installation = h.emulator.makeInstallation()
            try await h.emulator.install(installation)
            #expect(Self.received(h, installation) == 2)
            // Forge's token cache: the `redeliverCached` fault hands out what the install brought.
            #expect(h.emulator.lastDeliveredToken(for: installation) != nil)

            @Sendable func check(_ served: GatewayHarness.Answer) throws -> String {
                let token = try #require(served.json["accessToken"] as? String, "\(served.status) \(served.body)")
                TokenAnswerMatrixTests.expectWholeAnswer(served, installation, token: token, source: "cache", "served")
                return token
            }
            let token = try check(try await h.token(installation))
            try await h.withSecondGateway { url in
                let second = try check(try await h.token(installation, at: url))
                #expect(second == token)
            }
            #expect(h.emulator.triggerCalls(for: installation) == 0)

            // (Within the install's second, Forge's token is no newer than the one stored: the
            // round trip answers with the stored one.)
            let refreshed = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200, "\(refreshed.body)")
            #expect(refreshed.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)

            // Turned off, an install brings none: the first request makes the round trip.
            let bare = h.emulator.makeInstallation()
            try await h.emulator.install(bare, lifecycleSystemToken: false)
            #expect(Self.received(h, bare) == 0)
            #expect(try await h.token(bare).json["source"] as? String == "trigger")
        }
    }

    @Test(
        "a rotation started through the emulator: it keeps both keys as the companion does, so the trigger works before and after the switch"
    )
    func rotationThroughTheEmulator() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let original = try #require(try await h.gateway.store.installation(id)?.triggerKeyId)

            let rotation = try await h.emulator.register(installation, rotateKey: true)
            #expect(rotation.status == 200)
            #expect(rotation.triggerKeyId == original)
            let next = try #require(rotation.nextTriggerKeyId)
            #expect(next != original)

            // During the overlap the current key signs.
            let during = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(during.status == 200, "\(during.body)")
            #expect(h.emulator.triggerRecords(for: installation).last?.keyId == original)

            // After it (read as an hour later, which makes the switch) the next key signs, and the
            // emulator, which kept it beside the current one, accepts the call.
            let switched = try #require(try await h.gateway.store.triggerKeys(id, now: FlowTime.now() + .seconds(3600)))
            #expect(switched.current.keyID == next)
            let refreshed = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200, "\(refreshed.body)")
            #expect(refreshed.json["source"] as? String == "trigger")
            let last = try #require(h.emulator.triggerRecords(for: installation).last)
            #expect(last.keyId == next)
            #expect(last.signatureValid)

            // The next registration names only the key the gateway still has.
            let again = try await h.emulator.register(installation)
            #expect(again.triggerKeyId == next)
            #expect(again.nextTriggerKeyId == nil)
            #expect(try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh").status == 200)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)
        }
    }

    @Test(
        "a FIT from an Isolated Cloud (an icLabel claim), as the emulator mints it, is refused with 401 on every Forge route and changes nothing"
    )
    func isolatedCloudFIT() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let before = try await ForgeRouteKindTests.observe(h, installation)
            var options = FITOptions()
            options.icLabel = "ic-eu-1"
            for (path, body) in ForgeRouteKindTests.routes(h, installation) {
                let answer = try await h.call(
                    .POST, path, secret: nil,
                    headers: [
                        "authorization": "Bearer \(try h.emulator.mintFIT(for: installation, options: options))",
                        "content-type": "application/json",
                        "x-forge-oauth-system": try h.emulator.mintAccessToken(for: installation),
                    ], body: body)
                #expect(answer.status == 401, "\(path): \(answer.body)")
                #expect(answer.errorCode == "invalid_invocation_token", "\(path)")
            }
            #expect(try await ForgeRouteKindTests.observe(h, installation) == before)
        }
    }

    @Test(
        "a preUninstall the gateway never got does not keep the app installed: its web trigger answers 404, so round trips fail while the stored token is still served"
    )
    func failedPreUninstallStillUninstalls() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            // The preUninstall call fails: it goes to a server without the route (the emulator's
            // own), which answers 404, and the harness sends no retries.
            h.emulator.setGatewayURL(h.emulator.baseURL)
            await #expect(throws: ForgeEmulatorError.unexpectedStatus(404, operation: "pre-uninstall")) {
                try await h.emulator.uninstall(installation)
            }
            h.emulator.setGatewayURL(h.gatewayURL)

            // The gateway still knows the installation and serves its stored token…
            let cached = try await h.token(installation)
            #expect(cached.status == 200)
            #expect(cached.json["source"] as? String == "cache")
            // …but the web trigger went with the app.
            let refreshed = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 502, "\(refreshed.body)")
            #expect(refreshed.errorCode == "trigger_failed")
            #expect(h.emulator.triggerRecords(for: installation).last?.answeredStatus == 404)
        }
    }

    @Test(
        "a web-trigger URL rotated on the Forge side (getUrl with forceCreate) and registered again: the old URL answers 404, the gateway calls the new one"
    )
    func triggerURLRotation() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let oldURL = h.emulator.triggerURL(for: installation)
            let rotation = try await h.emulator.rotateTriggerURL(installation)
            #expect(rotation.status == 200)
            let newURL = h.emulator.triggerURL(for: installation)
            #expect(newURL != oldURL)

            // The old URL is revoked: whoever still holds it reaches nothing.
            var stale = HTTPClientRequest(url: oldURL)
            stale.method = .POST
            stale.body = .bytes(ByteBuffer(string: "{}"))
            #expect(try await h.http.execute(stale, timeout: .seconds(5)).status == .notFound)

            // The gateway's next round trip goes to the new URL, signed as before.
            let calls = h.emulator.triggerCalls(for: installation)
            let refreshed = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(refreshed.status == 200, "\(refreshed.body)")
            #expect(refreshed.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == calls + 1)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)
        }
    }

    @Test(
        "a web trigger whose function runs past Forge's runtime limit is cut off with 500, and the round trip fails as a trigger error"
    )
    func webTriggerRuntimeLimit() async throws {
        // The function's invokeRemote goes to a server that never answers: only the limit ends it.
        let silent = try await LoopbackListener.start(holding: true)
        do {
            try await GatewayHarness.run(
                configure: { $0.flow.maxAttempts = 1 },
                emulatorConfigure: { $0.webTriggerRuntimeLimit = .milliseconds(300) }
            ) { h in
                let installation = try await h.installed()
                h.emulator.setFault(.deliverVia(gatewayURL: silent.baseURL), for: installation)
                let answer = try await h.call(
                    .POST, GatewayHarness.path(installation) + "/token/refresh?timeout=5000")
                #expect(answer.status == 502, "\(answer.body)")
                #expect(answer.errorCode == "trigger_failed")
                #expect(h.emulator.triggerRecords(for: installation).last?.answeredStatus == 500)
            }
        } catch {
            await silent.stop()
            throw error
        }
        await silent.stop()
    }
}
