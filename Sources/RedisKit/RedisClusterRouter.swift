import Logging
import NIOCore
import Synchronization

/// The I/O around ``RedisClusterStateMachine``: one connection pool per primary, topology queries, and commands
/// sent to the primary of their slot with redirections and failovers followed.
final class RedisClusterRouter: Sendable {
    /// How many times one command may be redirected or retried before the caller gets an error.
    static let maximumRounds = 32
    /// Pause before sending again a command that a node could not take (failover or resharding in progress).
    static let retryPause: Duration = .milliseconds(50)
    /// How long one node is given to answer a slot-map query before the next candidate is asked too (a node
    /// that fails lets the next one start at once): a hung node delays a refresh by this much, not by its
    /// connect timeout.
    static let mapQueryStagger: Duration = .milliseconds(100)

    private struct State {
        var machine: RedisClusterStateMachine
        var pools: [RedisNodeAddress: RedisConnectionPool] = [:]
        /// Completed when the running rediscovery ends (successfully or not).
        var rediscovery: EventLoopPromise<Void>?
        /// Callers waiting for the running rediscovery, besides the one that started it.
        var rediscoveryWaiters = 0
        /// Pools of nodes that left the map, closed once commands already sent to them are answered.
        var retiring: [ObjectIdentifier: RedisConnectionPool] = [:]
        var isShutDown = false
    }

    private let state: Mutex<State>
    private let configuration: RedisConfiguration
    private let connector: RedisConnector
    private let eventLoopGroup: any EventLoopGroup
    private let logger: Logger
    private let connectionStateChanged: @Sendable (_ isUp: Bool) -> Void

    init(
        seeds: [RedisNodeAddress],
        configuration: RedisConfiguration,
        connector: RedisConnector,
        eventLoopGroup: any EventLoopGroup,
        logger: Logger,
        connectionStateChanged: @escaping @Sendable (_ isUp: Bool) -> Void
    ) {
        self.state = Mutex(State(machine: RedisClusterStateMachine(seeds: seeds)))
        self.configuration = configuration
        self.connector = connector
        self.eventLoopGroup = eventLoopGroup
        self.logger = logger
        self.connectionStateChanged = connectionStateChanged
    }

    /// A command that a node did not take (it could not be reached): safe to send again elsewhere.
    private struct NotSent: Error {
        var error: any Error
    }

    private struct Item {
        var index: Int
        var asking: Bool
    }

    /// Sends `commands` (pipelined per node) and returns their replies in order. Each command goes to the
    /// primary of its key's slot; `MOVED` and `ASK` are followed; a command that a node could not take because
    /// of a failover (unreachable node, `CLUSTERDOWN`, `TRYAGAIN`, `READONLY`) is sent again after
    /// rediscovery, until `deadline`. A command that may have reached a node which then failed is not repeated:
    /// the call throws.
    func execute(_ commands: [[String]], deadline: NIODeadline) async throws -> [RedisValue] {
        var progress = Progress(count: commands.count)
        // Bounded by the deadline, and by a number of rounds against redirection loops.
        for _ in 0..<Self.maximumRounds {
            guard !progress.pending.isEmpty else {
                break
            }
            guard NIODeadline.now() < deadline else {
                throw progress.lastError
            }
            guard let groups = self.groupByNode(commands, progress) else {
                do {
                    try await self.rediscover(deadline: deadline)
                } catch {
                    progress.lastError = error
                    try await self.pause(until: deadline)
                }
                continue
            }
            let results = await self.send(commands, groups, deadline: deadline)
            let shouldRediscover = try self.take(results, into: &progress)
            if shouldRediscover, !progress.pending.isEmpty {
                try? await self.rediscover(deadline: deadline)
                try await self.pause(until: deadline)
            }
        }
        guard progress.pending.isEmpty else {
            if let redirection = progress.pending.lazy.compactMap({ progress.redirections[$0] }).first {
                // Redirected round after round (nodes that disagree on a slot's owner): the caller gets
                // the timeout it would get from a node that never answers; the log says why.
                self.logger.warning(
                    "Redis Cluster redirections did not settle",
                    metadata: ["redis.address": "\(redirection.node)", "redis.cluster.rounds": "\(Self.maximumRounds)"])
            }
            throw progress.lastError
        }
        return progress.replies.map { $0 ?? .null }
    }

    /// Where a pipeline stands between rounds.
    private struct Progress {
        var replies: [RedisValue?]
        var redirections: [Int: (node: RedisNodeAddress, asking: Bool)] = [:]
        var pending: [Int]
        var lastError: any Error = RedisError.timeout

