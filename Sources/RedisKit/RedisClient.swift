import Logging
import Metrics
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// A Redis client: a pool of pipelined connections for commands, plus dedicated connections for Pub/Sub.
///
/// hiredis formats commands and parses replies; SwiftNIO does the I/O. Connections are opened lazily, reconnect
/// with capped exponential backoff, and every call finishes within its timeout. With a Sentinel endpoint the
/// client asks the sentinels for the primary on every (re)connect and follows a failover.
///
/// Run it as a `Service` (in a `ServiceGroup`, listed before the services that use it so it shuts down after
/// them): ``run()`` maintains the Pub/Sub subscriptions and closes everything on graceful shutdown. Commands work
/// without ``run()``; subscriptions need it.
public final class RedisClient: Sendable, Service {
    /// How often a subscriber connection is checked with `PING` (an idle half-open TCP connection is otherwise
    /// never noticed, and its messages silently lost).
    static let pubSubHealthCheckInterval: Duration = .seconds(5)

    let configuration: RedisConfiguration
    let logger: Logger
    let eventLoopGroup: any EventLoopGroup
    let connector: RedisConnector
    /// The pool of the one primary (direct or Sentinel endpoint); unused with a cluster.
    let pool: RedisConnectionPool
    /// Routes commands across a Redis Cluster; `nil` for a direct or Sentinel endpoint.
    let cluster: RedisClusterRouter?
    private let availability: Availability
    private let errors: Counter
    let state: Mutex<State>
    /// New subscriptions for ``run()`` to maintain.
    let registrations: AsyncStream<RedisSubscription>.Continuation

    struct State {
        var isShutDown = false
        /// Taken by the first ``run()``.
        var registrationStream: AsyncStream<RedisSubscription>?
        var subscriptions: [Int: RedisSubscription] = [:]
        var nextSubscriptionID = 0
    }

    /// Whether the last command or connect attempt reached Redis.
    private final class Availability: Sendable {
        let isAvailable = Atomic<Bool>(false)
        /// When a direct endpoint's connections were last closed for a `READONLY` reply (uptime ns).
        let lastDemotionReconnect = Atomic<UInt64>(0)
    }

    /// At most this often, a direct endpoint that answers `READONLY` is connected to again.
    static let demotionReconnectInterval: TimeAmount = .seconds(1)

    /// Creates a client; nothing connects until the first command.
    ///
    /// - Parameters:
    ///   - configuration: endpoint, credentials, pool and timeouts.
    ///   - eventLoopGroup: where the connections live.
    ///   - logger: used for connection up/down and failures; its metadata gains `redis.endpoint`.
    ///   - metricsFactory: where the client's metrics are created (once, here); by default nowhere.
    ///   - metricNames: the names the client's metrics carry in the caller's system.
    public init(
        configuration: RedisConfiguration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger,
        metricsFactory: any MetricsFactory = NOOPMetricsHandler.instance,
        metricNames: RedisMetricNames = RedisMetricNames()
    ) {
        var logger = logger
        logger[metadataKey: "redis.endpoint"] = "\(configuration.endpoint)"
        let availability = Availability()
        let connector = RedisConnector(configuration: configuration, logger: logger)
        self.configuration = configuration
        self.logger = logger
        self.eventLoopGroup = eventLoopGroup
        self.connector = connector
        self.availability = availability
        self.pool = RedisConnectionPool(
            configuration: configuration,
            eventLoopGroup: eventLoopGroup,
            logger: logger,
            connector: { eventLoop in try await connector.connect(on: eventLoop) },
            connectionStateChanged: { isUp in availability.isAvailable.store(isUp, ordering: .relaxed) }
        )
        if case .cluster(let seeds) = configuration.endpoint {
            self.cluster = RedisClusterRouter(
                seeds: seeds,
                configuration: configuration,
                connector: connector,
                eventLoopGroup: eventLoopGroup,
                logger: logger,
                connectionStateChanged: { isUp in availability.isAvailable.store(isUp, ordering: .relaxed) }
            )
        } else {
            self.cluster = nil
        }
        self.errors = Counter(label: metricNames.errors, factory: metricsFactory)
        let (stream, continuation) = AsyncStream.makeStream(of: RedisSubscription.self)
        self.registrations = continuation
        self.state = Mutex(State(registrationStream: stream))
    }

