import Crypto
import NIOCore
import Testing

@testable import FlowEngine
@testable import RedisKit
@testable import TokenGateway

@Suite struct RedisHashSlotTests {
    @Test func slotsMatchRedisClusterKeySlot() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        #expect(RedisHashSlot.slot(of: "foo") == 12182)
        #expect(RedisHashSlot.slot(of: "bar") == 5061)
        #expect(RedisHashSlot.slot(of: "123456789") == 12739)
        #expect(RedisHashSlot.slot(of: "{user1000}.following") == RedisHashSlot.slot(of: "{user1000}.followers"))
        #expect(RedisHashSlot.slot(of: "foo{}{bar}") == RedisHashSlot.slot(of: "foo{}{bar}"))
        #expect(RedisHashSlot.slot(of: "foo{{bar}}zap") == RedisHashSlot.slot(of: "{bar"))
    }

    @Test func routingKeysOfCommands() {
        #expect(RedisHashSlot.routingKey(of: ["GET", "a"]) == "a")
        #expect(RedisHashSlot.routingKey(of: ["hmget", "b", "f"]) == "b")
        #expect(RedisHashSlot.routingKey(of: ["EVALSHA", "sha", "2", "k1", "k2", "arg"]) == "k1")
        #expect(RedisHashSlot.routingKey(of: ["EVAL", "return 1", "0", "arg"]) == nil)
        #expect(RedisHashSlot.routingKey(of: ["PING"]) == nil)
        #expect(RedisHashSlot.routingKey(of: ["SCAN", "0"]) == nil)
        #expect(RedisHashSlot.routingKey(of: ["PUBLISH", "channel", "message"]) == nil)
    }

    /// Every key the store writes for one installation lies in one slot, so its scripts and pipelines run on one
    /// node of a cluster and stay atomic there.
    @Test func everyKeyOfAnInstallationSharesOneSlot() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(size: .bits256))])
        let store = GatewayStore(
            redis: RedisClient(
                configuration: RedisConfiguration(endpoint: .direct(host: "127.0.0.1", port: 1)),
                logger: .init(label: "test")),
            box: ring)
        let users = RedisUserTokenStore(installations: store)
        for raw in [
            "ari:cloud:ecosystem::installation/8f4c7a1e-0000-4000-8000-000000000001",
            "ari:cloud:ecosystem::installation/00000000-1111-4222-8333-444444444444",
        ] {
            let id = try #require(InstallationID(raw))
            let keys = [
                store.installationKey(id), store.systemTokenKey(id), store.signingKeysKey(id), store.leaseKey(id),
                store.pendingKey(id, requestID: "r1"), store.userKeysIndexKey(id), store.legacyUserTokenIndexKey(id),
                store.breakerKey(id),
                users.tokenKey(id, accountId: "557058:abc"), users.deniedKey(id, accountId: "557058:abc"),
                users.leaseKey(id, accountId: "557058:abc"),
            ]
            let slots = Set(keys.map { RedisHashSlot.slot(of: $0) })
            #expect(slots.count == 1, "\(keys)")
            #expect(slots.first == RedisHashSlot.slot(of: id.ari))
        }
    }
}

@Suite struct RedisClusterRedirectionTests {
    @Test func parsesMovedAndAsk() {
        #expect(
            RedisClusterRedirection(errorMessage: "MOVED 3999 127.0.0.1:6381")
                == .moved(slot: 3999, to: RedisNodeAddress(host: "127.0.0.1", port: 6381)))
        #expect(
            RedisClusterRedirection(errorMessage: "ASK 12 ::1:7002")
                == .ask(slot: 12, to: RedisNodeAddress(host: "::1", port: 7002)))
        #expect(RedisClusterRedirection(errorMessage: "MOVED 99999 h:1") == nil)
        #expect(RedisClusterRedirection(errorMessage: "MOVED 1 h:port") == nil)
        #expect(RedisClusterRedirection(errorMessage: "ERR MOVED 1 h:1") == nil)
        #expect(RedisClusterRedirection(errorMessage: "MOVED 1 :6379") == nil)
        // No host: the replier's host, this port (a node with cluster-preferred-endpoint-type unknown-endpoint).
        let replier = RedisNodeAddress(host: "10.0.0.7", port: 6379)
        #expect(
            RedisClusterRedirection(errorMessage: "MOVED 1 :6380", replier: replier)
                == .moved(slot: 1, to: RedisNodeAddress(host: "10.0.0.7", port: 6380)))
        #expect(
            RedisClusterRedirection(errorMessage: "ASK 2 :6381", replier: replier)
                == .ask(slot: 2, to: RedisNodeAddress(host: "10.0.0.7", port: 6381)))
        #expect(RedisClusterRedirection(errorMessage: "MOVED 1 :0", replier: replier) == nil)
        #expect(RedisClusterRedirection(errorMessage: "MOVED 1 :port", replier: replier) == nil)
    }
}

