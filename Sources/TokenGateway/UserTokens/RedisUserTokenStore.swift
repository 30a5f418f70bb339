import FlowEngine

/// The gateway's ``UserTokenStore``: Redis, next to the installation keys of ``GatewayStore``.
///
/// Keys, all under the installation's hash tag so the scripts stay valid on a Redis Cluster:
/// - `tg:{<installation>}:token:user:<accountId>` — hash `exp`, `v` (sealed with the key name as
///   context), `at`; expires shortly before the token does;
/// - `tg:{<installation>}:user-denied:<accountId>` — a remembered refusal, expiring on its own;
/// - `tg:{<installation>}:user-lease:<accountId>` — the owner of the one exchange in flight;
/// - `tg:{<installation>}:user-keys` — the sorted set of the above token and refusal keys, scored
///   by when each expires (unix ms); every write drops the entries past their time, so it names
///   only live keys, which uninstall deletes with the installation's other keys. It expires with
///   its longest-lived member. (Earlier builds kept an untrimmed set, `user-tokens`; uninstall
///   still deletes what it names.)
///
/// The app-wide exchange budget lives under its own hash tag: `tg:{user-exchanges:<scope>}:log`
/// (a sorted set of the exchanges of the last window, scored by unix milliseconds) and
/// `tg:{user-exchanges:<scope>}:blocked` (set when Atlassian answered 429, for its `Retry-After`).
///
/// Storing a token, remembering a refusal and releasing a lease publish `user <ari> <accountId>`
/// on the gateway's channel (`tg:events`), which the token flow ignores.
public struct RedisUserTokenStore: UserTokenStore {
    /// The installations' keys, sealing and channel.
    public let installations: GatewayStore
    var redis: RedisClient { self.installations.redis }

    public init(installations: GatewayStore) {
        self.installations = installations
    }

    // MARK: Keys

    public func tokenKey(_ id: InstallationID, accountId: String) -> String {
        self.installations.tag(id) + ":token:user:" + accountId
    }
    func deniedKey(_ id: InstallationID, accountId: String) -> String {
        self.installations.tag(id) + ":user-denied:" + accountId
    }
    func leaseKey(_ id: InstallationID, accountId: String) -> String {
        self.installations.tag(id) + ":user-lease:" + accountId
    }
    func exchangeLogKey(scope: String) -> String { "\(self.installations.prefix):{user-exchanges:\(scope)}:log" }
    func exchangeBlockedKey(scope: String) -> String {
        "\(self.installations.prefix):{user-exchanges:\(scope)}:blocked"
    }
    /// The `PUBLISH` arguments announcing a change of the user's keys: channel, message.
    func announcement(_ id: InstallationID, accountId: String) -> [String] {
        [self.installations.channel, "user \(id.ari) \(accountId)"]
    }

    // MARK: Reading

    public func snapshot(_ id: InstallationID, accountId: String, timeout: Duration? = nil) async throws
        -> UserTokenSnapshot
    {
        let tokenKey = self.tokenKey(id, accountId: accountId)
        let replies = try await self.redis.pipeline(
            [
                ["HMGET", self.installations.installationKey(id), "status", "apiBaseUrl", "cloudId"],
                ["HMGET", tokenKey, "exp", "v"],
                ["PTTL", self.deniedKey(id, accountId: accountId)],
                ["PTTL", self.leaseKey(id, accountId: accountId)],
            ], timeout: timeout)
        guard replies.count == 4, let inst = replies[0].array, inst.count == 3, let tok = replies[1].array,
            tok.count == 2, let deniedTTL = replies[2].int, let leaseTTL = replies[3].int
        else { throw RedisError.protocolError }
        var token: AccessToken? = nil
        if let expText = tok[0].string, let exp = Int64(expText), let sealed = tok[1].string {
            if let value = try? self.installations.box.open(sealed, context: tokenKey) {
                token = AccessToken(value: String(decoding: value, as: UTF8.self), expiresAt: exp)
            } else {
                self.installations.undecryptable(.userToken)
            }
        }
        let statusText = inst[0].string
        return UserTokenSnapshot(
            exists: statusText != nil,
            status: InstallationStatus(rawValue: statusText ?? "") ?? .active,
            apiBaseUrl: self.installations.openAPIBaseURL(inst[1].string, id),
            cloudId: inst[2].string.flatMap { $0.isEmpty ? nil : $0 },
            token: token,
            deniedFor: deniedTTL > 0 ? .milliseconds(deniedTTL) : nil,
            // -1: a lease without expiry (never written so); still someone's.
            leaseRemaining: leaseTTL > 0 ? .milliseconds(leaseTTL) : (leaseTTL == -1 ? .seconds(1) : nil))
    }

