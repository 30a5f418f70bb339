import Crypto
import FlowEngine
import Foundation
import Synchronization

/// A setting that is present but unusable. The message names the setting and the problem and
/// never contains a secret the setting carries.
public struct ConfigurationValueError: Error, CustomStringConvertible, Hashable, Sendable {
    /// One line naming the setting and what is wrong with it.
    public let message: String

    public init(_ message: String) { self.message = message }

    public var description: String { self.message }
}

/// A set of installations or Connect `clientKey`s a caller may use: everything (`*`) or a list.
public struct CallerScope: Sendable, Hashable {
    private enum Kind: Hashable, Sendable {
        case all
        case some(Set<String>)
    }

    private let kind: Kind
    /// Installation scopes compare installation ARIs, so a bare id and its ARI are the same entry.
    private let normalisesInstallations: Bool

    private init(kind: Kind, normalisesInstallations: Bool) {
        self.kind = kind
        self.normalisesInstallations = normalisesInstallations
    }

    /// Every value.
    public static let all = CallerScope(kind: .all, normalisesInstallations: false)
    /// No value.
    public static let none = CallerScope(kind: .some([]), normalisesInstallations: false)

    /// A scope of exactly these values (compared as they are); `*` among them means every value.
    public init(_ values: [String]) {
        if values.contains("*") {
            self.init(kind: .all, normalisesInstallations: false)
        } else {
            self.init(kind: .some(Set(values)), normalisesInstallations: false)
        }
    }

    /// A scope of installations given as full ARIs or bare ids (both normalise to the ARI);
    /// `*` means every installation.
    ///
    /// - Throws: ``InvalidEntry`` with the position of the first value that names no installation.
    public static func installations(_ values: [String]) throws(InvalidEntry) -> CallerScope {
        if values.contains("*") { return CallerScope(kind: .all, normalisesInstallations: true) }
        var set: Set<String> = []
        for (index, value) in values.enumerated() {
            guard let id = InstallationID(value) else { throw InvalidEntry(index: index) }
            set.insert(id.ari)
        }
        return CallerScope(kind: .some(set), normalisesInstallations: true)
    }

    /// The position of a scope entry that could not be read.
    public struct InvalidEntry: Error, Hashable, Sendable {
        /// Zero-based position in the list.
        public let index: Int
    }

    /// Whether the scope allows `value`. An installation scope accepts the ARI or the bare id.
    public func contains(_ value: String) -> Bool {
        switch self.kind {
        case .all:
            return true
        case .some(let values):
            if self.normalisesInstallations {
                guard let id = InstallationID(value) else { return false }
                return values.contains(id.ari)
            }
            return values.contains(value)
        }
    }

    /// True when the scope allows every value.
    public var isAll: Bool { self.kind == .all }

    /// The listed values (sorted), or nil for ``all``.
    public var values: [String]? {
        switch self.kind {
        case .all: return nil
        case .some(let values): return values.sorted()
        }
    }
}

/// A caller's per-minute limits (contract §2 *(v1.1)*), counted across every replica in Redis.
public struct CallerLimits: Sendable, Hashable {
    /// Forced refreshes (`POST …/token/refresh`, with or without `asUser`) a minute. Default 60.
    public var refreshesPerMinute: Int = 60
    /// User-token exchanges started for the caller a minute (a forced `asUser` refresh counts
    /// toward both). Default 300.
    public var userExchangesPerMinute: Int = 300

    public init(refreshesPerMinute: Int = 60, userExchangesPerMinute: Int = 300) {
        self.refreshesPerMinute = refreshesPerMinute
        self.userExchangesPerMinute = userExchangesPerMinute
    }
}

/// An internal service allowed to ask the gateway for tokens. Holds no secret.
public struct Caller: Sendable, Hashable, CustomStringConvertible {
    /// The configured name (unique; usable as OAuth `client_id` and in logs).
    public let name: String
    /// Installations the caller may read (normalised to installation ARIs).
    public let installations: CallerScope
    /// Connect `clientKey`s the caller may use on the Connect routes.
    public let clientKeys: CallerScope
    /// Per-minute limits (`limits` in the caller's entry).
    public var limits = CallerLimits()
    /// Named-trigger keys the caller may invoke (`POST …/invoke/{key}`); none by default.
    public let invoke: CallerScope
    /// May read the status page and its JSON (`"operator": true`); default false.
    public let isOperator: Bool

