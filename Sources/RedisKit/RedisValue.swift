/// A reply from Redis (RESP2), converted from hiredis's reply tree into a plain Swift value.
///
/// A null bulk string (`$-1`) and a null array (`*-1`) are both `.null`.
public enum RedisValue: Sendable, Hashable {
    /// A null bulk string or null array.
    case null
    /// A simple string reply, such as `OK` or `PONG`.
    case status(String)
    /// An error reply, such as `NOSCRIPT No matching script.`.
    case error(String)
    /// An integer reply.
    case integer(Int64)
    /// A bulk string reply: binary-safe bytes.
    case bulk([UInt8])
    /// An array reply; elements may be nested arrays.
    case array([RedisValue])

    /// The text of a bulk string (if it is valid UTF-8) or of a status reply; `nil` otherwise.
    public var string: String? {
        switch self {
        case .bulk(let bytes):
            return String(validating: bytes, as: UTF8.self)
        case .status(let text):
            return text
        case .null, .error, .integer, .array:
            return nil
        }
    }

    /// An integer reply, or a bulk string or status reply that holds a decimal integer; `nil` otherwise.
    public var int: Int64? {
        switch self {
        case .integer(let value):
            return value
        case .bulk, .status:
            return self.string.flatMap { Int64($0) }
        case .null, .error, .array:
            return nil
        }
    }

    /// The elements of an array reply; `nil` for every other reply (including `.null`).
    public var array: [RedisValue]? {
        if case .array(let elements) = self {
            return elements
        }
        return nil
    }

    /// `true` for a null bulk string or null array.
    public var isNull: Bool {
        if case .null = self {
            return true
        }
        return false
    }
}
