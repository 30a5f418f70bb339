/// The Lua scripts that keep multi-key changes atomic. Every key of one installation carries
/// the same hash tag (`{<installation ARI>}`), so the scripts stay valid on a Redis Cluster too.
public enum GatewayScripts {
    /// Deletes a token hash whose sealed value (`v`) is still ARGV[1]. KEYS: the token.
    static let dropIfUnchanged = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        """)

    /// Stores a delivered token if its `exp` is strictly later than the stored one's. For an
    /// installation never seen, a token that would not be stored changes nothing at all (and
    /// answers `indexed` 1: there is nothing to index). The FIT's
    /// apiBaseUrl and cloudId replace the recorded ones (the latest FIT wins; `base <ari>` is
    /// published when the apiBaseUrl changed, a first one included).
    /// A delivery that answers a pending request marks it answered (`=`, until the round ends and
    /// deletes it with its lease, or it expires): a round's re-read tells a request answered from
    /// one that expired.
    /// KEYS: installation, token, pending. ARGV: exp, sealed, now, requestId, channel, ari,
    /// appId, apiBaseUrl, cloudId, least exp to store (unix s), how the token came when unsolicited
    /// (`push` when empty). Returns {stored(1)/notNewer(0)/uninstalled(-1), created, solicited,
    /// apiBaseUrl, indexed (1 once the listing index is known to hold the installation)}. Publishes `token <ari> <requestId|->`, with ` same` appended when the delivery
    /// answered a pending request but did not replace the token, and ` @<replica>` when ARGV[12]
    /// names the replica that stored it (so that replica does not handle its own echo again).
    /// With KEYS[4] (a first-use key) and ARGV[13] (its lifetime in ms), nothing happens when that
    /// key exists ({-2, 0, 0}); otherwise it is set with the delivery, in the same step (not for a
    /// never-seen installation whose token would not be stored: that changes nothing).
    static let storeToken = RedisScript(
        """
        local status = redis.call('HGET', KEYS[1], 'status')
        if status == 'uninstalled' then return {-1, 0, 0} end
        if not status then
          local e = tonumber(ARGV[1])
          if not (e > tonumber(ARGV[3]) and e >= tonumber(ARGV[10] or '0')) then return {0, 0, 0, '', 1} end
        end
        if KEYS[4] and not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[13]) then return {-2, 0, 0} end
        local created = 0
        if not status then
          redis.call('HSET', KEYS[1], 'status', 'active', 'createdAt', ARGV[3], 'updatedAt', ARGV[3])
          created = 1
        end
        if ARGV[7] ~= '' then redis.call('HSETNX', KEYS[1], 'appId', ARGV[7]) end
        if ARGV[8] ~= '' then
          local old = redis.call('HGET', KEYS[1], 'apiBaseUrl')
          redis.call('HSET', KEYS[1], 'apiBaseUrl', ARGV[8])
          if old ~= ARGV[8] then redis.call('PUBLISH', ARGV[5], 'base ' .. ARGV[6]) end
        end
        if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'cloudId', ARGV[9]) end
        local solicited = ''
        if ARGV[4] ~= '' then
          local p = redis.call('GET', KEYS[3])
          if p and p ~= '=' then
            local left = redis.call('PTTL', KEYS[3])
            if left < 1 then left = 60000 end
            redis.call('SET', KEYS[3], '=', 'PX', left)
            solicited = ARGV[4]
          end
        end
        local cur = tonumber(redis.call('HGET', KEYS[2], 'exp') or '0')
        local exp = tonumber(ARGV[1])
        local stored = 0
        if exp > cur and exp > tonumber(ARGV[3]) and exp >= tonumber(ARGV[10] or '0') then
          redis.call('HSET', KEYS[2], 'exp', ARGV[1], 'v', ARGV[2], 'at', ARGV[3], 'rid', solicited)
          redis.call('EXPIREAT', KEYS[2], exp)
          local via = ARGV[11] or ''
          if solicited ~= '' then via = 'trigger' elseif via == '' then via = 'push' end
          redis.call('HSET', KEYS[1], 'lastTokenAt', ARGV[3], 'tokenExpiresAt', ARGV[1], 'lastTokenVia', via)
          stored = 1
        end
        if stored == 1 or solicited ~= '' then
          local rid = solicited
          if rid == '' then rid = '-' end
          local same = ''
          if stored == 0 then same = ' same' end
          local origin = ''
          if ARGV[12] and ARGV[12] ~= '' then origin = ' @' .. ARGV[12] end
          redis.call('PUBLISH', ARGV[5], 'token ' .. ARGV[6] .. ' ' .. rid .. same .. origin)
        end
        local s = 0
        if solicited ~= '' then s = 1 end
        return {stored, created, s, redis.call('HGET', KEYS[1], 'apiBaseUrl') or '', redis.call('HEXISTS', KEYS[1], 'indexed')}
        """)

    /// Creates or refreshes an installation on installed/upgraded. An uninstalled one stays so.
    /// KEYS: installation. ARGV: now, appId, apiBaseUrl, cloudId, channel, ari. Returns -1
    /// (uninstalled), 0, 1 (created, or not yet known to be in the listing index). Publishes
    /// `base <ari>` when the apiBaseUrl changed.
    static let upsertInstallation = RedisScript(
        """
        local status = redis.call('HGET', KEYS[1], 'status')
        if status == 'uninstalled' then return -1 end
        local created = 0
        if not status then
          redis.call('HSET', KEYS[1], 'status', 'active', 'createdAt', ARGV[1])
          created = 1
        end
        redis.call('HSET', KEYS[1], 'updatedAt', ARGV[1])
        if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'appId', ARGV[2]) end
        if ARGV[3] ~= '' then
          local old = redis.call('HGET', KEYS[1], 'apiBaseUrl')
          redis.call('HSET', KEYS[1], 'apiBaseUrl', ARGV[3])
          if old ~= ARGV[3] and ARGV[5] then redis.call('PUBLISH', ARGV[5], 'base ' .. ARGV[6]) end
        end
        if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'cloudId', ARGV[4]) end
        if redis.call('HEXISTS', KEYS[1], 'indexed') == 0 then created = 1 end
        return created
        """)

    /// Registers (or rotates) the trigger URL and keeps or creates the signing key.
    /// KEYS: installation, signing keys. ARGV: now, sealed URL, candidate key id, candidate sealed
    /// key, appId, apiBaseUrl, cloudId, channel, ari. Returns {-1} when uninstalled, else {created,
    /// keyId, sealedKey}. The FIT's apiBaseUrl and cloudId replace the recorded ones (`base <ari>`
    /// is published when the apiBaseUrl changed).
    static let register = RedisScript(
        """
        local status = redis.call('HGET', KEYS[1], 'status')
        if status == 'uninstalled' then return {-1} end
        local created = 0
        if not status then
          redis.call('HSET', KEYS[1], 'status', 'active', 'createdAt', ARGV[1])
          created = 1
        end
        if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 'appId', ARGV[5]) end
        if ARGV[6] ~= '' then
          local old = redis.call('HGET', KEYS[1], 'apiBaseUrl')
          redis.call('HSET', KEYS[1], 'apiBaseUrl', ARGV[6])
          if old ~= ARGV[6] and ARGV[8] then redis.call('PUBLISH', ARGV[8], 'base ' .. ARGV[9]) end
        end
        if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'cloudId', ARGV[7]) end
        local cur = redis.call('HGET', KEYS[2], 'current')
        local key
        if cur then
          key = redis.call('HGET', KEYS[2], 'key:' .. cur)
        else
          cur = ARGV[3]
          key = ARGV[4]
          redis.call('HSET', KEYS[2], 'current', cur, 'key:' .. cur, key, 'createdAt:' .. cur, ARGV[1])
        end
        redis.call('HSET', KEYS[1], 'triggerUrl', ARGV[2], 'triggerKeyId', cur, 'updatedAt', ARGV[1])
        return {created, cur, key}
        """)

    /// Replaces a signing key that does not open (and any pending rotation) with a new one, if the
    /// key is still the current one. KEYS: installation, signing keys. ARGV: now, the unopenable
    /// key id, the new key id, the new key sealed. Returns 1 when replaced, 0 when uninstalled, -1
    /// when the current key is another one now.
    static let replaceSigningKey = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'status') == 'uninstalled' then return 0 end
        if redis.call('HGET', KEYS[2], 'current') ~= ARGV[2] then return -1 end
        redis.call('DEL', KEYS[2])
        redis.call('HSET', KEYS[2], 'current', ARGV[3], 'key:' .. ARGV[3], ARGV[4], 'createdAt:' .. ARGV[3], ARGV[1])
        redis.call('HSET', KEYS[1], 'triggerKeyId', ARGV[3], 'updatedAt', ARGV[1])
        return 1
        """)

    /// Marks an installation uninstalled and deletes its tokens and keys.
    /// KEYS: installation, system token, signing keys, earlier builds' user-token set, user-key
    /// index (sorted set). ARGV: now, channel, ari.
    static let uninstall = RedisScript(
        """
        redis.call('HSETNX', KEYS[1], 'createdAt', ARGV[1])
        redis.call('HSET', KEYS[1], 'status', 'uninstalled', 'updatedAt', ARGV[1])
        redis.call('HDEL', KEYS[1], 'triggerUrl', 'tokenExpiresAt', 'triggerKeyId')
        redis.call('DEL', KEYS[2], KEYS[3])
        for _, k in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', k) end
        for _, k in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do redis.call('DEL', k) end
        redis.call('DEL', KEYS[4], KEYS[5])
        redis.call('PUBLISH', ARGV[2], 'uninstalled ' .. ARGV[3])
        return 1
        """)

    /// Deletes a key only while it still holds our value, and a companion key of ours (named for
    /// that value) in any case. KEYS: key[, companion]. ARGV: value. Returns 1 when the key was ours.
    static let releaseIfOwner = RedisScript(
        """
        if KEYS[2] then redis.call('DEL', KEYS[2]) end
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        """)

    /// KEYS: key[, a companion key extended with it]. ARGV: value, ttl ms. Only lengthens: a key
    /// with more time left keeps it (extensions sent one after the other may land in any order).
    /// Returns 1 while the key holds our value, else 0. (The user-token store's exchange leases use
    /// it too.)
    public static let extendIfOwner = RedisScript(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          local ttl = tonumber(ARGV[2])
          if KEYS[2] and redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
          if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
          return 1
        end
        return 0
        """)

    /// Puts an installation's round trips on hold and, when asked, releases the lease if the
    /// round trip still holds it (its pending request goes with the round in any case); announces
    /// the hold.
    /// KEYS: hold, lease, pending. ARGV: request id, hold ms, release (1/0), channel, ari.
    static let placeHold = RedisScript(
        """
        redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
        if ARGV[3] == '1' then
          if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
          redis.call('DEL', KEYS[3])
        end
        redis.call('PUBLISH', ARGV[4], 'hold ' .. ARGV[5])
        return 1
        """)

    /// Records the outcome of a round trip for the installation's circuit breaker and, when
    /// ARGV[6] is not empty, releases the round's lease in the same step while ARGV[6] holds it
    /// (its pending request goes with the round in any case).
    /// KEYS: breaker, lease, pending (one hash slot). ARGV: succeeded (1/0), threshold, base window
    /// ms, cap ms, now ms, the lease's owner ("" to leave the lease). Returns {opened (1/0),
    /// openUntil ms}.
    static let recordRound = RedisScript(
        """
        if ARGV[6] ~= '' then
          if redis.call('GET', KEYS[2]) == ARGV[6] then redis.call('DEL', KEYS[2]) end
          redis.call('DEL', KEYS[3])
        end
        if ARGV[1] == '1' then
          redis.call('DEL', KEYS[1])
          return {0, 0}
        end
        local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
        if failures >= tonumber(ARGV[2]) then
          local opens = redis.call('HINCRBY', KEYS[1], 'opens', 1)
          local window = math.min(tonumber(ARGV[3]) * math.pow(2, opens - 1), tonumber(ARGV[4]))
          local untilMs = tonumber(ARGV[5]) + window
          redis.call('HSET', KEYS[1], 'openUntil', string.format('%d', untilMs))
          redis.call('PEXPIRE', KEYS[1], math.floor(window) + 3600000)
          return {1, string.format('%d', untilMs)}
        end
        redis.call('PEXPIRE', KEYS[1], 3600000)
        return {0, 0}
        """)
}