        init(count: Int) {
            self.replies = [RedisValue?](repeating: nil, count: count)
            self.pending = Array(0..<count)
        }
    }

    private typealias NodeResult = (node: RedisNodeAddress, items: [Item], result: Result<[RedisValue], any Error>)

    /// The pending commands by node (a redirection's target, else the primary of the slot), or nil
    /// when the slot map must be discovered first.
    private func groupByNode(_ commands: [[String]], _ progress: Progress) -> [RedisNodeAddress: [Item]]? {
        var groups: [RedisNodeAddress: [Item]] = [:]
        var needsMap = false
        self.state.withLock { state in
            for index in progress.pending {
                if let redirection = progress.redirections[index] {
                    groups[redirection.node, default: []].append(Item(index: index, asking: redirection.asking))
                    continue
                }
                switch state.machine.route(slot: RedisHashSlot.slot(of: commands[index])) {
                case .node(let node): groups[node, default: []].append(Item(index: index, asking: false))
                case .discover: needsMap = true
                }
            }
        }
        return needsMap ? nil : groups
    }

    /// Sends each node its share, all nodes at once.
    private func send(
        _ commands: [[String]], _ groups: [RedisNodeAddress: [Item]], deadline: NIODeadline
    ) async -> [NodeResult] {
        await withTaskGroup(of: NodeResult.self) { group in
            for (node, items) in groups {
                group.addTask {
                    do {
                        return (
                            node, items, .success(try await self.send(commands, items, to: node, deadline: deadline))
                        )
                    } catch {
                        return (node, items, .failure(error))
                    }
                }
            }
            var results: [NodeResult] = []
            for await result in group {
                results.append(result)
            }
            return results
        }
    }

    /// Takes one round's results: replies are kept, redirected and retryable commands become
    /// pending again. Returns whether the map should be rediscovered; throws when a command may
    /// have run on a node that then failed (it is not repeated).
    private func take(_ results: [NodeResult], into progress: inout Progress) throws -> Bool {
        progress.pending = []
        var shouldRediscover = false
        var moved = false
        var thrown: (any Error)?
        for (node, items, result) in results {
            switch result {
            case .success(let nodeReplies):
                self.state.withLock { state in
                    state.machine.nodeAnswered(node)
                    for (item, reply) in zip(items, nodeReplies) {
                        switch state.machine.replyReceived(reply, from: node) {
                        case .done:
                            progress.replies[item.index] = reply
                            progress.redirections[item.index] = nil
                        case .redirect(let target, let asking):
                            progress.redirections[item.index] = (target, asking)
                            progress.pending.append(item.index)
                            moved = moved || !asking
                        case .retryAfterRediscovery:
                            progress.redirections[item.index] = nil
                            progress.pending.append(item.index)
                            shouldRediscover = true
                            progress.lastError = RedisError.server(reply.errorMessage ?? "")
                        }
                    }
                }
            case .failure(let failure as NotSent):
                self.state.withLock { $0.machine.nodeUnreachable(node) }
                for item in items {
                    progress.redirections[item.index] = nil
                    progress.pending.append(item.index)
                }
                shouldRediscover = true
                progress.lastError = failure.error
            case .failure(let error) where error is CancellationError:
                // The caller went away; the node did not fail.
                thrown = thrown ?? error
            case .failure(let error):
                self.state.withLock { $0.machine.nodeUnreachable(node) }
                shouldRediscover = true
                thrown = error
            }
        }
        if let thrown, !shouldRediscover {
            throw thrown
        }
        if let thrown {
            // Commands may have run on the failed node: not repeated. The map is looked at again in the
            // background so that the next command goes to the right node.
            self.rediscoverInBackground()
            throw thrown
        }
        // A slot moved: the redirected commands follow it now; the rest of the map is refreshed in the
        // background (at most every minimum interval), so other moved slots do not each cost a `MOVED`.
        if moved, self.state.withLock({ $0.machine.backgroundRediscoveryDue(now: .now()) }) {
            self.rediscoverInBackground()
        }
        return shouldRediscover
    }

    /// Sends one node's share of a pipeline; `ASKING` precedes each command sent after an `ASK` redirection.
    private func send(
        _ commands: [[String]],
        _ items: [Item],
        to node: RedisNodeAddress,
        deadline: NIODeadline
    ) async throws -> [RedisValue] {
        let connection: RedisConnection
        do {
            connection = try await self.pool(for: node).connection(deadline: deadline)
        } catch let error as CancellationError {
            throw error
        } catch {
            throw NotSent(error: error)
        }
        var batch: [[String]] = []
        var replyPositions: [Int] = []
        for item in items {
            if item.asking {
                batch.append(["ASKING"])
            }
            replyPositions.append(batch.count)
            batch.append(commands[item.index])
        }
        let replies = try await connection.send(batch, deadline: deadline)
        return replyPositions.map { replies[$0] }
    }

