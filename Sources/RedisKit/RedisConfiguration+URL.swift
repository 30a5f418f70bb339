/// Parses Redis URLs into a ``RedisConfiguration``. Error messages name the malformed part only and never echo
/// the input, because the input may hold a password.
enum RedisURLParser {
    static let defaultRedisPort = 6379
    static let defaultSentinelPort = 26379

    static func parse(_ url: String) throws(RedisConfigurationError) -> RedisConfiguration {
        let usage =
            "expected redis://[[user]:password@]host:port/db, redis-sentinel://…, redis-cluster://… "
            + "(or rediss…:// for TLS)"
        guard let schemeEnd = url.firstRange(of: "://") else {
            throw RedisConfigurationError(usage)
        }
        let scheme = url[..<schemeEnd.lowerBound].lowercased()
        let rest = url[schemeEnd.upperBound...]
        let kind: Substring
        let usesTLS: Bool
        switch scheme {
        case "redis", "redis-sentinel", "redis-cluster":
            (kind, usesTLS) = (scheme.dropFirst("redis".count), false)
        case "rediss", "rediss-sentinel", "rediss-cluster":
            (kind, usesTLS) = (scheme.dropFirst("rediss".count), true)
        default:
            throw RedisConfigurationError(
                "the scheme must be redis://, redis-sentinel://, redis-cluster:// or their rediss variants")
        }

        // The password may contain "@", "/" or ":"; the host part never contains "@", so split at the last one.
        let credentials: (username: String?, password: String?)
        let location: Substring
        if let at = rest.lastIndex(of: "@") {
            credentials = try self.parseUserInfo(rest[..<at])
            location = rest[rest.index(after: at)...]
        } else {
            credentials = (nil, nil)
            location = rest
        }
        if location.contains("?") || location.contains("#") {
            throw RedisConfigurationError("query parameters and fragments are not supported")
        }

        let authority: Substring
        let pathSegments: [Substring]
        if let slash = location.firstIndex(of: "/") {
            authority = location[..<slash]
            pathSegments = location[location.index(after: slash)...]
                .split(separator: "/", omittingEmptySubsequences: false)
        } else {
            authority = location
            pathSegments = []
        }

        let (endpoint, database) = try self.parseEndpoint(kind: kind, authority: authority, path: pathSegments)
        let tls: RedisTLS? = if usesTLS { try RedisTLS() } else { nil }
        return RedisConfiguration(
            endpoint: endpoint,
            username: credentials.username,
            password: credentials.password,
            tls: tls,
            database: database
        )
    }

    /// The endpoint and database of a URL's authority and path, by the scheme's kind (`""`,
    /// `"-sentinel"` or `"-cluster"`).
    private static func parseEndpoint(
        kind: Substring, authority: Substring, path pathSegments: [Substring]
    ) throws(RedisConfigurationError) -> (RedisConfiguration.Endpoint, Int) {
        switch kind {
        case "-sentinel":
            let sentinels = try self.parseHosts(authority, defaultPort: self.defaultSentinelPort)
            guard let masterSegment = pathSegments.first, !masterSegment.isEmpty else {
                throw RedisConfigurationError("the master name is missing (redis-sentinel://h1:p1,h2:p2/<master>[/db])")
            }
            guard let masterName = self.percentDecoded(masterSegment), !masterName.contains(" ") else {
                throw RedisConfigurationError("the master name is malformed")
            }
            let database = try self.parseDatabase(pathSegments.dropFirst())
            return (.sentinel(sentinels: sentinels, masterName: masterName), database)
        case "-cluster":
            let seeds = try self.parseHosts(authority, defaultPort: self.defaultRedisPort)
            let database = try self.parseDatabase(pathSegments[...])
            guard database == 0 else {
                throw RedisConfigurationError("a Redis Cluster has database 0 only")
            }
            return (.cluster(seeds: seeds), database)
        default:
            if authority.contains(",") {
                throw RedisConfigurationError("several hosts need redis-sentinel:// or redis-cluster://")
            }
            let (host, port) = try self.parseHostPort(authority, defaultPort: self.defaultRedisPort)
            return (.direct(host: host, port: port), try self.parseDatabase(pathSegments[...]))
        }
    }

