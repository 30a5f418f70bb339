import FlowEngine
import Foundation

/// The FIT `jti` replay guard, kept in Redis for the token's lifetime: `tg:seen-fit:<jti>`, set
/// with `NX` and expiring a minute after the token does.
struct RedisReplayGuard: InvocationTokenReplayGuard {
    let redis: RedisClient
    /// The key prefix (`tg`).
    let prefix: String
    let now: @Sendable () -> FlowTime

    init(redis: RedisClient, prefix: String, now: @escaping @Sendable () -> FlowTime = { FlowTime.now() }) {
        self.redis = redis
        self.prefix = prefix
        self.now = now
    }

    func seenKey(_ jti: String) -> String { "\(self.prefix):seen-fit:\(jti)" }

    func firstUse(jti: String, expiresAt: Date) async throws -> Bool {
        let expiresAtUnixSeconds = Int64(expiresAt.timeIntervalSince1970)
        let ttl = max((expiresAtUnixSeconds - self.now().unixSeconds + 61) * 1000, 1000)
        let r = try await self.redis.send(["SET", self.seenKey(jti), "1", "NX", "PX", String(ttl)])
        return r.string == "OK"
    }
}
