import FlowEngine
import Foundation

/// What a caller's per-minute limits allow one request to start.
public enum CallerAllowance: Sendable, Hashable {
    /// Counted; go ahead.
    case admitted
    /// A limit is spent for the current minute: try again after this many seconds (at least 1).
    case refused(retryAfterSeconds: Int)
}

/// One counter of a caller's limits (contract §2 *(v1.1)*).
public struct CallerLimitCounter: Sendable, Hashable {
    /// Names the counter in its key: `refresh` or `user-exchange`.
    public let kind: String
    /// At most this many a minute.
    public let limit: Int

    public init(kind: String, limit: Int) {
        self.kind = kind
        self.limit = limit
    }
}

extension GatewayStore {
    /// `tg:{caller:<tag>}:limit:<kind>`: the sliding one-minute log of one counter (a sorted set of
    /// request instants). `tag` names the caller without free text (a digest of its name: braces in
    /// a name would change the hash tag); every counter of a caller shares one hash tag so a
    /// script checks them together, on a Redis Cluster too.
    func callerLimitKey(caller tag: String, kind: String) -> String {
        "\(self.prefix):{caller:\(tag)}:limit:\(kind)"
    }

    /// Counts one request of the caller named by `tag` (hex digits) against every counter in
    /// `counters`, each a sliding one-minute window shared by every replica: admitted (and counted
    /// in all) only when none is spent; refused otherwise, and then nothing is counted.
    ///
    /// - Parameter now: the caller's clock; every replica's clock feeds one log (keep them in sync).
    /// - Throws: ``RedisError`` when Redis cannot be reached.
    public func admitCaller(
        tag caller: String, counters: [CallerLimitCounter], now: FlowTime, window: Duration = .seconds(60)
    ) async throws -> CallerAllowance {
        guard !counters.isEmpty else { return .admitted }
        var generator = SystemRandomNumberGenerator()
        let member = String(now.unixMilliseconds) + "-" + String(generator.next() as UInt64, radix: 36)
        let keys = counters.map { self.callerLimitKey(caller: caller, kind: $0.kind) }
        let r = try await self.redis.eval(
            CallerLimitScripts.admit, keys: keys,
            arguments: [String(now.unixMilliseconds), String(max(window.milliseconds, 1)), member]
                + counters.map { String($0.limit) })
        guard let wait = r.int else { throw RedisError.protocolError }
        if wait <= 0 { return .admitted }
        return .refused(retryAfterSeconds: Duration.milliseconds(wait).retryAfterSeconds)
    }
}

enum CallerLimitScripts {
    /// KEYS: the counters' logs. ARGV: now (ms), window (ms), a unique member, then each counter's
    /// limit. Returns 0 (counted in all) or the milliseconds until the fullest spent log frees a
    /// place (nothing counted). Entries older than the window are dropped; logs expire with it.
    static let admit = RedisScript(
        """
        local now = tonumber(ARGV[1])
        local window = tonumber(ARGV[2])
        local wait = 0
        for i = 1, #KEYS do
          redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
          if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[3 + i]) then
            local w = window
            local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
            if oldest[2] then w = tonumber(oldest[2]) + window - now end
            if w < 1 then w = 1 end
            if w > wait then wait = w end
          end
        end
        if wait > 0 then return wait end
        for i = 1, #KEYS do
          redis.call('ZADD', KEYS[i], now, ARGV[3])
          redis.call('PEXPIRE', KEYS[i], window)
        end
        return 0
        """)
}
