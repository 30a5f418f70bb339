import Crypto
import Foundation

/// Atlassian Connect's canonical request and `qsh` as the product computes them
/// (`spec/protocol.md` §3), written independently of the gateway's implementation so each checks
/// the other in the tests.
enum ConnectCanonicalRequest {
    /// `METHOD&path&query` for `url` (a path with query, or an absolute URL), with `basePath`
    /// removed from the path's start.
    static func canonical(method: String, url: String, basePath: String = "") -> String {
        // Delimiters are bytes (as Atlassian's libraries read them): a `#`, `?` or `&` followed by a
        // combining mark still delimits, although Swift's characters would join the two.
        var rest = url
        if let fragment = rest.utf8.firstIndex(of: UInt8(ascii: "#")) {
            rest = String(Substring(rest.utf8[..<fragment]))
        }
        if let components = URLComponents(string: rest), components.scheme != nil {
            rest = components.percentEncodedPath + (components.percentEncodedQuery.map { "?" + $0 } ?? "")
        }
        let path: String
        let query: String
        if let question = rest.utf8.firstIndex(of: UInt8(ascii: "?")) {
            path = String(Substring(rest.utf8[..<question]))
            query = String(Substring(rest.utf8[rest.utf8.index(after: question)...]))
        } else {
            path = rest
            query = ""
        }
        return method.uppercased() + "&" + self.canonicalPath(path, basePath: basePath) + "&"
            + self.canonicalQuery(query)
    }

    /// Lowercase hex SHA-256 of the canonical request.
    static func qsh(method: String, url: String, basePath: String = "") -> String {
        SHA256.hash(data: Data(self.canonical(method: method, url: url, basePath: basePath).utf8))
            .map { String(format: "%02x", $0) }.joined()
    }

    private static func canonicalPath(_ raw: String, basePath: String) -> String {
        // Bytes throughout, as in `canonical`.
        var path = Array(raw.utf8)
        var base = Array(basePath.utf8)
        let slash = UInt8(ascii: "/")
        while base.last == slash { base.removeLast() }
        if !base.isEmpty, path == base || path.starts(with: base + [slash]) {
            path.removeFirst(base.count)
        }
        while path.starts(with: [slash, slash]) { path.removeFirst() }
        if path.isEmpty { path = [slash] }
        if path.first != slash { path.insert(slash, at: 0) }
        if path.count > 1, path.last == slash { path.removeLast() }
        return String(decoding: path, as: UTF8.self).replacingOccurrences(of: "&", with: "%26", options: .literal)
    }

    private static func canonicalQuery(_ query: String) -> String {
        // Keyed by bytes: names that are only Unicode-equivalent are two parameters.
        var parameters: [[UInt8]: [String]] = [:]
        for piece in query.utf8.split(separator: UInt8(ascii: "&")) {
            let pair = piece.split(separator: UInt8(ascii: "="), maxSplits: 1, omittingEmptySubsequences: false)
            let name = self.decode(Substring(pair[0]))
            if name == "jwt" { continue }
            parameters[Array(name.utf8), default: []].append(pair.count > 1 ? self.decode(Substring(pair[1])) : "")
        }
        // Names sorted by their percent-encoded form, values of a repeated name by their decoded form
        // (as Atlassian's libraries do).
        return parameters.keys.map { (name: $0, encoded: self.encode(String(decoding: $0, as: UTF8.self))) }
            .sorted { Array($0.encoded.utf8).lexicographicallyPrecedes(Array($1.encoded.utf8)) }
            .map { name, encoded in
                let values = parameters[name]!.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
                return encoded + "=" + values.map(self.encode).joined(separator: ",")
            }.joined(separator: "&")
    }

    /// `+` is a space, `%XX` a byte (an invalid escape stays literal), and the bytes are read as
    /// UTF-8 (a sequence that is not becomes U+FFFD), as Atlassian's libraries decode a query.
    private static func decode(_ value: Substring) -> String {
        let input = Array(value.utf8)
        var bytes: [UInt8] = []
        var index = 0
        while index < input.count {
            if input[index] == UInt8(ascii: "+") {
                bytes.append(UInt8(ascii: " "))
                index += 1
            } else if input[index] == UInt8(ascii: "%"), index + 2 < input.count,
                let high = Self.hexDigit(input[index + 1]), let low = Self.hexDigit(input[index + 2])
            {
                bytes.append(high << 4 | low)
                index += 3
            } else {
                bytes.append(input[index])
                index += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func hexDigit(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    private static let unreserved = CharacterSet(
        charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

    private static func encode(_ value: String) -> String {
        value.addingPercentEncoding(withAllowedCharacters: self.unreserved) ?? value
    }
}
