import FlowEngine
import ForgeEmulator
import Foundation
import Testing

@testable import TokenGateway

/// The trigger sender keeps the opened trigger URL and signing key per installation and key id,
/// and honours a rotated key and an uninstall at the next attempt (real Redis, real HTTP).
@Suite("Trigger material held per key id")
struct TriggerMaterialCacheTests {
    @Test("a key rotated in the store signs the next trigger call, although the previous key was held")
    func rotationIsHonoured() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let path = GatewayHarness.path(installation) + "/token/refresh"
            let original = try #require(try await h.gateway.store.installation(id)?.triggerKeyId)

            // Two calls with the same material: the second one signs with the key held since the first.
            for _ in 0..<2 {
                #expect(try await h.call(.POST, path).status == 200)
                #expect(h.emulator.triggerRecords(for: installation).last?.keyId == original)
                #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)
                #expect(h.gateway.triggerClient.materials.keyID(for: id) == original)
            }

            // Rotate in the store only (as another replica's `keys rotate` would): the trigger URL
            // is untouched, the key id in force changes at once.
            let next = TriggerSigningKey.generate()
            _ = try await h.gateway.store.rotateTriggerKey(
                id, candidateKeyID: next.keyId, candidateKey: next.rawPrivateKey, overlap: .zero, now: FlowTime.now())
            _ = try await h.call(.POST, path + "?timeout=1500")
            #expect(h.emulator.triggerRecords(for: installation).last?.keyId == next.keyId)
            #expect(h.gateway.triggerClient.materials.keyID(for: id) == next.keyId)

            // Once the Forge side knows the new key, the held material signs valid calls.
            #expect(try await h.emulator.register(installation).triggerKeyId == next.keyId)
            #expect(try await h.call(.POST, path).status == 200)
            #expect(h.emulator.triggerRecords(for: installation).last?.keyId == next.keyId)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)
        }
    }

    @Test("an uninstall drops the held material, through this replica at once and through another at the next attempt")
    func uninstallIsHonoured() async throws {
        try await GatewayHarness.run { h in
            // Through this replica's lifecycle route.
            let first = try await h.installed()
            #expect(try await h.call(.POST, GatewayHarness.path(first) + "/token/refresh").status == 200)
            #expect(h.gateway.triggerClient.materials.keyID(for: first.installationID) != nil)
            #expect(try await h.emulator.sendLifecycleEvent(.uninstalled, for: first).status == 200)
            #expect(h.gateway.triggerClient.materials.keyID(for: first.installationID) == nil)

            // Through another replica: only the store changes; the next attempt finds no material.
            let second = try await h.installed()
            #expect(try await h.call(.POST, GatewayHarness.path(second) + "/token/refresh").status == 200)
            #expect(h.gateway.triggerClient.materials.keyID(for: second.installationID) != nil)
            try await h.gateway.store.uninstall(second.installationID, now: FlowTime.now())
            #expect(try await h.gateway.triggerClient.material(for: second.installationID) == nil)
            #expect(h.gateway.triggerClient.materials.keyID(for: second.installationID) == nil)
        }
    }
}