    /// How long a command waits for its answer unless the call names a timeout of its own.
    public var commandTimeout: Duration { self.configuration.commandTimeout }

    /// `true` when the last command or connect attempt reached Redis. Cheap: no I/O.
    public var isAvailable: Bool {
        self.availability.isAvailable.load(ordering: .relaxed)
    }

    /// Sends one command (`["SET", key, value]`) on a pooled connection and returns the reply.
    ///
    /// - Parameter timeout: the whole call, connecting included; default ``RedisConfiguration/commandTimeout``.
    /// - Throws: ``RedisError/server(_:)`` for an error reply, ``RedisError/unavailable`` (not sent),
    ///   ``RedisError/connectionLost`` (sent, then the connection was lost: it may have run),
    ///   ``RedisError/timeout``, ``RedisError/protocolError``, ``RedisError/invalidCommand`` (empty, or one
    ///   that changes a shared connection's state: `MULTI`, `SELECT`, `SUBSCRIBE`, `CLIENT REPLY`, …),
    ///   or `CancellationError`.
    public func send(_ command: [String], timeout: Duration? = nil) async throws -> RedisValue {
        try await self.send(command, deadline: self.deadline(timeout))
    }

    /// Sends several commands pipelined on one connection; the replies come back in order. Error replies are
    /// returned as ``RedisValue/error(_:)``, not thrown, except one that says the store cannot serve (out
    /// of memory, a permission the user lacks, a server still loading its data…): that one fails the call,
    /// as it fails ``send(_:timeout:)``, so that it is never read as a missing key. The commands are not a
    /// transaction (another client's commands may run between them, and those before the refused one
    /// ran): a script (``eval(_:keys:arguments:timeout:)``) is one step.
    ///
    /// - Throws: ``RedisError/server(_:)`` for a reply that says the store cannot serve,
    ///   ``RedisError/unavailable``, ``RedisError/connectionLost``, ``RedisError/timeout``,
    ///   ``RedisError/protocolError``, ``RedisError/invalidCommand``, or `CancellationError`.
    public func pipeline(_ commands: [[String]], timeout: Duration? = nil) async throws -> [RedisValue] {
        let replies = try await self.execute(commands, deadline: self.deadline(timeout))
        if let refusal = replies.lazy.compactMap(\.errorMessage).first(where: RedisError.meansStoreCannotServe) {
            throw RedisError.server(refusal)
        }
        return replies
    }

    /// Runs the script with `EVALSHA`, and with `EVAL` (which also caches it in Redis) when Redis answers
    /// `NOSCRIPT`. Both attempts share one timeout.
    ///
    /// - Throws: as ``send(_:timeout:)``; a script error is ``RedisError/server(_:)``.
    public func eval(
        _ script: RedisScript,
        keys: [String],
        arguments: [String],
        timeout: Duration? = nil
    ) async throws -> RedisValue {
        let deadline = self.deadline(timeout)
        let parameters = [String(keys.count)] + keys + arguments
        do {
            return try await self.send(["EVALSHA", script.sha1] + parameters, deadline: deadline)
        } catch let error as RedisError where error.serverErrorPrefix == "NOSCRIPT" {
            return try await self.send(["EVAL", script.source] + parameters, deadline: deadline)
        }
    }

