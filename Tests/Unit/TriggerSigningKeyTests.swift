import Crypto
import FlowEngine
import Testing

@testable import TokenGateway

@Suite struct TriggerSigningKeyTests {
    @Test func generatedKeyHasURLSafeRandomId() {
        let first = TriggerSigningKey.generate()
        let second = TriggerSigningKey.generate()
        #expect(first.keyId != second.keyId)
        #expect(first.keyId.hasPrefix("tk_"))
        #expect(first.keyId.count == 19)
        #expect(TriggerSigningKey.isValidKeyId(first.keyId))
        #expect(first.rawPrivateKey != second.rawPrivateKey)
    }

    @Test func headerHasExactFormatAndVerifies() throws {
        let key = TriggerSigningKey.generate()
        let body = Array(
            #"{"requestId":"r1","installationId":"ari:cloud:ecosystem::installation/x","issuedAt":1,"expiresAt":31}"#
                .utf8
        )
        let header = try key.signatureHeader(for: body)

        let prefix = "keyId=\(key.keyId), signature="
        #expect(header.hasPrefix(prefix))
        let encoded = String(header.dropFirst(prefix.count))
        #expect(!encoded.contains("=") && !encoded.contains(",") && !encoded.contains(" "))
        #expect(Base64URL.decode(encoded)?.count == 64)

        let parsed = try TriggerSignatureHeader(parsing: header)
        #expect(parsed.keyId == key.keyId)
        #expect(parsed.verify(body: body, publicKey: key.privateKey.publicKey))

        // Independent check with the published public key.
        let published = try Curve25519.Signing.PublicKey(rawRepresentation: Base64URL.decode(key.publicKeyBase64URL)!)
        #expect(published.isValidSignature(parsed.signature, for: body))
    }

    @Test func signatureDoesNotVerifyForOtherBodyOrKey() throws {
        let key = TriggerSigningKey.generate()
        let body = Array(#"{"requestId":"r1"}"#.utf8)
        let parsed = try TriggerSignatureHeader(parsing: try key.signatureHeader(for: body))
        #expect(!parsed.verify(body: Array(#"{"requestId":"r2"}"#.utf8), publicKey: key.publicKey))
        #expect(!parsed.verify(body: body + [0x20], publicKey: key.publicKey))
        #expect(!parsed.verify(body: body, publicKey: TriggerSigningKey.generate().publicKey))
    }

    @Test func restoresFromRawPrivateKey() throws {
        let key = TriggerSigningKey.generate()
        let restored = try TriggerSigningKey(keyId: key.keyId, rawPrivateKey: key.rawPrivateKey)
        #expect(restored.keyId == key.keyId)
        #expect(restored.publicKeyBase64URL == key.publicKeyBase64URL)
        #expect(key.rawPrivateKey.count == 32)
        #expect(Base64URL.decode(key.publicKeyBase64URL)?.count == 32)
        let body: [UInt8] = [1, 2, 3]
        let header = try TriggerSignatureHeader(parsing: try restored.signatureHeader(for: body))
        #expect(header.verify(body: body, publicKey: key.publicKey))
    }

    @Test func refusesInvalidKeyIdOrPrivateKey() {
        let raw = TriggerSigningKey.generate().rawPrivateKey
        for keyId in ["", "has space", "dot.ted", "comma,", String(repeating: "a", count: 65)] {
            #expect(throws: TriggerSigningError.invalidKeyId, "\(keyId)") {
                try TriggerSigningKey(keyId: keyId, rawPrivateKey: raw)
            }
        }
        for bytes in [[], [UInt8](repeating: 1, count: 31), [UInt8](repeating: 1, count: 64)] {
            #expect(throws: TriggerSigningError.invalidPrivateKey) {
                try TriggerSigningKey(keyId: "tk_valid", rawPrivateKey: bytes)
            }
        }
    }

    @Test func parsingRefusesAnythingButTheExactForm() throws {
        let key = TriggerSigningKey.generate()
        let valid = try key.signatureHeader(for: [1])
        let signature = String(valid.split(separator: "=", maxSplits: 2).last!)
        let invalid = [
            "",
            "signature=\(signature), keyId=\(key.keyId)",
            "keyId=\(key.keyId),signature=\(signature)",
            "keyId=\(key.keyId),  signature=\(signature)",
            "keyid=\(key.keyId), signature=\(signature)",
            "keyId=, signature=\(signature)",
            "keyId=\(key.keyId), signature=",
            "keyId=\(key.keyId), signature=\(signature)!",
            "keyId=\(key.keyId), signature=\(signature.dropLast(4))",
            "keyId=\(key.keyId), signature=\(signature), extra=1",
            " keyId=\(key.keyId), signature=\(signature)",
        ]
        for value in invalid {
            #expect(throws: TriggerSigningError.malformedHeader, "\(value)") {
                try TriggerSignatureHeader(parsing: value)
            }
        }
        #expect(try TriggerSignatureHeader(parsing: valid).keyId == key.keyId)
        // Padded base64url is read too.
        #expect(try TriggerSignatureHeader(parsing: valid + "==").keyId == key.keyId)
    }

    @Test func printedFormShowsKeyIdOnly() {
        let key = TriggerSigningKey.generate()
        let secret = Base64URL.encode(key.rawPrivateKey)
        var dumped = ""
        dump(key, to: &dumped)
        for text in [key.description, String(reflecting: key), "\(key)", dumped] {
            #expect(text.contains(key.keyId))
            #expect(!text.contains(secret))
            #expect(!text.contains("rawRepresentation"))
        }
    }

    @Test func triggerMaterialAndKeysPrintNoURLOrKey() {
        let key = TriggerSigningKey.generate()
        let url = "https://secret-trigger.hello.atlassian-dev.net/x1/abcdef"
        let bytes = "\(key.rawPrivateKey)"
        let material = GatewayStore.TriggerMaterial(url: url, keyID: key.keyId, rawPrivateKey: key.rawPrivateKey)
        let stored = GatewayStore.TriggerKey(keyID: key.keyId, rawPrivateKey: key.rawPrivateKey)
        let entry = TriggerMaterialCache.Entry(
            version: .init(sealedURL: "sealed", keyID: key.keyId), url: url, key: key)
        let values: [Any] = [material, stored, entry]
        for value in values {
            var dumped = ""
            dump(value, to: &dumped)
            for text in [String(describing: value), String(reflecting: value), dumped] {
                #expect(text.contains(key.keyId))
                #expect(!text.contains("secret-trigger"), "\(text)")
                #expect(!text.contains(bytes), "\(text)")
            }
        }
    }
}
