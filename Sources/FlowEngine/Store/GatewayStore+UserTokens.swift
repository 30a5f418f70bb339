/// What a user-token request needs in one round trip: the installation's state, the cached user
/// token, a remembered refusal and whether some process is exchanging for that user right now.
public struct UserTokenSnapshot: Sendable {
    /// The installation was ever seen.
    public var exists: Bool
    public var status: InstallationStatus
    public var apiBaseUrl: String?
    public var cloudId: String?
    /// The cached user token, when there is one that could be opened.
    public var token: AccessToken?
    /// Time left on a remembered refusal of this user; nil when none is remembered.
    public var deniedFor: Duration?
    /// Some process holds the user's exchange lease.
    public var exchangeInFlight: Bool
}

/// Whether the app-wide exchange budget lets one more exchange through.
public enum UserExchangeAdmission: Sendable, Hashable {
    /// Counted; go ahead.
    case admitted
    /// The budget is spent (or Atlassian asked every replica to back off): try again after this long.
    case refused(retryAfter: Duration)
}

/// What storing an exchanged user token did.
public enum UserTokenStoreOutcome: Sendable, Hashable {
    /// Cached until shortly before its expiry.
    case stored
    /// Too close to its expiry to be worth caching; nothing was written.
    case tooShortLived
    /// The installation is uninstalled; nothing was written.
    case uninstalled
}

/// User tokens (offline user impersonation, contract §2 `?asUser=`).
///
/// Keys, all under the installation's hash tag so the scripts stay valid on a Redis Cluster:
/// - `tg:{<installation>}:token:user:<accountId>` — hash `exp`, `v` (sealed with the key name as
///   context), `at`; expires shortly before the token does;
/// - `tg:{<installation>}:user-denied:<accountId>` — a remembered refusal, expiring on its own;
/// - `tg:{<installation>}:user-lease:<accountId>` — the owner of the one exchange in flight;
/// - `tg:{<installation>}:user-tokens` — the set of the above token and refusal keys, which
///   uninstall deletes with the installation's other keys; it expires with its longest-lived member.
///
/// The app-wide exchange budget lives under its own hash tag: `tg:{user-exchanges:<scope>}:log`
/// (a sorted set of the exchanges of the last window, scored by unix milliseconds) and
/// `tg:{user-exchanges:<scope>}:blocked` (set when Atlassian answered 429, for its `Retry-After`).
/// `accountId`s reaching these methods are already validated (letters, digits, `:`, `_`, `-`).
extension GatewayStore {
    // MARK: Keys

    public func userTokenKey(_ id: InstallationID, accountId: String) -> String {
        self.tag(id) + ":token:user:" + accountId
    }
    func userDeniedKey(_ id: InstallationID, accountId: String) -> String {
        self.tag(id) + ":user-denied:" + accountId
    }
    func userLeaseKey(_ id: InstallationID, accountId: String) -> String {
        self.tag(id) + ":user-lease:" + accountId
    }
    func userExchangeLogKey(scope: String) -> String { "\(self.prefix):{user-exchanges:\(scope)}:log" }
    func userExchangeBlockedKey(scope: String) -> String { "\(self.prefix):{user-exchanges:\(scope)}:blocked" }

    // MARK: Reading

