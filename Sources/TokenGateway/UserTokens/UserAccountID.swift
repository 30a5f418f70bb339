/// An Atlassian account id as the `asUser` query parameter names it (contract §2): 1–128
/// characters of ASCII letters, digits, `:`, `_` and `-`.
///
/// The restriction keeps the value safe inside Redis key names (no `{`, `}` or spaces) and in log
/// lines. An account id is not a secret.
public struct UserAccountID: Sendable, Hashable, CustomStringConvertible {
    /// The account id, exactly as given.
    public let value: String

    /// Accepts a well-formed account id; returns nil for anything else.
    public init?(_ value: String) {
        guard (1...128).contains(value.utf8.count), value.utf8.allSatisfy(Self.isAllowed) else { return nil }
        self.value = value
    }

    public var description: String { self.value }

    private static func isAllowed(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: ":"), UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }
}

/// The site context an exchange names: `ari:cloud:<product>::site/<cloudId>`.
///
/// Derived from the installation's record: the product from its `apiBaseUrl`
/// (`https://api.atlassian.com/ex/<product>/<cloudId>`), the cloud id from the record's `cloudId`
/// (or, failing that, from the same URL).
public struct SiteContext: Sendable, Hashable, CustomStringConvertible {
    public let product: String
    public let cloudId: String

    public init?(product: String, cloudId: String) {
        guard Self.isSegment(product), Self.isSegment(cloudId) else { return nil }
        self.product = product.lowercased()
        self.cloudId = cloudId
    }

    /// Reads the product (and, when `cloudId` is nil, the cloud id) from an `apiBaseUrl` of the
    /// form `https://<host>/ex/<product>/<cloudId>[/…]`; nil when it has no such path.
    public init?(apiBaseUrl: String?, cloudId: String?) {
        guard let apiBaseUrl, let schemeEnd = apiBaseUrl.range(of: "://") else { return nil }
        let afterScheme = apiBaseUrl[schemeEnd.upperBound...]
        guard let pathStart = afterScheme.firstIndex(of: "/") else { return nil }
        var path = afterScheme[pathStart...]
        if let query = path.firstIndex(where: { $0 == "?" || $0 == "#" }) { path = path[..<query] }
        let segments = path.split(separator: "/", omittingEmptySubsequences: true)
        guard segments.count >= 3, segments[0] == "ex" else { return nil }
        self.init(product: String(segments[1]), cloudId: cloudId ?? String(segments[2]))
    }

    /// `ari:cloud:<product>::site/<cloudId>`.
    public var ari: String { "ari:cloud:\(self.product)::site/\(self.cloudId)" }

    public var description: String { self.ari }

    private static func isSegment(_ s: String) -> Bool {
        (1...128).contains(s.utf8.count)
            && s.utf8.allSatisfy { b in
                switch b {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."):
                    return true
                default:
                    return false
                }
            }
    }
}
