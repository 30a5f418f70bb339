/// A Redis Cluster redirection reply, parsed: `-MOVED <slot> <host>:<port>` (the slot lives elsewhere now;
/// refresh the slot map) or `-ASK <slot> <host>:<port>` (the slot is migrating; send this one command there,
/// preceded by `ASKING`, and keep the map).
public enum RedisClusterRedirection: Sendable, Hashable {
    case moved(slot: Int, to: RedisNodeAddress)
    case ask(slot: Int, to: RedisNodeAddress)

    /// Parses an error reply's text; `nil` when it is not a well-formed redirection.
    ///
    /// - Parameter replier: the node that sent the reply. A redirection without a host
    ///   (`-MOVED 3999 :6380`, sent by a node whose `cluster-preferred-endpoint-type` is
    ///   `unknown-endpoint`) means "the host of the node you asked, this port" (cluster
    ///   specification); without `replier` such a reply is not taken.
    public init?(errorMessage: String, replier: RedisNodeAddress? = nil) {
        let fields = errorMessage.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count == 3, let slot = Int(fields[1]), (0..<RedisHashSlot.count).contains(slot) else {
            return nil
        }
        let address: RedisNodeAddress
        if let parsed = RedisNodeAddress(hostPort: fields[2]) {
            address = parsed
        } else if let replier, fields[2].first == ":", let port = Int(fields[2].dropFirst()), (1...65535).contains(port)
        {
            address = RedisNodeAddress(host: replier.host, port: port)
        } else {
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
