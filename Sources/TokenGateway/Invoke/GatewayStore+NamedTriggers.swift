import FlowEngine

/// Named triggers: an installation's other web triggers, called through
/// `POST /v1/installations/{id}/invoke/{key}` and signed with the same key as the auth trigger.
///
/// Keys (same hash tag as the installation's other keys):
/// - `named-triggers` — hash: trigger key → sealed URL (AAD `<hash key>#<trigger key>`).
/// - `invoke-breaker` — hash: `<trigger key>:failures`, `<trigger key>:opens`,
///   `<trigger key>:openUntil` (unix ms); one circuit per trigger key.
/// - `invoke-idem:<trigger key>:<digest>` — hash: `state` (`pending`/`done`), `owner`, `fp`
///   (payload fingerprint), `answer` (sealed); its index `invoke-idem-index` (a sorted set of those
///   key names scored by when each expires, unix ms: every claim drops the entries past their time,
///   a released claim leaves it at once). Earlier builds kept an untrimmed set, `invoke-idem`;
///   uninstall still deletes what it names.
///
/// Uninstall deletes all of them (``deleteNamedTriggerState(_:)``).
extension GatewayStore {
    func namedTriggersKey(_ id: InstallationID) -> String { self.tag(id) + ":named-triggers" }
    func invokeBreakerKey(_ id: InstallationID) -> String { self.tag(id) + ":invoke-breaker" }
    func invokeIdempotencyIndexKey(_ id: InstallationID) -> String { self.tag(id) + ":invoke-idem-index" }
    func legacyInvokeIdempotencyIndexKey(_ id: InstallationID) -> String { self.tag(id) + ":invoke-idem" }
    func invokeIdempotencyKey(_ id: InstallationID, trigger: String, digest: String) -> String {
        self.tag(id) + ":invoke-idem:" + trigger + ":" + digest
    }

    /// How a change of named triggers ended.
    public enum NamedTriggerUpdate: Sendable, Hashable {
        case updated
        /// The installation is uninstalled: nothing was stored.
        case uninstalled
        /// The change would leave more than the allowed number of triggers: nothing was stored.
        case tooMany
    }

    /// Sets (URL) or removes (nil) named triggers atomically, unless the installation is
    /// uninstalled, and only if at most `maxCount` triggers remain afterwards.
    ///
    /// `/forge/register` runs it before the registration itself (which creates an installation
    /// seen for the first time), so a change refused here leaves the auth trigger untouched.
    public func updateNamedTriggers(
        _ id: InstallationID, changes: [(key: String, url: String?)], maxCount: Int, now: FlowTime
    ) async throws -> NamedTriggerUpdate {
        if changes.isEmpty { return .updated }
        let hashKey = self.namedTriggersKey(id)
        var arguments = [String(now.unixSeconds), String(maxCount)]
        for change in changes {
            arguments.append(change.key)
            if let url = change.url {
                arguments.append(try self.box.seal(Array(url.utf8), context: hashKey + "#" + change.key))
            } else {
                arguments.append("")
            }
        }
        let r = try await self.redis.eval(
            NamedTriggerScripts.update, keys: [self.installationKey(id), hashKey], arguments: arguments)
        switch r.int {
        case 1: return .updated
        case -1: return .uninstalled
        case -2: return .tooMany
        default: throw RedisError.protocolError
        }
    }

    /// The keys of an installation's named triggers, sorted.
    public func namedTriggerKeys(_ id: InstallationID) async throws -> [String] {
        let r = try await self.redis.send(["HKEYS", self.namedTriggersKey(id)])
        return (r.array ?? []).compactMap(\.string).sorted()
    }

    /// What an invocation finds for an installation and a trigger key.
    public enum NamedTriggerLookup: Sendable {
        case installationNotFound
        case uninstalled
        /// The installation has no trigger under that key (or no signing key).
        case noTrigger
        /// The trigger's circuit is open until this instant (unix ms).
        case circuitOpen(untilMilliseconds: Int64)
        case found(TriggerMaterial)
    }