@Suite struct RedisHashSlotMapTests {
    static let a = RedisNodeAddress(host: "10.0.0.1", port: 7000)
    static let b = RedisNodeAddress(host: "10.0.0.2", port: 7001)
    static let r = RedisNodeAddress(host: "10.0.0.3", port: 7002)

    static func node(
        _ address: RedisNodeAddress, role: String, tlsPort: Int? = nil, health: String = "online"
    ) -> RedisValue {
        var fields: [RedisValue] = [
            .bulk(Array("id".utf8)), .bulk(Array("abc".utf8)),
            .bulk(Array("port".utf8)), .integer(Int64(address.port)),
            .bulk(Array("ip".utf8)), .bulk(Array(address.host.utf8)),
            .bulk(Array("endpoint".utf8)), .bulk(Array(address.host.utf8)),
            .bulk(Array("role".utf8)), .bulk(Array(role.utf8)),
            .bulk(Array("health".utf8)), .bulk(Array(health.utf8)),
        ]
        if let tlsPort {
            fields += [.bulk(Array("tls-port".utf8)), .integer(Int64(tlsPort))]
        }
        return .array(fields)
    }

    static func shard(_ slots: [Int64], _ nodes: [RedisValue]) -> RedisValue {
        .array([
            .bulk(Array("slots".utf8)), .array(slots.map(RedisValue.integer)),
            .bulk(Array("nodes".utf8)), .array(nodes),
        ])
    }

    @Test func parsesClusterShards() throws {
        let reply = RedisValue.array([
            Self.shard([8192, 16383], [Self.node(Self.r, role: "replica"), Self.node(Self.b, role: "master")]),
            Self.shard([0, 100, 101, 8191], [Self.node(Self.a, role: "master", tlsPort: 7443)]),
        ])
        let map = try RedisHashSlotMap.fromClusterShards(reply, tls: false)
        #expect(map.primaries == [Self.a, Self.b])
        #expect(map.shards[1].replicas == [Self.r])
        #expect(map.coversAllSlots)
        #expect(map.primary(forSlot: 0) == Self.a)
        #expect(map.primary(forSlot: 8191) == Self.a)
        #expect(map.primary(forSlot: 8192) == Self.b)
        #expect(map.primary(forSlot: 16383) == Self.b)
        let tls = try RedisHashSlotMap.fromClusterShards(reply, tls: true)
        #expect(tls.primaries.first == RedisNodeAddress(host: "10.0.0.1", port: 7443))
        #expect(throws: RedisError.protocolError) { try RedisHashSlotMap.fromClusterShards(.integer(1), tls: false) }
    }

    @Test("after a failover the failed former primary, still listed as master, is not taken (either order)")
    func failedPrimaryIsSkipped() throws {
        let failed = Self.node(Self.a, role: "master", health: "fail")
        let promoted = Self.node(Self.r, role: "master")
        for nodes in [[failed, promoted], [promoted, failed]] {
            let reply = RedisValue.array([
                Self.shard([0, 8191], nodes), Self.shard([8192, 16383], [Self.node(Self.b, role: "master")]),
            ])
            let map = try RedisHashSlotMap.fromClusterShards(reply, tls: false)
            #expect(map.primary(forSlot: 0) == Self.r)
            #expect(map.shards[0].replicas.isEmpty)
            #expect(map.coversAllSlots)
        }
        // A loading primary is taken only when no online one is listed.
        let loading = Self.node(Self.a, role: "master", health: "loading")
        let reply = RedisValue.array([Self.shard([0, 16383], [loading, promoted])])
        #expect(try RedisHashSlotMap.fromClusterShards(reply, tls: false).primary(forSlot: 0) == Self.r)
        let alone = RedisValue.array([Self.shard([0, 16383], [loading])])
        #expect(try RedisHashSlotMap.fromClusterShards(alone, tls: false).primary(forSlot: 0) == Self.a)
        // A shard reported with no slots (some Redis 7 releases, after a failover) leaves its slots uncovered:
        // the router then asks CLUSTER SLOTS.
        let emptied = RedisValue.array([
            Self.shard([], [promoted]), Self.shard([8192, 16383], [Self.node(Self.b, role: "master")]),
        ])
        let partial = try RedisHashSlotMap.fromClusterShards(emptied, tls: false)
        #expect(!partial.coversAllSlots)
        #expect(partial.coveredSlotCount == 8192)
    }

