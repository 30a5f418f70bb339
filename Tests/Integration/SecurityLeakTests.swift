import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Issue #4 item 7: the whole flow runs with known secrets, and neither the logs, nor any value in
/// Redis, nor the metrics, nor a metadata answer contains one of them in any common encoding.
@Suite("Security: no secret leaks")
struct SecurityLeakTests {
    /// A secret and the spellings it could leak in.
    struct Secret: Sendable {
        let name: String
        let forms: [String]

        init(_ name: String, _ text: String) {
            self.name = name
            self.forms = [text]
        }

        init(_ name: String, bytes: [UInt8]) {
            self.name = name
            let data = Data(bytes)
            self.forms = [
                data.base64EncodedString(), Base64URL.encode(bytes), Security.hex(bytes),
                Security.hex(bytes).uppercased(),
                String(data.base64EncodedString().dropLast(2)),  // unpadded standard base64
            ]
        }
    }

    static func hits(_ secrets: [Secret], in haystack: String) -> [String] {
        secrets.flatMap { secret in secret.forms.filter { haystack.contains($0) }.map { _ in secret.name } }
    }

    /// None of `secrets` in the logs, in Redis, in `answers` or in the printed configuration.
    static func expectNothingLeaked(
        _ h: GatewayHarness, _ secrets: [Secret], answers: [String], installations: [EmulatedInstallation]
    ) async throws {
        // The logs (gateway and emulator share the sink; debug level).
        let logs = h.logs.captured.joined(separator: "\n")
        #expect(logs.contains("token handed out"))
        #expect(Self.hits(secrets, in: logs).isEmpty, "secrets in the logs: \(Self.hits(secrets, in: logs))")

        try await Self.expectNothingInRedis(h, secrets, installations: installations)

        // Answers other than the token answers themselves.
        for answer in answers {
            #expect(
                Self.hits(secrets, in: answer).isEmpty, "secrets in an answer: \(Self.hits(secrets, in: answer))")
        }

        // And nothing secret in the printed forms of the configuration.
        let printed =
            "\(h.gateway.configuration) \(h.gateway.configuration.encryptionKeys) \(h.gateway.configuration.callers)"
        #expect(Self.hits(secrets, in: printed).isEmpty)
        var dumped = ""
        dump(h.gateway.configuration.encryptionKeys, to: &dumped)
        #expect(Self.hits(secrets, in: dumped).isEmpty)
    }

    @Test("a whole flow leaves no token, key, or secret in the logs, Redis, metrics or answers")
    func nothingLeaks() async throws {
        let encryptionKey = (0..<32).map { _ in UInt8.random(in: 0...255) }
        let digestSecret = "digest-secret-" + UUID().uuidString
        let digest = Security.hex(Array(SHA256.hash(data: Array(digestSecret.utf8))))
        let wrongSecret = "wrong-secret-" + UUID().uuidString
        try await GatewayHarness.run(configure: { config in
            config.encryptionKeys = try! EncryptionKeyRing(keys: [(id: "leak", key: SymmetricKey(data: encryptionKey))])
            config.callers = try! CallerRegistry(
                json: """
                    [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"]},
                     {"name":"digest","secretSha256":"\(digest)","installations":["*"]}]
                    """)
        }) { h in
            var secrets: [Secret] = [
                Secret("caller secret", GatewayHarness.callerSecret), Secret("digest caller secret", digestSecret),
                Secret("refused caller secret", wrongSecret), Secret("encryption key", bytes: encryptionKey),
            ]
            var answers: [String] = []
            let a = h.emulator.makeInstallation()
            let b = h.emulator.makeInstallation()

            // Registration carrying a pushed token, a cold fetch, a push, a forced refresh, a
            // refused FIT and a refused caller, and another installation installed and uninstalled.
            try #require(try await h.emulator.sendLifecycleEvent(.installed, for: a).isSuccess)
            let registrationToken = try h.emulator.mintAccessToken(for: a, expiresAt: Date().addingTimeInterval(600))
            secrets.append(Secret("registration token", registrationToken))
            #expect(try await h.emulator.register(a, systemToken: registrationToken).status == 200)
            let cold = try await h.token(a, query: "minValidity=900")
            #expect(cold.json["source"] as? String == "trigger")
            let pushed = try await h.emulator.push(a, expiresAt: Date().addingTimeInterval(7200))
            let refreshed = try await h.call(.POST, GatewayHarness.path(a) + "/token/refresh", secret: digestSecret)
            #expect(refreshed.status == 200)
            let badFIT = try h.emulator.mintFIT(
                for: a,
                options: {
                    var o = FITOptions()
                    o.audience = "x"
                    return o
                }())
            secrets.append(Secret("refused FIT", badFIT))
            let refusedToken = try h.emulator.mintAccessToken(for: a)
            secrets.append(Secret("token of a refused delivery", refusedToken))
            _ = try await h.call(
                .POST, "/forge/auth-trigger", secret: nil,
                headers: ["authorization": "Bearer \(badFIT)", "x-forge-oauth-system": refusedToken], body: "{}")
            _ = try await h.call(.GET, GatewayHarness.path(a) + "/token", secret: wrongSecret)
            try await h.emulator.install(b)
            #expect(try await h.token(b).status == 200)
            for installation in [a, b] {
                let material = try #require(try await h.gateway.store.triggerMaterial(installation.installationID))
                secrets.append(Secret("trigger private key of \(installation.uuid)", bytes: material.rawPrivateKey))
            }
            try await h.emulator.uninstall(b)
            #expect(try await h.token(b).status == 410)

            for token in [cold.json["accessToken"], pushed.token, refreshed.json["accessToken"]]
                + [h.emulator.lastDeliveredToken(for: a), h.emulator.lastDeliveredToken(for: b)]
            {
                if let token = token as? String { secrets.append(Secret("access token", token)) }
            }
            answers.append(try await h.call(.GET, GatewayHarness.path(a)).body)
            answers.append(try await h.call(.GET, GatewayHarness.path(b)).body)
            answers.append(try await h.call(.GET, "/v1/installations?limit=1000").body)
            answers.append(try await h.call(.GET, "/metrics", secret: nil).body)
            #expect(secrets.count >= 12)

            try await Self.expectNothingLeaked(h, secrets, answers: answers, installations: [a, b])
        }
    }

    /// Every value in Redis, of every key (other tests' keys included: none may hold ours), holds
    /// none of `secrets`; the trigger URLs of `installations` are sealed at rest too.
    static func expectNothingInRedis(
        _ h: GatewayHarness, _ secrets: [Secret], installations: [EmulatedInstallation]
    ) async throws {
        var scanned = 0
        var leaks: [String] = []
        for key in try await Security.scan(pattern: "*", in: h.gateway.redis) {
            let values = try await Security.values(of: key, in: h.gateway.redis)
            scanned += values.count
            for value in values + [key] {
                leaks += Self.hits(secrets, in: value).map { "\($0) in \(key)" }
            }
        }
        #expect(scanned > 0)
        #expect(leaks.isEmpty, "secrets in Redis: \(leaks)")
        // The trigger URLs are sealed at rest too.
        for installation in installations {
            for key in try await Security.keys(of: installation, in: h.gateway.redis) {
                let values = try await Security.values(of: key, in: h.gateway.redis)
                #expect(!values.contains { $0.contains(installation.triggerPath) }, "trigger URL in \(key)")
            }
        }
    }

}