    /// Sends `PING` and checks the answer. With a cluster, to every primary of the slot map at
    /// once, and the map must assign every hash slot: the store answers only when every key does.
    /// A map known to be out of date (a node failed since) is asked for again first; a primary
    /// that does not answer in time has the map asked for again in the background, for the next ping.
    ///
    /// - Throws: as ``send(_:timeout:)``; ``RedisError/protocolError`` if an answer is not `PONG`;
    ///   ``RedisError/unavailable`` if the cluster leaves a slot without a primary.
    public func ping(timeout: Duration? = nil) async throws {
        guard let cluster = self.cluster else {
            let reply = try await self.send(["PING"], timeout: timeout)
            guard reply.string == "PONG" else { throw RedisError.protocolError }
            return
        }
        let deadline = self.deadline(timeout)
        do {
            if cluster.isMapStale {
                try? await cluster.rediscover(deadline: deadline)
            }
            do {
                try await Self.pingEveryPrimary(cluster, deadline: deadline)
            } catch let error as RedisError where error == .timeout {
                // A primary that answers nothing (hung, or its packets dropped) may have failed over; no
                // time is left for the map here, so it is asked for with a budget of its own.
                cluster.rediscoverInBackground()
                throw error
            } catch is RedisError {
                // The map may still name a primary that has failed over (nothing else asked since):
                // ask the cluster for it once more, then ping the primaries it names now.
                try await cluster.rediscover(deadline: deadline)
                try await Self.pingEveryPrimary(cluster, deadline: deadline)
            }
        } catch let error as RedisError where error.meansStoreCannotServe {
            // Counted as a failed command is: a readiness probe that fails is a store error.
            self.storeFailed(error)
            throw error
        }
    }

