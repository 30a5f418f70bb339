/// Which primary serves each of the 16384 hash slots of a Redis Cluster, as one node reported it.
///
/// A value: the client keeps the current one and replaces it on rediscovery. Replicas are known (as further
/// places to ask for the topology) but never routed to.
public struct RedisHashSlotMap: Sendable, Hashable {
    /// One shard: a primary, its replicas, and the slots it serves.
    public struct Shard: Sendable, Hashable {
        public var primary: RedisNodeAddress
        public var replicas: [RedisNodeAddress]
        public var slots: [ClosedRange<Int>]

        public init(primary: RedisNodeAddress, replicas: [RedisNodeAddress] = [], slots: [ClosedRange<Int>]) {
            self.primary = primary
            self.replicas = replicas
            self.slots = slots
        }

        /// The lowest slot this shard serves: what orders the shards, and names one across failovers.
        public var lowestSlot: Int {
            self.slots.map(\.lowerBound).min() ?? 0
        }
    }

    /// The shards, ordered by their lowest slot (a stable order across failovers, used by the cluster-wide
    /// `SCAN` cursor).
    public private(set) var shards: [Shard]
    /// Slot → index into `shards`, or -1 when no shard serves the slot.
    private var owners: [Int16]

    /// - Precondition: slot ranges lie within 0…16383.
    public init(shards: [Shard]) {
        let shards = shards.filter { !$0.slots.isEmpty }.sorted { $0.lowestSlot < $1.lowestSlot }
        var owners = [Int16](repeating: -1, count: RedisHashSlot.count)
        for (index, shard) in shards.enumerated() {
            for range in shard.slots {
                for slot in range.clamped(to: 0...(RedisHashSlot.count - 1)) {
                    owners[slot] = Int16(index)
                }
            }
        }
        self.shards = shards
        self.owners = owners
    }

    /// The primary serving `slot`, if any.
    public func primary(forSlot slot: Int) -> RedisNodeAddress? {
        guard (0..<RedisHashSlot.count).contains(slot) else {
            return nil
        }
        let owner = Int(self.owners[slot])
        return owner >= 0 ? self.shards[owner].primary : nil
    }

    /// Every primary, in shard order.
    public var primaries: [RedisNodeAddress] {
        self.shards.map(\.primary)
    }

    /// `true` when every slot has a primary.
    public var coversAllSlots: Bool {
        !self.owners.contains(-1)
    }

    /// How many slots have a primary.
    public var coveredSlotCount: Int {
        self.owners.count(where: { $0 >= 0 })
    }

    /// Records what a `MOVED` reply said: `slot` is now served by `primary` (until the next full map).
    /// The shards' slot ranges follow, and they stay in the order of their lowest slot (a shard
    /// whose lowest slot moved away is named by another one now, so a cluster-wide `SCAN` walking it
    /// reports ``RedisError/topologyChanged`` instead of skipping a shard).
    public mutating func assign(slot: Int, to primary: RedisNodeAddress) {
        guard (0..<RedisHashSlot.count).contains(slot) else {
            return
        }
        var shards = self.shards
        let owner = Int(self.owners[slot])
        if owner >= 0 {
            if shards[owner].primary == primary { return }
            shards[owner].slots = Self.removing(slot, from: shards[owner].slots)
        }
        if let index = shards.firstIndex(where: { $0.primary == primary }) {
            shards[index].slots.append(slot...slot)
        } else {
            shards.append(Shard(primary: primary, slots: [slot...slot]))
        }
        self = RedisHashSlotMap(shards: shards)
    }

    /// `ranges` without `slot` (a range holding it is split in two).
    static func removing(_ slot: Int, from ranges: [ClosedRange<Int>]) -> [ClosedRange<Int>] {
        ranges.flatMap { range -> [ClosedRange<Int>] in
            guard range.contains(slot) else { return [range] }
            var parts: [ClosedRange<Int>] = []
            if range.lowerBound < slot { parts.append(range.lowerBound...(slot - 1)) }
            if slot < range.upperBound { parts.append((slot + 1)...range.upperBound) }
            return parts
        }
    }
}

