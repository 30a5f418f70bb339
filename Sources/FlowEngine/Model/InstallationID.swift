/// The identity of one Forge app installation: its installation ARI
/// (`ari:cloud:ecosystem::installation/<uuid>`).
///
/// Two spellings name the same installation: the full ARI and the bare id after
/// `installation/`. Both normalise to the full ARI.
public struct InstallationID: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The ARI prefix every installation id carries.
    public static let ariPrefix = "ari:cloud:ecosystem::installation/"

    /// The full installation ARI.
    public let ari: String

    /// The id after `installation/` (a UUID for real installations).
    public var shortID: Substring { self.ari.dropFirst(Self.ariPrefix.count) }

    /// Accepts a full ARI or a bare id. The id part must be 1–128 characters of letters,
    /// digits, `-`, `_` and `.`; anything else returns nil.
    public init?(_ value: String) {
        let id: Substring
        if value.hasPrefix(Self.ariPrefix) {
            id = value.dropFirst(Self.ariPrefix.count)
        } else {
            id = Substring(value)
        }
        guard (1...128).contains(id.utf8.count),
            id.utf8.allSatisfy({ Self.isIDByte($0) }),
            id.first != "."
        else { return nil }
        self.ari = Self.ariPrefix + id
    }

    /// Parses a path segment: the ARI percent-encoded as one segment (`%2F`, `%3A` or literal `:`), or the bare id.
    public init?(pathSegment: String) {
        guard let decoded = PercentDecoding.decode(pathSegment) else { return nil }
        self.init(decoded)
    }

    public var description: String { self.ari }

    public static func < (lhs: InstallationID, rhs: InstallationID) -> Bool { lhs.ari < rhs.ari }

    private static func isIDByte(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."):
            return true
        default:
            return false
        }
    }
}

/// Strict percent-decoding of a URL component (no `+` to space): nil on a malformed escape or invalid UTF-8.
public enum PercentDecoding {
    public static func decode(_ s: String) -> String? {
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        var it = s.utf8.makeIterator()
        while let b = it.next() {
            if b == UInt8(ascii: "%") {
                guard let h = it.next(), let l = it.next(), let hv = hex(h), let lv = hex(l) else { return nil }
                out.append(hv << 4 | lv)
            } else {
                out.append(b)
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    private static func hex(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