    /// The URL of the named trigger and the key to sign with now (promoting a due next key first),
    /// or why there is none; an open circuit is reported before the material is opened.
    public func namedTriggerMaterial(_ id: InstallationID, key: String, now: FlowTime) async throws
        -> NamedTriggerLookup
    {
        let installationKey = self.installationKey(id)
        let signingKey = self.signingKeysKey(id)
        let hashKey = self.namedTriggersKey(id)
        _ = try await self.redis.eval(
            TriggerKeyScripts.promoteIfDue, keys: [installationKey, signingKey], arguments: [String(now.unixSeconds)])
        let replies = try await self.redis.pipeline([
            ["HGET", installationKey, "status"],
            ["HGET", hashKey, key],
            ["HGET", signingKey, "current"],
            ["HGET", self.invokeBreakerKey(id), key + ":openUntil"],
        ])
        guard replies.count == 4 else { throw RedisError.protocolError }
        guard let status = replies[0].string else { return .installationNotFound }
        if status != InstallationStatus.active.rawValue { return .uninstalled }
        guard let sealedURL = replies[1].string, let keyID = replies[2].string else { return .noTrigger }
        if let until = replies[3].int, until > now.unixMilliseconds { return .circuitOpen(untilMilliseconds: until) }
        guard let sealedKey = try await self.redis.send(["HGET", signingKey, "key:" + keyID]).string else {
            return .noTrigger
        }
        let url = try self.open(sealedURL, context: hashKey + "#" + key, kind: .namedTriggerUrl)
        let raw = try self.open(sealedKey, context: signingKey + "#key:" + keyID, kind: .signingKey)
        return .found(TriggerMaterial(url: String(decoding: url, as: UTF8.self), keyID: keyID, rawPrivateKey: raw))
    }

    /// Records how a call to a named trigger ended, for that trigger's circuit breaker. Returns the
    /// instant (unix ms) until which the circuit is now open, or nil when it is closed.
    public func recordInvocationOutcome(
        _ id: InstallationID, key: String, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration,
        now: FlowTime
    ) async throws -> Int64? {
        let r = try await self.redis.eval(
            NamedTriggerScripts.recordOutcome, keys: [self.invokeBreakerKey(id)],
            arguments: [
                key, succeeded ? "1" : "0", String(threshold), String(openBase.milliseconds),
                String(openCap.milliseconds), String(now.unixMilliseconds),
            ])
        guard let items = r.array, items.count == 2, let opened = items[0].int else { throw RedisError.protocolError }
        return opened == 1 ? items[1].int : nil
    }

    // MARK: Idempotency

    /// What claiming an idempotency key found.
    public enum IdempotencyClaim: Sendable, Hashable {
        /// This request owns the key now and makes the call.
        case claimed
        /// Another request with this key is still in progress.
        case inProgress
        /// A request with this key already finished: its answer (opened).
        case done(answer: [UInt8])
        /// The key was used with another payload.
        case payloadMismatch
    }

    /// Claims `(trigger key, idempotency digest)` for `owner` for `pendingTTL`, or reports what an
    /// earlier request with the same key left.
    public func claimIdempotencyKey(
        _ id: InstallationID, trigger: String, digest: String, fingerprint: String, owner: String,
        pendingTTL: Duration
    ) async throws -> IdempotencyClaim {
        let key = self.invokeIdempotencyKey(id, trigger: trigger, digest: digest)
        let r = try await self.redis.eval(
            NamedTriggerScripts.claim, keys: [key, self.invokeIdempotencyIndexKey(id)],
            arguments: [
                owner, fingerprint, String(max(pendingTTL.milliseconds, 1)), String(FlowTime.now().unixMilliseconds),
            ])
        guard let items = r.array, let first = items.first?.string else { throw RedisError.protocolError }
        switch first {
        case "claimed": return .claimed
        case "pending": return .inProgress
        case "mismatch": return .payloadMismatch
        case "done":
            guard items.count == 2, let sealed = items[1].string else { throw RedisError.protocolError }
            return .done(answer: try self.box.open(sealed, context: key + "#answer"))
        default: throw RedisError.protocolError
        }
    }

    /// Stores the answer of the call `owner` made, kept for `retention`; false when the claim
    /// was lost (expired or taken over) and nothing was stored.
    @discardableResult
    public func completeIdempotencyKey(
        _ id: InstallationID, trigger: String, digest: String, owner: String, answer: [UInt8], retention: Duration
    ) async throws -> Bool {
        let key = self.invokeIdempotencyKey(id, trigger: trigger, digest: digest)
        let sealed = try self.box.seal(answer, context: key + "#answer")
        let r = try await self.redis.eval(
            NamedTriggerScripts.complete, keys: [key, self.invokeIdempotencyIndexKey(id)],
            arguments: [owner, sealed, String(max(retention.milliseconds, 1)), String(FlowTime.now().unixMilliseconds)])
        return r.int == 1
    }

    /// Gives up `owner`'s claim without an answer, so a later request with the key calls again.
    public func releaseIdempotencyKey(_ id: InstallationID, trigger: String, digest: String, owner: String)
        async throws
    {
        _ = try await self.redis.eval(
            NamedTriggerScripts.release,
            keys: [
                self.invokeIdempotencyKey(id, trigger: trigger, digest: digest), self.invokeIdempotencyIndexKey(id),
            ],
            arguments: [owner])
    }

