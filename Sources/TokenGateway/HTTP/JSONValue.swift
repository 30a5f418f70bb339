import Foundation

/// A JSON value written in a fixed key order, with explicit nulls (the contract's bodies list
/// `null` for absent values).
public indirect enum JSONValue: Sendable, Hashable, ExpressibleByStringLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByIntegerLiteral, ExpressibleByNilLiteral
{
    case string(String)
    case int(Int64)
    case double(Double)
    case bool(Bool)
    case null
    case array([JSONValue])
    case object([(String, JSONValue)])

    public init(stringLiteral value: String) { self = .string(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(nilLiteral: ()) { self = .null }

    /// `.string` or `.null`.
    public static func optional(_ s: String?) -> JSONValue { s.map { .string($0) } ?? .null }

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool { lhs.serialized() == rhs.serialized() }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.serialized()) }

    /// Compact UTF-8 JSON.
    public func serialized() -> String {
        var out = ""
        self.write(into: &out)
        return out
    }

    func write(into out: inout String) {
        switch self {
        case .string(let s): Self.writeString(s, into: &out)
        case .int(let i): out += String(i)
        case .double(let d): out += d.isFinite ? String(d) : "null"
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                item.write(into: &out)
            }
            out += "]"
        case .object(let fields):
            out += "{"
            for (i, (k, v)) in fields.enumerated() {
                if i > 0 { out += "," }
                Self.writeString(k, into: &out)
                out += ":"
                v.write(into: &out)
            }
            out += "}"
        }
    }

    /// Whether `s` holds a byte JSON must escape (a control character, `"` or `\`). A branch-free
    /// scan over the UTF-8 bytes.
    static func needsEscaping(_ s: String) -> Bool {
        var s = s
        return s.withUTF8 { bytes in
            var found: UInt8 = 0
            for b in bytes {
                found |= (b < 0x20 ? 1 : 0) | (b == UInt8(ascii: "\"") ? 1 : 0) | (b == UInt8(ascii: "\\") ? 1 : 0)
            }
            return found != 0
        }
    }

    static func writeString(_ s: String, into out: inout String) {
        out += "\""
        // Most strings (tokens, ids, timestamps) need no escape: append them whole, which is far
        // cheaper than scalar by scalar (this runs for every token handed out).
        if !Self.needsEscaping(s) {
            out += s
            out += "\""
            return
        }
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let c where c.value < 0x20:
                out +=
                    "\\u" + String(repeating: "0", count: 4 - String(c.value, radix: 16).count)
                    + String(c.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }
}

/// Formats unix seconds as RFC 3339 UTC with `Z` (`2026-11-23T14:00:00Z`).
public enum RFC3339 {
    public static func string(unixSeconds: Int64) -> String {
        var t = time_t(unixSeconds)
        var tm = tm()
        gmtime_r(&t, &tm)
        let year = Int(tm.tm_year) + 1900
        guard (0...9999).contains(year) else {
            return String(
                format: "%04d-%02d-%02dT%02d:%02d:%02dZ", year, Int(tm.tm_mon) + 1, Int(tm.tm_mday),
                Int(tm.tm_hour), Int(tm.tm_min), Int(tm.tm_sec))
        }
        // Written digit by digit: `String(format:)` costs microseconds, and this runs for every
        // token handed out (answer body and audit record).
        return String(unsafeUninitializedCapacity: 20) { out in
            func put(_ value: Int, digits: Int, at offset: Int) {
                var v = value
                for i in stride(from: offset + digits - 1, through: offset, by: -1) {
                    out[i] = UInt8(ascii: "0") + UInt8(v % 10)
                    v /= 10
                }
            }
            put(year, digits: 4, at: 0)
            out[4] = UInt8(ascii: "-")
            put(Int(tm.tm_mon) + 1, digits: 2, at: 5)
            out[7] = UInt8(ascii: "-")
            put(Int(tm.tm_mday), digits: 2, at: 8)
            out[10] = UInt8(ascii: "T")
            put(Int(tm.tm_hour), digits: 2, at: 11)
            out[13] = UInt8(ascii: ":")
            put(Int(tm.tm_min), digits: 2, at: 14)
            out[16] = UInt8(ascii: ":")
            put(Int(tm.tm_sec), digits: 2, at: 17)
            out[19] = UInt8(ascii: "Z")
            return 20
        }
    }
}

/// Parses request bodies as JSON objects with a nesting limit, so a hostile body cannot make
/// the parser recurse deeply.
public enum JSONBody {
    /// Deepest nesting of arrays/objects accepted in a request body.
    public static let maxDepth = 16

    /// Parses `bytes` as a JSON object. Empty input parses as an empty object when `emptyIsObject`.
    public static func object(_ bytes: [UInt8], emptyIsObject: Bool = false) throws(GatewayError) -> [String: Any] {
        if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) {
            if emptyIsObject { return [:] }
            throw GatewayError.invalidRequest("request body is empty; a JSON object is required")
        }
        guard Self.depth(of: bytes) <= Self.maxDepth else {
            throw GatewayError.invalidRequest("JSON body is nested too deeply (at most \(Self.maxDepth) levels)")
        }
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: Data(bytes), options: [])
        } catch {
            throw GatewayError.invalidRequest("request body is not valid JSON")
        }
        guard let object = parsed as? [String: Any] else {
            throw GatewayError.invalidRequest("request body must be a JSON object")
        }
        return object
    }

    /// Maximum nesting depth of `[`/`{` outside strings.
    static func depth(of bytes: [UInt8]) -> Int {
        var depth = 0
        var maxDepth = 0
        var inString = false
        var escaped = false
        for b in bytes {
            if inString {
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                depth += 1
                maxDepth = max(maxDepth, depth)
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            default: break
            }
        }
        return maxDepth
    }
}

extension JSONValue {
    /// A JSON number as `JSONSerialization` reads it, or nil for anything else: a string, and
    /// `true`/`false` (which it reads as numbers too).
    static func strictNumber(_ raw: Any) -> Double? {
        guard !(raw is String), let number = raw as? NSNumber, String(cString: number.objCType) != "c" else {
            return nil
        }
        return number.doubleValue
    }

    /// A JSON `true` or `false` as `JSONSerialization` read it, or nil for anything else. A number
    /// (`1`, `0`) is no boolean, though Foundation's `as? Bool` takes one as such.
    static func strictBool(_ raw: Any) -> Bool? {
        guard let number = raw as? NSNumber, String(cString: number.objCType) == "c" else { return nil }
        return number.boolValue
    }
}
