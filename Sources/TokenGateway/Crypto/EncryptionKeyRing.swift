import Crypto
import Foundation

/// Why a sealed secret could not be opened. Descriptions never contain key material or plaintext.
public struct EncryptionError: Error, Hashable, Sendable, CustomStringConvertible {
    private enum Code: String, Hashable, Sendable {
        case unknownKey = "unknown_key"
        case corrupt = "corrupt"
        case authenticationFailed = "authentication_failed"
    }

    private let code: Code

    private init(_ code: Code) { self.code = code }

    /// The blob names a key id that is not in the key ring (for example a retired key).
    public static let unknownKey = EncryptionError(.unknownKey)
    /// The blob is not of the form `<keyId>.<base64url(nonce|ciphertext|tag)>`.
    public static let corrupt = EncryptionError(.corrupt)
    /// AES-GCM refused the blob: it was tampered with, or sealed under another context.
    public static let authenticationFailed = EncryptionError(.authenticationFailed)

    public var description: String { "EncryptionError(\(self.code.rawValue))" }
}

/// Encryption at rest for the secrets the gateway keeps in Redis (tokens, shared secrets,
/// signing keys): AES-256-GCM under a ring of named keys.
///
/// The first key seals; every key opens, so keys rotate by putting a new key first and keeping the
/// old ones until every blob has been rewritten (``keyId(of:)`` tells which key sealed a blob).
/// The `context` (the Redis key name) is bound as additional authenticated data, so a blob copied
/// under another key does not open.
///
/// Sealed form: `<keyId>.<base64url(nonce ‖ ciphertext ‖ tag)>` — ASCII, with a 12-byte random
/// nonce and a 16-byte tag. The printed form of the ring shows key ids only.
public struct EncryptionKeyRing: Sendable {
    /// The environment variable this ring is read from; used in error messages.
    public static let settingName = "TOKEN_GATEWAY_ENCRYPTION_KEYS"

    private let keys: [(id: String, key: SymmetricKey)]
    private let byId: [String: SymmetricKey]
    /// The deterministic nonces' HMAC key, derived once from the sealing key.
    private let nonceKey: SymmetricKey

