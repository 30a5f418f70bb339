/// Leases a process held whose release failed (the store could not be reached), per key: given
/// back once the store is heard again, so the next round, on any replica, does not wait for them
/// to run out. A few per key at most (a process holds one lease of a key at a time).
public struct OwedReleases<Key: Hashable & Sendable>: Sendable {
    private var owed: [Key: Set<String>] = [:]

    public init() {}

    /// The lease `owner` held on `key` is owed.
    public mutating func owe(_ key: Key, owner: String) {
        guard self.owed[key, default: []].count < 4 else { return }
        self.owed[key, default: []].insert(owner)
    }

    /// Takes the owed leases `due` says to give back now; the others stay owed.
    public mutating func take(where due: (Key, String) -> Bool) -> [(Key, String)] {
        var taken: [(Key, String)] = []
        for (key, owners) in self.owed {
            for owner in owners where due(key, owner) { taken.append((key, owner)) }
        }
        for (key, owner) in taken {
            self.owed[key]?.remove(owner)
            if self.owed[key]?.isEmpty == true { self.owed[key] = nil }
        }
        return taken
    }

    /// Gives `owed` back all at once with `release` (true when it went through): a store still slow
    /// holds the caller up for one command at most. Returns how many went through.
    public static func giveBack(
        _ owed: [(Key, String)], with release: @escaping @Sendable (Key, String) async -> Bool
    ) async -> Int {
        await withTaskGroup(of: Bool.self) { group in
            for (key, owner) in owed { group.addTask { await release(key, owner) } }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
    }

    /// The owners owed on `key`.
    public func owners(of key: Key) -> Set<String> { self.owed[key] ?? [] }

    public var isEmpty: Bool { self.owed.isEmpty }
}
