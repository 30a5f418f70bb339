/// An `application/x-www-form-urlencoded` request body as the token endpoint reads it
/// (RFC 6749 §3.2, Appendix B).
///
/// - Names and values are percent-decoded, `+` is a space, and the result must be UTF-8 (or is read
///   as ISO-8859-1 when the body's charset says so).
/// - A parameter given more than once is refused (RFC 6749 §3.2: "MUST NOT be included more than
///   once"), even if one of the copies is empty.
/// - A parameter sent without a value counts as omitted (RFC 6749 §3.2).
public struct OAuthForm: Sendable, Hashable {
    private var values: [String: String]

    /// The parameters with a non-empty value.
    public var names: Set<String> { Set(self.values.keys) }

    /// The value of `name`, or nil when it is absent or empty.
    public subscript(_ name: String) -> String? { self.values[name] }

    /// Most parameters read from one body; more is refused as malformed.
    public static let maximumParameterCount = 64

    /// How the percent-decoded bytes of a body are read (its `Content-Type` charset).
    public enum Charset: Sendable {
        /// UTF-8 (also for US-ASCII, a subset): a byte sequence that is not UTF-8 is refused.
        case utf8
        /// ISO-8859-1: every byte is the character of the same code point.
        case latin1

        func string(_ bytes: [UInt8]) -> String? {
            switch self {
            case .utf8: return String(validating: bytes, as: UTF8.self)
            case .latin1: return String(String.UnicodeScalarView(bytes.map { Unicode.Scalar($0) }))
            }
        }
    }

    /// Parses `bytes`.
    ///
    /// - Throws: ``OAuthError/invalidRequest(_:)`` for an invalid percent escape, a name or value
    ///   that is not UTF-8, an empty name, a repeated parameter or too many parameters. The
    ///   description names the parameter (names are never secret), never a value.
    public static func parse(_ bytes: [UInt8], charset: Charset = .utf8) throws(OAuthError) -> OAuthForm {
        var values: [String: String] = [:]
        var seen: Set<String> = []
        let pairs = bytes.split(separator: UInt8(ascii: "&"), omittingEmptySubsequences: true)
        guard pairs.count <= Self.maximumParameterCount else {
            throw .invalidRequest("the request has more than \(Self.maximumParameterCount) parameters")
        }
        for pair in pairs {
            let rawName: ArraySlice<UInt8>
            let rawValue: ArraySlice<UInt8>
            if let equals = pair.firstIndex(of: UInt8(ascii: "=")) {
                rawName = pair[pair.startIndex..<equals]
                rawValue = pair[pair.index(after: equals)...]
            } else {
                rawName = pair
                rawValue = []
            }
            guard let nameBytes = Self.decode(rawName), let name = charset.string(nameBytes),
                !name.isEmpty
            else {
                throw .invalidRequest(
                    "the form body is malformed (a parameter name is empty or not percent-encoded UTF-8)")
            }
            guard let valueBytes = Self.decode(rawValue), let value = charset.string(valueBytes)
            else {
                throw .invalidRequest("parameter \(Self.shown(name)) is not percent-encoded UTF-8")
            }
            guard seen.insert(name).inserted else {
                throw .invalidRequest("parameter \(Self.shown(name)) is repeated")
            }
            if !value.isEmpty { values[name] = value }
        }
        return OAuthForm(values: values)
    }

    /// Decodes one form component: `+` is a space, `%XX` a byte; nil for an invalid escape.
    public static func decode(_ bytes: some Collection<UInt8>) -> [UInt8]? {
        var output: [UInt8] = []
        output.reserveCapacity(bytes.count)
        var iterator = bytes.makeIterator()
        while let byte = iterator.next() {
            switch byte {
            case UInt8(ascii: "+"):
                output.append(UInt8(ascii: " "))
            case UInt8(ascii: "%"):
                guard let high = iterator.next().flatMap(Self.hexValue),
                    let low = iterator.next().flatMap(Self.hexValue)
                else { return nil }
                output.append(high << 4 | low)
            default:
                output.append(byte)
            }
        }
        return output
    }

    /// A parameter name for a description: in single quotes, at most 40 characters of printable
    /// ASCII other than `"`, `'` and `\` (RFC 6749 §5.2 allows no `"` or `\` in
    /// `error_description`); any other name is described by its length.
    static func shown(_ name: String) -> String {
        let printable = name.unicodeScalars.allSatisfy {
            $0.value >= 0x20 && $0.value < 0x7F && !"\"'\\".unicodeScalars.contains($0)
        }
        guard printable, name.count <= 40 else { return "(a \(name.count)-character name)" }
        return "'\(name)'"
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
