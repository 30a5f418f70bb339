import Foundation

/// Header values as the routes read them.
enum HeaderValue {
    /// `value.trimmingCharacters(in: .whitespaces)`, without Foundation's work (a bridged copy of
    /// the whole string) for the usual value, which neither starts nor ends with a space, a tab or
    /// a non-ASCII byte. Forge's tokens and FITs are kilobytes long and read on every Forge call.
    static func trimmed<S: StringProtocol>(_ value: S) -> String where S.UTF8View: BidirectionalCollection {
        if let first = value.utf8.first, let last = value.utf8.last, !Self.mayBeTrimmed(first),
            !Self.mayBeTrimmed(last)
        {
            return String(value)
        }
        return value.trimmingCharacters(in: .whitespaces)
    }

    /// Whether `byte` may belong to a character `trimmingCharacters(in: .whitespaces)` removes.
    static func mayBeTrimmed(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte >= 0x80
    }
}
