import FlowEngine

/// Trigger-signing key rotation with an overlap window.
///
/// The `signing-keys` hash of an installation holds `current` (the key id the gateway signs with),
/// `key:<id>` (the sealed Ed25519 private key) and `createdAt:<id>`. A rotation adds a *next* key
/// (`next`, `nextActivatesAt`): it is announced to the Forge side at once (in the answer of
/// `/forge/register`) but signed with only from `nextActivatesAt` on, so the Forge side holds
/// both public keys before the first call signed with the new one. When the window has passed,
/// the next key is promoted on first use: it becomes `current`, the old private key is deleted and
/// the installation's `triggerKeyId` follows.
extension GatewayStore {
    /// One trigger-signing key, opened. Its printed and reflected forms show the key id only.
    public struct TriggerKey: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
        public let keyID: String
        /// The 32-byte Ed25519 private key. Never log or send it.
        public let rawPrivateKey: [UInt8]

        public var description: String { "TriggerKey(keyID: \(self.keyID), key redacted)" }
        public var debugDescription: String { self.description }
        public var customMirror: Mirror { Mirror(self, children: ["keyID": self.keyID]) }
    }

    /// The keys of an installation: the one signed with now and, during a rotation, the announced one.
    public struct TriggerKeys: Sendable {
        public let current: TriggerKey
        public let next: TriggerKey?
        /// Unix seconds from which ``next`` signs; nil without a rotation in progress.
        public let nextActivatesAt: Int64?
    }

    /// Promotes a due next key, then reads the installation's keys; nil when the installation has
    /// no signing key (never registered, or uninstalled).
    public func triggerKeys(_ id: InstallationID, now: FlowTime) async throws -> TriggerKeys? {
        let r = try await self.redis.eval(
            TriggerKeyScripts.read, keys: [self.installationKey(id), self.signingKeysKey(id)],
            arguments: [String(now.unixSeconds)])
        return try await self.openTriggerKeysDroppingNext(id, reply: r).keys
    }

    /// Starts a rotation: stores a next key (`candidateKeyID`/`candidateKey`) that signs from
    /// `now + overlap` on, unless a rotation is already in progress, whose next key is kept (so a
    /// retried call announces the same key). A due next key is promoted first; a zero overlap
    /// promotes the new key at once. Returns the keys in force afterwards, nil when the
    /// installation has no signing key.
    public func rotateTriggerKey(
        _ id: InstallationID, candidateKeyID: String, candidateKey: [UInt8], overlap: Duration, now: FlowTime
    ) async throws -> TriggerKeys? {
        let signingKey = self.signingKeysKey(id)
        let sealed = try self.box.seal(candidateKey, context: signingKey + "#key:" + candidateKeyID)
        let activatesAt = now.unixSeconds + max(0, overlap.components.seconds)
        let arguments = [String(now.unixSeconds), candidateKeyID, sealed, String(activatesAt)]
        let keys = [self.installationKey(id), signingKey]
        let first = try await self.openTriggerKeysDroppingNext(
            id, reply: try await self.redis.eval(TriggerKeyScripts.rotate, keys: keys, arguments: arguments))
        guard first.droppedNext else { return first.keys }
        // The rotation in progress had a next key that does not open: it is gone, so this one starts.
        return try await self.openTriggerKeysDroppingNext(
            id, reply: try await self.redis.eval(TriggerKeyScripts.rotate, keys: keys, arguments: arguments)
        ).keys
    }

    /// ``openTriggerKeys(_:reply:)``; a next key that does not open with the key ring (an
    /// encryption key removed before `keys rewrap` finished) is deleted, its rotation given up,
    /// and the keys are answered without it.
    private func openTriggerKeysDroppingNext(_ id: InstallationID, reply: RedisValue) async throws -> (
        keys: TriggerKeys?, droppedNext: Bool
    ) {
        let (keys, unopenableNext) = try self.openTriggerKeys(id, reply: reply)
        guard let unopenableNext else { return (keys, false) }
        _ = try await self.redis.eval(
            TriggerKeyScripts.dropNext, keys: [self.installationKey(id), self.signingKeysKey(id)],
            arguments: [unopenableNext])
        return (keys, true)
    }

    /// The trigger URL and the key to sign with now (promoting a due next key first), or nil when
    /// no trigger is registered or the installation is uninstalled.
    public func currentTriggerMaterial(_ id: InstallationID, now: FlowTime) async throws -> TriggerMaterial? {
        _ = try await self.redis.eval(
            TriggerKeyScripts.promoteIfDue, keys: [self.installationKey(id), self.signingKeysKey(id)],
            arguments: [String(now.unixSeconds)])
        return try await self.triggerMaterial(id)
    }

    /// The keys of a reply, opened; a next key that does not open is left out and its id returned.
    private func openTriggerKeys(_ id: InstallationID, reply: RedisValue) throws -> (
        keys: TriggerKeys?, unopenableNext: String?
    ) {
        guard let items = reply.array else { throw RedisError.protocolError }
        if items.isEmpty { return (nil, nil) }
        guard items.count == 5, let currentID = items[0].string, let currentSealed = items[1].string else {
            throw RedisError.protocolError
        }
        let signingKey = self.signingKeysKey(id)
        let current = TriggerKey(
            keyID: currentID,
            rawPrivateKey: try self.open(currentSealed, context: signingKey + "#key:" + currentID, kind: .signingKey)
        )
        if let nextID = items[2].string, !nextID.isEmpty, let nextSealed = items[3].string, !nextSealed.isEmpty {
            guard
                let raw = try? self.open(nextSealed, context: signingKey + "#key:" + nextID, kind: .signingKey)
            else {
                return (TriggerKeys(current: current, next: nil, nextActivatesAt: nil), nextID)
            }
            let next = TriggerKey(keyID: nextID, rawPrivateKey: raw)
            return (TriggerKeys(current: current, next: next, nextActivatesAt: items[4].int), nil)
        }
        return (TriggerKeys(current: current, next: nil, nextActivatesAt: nil), nil)
    }
}