    @Test func parsesClusterSlots() throws {
        func node(_ address: RedisNodeAddress) -> RedisValue {
            .array([.bulk(Array(address.host.utf8)), .integer(Int64(address.port)), .bulk(Array("id".utf8))])
        }
        let reply = RedisValue.array([
            .array([.integer(0), .integer(5460), node(Self.a), node(Self.r)]),
            .array([.integer(5461), .integer(16383), node(Self.b)]),
        ])
        let map = try RedisHashSlotMap.fromClusterSlots(reply)
        #expect(map.primaries == [Self.a, Self.b])
        #expect(map.primary(forSlot: 5460) == Self.a)
        #expect(map.primary(forSlot: 5461) == Self.b)
        #expect(map.coversAllSlots)
    }
}

@Suite struct RedisClusterStateMachineTests {
    typealias Machine = RedisClusterStateMachine
    static let seed = RedisNodeAddress(host: "127.0.0.1", port: 7000)
    static let a = RedisNodeAddress(host: "127.0.0.1", port: 7001)
    static let b = RedisNodeAddress(host: "127.0.0.1", port: 7002)
    static let replicaOfA = RedisNodeAddress(host: "127.0.0.1", port: 7003)
    static let now = NIODeadline.uptimeNanoseconds(1_000_000_000)

    static var map: RedisHashSlotMap {
        RedisHashSlotMap(shards: [
            .init(primary: Self.a, replicas: [Self.replicaOfA], slots: [0...8191]),
            .init(primary: Self.b, slots: [8192...16383]),
        ])
    }

    static func known() -> Machine {
        var machine = Machine(seeds: [Self.seed], minimumRediscoveryInterval: .milliseconds(200))
        _ = machine.rediscoveryRequested(now: Self.now)
        _ = machine.rediscoverySucceeded(Self.map)
        return machine
    }

    @Test func discoversFirstThenRoutesBySlotToPrimariesOnly() {
        var machine = Machine(seeds: [Self.seed])
        #expect(machine.route(slot: 5) == .discover)
        #expect(machine.rediscoveryRequested(now: Self.now) == .start(askingInOrder: [Self.seed]))
        #expect(machine.rediscoveryRequested(now: Self.now) == .join)
        #expect(machine.rediscoverySucceeded(Self.map) == [])
        #expect(!machine.isStale)
        #expect(machine.route(slot: 5) == .node(Self.a))
        #expect(machine.route(slot: 9000) == .node(Self.b))
        #expect(machine.route(slot: nil) == .node(Self.a))
        #expect(machine.candidates == [Self.a, Self.b, Self.replicaOfA, Self.seed])
    }

    @Test func movedRoutesTheSlotToItsNewOwnerAndAsksForRediscovery() {
        var machine = Self.known()
        let action = machine.replyReceived(.error("MOVED 5 127.0.0.1:7002"))
        #expect(action == .redirect(to: Self.b, asking: false))
        #expect(machine.route(slot: 5) == .node(Self.b))
        #expect(machine.route(slot: 6) == .node(Self.a))
        #expect(machine.isStale)
    }

    @Test("a MOVED slot leaves its old shard's ranges; the shards stay in the order of their lowest slot")
    func movedSlotsKeepTheShardOrder() {
        let (a, b, c, d) = (
            RedisNodeAddress(host: "10.0.0.1", port: 6379), RedisNodeAddress(host: "10.0.0.2", port: 6379),
            RedisNodeAddress(host: "10.0.0.3", port: 6379), RedisNodeAddress(host: "10.0.0.4", port: 6379)
        )
        var map = RedisHashSlotMap(shards: [
            .init(primary: a, slots: [0...5460]), .init(primary: b, slots: [5461...10922]),
            .init(primary: c, slots: [10923...16383]),
        ])
        // A new node takes slot 100: it is walked between a and b, not after c.
        map.assign(slot: 100, to: d)
        #expect(map.shards.map(\.primary) == [a, d, b, c])
        #expect(map.shards.map(\.lowestSlot) == [0, 100, 5461, 10923])
        #expect(map.primary(forSlot: 99) == a && map.primary(forSlot: 100) == d && map.primary(forSlot: 101) == a)
        #expect(map.shards[0].slots == [0...99, 101...5460])
        // b's lowest slot moves to a: b is now named by its next slot.
        map.assign(slot: 5461, to: a)
        #expect(map.shards.map(\.lowestSlot) == [0, 100, 5462, 10923])
        #expect(map.primary(forSlot: 5461) == a)
        #expect(map.coversAllSlots)
        // A shard whose every slot moved away is gone; c, now serving slot 100, is walked second.
        map.assign(slot: 100, to: c)
        #expect(map.shards.map(\.primary) == [a, c, b])
        #expect(map.coveredSlotCount == RedisHashSlot.count)
    }

