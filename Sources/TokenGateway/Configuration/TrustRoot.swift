import Foundation

/// Rules for the URLs the gateway trusts or sends secrets to (the Forge JWKS, the Connect install
/// keys, the GraphQL exchange endpoint): `https`, or plain `http` only to a loopback host written
/// as such.
public enum TrustRoot {
    /// Whether `host` (as a URL writes it; IPv6 in brackets or not) is loopback written as such:
    /// `localhost`, a dotted-quad IPv4 address in `127.0.0.0/8` (four decimal octets 0–255 without
    /// leading zeros), or `::1`. No name resolution takes place: `127.evil.example`,
    /// `127.0.0.1.nip.io`, `0x7f.0.0.1` or `2130706433` are not loopback.
    public static func isLoopback(_ host: String) -> Bool {
        var h = host.lowercased()
        if h.hasPrefix("["), h.hasSuffix("]") { h = String(h.dropFirst().dropLast()) }
        if h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" { return true }
        let octets = h.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4 else { return false }
        for octet in octets {
            guard (1...3).contains(octet.count), octet.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                octet == "0" || !octet.hasPrefix("0"), let value = Int(octet), value <= 255
            else { return false }
        }
        return octets[0] == "127"
    }

    /// Checks that `value` is an absolute `https` URL, or `http` to a loopback host, with a host
    /// and without user information.
    /// - Throws: ``ConfigurationError`` naming `setting` (never the value).
    public static func validate(_ value: String, setting: String) throws(ConfigurationError) -> String {
        guard let c = URLComponents(string: value), let scheme = c.scheme?.lowercased(), let host = c.host,
            !host.isEmpty, c.user == nil, c.password == nil
        else {
            throw ConfigurationError(
                setting: setting, problem: "must be an absolute https URL without user information")
        }
        switch scheme {
        case "https": return value
        case "http" where Self.isLoopback(host): return value
        case "http":
            throw ConfigurationError(
                setting: setting,
                problem: "must be https (plain http only to a loopback host: localhost, 127.x.y.z or [::1])")
        default:
            throw ConfigurationError(setting: setting, problem: "must be an absolute https URL")
        }
    }
}
