import Base64URLCoding
import Crypto
import Foundation
import Testing

@testable import ForgeEmulator

@Suite struct ForgeEmulatorTriggerSignatureTests {
    let signature = Data((0..<64).map { UInt8($0) })
    var encoded: String { Base64URL.encode(self.signature) }

    @Test func parsesTheExactFormat() throws {
        let parsed = try #require(TriggerSignature(headerValue: "keyId=tk_abc-123, signature=\(self.encoded)"))
        #expect(parsed.keyId == "tk_abc-123")
        #expect(parsed.signature == self.signature)
        #expect(parsed.headerValue == "keyId=tk_abc-123, signature=\(self.encoded)")
    }

    @Test func acceptsPaddedBase64URL() throws {
        let padded = self.signature.base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        #expect(padded.hasSuffix("="))
        #expect(TriggerSignature(headerValue: "keyId=k1, signature=\(padded)")?.signature == self.signature)
    }

    @Test(arguments: [
        "signature=SIG, keyId=k1",  // wrong order
        "keyId=k1,signature=SIG",  // no space
        "keyId=k1,  signature=SIG",  // two spaces
        "keyId=k1; signature=SIG",  // other separator
        " keyId=k1, signature=SIG",  // leading space
        "keyId=k1, signature=SIG ",  // trailing space
        "keyid=k1, signature=SIG",  // case
        "keyId=\"k1\", signature=SIG",  // quoted
        "keyId=, signature=SIG",  // empty key id
        "keyId=k1, signature=",  // empty signature
        "keyId=k1",  // one pair
        "keyId=k1, signature=SIG, extra=1",  // extra pair
        "keyId=k1, signature=SIG, signature=SIG",  // repeated pair
        "keyId=k 1, signature=SIG",  // whitespace in key id
        "keyId=k1, signature=STD",  // standard base64 alphabet
        "keyId=k1, signature=SHORT",  // not 64 bytes
        "",
    ])
    func rejectsVariants(_ template: String) {
        let standard = Data(repeating: 0xFB, count: 64).base64EncodedString()
        #expect(standard.contains("+") || standard.contains("/"))
        let value =
            template
            .replacingOccurrences(of: "STD", with: standard)
            .replacingOccurrences(of: "SHORT", with: Base64URL.encode(Data(repeating: 1, count: 63)))
            .replacingOccurrences(of: "SIG", with: self.encoded)
        #expect(TriggerSignature(headerValue: value) == nil)
    }

    @Test func verifiesOnlyTheExactBodyWithTheRightKey() throws {
        let key = Curve25519.Signing.PrivateKey()
        let body = Data(#"{"requestId":"r1","installationId":"i","issuedAt":1,"expiresAt":2}"#.utf8)
        let signed = try TriggerSignature.sign(body: body, keyId: "k1", privateKey: key)
        let parsed = try #require(TriggerSignature(headerValue: signed.headerValue))
        #expect(parsed.isValid(for: body, publicKey: key.publicKey))
        #expect(!parsed.isValid(for: body + Data(" ".utf8), publicKey: key.publicKey))
        #expect(!parsed.isValid(for: body, publicKey: Curve25519.Signing.PrivateKey().publicKey))
    }

    @Test func base64URLRoundTripsAndRejectsOtherAlphabets() {
        for length in 0..<8 {
            let data = Data((0..<length).map { UInt8(truncatingIfNeeded: $0 &* 97 &+ 250) })
            let encoded = Base64URL.encode(data)
            #expect(!encoded.contains("=") && !encoded.contains("+") && !encoded.contains("/"))
            #expect(Base64URL.decode(encoded) == Array(data))
        }
        #expect(Base64URL.decode("a+b/") == nil)
        #expect(Base64URL.decode("abcde") == nil)
        #expect(Base64URL.decode("ab=c") == nil)
        #expect(Base64URL.decode("YQ==") == Array("a".utf8))
        #expect(Base64URL.decode("YQ") == Array("a".utf8))
    }

    @Test func faultsRoundTripThroughTheAdminJSON() throws {
        let faults: [TriggerFault] = [
            .none, .failWith(status: 503, times: 2), .acceptWithoutDelivery, .deliverLate(.milliseconds(1500)),
            .deliverTwice, .deliverVia(gatewayURL: "http://127.0.0.1:9"), .respondSlowly(.seconds(3)),
            .redeliverCached,
        ]
        for fault in faults {
            let data = try JSONEncoder().encode(fault)
            #expect(try JSONDecoder().decode(TriggerFault.self, from: data) == fault)
        }
        let decoded = try JSONDecoder().decode(TriggerFault.self, from: Data(#"{"type":"failWith","status":500}"#.utf8))
        #expect(decoded == .failWith(status: 500, times: 1))
        #expect(
            try JSONDecoder().decode(TriggerFault.self, from: Data(#"{"type":"redeliverCached"}"#.utf8))
                == .redeliverCached)
        #expect(throws: (any Error).self) {
            try JSONDecoder().decode(TriggerFault.self, from: Data(#"{"type":"explode"}"#.utf8))
        }
        #expect(throws: (any Error).self) {
            try JSONDecoder().decode(TriggerFault.self, from: Data(#"{"type":"deliverLate","delayMs":-1}"#.utf8))
        }
    }
}