    private func pool(for node: RedisNodeAddress) throws -> RedisConnectionPool {
        try self.state.withLock { state in
            guard !state.isShutDown else {
                throw RedisError.unavailable
            }
            if let pool = state.pools[node] {
                return pool
            }
            let connector = self.connector
            let pool = RedisConnectionPool(
                configuration: self.configuration,
                eventLoopGroup: self.eventLoopGroup,
                logger: self.logger,
                connector: { eventLoop in try await connector.connect(to: node, on: eventLoop) },
                connectionStateChanged: self.connectionStateChanged
            )
            state.pools[node] = pool
            return pool
        }
    }

    private func pause(until deadline: NIODeadline) async throws {
        let remaining = deadline - .now()
        guard remaining > .zero else {
            return
        }
        try await Task.sleep(for: min(Self.retryPause, Duration.nanoseconds(remaining.nanoseconds)))
    }

    /// Asks for the slot map in a task of its own, with a connect timeout for a budget, for the commands
    /// that come next.
    func rediscoverInBackground() {
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        Task { try? await self.rediscover(deadline: deadline) }
    }

    /// Asks the known nodes, then the seeds, for the slot map (`CLUSTER SHARDS`, or `CLUSTER SLOTS` on servers
    /// without it), at most every ``RedisClusterStateMachine/minimumRediscoveryInterval``; callers arriving
    /// while one runs wait for it.
    ///
    /// - Throws: ``RedisError/unavailable`` when no node answered, ``RedisError/timeout``, `CancellationError`.
    func rediscover(deadline: NIODeadline) async throws {
        let (decision, promise) = self.state.withLock {
            state -> (RedisClusterStateMachine.Rediscovery, EventLoopPromise<Void>?) in
            let decision = state.machine.rediscoveryRequested(now: .now())
            switch decision {
            case .start: state.rediscovery = self.eventLoopGroup.any().makePromise(of: Void.self)
            case .join: state.rediscoveryWaiters += 1
            case .wait: break
            }
            return (decision, state.rediscovery)
        }
        switch decision {
        case .join:
            defer { self.state.withLock { $0.rediscoveryWaiters -= 1 } }
            guard let promise else {
                return
            }
            // Nothing was sent while the map was asked for: out of time, the command is unavailable.
            try await promise.futureResult.awaitRedisResult(deadline: deadline, timeoutError: .unavailable)
        case .wait(let until):
            // The map was just asked for; give the cluster a moment before asking again.
            let pause = min(until, deadline) - .now()
            if pause > .zero {
                try await Task.sleep(for: .nanoseconds(pause.nanoseconds))
            }
        case .start(let candidates):
            guard let promise else {
                return
            }
            // The refresh runs in a task of its own, with at least a connect timeout: a caller that gives
            // up (cancelled, or at its deadline) ends its own wait only, and whoever joined gets the
            // refresh's outcome, never that caller's cancellation.
            let budget = max(deadline, .now() + TimeAmount(self.configuration.connectTimeout))
            Task { await self.refresh(asking: candidates, deadline: budget, promise: promise) }
            try await promise.futureResult.awaitRedisResult(deadline: deadline, timeoutError: .unavailable)
        }
    }

    /// Fetches the slot map, takes it (retiring the pools of former primaries) and completes `promise`
    /// with the outcome: ``RedisError/unavailable`` when no node gave a map.
    private func refresh(asking candidates: [RedisNodeAddress], deadline: NIODeadline, promise: EventLoopPromise<Void>)
        async
    {
        let result: Result<RedisHashSlotMap, any Error>
        do {
            result = .success(try await self.fetchMap(from: candidates, deadline: deadline))
        } catch {
            result = .failure(error)
        }
        let removed = self.state.withLock { state -> [RedisConnectionPool] in
            state.rediscovery = nil
            switch result {
            case .success(let map):
                let gone = state.machine.rediscoverySucceeded(map)
                return gone.compactMap { state.pools.removeValue(forKey: $0) }
            case .failure:
                state.machine.rediscoveryFailed()
                return []
            }
        }
        self.retire(removed)
        switch result {
        case .success(let map):
            promise.succeed()
            self.logger.info(
                "Redis Cluster slot map",
                metadata: [
                    "redis.cluster.primaries": "\(map.primaries.map(\.description).joined(separator: ","))",
                    "redis.cluster.complete": "\(map.coversAllSlots)",
                ]
            )
        case .failure(let error):
            promise.fail(error as? RedisError ?? RedisError.unavailable)
        }
    }