    public init(
        name: String, installations: CallerScope, clientKeys: CallerScope, invoke: CallerScope = .none,
        isOperator: Bool = false
    ) {
        self.name = name
        self.installations = installations
        self.clientKeys = clientKeys
        self.invoke = invoke
        self.isOperator = isOperator
    }

    /// Names the caller in store keys (its limit counters): hex SHA-256 of the name, 24 digits.
    public var storeTag: String {
        SHA256.hash(data: Array(self.name.utf8)).prefix(12).map { String(format: "%02x", $0) }.joined()
    }

    public var description: String { "Caller(\(self.name))" }
}

/// The configured callers (`TOKEN_GATEWAY_CALLERS`) and their authentication.
///
/// Only SHA-256 digests of caller secrets are kept; presented secrets are hashed and compared
/// with every caller's digest in constant time. A secret that matched is remembered by a keyed
/// tag only (``VerifiedCredentials``), so a caller's repeated requests skip the hash.
public struct CallerRegistry: Sendable {
    /// Shortest `secret` accepted in a caller's entry.
    public static let minimumSecretLength = 16

    /// The environment variable the registry is read from; used in error messages.
    public static let settingName = "TOKEN_GATEWAY_CALLERS"

    private struct Entry: Sendable {
        let caller: Caller
        let digest: [UInt8]
    }

    private let entries: [Entry]
    /// Secrets that authenticated already, by keyed tag (``VerifiedCredentials``).
    private let verified = VerifiedCredentials()

