import Foundation

/// base64url (RFC 4648 §5) as the gateway's contract uses it: written without padding, read with or
/// without it.
enum EmulatorBase64URL {
    /// Encodes bytes as base64url without padding.
    static func encode(_ bytes: some DataProtocol) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    /// Encodes the UTF-8 bytes of a string as base64url without padding.
    static func encode(_ string: String) -> String {
        encode(Data(string.utf8))
    }

    /// Decodes base64url with or without padding. Returns `nil` for anything that is not base64url
    /// (characters outside the alphabet, standard base64's `+` or `/`, or an impossible length).
    static func decode(_ string: some StringProtocol) -> Data? {
        var body = Substring(string)
        // Padding is optional, but when present it must be well formed.
        if let firstPad = body.firstIndex(of: "=") {
            let padding = body[firstPad...]
            guard padding.count <= 2, padding.allSatisfy({ $0 == "=" }), body.count % 4 == 0 else {
                return nil
            }
            body = body[..<firstPad]
        }
        guard body.utf8.allSatisfy(Self.isAlphabet) else { return nil }
        if body.count % 4 == 1 { return nil }
        var standard = body.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        standard += String(repeating: "=", count: (4 - standard.count % 4) % 4)
        return Data(base64Encoded: standard)
    }

    private static func isAlphabet(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
            return true
        default:
            return false
        }
    }
}