    /// Closes the pools of nodes that are no longer primaries, after a grace of one command timeout:
    /// commands already sent to such a node (a demoted primary, in an orderly failover) get their
    /// answer (a `MOVED`, followed) instead of a closed connection.
    private func retire(_ pools: [RedisConnectionPool]) {
        guard !pools.isEmpty else {
            return
        }
        self.state.withLock { state in
            for pool in pools { state.retiring[ObjectIdentifier(pool)] = pool }
        }
        let grace = self.configuration.commandTimeout
        Task {
            try? await Task.sleep(for: grace)
            for pool in pools {
                let retired = self.state.withLock { $0.retiring.removeValue(forKey: ObjectIdentifier(pool)) }
                if retired != nil { await pool.shutDown() }
            }
        }
    }

    /// The slot map as the first node that gives a complete one tells it. The candidates are asked in
    /// their order, staggered: the next one when the one before fails or has not answered within
    /// ``mapQueryStagger``, so a node that hangs (its process stopped, its packets dropped) costs a refresh
    /// that long and not its whole budget. When no node gives a complete map, the one covering most slots.
    private func fetchMap(from candidates: [RedisNodeAddress], deadline: NIODeadline) async throws -> RedisHashSlotMap {
        enum Event: Sendable {
            case answered(RedisHashSlotMap?)
            case staggerElapsed(Int)
        }
        let eventLoop = self.eventLoopGroup.any()
        let best = await withTaskGroup(of: Event.self) { group -> RedisHashSlotMap? in
            var waiting = candidates[...]
            var asking = 0
            var timer = 0
            func askNext(_ group: inout TaskGroup<Event>) {
                guard let node = waiting.popFirst() else { return }
                asking += 1
                group.addTask { .answered(await self.askForMap(node, on: eventLoop, deadline: deadline)) }
                guard !waiting.isEmpty else { return }
                timer += 1
                group.addTask { [timer] in
                    try? await Task.sleep(for: Self.mapQueryStagger)
                    return .staggerElapsed(timer)
                }
            }
            askNext(&group)
            var best: RedisHashSlotMap?
            while asking > 0, let event = await group.next() {
                switch event {
                case .staggerElapsed(let id):
                    if id == timer { askNext(&group) }
                case .answered(let map):
                    asking -= 1
                    if let map, map.coversAllSlots {
                        group.cancelAll()
                        return map
                    }
                    if let map, !map.primaries.isEmpty, map.coveredSlotCount > best?.coveredSlotCount ?? 0 {
                        best = map
                    }
                    askNext(&group)
                }
            }
            group.cancelAll()
            return best
        }
        if let best {
            self.logger.warning(
                "Redis Cluster slot map leaves slots without a primary",
                metadata: ["redis.slots.covered": "\(best.coveredSlotCount)"])
            return best
        }
        try Task.checkCancellation()
        self.logger.warning("No Redis Cluster node gave the slot map")
        throw RedisError.unavailable
    }

    /// One node's slot map (`CLUSTER SHARDS`, or `CLUSTER SLOTS` on servers without it or when it
    /// leaves slots without a primary: some Redis 7 releases report a failed-over shard with no slots);
    /// nil when the node cannot be reached or does not answer. A node that fails is remembered as such.
    private func askForMap(
        _ node: RedisNodeAddress, on eventLoop: any EventLoop, deadline: NIODeadline
    ) async -> RedisHashSlotMap? {
        let connectDeadline = min(deadline, .now() + TimeAmount(self.configuration.connectTimeout))
        do {
            let connection = try await self.connector.connect(to: node, on: eventLoop, deadline: connectDeadline)
            defer { connection.close() }
            let shards = try await connection.send([["CLUSTER", "SHARDS"]], deadline: deadline)[0]
            var map: RedisHashSlotMap?
            switch shards {
            case .error: map = nil  // before Redis 7: CLUSTER SLOTS only
            default: map = try RedisHashSlotMap.fromClusterShards(shards, tls: self.configuration.tls != nil)
            }
            if map?.coversAllSlots != true {
                let slots = try await connection.send([["CLUSTER", "SLOTS"]], deadline: deadline)[0]
                let fromSlots = try RedisHashSlotMap.fromClusterSlots(slots)
                if fromSlots.coveredSlotCount > map?.coveredSlotCount ?? -1 { map = fromSlots }
            }
            self.state.withLock { $0.machine.nodeAnswered(node) }
            return map
        } catch {
            // Asked no more (another node answered first, or the refresh ended): no fault of the node.
            guard !Task.isCancelled, !(error is CancellationError) else { return nil }
            self.state.withLock { $0.machine.nodeUnreachable(node) }
            self.logger.debug(
                "Redis Cluster node did not give the slot map",
                metadata: ["redis.address": "\(node)", "redis.error": "\(error)"]
            )
            return nil
        }
    }