    // MARK: Writing

    public func store(
        _ id: InstallationID, accountId: String, token: AccessToken, cacheUntil: Int64, now: FlowTime
    ) async throws -> UserTokenStoreOutcome {
        let tokenKey = self.tokenKey(id, accountId: accountId)
        let sealed = try self.installations.box.seal(Array(token.value.utf8), context: tokenKey)
        let r = try await self.redis.eval(
            UserTokenScripts.store,
            keys: [
                self.installations.installationKey(id), tokenKey, self.installations.userKeysIndexKey(id),
                self.deniedKey(id, accountId: accountId),
            ],
            arguments: [String(token.expiresAt), sealed, String(now.unixSeconds), String(cacheUntil)]
                + self.announcement(id, accountId: accountId))
        switch r.int {
        case 1: return .stored
        case 0: return .tooShortLived
        case -1: return .uninstalled
        default: throw RedisError.protocolError
        }
    }

    @discardableResult
    public func rememberDenial(_ id: InstallationID, accountId: String, for duration: Duration) async throws -> Bool {
        let r = try await self.redis.eval(
            UserTokenScripts.deny,
            keys: [
                self.installations.installationKey(id), self.deniedKey(id, accountId: accountId),
                self.installations.userKeysIndexKey(id), self.tokenKey(id, accountId: accountId),
            ],
            arguments: [String(max(duration.milliseconds, 1))] + self.announcement(id, accountId: accountId)
                + [String(FlowTime.now().unixMilliseconds)])
        return r.int == 1
    }

    // MARK: The exchange lease

    public func acquireLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws
        -> Bool
    {
        let r = try await self.redis.send([
            "SET", self.leaseKey(id, accountId: accountId), owner, "NX", "PX", String(max(ttl.milliseconds, 1)),
        ])
        return r.string == "OK"
    }

    @discardableResult
    public func extendLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws
        -> Bool
    {
        let r = try await self.redis.eval(
            GatewayScripts.extendIfOwner, keys: [self.leaseKey(id, accountId: accountId)],
            arguments: [owner, String(max(ttl.milliseconds, 1))])
        return r.int == 1
    }

    @discardableResult
    public func releaseLease(_ id: InstallationID, accountId: String, owner: String) async throws -> Bool {
        let r = try await self.redis.eval(
            UserTokenScripts.releaseLease, keys: [self.leaseKey(id, accountId: accountId)],
            arguments: [owner] + self.announcement(id, accountId: accountId))
        return r.int == 1
    }

    // MARK: The app-wide exchange budget

    /// A sliding log in Redis. `now` is the caller's clock; every replica's clock feeds one log,
    /// so keep them in sync (NTP).
    public func admitExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission
    {
        try await self.admission(scope: scope, limit: limit, window: window, now: now, recording: true)
    }

    public func peekExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission
    {
        try await self.admission(scope: scope, limit: limit, window: window, now: now, recording: false)
    }

    private func admission(scope: String, limit: Int, window: Duration, now: FlowTime, recording: Bool)
        async throws -> UserExchangeAdmission
    {
        var generator = SystemRandomNumberGenerator()
        let member = String(now.unixMilliseconds) + "-" + String(generator.next() as UInt64, radix: 36)
        let r = try await self.redis.eval(
            UserTokenScripts.admit,
            keys: [self.exchangeLogKey(scope: scope), self.exchangeBlockedKey(scope: scope)],
            arguments: [
                String(now.unixMilliseconds), String(max(window.milliseconds, 1)), String(limit), member,
                recording ? "1" : "0",
            ])
        guard let items = r.array, items.count == 2, let admitted = items[0].int, let wait = items[1].int else {
            throw RedisError.protocolError
        }
        if admitted == 1 { return .admitted }
        return .refused(retryAfter: .milliseconds(max(wait, 1)))
    }

    public func blockExchanges(scope: String, for duration: Duration) async throws {
        _ = try await self.redis.eval(
            UserTokenScripts.block, keys: [self.exchangeBlockedKey(scope: scope)],
            arguments: [String(max(duration.milliseconds, 1))])
    }

