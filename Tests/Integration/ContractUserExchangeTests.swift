import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Contract §2 `?asUser=`: the exchange's failures and its budget as the wire shows them.
@Suite("Contract: user-token exchange")
struct ContractUserExchangeTests {
    static func account() -> String { "557058:" + UUID().uuidString.lowercased() }

    @Test("an unreachable exchange endpoint ends in exactly 502 exchange_failed")
    func unreachableExchange() async throws {
        // Nothing listens on port 1 of the loopback: every exchange attempt is refused.
        try await GatewayHarness.run(configure: { $0.forgeGraphQLURL = "http://127.0.0.1:1/graphql" }) { h in
            let installation = try await h.installed()
            let answer = try await h.userToken(installation, Self.account(), query: "timeout=30000")
            #expect(answer.status == 502)
            #expect(answer.errorCode == "exchange_failed")
            #expect(h.emulator.totalUserTokenExchanges == 0)
            // The system token itself was fine: it is still served.
            #expect(try await h.token(installation).status == 200)
        }
    }

    @Test("the app's exchange budget is one budget across two replicas: the exchange past it is 429 on either")
    func budgetAcrossReplicas() async throws {
        let app = "ari:cloud:ecosystem::app/" + UUID().uuidString.lowercased()
        try await GatewayHarness.run(
            configure: {
                $0.forgeAppID = app
                $0.userExchangesPerMinute = 2
            },
            emulatorConfigure: { $0.appId = app }
        ) { h in
            let installation = try await h.installed()
            #expect(try await h.token(installation).status == 200)
            try await h.withSecondGateway { second in
                let path = GatewayHarness.path(installation) + "/token?asUser="
                #expect(try await h.userToken(installation, Self.account()).status == 200)
                #expect(try await h.call(.GET, path + Self.account(), baseURL: second).status == 200)
                // Both replicas have spent one each: the budget of two is gone on both.
                for answer in [
                    try await h.call(.GET, path + Self.account(), baseURL: second),
                    try await h.userToken(installation, Self.account()),
                ] {
                    #expect(answer.status == 429)
                    #expect(answer.errorCode == "rate_limited")
                    #expect((1...60).contains(Int(answer.headers["retry-after"] ?? "") ?? 0))
                }
                #expect(h.emulator.totalUserTokenExchanges == 2)
            }
        }
    }
}
