import Foundation

/// A compact JWS (`header.payload.signature`) split into its parts, header and claims parsed as
/// JSON objects. Nothing about it is verified: callers check the algorithm and the signature.
struct ConnectJWS {
    /// Largest token accepted, in bytes. Connect JWTs (with their `context`) are a few KB.
    static let maximumLength = 16 * 1024

    let header: [String: JSONValue]
    let claims: [String: JSONValue]
    /// `base64url(header) "." base64url(payload)`: the bytes the signature covers.
    let signingInput: [UInt8]
    let signature: [UInt8]

    /// Parses `token`; nil when it is not a compact JWS with JSON-object header and payload.
    init?(_ token: String) {
        let bytes = Array(token.utf8)
        guard !bytes.isEmpty, bytes.count <= Self.maximumLength else { return nil }
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3,
            let headerBytes = Base64URL.decode(utf8: Array(parts[0])),
            let payloadBytes = Base64URL.decode(utf8: Array(parts[1])),
            let signature = Base64URL.decode(utf8: Array(parts[2])),
            let header = ConnectJSON.object(headerBytes),
            let claims = ConnectJSON.object(payloadBytes)
        else { return nil }
        self.header = header
        self.claims = claims
        self.signingInput = Array(parts[0]) + [UInt8(ascii: ".")] + Array(parts[1])
        self.signature = signature
    }

    /// The header's `alg` when it is a string.
    var algorithm: String? { self.header["alg"]?.connectString }

    /// A string claim; nil when absent or not a string.
    func string(_ name: String) -> String? { self.claims[name]?.connectString }

    /// A NumericDate claim (seconds since the epoch); nil when absent or not a number.
    func numericDate(_ name: String) -> Double? {
        switch self.claims[name] {
        case .int(let value): return Double(value)
        case .double(let value) where value.isFinite: return value
        default: return nil
        }
    }

    /// `aud` as a list: a string is a list of one; nil when absent; an empty list when it is
    /// neither a string nor an array of strings.
    var audience: [String]? {
        switch self.claims["aud"] {
        case nil, .null?: return nil
        case .string(let value)?: return [value]
        case .array(let items)?:
            let strings = items.compactMap(\.connectString)
            return strings.count == items.count ? strings : []
        default: return []
        }
    }
}

/// JSON parsing into ``JSONValue`` for Connect tokens and payloads: booleans stay booleans,
/// integers stay integers, object keys come out sorted, and nesting is bounded.
enum ConnectJSON {
    /// Parses `bytes` as a JSON object; nil when they are not one or nest deeper than
    /// ``JSONBody/maxDepth``.
    static func object(_ bytes: [UInt8]) -> [String: JSONValue]? {
        guard JSONBody.depth(of: bytes) <= JSONBody.maxDepth,
            let decoded = try? JSONDecoder().decode(Decoded.self, from: Data(bytes)),
            case .object(let fields) = decoded.value
        else { return nil }
        return Dictionary(fields, uniquingKeysWith: { _, last in last })
    }

    /// A JSON object with its keys in sorted order.
    static func sortedObject(_ fields: [String: JSONValue]) -> JSONValue {
        .object(fields.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    private struct Decoded: Decodable {
        let value: JSONValue

        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            if container.decodeNil() {
                self.value = .null
            } else if let bool = try? container.decode(Bool.self) {
                self.value = .bool(bool)
            } else if let int = try? container.decode(Int64.self) {
                self.value = .int(int)
            } else if let double = try? container.decode(Double.self) {
                self.value = .double(double)
            } else if let string = try? container.decode(String.self) {
                self.value = .string(string)
            } else if let array = try? container.decode([Decoded].self) {
                self.value = .array(array.map(\.value))
            } else {
                let object = try container.decode([String: Decoded].self)
                self.value = ConnectJSON.sortedObject(object.mapValues(\.value))
            }
        }
    }
}

extension JSONValue {
    /// The string of a `.string`, else nil.
    var connectString: String? {
        if case .string(let value) = self { return value }
        return nil
    }

    /// The fields of an `.object` as a dictionary, else nil.
    var connectObject: [String: JSONValue]? {
        if case .object(let fields) = self { return Dictionary(fields, uniquingKeysWith: { _, last in last }) }
        return nil
    }
}
