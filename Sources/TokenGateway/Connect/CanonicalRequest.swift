import Crypto

/// Atlassian Connect's canonical request and query string hash (`qsh`), protocol.md §3.
///
/// `METHOD & canonical-path & canonical-query`, where
/// - METHOD is upper-cased;
/// - the path is the URL's path with the tenant's base-URL path removed from its start, leading
///   slashes collapsed to one, empty → `/`, one trailing `/` removed unless the path is `/`, and
///   every `&` written `%26` (nothing else is re-encoded);
/// - the query drops `jwt`, percent-decodes names and values (`+` is a space), sorts names
///   bytewise, joins the sorted values of a repeated name with `,`, and percent-encodes names and
///   values keeping only `A–Z a–z 0–9 - . _ ~`; pairs `name=value` joined with `&`.
public enum CanonicalRequest {
    /// The canonical request for `method` and `url`.
    ///
    /// - Parameters:
    ///   - url: a path with an optional query (`/path?x=1`) or an absolute URL; a fragment is ignored.
    ///   - basePath: the tenant's base-URL path (for example `/wiki`), removed from the path's start
    ///     when the path begins with it as whole segments.
    public static func canonical(method: String, url: String, basePath: String = "") -> String {
        let (path, query) = self.splitURL(url)
        return self.canonicalMethod(method) + "&" + self.canonicalPath(path, basePath: basePath) + "&"
            + self.canonicalQuery(query)
    }

    /// Lowercase hex SHA-256 of ``canonical(method:url:basePath:)``.
    public static func qsh(method: String, url: String, basePath: String = "") -> String {
        let digest = SHA256.hash(data: Array(self.canonical(method: method, url: url, basePath: basePath).utf8))
        return self.hex(digest)
    }

    // MARK: - Parts

    static func canonicalMethod(_ method: String) -> String {
        String(
            decoding: method.utf8.map { byte in
                (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) ? byte - 32 : byte
            },
            as: UTF8.self
        )
    }