    public func exchangesUsed(scope: String, window: Duration, now: FlowTime) async throws -> Int {
        let reply = try await self.redis.send([
            "ZCOUNT", self.exchangeLogKey(scope: scope), "(" + String(now.unixMilliseconds - window.milliseconds),
            "+inf",
        ])
        return Int(reply.int ?? 0)
    }

    // MARK: Notices

    /// `user <ari> <accountId>` and `uninstalled <ari>` from the gateway's channel; a (re)subscription
    /// as ``UserTokenNotice/resync``. Flows while the Redis client runs.
    public func watch(_ handle: @Sendable (UserTokenNotice) async -> Void) async {
        for await event in self.redis.subscribe(channels: [self.installations.channel]) {
            if let notice = Self.notice(of: event) { await handle(notice) }
        }
    }

    static func notice(of event: RedisPubSubEvent) -> UserTokenNotice? {
        switch event {
        case .subscribed:
            return .resync
        case .unsubscribed:
            return nil  // a resync follows the next `subscribed`
        case .message(_, let payload):
            let parts = payload.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let id = InstallationID(String(parts[1])) else { return nil }
            switch parts[0] {
            case "user" where parts.count == 3: return .user(id, accountId: String(parts[2]))
            case "uninstalled": return .uninstalled(id)
            default: return nil
            }
        }
    }
}

/// The Lua scripts of the user-token keys.
enum UserTokenScripts {
    /// KEYS: installation, user token, index, refusal. ARGV: exp, sealed, now, cacheUntil, channel,
    /// message. Returns -1 (uninstalled), 0 (too short-lived to cache), 1 (stored, announced).
    static let store = RedisScript(
        ExpiringKeyIndex.luaFunction + """
            if redis.call('HGET', KEYS[1], 'status') == 'uninstalled' then return -1 end
            redis.call('DEL', KEYS[4])
            redis.call('ZREM', KEYS[3], KEYS[4])
            local now = tonumber(ARGV[3])
            local untilAt = tonumber(ARGV[4])
            if untilAt <= now then return 0 end
            redis.call('HSET', KEYS[2], 'exp', ARGV[1], 'v', ARGV[2], 'at', ARGV[3])
            redis.call('EXPIREAT', KEYS[2], untilAt)
            index(KEYS[3], KEYS[2], untilAt * 1000, now * 1000)
            redis.call('PUBLISH', ARGV[5], ARGV[6])
            return 1
            """)

    /// KEYS: installation, refusal, index, user token. ARGV: ms, channel, message, now (unix ms).
    /// Returns -1 (uninstalled) or 1 (remembered, announced).
    static let deny = RedisScript(
        ExpiringKeyIndex.luaFunction + """
            if redis.call('HGET', KEYS[1], 'status') == 'uninstalled' then return -1 end
            redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
            redis.call('DEL', KEYS[4])
            redis.call('ZREM', KEYS[3], KEYS[4])
            index(KEYS[3], KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[1]), tonumber(ARGV[4]))
            redis.call('PUBLISH', ARGV[2], ARGV[3])
            return 1
            """)

    /// KEYS: lease. ARGV: owner, channel, message. Deletes the lease while `owner` holds it and
    /// announces it; returns 1 then, else 0.
    static let releaseLease = RedisScript(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          redis.call('DEL', KEYS[1])
          redis.call('PUBLISH', ARGV[2], ARGV[3])
          return 1
        end
        return 0
        """)

    /// A sliding-log rate limiter. KEYS: log, blocked. ARGV: now ms, window ms, limit, member,
    /// '1' to record the exchange ('0': only say whether it would be admitted). Returns {1, 0}
    /// when admitted, {0, ms to wait} otherwise.
    static let admit = RedisScript(
        """
        local blocked = redis.call('PTTL', KEYS[2])
        if blocked > 0 then return {0, blocked} end
        local now = tonumber(ARGV[1])
        local window = tonumber(ARGV[2])
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
          local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
          local wait = window
          if oldest[2] then wait = tonumber(oldest[2]) + window - now end
          if wait < 1 then wait = 1 end
          return {0, math.ceil(wait)}
        end
        if ARGV[5] == '0' then return {1, 0} end
        redis.call('ZADD', KEYS[1], now, ARGV[4])
        redis.call('PEXPIRE', KEYS[1], window)
        return {1, 0}
        """)

    /// KEYS: blocked. ARGV: ms. Keeps a longer hold in place.
    static let block = RedisScript(
        """
        if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
          redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
        end
        return 1
        """)
}
