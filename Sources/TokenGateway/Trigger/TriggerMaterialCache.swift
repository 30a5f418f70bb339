import FlowEngine
import Synchronization

/// The opened trigger material (URL and signing key) per installation, so a trigger attempt does
/// not read the sealed key and decrypt both again while nothing changed.
///
/// An entry is used only while the store's ``GatewayStore/TriggerMaterialVersion`` (sealed URL and
/// current key id, read on every attempt) is the one it was opened for: a rotated key (a new key
/// id), a re-registered URL or an uninstall (no version at all) replaces or drops it. An uninstall
/// through this replica drops it at once (``forget(_:)``). At most ``capacity`` installations are
/// held; beyond that the cache starts over.
final class TriggerMaterialCache: Sendable {
    /// Its printed and reflected forms show the key id only: the URL is a credential.
    struct Entry: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
        let version: GatewayStore.TriggerMaterialVersion
        let url: String
        let key: TriggerSigningKey

        var description: String { "TriggerMaterialCache.Entry(keyID: \(self.key.keyId), url redacted)" }
        var debugDescription: String { self.description }
        var customMirror: Mirror { Mirror(self, children: ["keyID": self.key.keyId]) }
    }

    /// Installations held at most.
    let capacity: Int
    private let entries = Mutex<[InstallationID: Entry]>([:])

    init(capacity: Int = 10_000) {
        self.capacity = capacity
    }

    /// The entry for `id` if it was opened for `version`.
    func entry(_ id: InstallationID, version: GatewayStore.TriggerMaterialVersion) -> Entry? {
        self.entries.withLock { entries in
            guard let entry = entries[id], entry.version == version else { return nil }
            return entry
        }
    }

    func store(_ id: InstallationID, _ entry: Entry) {
        self.entries.withLock { entries in
            if entries[id] == nil, entries.count >= self.capacity { entries.removeAll(keepingCapacity: true) }
            entries[id] = entry
        }
    }

    /// Drops what is held for `id` (uninstalled, or no trigger in force).
    func forget(_ id: InstallationID) {
        _ = self.entries.withLock { $0.removeValue(forKey: id) }
    }

    /// The key id held for `id`, if any.
    func keyID(for id: InstallationID) -> String? {
        self.entries.withLock { $0[id]?.version.keyID }
    }
}