    /// Parses `TOKEN_GATEWAY_ENCRYPTION_KEYS`: comma-separated `keyId:base64(32 bytes)` entries
    /// (standard or url-safe base64, padding optional, blanks around entries ignored). A key id is
    /// 1–32 characters of `A–Z a–z 0–9 _ -`. The first entry encrypts; all decrypt.
    ///
    /// - Throws: ``ConfigurationValueError`` naming the setting, the entry's position and the
    ///   problem (and the key id when it is valid) — never the key material.
    public init(parsing setting: String) throws {
        let name = Self.settingName
        let trimmed = setting.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !trimmed.isEmpty else {
            throw ConfigurationValueError("\(name) is empty; expected comma-separated keyId:base64key entries")
        }
        var keys: [(id: String, key: SymmetricKey)] = []
        var seen: Set<String> = []
        for (offset, rawEntry) in trimmed.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            let position = offset + 1
            let entry = rawEntry.trimmingCharacters(in: .whitespacesAndNewlines)
            guard !entry.isEmpty else {
                throw ConfigurationValueError("\(name): entry \(position) is empty")
            }
            guard let colon = entry.firstIndex(of: ":") else {
                throw ConfigurationValueError("\(name): entry \(position) is not of the form keyId:base64key")
            }
            let id = String(entry[..<colon])
            guard Self.isValidKeyId(id) else {
                throw ConfigurationValueError(
                    "\(name): entry \(position) has an invalid key id (1–32 characters of A–Z a–z 0–9 _ -)"
                )
            }
            guard seen.insert(id).inserted else {
                throw ConfigurationValueError("\(name): key id \"\(id)\" appears more than once")
            }
            let material = String(entry[entry.index(after: colon)...])
            guard let bytes = Self.decodeAnyBase64(material) else {
                throw ConfigurationValueError("\(name): key \"\(id)\" is not valid base64")
            }
            guard bytes.count == 32 else {
                throw ConfigurationValueError(
                    "\(name): key \"\(id)\" must decode to 32 bytes, got \(bytes.count)"
                )
            }
            keys.append((id: id, key: SymmetricKey(data: bytes)))
        }
        try self.init(keys: keys)
    }

    /// Builds a ring from keys; the first one seals.
    ///
    /// - Throws: ``ConfigurationValueError`` when the list is empty, an id is invalid or repeated, or
    ///   a key is not 256 bits.
    public init(keys: [(id: String, key: SymmetricKey)]) throws {
        let name = Self.settingName
        guard !keys.isEmpty else {
            throw ConfigurationValueError("\(name): at least one key is required")
        }
        var byId: [String: SymmetricKey] = [:]
        for (position, entry) in keys.enumerated() {
            guard Self.isValidKeyId(entry.id) else {
                throw ConfigurationValueError(
                    "\(name): key \(position + 1) has an invalid key id (1–32 characters of A–Z a–z 0–9 _ -)"
                )
            }
            guard entry.key.bitCount == 256 else {
                throw ConfigurationValueError("\(name): key \"\(entry.id)\" must be 32 bytes")
            }
            guard byId.updateValue(entry.key, forKey: entry.id) == nil else {
                throw ConfigurationValueError("\(name): key id \"\(entry.id)\" appears more than once")
            }
        }
        self.keys = keys
        self.byId = byId
        self.nonceKey = Self.deriveNonceKey(keys[0].key)
    }

    private static func deriveNonceKey(_ key: SymmetricKey) -> SymmetricKey {
        HKDF<SHA256>.deriveKey(
            inputKeyMaterial: key, info: Array("token-gateway deterministic nonce".utf8), outputByteCount: 32)
    }

    /// The id of the key that seals.
    public var currentKeyId: String { self.keys[0].id }

    /// Every key id, sealing key first.
    public var keyIds: [String] { self.keys.map(\.id) }

    /// Seals `plaintext` with the current key, binding `context` as additional authenticated data.
    ///
    /// - Returns: `"<keyId>.<base64url(nonce|ciphertext|tag)>"`.
    /// - Throws: only if the system's AES-GCM implementation fails.
    public func seal(_ plaintext: [UInt8], context: String) throws -> String {
        let current = self.keys[0]
        let box = try AES.GCM.seal(
            plaintext,
            using: current.key,
            nonce: AES.GCM.Nonce(),
            authenticating: Array(context.utf8)
        )
        guard let combined = box.combined else {
            // Only possible with a non-standard nonce size, which `AES.GCM.Nonce()` never makes.
            throw EncryptionError.corrupt
        }
        return current.id + "." + Base64URL.encode(combined)
    }

    /// Seals like ``seal(_:context:)``, but with a nonce derived from the key, the context and the
    /// plaintext (HMAC-SHA256 under a key derived with HKDF, truncated to 96 bits; a synthetic IV),
    /// so equal values under one key and context seal to the same blob and can be compared in
    /// place (Lua scripts that keep or replace a routing field). Used only for non-secret routing
    /// data, which needs integrity, not secrecy; it reveals equality of such values and nothing else.
    public func sealDeterministically(_ plaintext: [UInt8], context: String) throws -> String {
        try Self.sealDeterministically(plaintext, context: context, key: self.keys[0], nonceKey: self.nonceKey)
    }

    /// ``sealDeterministically(_:context:)`` under each key of the ring, the sealing key first: what
    /// a ring that had that key first gave. A keyed digest stored before a rotation (the Connect
    /// replay guard's) is recognised after it.
    public func sealDeterministicallyUnderEveryKey(_ plaintext: [UInt8], context: String) throws -> [String] {
        var out = [try self.sealDeterministically(plaintext, context: context)]
        for entry in self.keys.dropFirst() {
            out.append(
                try Self.sealDeterministically(
                    plaintext, context: context, key: entry, nonceKey: Self.deriveNonceKey(entry.key)))
        }
        return out
    }

    private static func sealDeterministically(
        _ plaintext: [UInt8], context: String, key: (id: String, key: SymmetricKey), nonceKey: SymmetricKey
    ) throws -> String {
        var mac = HMAC<SHA256>(key: nonceKey)
        mac.update(data: Array(context.utf8))
        mac.update(data: [0])
        mac.update(data: plaintext)
        let nonce = try AES.GCM.Nonce(data: Array(Array(mac.finalize()).prefix(12)))
        let box = try AES.GCM.seal(plaintext, using: key.key, nonce: nonce, authenticating: Array(context.utf8))
        guard let combined = box.combined else { throw EncryptionError.corrupt }
        return key.id + "." + Base64URL.encode(combined)
    }

    /// Opens a blob made by ``seal(_:context:)`` with the key it names.
    ///
    /// - Throws: ``EncryptionError/unknownKey`` when the key id is not in the ring,
    ///   ``EncryptionError/corrupt`` when the blob is malformed, and
    ///   ``EncryptionError/authenticationFailed`` when it was tampered with or sealed under
    ///   another `context`.
    public func open(_ sealed: String, context: String) throws -> [UInt8] {
        guard let (id, payload) = Self.split(sealed) else { throw EncryptionError.corrupt }
        guard let key = self.byId[id] else { throw EncryptionError.unknownKey }
        // 12-byte nonce + 16-byte tag at least.
        guard let combined = Base64URL.decode(payload), combined.count >= 28 else {
            throw EncryptionError.corrupt
        }
        let box: AES.GCM.SealedBox
        do {
            box = try AES.GCM.SealedBox(combined: combined)
        } catch {
            throw EncryptionError.corrupt
        }
        do {
            return Array(try AES.GCM.open(box, using: key, authenticating: Array(context.utf8)))
        } catch {
            throw EncryptionError.authenticationFailed
        }
    }

    /// The key id a sealed blob names, or nil when the blob is malformed. Use it to find blobs
    /// that still need rewrapping under ``currentKeyId``.
    public static func keyId(of sealed: String) -> String? {
        self.split(sealed)?.keyId
    }

    private static func split(_ sealed: String) -> (keyId: String, payload: String)? {
        guard let dot = sealed.firstIndex(of: ".") else { return nil }
        let id = String(sealed[..<dot])
        let payload = String(sealed[sealed.index(after: dot)...])
        guard self.isValidKeyId(id), !payload.isEmpty else { return nil }
        return (id, payload)
    }

    static func isValidKeyId(_ id: String) -> Bool {
        (1...32).contains(id.utf8.count)
            && id.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"):
                    return true
                default:
                    return false
                }
            }
    }

    /// Standard or url-safe base64, padding optional.
    private static func decodeAnyBase64(_ string: String) -> [UInt8]? {
        let urlSafe = string.utf8.map { byte -> UInt8 in
            switch byte {
            case UInt8(ascii: "+"): return UInt8(ascii: "-")
            case UInt8(ascii: "/"): return UInt8(ascii: "_")
            default: return byte
            }
        }
        return Base64URL.decode(utf8: urlSafe)
    }
}

extension EncryptionKeyRing: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Shows key ids only.
    public var description: String {
        "EncryptionKeyRing(current: \(self.currentKeyId), keys: [\(self.keyIds.joined(separator: ", "))])"
    }

    /// Shows key ids only.
    public var debugDescription: String { self.description }

    /// Reflection (`dump`, `print` of an enclosing value) shows key ids only.
    public var customMirror: Mirror {
        Mirror(self, children: ["currentKeyId": self.currentKeyId, "keyIds": self.keyIds], displayStyle: .struct)
    }
}