    /// Reads the installation's status and site, the cached user token, a remembered refusal and
    /// the exchange lease in one pipelined round trip. A cached token that cannot be opened (its
    /// encryption key was retired) reads as absent: the next exchange replaces it.
    ///
    /// - Throws: ``RedisError`` when Redis cannot be reached in time.
    public func userTokenSnapshot(
        _ id: InstallationID, accountId: String, timeout: Duration? = nil
    ) async throws
        -> UserTokenSnapshot
    {
        let tokenKey = self.userTokenKey(id, accountId: accountId)
        let replies = try await self.redis.pipeline(
            [
                ["HMGET", self.installationKey(id), "status", "apiBaseUrl", "cloudId"],
                ["HMGET", tokenKey, "exp", "v"],
                ["PTTL", self.userDeniedKey(id, accountId: accountId)],
                ["EXISTS", self.userLeaseKey(id, accountId: accountId)],
            ], timeout: timeout)
        guard replies.count == 4, let inst = replies[0].array, inst.count == 3, let tok = replies[1].array,
            tok.count == 2, let deniedTTL = replies[2].int, let lease = replies[3].int
        else { throw RedisError.protocolError }
        var token: AccessToken? = nil
        if let expText = tok[0].string, let exp = Int64(expText), let sealed = tok[1].string {
            if let value = try? self.box.open(sealed, context: tokenKey) {
                token = AccessToken(value: String(decoding: value, as: UTF8.self), expiresAt: exp)
            } else {
                self.undecryptable(.userToken)
            }
        }
        let statusText = inst[0].string
        return UserTokenSnapshot(
            exists: statusText != nil,
            status: InstallationStatus(rawValue: statusText ?? "") ?? .active,
            apiBaseUrl: self.openAPIBaseURL(inst[1].string, id),
            cloudId: inst[2].string.flatMap { $0.isEmpty ? nil : $0 },
            token: token,
            deniedFor: deniedTTL > 0 ? .milliseconds(deniedTTL) : nil,
            exchangeInFlight: lease > 0)
    }

    // MARK: Writing

    /// Caches an exchanged user token, sealed with its key name as context, until `cacheUntil`
    /// (unix seconds, shortly before the token's expiry); indexes it for uninstall and clears a
    /// remembered refusal of the user. Nothing is written for an uninstalled installation or when
    /// `cacheUntil` is not after `now`.
    ///
    /// - Throws: ``RedisError`` when Redis cannot be reached; the ``SecretBox``'s error when sealing fails.
    public func storeUserToken(
        _ id: InstallationID, accountId: String, token: AccessToken, cacheUntil: Int64, now: FlowTime
    ) async throws -> UserTokenStoreOutcome {
        let tokenKey = self.userTokenKey(id, accountId: accountId)
        let sealed = try self.box.seal(Array(token.value.utf8), context: tokenKey)
        let r = try await self.redis.eval(
            UserTokenScripts.store,
            keys: [
                self.installationKey(id), tokenKey, self.userTokenIndexKey(id),
                self.userDeniedKey(id, accountId: accountId),
            ],
            arguments: [String(token.expiresAt), sealed, String(now.unixSeconds), String(cacheUntil)])
        switch r.int {
        case 1: return .stored
        case 0: return .tooShortLived
        case -1: return .uninstalled
        default: throw RedisError.protocolError
        }
    }

    /// Remembers that Atlassian refused a user token for this user, for `duration`, and drops the
    /// user's cached token. Returns false (and writes nothing) for an uninstalled installation.
    ///
    /// - Throws: ``RedisError`` when Redis cannot be reached.
    @discardableResult
    public func rememberUserDenial(_ id: InstallationID, accountId: String, for duration: Duration) async throws -> Bool
    {
        let r = try await self.redis.eval(
            UserTokenScripts.deny,
            keys: [
                self.installationKey(id), self.userDeniedKey(id, accountId: accountId), self.userTokenIndexKey(id),
                self.userTokenKey(id, accountId: accountId),
            ],
            arguments: [String(max(duration.milliseconds, 1))])
        return r.int == 1
    }

    // MARK: The exchange lease

    /// Takes the user's exchange lease for `ttl` if nobody holds it.
    public func acquireUserLease(
        _ id: InstallationID, accountId: String, owner: String, ttl: Duration
    ) async throws
        -> Bool
    {
        let r = try await self.redis.send([
            "SET", self.userLeaseKey(id, accountId: accountId), owner, "NX", "PX", String(max(ttl.milliseconds, 1)),
        ])
        return r.string == "OK"
    }

