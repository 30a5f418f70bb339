import Foundation

/// The hosts the gateway may call as auth triggers (contract §3).
///
/// - `*.example.net` matches `https` on the default port for any subdomain of `example.net`;
/// - `host.example.net` matches exactly that host, `https`, default port;
/// - `http://host:port` / `https://host:port` match exactly that scheme, host and port. Plain
///   `http` is accepted only for a loopback host (`localhost`, `127.0.0.0/8`, `::1`), for local
///   development.
///
/// No name resolution takes place: `localhost` is not `127.0.0.1`.
public struct TriggerHostAllowList: Sendable, Hashable, CustomStringConvertible {
    enum Entry: Sendable, Hashable {
        case suffix(String)
        case host(String)
        case exact(scheme: String, host: String, port: Int)
    }

    public struct ParseError: Error, Sendable, Hashable {
        public let problem: String
    }

    let entries: [Entry]

    /// Forge's web-trigger hosts.
    public static let forgeDefault = TriggerHostAllowList(entries: [
        .suffix(".hello.atlassian-dev.net"), .suffix(".webtrigger.atlassian.app"),
    ])

    init(entries: [Entry]) { self.entries = entries }

    public init(parsing setting: String) throws(ParseError) {
        var entries: [Entry] = []
        for rawEntry in setting.split(separator: ",", omittingEmptySubsequences: false) {
            let entry = rawEntry.trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
            // As for every list setting: a doubled or trailing comma is a typo, not "nothing".
            guard !entry.isEmpty else { throw ParseError(problem: "has an empty entry (a doubled or trailing comma?)") }
            if entry.hasPrefix("http://") || entry.hasPrefix("https://") {
                guard let c = URLComponents(string: entry), let scheme = c.scheme, let host = c.host, !host.isEmpty,
                    c.user == nil, c.password == nil, c.path.isEmpty || c.path == "/", c.query == nil
                else { throw ParseError(problem: "entry \(entry) is not scheme://host:port") }
                let port = c.port ?? (scheme == "https" ? 443 : 80)
                if scheme == "http" && !Self.isLoopback(host) {
                    throw ParseError(problem: "entry \(entry): plain http is allowed only for a loopback host")
                }
                entries.append(.exact(scheme: scheme, host: Self.bare(host), port: port))
            } else if entry.hasPrefix("*.") {
                let suffix = String(entry.dropFirst(1))
                guard suffix.count > 1, Self.isHostname(String(suffix.dropFirst())) else {
                    throw ParseError(problem: "entry \(entry) is not a valid wildcard host")
                }
                entries.append(.suffix(suffix))
            } else {
                guard Self.isHostname(entry) else { throw ParseError(problem: "entry \(entry) is not a valid host") }
                entries.append(.host(entry))
            }
        }
        guard !entries.isEmpty else { throw ParseError(problem: "the allow-list is empty") }
        self.entries = entries
    }

    /// True when `url` is an absolute URL that some entry allows (no user info, no fragment, no
    /// percent-encoding in the host: `URLComponents` decodes it, and a decoded NUL or `/` would let
    /// the name checked here differ from the address connected to).
    public func allows(_ url: String) -> Bool {
        guard url.count <= 2048, let c = URLComponents(string: url), let scheme = c.scheme?.lowercased(),
            let rawHost = c.host?.lowercased(), !rawHost.isEmpty, c.percentEncodedHost?.contains("%") == false,
            c.user == nil, c.password == nil, c.fragment == nil
        else { return false }
        let host = Self.bare(rawHost)
        let port = c.port ?? (scheme == "https" ? 443 : (scheme == "http" ? 80 : -1))
        for entry in self.entries {
            switch entry {
            case .suffix(let suffix):
                if scheme == "https", port == 443, host.hasSuffix(suffix), host.count > suffix.count,
                    Self.isHostname(host)
                {
                    return true
                }
            case .host(let h):
                if scheme == "https", port == 443, host == h { return true }
            case .exact(let s, let h, let p):
                if scheme == s, host == h, port == p { return true }
            }
        }
        return false
    }

    public var description: String {
        self.entries.map { e -> String in
            switch e {
            case .suffix(let s): return "*" + s
            case .host(let h): return h
            case .exact(let s, let h, let p): return "\(s)://\(h):\(p)"
            }
        }.joined(separator: ",")
    }

    static func bare(_ host: String) -> String {
        host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
    }

    static func isLoopback(_ host: String) -> Bool {
        TrustRoot.isLoopback(host)
    }

    /// Lower-case labels of letters, digits and `-` (and `_` with `underscores`: some internal
    /// names have them), 1–63 each, 253 in all.
    static func isHostname(_ s: String, underscores: Bool = false) -> Bool {
        !s.isEmpty && s.count <= 253
            && s.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
                !label.isEmpty && label.count <= 63
                    && label.utf8.allSatisfy {
                        ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D
                            || (underscores && $0 == 0x5F)
                    }
            }
    }
}
