import FlowEngine

/// One finished auth-trigger round trip, as kept for operators. Never holds a token, a URL or a
/// request id: only when, how long, how it ended, how many attempts and which replica led it.
public struct RoundTripRecord: Sendable, Hashable {
    /// When the first trigger attempt was sent (unix milliseconds).
    public var startedAt: Int64
    /// From the first attempt to the verdict, in milliseconds.
    public var durationMs: Int64
    /// `success`, or how the last attempt failed (`http_error`, `transport_error`, `timeout`,
    /// `no_delivery`); `failed` when no attempt verdict was seen.
    public var outcome: String
    /// Trigger attempts sent in this round trip.
    public var attempts: Int
    /// The replica that led the round trip.
    public var replica: String

    public init(startedAt: Int64, durationMs: Int64, outcome: String, attempts: Int, replica: String) {
        self.startedAt = startedAt
        self.durationMs = durationMs
        self.outcome = outcome
        self.attempts = attempts
        self.replica = replica
    }

    /// `v1 <startedAt> <durationMs> <outcome> <attempts> <replica>`: every part is a number or a
    /// word without spaces.
    var encoded: String {
        "v1 \(self.startedAt) \(self.durationMs) \(Self.word(self.outcome)) \(self.attempts) \(Self.word(self.replica))"
    }

    init?(encoded: String) {
        let parts = encoded.split(separator: " ")
        guard parts.count >= 6, parts[0] == "v1", let started = Int64(parts[1]), let duration = Int64(parts[2]),
            let attempts = Int(parts[4])
        else { return nil }
        self.init(
            startedAt: started, durationMs: duration, outcome: String(parts[3]), attempts: attempts,
            replica: String(parts[5]))
    }

    private static func word(_ s: String) -> String {
        let w = String(s.unicodeScalars.filter { $0.value > 0x20 && $0.value < 0x7F }.prefix(64).map(Character.init))
        return w.isEmpty ? "-" : w
    }
}

/// A replica's heartbeat: who it is, what it runs and since when.
public struct ReplicaHeartbeatRecord: Sendable, Hashable {
    public var replicaID: String
    public var version: String
    /// Unix milliseconds.
    public var startedAt: Int64
    /// Unix milliseconds of the latest heartbeat.
    public var lastSeenAt: Int64

    public init(replicaID: String, version: String, startedAt: Int64, lastSeenAt: Int64) {
        self.replicaID = replicaID
        self.version = version
        self.startedAt = startedAt
        self.lastSeenAt = lastSeenAt
    }
}

/// What operators need about one installation besides its record: the circuit breaker and the
/// latest round trip.
public struct InstallationHealth: Sendable, Hashable {
    /// Failed round trips since the last successful one.
    public var consecutiveFailures: Int
    /// Unix milliseconds until which the circuit is open (0: closed).
    public var circuitOpenUntil: Int64
    public var lastRoundTrip: RoundTripRecord?
}

/// Operator views (status page): replica heartbeats, round-trip history, breaker state.
///
/// Keys:
/// - `tg:replica:<replica id>` — the heartbeat (`<version> <startedAt ms>`), expiring on its own;
/// - `tg:replicas` — sorted set of replica ids by latest heartbeat (ms), to find the above without
///   `KEYS`; entries older than an hour are dropped when read;
/// - `tg:{<installation>}:history` — list of the installation's latest round trips, newest first,
///   capped, expiring a week after the latest;
/// - `tg:round-trips` — sorted set of the last hour's round trips of every installation, by end
///   time (ms), capped, without installation ids.
extension GatewayStore {
    func replicaKey(_ replicaID: String) -> String { "\(self.prefix):replica:\(replicaID)" }
    var replicasIndexKey: String { "\(self.prefix):replicas" }
    public func historyKey(_ id: InstallationID) -> String { self.tag(id) + ":history" }
    var recentRoundTripsKey: String { "\(self.prefix):round-trips" }