    /// Splits `url` into its path and its query (without `?`), dropping scheme, authority and
    /// fragment. Delimiters are found byte by byte, as Atlassian's libraries find them: a `#`, `?`
    /// or `&` followed by a combining mark is still a delimiter (Swift's characters would join them).
    static func splitURL(_ url: String) -> (path: Substring, query: Substring) {
        var rest = Substring(url)
        if let hash = rest.utf8.firstIndex(of: UInt8(ascii: "#")) { rest = Substring(rest.utf8[..<hash]) }
        let bytes = rest.utf8
        if let colon = bytes.firstIndex(of: UInt8(ascii: ":")), bytes[colon...].starts(with: "://".utf8),
            colon > bytes.startIndex, bytes[..<colon].allSatisfy(Self.isSchemeByte)
        {
            let afterScheme = bytes[bytes.index(colon, offsetBy: 3)...]
            let pathStart =
                afterScheme.firstIndex(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "?") })
                ?? afterScheme.endIndex
            rest = Substring(afterScheme[pathStart...])
        }
        if let question = rest.utf8.firstIndex(of: UInt8(ascii: "?")) {
            return (Substring(rest.utf8[..<question]), Substring(rest.utf8[rest.utf8.index(after: question)...]))
        }
        return (rest, rest[rest.endIndex...])
    }

    /// A letter, digit, `+`, `-` or `.` (RFC 3986 §3.1).
    private static func isSchemeByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."):
            true
        default: false
        }
    }

    static func canonicalPath(_ rawPath: Substring, basePath: String) -> String {
        // Byte by byte (see `splitURL`): the base path is a prefix by its bytes.
        let slash = UInt8(ascii: "/")
        var path = rawPath
        var base = Substring(basePath)
        while base.utf8.last == slash { base = Substring(base.utf8.dropLast()) }
        if !base.isEmpty, path.utf8.starts(with: base.utf8) {
            let remainder = Substring(path.utf8[path.utf8.index(path.startIndex, offsetBy: base.utf8.count)...])
            if remainder.isEmpty || remainder.utf8.first == slash {
                path = remainder
            }
        }
        // Collapse leading slashes to one.
        while path.utf8.starts(with: "//".utf8) { path = Substring(path.utf8.dropFirst()) }
        if path.isEmpty { path = "/" }
        if path.utf8.first != slash { path = "/" + path }
        if path.utf8.count > 1, path.utf8.last == slash { path = Substring(path.utf8.dropLast()) }
        return String(path).replacingAmpersands()
    }

    static func canonicalQuery(_ query: Substring) -> String {
        guard !query.isEmpty else { return "" }
        var parameters: [[UInt8]: [[UInt8]]] = [:]
        for piece in query.utf8.split(separator: UInt8(ascii: "&"), omittingEmptySubsequences: true) {
            let name: [UInt8]
            let value: [UInt8]
            if let equals = piece.firstIndex(of: UInt8(ascii: "=")) {
                name = self.formDecode(piece[piece.startIndex..<equals])
                value = self.formDecode(piece[piece.index(after: equals)...])
            } else {
                name = self.formDecode(piece[...])
                value = []
            }
            if name == Array("jwt".utf8) { continue }
            // Decoded bytes are read as UTF-8, a byte that is not becoming U+FFFD, as Atlassian's
            // libraries read them (`%E9` alone hashes as `%EF%BF%BD`).
            parameters[Self.asUTF8(name), default: []].append(Self.asUTF8(value))
        }
        // Names sorted by their percent-encoded form (`filter%5Bx%5D` before `filterBy`), as
        // Atlassian's libraries sort them; the values of a repeated name by their decoded form.
        let names = parameters.keys.map { (name: $0, encoded: self.percentEncode($0)) }
            .sorted(by: { $0.encoded.lexicographicallyPrecedes($1.encoded) })
        var output: [UInt8] = []
        for (position, (name, encoded)) in names.enumerated() {
            if position > 0 { output.append(UInt8(ascii: "&")) }
            output += encoded
            output.append(UInt8(ascii: "="))
            let values = parameters[name, default: []].sorted(by: { $0.lexicographicallyPrecedes($1) })
            for (valuePosition, value) in values.enumerated() {
                if valuePosition > 0 { output.append(UInt8(ascii: ",")) }
                output += self.percentEncode(value)
            }
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// `bytes` as UTF-8, each sequence that is not replaced by U+FFFD.
    static func asUTF8(_ bytes: [UInt8]) -> [UInt8] {
        Array(String(decoding: bytes, as: UTF8.self).utf8)
    }

    /// Percent-decoding as a query parser reads it: `+` is a space; an invalid escape stays literal.
    static func formDecode(_ bytes: Substring.UTF8View.SubSequence) -> [UInt8] {
        let input = Array(bytes)
        var output: [UInt8] = []
        output.reserveCapacity(input.count)
        var index = 0
        while index < input.count {
            let byte = input[index]
            if byte == UInt8(ascii: "+") {
                output.append(UInt8(ascii: " "))
                index += 1
            } else if byte == UInt8(ascii: "%"), index + 2 < input.count,
                let high = self.hexValue(input[index + 1]), let low = self.hexValue(input[index + 2])
            {
                output.append(high << 4 | low)
                index += 3
            } else {
                output.append(byte)
                index += 1
            }
        }
        return output
    }

    /// Percent-encodes every byte except `A–Z a–z 0–9 - . _ ~`, with upper-case hex digits.
    static func percentEncode(_ bytes: [UInt8]) -> [UInt8] {
        let hexDigits = Array("0123456789ABCDEF".utf8)
        var output: [UInt8] = []
        output.reserveCapacity(bytes.count)
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                output.append(byte)
            default:
                output.append(UInt8(ascii: "%"))
                output.append(hexDigits[Int(byte >> 4)])
                output.append(hexDigits[Int(byte & 0x0F)])
            }
        }
        return output
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    private static func hex(_ digest: SHA256.Digest) -> String {
        let hexDigits = Array("0123456789abcdef".utf8)
        var output: [UInt8] = []
        output.reserveCapacity(64)
        for byte in digest {
            output.append(hexDigits[Int(byte >> 4)])
            output.append(hexDigits[Int(byte & 0x0F)])
        }
        return String(decoding: output, as: UTF8.self)
    }
}

extension String {
    fileprivate func replacingAmpersands() -> String {
        guard self.utf8.contains(UInt8(ascii: "&")) else { return self }
        var output = ""
        output.reserveCapacity(self.utf8.count + 4)
        for scalar in self.unicodeScalars {
            if scalar == "&" { output += "%26" } else { output.unicodeScalars.append(scalar) }
        }
        return output
    }
}
