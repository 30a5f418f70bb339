/// Base64url (RFC 4648 §5) as the contract uses it: written without padding, read with or
/// without it.
///
/// Decoding is strict: characters outside the url-safe alphabet, misplaced or surplus `=`,
/// an impossible length (one character left over) and non-zero trailing bits all yield `nil`,
/// so every byte string has exactly one accepted spelling (plus its padded form).
public enum Base64URL {
    private static let alphabet: [UInt8] = Array(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8
    )

    /// Encodes `bytes` as base64url without padding.
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        let input = Array(bytes)
        var out: [UInt8] = []
        out.reserveCapacity((input.count * 4 + 2) / 3)
        var index = 0
        while index + 3 <= input.count {
            let chunk = UInt32(input[index]) << 16 | UInt32(input[index + 1]) << 8 | UInt32(input[index + 2])
            out.append(self.alphabet[Int(chunk >> 18 & 0x3F)])
            out.append(self.alphabet[Int(chunk >> 12 & 0x3F)])
            out.append(self.alphabet[Int(chunk >> 6 & 0x3F)])
            out.append(self.alphabet[Int(chunk & 0x3F)])
            index += 3
        }
        switch input.count - index {
        case 1:
            let chunk = UInt32(input[index]) << 16
            out.append(self.alphabet[Int(chunk >> 18 & 0x3F)])
            out.append(self.alphabet[Int(chunk >> 12 & 0x3F)])
        case 2:
            let chunk = UInt32(input[index]) << 16 | UInt32(input[index + 1]) << 8
            out.append(self.alphabet[Int(chunk >> 18 & 0x3F)])
            out.append(self.alphabet[Int(chunk >> 12 & 0x3F)])
            out.append(self.alphabet[Int(chunk >> 6 & 0x3F)])
        default:
            break
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes base64url with or without `=` padding; `nil` when `string` is not valid base64url.
    public static func decode(_ string: some StringProtocol) -> [UInt8]? {
        self.decode(utf8: Array(string.utf8))
    }

    /// Encodes the UTF-8 bytes of `string` as base64url without padding.
    public static func encode(utf8 string: some StringProtocol) -> String {
        self.encode(string.utf8)
    }

    /// Decodes base64url bytes with or without `=` padding; `nil` when they are not valid base64url.
    public static func decode(utf8 input: [UInt8]) -> [UInt8]? {
        var end = input.count
        // Padding: allowed only to complete the last quantum to a multiple of four.
        if input.count % 4 == 0 {
            var pad = 0
            while end > 0, input[end - 1] == UInt8(ascii: "="), pad < 2 {
                end -= 1
                pad += 1
            }
        }
        let remainder = end % 4
        if remainder == 1 { return nil }

        var out: [UInt8] = []
        out.reserveCapacity(end * 3 / 4)
        var accumulator: UInt32 = 0
        var bits = 0
        for index in 0..<end {
            guard let value = self.value(of: input[index]) else { return nil }
            accumulator = accumulator << 6 | UInt32(value)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
                accumulator &= (1 << UInt32(bits)) - 1
            }
        }
        // Leftover bits must be zero (canonical encoding).
        guard accumulator == 0 else { return nil }
        return out
    }

    /// Whether `byte` is one of the 64 characters of the base64url alphabet (`A–Z a–z 0–9 - _`).
    public static func isAlphabetByte(_ byte: UInt8) -> Bool { Self.value(of: byte) != nil }

    private static func value(of byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): return byte - UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): return byte - UInt8(ascii: "a") + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0") + 52
        case UInt8(ascii: "-"): return 62
        case UInt8(ascii: "_"): return 63
        default: return nil
        }
    }
}
