/// An index of key names that expire: a sorted set scored by when each named key expires (unix ms),
/// kept next to the keys (same hash tag) so a script can delete them all (an uninstall). Every
/// write drops the entries whose time has passed, so the index holds only live keys however many
/// have come and gone, and it expires with its last entry.
enum ExpiringKeyIndex {
    /// The Lua function `index(idx, key, untilMs, nowMs)` the scripts that write indexed keys start
    /// with: drops the entries of `idx` past `nowMs`, adds `key` until `untilMs`, and lets `idx`
    /// expire at its latest entry's time.
    static let luaFunction = """
        local function index(idx, key, untilMs, nowMs)
          redis.call('ZREMRANGEBYSCORE', idx, '-inf', nowMs)
          redis.call('ZADD', idx, untilMs, key)
          local last = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
          redis.call('PEXPIREAT', idx, string.format('%d', tonumber(last[2])))
        end

        """
}
