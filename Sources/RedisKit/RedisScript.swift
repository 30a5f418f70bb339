import Crypto

/// A Lua script for ``RedisClient/eval(_:keys:arguments:timeout:)``, with its SHA-1 computed once for `EVALSHA`.
public struct RedisScript: Sendable, Hashable {
    /// The Lua source.
    public let source: String
    /// The lowercase hex SHA-1 of `source`, as Redis computes it for `EVALSHA` and `SCRIPT LOAD`.
    public let sha1: String

    /// Creates a script and computes its SHA-1 (locally; no round trip).
    public init(_ source: String) {
        self.source = source
        self.sha1 = RedisScriptDigest.sha1Hex(of: Array(source.utf8))
    }
}

/// SHA-1 names Lua scripts the way Redis does (swift-crypto's `Insecure.SHA1`); nothing security
/// related depends on it.
enum RedisScriptDigest {
    static func sha1Hex(of message: [UInt8]) -> String {
        Insecure.SHA1.hash(data: message).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 0x10 ? "0" + hex : hex
        }.joined()
    }
}
