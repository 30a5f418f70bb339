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

    @Test("a round's lease brings the trigger material for its first call: the sender needs no read of its own")
    func leaseBringsTheMaterial() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let store = RedisTokenStore(store: h.gateway.store)
            let client = h.gateway.triggerClient
            let current = try #require(try await h.gateway.store.installation(id)?.triggerKeyId)
            let inForce = try #require(
                try await h.gateway.store.readTriggerMaterial(id, now: FlowTime.now(), cachedKeyID: nil))
            func scriptCalls() async throws -> Int {
                let info = try await h.gateway.redis.send(["INFO", "commandstats"]).string ?? ""
                guard let line = info.split(separator: "\r\n").first(where: { $0.hasPrefix("cmdstat_evalsha:") }),
                    let range = line.range(of: "calls=")
                else { return 0 }
                return Int(line[range.upperBound...].prefix { $0.isNumber }) ?? 0
            }

            // No key held yet: the lease brings the sealed key with the URL.
            let taken = try await store.takeLease(
                id, requestID: "rq_lease_1", replicaID: "replica-t", ttl: .seconds(5), respectingHold: true,
                unlessNewerThan: nil, material: client.triggerMaterialQuery(for: id))
            #expect(taken.outcome == .taken)
            let read = try #require(taken.material)
            #expect(read.status == "active")
            #expect(read.keyID == current)
            #expect(read.sealedURL == inForce.version.sealedURL)
            #expect(read.sealedKey != nil && read.sealedKey == inForce.sealedKey)
            #expect(try await store.roundProbe(id, requestID: "rq_lease_1").pendingOpen)
            let before = try await scriptCalls()
            let entry = try #require(try await client.material(for: id, leaseRead: read))
            #expect(try await scriptCalls() == before, "the sender read the store although the lease brought it all")
            #expect(entry.key.keyId == current)
            #expect(client.materials.keyID(for: id) == current)

            // The key held: the next lease leaves its sealed key out; a busy lease reads nothing.
            try await store.releaseLease(id, requestID: "rq_lease_1")
            let again = try await store.takeLease(
                id, requestID: "rq_lease_2", replicaID: "replica-t", ttl: .seconds(5), respectingHold: true,
                unlessNewerThan: nil, material: client.triggerMaterialQuery(for: id))
            #expect(again.outcome == .taken)
            #expect(again.material?.keyID == current)
            #expect(again.material?.sealedURL == inForce.version.sealedURL)
            #expect(again.material != nil && again.material?.sealedKey == nil)
            let busy = try await store.takeLease(
                id, requestID: "rq_lease_3", replicaID: "replica-t", ttl: .seconds(5), respectingHold: true,
                unlessNewerThan: nil, material: client.triggerMaterialQuery(for: id))
            #expect(busy.outcome == .busy)
            #expect(busy.material == nil)
            let held = try await scriptCalls()
            #expect(try await client.material(for: id, leaseRead: again.material)?.key.keyId == current)
            #expect(try await scriptCalls() == held)
            try await store.releaseLease(id, requestID: "rq_lease_2")

            // A lease read that shows a next key due is not used: the sender reads (and promotes) itself.
            var due = read
            due.keyID = "tk_not_in_force"
            due.nextActivatesAt = FlowTime.now().unixSeconds - 1
            let beforeDue = try await scriptCalls()
            #expect(try await client.material(for: id, leaseRead: due)?.key.keyId == current)
            #expect(try await scriptCalls() > beforeDue)
        }
    }
}
