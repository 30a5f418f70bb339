import FlowEngine
import Foundation

/// What the status page and `GET /v1/status` show, read from the store at one instant.
/// Holds nothing secret: no token, no trigger URL, no caller secret.
struct StatusReport: Sendable {
    /// One installation's row: its record, breaker and latest round trip.
    struct Row: Sendable {
        var record: InstallationRecord
        var health: InstallationHealth
        /// Lower is more urgent (see ``attention``).
        var attentionRank: Int
        var attentionReason: String
    }

    struct RedisState: Sendable {
        var reachable: Bool
        /// `direct` or `sentinel`.
        var mode: String
        /// `host:port` of a directly configured server; nil for Sentinel (the sentinels name it).
        var address: String?
        var role: String?
        var version: String?
        var connectedReplicas: Int?
        var sentinelMaster: String?
        var sentinels: [String]
    }

    var generatedAt: FlowTime
    var replica: String
    var replicas: [ReplicaHeartbeatRecord]
    var redis: RedisState
    /// The last hour's round trips of every installation, oldest first.
    var roundTrips: [RoundTripRecord]
    var userExchangesUsed: Int
    var userExchangesLimit: Int
    var rows: [Row]
    /// More installations exist than were read.
    var truncated: Bool

    /// The window of the summary's round-trip counts.
    static let recentWindow: Duration = .seconds(15 * 60)
    /// A token expiring within this time without a trigger registered is listed.
    static let expirySoon: Int64 = 30 * 60
    /// Installations read for one report at most.
    static let maxInstallations = 10_000

    var recentRoundTrips: [RoundTripRecord] {
        let since = (self.generatedAt - Self.recentWindow).unixMilliseconds
        return self.roundTrips.filter { $0.startedAt + $0.durationMs >= since }
    }

    /// Counts by outcome, outcomes sorted.
    static func countByOutcome(_ records: [RoundTripRecord]) -> [(String, Int)] {
        var counts: [String: Int] = [:]
        for r in records { counts[r.outcome, default: 0] += 1 }
        return counts.sorted { $0.key < $1.key }
    }

    var openCircuits: [Row] {
        self.rows.filter { $0.health.circuitOpenUntil > self.generatedAt.unixMilliseconds }
    }

    var expiringWithoutTrigger: [Row] {
        self.rows.filter { Self.expiresSoonWithoutTrigger($0.record, now: self.generatedAt) }
    }

    static func expiresSoonWithoutTrigger(_ r: InstallationRecord, now: FlowTime) -> Bool {
        guard r.status == .active, !r.triggerRegistered, let exp = r.tokenExpiresAt else { return false }
        return exp <= now.unixSeconds + Self.expirySoon
    }

    /// How urgent an installation is, most urgent first: circuit open, failing, last round trip
    /// failed, token expiring without a trigger, no trigger registered, healthy, uninstalled.
    static func attention(_ r: InstallationRecord, _ h: InstallationHealth, now: FlowTime) -> (Int, String) {
        if r.status == .uninstalled { return (9, "uninstalled") }
        if h.circuitOpenUntil > now.unixMilliseconds { return (0, "circuit open") }
        if h.consecutiveFailures > 0 { return (1, "failing") }
        if let last = h.lastRoundTrip, last.outcome != "success" { return (2, "last round trip failed") }
        if Self.expiresSoonWithoutTrigger(r, now: now) { return (3, "token expiring, no trigger") }
        if !r.triggerRegistered { return (4, "no trigger") }
        return (5, "ok")
    }

    /// Reads everything the report shows. Installations outside `scope` are left out.
    static func collect(gateway: Gateway, scope: CallerScope) async throws -> StatusReport {
        let store = gateway.store
        let now = FlowTime.now()
        let replicas = try await store.replicas(now: now)
        let roundTrips = try await store.recentRoundTrips(since: now - .seconds(3600))
        let used = try await gateway.userTokenStore.exchangesUsed(
            scope: gateway.configuration.forgeAppID, window: .seconds(60), now: now)
        let (records, truncated) = try await store.allInstallations(limit: Self.maxInstallations, scope: scope)
        var healths: [InstallationHealth] = []
        var start = 0
        while start < records.count {
            let end = min(start + 500, records.count)
            healths += try await store.installationHealth(records[start..<end].map(\.id))
            start = end
        }
        var rows: [Row] = zip(records, healths).map { record, health in
            let (rank, reason) = Self.attention(record, health, now: now)
            return Row(record: record, health: health, attentionRank: rank, attentionReason: reason)
        }
        rows.sort { ($0.attentionRank, $0.record.id.ari) < ($1.attentionRank, $1.record.id.ari) }
        return StatusReport(
            generatedAt: now, replica: gateway.replicaID, replicas: replicas,
            redis: await Self.redisState(gateway), roundTrips: roundTrips, userExchangesUsed: used,
            userExchangesLimit: gateway.configuration.userExchangesPerMinute, rows: rows, truncated: truncated)
    }

