import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Contract §8: `temporarily_unavailable` (503 with `Retry-After`) wherever §2 would answer
/// `token_timeout` or `store_unavailable`, over real HTTP.
@Suite("Contract: OAuth temporarily_unavailable")
struct ContractOAuthTests {
    static let basic = ["authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret)]

    static func expectUnavailable(_ answer: GatewayHarness.Answer, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(answer.status == 503, "\(answer.body)", sourceLocation: sourceLocation)
        #expect(answer.oauthError == "temporarily_unavailable", sourceLocation: sourceLocation)
        #expect((Int(answer.headers["retry-after"] ?? "") ?? 0) >= 1, sourceLocation: sourceLocation)
        expectOAuthErrorHeaders(answer.headers, sourceLocation: sourceLocation)
    }

    @Test("where §2 answers 504 token_timeout, /oauth/token answers 503 temporarily_unavailable")
    func tokenTimeout() async throws {
        try await GatewayHarness.run(configure: {
            $0.flow.maxAttempts = 1
            $0.flow.deliveryGrace = .milliseconds(200)
        }) { h in
            let installation = try await h.installed()
            h.emulator.setFault(.acceptWithoutDelivery, for: installation)
            // The same installation on §2 first: it is token_timeout there.
            let direct = try await h.token(installation, query: "timeout=30000")
            #expect(direct.status == 504)
            #expect(direct.errorCode == "token_timeout")
            let answer = try await h.oauthPost(
                "grant_type=client_credentials&resource=\(formEncoded(installation.id))", headers: Self.basic)
            Self.expectUnavailable(answer)
            #expect(h.emulator.triggerCalls(for: installation) == 2)
        }
    }

    @Test("where §2 answers 503 store_unavailable, /oauth/token answers 503 temporarily_unavailable")
    func storeUnavailable() async throws {
        // Nothing listens on port 1 of the loopback: Redis is unreachable from the start.
        try await GatewayHarness.run(redisURL: "redis://127.0.0.1:1/0") { h in
            let installation = h.emulator.makeInstallation()
            let direct = try await h.token(installation)
            #expect(direct.status == 503)
            #expect(direct.errorCode == "store_unavailable")
            let answer = try await h.oauthPost(
                "grant_type=client_credentials&resource=\(formEncoded(installation.id))", headers: Self.basic)
            Self.expectUnavailable(answer)
        }
    }
}
