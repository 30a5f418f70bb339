import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Contract §3, the routes Forge calls: what a delivery, a registration and a lifecycle event
/// store, over real HTTP, checked in the store and through the caller routes.
@Suite("Contract: the Forge routes")
struct ContractForgeRouteTests {
    @Test("a token pushed with /forge/register is stored and served from the store, with no trigger")
    func registerStoresToken() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
            let token = try h.emulator.mintAccessToken(for: installation)
            let registered = try await h.emulator.register(installation, systemToken: token)
            #expect(registered.status == 200)
            #expect(try await h.gateway.store.systemToken(installation.installationID)?.value == token)
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            #expect(answer.json["accessToken"] as? String == token)
            #expect(answer.json["source"] as? String == "cache")
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test("a delivery carrying x-forge-oauth-user is accepted and its system token stored")
    func userTokenHeaderAccepted() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let system = try h.emulator.mintAccessToken(for: installation)
            let user = try h.emulator.mintAccessToken(for: installation)
            let answer = try await h.emulator.deliver(
                installation, systemToken: system, requestId: nil, userToken: user)
            #expect(answer.status == 200)
            #expect(answer.body == #"{"stored":true}"#)
            #expect(try await h.gateway.store.systemToken(installation.installationID)?.value == system)
            let served = try await h.token(installation)
            #expect(served.json["accessToken"] as? String == system)
            // The user token is never served: a user token is the exchange's, on either replica.
            let account = "557058:" + UUID().uuidString.lowercased()
            let path = GatewayHarness.path(installation) + "/token?asUser=\(account)"
            let exchanged = try await h.token(installation, query: "asUser=\(account)")
            #expect(exchanged.status == 200, "\(exchanged.body)")
            #expect(exchanged.json["source"] as? String == "exchange")
            let token = try #require(exchanged.json["accessToken"] as? String)
            #expect(token != user)
            #expect(token == h.emulator.lastUserToken(for: installation, accountId: account))
            try await h.withSecondGateway { url in
                let there = try await h.call(.GET, path, at: url)
                #expect(there.json["source"] as? String == "cache", "\(there.body)")
                #expect(there.json["accessToken"] as? String == token)
                let forced = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh", at: url)
                #expect(forced.json["accessToken"] as? String != user)
            }
        }
    }

    @Test("an unknown requestId with a newer token is not an error: the token is stored and served")
    func unknownRequestIdStored() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let newer = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7000))
            let answer = try await h.emulator.deliver(
                installation, systemToken: newer, requestId: "never-sent-" + UUID().uuidString.lowercased())
            #expect(answer.status == 200)
            #expect(answer.body == #"{"stored":true}"#)
            let served = try await h.token(installation)
            #expect(served.json["accessToken"] as? String == newer)
            #expect(served.json["source"] as? String == "cache")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            // Request ids the gateway never sends (too long, not visible ASCII) are unknown ones too.
            for (n, requestId) in [String(repeating: "r", count: 200), "rq with spaces", "rq-\u{7}"].enumerated() {
                let later = try h.emulator.mintAccessToken(
                    for: installation, expiresAt: Date().addingTimeInterval(7100 + Double(n) * 10))
                let stored = try await h.emulator.deliver(installation, systemToken: later, requestId: requestId)
                #expect(stored.status == 200, "\(stored.body)")
                #expect(stored.body == #"{"stored":true}"#)
                #expect(try await h.token(installation).json["accessToken"] as? String == later)
            }
        }
    }

    @Test("the requestId of a round trip that already ended (expired or answered) with a newer token: stored")
    func expiredRequestIdStored() async throws {
        try await GatewayHarness.run(configure: {
            $0.flow.maxAttempts = 1
            $0.flow.deliveryGrace = .milliseconds(200)
        }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            // The round trip ends without a delivery (504); its request id is then stale.
            let failed = try await h.token(installation, query: "timeout=30000")
            #expect(failed.errorCode == "token_timeout")
            let requestId = try #require(h.emulator.triggerRecords(for: installation).first?.requestId)
            h.emulator.setFault(.none, for: installation)
            let late = try h.emulator.mintAccessToken(for: installation)
            let answer = try await h.emulator.deliver(installation, systemToken: late, requestId: requestId)
            #expect(answer.status == 200)
            #expect(answer.body == #"{"stored":true}"#)
            let served = try await h.token(installation)
            #expect(served.json["accessToken"] as? String == late)
            #expect(served.json["source"] as? String == "cache")
            // The same (now answered) request id once more, with a newer token still.
            let later = try h.emulator.mintAccessToken(for: installation, expiresAt: Date().addingTimeInterval(7000))
            let again = try await h.emulator.deliver(installation, systemToken: later, requestId: requestId)
            #expect(again.body == #"{"stored":true}"#)
            #expect(try await h.token(installation).json["accessToken"] as? String == later)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
        }
    }

    @Test("after uninstall a delivery is refused with 410 and stores nothing; the signing keys are gone")
    func nothingStoredAfterUninstall() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            let id = installation.installationID
            #expect(try await h.gateway.store.triggerKeys(id, now: FlowTime.now()) != nil)
            try await h.emulator.uninstall(installation)
            // Tokens and the trigger-signing keys are deleted at once.
            #expect(try await h.gateway.store.systemToken(id) == nil)
            #expect(try await h.gateway.store.triggerKeys(id, now: FlowTime.now()) == nil)
            #expect(try await h.gateway.store.triggerMaterial(id) == nil)
            let keys = try await Security.keys(of: installation, in: h.gateway.redis)
            #expect(!keys.contains { $0.hasSuffix(":signing-keys") }, "\(keys)")
            let before = try await Security.snapshot(of: installation, in: h.gateway.redis)
            let refused = try await h.emulator.deliver(
                installation, systemToken: try h.emulator.mintAccessToken(for: installation), requestId: nil)
            #expect(refused.status == 410)
            #expect(refused.body.contains("\"installation_uninstalled\""))
            #expect(try await h.gateway.store.systemToken(id) == nil)
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            // A registration refused for it stores nothing either, not even its FIT's `jti`.
            let registration = try await h.emulator.register(installation)
            #expect(registration.status == 410)
            #expect(try await Security.snapshot(of: installation, in: h.gateway.redis) == before)
            let answer = try await h.token(installation)
            #expect(answer.status == 410)
            #expect(answer.errorCode == "installation_uninstalled")
        }
    }

    @Test(
        "a major upgrade runs the install handler again: a registration replaced by a dead URL is repaired, the key kept"
    )
    func upgradeRepairsTheRegistration() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            // The registration now names a web trigger that does not exist (an allowed host).
            let replaced = try await h.emulator.register(
                installation, authTriggerUrl: h.emulator.baseURL + "/x1/" + UUID().uuidString.lowercased())
            #expect(replaced.status == 200)
            let failed = try await h.token(installation)
            #expect(failed.status != 200)
            #expect(h.emulator.triggerCalls(for: installation) == 0)

            try await h.emulator.upgrade(installation)
            let answer = try await h.token(installation)
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            let records = h.emulator.triggerRecords(for: installation)
            #expect(records.map(\.keyId) == [replaced.triggerKeyId])
            #expect(records.allSatisfy { $0.signatureValid })
        }
    }

    @Test("the lifecycle event's metadata comes from the FIT: cloudId and apiBaseUrl, not the body")
    func lifecycleMetadataFromFIT() async throws {
        try await GatewayHarness.run { h in
            let installation = h.emulator.makeInstallation()
            let otherCloud = UUID().uuidString.lowercased()
            // A body naming another site and installation: only the FIT counts.
            let body = """
                {"eventType":"avi:forge:installed:app","id":"ari:cloud:ecosystem::installation/\(UUID().uuidString.lowercased())",\
                "app":{"id":"\(ForgeEmulatorConfiguration.demoAppId)","version":"1"},"environment":{"id":"e"},\
                "context":"ari:cloud:jira::site/\(otherCloud)","installerAccountId":"557058:x"}
                """
            let answer = try await h.call(
                .POST, "/forge/lifecycle", secret: nil,
                headers: [
                    "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                    "content-type": "application/json",
                ], body: body)
            #expect(answer.status == 200)
            let metadata = try await h.call(.GET, GatewayHarness.path(installation))
            #expect(metadata.status == 200)
            #expect(metadata.json["installationId"] as? String == installation.id)
            #expect(metadata.json["cloudId"] as? String == installation.cloudId)
            #expect(metadata.json["apiBaseUrl"] as? String == installation.apiBaseUrl)
            #expect(metadata.json["status"] as? String == "active")
            #expect(metadata.json["triggerRegistered"] as? Bool == false)
        }
    }
}
