import Crypto
import Testing

@testable import TokenGateway

@Suite struct EncryptionKeyRingTests {
    static let keyA = [UInt8](repeating: 0xA1, count: 32)
    static let keyB = [UInt8](repeating: 0xB2, count: 32)

    static func standardBase64(_ bytes: [UInt8]) -> String {
        Base64URL.encode(bytes).replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            + String(repeating: "=", count: (4 - Base64URL.encode(bytes).count % 4) % 4)
    }

    @Test func sealThenOpenRoundTrips() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        let plaintext = Array("eyJhbGciOi.secret-token.value".utf8)
        let sealed = try ring.seal(plaintext, context: "tg:inst:abc:token")
        #expect(sealed.hasPrefix("k1."))
        #expect(sealed.utf8.allSatisfy { $0 < 0x80 })
        #expect(!sealed.contains("secret"))
        #expect(try ring.open(sealed, context: "tg:inst:abc:token") == plaintext)
        #expect(EncryptionKeyRing.keyId(of: sealed) == "k1")
    }

    @Test func sealingTwiceGivesDifferentBlobs() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        let first = try ring.seal([1, 2, 3], context: "c")
        let second = try ring.seal([1, 2, 3], context: "c")
        #expect(first != second)
    }

    @Test(
        "deterministic sealing: the same value and context give the same blob, which opens; another value or context another nonce"
    )
    func deterministicSealing() throws {
        let ring = try EncryptionKeyRing(parsing: "k2:\(Base64URL.encode(Self.keyB)),k1:\(Base64URL.encode(Self.keyA))")
        let value = Array("https://api.atlassian.com/ex/jira/1".utf8)
        let sealed = try ring.sealDeterministically(value, context: "tg:{i}:inst:apiBaseUrl")
        #expect(try ring.sealDeterministically(value, context: "tg:{i}:inst:apiBaseUrl") == sealed)
        #expect(try ring.open(sealed, context: "tg:{i}:inst:apiBaseUrl") == value)
        #expect(throws: EncryptionError.authenticationFailed) {
            try ring.open(sealed, context: "tg:{j}:inst:apiBaseUrl")
        }
        // The nonce (the blob's first 12 bytes) depends on the value and the context.
        func nonce(_ blob: String) -> [UInt8] {
            Array((Base64URL.decode(String(blob.split(separator: ".")[1])) ?? []).prefix(12))
        }
        let others = [
            try ring.sealDeterministically(
                Array("https://api.atlassian.com/ex/jira/2".utf8), context: "tg:{i}:inst:apiBaseUrl"),
            try ring.sealDeterministically(value, context: "tg:{j}:inst:apiBaseUrl"),
        ]
        #expect(Set(([sealed] + others).map(nonce)).count == 3)
        // Under every key of the ring: what a ring with that key first gives.
        let underEvery = try ring.sealDeterministicallyUnderEveryKey(value, context: "tg:{i}:inst:apiBaseUrl")
        let k1First = try EncryptionKeyRing(parsing: "k1:\(Base64URL.encode(Self.keyA))")
        #expect(underEvery == [sealed, try k1First.sealDeterministically(value, context: "tg:{i}:inst:apiBaseUrl")])
    }

    @Test func emptyPlaintextRoundTrips() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        #expect(try ring.open(try ring.seal([], context: "c"), context: "c") == [])
    }

    @Test func blobUnderAnotherContextFailsAuthentication() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        let sealed = try ring.seal(Array("secret".utf8), context: "tg:inst:A:token")
        #expect(throws: EncryptionError.authenticationFailed) {
            try ring.open(sealed, context: "tg:inst:B:token")
        }
    }

    @Test func tamperedBlobFailsAuthentication() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        let sealed = try ring.seal(Array("secret value".utf8), context: "c")
        var bytes = Base64URL.decode(String(sealed.dropFirst(3)))!
        bytes[bytes.count - 20] ^= 0x01
        let tampered = "k1." + Base64URL.encode(bytes)
        #expect(throws: EncryptionError.authenticationFailed) { try ring.open(tampered, context: "c") }
    }

    @Test func malformedBlobsAreCorrupt() throws {
        let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(data: Self.keyA))])
        for blob in ["", "k1", "k1.", "k1.!!!!", "k1." + Base64URL.encode([UInt8](repeating: 0, count: 27)), ".abc"] {
            #expect(throws: EncryptionError.corrupt, "\(blob)") { try ring.open(blob, context: "c") }
        }
        #expect(EncryptionKeyRing.keyId(of: "no-dot") == nil)
    }

    @Test func blobUnderUnknownKeyIdIsUnknownKey() throws {
        let old = try EncryptionKeyRing(keys: [(id: "old", key: SymmetricKey(data: Self.keyA))])
        let new = try EncryptionKeyRing(keys: [(id: "new", key: SymmetricKey(data: Self.keyB))])
        let sealed = try old.seal([1, 2, 3], context: "c")
        #expect(throws: EncryptionError.unknownKey) { try new.open(sealed, context: "c") }
    }

    @Test func blobRelabelledWithAnotherKnownKeyFailsAuthentication() throws {
        let ring = try EncryptionKeyRing(keys: [
            (id: "k2", key: SymmetricKey(data: Self.keyB)), (id: "k1", key: SymmetricKey(data: Self.keyA)),
        ])
        let sealed = try ring.seal([9, 9, 9], context: "c")
        let relabelled = "k1." + sealed.dropFirst(3)
        #expect(throws: EncryptionError.authenticationFailed) { try ring.open(relabelled, context: "c") }
    }

    @Test func rotationSealsWithFirstKeyAndOpensOldBlobs() throws {
        let setting1 = "k1:\(Base64URL.encode(Self.keyA))"
        let before = try EncryptionKeyRing(parsing: setting1)
        let oldBlob = try before.seal(Array("old secret".utf8), context: "ctx")

        let after = try EncryptionKeyRing(parsing: "k2:\(Self.standardBase64(Self.keyB)), \(setting1)")
        #expect(after.currentKeyId == "k2")
        #expect(after.keyIds == ["k2", "k1"])
        #expect(try after.open(oldBlob, context: "ctx") == Array("old secret".utf8))
        let newBlob = try after.seal(Array("new secret".utf8), context: "ctx")
        #expect(EncryptionKeyRing.keyId(of: newBlob) == "k2")
        #expect(EncryptionKeyRing.keyId(of: oldBlob) == "k1")
        #expect(throws: EncryptionError.unknownKey) { try before.open(newBlob, context: "ctx") }
    }

    @Test func parsesStandardAndURLBase64WithOrWithoutPadding() throws {
        // 0xFB 0xFF… encodes with `+`/`/` in standard base64 and `-`/`_` in base64url.
        let key = [UInt8](repeating: 0xFB, count: 16) + [UInt8](repeating: 0xFF, count: 16)
        let standard = Self.standardBase64(key)
        #expect(standard.contains("+") || standard.contains("/"))
        #expect(standard.hasSuffix("="))
        let unpaddedStandard = String(standard.prefix(while: { $0 != "=" }))
        for encoded in [standard, unpaddedStandard, Base64URL.encode(key), Base64URL.encode(key) + "="] {
            let ring = try EncryptionKeyRing(parsing: "main_key-1:\(encoded)")
            #expect(ring.keyIds == ["main_key-1"], "\(encoded)")
        }
    }

    @Test func malformedSettingsAreRefusedWithoutNamingKeyMaterial() throws {
        let goodKey = Base64URL.encode(Self.keyA)
        let shortKey = Base64URL.encode([UInt8](repeating: 7, count: 16))
        let cases: [(setting: String, mentions: String)] = [
            ("", "empty"),
            ("   ", "empty"),
            (goodKey, "keyId:base64key"),
            ("k1:\(goodKey),", "entry 2 is empty"),
            ("k1:\(shortKey)", "32 bytes"),
            ("k1:\(goodKey)!!", "base64"),
            ("bad id:\(goodKey)", "invalid key id"),
            (":\(goodKey)", "invalid key id"),
            ("\(String(repeating: "a", count: 33)):\(goodKey)", "invalid key id"),
            ("k1:\(goodKey),k1:\(Base64URL.encode(Self.keyB))", "more than once"),
        ]
        for (setting, mentions) in cases {
            do {
                _ = try EncryptionKeyRing(parsing: setting)
                Issue.record("accepted \(setting.count)-character setting")
            } catch let error as ConfigurationValueError {
                #expect(error.message.contains("TOKEN_GATEWAY_ENCRYPTION_KEYS"))
                #expect(error.message.contains(mentions), "\(error.message)")
                #expect(!error.message.contains(goodKey))
                #expect(!error.message.contains(shortKey))
                #expect(!error.message.contains(String(goodKey.prefix(8))))
                #expect(!error.description.contains(goodKey))
            }
        }
    }

    @Test func keysInitRefusesBadInput() {
        #expect(throws: ConfigurationValueError.self) { try EncryptionKeyRing(keys: []) }
        #expect(throws: ConfigurationValueError.self) {
            try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(size: .bits128))])
        }
        #expect(throws: ConfigurationValueError.self) {
            try EncryptionKeyRing(keys: [
                (id: "k1", key: SymmetricKey(data: Self.keyA)), (id: "k1", key: SymmetricKey(data: Self.keyB)),
            ])
        }
        #expect(throws: ConfigurationValueError.self) {
            try EncryptionKeyRing(keys: [(id: "k.1", key: SymmetricKey(data: Self.keyA))])
        }
    }

    @Test func printedFormShowsKeyIdsOnly() throws {
        let ring = try EncryptionKeyRing(parsing: "k2:\(Base64URL.encode(Self.keyB)),k1:\(Base64URL.encode(Self.keyA))")
        let material = [Base64URL.encode(Self.keyA), Base64URL.encode(Self.keyB), "a1a1a1a1", "A1A1A1A1", "161, 161"]
        var dumped = ""
        dump(ring, to: &dumped)
        for text in [ring.description, ring.debugDescription, "\(ring)", String(reflecting: ring), dumped] {
            #expect(text.contains("k1") && text.contains("k2"), "\(text)")
            for secret in material { #expect(!text.contains(secret), "\(text)") }
        }
    }

    // MARK: Base64URL (the sealed format's encoding)

    @Test func base64URLEncodesWithoutPaddingAndDecodesBothForms() {
        let samples: [[UInt8]] = [[], [0xFF], [0xFB, 0xFF], [0x00, 0x01, 0x02], Array(0...255)]
        for bytes in samples {
            let encoded = Base64URL.encode(bytes)
            #expect(!encoded.contains("=") && !encoded.contains("+") && !encoded.contains("/"))
            #expect(Base64URL.decode(encoded) == bytes)
            let padded = encoded + String(repeating: "=", count: (4 - encoded.count % 4) % 4)
            #expect(Base64URL.decode(padded) == bytes)
        }
        #expect(Base64URL.encode(Array("hello".utf8)) == "aGVsbG8")
        #expect(Base64URL.encode([0xFB, 0xFF]) == "-_8")
    }

    @Test func base64URLRejectsInvalidInput() {
        for invalid in ["a", "ab+c", "ab/c", "ab c", "a===", "ab=", "ab==c", "====", "aGVsbG9=", "aGVsbG9==", "-_9"] {
            #expect(Base64URL.decode(invalid) == nil, "\(invalid)")
        }
    }
}
