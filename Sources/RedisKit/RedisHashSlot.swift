/// Redis Cluster's key-to-slot mapping: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16384.
public enum RedisHashSlot {
    /// The number of hash slots in a Redis Cluster.
    public static let count = 16384

    /// The slot of `key`. When the key holds a non-empty hash tag (the part between the first `{` and the next
    /// `}`), only the tag is hashed, so keys sharing a tag share a slot.
    public static func slot(of key: String) -> Int {
        var utf8 = Array(key.utf8)
        if let open = utf8.firstIndex(of: UInt8(ascii: "{")),
            let close = utf8[(open + 1)...].firstIndex(of: UInt8(ascii: "}")), close > open + 1
        {
            utf8 = Array(utf8[(open + 1)..<close])
        }
        return Int(self.crc16(utf8) & 0x3FFF)
    }

    /// The key that decides where `command` runs in a cluster, or `nil` for a command without keys (`PING`,
    /// `SCAN`, `PUBLISH`, `EVAL` with no keys …). Multi-key commands are expected to keep their keys in one slot.
    static func routingKey(of command: [String]) -> String? {
        guard let name = command.first?.uppercased() else {
            return nil
        }
        switch name {
        case "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO":
            guard command.count > 3, let keyCount = Int(command[2]), keyCount > 0 else {
                return nil
            }
            return command[3]
        case "PING", "ECHO", "SCAN", "PUBLISH", "SUBSCRIBE", "INFO", "CLUSTER", "SCRIPT", "DBSIZE", "FLUSHALL",
            "FLUSHDB", "TIME", "ROLE", "CONFIG", "ACL", "AUTH", "SELECT", "CLIENT", "COMMAND", "READONLY",
            "READWRITE", "ASKING", "MULTI", "EXEC", "DISCARD", "WAIT", "LASTSAVE", "MEMORY", "FUNCTION":
            return nil
        default:
            return command.count > 1 ? command[1] : nil
        }
    }

    static func slot(of command: [String]) -> Int? {
        self.routingKey(of: command).map { self.slot(of: $0) }
    }

    private static func crc16(_ bytes: [UInt8]) -> UInt16 {
        var crc: UInt16 = 0
        for byte in bytes {
            crc ^= UInt16(byte) << 8
            for _ in 0..<8 {
                crc = crc & 0x8000 != 0 ? (crc << 1) ^ 0x1021 : crc << 1
            }
        }
        return crc
    }
}
