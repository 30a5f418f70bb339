import FlowEngine
import Testing

@testable import TokenGateway

/// Values that carry a secret print without it, however they are printed (`"\(x)"`,
/// `String(reflecting:)`, `dump`).
@Suite("Secrets stay out of printed values")
struct RedactionTests {
    static func printed(_ value: Any) -> [String] {
        var dumped = ""
        dump(value, to: &dumped)
        return [String(describing: value), String(reflecting: value), dumped]
    }

    @Test("a registration's outcome names its key id, never the private key")
    func registrationOutcome() {
        let key: [UInt8] = Array(repeating: 0xAB, count: 32)
        let outcome = GatewayStore.RegistrationOutcome.registered(keyID: "tk_visible", rawPrivateKey: key)
        for text in Self.printed(outcome) {
            #expect(text.contains("tk_visible"))
            #expect(!text.contains("171"), "\(text)")  // 0xAB as a decimal byte
            #expect(!text.lowercased().contains("abab"), "\(text)")
        }
    }

    @Test("a token, and an answer or probe that holds one, never shows its value")
    func accessToken() {
        let token = AccessToken(value: "tok-secret-value", expiresAt: 1_800_000_000, requestID: "rq_1")
        let answer = TokenAnswer(token: token, source: .cache, apiBaseUrl: "https://api.atlassian.com/ex/jira/1")
        for value in [token, answer] as [Any] {
            for text in Self.printed(value) {
                #expect(!text.contains("tok-secret-value"), "\(text)")
                #expect(text.contains("1800000000"), "\(text)")
            }
        }
    }

    @Test("an exchange's outcome never shows the user token")
    func exchangeOutcome() {
        let outcome = OfflineUserAuthTokenClient.Outcome.token(value: "utok-secret-value", ttl: 900)
        for text in Self.printed(outcome) {
            #expect(!text.contains("utok-secret-value"), "\(text)")
            #expect(text.contains("900"))
        }
    }
}