    /// Parses the JSON array
    /// `[{"name": "…", "secret": "…" | "secretSha256": "<hex>", "installations": […], "clientKeys": […]}]`.
    ///
    /// Names are unique and non-empty; exactly one of `secret` (non-empty) and `secretSha256`
    /// (64 hex digits) is given; `installations` (ARIs, bare ids or `*`), `clientKeys` (or `*`) and
    /// `invoke` (named-trigger keys or `*`) default to none. Unknown fields are refused, so a misspelt field cannot silently widen or
    /// narrow a caller's rights.
    ///
    /// - Throws: ``ConfigurationValueError`` naming the entry (position and name) and the field,
    ///   never a secret.
    public init(json: String) throws {
        let setting = Self.settingName
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: Data(json.utf8), options: [])
        } catch {
            throw ConfigurationValueError("\(setting) is not valid JSON (expected an array of caller objects)")
        }
        guard let array = parsed as? [Any] else {
            throw ConfigurationValueError("\(setting) must be a JSON array of caller objects")
        }
        guard !array.isEmpty else {
            throw ConfigurationValueError("\(setting) configures no caller")
        }
        var entries: [Entry] = []
        var names: Set<String> = []
        for (index, element) in array.enumerated() {
            let entry = try Self.entry(element, label: "\(setting)[\(index)]", names: &names)
            // A Bearer secret finds its caller by the secret alone: two callers with one secret
            // would both act as the first.
            if let other = entries.firstIndex(where: { $0.digest == entry.digest }) {
                throw ConfigurationValueError(
                    "\(setting)[\(index)] (\"\(entry.caller.name)\"): the secret is the one of \(setting)[\(other)] "
                        + "(\"\(entries[other].caller.name)\"); every caller needs its own")
            }
            entries.append(entry)
        }
        self.entries = entries
    }

    private static let knownFields: Set<String> = [
        "name", "secret", "secretSha256", "installations", "clientKeys", "limits", "invoke", "operator",
    ]

    /// One caller object of the setting; `label` names it in errors (`…[index]`), `names` holds
    /// the names of the entries before it.
    private static func entry(_ element: Any, label position: String, names: inout Set<String>) throws -> Entry {
        guard let given = element as? [String: Any] else {
            throw ConfigurationValueError("\(position) must be a JSON object")
        }
        // A field given as null is a field left out (its default; a required one is then missing).
        let object = given.filter { !($0.value is NSNull) }
        guard let name = object["name"] as? String,
            !name.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty
        else {
            throw ConfigurationValueError("\(position): \"name\" must be a non-empty string")
        }
        guard name.count <= 128, !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control })
        else {
            throw ConfigurationValueError("\(position): \"name\" must be at most 128 printable characters")
        }
        // HTTP Basic (OAuth client authentication, the status page) splits at the first colon.
        guard !name.contains(":") else {
            throw ConfigurationValueError("\(position): \"name\" must not contain \":\" (HTTP Basic could not name it)")
        }
        let label = "\(position) (\"\(name)\")"
        guard names.insert(name).inserted else {
            throw ConfigurationValueError("\(label): the name is used by another caller")
        }
        if let unknown = object.keys.sorted().first(where: { !Self.knownFields.contains($0) }) {
            let shown = unknown.count <= 40 ? "\"\(unknown)\"" : "with a \(unknown.count)-character name"
            throw ConfigurationValueError(
                "\(label): unknown field \(shown) (fields: name, secret, secretSha256, installations, clientKeys, "
                    + "limits, invoke, operator)"
            )
        }
        let digest = try Self.secretDigest(object, label: label)
        let installationValues = try Self.stringList(object["installations"], field: "installations", label: label)
        let installations: CallerScope
        do {
            installations = try CallerScope.installations(installationValues)
        } catch {
            throw ConfigurationValueError(
                "\(label): \"installations\"[\(error.index)] is neither \"*\", "
                    + "an installation ARI nor an installation id"
            )
        }
        let clientKeyValues = try Self.stringList(object["clientKeys"], field: "clientKeys", label: label)
        if clientKeyValues.contains(where: \.isEmpty) {
            throw ConfigurationValueError("\(label): \"clientKeys\" contains an empty string")
        }
        var isOperator = false
        if let flag = object["operator"] {
            guard let flag = JSONValue.strictBool(flag) else {
                throw ConfigurationValueError("\(label): \"operator\" must be true or false")
            }
            isOperator = flag
        }
        let invokeValues = try Self.stringList(object["invoke"], field: "invoke", label: label)
        if let bad = invokeValues.firstIndex(where: { $0 != "*" && !NamedTriggerKey.isValid($0) }) {
            throw ConfigurationValueError(
                "\(label): \"invoke\"[\(bad)] is neither \"*\" nor a trigger key "
                    + "(1–64 of a–z 0–9 _ -, starting with a letter or digit)")
        }
        var caller = Caller(
            name: name, installations: installations, clientKeys: CallerScope(clientKeyValues),
            invoke: CallerScope(invokeValues), isOperator: isOperator)
        caller.limits = try Self.limits(object["limits"], label: label)
        return Entry(caller: caller, digest: digest)
    }

    /// The SHA-256 of a caller's secret: from exactly one of `secret` (hashed here) and
    /// `secretSha256`. Errors say the length at most, never the value.
    private static func secretDigest(_ object: [String: Any], label: String) throws -> [UInt8] {
        switch (object["secret"], object["secretSha256"]) {
        case (.some, .some), (.none, .none):
            throw ConfigurationValueError("\(label): give exactly one of \"secret\" and \"secretSha256\"")
        case (.some(let secret), .none):
            guard let secret = secret as? String, !secret.isEmpty else {
                throw ConfigurationValueError("\(label): \"secret\" must be a non-empty string")
            }
            // A short secret can be guessed; the length is said, never the value.
            guard secret.count >= Self.minimumSecretLength else {
                throw ConfigurationValueError(
                    "\(label): \"secret\" must be at least \(Self.minimumSecretLength) characters long")
            }
            return Array(SHA256.hash(data: Array(secret.utf8)))
        case (.none, .some(let hex)):
            guard let hex = hex as? String, let bytes = Self.decodeHex(hex), bytes.count == 32 else {
                throw ConfigurationValueError("\(label): \"secretSha256\" must be 64 hexadecimal digits")
            }
            return bytes
        }
    }

    /// The callers, in configuration order.
    public var callers: [Caller] { self.entries.map(\.caller) }

    /// The caller whose secret is presented as `Authorization: Bearer <secret>`, or nil.
    ///
    /// The scheme is matched case-insensitively. A secret that matched before is found by its
    /// keyed tag; any other is hashed and its digest compared with every caller's in constant
    /// time, without stopping at a match.
    public func authenticate(authorization: String?) -> Caller? {
        guard let authorization, let secret = Self.bearerCredential(authorization) else { return nil }
        // A secret that authenticated before is known by its keyed tag; any other goes through
        // the digest comparison (and is remembered when it matches).
        let tag = self.verified.tag(secret)
        if let index = self.verified.caller(for: tag) { return self.entries[index].caller }
        let digest = Array(SHA256.hash(data: Array(secret.utf8)))
        var match: Int?
        for (index, entry) in self.entries.enumerated() {
            let equal = ConstantTime.equal(entry.digest, digest)
            if equal, match == nil { match = index }
        }
        guard let match else { return nil }
        self.verified.remember(tag, caller: match)
        return self.entries[match].caller
    }

    /// The caller named `name` if `secret` is its secret (OAuth client authentication), or nil.
    /// The digest comparison runs whether or not the name exists.
    public func authenticate(name: String, secret: String) -> Caller? {
        let digest = Array(SHA256.hash(data: Array(secret.utf8)))
        let entry = self.entries.first { $0.caller.name == name }
        let expected = entry?.digest ?? Self.unmatchableDigest
        let equal = ConstantTime.equal(expected, digest)
        guard equal, let entry else { return nil }
        return entry.caller
    }

    /// The caller presenting `Authorization: Basic base64(name:secret)` (scheme case-insensitive), or nil.
    public func authenticate(basicAuthorization header: String?) -> Caller? {
        guard let header, header.count > 6, header.prefix(6).lowercased() == "basic " else { return nil }
        let encoded = header.dropFirst(6).trimmingCharacters(in: .whitespaces)
        guard let data = Data(base64Encoded: encoded), let text = String(data: data, encoding: .utf8),
            let colon = text.firstIndex(of: ":")
        else { return nil }
        return self.authenticate(name: String(text[..<colon]), secret: String(text[text.index(after: colon)...]))
    }

    /// A digest no secret is known to hash to; compared against when a name is unknown.
    private static let unmatchableDigest = [UInt8](repeating: 0, count: 32)

    /// The credential of `Bearer <credential>` (scheme case-insensitive), or nil.
    static func bearerCredential(_ header: String) -> String? {
        let scheme = "bearer"
        // The usual header, `Bearer <credential>` with an ASCII scheme and a credential that
        // neither starts nor ends with a space, tab or non-ASCII byte, is read without copying or
        // trimming (this runs on every call); anything else takes the general path below.
        let bytes = header.utf8
        if bytes.count > scheme.utf8.count + 1,
            zip(bytes, scheme.utf8).allSatisfy({ $0 | 0x20 == $1 }),
            bytes[bytes.index(bytes.startIndex, offsetBy: scheme.utf8.count)] == UInt8(ascii: " ")
        {
            let credential = bytes.dropFirst(scheme.utf8.count + 1)
            if let first = credential.first, let last = credential.last,
                !HeaderValue.mayBeTrimmed(first), !HeaderValue.mayBeTrimmed(last)
            {
                return String(Substring(credential))
            }
        }
        let utf8 = Array(header.utf8)
        guard utf8.count > scheme.utf8.count + 1,
            String(decoding: utf8[0..<scheme.utf8.count], as: UTF8.self).lowercased() == scheme,
            utf8[scheme.utf8.count] == UInt8(ascii: " ")
        else { return nil }
        let credential = String(decoding: utf8[(scheme.utf8.count + 1)...], as: UTF8.self)
            .trimmingCharacters(in: .whitespaces)
        return credential.isEmpty ? nil : credential
    }

    /// The `limits` object: `refreshesPerMinute` and `userExchangesPerMinute`, integers 0–1,000,000,
    /// each defaulted when absent.
    private static func limits(_ value: Any?, label: String) throws -> CallerLimits {
        var limits = CallerLimits()
        guard let value, !(value is NSNull) else { return limits }
        guard let object = value as? [String: Any] else {
            throw ConfigurationValueError("\(label): \"limits\" must be an object")
        }
        for (key, raw) in object.sorted(by: { $0.key < $1.key }) where !(raw is NSNull) {
            guard ["refreshesPerMinute", "userExchangesPerMinute"].contains(key) else {
                throw ConfigurationValueError(
                    "\(label): unknown field in \"limits\" (fields: refreshesPerMinute, userExchangesPerMinute)")
            }
            // JSON `true`/`false` arrive as numbers too: they are not integers.
            guard let number = JSONValue.strictNumber(raw), let int = Int(exactly: number),
                (0...1_000_000).contains(int)
            else {
                throw ConfigurationValueError("\(label): \"limits\".\(key) must be an integer in 0…1000000")
            }
            if key == "refreshesPerMinute" {
                limits.refreshesPerMinute = int
            } else {
                limits.userExchangesPerMinute = int
            }
        }
        return limits
    }

    private static func stringList(_ value: Any?, field: String, label: String) throws -> [String] {
        guard let value else { return [] }
        guard let array = value as? [Any] else {
            throw ConfigurationValueError("\(label): \"\(field)\" must be an array of strings")
        }
        return try array.map { element in
            guard let string = element as? String else {
                throw ConfigurationValueError("\(label): \"\(field)\" must be an array of strings")
            }
            return string
        }
    }

    private static func decodeHex(_ hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var index = 0
        while index < digits.count {
            guard let high = Self.hexValue(digits[index]), let low = Self.hexValue(digits[index + 1]) else {
                return nil
            }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

extension CallerRegistry: CustomStringConvertible {
    /// Shows caller names only.
    public var description: String {
        "CallerRegistry(\(self.entries.map(\.caller.name).joined(separator: ", ")))"
    }
}

/// Secrets that authenticated already, so a caller's repeated requests skip SHA-256: a bounded
/// map from a 128-bit keyed tag of the presented secret to the caller.
///
/// The tag is SipHash (Swift's `Hasher`) over a 128-bit random salt drawn for this process and the
/// secret, twice with independent salts; neither the secret nor an unkeyed hash of it is kept, so
/// the map reveals nothing about a secret, and an attacker who cannot read the salts cannot make
/// a wrong secret's tag equal a remembered one. Only secrets whose SHA-256 matched a caller's
/// digest are entered, so a wrong secret always takes the constant-time digest comparison.
final class VerifiedCredentials: Sendable {
    struct Tag: Hashable, Sendable {
        let high: Int
        let low: Int
    }

    /// Tags kept at most; when full, the map is emptied and refilled by the next requests.
    static let capacity = 1024

    private let salts: (UInt64, UInt64, UInt64, UInt64)
    private let tags = Mutex<[Tag: Int]>([:])

    init() {
        var generator = SystemRandomNumberGenerator()
        self.salts = (generator.next(), generator.next(), generator.next(), generator.next())
    }

    func tag(_ secret: String) -> Tag {
        var high = Hasher()
        high.combine(self.salts.0)
        high.combine(self.salts.1)
        var low = Hasher()
        low.combine(self.salts.2)
        low.combine(self.salts.3)
        var secret = secret
        secret.withUTF8 { bytes in
            high.combine(bytes: UnsafeRawBufferPointer(bytes))
            low.combine(bytes: UnsafeRawBufferPointer(bytes))
        }
        return Tag(high: high.finalize(), low: low.finalize())
    }

    /// The index of the caller a remembered tag belongs to.
    func caller(for tag: Tag) -> Int? {
        self.tags.withLock { $0[tag] }
    }

    func remember(_ tag: Tag, caller: Int) {
        self.tags.withLock { tags in
            if tags.count >= Self.capacity { tags.removeAll(keepingCapacity: true) }
            tags[tag] = caller
        }
    }

    /// Tags remembered (for tests).
    var count: Int { self.tags.withLock { $0.count } }
}
