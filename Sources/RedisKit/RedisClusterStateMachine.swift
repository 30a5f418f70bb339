import NIOCore

/// The decisions of a Redis Cluster client: which node a command goes to, what a reply means for the slot map,
/// and when (and where) to rediscover the topology.
///
/// Pure: no I/O and no clock — `now` comes in as a value, every decision comes out as a value, and the owner does
/// the talking. Commands go to primaries only; replicas are merely asked for the topology.
struct RedisClusterStateMachine: Sendable {
    /// Where a command goes.
    enum Route: Hashable {
        case node(RedisNodeAddress)
        /// No slot map yet, or nobody serves the slot: rediscover first.
        case discover
    }

    /// What to do about a reply.
    enum ReplyAction: Hashable {
        /// The reply is the command's answer (an ordinary error reply included).
        case done
        /// Send the command again to `node` (after `MOVED`), preceded by `ASKING` when `asking` (after `ASK`).
        case redirect(to: RedisNodeAddress, asking: Bool)
        /// The command was not executed (`CLUSTERDOWN`, `TRYAGAIN`, `READONLY`, `LOADING`: failover or
        /// resharding in progress): rediscover, wait a moment, send it again.
        case retryAfterRediscovery
    }

    /// What to do when a slot map is wanted.
    enum Rediscovery: Hashable {
        /// Ask these nodes, in order, for the topology; report with ``rediscoverySucceeded(_:)`` or
        /// ``rediscoveryFailed()``.
        case start(askingInOrder: [RedisNodeAddress])
        /// Another rediscovery is running: wait for it.
        case join
        /// The last one started too recently; the current map stands until `until`.
        case wait(until: NIODeadline)
    }

    let seeds: [RedisNodeAddress]
    let minimumRediscoveryInterval: TimeAmount
    private(set) var map: RedisHashSlotMap?
    /// Something suggested the map is outdated (a redirection, a node that did not answer, a cluster error).
    private(set) var isStale = true
    private(set) var isRediscovering = false
    private var lastRediscoveryStart: NIODeadline?
    /// Nodes that failed (no connection, no answer) since they last answered: asked for the topology
    /// last, so a hung former primary does not hold up finding its successor.
    private(set) var unreachable: Set<RedisNodeAddress> = []

    /// - Parameters:
    ///   - seeds: the nodes named in the configuration; asked when the known nodes do not answer.
    ///   - minimumRediscoveryInterval: rediscoveries start at most this often (a failover makes every command
    ///     fail at once; one topology query serves them all).
    init(seeds: [RedisNodeAddress], minimumRediscoveryInterval: TimeAmount = .milliseconds(200)) {
        self.seeds = seeds
        self.minimumRediscoveryInterval = minimumRediscoveryInterval
    }

    /// The primary for a command touching `slot`; a command without keys (`slot` nil) goes to the first primary.
    func route(slot: Int?) -> Route {
        guard let map = self.map else {
            return .discover
        }
        let node = slot.map { map.primary(forSlot: $0) } ?? map.primaries.first
        return node.map(Route.node) ?? .discover
    }

    /// Interprets a reply from a node (`node`: the one that sent it, for a redirection that names
    /// no host).
    mutating func replyReceived(_ reply: RedisValue, from node: RedisNodeAddress? = nil) -> ReplyAction {
        guard case .error(let message) = reply else {
            return .done
        }
        if let redirection = RedisClusterRedirection(errorMessage: message, replier: node) {
            switch redirection {
            case .moved(let slot, let target):
                // Use the new owner at once; the whole map is probably outdated too (failover, resharding).
                self.map?.assign(slot: slot, to: target)
                self.isStale = true
                return .redirect(to: target, asking: false)
            case .ask(_, let target):
                return .redirect(to: target, asking: true)
            }
        }
        let prefix = message.prefix(while: { $0 != " " })
        switch prefix {
        case "CLUSTERDOWN", "TRYAGAIN", "READONLY", "LOADING", "MASTERDOWN":
            self.isStale = true
            return .retryAfterRediscovery
        default:
            return .done
        }
    }

    /// Whether the map should be asked for again in the background now: something made it stale (a
    /// `MOVED` above all: after a failover or a resharding every slot that moved would otherwise cost a
    /// redirection of its own), no rediscovery is running, and the last one started long enough ago.
    func backgroundRediscoveryDue(now: NIODeadline) -> Bool {
        guard self.isStale, !self.isRediscovering else {
            return false
        }
        guard let last = self.lastRediscoveryStart else {
            return true
        }
        return now >= last + self.minimumRediscoveryInterval
    }

    /// A node could not be reached (connect failed, the connection was lost, or it did not answer in time).
    mutating func nodeUnreachable(_ node: RedisNodeAddress) {
        self.isStale = true
        self.unreachable.insert(node)
    }

    /// A node answered: it is asked in its usual place again.
    mutating func nodeAnswered(_ node: RedisNodeAddress) {
        if !self.unreachable.isEmpty {
            self.unreachable.remove(node)
        }
    }

    /// A slot map is wanted (none yet, or it is stale).
    mutating func rediscoveryRequested(now: NIODeadline) -> Rediscovery {
        if self.isRediscovering {
            return .join
        }
        if let last = self.lastRediscoveryStart, now < last + self.minimumRediscoveryInterval {
            return .wait(until: last + self.minimumRediscoveryInterval)
        }
        self.isRediscovering = true
        self.lastRediscoveryStart = now
        return .start(askingInOrder: self.candidates)
    }

    /// A node answered with `map`. Returns the former primaries that no longer are (their pools can go).
    mutating func rediscoverySucceeded(_ map: RedisHashSlotMap) -> [RedisNodeAddress] {
        let previous = Set(self.map?.primaries ?? [])
        self.map = map
        self.isRediscovering = false
        // Only nodes still known are remembered (the set stays as small as the cluster).
        let known = Set(map.primaries + map.shards.flatMap(\.replicas) + self.seeds)
        self.unreachable.formIntersection(known)
        // A map that leaves slots unserved (a primary failed, no replica promoted yet) stays open to question.
        self.isStale = !map.coversAllSlots
        return previous.subtracting(map.primaries).sorted { $0.description < $1.description }
    }

    /// No node answered.
    mutating func rediscoveryFailed() {
        self.isRediscovering = false
        self.isStale = true
    }

    /// Where to ask for the topology: the known primaries, then their replicas, then the configured seeds;
    /// each once, and the nodes that failed since they last answered after all the others.
    var candidates: [RedisNodeAddress] {
        var seen: Set<RedisNodeAddress> = []
        var result: [RedisNodeAddress] = []
        var failed: [RedisNodeAddress] = []
        let known = (self.map?.primaries ?? []) + (self.map?.shards.flatMap(\.replicas) ?? [])
        for node in known + self.seeds where seen.insert(node).inserted {
            if self.unreachable.contains(node) {
                failed.append(node)
            } else {
                result.append(node)
            }
        }
        return result + failed
    }
}