    private static func parseHosts(
        _ authority: Substring,
        defaultPort: Int
    ) throws(RedisConfigurationError) -> [RedisNodeAddress] {
        try authority.split(separator: ",", omittingEmptySubsequences: false).map {
            host throws(RedisConfigurationError) in
            let (host, port) = try self.parseHostPort(host, defaultPort: defaultPort)
            return RedisNodeAddress(host: host, port: port)
        }
    }

    /// `[user]:password` (percent-encoded); an empty user info or an empty password means none. A user needs a
    /// password.
    private static func parseUserInfo(
        _ userInfo: Substring
    ) throws(RedisConfigurationError) -> (username: String?, password: String?) {
        if userInfo.isEmpty {
            return (nil, nil)
        }
        guard let colon = userInfo.firstIndex(of: ":") else {
            throw RedisConfigurationError("the password must follow a colon: redis://[user]:password@host:port/db")
        }
        guard let username = self.percentDecoded(userInfo[..<colon]) else {
            throw RedisConfigurationError("the user name has an invalid percent-encoding")
        }
        guard let password = self.percentDecoded(userInfo[userInfo.index(after: colon)...]) else {
            throw RedisConfigurationError("the password has an invalid percent-encoding")
        }
        if password.isEmpty {
            guard username.isEmpty else {
                throw RedisConfigurationError("a user name needs a password: redis://user:password@host:port/db")
            }
            return (nil, nil)
        }
        guard !username.contains(where: { $0 == " " || $0.isNewline }) else {
            throw RedisConfigurationError("the user name is malformed")
        }
        return (username.isEmpty ? nil : username, password)
    }

    private static func parseHostPort(
        _ text: Substring,
        defaultPort: Int
    ) throws(RedisConfigurationError) -> (String, Int) {
        let host: Substring
        let portText: Substring?
        if text.first == "[" {
            guard let close = text.firstIndex(of: "]") else {
                throw RedisConfigurationError("an IPv6 host is missing its closing bracket")
            }
            host = text[text.index(after: text.startIndex)..<close]
            let afterHost = text[text.index(after: close)...]
            if afterHost.isEmpty {
                portText = nil
            } else if afterHost.first == ":" {
                portText = afterHost.dropFirst()
            } else {
                throw RedisConfigurationError("unexpected characters after an IPv6 host")
            }
        } else if let colon = text.firstIndex(of: ":") {
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        } else {
            host = text
            portText = nil
        }
        guard !host.isEmpty else {
            throw RedisConfigurationError("a host is missing")
        }
        guard host.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_" || $0 == ":" })
        else {
            throw RedisConfigurationError("a host contains invalid characters")
        }
        guard let portText else {
            return (String(host), defaultPort)
        }
        guard portText.allSatisfy(\.isASCII), let port = Int(portText), (1...65535).contains(port) else {
            throw RedisConfigurationError("a port must be a number from 1 to 65535")
        }
        return (String(host), port)
    }

    /// No segment or one empty segment: database 0. One numeric segment: that database.
    private static func parseDatabase(_ segments: ArraySlice<Substring>) throws(RedisConfigurationError) -> Int {
        guard let first = segments.first else {
            return 0
        }
        guard segments.count == 1 else {
            throw RedisConfigurationError("unexpected path segments after the database number")
        }
        if first.isEmpty {
            return 0
        }
        guard first.allSatisfy(\.isASCII), let database = Int(first), (0...Int(Int32.max)).contains(database) else {
            throw RedisConfigurationError("the database must be a non-negative integer")
        }
        return database
    }

    /// Decodes `%XX` escapes; `nil` for a malformed escape or bytes that are not UTF-8.
    static func percentDecoded(_ text: Substring) -> String? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.utf8.count)
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next().flatMap(self.hexValue), let low = iterator.next().flatMap(self.hexValue)
            else {
                return nil
            }
            bytes.append(high << 4 | low)
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