    /// Extends the user's exchange lease only while `owner` holds it.
    @discardableResult
    public func extendUserLease(
        _ id: InstallationID, accountId: String, owner: String, ttl: Duration
    ) async throws
        -> Bool
    {
        let r = try await self.redis.eval(
            GatewayScripts.extendIfOwner, keys: [self.userLeaseKey(id, accountId: accountId)],
            arguments: [owner, String(max(ttl.milliseconds, 1))])
        return r.int == 1
    }

    /// Releases the user's exchange lease only while `owner` holds it.
    @discardableResult
    public func releaseUserLease(_ id: InstallationID, accountId: String, owner: String) async throws -> Bool {
        let r = try await self.redis.eval(
            GatewayScripts.releaseIfOwner, keys: [self.userLeaseKey(id, accountId: accountId)], arguments: [owner])
        return r.int == 1
    }

    // MARK: The app-wide exchange budget

    /// Counts one exchange against the budget of `limit` per `window` shared by every process
    /// (a sliding log), unless the budget is spent or Atlassian's `Retry-After` still holds.
    ///
    /// - Parameters:
    ///   - scope: names the budget (the app id: Atlassian counts per app).
    ///   - now: the caller's clock; every replica's clock feeds one log, so keep them in sync (NTP).
    /// - Throws: ``RedisError`` when Redis cannot be reached.
    public func admitUserExchange(
        scope: String, limit: Int, window: Duration, now: FlowTime
    ) async throws
        -> UserExchangeAdmission
    {
        var generator = SystemRandomNumberGenerator()
        let member = String(now.unixMilliseconds) + "-" + String(generator.next() as UInt64, radix: 36)
        let r = try await self.redis.eval(
            UserTokenScripts.admit,
            keys: [self.userExchangeLogKey(scope: scope), self.userExchangeBlockedKey(scope: scope)],
            arguments: [String(now.unixMilliseconds), String(max(window.milliseconds, 1)), String(limit), member])
        guard let items = r.array, items.count == 2, let admitted = items[0].int, let wait = items[1].int else {
            throw RedisError.protocolError
        }
        if admitted == 1 { return .admitted }
        return .refused(retryAfter: .milliseconds(max(wait, 1)))
    }

    /// Holds every exchange of every process back for `duration` (Atlassian answered 429). A
    /// longer hold already in place is kept.
    ///
    /// - Throws: ``RedisError`` when Redis cannot be reached.
    public func blockUserExchanges(scope: String, for duration: Duration) async throws {
        _ = try await self.redis.eval(
            UserTokenScripts.block, keys: [self.userExchangeBlockedKey(scope: scope)],
            arguments: [String(max(duration.milliseconds, 1))])
    }
}

/// The Lua scripts of the user-token keys.
enum UserTokenScripts {
    /// KEYS: installation, user token, index, refusal. ARGV: exp, sealed, now, cacheUntil.
    /// Returns -1 (uninstalled), 0 (too short-lived to cache), 1 (stored).
    static let store = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'status') == 'uninstalled' then return -1 end
        redis.call('DEL', KEYS[4])
        local now = tonumber(ARGV[3])
        local untilAt = tonumber(ARGV[4])
        if untilAt <= now then return 0 end
        redis.call('HSET', KEYS[2], 'exp', ARGV[1], 'v', ARGV[2], 'at', ARGV[3])
        redis.call('EXPIREAT', KEYS[2], untilAt)
        redis.call('SADD', KEYS[3], KEYS[2])
        local want = untilAt - now
        if redis.call('TTL', KEYS[3]) < want then redis.call('EXPIRE', KEYS[3], want) end
        return 1
        """)

    /// KEYS: installation, refusal, index, user token. ARGV: ms. Returns -1 (uninstalled) or 1.
    static let deny = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'status') == 'uninstalled' then return -1 end
        redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
        redis.call('DEL', KEYS[4])
        redis.call('SADD', KEYS[3], KEYS[2])
        if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[3], ARGV[1]) end
        return 1
        """)

    /// A sliding-log rate limiter. KEYS: log, blocked. ARGV: now ms, window ms, limit, member.
    /// Returns {1, 0} when admitted, {0, ms to wait} otherwise.
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