/// The scripts of trigger-key rotation. KEYS: installation, signing keys (same hash tag).
enum TriggerKeyScripts {
    /// Shared Lua: promotes the next key when due. Needs `now` in a local of that name.
    private static let promote = """
        local function promote()
          local nxt = redis.call('HGET', KEYS[2], 'next')
          if not nxt then return end
          local at = tonumber(redis.call('HGET', KEYS[2], 'nextActivatesAt') or '0')
          if at > now then return end
          local old = redis.call('HGET', KEYS[2], 'current')
          redis.call('HSET', KEYS[2], 'current', nxt)
          redis.call('HDEL', KEYS[2], 'next', 'nextActivatesAt')
          if old and old ~= nxt then redis.call('HDEL', KEYS[2], 'key:' .. old, 'createdAt:' .. old) end
          if redis.call('HGET', KEYS[1], 'status') == 'active' then
            redis.call('HSET', KEYS[1], 'triggerKeyId', nxt, 'updatedAt', ARGV[1])
          end
        end
        local function answer()
          local cur = redis.call('HGET', KEYS[2], 'current')
          if not cur then return {} end
          local nxt = redis.call('HGET', KEYS[2], 'next') or ''
          local nxtKey = ''
          if nxt ~= '' then nxtKey = redis.call('HGET', KEYS[2], 'key:' .. nxt) or '' end
          return {cur, redis.call('HGET', KEYS[2], 'key:' .. cur) or '', nxt, nxtKey,
                  redis.call('HGET', KEYS[2], 'nextActivatesAt') or ''}
        end
        """

    /// ARGV: now. Returns {} or {current, sealed, next, sealed next, activatesAt}.
    /// Gives up a rotation whose next key does not open: deletes it if it is still the next one.
    /// ARGV: the next key's id.
    static let dropNext = RedisScript(
        """
        if redis.call('HGET', KEYS[2], 'next') ~= ARGV[1] then return 0 end
        redis.call('HDEL', KEYS[2], 'next', 'nextActivatesAt', 'key:' .. ARGV[1], 'createdAt:' .. ARGV[1])
        return 1
        """)

    static let read = RedisScript(
        """
        local now = tonumber(ARGV[1])
        \(promote)
        promote()
        return answer()
        """)

    /// ARGV: now. Returns 1.
    static let promoteIfDue = RedisScript(
        """
        local now = tonumber(ARGV[1])
        \(promote)
        promote()
        return 1
        """)

    /// ARGV: now, candidate key id, candidate sealed key, activatesAt. Returns as ``read``.
    static let rotate = RedisScript(
        """
        local now = tonumber(ARGV[1])
        \(promote)
        if redis.call('HGET', KEYS[1], 'status') ~= 'active' then return {} end
        if not redis.call('HGET', KEYS[2], 'current') then return {} end
        promote()
        if not redis.call('HGET', KEYS[2], 'next') then
          redis.call('HSET', KEYS[2], 'next', ARGV[2], 'key:' .. ARGV[2], ARGV[3], 'createdAt:' .. ARGV[2], ARGV[1],
            'nextActivatesAt', ARGV[4])
          promote()
        end
        return answer()
        """)
}
