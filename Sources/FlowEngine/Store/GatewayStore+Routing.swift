/// Routing data: values that are not secret but decide where a token goes or whose token is
/// handed out (an installation's `apiBaseUrl`, handed to callers beside its token; a Connect
/// tenant's link to a Forge installation, which the OAuth token exchange follows). They are sealed
/// like secrets, with the Redis key name and field as context, so a value written or copied into
/// Redis by someone without the key ring does not open and is never served. They are sealed
/// deterministically (equal values give equal blobs), so scripts can compare them in place.
public struct RoutingPolicy: Sendable {
    /// Whether an `apiBaseUrl` may be stored and served: by default `https://api.atlassian.com/ex/…`.
    public var allowsAPIBaseURL: @Sendable (String) -> Bool

    public init(allowsAPIBaseURL: @escaping @Sendable (String) -> Bool = { RoutingPolicy.isAtlassianAPIBaseURL($0) }) {
        self.allowsAPIBaseURL = allowsAPIBaseURL
    }

    /// `https://api.atlassian.com/ex/<product>/<cloudId>…`.
    public static func isAtlassianAPIBaseURL(_ url: String) -> Bool {
        Self.hasAllowedPrefix(url, prefixes: ["https://api.atlassian.com/ex/"])
    }

    /// Whether `url` starts with one of `prefixes` (each ending in `/`), has a path segment after
    /// it, and holds nothing a URL could hide another host or path in (no `@`, `\`, `?`, `#`,
    /// whitespace, control characters, `..` or percent-encoded dots and slashes).
    public static func hasAllowedPrefix(_ url: String, prefixes: [String]) -> Bool {
        guard url.utf8.count <= 512,
            url.unicodeScalars.allSatisfy({
                $0.value > 0x20 && $0.value < 0x7F && !"@\\?#%".unicodeScalars.contains($0)
            }),
            !url.contains("/../"), !url.hasSuffix("/..")
        else { return false }
        return prefixes.contains { prefix in
            url.hasPrefix(prefix) && url.utf8.count > prefix.utf8.count
                && !url.dropFirst(prefix.count).hasPrefix("/")
        }
    }
}

extension GatewayStore {
    /// Context of an installation's sealed `apiBaseUrl`.
    func apiBaseURLContext(_ id: InstallationID) -> String { self.installationKey(id) + "#apiBaseUrl" }

    /// The sealed form of an `apiBaseUrl` for the store, or `""` (not stored) when there is none
    /// or the routing policy does not allow it.
    func sealAPIBaseURL(_ url: String?, _ id: InstallationID) -> String {
        guard let url, !url.isEmpty, self.routing.allowsAPIBaseURL(url) else { return "" }
        return (try? self.box.sealDeterministically(Array(url.utf8), context: self.apiBaseURLContext(id))) ?? ""
    }

    /// The `apiBaseUrl` of a stored (sealed) value, or nil when there is none, it does not open
    /// (forged, copied, or under a key no longer in the ring: counted) or the policy refuses it.
    public func openAPIBaseURL(_ stored: String?, _ id: InstallationID) -> String? {
        guard let stored, !stored.isEmpty else { return nil }
        guard let bytes = try? self.box.open(stored, context: self.apiBaseURLContext(id)),
            let url = String(validating: bytes, as: UTF8.self)
        else {
            self.undecryptable(.apiBaseUrl)
            return nil
        }
        return self.routing.allowsAPIBaseURL(url) ? url : nil
    }
}