    @Test("after a MOVED the whole map is due for a background refresh, once per minimum interval")
    func movedMakesABackgroundRediscoveryDue() {
        var machine = Self.known()
        #expect(!machine.backgroundRediscoveryDue(now: Self.now + .milliseconds(300)))
        _ = machine.replyReceived(.error("MOVED 5 127.0.0.1:7002"))
        // Too soon after the last rediscovery (at `now`): not yet.
        #expect(!machine.backgroundRediscoveryDue(now: Self.now + .milliseconds(100)))
        #expect(machine.backgroundRediscoveryDue(now: Self.now + .milliseconds(200)))
        #expect(machine.rediscoveryRequested(now: Self.now + .milliseconds(200)) != .join)
        // One is running: not another.
        #expect(!machine.backgroundRediscoveryDue(now: Self.now + .milliseconds(500)))
        _ = machine.rediscoverySucceeded(Self.map)
        #expect(!machine.backgroundRediscoveryDue(now: Self.now + .seconds(5)))
        // An ASK moves nothing for good.
        _ = machine.replyReceived(.error("ASK 5 127.0.0.1:7002"))
        #expect(!machine.backgroundRediscoveryDue(now: Self.now + .seconds(5)))
    }

    @Test func askRedirectsOnceAndKeepsTheMap() {
        var machine = Self.known()
        #expect(machine.replyReceived(.error("ASK 5 127.0.0.1:7002")) == .redirect(to: Self.b, asking: true))
        #expect(machine.route(slot: 5) == .node(Self.a))
        #expect(!machine.isStale)
    }

    @Test func failoverErrorsRetryAfterRediscoveryOtherErrorsAreAnswers() {
        var machine = Self.known()
        #expect(machine.replyReceived(.error("ERR wrong number of arguments")) == .done)
        #expect(machine.replyReceived(.status("OK")) == .done)
        #expect(!machine.isStale)
        for message in ["CLUSTERDOWN The cluster is down", "TRYAGAIN Multiple keys", "READONLY You can't write"] {
            var copy = machine
            #expect(copy.replyReceived(.error(message)) == .retryAfterRediscovery)
            #expect(copy.isStale)
        }
        machine.nodeUnreachable(Self.a)
        #expect(machine.isStale)
    }

    @Test func rediscoveryIsRateLimitedAndReplacesPrimaries() {
        var machine = Self.known()
        #expect(
            machine.rediscoveryRequested(now: Self.now + .milliseconds(50))
                == .wait(until: Self.now + .milliseconds(200)))
        let start = machine.rediscoveryRequested(now: Self.now + .milliseconds(200))
        #expect(start == .start(askingInOrder: [Self.a, Self.b, Self.replicaOfA, Self.seed]))
        // The replica of a was promoted.
        let promoted = RedisHashSlotMap(shards: [
            .init(primary: Self.replicaOfA, slots: [0...8191]), .init(primary: Self.b, slots: [8192...16383]),
        ])
        #expect(machine.rediscoverySucceeded(promoted) == [Self.a])
        #expect(machine.route(slot: 5) == .node(Self.replicaOfA))
        #expect(!machine.isRediscovering)
    }

    @Test(
        "a node that failed is asked for the slot map after every other, until it answers again; only nodes still known are remembered"
    )
    func aFailedNodeIsAskedLast() {
        var machine = Self.known()
        machine.nodeUnreachable(Self.a)
        #expect(machine.isStale)
        #expect(machine.candidates == [Self.b, Self.replicaOfA, Self.seed, Self.a])
        machine.nodeAnswered(Self.a)
        #expect(machine.candidates == [Self.a, Self.b, Self.replicaOfA, Self.seed])
        // a fails over to its replica and leaves the cluster: it is forgotten with the map that drops it.
        machine.nodeUnreachable(Self.a)
        _ = machine.rediscoveryRequested(now: Self.now + .milliseconds(200))
        let promoted = RedisHashSlotMap(shards: [
            .init(primary: Self.replicaOfA, slots: [0...8191]), .init(primary: Self.b, slots: [8192...16383]),
        ])
        _ = machine.rediscoverySucceeded(promoted)
        #expect(machine.unreachable.isEmpty)
        #expect(machine.candidates == [Self.replicaOfA, Self.b, Self.seed])
    }

    @Test func anIncompleteMapStaysStaleAndAFailedRediscoveryCanBeRetried() {
        var machine = Machine(seeds: [Self.seed])
        _ = machine.rediscoveryRequested(now: Self.now)
        machine.rediscoveryFailed()
        #expect(machine.isStale)
        #expect(!machine.isRediscovering)
        #expect(machine.route(slot: 1) == .discover)
        guard case .start = machine.rediscoveryRequested(now: Self.now + .milliseconds(200)) else {
            Issue.record("expected a new rediscovery")
            return
        }
        _ = machine.rediscoverySucceeded(RedisHashSlotMap(shards: [.init(primary: Self.a, slots: [0...100])]))
        #expect(machine.isStale)
        #expect(machine.route(slot: 101) == .discover)
    }
}
