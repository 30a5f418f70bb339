import FlowEngine
import Testing

@testable import TokenGateway

@Suite struct TriggerMaterialCacheUnitTests {
    static func entry(url: String = "https://t.example/a", keyID: String? = nil) -> TriggerMaterialCache.Entry {
        let key = TriggerSigningKey.generate()
        return TriggerMaterialCache.Entry(
            version: .init(sealedURL: "sealed:" + url, keyID: keyID ?? key.keyId), url: url, key: key)
    }

    @Test func anEntryIsUsedOnlyForTheVersionItWasOpenedFor() {
        let cache = TriggerMaterialCache()
        let id = InstallationID("0d6a1c4e-7f5b-4b8e-9a43-2f1e6c1d7b90")!
        let held = Self.entry()
        cache.store(id, held)
        #expect(cache.entry(id, version: held.version)?.url == held.url)
        #expect(cache.entry(id, version: .init(sealedURL: held.version.sealedURL, keyID: "tk_other")) == nil)
        #expect(cache.entry(id, version: .init(sealedURL: "sealed:other", keyID: held.version.keyID)) == nil)
        cache.forget(id)
        #expect(cache.entry(id, version: held.version) == nil)
        #expect(cache.keyID(for: id) == nil)
    }

    @Test func theCacheStartsOverBeyondItsCapacity() {
        let cache = TriggerMaterialCache(capacity: 2)
        let ids = (0..<3).map { InstallationID("inst-\($0)")! }
        let entries = ids.map { _ in Self.entry() }
        cache.store(ids[0], entries[0])
        cache.store(ids[1], entries[1])
        // Replacing a held installation does not count as a new one.
        cache.store(ids[1], entries[1])
        #expect(cache.keyID(for: ids[0]) != nil)
        cache.store(ids[2], entries[2])
        #expect(cache.keyID(for: ids[0]) == nil)
        #expect(cache.keyID(for: ids[1]) == nil)
        #expect(cache.keyID(for: ids[2]) == entries[2].version.keyID)
    }
}
