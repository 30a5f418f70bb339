import AsyncHTTPClient
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Testing

@testable import TokenGateway

@Suite struct NamedTriggerTests {
    static let allowList = try! TriggerHostAllowList(parsing: "*.webtrigger.atlassian.app,http://127.0.0.1:9999")
    static let good = "https://abc.webtrigger.atlassian.app/x1/fn"

    @Test(
        "the outbound HTTP client makes no client span (it would record a trigger URL, a secret) and follows no redirect"
    )
    func outboundClientKeepsTriggerURLsOutOfTraces() {
        let configuration = Gateway.outboundHTTPConfiguration()
        #expect(configuration.tracing.tracer == nil)
        #expect(
            "\(configuration.redirectConfiguration)" == "\(HTTPClient.Configuration.RedirectConfiguration.disallow)")
    }

    @Test func triggerKeysAreBounded() {
        for key in ["a", "0", "sync-issue", "job_2", String(repeating: "z", count: 64)] {
            #expect(NamedTriggerKey.isValid(key), "\(key)")
        }
        for key in ["", "-a", "_a", "A", "a b", "a.b", "a/b", "é", String(repeating: "z", count: 65), "a%2Fb"] {
            #expect(!NamedTriggerKey.isValid(key), "\(key)")
        }
    }

    @Test func parsesSetsAndRemovalsInKeyOrder() throws {
        let parsed = try NamedTriggerRegistration(
            parsing: ["b": Self.good, "a": NSNull(), "c": "http://127.0.0.1:9999/x2/c"], allowList: Self.allowList)
        #expect(parsed.changes.map { $0.key } == ["a", "b", "c"])
        #expect(parsed.changes.map { $0.url } == [nil, Self.good, "http://127.0.0.1:9999/x2/c"])
        #expect(!parsed.description.contains("https"))
        #expect(try NamedTriggerRegistration(parsing: nil, allowList: Self.allowList).isEmpty)
        #expect(try NamedTriggerRegistration(parsing: NSNull(), allowList: Self.allowList).isEmpty)
        #expect(try NamedTriggerRegistration(parsing: [String: Any](), allowList: Self.allowList).isEmpty)
    }

    @Test func refusesBadInputWithTheContractCode() {
        let cases: [(Any, String)] = [
            (["x"], "invalid_request"),
            ("https://abc.webtrigger.atlassian.app", "invalid_request"),
            (["Bad": Self.good], "invalid_request"),
            (["a": 1], "invalid_request"),
            (["a": ""], "invalid_request"),
            (["a": Self.good + String(repeating: "x", count: 2100)], "invalid_request"),
            (Dictionary(uniqueKeysWithValues: (0...32).map { ("k\($0)", Self.good as Any) }), "invalid_request"),
            (["a": "https://evil.example.com/x"], "trigger_url_not_allowed"),
            (["a": "http://127.0.0.1:9998/x"], "trigger_url_not_allowed"),
            (["a": "http://abc.webtrigger.atlassian.app/x"], "trigger_url_not_allowed"),
        ]
        for (value, code) in cases {
            do {
                _ = try NamedTriggerRegistration(parsing: value, allowList: Self.allowList)
                Issue.record("accepted \(value)")
            } catch {
                #expect(error.code == code, "\(value)")
                #expect(!error.message.contains("evil"), "\(value)")
            }
        }
    }

    @Test func callerInvokeScope() throws {
        let registry = try CallerRegistry(
            json: """
                [{"name": "a", "secret": "secret-a-0123456789", "installations": ["*"], "invoke": ["sync", "job-2"]},
                 {"name": "b", "secret": "secret-b-0123456789", "installations": ["*"], "invoke": ["*"]},
                 {"name": "c", "secret": "secret-c-0123456789", "installations": ["*"]}]
                """)
        let callers = registry.callers
        #expect(callers[0].invoke.contains("sync"))
        #expect(callers[0].invoke.contains("job-2"))
        #expect(!callers[0].invoke.contains("other"))
        #expect(callers[1].invoke.contains("anything"))
        #expect(!callers[2].invoke.contains("sync"))
        for bad in [#"["Sync"]"#, #"[""]"#, #"[1]"#, #""sync""#] {
            #expect(throws: ConfigurationValueError.self) {
                try CallerRegistry(
                    json: #"[{"name": "a", "secret": "secret-a-0123456789", "invoke": \#(bad)}]"#)
            }
        }
    }

    @Test func signedBodyEmbedsThePayloadByteForByte() throws {
        let id = InstallationID("ari:cloud:ecosystem::installation/1b7c3c5e-6a3b-4d4f-9e57-2f4d8c1a0b11")!
        let payload = Array(#"{"b":1,"a":[true,null],"s":"é\n"}"#.utf8)
        let body = NamedTriggerInvoker.body(
            requestID: "inv_1", installation: id, trigger: "set-value", issuedAt: 1_763_906_400,
            expiresAt: 1_763_906_410, payload: payload)
        let text = String(decoding: body, as: UTF8.self)
        #expect(
            text
                == #"{"requestId":"inv_1","installationId":"ari:cloud:ecosystem::installation/1b7c3c5e-6a3b-4d4f-9e57-2f4d8c1a0b11","trigger":"set-value","issuedAt":1763906400,"expiresAt":1763906410,"payload":{"b":1,"a":[true,null],"s":"é\n"}}"#
        )
        // Signed as the auth trigger is: the emulator's parser and verifier accept it.
        let key = TriggerSigningKey.generate()
        let header = try key.signatureHeader(for: body)
        let parsed = try #require(TriggerSignature(headerValue: header))
        #expect(parsed.isValid(for: body, publicKey: key.publicKey))
        #expect(!parsed.isValid(for: body + [0x20], publicKey: key.publicKey))
    }

    @Test("a relayed 503 or 429 always carries Retry-After in seconds; other answers get none added")
    func relayedRetryAfter() {
        let now = Date(timeIntervalSince1970: 1_763_906_400)
        func relayed(_ status: Int, _ retryAfter: String?) -> String? {
            let headers = retryAfter.map { [(name: "retry-after", value: $0)] } ?? []
            let answer = InvocationAnswer(status: status, headers: headers, body: [])
            return Gateway.relay(answer, requestID: "inv_1", replayed: false, now: now).headers[.retryAfter]
        }
        #expect(relayed(503, nil) == "1")
        #expect(relayed(429, nil) == "1")
        #expect(relayed(503, "7") == "7")
        #expect(relayed(429, "Sun, 23 Nov 2025 14:00:30 GMT") == "30")
        #expect(relayed(503, "soon") == "1")
        #expect(relayed(503, "0") == "1")
        #expect(relayed(503, "100000") == "86400")
        #expect(relayed(500, nil) == nil)
        #expect(relayed(200, nil) == nil)
        #expect(relayed(500, "7") == "7")
    }

    @Test("a caller's Idempotency-Key is in the signed body, before the payload, JSON-escaped")
    func signedBodyNamesTheIdempotencyKey() {
        let id = InstallationID("ari:cloud:ecosystem::installation/1b7c3c5e-6a3b-4d4f-9e57-2f4d8c1a0b11")!
        let body = NamedTriggerInvoker.body(
            requestID: "inv_1", installation: id, trigger: "echo", issuedAt: 1, expiresAt: 2,
            idempotencyKey: #"order "42""#,
            payload: Array("[]".utf8))
        #expect(
            String(decoding: body, as: UTF8.self)
                == #"{"requestId":"inv_1","installationId":"ari:cloud:ecosystem::installation/1b7c3c5e-6a3b-4d4f-9e57-2f4d8c1a0b11","trigger":"echo","issuedAt":1,"expiresAt":2,"idempotencyKey":"order \"42\"","payload":[]}"#
        )
    }

    @Test func retriesOnlyIdempotentTransientFailuresWithinTheBudget() {
        let answer503 = InvocationCallResult.answered(InvocationAnswer(status: 503, headers: [], body: []), attempts: 1)
        let answer500 = InvocationCallResult.answered(InvocationAnswer(status: 500, headers: [], body: []), attempts: 1)
        let plenty = Duration.seconds(5)
        let pause = Duration.milliseconds(100)
        #expect(
            InvocationRetryPolicy.shouldRetry(
                after: answer503, attempt: 1, maxAttempts: 3, idempotent: true, remaining: plenty, pause: pause))
        #expect(
            InvocationRetryPolicy.shouldRetry(
                after: .transportError(attempts: 1), attempt: 2, maxAttempts: 3, idempotent: true, remaining: plenty,
                pause: pause))
        #expect(
            !InvocationRetryPolicy.shouldRetry(
                after: answer503, attempt: 1, maxAttempts: 3, idempotent: false, remaining: plenty, pause: pause))
        #expect(
            !InvocationRetryPolicy.shouldRetry(
                after: answer500, attempt: 1, maxAttempts: 3, idempotent: true, remaining: plenty, pause: pause))
        #expect(
            !InvocationRetryPolicy.shouldRetry(
                after: .timeout(attempts: 1), attempt: 1, maxAttempts: 3, idempotent: true, remaining: plenty,
                pause: pause))
        #expect(
            !InvocationRetryPolicy.shouldRetry(
                after: answer503, attempt: 3, maxAttempts: 3, idempotent: true, remaining: plenty, pause: pause))
        #expect(
            !InvocationRetryPolicy.shouldRetry(
                after: answer503, attempt: 1, maxAttempts: 3, idempotent: true, remaining: .milliseconds(120),
                pause: pause))
        #expect(InvocationRetryPolicy.pause(after: 1, base: .milliseconds(100), jitter: 0) == .milliseconds(100))
        #expect(InvocationRetryPolicy.pause(after: 2, base: .milliseconds(100), jitter: 0) == .milliseconds(200))
        #expect(InvocationRetryPolicy.pause(after: 9, base: .milliseconds(100), jitter: 0) == .seconds(1))
        #expect(InvocationRetryPolicy.pause(after: 1, base: .milliseconds(100), jitter: 1) == .milliseconds(75))
    }

    @Test func keptAnswersRoundTrip() throws {
        let answer = InvocationAnswer(
            status: 201, headers: [("content-type", "application/json"), ("retry-after", "3")],
            body: Array(#"{"ok":true}"#.utf8))
        #expect(InvocationAnswer(encoded: answer.encoded()) == answer)
        #expect(InvocationAnswer(encoded: Array("garbage".utf8)) == nil)
        #expect(InvocationAnswer.isRelayable(status: 204))
        #expect(InvocationAnswer.isRelayable(status: 422))
        #expect(!InvocationAnswer.isRelayable(status: 302))
        #expect(!InvocationAnswer.isRelayable(status: 101))
    }

    @Test func emulatorBehavioursRoundTripAsJSON() throws {
        let behaviours: [NamedTriggerBehaviour] = [
            .echo, .fail(status: 503, times: 2), .fail(status: 500, times: nil), .delay(.milliseconds(250)),
            .hang(maximum: .seconds(5)), .hangBody(maximum: .seconds(5)),
        ]
        for behaviour in behaviours {
            let data = try JSONEncoder().encode(behaviour)
            #expect(try JSONDecoder().decode(NamedTriggerBehaviour.self, from: data) == behaviour)
        }
        #expect(throws: (any Error).self) {
            try JSONDecoder().decode(NamedTriggerBehaviour.self, from: Data(#"{"type":"fail","status":99}"#.utf8))
        }
    }

    @Test func limiterCapsPerInstallation() {
        let limiter = InvocationLimiter(limit: 2)
        let a = InstallationID("a1")!
        let b = InstallationID("b1")!
        #expect(limiter.tryAcquire(a))
        #expect(limiter.tryAcquire(a))
        #expect(!limiter.tryAcquire(a))
        #expect(limiter.tryAcquire(b))
        limiter.release(a)
        #expect(limiter.tryAcquire(a))
        #expect(limiter.inProgress(a) == 2)
    }

    @Test func limiterCapsAllInstallationsTogether() {
        let limiter = InvocationLimiter(limit: 2, total: 3)
        let ids = ["a1", "b1", "c1", "d1"].map { InstallationID($0)! }
        #expect(limiter.tryAcquire(ids[0]))
        #expect(limiter.tryAcquire(ids[1]))
        #expect(limiter.tryAcquire(ids[2]))
        #expect(!limiter.tryAcquire(ids[3]))
        limiter.release(ids[0])
        #expect(limiter.tryAcquire(ids[3]))
        // A release without a slot taken changes nothing.
        limiter.release(ids[0])
        #expect(!limiter.tryAcquire(ids[0]))
    }
}
