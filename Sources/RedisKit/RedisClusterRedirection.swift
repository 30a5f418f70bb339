/// A Redis Cluster redirection reply, parsed: `-MOVED <slot> <host>:<port>` (the slot lives elsewhere now;
/// refresh the slot map) or `-ASK <slot> <host>:<port>` (the slot is migrating; send this one command there,
/// preceded by `ASKING`, and keep the map).
public enum RedisClusterRedirection: Sendable, Hashable {
    case moved(slot: Int, to: RedisNodeAddress)
    case ask(slot: Int, to: RedisNodeAddress)

    /// Parses an error reply's text; `nil` when it is not a well-formed redirection.
    public init?(errorMessage: String) {
        let fields = errorMessage.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count == 3, let slot = Int(fields[1]), (0..<RedisHashSlot.count).contains(slot),
            let address = RedisNodeAddress(hostPort: fields[2])
        else {
            return nil
        }
        switch fields[0] {
        case "MOVED": self = .moved(slot: slot, to: address)
        case "ASK": self = .ask(slot: slot, to: address)
        default: return nil
        }
    }

    /// The node to send the redirected command to.
    public var target: RedisNodeAddress {
        switch self {
        case .moved(_, let target), .ask(_, let target): target
        }
    }
}

extension RedisNodeAddress {
    /// Parses `host:port` as cluster replies write it (an IPv6 host unbracketed: the port follows the last
    /// colon); `nil` for an empty host or a bad port.
    init?(hostPort: Substring) {
        guard let colon = hostPort.lastIndex(of: ":") else {
            return nil
        }
        var host = hostPort[..<colon]
        if host.first == "[", host.last == "]" {
            host = host.dropFirst().dropLast()
        }
        guard !host.isEmpty, host != "?", let port = Int(hostPort[hostPort.index(after: colon)...]),
            (1...65535).contains(port)
        else {
            return nil
        }
        self.init(host: String(host), port: port)
    }
}
