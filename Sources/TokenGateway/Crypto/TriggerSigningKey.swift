import Crypto

/// Why a trigger-signing key or signature header was refused. Descriptions never contain key material.
public struct TriggerSigningError: Error, Hashable, Sendable, CustomStringConvertible {
    private enum Code: String, Hashable, Sendable {
        case invalidKeyId = "invalid_key_id"
        case invalidPrivateKey = "invalid_private_key"
        case malformedHeader = "malformed_signature_header"
    }

    private let code: Code

    private init(_ code: Code) { self.code = code }

    /// A key id that is empty, longer than 64 characters or not made of `A–Z a–z 0–9 _ -`.
    public static let invalidKeyId = TriggerSigningError(.invalidKeyId)
    /// Raw private key bytes that are not a 32-byte Ed25519 seed.
    public static let invalidPrivateKey = TriggerSigningError(.invalidPrivateKey)
    /// An `X-Token-Gateway-Signature` value not of the form `keyId=<id>, signature=<base64url>`.
    public static let malformedHeader = TriggerSigningError(.malformedHeader)

    public var description: String { "TriggerSigningError(\(self.code.rawValue))" }
}

/// An installation's Ed25519 key for signing auth-trigger calls (contract §4).
///
/// The public half goes to the Forge side at registration; the private half is kept in the store,
/// sealed (``rawPrivateKey``). The printed form shows the key id only.
public struct TriggerSigningKey: Sendable {
    /// Random, URL-safe identifier of this key: `tk_` followed by 16 base64url characters.
    public let keyId: String
    /// The Ed25519 private key.
    public let privateKey: Curve25519.Signing.PrivateKey

    /// The name of the header that carries the signature.
    public static let headerName = "X-Token-Gateway-Signature"

    /// A new key with a new random key id.
    public static func generate() -> TriggerSigningKey {
        var random = SystemRandomNumberGenerator()
        let idBytes = (0..<12).map { _ in UInt8.random(in: .min ... .max, using: &random) }
        return TriggerSigningKey(uncheckedKeyId: "tk_" + Base64URL.encode(idBytes), privateKey: .init())
    }

    /// Restores a key from its id and its 32-byte raw private key (as returned by ``rawPrivateKey``).
    ///
    /// - Throws: ``TriggerSigningError/invalidKeyId`` or ``TriggerSigningError/invalidPrivateKey``.
    public init(keyId: String, rawPrivateKey: [UInt8]) throws {
        guard Self.isValidKeyId(keyId) else { throw TriggerSigningError.invalidKeyId }
        guard rawPrivateKey.count == 32,
            let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: rawPrivateKey)
        else { throw TriggerSigningError.invalidPrivateKey }
        self.init(uncheckedKeyId: keyId, privateKey: key)
    }

    private init(uncheckedKeyId keyId: String, privateKey: Curve25519.Signing.PrivateKey) {
        self.keyId = keyId
        self.privateKey = privateKey
    }

    /// The 32-byte raw private key. Only for sealing at rest; never log or send it.
    public var rawPrivateKey: [UInt8] { Array(self.privateKey.rawRepresentation) }

    /// The public key.
    public var publicKey: Curve25519.Signing.PublicKey { self.privateKey.publicKey }

    /// Base64url (no padding) of the 32-byte raw public key, as `/forge/register` answers it.
    public var publicKeyBase64URL: String { Base64URL.encode(self.privateKey.publicKey.rawRepresentation) }

    /// The `X-Token-Gateway-Signature` value for `body`:
    /// `keyId=<id>, signature=<base64url Ed25519 signature over the exact body bytes>`.
    ///
    /// - Throws: only if the system's Ed25519 implementation fails.
    public func signatureHeader(for body: [UInt8]) throws -> String {
        let signature = try self.privateKey.signature(for: body)
        return TriggerSignatureHeader.format(keyId: self.keyId, signature: Array(signature))
    }

    /// Whether `keyId` is a valid trigger key id: 1–64 characters of `A–Z a–z 0–9 _ -`.
    public static func isValidKeyId(_ keyId: String) -> Bool {
        (1...64).contains(keyId.utf8.count) && keyId.utf8.allSatisfy(isKeyIdByte)
    }

    fileprivate static func isKeyIdByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }
}

extension TriggerSigningKey: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Shows the key id only.
    public var description: String { "TriggerSigningKey(keyId: \(self.keyId))" }
    /// Shows the key id only.
    public var debugDescription: String { self.description }
    /// Reflection shows the key id only.
    public var customMirror: Mirror { Mirror(self, children: ["keyId": self.keyId], displayStyle: .struct) }
}

/// A parsed `X-Token-Gateway-Signature` value (contract §4).
public struct TriggerSignatureHeader: Sendable, Hashable {
    /// The signing key's id.
    public let keyId: String
    /// The 64-byte Ed25519 signature.
    public let signature: [UInt8]

    /// Parses exactly `keyId=<id>, signature=<base64url>`: these two pairs, in this order,
    /// separated by `, `, with a valid key id and a 64-byte signature.
    ///
    /// - Throws: ``TriggerSigningError/malformedHeader``.
    public init(parsing value: String) throws {
        let keyIdPrefix = "keyId="
        let separator = ", signature="
        guard value.hasPrefix(keyIdPrefix),
            let range = value.firstRange(of: separator)
        else { throw TriggerSigningError.malformedHeader }
        let keyId = String(value[value.index(value.startIndex, offsetBy: keyIdPrefix.count)..<range.lowerBound])
        let encoded = String(value[range.upperBound...])
        guard TriggerSigningKey.isValidKeyId(keyId),
            let signature = Base64URL.decode(encoded),
            signature.count == 64
        else { throw TriggerSigningError.malformedHeader }
        self.keyId = keyId
        self.signature = signature
    }

    /// Whether ``signature`` is a valid Ed25519 signature of `body` by `publicKey`.
    public func verify(body: [UInt8], publicKey: Curve25519.Signing.PublicKey) -> Bool {
        publicKey.isValidSignature(self.signature, for: body)
    }

    static func format(keyId: String, signature: [UInt8]) -> String {
        "keyId=\(keyId), signature=\(Base64URL.encode(signature))"
    }
}