    static func redisState(_ gateway: Gateway) async -> RedisState {
        var state = RedisState(reachable: false, mode: "direct", sentinels: [])
        switch gateway.configuration.redis.endpoint {
        case .direct:
            state.address = gateway.configuration.redis.endpoint.description
        case .sentinel(let sentinels, let masterName):
            state.mode = "sentinel"
            state.sentinelMaster = masterName
            state.sentinels = sentinels.map(\.description)
        case .cluster(let seeds):
            state.mode = "cluster"
            state.address = seeds.map(\.description).joined(separator: ",")
        }
        if let info = try? await gateway.store.redisInfo() {
            state.reachable = true
            state.role = info["role"]
            state.version = info["redis_version"]
            state.connectedReplicas = info["connected_slaves"].flatMap { Int($0) }
        }
        return state
    }

    // MARK: JSON

    static func time(ms: Int64) -> JSONValue { .string(RFC3339.string(unixSeconds: ms / 1000)) }

    static func roundTripJSON(_ r: RoundTripRecord) -> JSONValue {
        .object([
            ("startedAt", Self.time(ms: r.startedAt)), ("durationMs", .int(r.durationMs)),
            ("outcome", .string(r.outcome)), ("attempts", .int(Int64(r.attempts))), ("replica", .string(r.replica)),
        ])
    }

    /// The installation's state as operators see it (no secret).
    static func installationStateJSON(_ row: Row, now: FlowTime) -> JSONValue {
        let r = row.record
        let h = row.health
        return .object([
            ("installationId", .string(r.id.ari)),
            ("status", .string(r.status.rawValue)),
            ("triggerRegistered", .bool(r.triggerRegistered)),
            ("tokenExpiresAt", r.tokenExpiresAt.map { .string(RFC3339.string(unixSeconds: $0)) } ?? .null),
            ("lastTokenAt", r.lastTokenAt.map { .string(RFC3339.string(unixSeconds: $0)) } ?? .null),
            ("lastTokenVia", .optional(r.lastTokenVia)),
            ("lastRoundTrip", h.lastRoundTrip.map(Self.roundTripJSON) ?? .null),
            ("consecutiveFailures", .int(Int64(h.consecutiveFailures))),
            (
                "circuitOpenUntil",
                h.circuitOpenUntil > now.unixMilliseconds ? Self.time(ms: h.circuitOpenUntil) : .null
            ),
            ("triggerKeyId", .optional(r.triggerKeyId)),
            ("attention", .string(row.attentionReason)),
        ])
    }

    /// The `redis` part of ``json``.
    private var redisJSON: JSONValue {
        .object([
            ("reachable", .bool(self.redis.reachable)),
            ("mode", .string(self.redis.mode)),
            ("address", .optional(self.redis.address)),
            ("role", .optional(self.redis.role)),
            ("version", .optional(self.redis.version)),
            ("connectedReplicas", self.redis.connectedReplicas.map { .int(Int64($0)) } ?? .null),
            (
                "sentinel",
                self.redis.mode == "sentinel"
                    ? .object([
                        ("masterName", .optional(self.redis.sentinelMaster)),
                        ("sentinels", .array(self.redis.sentinels.map { .string($0) })),
                    ]) : .null
            ),
        ])
    }

    var json: JSONValue {
        let recent = self.recentRoundTrips
        let redis = self.redisJSON
        let active = self.rows.filter { $0.record.status == .active }.count
        return .object([
            ("generatedAt", Self.time(ms: self.generatedAt.unixMilliseconds)),
            ("replica", .string(self.replica)),
            (
                "replicas",
                .array(
                    self.replicas.map {
                        .object([
                            ("id", .string($0.replicaID)), ("version", .string($0.version)),
                            ("startedAt", Self.time(ms: $0.startedAt)), ("lastSeenAt", Self.time(ms: $0.lastSeenAt)),
                        ])
                    })
            ),
            ("redis", redis),
            (
                "roundTrips",
                .object([
                    ("windowSeconds", .int(Int64(Self.recentWindow.milliseconds / 1000))),
                    ("total", .int(Int64(recent.count))),
                    ("byOutcome", .object(Self.countByOutcome(recent).map { ($0.0, .int(Int64($0.1))) })),
                ])
            ),
            (
                "openCircuits",
                .array(
                    self.openCircuits.map {
                        .object([
                            ("installationId", .string($0.record.id.ari)),
                            ("openUntil", Self.time(ms: $0.health.circuitOpenUntil)),
                            ("consecutiveFailures", .int(Int64($0.health.consecutiveFailures))),
                        ])
                    })
            ),
            (
                "userExchanges",
                .object([
                    ("used", .int(Int64(self.userExchangesUsed))), ("limit", .int(Int64(self.userExchangesLimit))),
                    ("windowSeconds", 60),
                ])
            ),
            (
                "expiringWithoutTrigger",
                .array(
                    self.expiringWithoutTrigger.map {
                        .object([
                            ("installationId", .string($0.record.id.ari)),
                            (
                                "tokenExpiresAt",
                                $0.record.tokenExpiresAt.map { .string(RFC3339.string(unixSeconds: $0)) } ?? .null
                            ),
                        ])
                    })
            ),
            (
                "installations",
                .object([
                    ("total", .int(Int64(self.rows.count))), ("active", .int(Int64(active))),
                    ("uninstalled", .int(Int64(self.rows.count - active))),
                    ("needingAttention", .int(Int64(self.rows.filter { $0.attentionRank < 4 }.count))),
                    ("truncated", .bool(self.truncated)),
                ])
            ),
        ])
    }
}