extension RedisHashSlotMap {
    /// Parses a `CLUSTER SHARDS` reply (Redis 7): per shard its `slots` (start/end pairs) and `nodes`; the node
    /// whose `role` is `master` is the primary. After a failover the failed former primary may still be listed
    /// as `master` (with `health` `fail`): a healthy one is taken, `online` before `loading`, and a shard whose
    /// only primary failed has none. With `tls`, a node's `tls-port` is used when it reports one.
    ///
    /// - Throws: ``RedisError/protocolError`` when the reply does not have that shape.
    public static func fromClusterShards(_ reply: RedisValue, tls: Bool) throws(RedisError) -> RedisHashSlotMap {
        guard let shardReplies = reply.array else {
            throw RedisError.protocolError
        }
        var shards: [Shard] = []
        for shardReply in shardReplies {
            let fields = try Self.fields(shardReply)
            guard let slotValues = fields["slots"]?.array, let nodes = fields["nodes"]?.array,
                slotValues.count % 2 == 0
            else {
                throw RedisError.protocolError
            }
            var slots: [ClosedRange<Int>] = []
            var index = 0
            while index < slotValues.count {
                guard let low = Self.integer(slotValues[index]), let high = Self.integer(slotValues[index + 1]),
                    low <= high
                else {
                    throw RedisError.protocolError
                }
                slots.append(low...high)
                index += 2
            }
            var primary: (address: RedisNodeAddress, online: Bool)?
            var replicas: [RedisNodeAddress] = []
            for node in nodes {
                let nodeFields = try Self.fields(node)
                guard let address = Self.address(nodeFields, tls: tls) else {
                    continue
                }
                let health = nodeFields["health"]?.string
                if nodeFields["role"]?.string == "master" {
                    let online = health == nil || health == "online"
                    if health != "fail", primary == nil || (online && primary?.online == false) {
                        primary = (address, online)
                    }
                } else if health != "fail" {
                    replicas.append(address)
                }
            }
            if let primary = primary?.address, !slots.isEmpty {
                shards.append(Shard(primary: primary, replicas: replicas, slots: slots))
            }
        }
        return RedisHashSlotMap(shards: shards)
    }

    /// Parses a `CLUSTER SLOTS` reply: `[start, end, [host, port, id, …], [replica…]…]` per range.
    ///
    /// - Throws: ``RedisError/protocolError`` when the reply does not have that shape.
    public static func fromClusterSlots(_ reply: RedisValue) throws(RedisError) -> RedisHashSlotMap {
        guard let ranges = reply.array else {
            throw RedisError.protocolError
        }
        var shards: [RedisNodeAddress: Shard] = [:]
        for range in ranges {
            guard let parts = range.array, parts.count >= 3, let low = Self.integer(parts[0]),
                let high = Self.integer(parts[1]), low <= high
            else {
                throw RedisError.protocolError
            }
            let nodes = parts[2...].compactMap { node -> RedisNodeAddress? in
                guard let fields = node.array, fields.count >= 2, let host = fields[0].string, !host.isEmpty,
                    let port = Self.integer(fields[1]), (1...65535).contains(port)
                else {
                    return nil
                }
                return RedisNodeAddress(host: host, port: port)
            }
            guard let primary = nodes.first else {
                throw RedisError.protocolError
            }
            shards[primary, default: Shard(primary: primary, replicas: Array(nodes.dropFirst()), slots: [])]
                .slots.append(low...high)
        }
        return RedisHashSlotMap(shards: Array(shards.values))
    }

    private static func fields(_ reply: RedisValue) throws(RedisError) -> [String: RedisValue] {
        guard let items = reply.array, items.count % 2 == 0 else {
            throw RedisError.protocolError
        }
        var fields: [String: RedisValue] = [:]
        var index = 0
        while index < items.count {
            if let name = items[index].string {
                fields[name] = items[index + 1]
            }
            index += 2
        }
        return fields
    }

    private static func address(_ fields: [String: RedisValue], tls: Bool) -> RedisNodeAddress? {
        let port = (tls ? fields["tls-port"].flatMap(Self.integer) : nil) ?? fields["port"].flatMap(Self.integer)
        let endpoint = fields["endpoint"]?.string
        let host = endpoint.flatMap { $0.isEmpty || $0 == "?" ? nil : $0 } ?? fields["ip"]?.string
        guard let host, !host.isEmpty, let port, (1...65535).contains(port) else {
            return nil
        }
        return RedisNodeAddress(host: host, port: port)
    }

    private static func integer(_ value: RedisValue) -> Int? {
        if let number = value.int {
            return Int(exactly: number)
        }
        return value.string.flatMap { Int($0) }
    }
}
