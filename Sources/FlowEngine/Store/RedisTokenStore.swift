import RedisKit

/// The ``TokenStore`` of the token flow on Redis, over the gateway's keys (``GatewayStore``).
///
/// The cold path before the trigger call leaves costs two round trips here: the snapshot (one
/// pipeline) and the lease with the pending request and the trigger material the first call
/// needs (one script, ``RedisTokenStore/takeLeaseScript``).
public struct RedisTokenStore: TokenStore {
    /// Redis could not be reached (``RedisError/unavailable``: no connection, or the client shut
    /// down): the command was never sent. Any other failure may have run, a connection lost with the
    /// command in flight (``RedisError/connectionLost``) included.
    public func mayHaveRun(failingWith error: any Error) -> Bool {
        (error as? RedisError) != .unavailable
    }

    /// ``RedisError/unavailable`` and ``RedisError/connectionLost``.
    public func isUnreachable(_ error: any Error) -> Bool {
        (error as? RedisError)?.isConnectionFailure == true
    }

    /// The gateway's keys and sealing.
    public let store: GatewayStore

    public init(store: GatewayStore) {
        self.store = store
    }

    public func snapshot(_ id: InstallationID, timeout: Duration?) async throws -> TokenStoreSnapshot {
        Self.tokenStoreSnapshot(try await self.store.snapshot(id, timeout: timeout))
    }

    private static func tokenStoreSnapshot(_ s: GatewayStore.RequestSnapshot) -> TokenStoreSnapshot {
        TokenStoreSnapshot(
            exists: s.exists, active: s.status == .active, triggerRegistered: s.triggerRegistered,
            apiBaseUrl: s.apiBaseUrl, token: s.token,
            circuitOpenUntil: s.circuitOpenUntil > 0 ? FlowTime(nanoseconds: s.circuitOpenUntil &* 1_000_000) : nil,
            holdRemaining: s.holdRemaining)
    }

