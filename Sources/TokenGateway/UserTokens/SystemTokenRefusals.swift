import Crypto
import FlowEngine

/// What a process remembers of system tokens the user-token exchange refused (401), per
/// installation, for one ``window``:
/// - the refused token (by digest), so that no exchange of the installation calls with it again
///   meanwhile (Atlassian would refuse it again);
/// - when a fresh system token was last forced because of such a refusal, so that a token
///   Atlassian keeps refusing costs one forced refresh (maybe a trigger round trip) a window, not
///   one per user asked for.
///
/// Entries older than the window are dropped on every write, so it holds at most one per
/// installation refused within the last window.
struct SystemTokenRefusals {
    struct Entry {
        var refusedDigest: SHA256.Digest?
        var refusedAt: FlowTime?
        var forcedAt: FlowTime?
        /// Forced fetches under way.
        var forcing = 0
    }

    /// How long a refusal and a forced refresh are remembered.
    static let window: Duration = .seconds(60)

    private(set) var entries: [InstallationID: Entry] = [:]

    /// Whether `token` was refused for `installation` within the window.
    func isRefused(_ token: String, for installation: InstallationID, now: FlowTime) -> Bool {
        guard let entry = self.entries[installation], let at = entry.refusedAt, now - at < Self.window else {
            return false
        }
        return entry.refusedDigest == SHA256.hash(data: Array(token.utf8))
    }

    /// Records that the exchange refused `token` for `installation`.
    mutating func refused(_ token: String, for installation: InstallationID, now: FlowTime) {
        self.prune(now: now)
        var entry = self.entries[installation] ?? Entry()
        entry.refusedDigest = SHA256.hash(data: Array(token.utf8))
        entry.refusedAt = now
        self.entries[installation] = entry
    }

    /// True when a fresh system token may be forced for `installation` because of a refusal: none
    /// was within the window, or one is still being fetched (a caller forcing too joins that
    /// round). Then the fetch counts as under way until ``forcedRefreshEnded(_:)``. False
    /// otherwise: the current token is used as it is.
    mutating func beginForcedRefresh(_ installation: InstallationID, now: FlowTime) -> Bool {
        self.prune(now: now)
        var entry = self.entries[installation] ?? Entry()
        if entry.forcing == 0 {
            if let forcedAt = entry.forcedAt, now - forcedAt < Self.window { return false }
            entry.forcedAt = now
        }
        entry.forcing += 1
        self.entries[installation] = entry
        return true
    }

    /// A forced fetch begun by ``beginForcedRefresh(_:now:)`` has ended.
    mutating func forcedRefreshEnded(_ installation: InstallationID) {
        guard let forcing = self.entries[installation]?.forcing, forcing > 0 else { return }
        self.entries[installation]?.forcing = forcing - 1
    }

    private mutating func prune(now: FlowTime) {
        self.entries = self.entries.filter { _, entry in
            entry.forcing > 0
                || [entry.refusedAt, entry.forcedAt].contains { $0.map { now - $0 < Self.window } ?? false }
        }
    }
}
