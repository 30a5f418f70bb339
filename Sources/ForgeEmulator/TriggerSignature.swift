import Base64URLCoding
import Crypto
import Foundation

/// The `X-Token-Gateway-Signature` header the gateway puts on every auth-trigger call
/// (`spec/contract.md` §4):
///
/// ```
/// X-Token-Gateway-Signature: keyId=<triggerKeyId>, signature=<base64url Ed25519 signature over the exact body bytes>
/// ```
///
/// Exactly these two pairs, in this order, separated by `", "`. The parser accepts nothing else: no
/// other order, no extra or missing pairs, no other separators or whitespace, no quoting, no empty
/// values, and a signature that decodes to exactly 64 bytes (base64url, padding optional).
public struct TriggerSignature: Sendable, Hashable {
    /// The header's name.
    public static let headerName = "X-Token-Gateway-Signature"

    /// The key id the gateway named (`triggerKeyId` from `/forge/register`).
    public let keyId: String
    /// The raw 64-byte Ed25519 signature.
    public let signature: Data

    /// Creates a signature value from its parts.
    public init(keyId: String, signature: Data) {
        self.keyId = keyId
        self.signature = signature
    }

    /// Parses a header value in the exact format above; `nil` for any variant.
    public init?(headerValue: String) {
        let keyIdPrefix = "keyId="
        let separator = ", signature="
        guard headerValue.hasPrefix(keyIdPrefix),
            let separatorRange = headerValue.range(of: separator)
        else { return nil }
        let keyId = headerValue[
            headerValue.index(headerValue.startIndex, offsetBy: keyIdPrefix.count)..<separatorRange.lowerBound]
        let encodedSignature = headerValue[separatorRange.upperBound...]
        guard !keyId.isEmpty, keyId.allSatisfy(Self.isKeyIdCharacter) else { return nil }
        guard let signature = Base64URL.decode(encodedSignature), signature.count == 64 else { return nil }
        self.init(keyId: String(keyId), signature: Data(signature))
    }

    /// The header value for this signature, in the exact format the gateway writes.
    public var headerValue: String {
        "keyId=\(self.keyId), signature=\(Base64URL.encode(self.signature))"
    }

    /// Signs `body` with `privateKey` the way the gateway does (for tests that play the gateway's
    /// part against the emulator's trigger).
    public static func sign(
        body: some DataProtocol,
        keyId: String,
        privateKey: Curve25519.Signing.PrivateKey
    ) throws -> TriggerSignature {
        TriggerSignature(keyId: keyId, signature: try privateKey.signature(for: Data(body)))
    }

    /// Whether the signature is a valid Ed25519 signature of exactly `body` under `publicKey`.
    public func isValid(for body: some DataProtocol, publicKey: Curve25519.Signing.PublicKey) -> Bool {
        publicKey.isValidSignature(self.signature, for: Data(body))
    }

    private static func isKeyIdCharacter(_ character: Character) -> Bool {
        // Visible ASCII except the characters that would make the header ambiguous.
        guard let ascii = character.asciiValue, ascii > 0x20, ascii < 0x7F else { return false }
        return character != "," && character != "\"" && character != ";" && character != "="
    }
}