    /// Deletes the installation's named triggers, their circuits and cached answers.
    public func deleteNamedTriggerState(_ id: InstallationID) async throws {
        _ = try await self.redis.eval(
            NamedTriggerScripts.deleteAll,
            keys: [
                self.namedTriggersKey(id), self.invokeBreakerKey(id), self.legacyInvokeIdempotencyIndexKey(id),
                self.invokeIdempotencyIndexKey(id),
            ],
            arguments: [])
    }
}

/// The scripts of named triggers.
enum NamedTriggerScripts {
    /// KEYS: installation, named triggers. ARGV: now, max count, then pairs of trigger key and
    /// sealed URL ('' removes). Returns 1, -1 (uninstalled) or -2 (too many). An installation not
    /// yet recorded is allowed: its registration follows in the same request.
    static let update = RedisScript(
        """
        local status = redis.call('HGET', KEYS[1], 'status')
        if status == 'uninstalled' then return -1 end
        local count = redis.call('HLEN', KEYS[2])
        local seen = {}
        for i = 3, #ARGV, 2 do
          local k = ARGV[i]
          if not seen[k] then
            seen[k] = true
            local exists = redis.call('HEXISTS', KEYS[2], k) == 1
            if ARGV[i + 1] == '' then
              if exists then count = count - 1 end
            elseif not exists then
              count = count + 1
            end
          end
        end
        if count > tonumber(ARGV[2]) then return -2 end
        for i = 3, #ARGV, 2 do
          if ARGV[i + 1] == '' then
            redis.call('HDEL', KEYS[2], ARGV[i])
          else
            redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
          end
        end
        if status then redis.call('HSET', KEYS[1], 'updatedAt', ARGV[1]) end
        return 1
        """)

    /// KEYS: breaker. ARGV: trigger key, succeeded (1/0), threshold, base window ms, cap ms, now ms.
    /// Returns {opened (1/0), openUntil ms}. A failure while the circuit is open (a call that was
    /// in flight when it opened) is counted but is no reopening: the window stays as it is.
    static let recordOutcome = RedisScript(
        """
        local f, o, u = ARGV[1] .. ':failures', ARGV[1] .. ':opens', ARGV[1] .. ':openUntil'
        if ARGV[2] == '1' then
          redis.call('HDEL', KEYS[1], f, o, u)
          return {0, 0}
        end
        local failures = redis.call('HINCRBY', KEYS[1], f, 1)
        if tonumber(redis.call('HGET', KEYS[1], u) or '0') > tonumber(ARGV[6]) then return {0, 0} end
        if failures >= tonumber(ARGV[3]) then
          local opens = redis.call('HINCRBY', KEYS[1], o, 1)
          local window = math.min(tonumber(ARGV[4]) * math.pow(2, opens - 1), tonumber(ARGV[5]))
          local untilMs = tonumber(ARGV[6]) + window
          redis.call('HSET', KEYS[1], u, string.format('%d', untilMs))
          redis.call('PEXPIRE', KEYS[1], math.floor(window) + 3600000)
          return {1, string.format('%d', untilMs)}
        end
        redis.call('PEXPIRE', KEYS[1], 3600000)
        return {0, 0}
        """)

    /// KEYS: entry, index. ARGV: owner, fingerprint, pending ttl ms, now (unix ms).
    /// Returns {'claimed'}, {'pending'}, {'mismatch'} or {'done', sealed answer}.
    static let claim = RedisScript(
        ExpiringKeyIndex.luaFunction + """
            local state = redis.call('HGET', KEYS[1], 'state')
            if not state then
              redis.call('HSET', KEYS[1], 'state', 'pending', 'owner', ARGV[1], 'fp', ARGV[2])
              redis.call('PEXPIRE', KEYS[1], ARGV[3])
              index(KEYS[2], KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[3]), tonumber(ARGV[4]))
              return {'claimed'}
            end
            if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[2] then return {'mismatch'} end
            if state == 'done' then return {'done', redis.call('HGET', KEYS[1], 'answer')} end
            return {'pending'}
            """)

    /// KEYS: entry, index. ARGV: owner, sealed answer, retention ms, now (unix ms). Returns 1 when
    /// stored.
    static let complete = RedisScript(
        ExpiringKeyIndex.luaFunction + """
            if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
            if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
            redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[2])
            redis.call('PEXPIRE', KEYS[1], ARGV[3])
            index(KEYS[2], KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[3]), tonumber(ARGV[4]))
            return 1
            """)

    /// KEYS: entry, index. ARGV: owner. Deletes a pending entry this owner holds, and its index entry.
    static let release = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'pending' then
          redis.call('ZREM', KEYS[2], KEYS[1])
          return redis.call('DEL', KEYS[1])
        end
        return 0
        """)

    /// KEYS: named triggers, breaker, earlier builds' idempotency set, idempotency index. Deletes
    /// them and every entry they name.
    static let deleteAll = RedisScript(
        """
        for _, k in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', k) end
        for _, k in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do redis.call('DEL', k) end
        redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
        return 1
        """)
}