    public func snapshot(_ id: InstallationID, timeout: Duration?, takingLease intent: SnapshotLeaseIntent?)
        async throws -> (snapshot: TokenStoreSnapshot, lease: SnapshotLease?)
    {
        guard let intent else { return (try await self.snapshot(id, timeout: timeout), nil) }
        let g = self.store
        let r = try await g.redis.eval(
            Self.snapshotTakingLeaseScript,
            keys: [
                g.installationKey(id), g.systemTokenKey(id), g.breakerKey(id), g.holdKey(id), g.leaseKey(id),
                g.pendingKey(id, requestID: intent.requestID), g.signingKeysKey(id),
            ],
            arguments: [
                String(intent.now.unixSeconds), String(intent.now.unixMilliseconds), String(intent.minValidity),
                intent.forced ? "1" : "0", intent.requestID, String(max(intent.ttl.milliseconds, 1)),
                intent.replicaID, intent.material == nil ? "0" : "1", intent.material?.heldKeyID ?? "",
            ], timeout: timeout)
        guard let items = r.array, items.count == 6 else { throw RedisError.protocolError }
        let snapshot = Self.tokenStoreSnapshot(try await g.requestSnapshot(id, replies: Array(items[0..<4])))
        guard items[4].int == 1 else { return (snapshot, nil) }
        let material = items[5].array.flatMap { TriggerMaterialRead(reply: $0[...]) }
        return (
            snapshot, SnapshotLease(requestID: intent.requestID, material: material, expires: intent.now + intent.ttl)
        )
    }

    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?
    ) async throws -> TokenStoreLeaseOutcome {
        try await self.takeLease(
            id, requestID: requestID, replicaID: replicaID, ttl: ttl, respectingHold: respectingHold,
            unlessNewerThan: unlessNewerThan, material: nil
        ).outcome
    }

    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?, material: TriggerMaterialQuery?
    ) async throws -> (outcome: TokenStoreLeaseOutcome, material: TriggerMaterialRead?) {
        let g = self.store
        let r = try await g.redis.eval(
            Self.takeLeaseScript,
            keys: [
                g.leaseKey(id), g.holdKey(id), g.pendingKey(id, requestID: requestID), g.installationKey(id),
                g.signingKeysKey(id), g.systemTokenKey(id), g.breakerKey(id),
            ],
            arguments: [
                requestID, String(max(ttl.milliseconds, 1)), respectingHold ? "1" : "0", replicaID,
                material == nil ? "0" : "1", material?.heldKeyID ?? "", unlessNewerThan.map(String.init) ?? "",
                String(FlowTime.now().unixMilliseconds),
            ])
        if let items = r.array, items.count == 2, items[0].int == 3 {
            // The circuit is open: 3 and its openUntil (ms).
            guard let openUntil = items[1].string.flatMap({ Int64($0) }) ?? items[1].int else {
                throw RedisError.protocolError
            }
            return (.circuitOpen(until: FlowTime(nanoseconds: openUntil &* 1_000_000)), nil)
        }
        if let items = r.array {
            // Taken, with the trigger material: 1, then the material's five fields.
            guard items.first?.int == 1, let read = TriggerMaterialRead(reply: items.dropFirst()) else {
                throw RedisError.protocolError
            }
            return (.taken, read)
        }
        guard let code = r.int else { throw RedisError.protocolError }
        switch code {
        case 1: return (.taken, nil)
        case 0: return (.busy, nil)
        case 2: return (.newerStored, nil)
        default: return (.held(remaining: .milliseconds(-code)), nil)
        }
    }

    @discardableResult
    public func extendLease(_ id: InstallationID, requestID: String, ttl: Duration) async throws -> Bool {
        try await self.store.extendLease(id, owner: requestID, ttl: ttl)
    }

    public func releaseLease(_ id: InstallationID, requestID: String) async throws {
        try await self.store.releaseLease(id, owner: requestID)
    }

    public func placeHold(_ id: InstallationID, requestID: String, duration: Duration, releasingLease: Bool)
        async throws
    {
        try await self.store.placeHold(id, requestID: requestID, duration: duration, releasingLease: releasingLease)
    }

    public func roundProbe(_ id: InstallationID, requestID: String?) async throws -> TokenStoreProbe {
        let p = try await self.store.roundProbe(id, requestID: requestID)
        return TokenStoreProbe(
            token: p.token, apiBaseUrl: p.apiBaseUrl, pendingOpen: p.pendingOpen, pendingAnswered: p.pendingAnswered,
            holdRemaining: p.holdRemaining, uninstalled: p.uninstalled)
    }

    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime
    ) async throws -> FlowTime? {
        let until = try await self.store.recordRoundOutcome(
            id, succeeded: succeeded, threshold: threshold, openBase: openBase, openCap: openCap, now: now)
        return until.map { FlowTime(nanoseconds: $0 &* 1_000_000) }
    }

    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime,
        releasingLease requestID: String
    ) async throws -> FlowTime? {
        let until = try await self.store.recordRoundOutcome(
            id, succeeded: succeeded, threshold: threshold, openBase: openBase, openCap: openCap, now: now,
            releasingLease: requestID)
        return until.map { FlowTime(nanoseconds: $0 &* 1_000_000) }
    }

    public func notifications() -> AsyncStream<TokenStoreNotification> {
        let events = IteratorBox(self.store.redis.subscribe(channels: [self.store.channel]).makeAsyncIterator())
        return AsyncStream(unfolding: {
            while let event = await events.iterator.next() {
                switch event {
                case .subscribed: return .subscribed
                case .unsubscribed: return .unsubscribed
                case .message(_, let payload): if let n = Self.parse(payload) { return n }
                }
            }
            return nil
        })
    }

    /// The subscription's iterator, advanced by `AsyncStream(unfolding:)`.
    ///
    /// `@unchecked Sendable`: `AsyncStream(unfolding:)` calls its closure once at a time (the
    /// next call only after the previous one returned), so the iterator is never used concurrently.
    private final class IteratorBox: @unchecked Sendable {
        var iterator: AsyncStream<RedisPubSubEvent>.Iterator
        init(_ iterator: AsyncStream<RedisPubSubEvent>.Iterator) { self.iterator = iterator }
    }

    /// Parses one message of the channel: `token <ari> <requestId|-> [same] [@<replica>]`, `hold <ari>`,
    /// `base <ari>`, `uninstalled <ari>`; nil for anything else.
    static func parse(_ payload: String) -> TokenStoreNotification? {
        let parts = payload.split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count >= 2, let id = InstallationID(String(parts[1])) else { return nil }
        switch parts[0] {
        case "token":
            let requestID = parts.count > 2 && parts[2] != "-" ? String(parts[2]) : nil
            let rest = parts.dropFirst(3)
            let origin = rest.first { $0.hasPrefix("@") && $0.count > 1 }.map { String($0.dropFirst()) }
            return .tokenStored(id, requestID: requestID, sameToken: rest.contains("same"), origin: origin)
        case "hold": return .holdPlaced(id)
        case "base": return .apiBaseURLChanged(id)
        case "uninstalled": return .uninstalled(id)
        default: return nil
        }
    }

    /// The snapshot (what ``GatewayStore/snapshot(_:timeout:)`` reads, in its order) and, when it
    /// shows that the caller needs a round and one can run, the lease with the pending request and
    /// (ARGV[8]) the trigger material, as ``takeLeaseScript`` takes them: one round trip.
    /// KEYS: installation, token, breaker, hold, lease, pending, signing keys (one hash slot).
    /// ARGV: now (s), now (ms), minValidity (s), forced (1/0), request id, ttl ms, replica id, read
    /// the trigger material (1/0), the key id whose sealed key the caller holds.
    /// Returns {installation fields, token fields, circuit's openUntil, hold's PTTL, lease taken
    /// (1/0), the trigger material (as ``takeLeaseScript``'s, without its leading 1) or false}.
    static let snapshotTakingLeaseScript = RedisScript(
        """
        local i = redis.call('HMGET', KEYS[1], 'status', 'triggerUrl', 'apiBaseUrl')
        local t = redis.call('HMGET', KEYS[2], 'exp', 'v', 'rid', 'at')
        local b = redis.call('HGET', KEYS[3], 'openUntil')
        local h = redis.call('PTTL', KEYS[4])
        local needed = ARGV[4] == '1' or not t[1] or not t[2]
          or tonumber(t[1]) < tonumber(ARGV[1]) + tonumber(ARGV[3])
        local possible = i[1] == 'active' and i[2] and i[2] ~= '' and h <= 0
          and (not b or tonumber(b) <= tonumber(ARGV[2]))
        if not (needed and possible) then return {i, t, b, h, 0, false} end
        if not redis.call('SET', KEYS[5], ARGV[5], 'NX', 'PX', ARGV[6]) then return {i, t, b, h, 0, false} end
        redis.call('SET', KEYS[6], ARGV[7], 'PX', ARGV[6])
        if ARGV[8] ~= '1' then return {i, t, b, h, 1, false} end
        \(Self.signingKeyRead(keys: 7, heldKeyID: 9))
        return {i, t, b, h, 1, {i[1], i[2], k[1], k[2], sealed}}
        """)

    /// Lua that reads the signing keys at KEYS[`keys`]: `k` (current key id, next key's activation
    /// time) and `sealed`, the current sealed key unless its id is ARGV[`heldKeyID`] (then false).
    private static func signingKeyRead(keys: Int, heldKeyID: Int) -> String {
        """
        local k = redis.call('HMGET', KEYS[\(keys)], 'current', 'nextActivatesAt')
        local sealed = false
        if k[1] and k[1] ~= ARGV[\(heldKeyID)] then sealed = redis.call('HGET', KEYS[\(keys)], 'key:' .. k[1]) end
        """
    }

    /// Takes a round's lease unless another holds it, (when asked) a hold is in force or (when
    /// ARGV[7] is set) the stored token expires after ARGV[7], and records the round's pending
    /// request with it; when the lease is taken and ARGV[5] asks for it, also reads the trigger
    /// material the round's first trigger call needs: one round trip. (The token's key expires
    /// with the token: a stored one is valid.)
    /// KEYS: lease, hold, pending, installation, signing keys, token, breaker (one hash slot).
    /// ARGV: request id (the lease's owner value), ttl ms, respect hold (1/0), replica id (the
    /// pending request's owner), read the trigger material (1/0), the key id whose sealed key the
    /// caller holds ("" for none), the expiry (Unix s) a stored token must be later than to stop
    /// the take ("" for none), now (ms). Returns 1 (taken) or {1, status, sealed trigger URL,
    /// current key id, next key's activation time, sealed current key unless its id is ARGV[6]}
    /// (taken, with the material), 0 (busy), 2 (a later token is stored), {3, the circuit's
    /// openUntil ms} (the circuit is open) or minus the hold's remaining milliseconds.
    static let takeLeaseScript = RedisScript(
        """
        if ARGV[3] == '1' then
          local held = redis.call('PTTL', KEYS[2])
          if held > 0 then return -held end
        end
        if ARGV[7] ~= '' and (tonumber(redis.call('HGET', KEYS[6], 'exp')) or 0) > tonumber(ARGV[7]) then
          return 2
        end
        local b = tonumber(redis.call('HGET', KEYS[7], 'openUntil') or '')
        if b and b > tonumber(ARGV[8]) then return {3, string.format('%d', b)} end
        if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
          redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
          if ARGV[5] ~= '1' then return 1 end
          local i = redis.call('HMGET', KEYS[4], 'status', 'triggerUrl')
          \(Self.signingKeyRead(keys: 5, heldKeyID: 6))
          return {1, i[1], i[2], k[1], k[2], sealed}
        end
        return 0
        """)
}