    /// `PING` to every primary of the cluster's slot map at once; ``RedisError/unavailable`` when
    /// the map leaves a slot without a primary.
    private static func pingEveryPrimary(_ cluster: RedisClusterRouter, deadline: NIODeadline) async throws {
        let primaries = try await cluster.primaries(deadline: deadline)
        guard !primaries.isEmpty, cluster.coversAllSlots else { throw RedisError.unavailable }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for primary in primaries {
                group.addTask {
                    let reply = try await cluster.send(["PING"], to: primary, deadline: deadline)
                    if case .error(let message) = reply { throw RedisError.server(message) }
                    guard reply.string == "PONG" else { throw RedisError.protocolError }
                }
            }
            try await group.waitForAll()
        }
    }

    /// Closes every connection and ends every subscription stream. Later commands throw
    /// ``RedisError/unavailable``. Safe to call more than once.
    public func shutdown() async {
        let subscriptions = self.state.withLock { state in
            state.isShutDown = true
            let subscriptions = Array(state.subscriptions.values)
            state.subscriptions.removeAll()
            return subscriptions
        }
        self.registrations.finish()
        for subscription in subscriptions {
            subscription.terminate()
        }
        await self.pool.shutDown()
        await self.cluster?.shutDown()
    }

    /// One step of a `SCAN` over the whole keyspace (every primary of a cluster, one after the other), from
    /// `cursor` (`"0"` to start); returns the cursor to continue from (`"0"` when done) and the keys found.
    ///
    /// With a cluster the cursor is `<slot>:<node cursor>:<primary>`: the lowest slot of the shard being walked
    /// (shards go in the order of their lowest slot), its `SCAN` cursor, and the primary that cursor belongs to.
    /// A node's cursor means nothing to another node, so when a failover gave the shard another primary, its walk
    /// starts again on the new one (keys of that shard may come twice; none is skipped).
    ///
    /// - Throws: as ``send(_:timeout:)``; ``RedisError/invalidCommand`` for a malformed cursor;
    ///   ``RedisError/topologyChanged`` when no shard starts at the cursor's slot any more (the slots were
    ///   moved between shards during the walk: start again from `"0"`).
    public func scan(
        cursor: String,
        match pattern: String,
        count: Int,
        timeout: Duration? = nil
    ) async throws -> (cursor: String, keys: [String]) {
        let deadline = self.deadline(timeout)
        guard let cluster = self.cluster else {
            let reply = try await self.send(
                ["SCAN", cursor, "MATCH", pattern, "COUNT", String(count)], deadline: deadline)
            return try Self.scanReply(reply)
        }
        let shards = try await cluster.shards(deadline: deadline)
        guard let first = shards.first else { return ("0", []) }
        var (shard, nodeCursor) = (first, "0")
        if cursor != "0" {
            let parts = cursor.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3, let slot = Int(parts[0]), UInt64(parts[1]) != nil, !parts[2].isEmpty else {
                throw RedisError.invalidCommand
            }
            guard let current = shards.first(where: { $0.lowestSlot == slot }) else {
                throw RedisError.topologyChanged
            }
            (shard, nodeCursor) = (current, current.primary.description == parts[2] ? String(parts[1]) : "0")
        }
        let reply: RedisValue
        do {
            reply = try await cluster.send(
                ["SCAN", nodeCursor, "MATCH", pattern, "COUNT", String(count)], to: shard.primary, deadline: deadline
            )
            if case .error(let message) = reply {
                throw RedisError.server(message)
            }
        } catch let error as RedisError where error.meansStoreCannotServe {
            self.storeFailed(error)
            throw error
        }
        let (next, keys) = try Self.scanReply(reply)
        if next != "0" {
            return ("\(shard.lowestSlot):\(next):\(shard.primary)", keys)
        }
        guard let following = shards.first(where: { $0.lowestSlot > shard.lowestSlot }) else {
            return ("0", keys)
        }
        return ("\(following.lowestSlot):0:\(following.primary)", keys)
    }

    private static func scanReply(_ reply: RedisValue) throws -> (cursor: String, keys: [String]) {
        guard let parts = reply.array, parts.count == 2, let next = parts[0].string, let list = parts[1].array else {
            throw RedisError.protocolError
        }
        return (next, list.compactMap(\.string))
    }

    /// The node written to answered `READONLY`: it was demoted. With Sentinel every connection is
    /// closed at once, so the next ones ask the sentinels for the new primary. A direct endpoint is
    /// reconnected too, at most once per ``demotionReconnectInterval``: a name that follows the
    /// primary (a managed service's DNS name after a failover) is looked up again, while a fixed
    /// address that stays a replica is not reconnected to on every write. A server (or a proxy in
    /// front of it) that keeps a client's connection through a demotion would otherwise fail every
    /// write until a restart (Redis 7.0 itself closes it soon after).
    private func primaryDemoted() {
        if case .direct = self.configuration.endpoint {
            let now = NIODeadline.now().uptimeNanoseconds
            let last = self.availability.lastDemotionReconnect.load(ordering: .relaxed)
            guard now &- last >= UInt64(Self.demotionReconnectInterval.nanoseconds),
                self.availability.lastDemotionReconnect.compareExchange(
                    expected: last, desired: now, ordering: .relaxed
                ).exchanged
            else { return }
        }
        self.logger.notice("Redis primary became a replica; reconnecting to the new primary")
        self.pool.closeAllConnections()
    }

    /// Commands that change the state of the connection they run on, or what it answers: the
    /// pool's connections are shared by every caller and replies are matched in order, so such a
    /// command would hand other callers' replies to the wrong caller (`CLIENT REPLY`, `SUBSCRIBE`,
    /// `MONITOR`), queue their commands in its transaction (`MULTI`), or move them to another
    /// database or user (`SELECT`, `AUTH`). Refused with ``RedisError/invalidCommand``; atomic
    /// groups of commands are scripts (``eval(_:keys:arguments:timeout:)``).
    static let connectionStateCommands: Set<String> = [
        "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "SELECT", "AUTH", "HELLO", "RESET", "QUIT", "SUBSCRIBE",
        "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "MONITOR", "SYNC", "PSYNC",
        "READONLY", "READWRITE", "ASKING",
    ]

    static func changesConnectionState(_ command: [String]) -> Bool {
        let name = command[0].uppercased()
        if name == "CLIENT", command.count > 1 {
            let subcommand = command[1].uppercased()
            return subcommand == "REPLY" || subcommand == "TRACKING"
        }
        return Self.connectionStateCommands.contains(name)
    }

    func send(_ command: [String], deadline: NIODeadline) async throws -> RedisValue {
        let reply = try await self.execute([command], deadline: deadline)[0]
        if case .error(let message) = reply {
            throw RedisError.server(message)
        }
        return reply
    }

    private func execute(_ commands: [[String]], deadline: NIODeadline) async throws -> [RedisValue] {
        guard !commands.isEmpty else {
            return []
        }
        guard commands.allSatisfy({ !$0.isEmpty && !Self.changesConnectionState($0) }) else {
            throw RedisError.invalidCommand
        }
        do {
            let replies: [RedisValue]
            if let cluster = self.cluster {
                replies = try await cluster.execute(commands, deadline: deadline)
                self.availability.isAvailable.store(true, ordering: .relaxed)
            } else {
                let connection = try await self.pool.connection(deadline: deadline)
                replies = try await connection.send(commands, deadline: deadline)
                self.availability.isAvailable.store(true, ordering: .relaxed)
                if replies.contains(where: { RedisError.isReadOnlyReply($0) }) {
                    self.primaryDemoted()
                }
            }
            // A refusal in the replies (out of memory, a permission the user lacks…): one store error per call.
            if replies.contains(where: { $0.errorMessage.map(RedisError.meansStoreCannotServe) ?? false }) {
                self.errors.increment()
            }
            return replies
        } catch let error as RedisError where error.meansStoreCannotServe {
            self.storeFailed(error)
            throw error
        }
    }

    /// A call failed because the store cannot serve: counted; when Redis was not reached (not an
    /// error reply), it is also marked unavailable.
    private func storeFailed(_ error: RedisError) {
        if !error.isServerError {
            self.availability.isAvailable.store(false, ordering: .relaxed)
        }
        self.errors.increment()
    }

    private func deadline(_ timeout: Duration?) -> NIODeadline {
        .now() + TimeAmount(timeout ?? self.configuration.commandTimeout)
    }
}

