import Testing

@testable import FlowEngine

@Suite("RedisTokenStore")
struct RedisTokenStoreTests {
    let ari = "ari:cloud:ecosystem::installation/3f6c2a10-7c1e-4c55-9a57-0d8f1c7b2e41"

    @Test("the channel's messages parse into notifications; anything else is ignored")
    func parse() throws {
        let id = try #require(InstallationID(self.ari))
        #expect(
            RedisTokenStore.parse("token \(self.ari) rq_1") == .tokenStored(id, requestID: "rq_1", sameToken: false))
        #expect(RedisTokenStore.parse("token \(self.ari) -") == .tokenStored(id, requestID: nil, sameToken: false))
        #expect(
            RedisTokenStore.parse("token \(self.ari) rq_1 same") == .tokenStored(id, requestID: "rq_1", sameToken: true)
        )
        #expect(
            RedisTokenStore.parse("token \(self.ari) - @replica-a")
                == .tokenStored(id, requestID: nil, sameToken: false, origin: "replica-a"))
        #expect(
            RedisTokenStore.parse("token \(self.ari) rq_1 same @replica-a")
                == .tokenStored(id, requestID: "rq_1", sameToken: true, origin: "replica-a"))
        #expect(RedisTokenStore.parse("hold \(self.ari)") == .holdPlaced(id))
        #expect(RedisTokenStore.parse("base \(self.ari)") == .apiBaseURLChanged(id))
        #expect(RedisTokenStore.parse("uninstalled \(self.ari)") == .uninstalled(id))
        #expect(RedisTokenStore.parse("token") == nil)
        #expect(RedisTokenStore.parse("other \(self.ari)") == nil)
    }
}