    /// Round trips kept per installation.
    public static let historyLength = 50
    /// Round trips kept in the app-wide log (the last hour's, at most this many).
    public static let recentRoundTripsCap = 10_000

    // MARK: Heartbeats

    /// Writes this replica's heartbeat, expiring after `ttl`.
    ///
    /// - Throws: ``RedisError``; ``RedisError/server(_:)`` when Redis refuses a write (out of memory, an
    ///   ACL user without the command).
    public func writeHeartbeat(_ heartbeat: ReplicaHeartbeatRecord, ttl: Duration) async throws {
        try await self.writeAll([
            [
                "SET", self.replicaKey(heartbeat.replicaID), "\(heartbeat.version) \(heartbeat.startedAt)", "PX",
                String(max(ttl.milliseconds, 1)),
            ],
            ["ZADD", self.replicasIndexKey, String(heartbeat.lastSeenAt), heartbeat.replicaID],
        ])
    }

    /// Removes this replica's heartbeat (graceful shutdown), waiting at most `timeout` for Redis.
    public func removeHeartbeat(replicaID: String, timeout: Duration? = nil) async throws {
        try await self.writeAll(
            [["DEL", self.replicaKey(replicaID)], ["ZREM", self.replicasIndexKey, replicaID]], timeout: timeout)
    }

    /// Runs `commands` pipelined; the first error reply among their replies is thrown as
    /// ``RedisError/server(_:)``: a write Redis refused is a failure, not a success.
    private func writeAll(_ commands: [[String]], timeout: Duration? = nil) async throws {
        for reply in try await self.redis.pipeline(commands, timeout: timeout) {
            if case .error(let message) = reply {
                throw RedisError.server(message)
            }
        }
    }

    /// The replicas whose heartbeat has not expired, newest start first.
    public func replicas(now: FlowTime) async throws -> [ReplicaHeartbeatRecord] {
        let hourAgo = now.unixMilliseconds - 3_600_000
        let replies = try await self.redis.pipeline([
            ["ZREMRANGEBYSCORE", self.replicasIndexKey, "-inf", "(" + String(hourAgo)],
            ["ZRANGE", self.replicasIndexKey, "0", "-1", "WITHSCORES"],
        ])
        guard replies.count == 2, let items = replies[1].array else { throw RedisError.protocolError }
        var seen: [(String, Int64)] = []
        var i = 0
        while i + 1 < items.count {
            if let id = items[i].string, let score = items[i + 1].string.flatMap({ Double($0) }) {
                seen.append((id, Int64(score)))
            }
            i += 2
        }
        if seen.isEmpty { return [] }
        let values = try await self.redis.pipeline(seen.map { ["GET", self.replicaKey($0.0)] })
        var out: [ReplicaHeartbeatRecord] = []
        for ((id, lastSeen), value) in zip(seen, values) {
            guard let text = value.string else { continue }
            let parts = text.split(separator: " ")
            guard parts.count == 2, let started = Int64(parts[1]) else { continue }
            out.append(
                ReplicaHeartbeatRecord(
                    replicaID: id, version: String(parts[0]), startedAt: started, lastSeenAt: lastSeen))
        }
        return out.sorted { ($0.startedAt, $0.replicaID) > ($1.startedAt, $1.replicaID) }
    }

    // MARK: Round-trip history

    /// Keeps `record` in the installation's capped history and the app-wide log of the last hour.
    ///
    /// - Throws: ``RedisError``; ``RedisError/server(_:)`` when Redis refuses a write.
    public func recordRoundTrip(_ id: InstallationID, _ record: RoundTripRecord, now: FlowTime) async throws {
        let key = self.historyKey(id)
        let endedAt = record.startedAt + record.durationMs
        var generator = SystemRandomNumberGenerator()
        let member = record.encoded + " " + String(generator.next() as UInt64, radix: 36)
        try await self.writeAll([
            ["LPUSH", key, record.encoded],
            ["LTRIM", key, "0", String(Self.historyLength - 1)],
            ["EXPIRE", key, String(7 * 24 * 3600)],
        ])
        try await self.writeAll([
            ["ZADD", self.recentRoundTripsKey, String(endedAt), member],
            ["ZREMRANGEBYSCORE", self.recentRoundTripsKey, "-inf", "(" + String(now.unixMilliseconds - 3_600_000)],
            ["ZREMRANGEBYRANK", self.recentRoundTripsKey, "0", String(-(Self.recentRoundTripsCap + 1))],
            ["PEXPIRE", self.recentRoundTripsKey, "3600000"],
        ])
    }

