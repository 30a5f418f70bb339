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
        // Byte by byte: only visible ASCII passes, so bytes and characters are the same here.
        var url = url
        url.makeContiguousUTF8()
        return url.utf8.withContiguousStorageIfAvailable { Self.hasAllowedPrefix(bytes: $0, prefixes: prefixes) }
            ?? false
    }

    private static func hasAllowedPrefix(bytes: UnsafeBufferPointer<UInt8>, prefixes: [String]) -> Bool {
        guard bytes.count <= 512 else { return false }
        for byte in bytes {
            switch byte {
            case 0...0x20, 0x7F...0xFF: return false
            case UInt8(ascii: "@"), UInt8(ascii: "\\"), UInt8(ascii: "?"), UInt8(ascii: "#"), UInt8(ascii: "%"):
                return false
            default: continue
            }
        }
        let dotDot: [UInt8] = Array("/..".utf8)
        var index = 0
        while index + 3 <= bytes.count {
            if bytes[index] == dotDot[0], bytes[index + 1] == dotDot[1], bytes[index + 2] == dotDot[2],
                index + 3 == bytes.count || bytes[index + 3] == UInt8(ascii: "/")
            {
                return false
            }
            index += 1
        }
        return prefixes.contains { prefix in
            let p = prefix.utf8
            return bytes.count > p.count && bytes.starts(with: p) && bytes[p.count] != UInt8(ascii: "/")
        }
    }
}

extension GatewayStore {
    /// Context of an installation's sealed `apiBaseUrl`.
    func apiBaseURLContext(_ id: InstallationID) -> String { self.installationKey(id) + "#apiBaseUrl" }

    /// The `apiBaseUrl` a FIT's `url` sets in the store (the routing policy allows it), or nil.
    public func storableAPIBaseURL(_ url: String?) -> String? {
        guard let url, !url.isEmpty, self.routing.allowsAPIBaseURL(url) else { return nil }
        return url
    }

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
