import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Issue #4 item 3: callers authenticate with a secret kept as a SHA-256 digest, and a caller
/// scoped to some installations cannot tell an installation outside its scope from a missing one.
@Suite("Security: callers", .serialized)
struct SecurityCallerTests {
    static let digestSecret = "digest-caller-secret-" + UUID().uuidString

    /// An installation whose id is known before the gateway starts (for a caller's scope).
    static func plannedInstallation(_ emulator: ForgeEmulator, uuid: String) -> EmulatedInstallation {
        let cloudId = UUID().uuidString.lowercased()
        return EmulatedInstallation(
            id: "ari:cloud:ecosystem::installation/\(uuid)", cloudId: cloudId, product: "jira",
            apiBaseUrl: "https://api.atlassian.com/ex/jira/\(cloudId)", siteARI: "ari:cloud:jira::site/\(cloudId)",
            triggerPath: "/x1/" + UUID().uuidString.lowercased())
    }

    @Test("a scoped caller gets the same 403 for an installation outside its scope whether or not it exists")
    func scopedCallerCannotProbe() async throws {
        let allowedUUID = UUID().uuidString.lowercased()
        try await GatewayHarness.run(scopedInstallations: [allowedUUID]) { h in
            let allowed = Self.plannedInstallation(h.emulator, uuid: allowedUUID)
            try await h.emulator.install(allowed)
            let other = try await h.installed()
            let missing = h.emulator.makeInstallation()
            let scoped = GatewayHarness.scopedSecret

            // In scope: works, by ARI and by bare id.
            #expect(try await h.token(allowed, secret: scoped).status == 200)
            #expect(try await h.call(.GET, "/v1/installations/\(allowedUUID)", secret: scoped).status == 200)

            for (method, suffix) in [(HTTPMethod.GET, "/token"), (.POST, "/token/refresh"), (.GET, "")] {
                let existing = try await h.call(method, GatewayHarness.path(other) + suffix, secret: scoped)
                let absent = try await h.call(method, GatewayHarness.path(missing) + suffix, secret: scoped)
                let bare = try await h.call(method, "/v1/installations/\(missing.uuid)" + suffix, secret: scoped)
                for answer in [existing, absent, bare] {
                    #expect(answer.status == 403, "\(method) \(suffix)")
                    #expect(answer.errorCode == "forbidden")
                }
                #expect(existing.body == absent.body)
                #expect(existing.body == bare.body)
                #expect(existing.headers["content-type"] == absent.headers["content-type"])
                #expect(existing.headers["content-length"] == absent.headers["content-length"])
            }
            // The refused requests did not start a round trip for the other installation.
            #expect(h.emulator.triggerCalls(for: other) == 0)

            // The listing shows only the caller's installations.
            let list = try await h.call(.GET, "/v1/installations?limit=1000", secret: scoped)
            let ids = (list.json["installations"] as? [[String: Any]] ?? []).compactMap {
                $0["installationId"] as? String
            }
            #expect(ids == [allowed.id])
        }
    }

    @Test("unknown, missing and malformed caller credentials get 401 unauthenticated")
    func unknownCallersAreRefused() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/token"
            let variants: [[String: String]] = [
                [:], ["authorization": "Bearer"], ["authorization": "Bearer "],
                ["authorization": "Bearer wrong-\(GatewayHarness.callerSecret)"],
                ["authorization": "Basic \(GatewayHarness.callerSecret)"],
                ["authorization": GatewayHarness.callerSecret],
                ["authorization": "Bearer \(GatewayHarness.callerSecret.dropLast())"],
            ]
            for headers in variants {
                let answer = try await h.call(.GET, path, secret: nil, headers: headers)
                #expect(answer.status == 401, "\(headers.keys.sorted())")
                #expect(answer.errorCode == "unauthenticated")
            }
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test("a caller configured with secretSha256 authenticates with the secret, not with the digest")
    func digestCallersWorkEndToEnd() async throws {
        let digest = SHA256.hash(data: Array(Self.digestSecret.utf8)).map { String(format: "%02x", $0) }.joined()
        try await GatewayHarness.run(configure: { config in
            config.callers = try! CallerRegistry(
                json: """
                    [{"name":"digest","secretSha256":"\(digest.uppercased())","installations":["*"]}]
                    """)
        }) { h in
            let installation = try await h.installed()
            let answer = try await h.token(installation, secret: Self.digestSecret)
            #expect(answer.status == 200)
            let stored = try await h.gateway.store.systemToken(installation.installationID)
            #expect(answer.json["accessToken"] as? String == stored?.value)
            #expect(try await h.token(installation, secret: digest).status == 401)
            #expect(try await h.token(installation, secret: GatewayHarness.callerSecret).status == 401)
        }
    }
}
