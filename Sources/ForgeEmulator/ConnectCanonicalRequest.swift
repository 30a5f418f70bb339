import Crypto
import Foundation

/// Atlassian Connect's canonical request and `qsh` as the product computes them
/// (`spec/protocol.md` §3), written independently of the gateway's implementation so each checks
/// the other in the tests.
enum ConnectCanonicalRequest {
    /// `METHOD&path&query` for `url` (a path with query, or an absolute URL), with `basePath`
    /// removed from the path's start.
    static func canonical(method: String, url: String, basePath: String = "") -> String {
        var rest = url
        if let fragment = rest.firstIndex(of: "#") { rest = String(rest[..<fragment]) }
        if let components = URLComponents(string: rest), components.scheme != nil {
            rest = components.percentEncodedPath + (components.percentEncodedQuery.map { "?" + $0 } ?? "")
        }
        let path: String
        let query: String
        if let question = rest.firstIndex(of: "?") {
            path = String(rest[..<question])
            query = String(rest[rest.index(after: question)...])
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
        var path = raw
        var base = basePath
        while base.hasSuffix("/") { base.removeLast() }
        if !base.isEmpty, path == base || path.hasPrefix(base + "/") {
            path = String(path.dropFirst(base.count))
        }
        while path.hasPrefix("//") { path.removeFirst() }
        if path.isEmpty { path = "/" }
        if !path.hasPrefix("/") { path = "/" + path }
        if path.count > 1, path.hasSuffix("/") { path.removeLast() }
        return path.replacingOccurrences(of: "&", with: "%26")
    }

    private static func canonicalQuery(_ query: String) -> String {
        var parameters: [String: [String]] = [:]
        for piece in query.split(separator: "&") {
            let pair = piece.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = self.decode(pair[0])
            if name == "jwt" { continue }
            parameters[name, default: []].append(pair.count > 1 ? self.decode(pair[1]) : "")
        }
        // Names sorted by their percent-encoded form, values of a repeated name by their decoded form
        // (as Atlassian's libraries do).
        return parameters.keys.map { (name: $0, encoded: self.encode($0)) }
            .sorted { Array($0.encoded.utf8).lexicographicallyPrecedes(Array($1.encoded.utf8)) }
            .map { name, encoded in
                let values = parameters[name]!.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
                return encoded + "=" + values.map(self.encode).joined(separator: ",")
            }.joined(separator: "&")
    }

    private static func decode(_ value: Substring) -> String {
        let spaced = value.replacingOccurrences(of: "+", with: " ")
        return spaced.removingPercentEncoding ?? spaced
    }

    private static let unreserved = CharacterSet(
        charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

    private static func encode(_ value: String) -> String {
        value.addingPercentEncoding(withAllowedCharacters: self.unreserved) ?? value
    }
}