    /// The installation's latest round trips, newest first.
    public func roundTripHistory(_ id: InstallationID) async throws -> [RoundTripRecord] {
        let reply = try await self.redis.send(["LRANGE", self.historyKey(id), "0", String(Self.historyLength - 1)])
        return (reply.array ?? []).compactMap { $0.string.flatMap(RoundTripRecord.init(encoded:)) }
    }

    /// Every installation's round trips that ended at or after `since`, oldest first.
    public func recentRoundTrips(since: FlowTime) async throws -> [RoundTripRecord] {
        let reply = try await self.redis.send([
            "ZRANGEBYSCORE", self.recentRoundTripsKey, String(since.unixMilliseconds), "+inf",
        ])
        return (reply.array ?? []).compactMap { $0.string.flatMap(RoundTripRecord.init(encoded:)) }
    }

    // MARK: Breaker and latest round trip

    /// Breaker state and latest round trip of each installation, in the order given.
    public func installationHealth(_ ids: [InstallationID]) async throws -> [InstallationHealth] {
        if ids.isEmpty { return [] }
        var commands: [[String]] = []
        commands.reserveCapacity(ids.count * 2)
        for id in ids {
            commands.append(["HMGET", self.breakerKey(id), "failures", "openUntil"])
            commands.append(["LINDEX", self.historyKey(id), "0"])
        }
        let replies = try await self.redis.pipeline(commands)
        guard replies.count == commands.count else { throw RedisError.protocolError }
        return ids.indices.map { index in
            let breaker = replies[2 * index].array ?? []
            let failures = breaker.first?.string.flatMap { Int($0) } ?? 0
            let openUntil = breaker.count > 1 ? breaker[1].string.flatMap { Int64($0) } ?? 0 : 0
            let last = replies[2 * index + 1].string.flatMap(RoundTripRecord.init(encoded:))
            return InstallationHealth(consecutiveFailures: failures, circuitOpenUntil: openUntil, lastRoundTrip: last)
        }
    }

    /// Every installation record in `scope` (ordered by id), at most `limit` of them, read page by
    /// page. A narrow scope pages through its own ids, so the cost follows the scope, not the index.
    public func allInstallations(limit: Int, scope: CallerScope) async throws
        -> (records: [InstallationRecord], truncated: Bool)
    {
        let among = scope.values.map { $0.compactMap { InstallationID($0) } }
        var records: [InstallationRecord] = []
        var cursor: String? = nil
        repeat {
            let size = min(1000, limit - records.count)
            let page =
                if let among {
                    try await self.listInstallations(among: among, after: cursor, limit: size)
                } else {
                    try await self.listInstallations(after: cursor, limit: size) { scope.contains($0.ari) }
                }
            records += page.records
            cursor = page.next
        } while cursor != nil && records.count < limit
        return (records, cursor != nil)
    }

    /// The `INFO` sections `server` and `replication` of the Redis the store talks to, as fields.
    public func redisInfo() async throws -> [String: String] {
        var fields: [String: String] = [:]
        for section in ["server", "replication"] {
            let reply = try await self.redis.send(["INFO", section])
            for line in (reply.string ?? "").split(whereSeparator: \.isNewline) {
                guard !line.hasPrefix("#"), let colon = line.firstIndex(of: ":") else { continue }
                fields[String(line[..<colon])] = String(line[line.index(after: colon)...])
            }
        }
        return fields
    }
}