    /// The primary the slot map names for `slot` (nil without a map).
    func primary(forSlot slot: Int) -> RedisNodeAddress? {
        self.state.withLock { $0.machine.map?.primary(forSlot: slot) }
    }

    /// The primaries in shard order (rediscovering first when no map is known yet).
    func primaries(deadline: NIODeadline) async throws -> [RedisNodeAddress] {
        if let primaries = self.state.withLock({ $0.machine.map?.primaries }), !primaries.isEmpty {
            return primaries
        }
        try await self.rediscover(deadline: deadline)
        return self.state.withLock { $0.machine.map?.primaries ?? [] }
    }

    /// The shards of the slot map, in the order of their lowest slot (rediscovering first when no map is known yet).
    func shards(deadline: NIODeadline) async throws -> [RedisHashSlotMap.Shard] {
        if let shards = self.state.withLock({ $0.machine.map?.shards }), !shards.isEmpty {
            return shards
        }
        try await self.rediscover(deadline: deadline)
        return self.state.withLock { $0.machine.map?.shards ?? [] }
    }

    /// Whether the slot map is known to be out of date (a node failed, a slot moved) and is due to be
    /// asked for again.
    var isMapStale: Bool {
        self.state.withLock { $0.machine.isStale }
    }

    /// How many callers wait for the slot-map refresh under way, besides the one that started it.
    var callersWaitingForRediscovery: Int {
        self.state.withLock { $0.rediscoveryWaiters }
    }

    /// Whether the slot map assigns every hash slot to a primary (false without a map).
    var coversAllSlots: Bool {
        self.state.withLock { $0.machine.map?.coversAllSlots ?? false }
    }

    /// Sends a keyless command (`SCAN`, `PING`) to one given primary. A node that cannot be reached or
    /// does not answer in time counts as failed (the map is stale, the node asked for it last).
    func send(_ command: [String], to node: RedisNodeAddress, deadline: NIODeadline) async throws -> RedisValue {
        do {
            let reply = try await self.send([command], [Item(index: 0, asking: false)], to: node, deadline: deadline)[0]
            self.state.withLock { $0.machine.nodeAnswered(node) }
            return reply
        } catch let notSent as NotSent {
            self.state.withLock { $0.machine.nodeUnreachable(node) }
            throw notSent.error
        } catch let error as RedisError where error.isConnectionFailure || error == .timeout {
            self.state.withLock { $0.machine.nodeUnreachable(node) }
            throw error
        }
    }

    /// A connection to some node for a subscription: the known primaries first, then the other known nodes
    /// and the seeds. In Redis Cluster a `PUBLISH` reaches the subscribers on every node.
    func connectSubscriber(
        on eventLoop: any EventLoop,
        pushHandler: @escaping @Sendable (RedisPubSubEvent) -> Void
    ) async throws -> RedisConnection {
        let candidates = self.state.withLock { $0.machine.candidates }
        for node in candidates {
            try Task.checkCancellation()
            if let connection = try? await self.connector.connect(to: node, on: eventLoop, pushHandler: pushHandler) {
                return connection
            }
            self.state.withLock { $0.machine.nodeUnreachable(node) }
        }
        try? await self.rediscover(deadline: .now() + TimeAmount(self.configuration.connectTimeout))
        throw RedisError.unavailable
    }

    /// Closes every pool; later commands fail with ``RedisError/unavailable``.
    func shutDown() async {
        let pools = self.state.withLock { state in
            state.isShutDown = true
            defer {
                state.pools.removeAll()
                state.retiring.removeAll()
            }
            return Array(state.pools.values) + Array(state.retiring.values)
        }
        for pool in pools {
            await pool.shutDown()
        }
    }
}

extension RedisValue {
    var errorMessage: String? {
        if case .error(let message) = self {
            return message
        }
        return nil
    }
}
