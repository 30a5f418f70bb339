import FlowEngine
import Foundation

/// The FIT `jti` replay guard: `tg:{<installation ARI>}:seen-fit:<jti>`, in the installation's
/// hash slot, set with `NX` and expiring a minute after the token stops being accepted.
///
/// A Forge call claims its token's `jti` when it is about to change state, after its body was
/// checked: a call refused for its body uses nothing up. A delivery claims it inside the store
/// script that stores its token (``firstUseKey(_:_:)``), so the claim costs no round trip of its
/// own and a replay changes nothing at all.
struct InvocationReplayGuard: Sendable {
    let store: GatewayStore
    let now: @Sendable () -> FlowTime

    init(store: GatewayStore, now: @escaping @Sendable () -> FlowTime = { FlowTime.now() }) {
        self.store = store
        self.now = now
    }

    /// The key that remembers FIT id `jti` for installation `id`.
    func seenKey(_ id: InstallationID, jti: String) -> String { self.store.tag(id) + ":seen-fit:" + jti }

    /// The key and lifetime that claim `invocation`'s `jti` inside a store script.
    func firstUseKey(_ id: InstallationID, _ invocation: InvocationContext) -> GatewayStore.FirstUseKey {
        let until = Int64(invocation.acceptedUntil.timeIntervalSince1970.rounded(.down))
        let seconds = max(until - self.now().unixSeconds + 61, 1)
        return GatewayStore.FirstUseKey(key: self.seenKey(id, jti: invocation.jti), lifetime: .seconds(seconds))
    }

    /// Claims `invocation`'s `jti` on its own.
    ///
    /// - Throws: ``InvocationTokenError/replayed`` when it was claimed before,
    ///   ``InvocationTokenError/storeUnavailable`` when Redis cannot be asked.
    func claim(_ id: InstallationID, _ invocation: InvocationContext) async throws(InvocationTokenError) {
        let claim = self.firstUseKey(id, invocation)
        let reply: RedisValue
        do {
            reply = try await self.store.redis.send([
                "SET", claim.key, "1", "NX", "PX", String(claim.lifetime.milliseconds),
            ])
        } catch {
            throw .storeUnavailable
        }
        guard reply.string == "OK" else { throw .replayed }
    }

    /// Gives back a claim made by ``claim(_:_:)`` for a call then refused with nothing stored (a
    /// registration of an uninstalled installation, which stays uninstalled), so the refusal uses
    /// nothing up. Best effort: a claim that cannot be deleted just expires.
    func release(_ id: InstallationID, _ invocation: InvocationContext) async {
        _ = try? await self.store.redis.send(["DEL", self.seenKey(id, jti: invocation.jti)])
    }
}