/// The names of the metrics a ``RedisClient`` emits.
public struct RedisMetricNames: Sendable, Hashable {
    /// Counter of commands and pipelines that failed because the store cannot serve: Redis was
    /// unreachable or did not answer in time, or refused with an error reply that says so whatever the
    /// command (``RedisError/meansStoreCannotServe``: out of memory, a replica or a cluster not ready, a
    /// permission the ACL user lacks…). One per call, however many of its commands failed.
    public var errors: String

    /// - Parameter errors: default `redis_client_errors_total`.
    public init(errors: String = "redis_client_errors_total") {
        self.errors = errors
    }
}

extension RedisError {
    /// Error codes that say the store cannot serve now, whatever the command: out of memory (`OOM`),
    /// a write sent to a replica (`READONLY`), a cluster or replica not ready (`CLUSTERDOWN`, `TRYAGAIN`,
    /// `LOADING`, `MASTERDOWN`, `NOREPLICAS`), snapshots failing (`MISCONF`), a script running too
    /// long (`BUSY`), or the ACL user lacking a permission (`NOPERM`, `NOAUTH`).
    static let storeRefusalCodes: Set<Substring> = [
        "OOM", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "NOREPLICAS", "MISCONF", "BUSY",
        "NOPERM", "NOAUTH",
    ]

    /// Whether an error reply is one of ``storeRefusalCodes``, also when raised inside a script (Redis
    /// 6 wraps it: `ERR Error running script (call to f_…): @user_script:1: -OOM …`).
    static func meansStoreCannotServe(_ message: String) -> Bool {
        if Self.storeRefusalCodes.contains(message.prefix(while: { $0 != " " })) {
            return true
        }
        guard message.hasPrefix("ERR Error running script") else {
            return false
        }
        return Self.storeRefusalCodes.contains { message.contains("-\($0) ") }
    }

    /// Whether the failure means the store cannot serve (what the client's error counter counts):
    /// Redis unreachable, too slow, or refusing with one of ``storeRefusalCodes``. An ordinary error
    /// reply (a wrong type, a script's own error) is an answer, not a store failure.
    public var meansStoreCannotServe: Bool {
        self.isConnectionFailure || self == .timeout || (self.serverMessage.map(Self.meansStoreCannotServe) ?? false)
    }

    /// A write refused by a replica: `READONLY …`, or (Redis 6) that error raised inside a script,
    /// `ERR Error running script (call to f_…): @user_script:1: -READONLY …`.
    static func isReadOnlyReply(_ reply: RedisValue) -> Bool {
        if case .error(let message) = reply {
            return message.hasPrefix("READONLY")
                || (message.hasPrefix("ERR Error running script") && message.contains("-READONLY "))
        }
        return false
    }
}
