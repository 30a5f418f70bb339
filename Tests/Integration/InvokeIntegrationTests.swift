import AsyncHTTPClient
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOHTTP1
import Testing

@testable import TokenGateway

/// `POST /v1/installations/{id}/invoke/{key}` over real HTTP: a real gateway and Redis, the
/// emulator's named triggers verifying the gateway's signature.
@Suite("Invoke: signed calls into named triggers", .serialized)
struct InvokeIntegrationTests {
    static let echoOnlySecret = "invoke-secret-0123456789-echo-only"
    static let noInvokeSecret = "invoke-secret-0123456789-no-invoke"
    static let otherInstallationSecret = "invoke-secret-0123456789-other-inst"

    /// Callers: `full` (every key), `echo-only` (key `echo`), `no-invoke` (no `invoke`), `scoped`
    /// (every key, one unrelated installation).
    static func callers() -> CallerRegistry {
        try! CallerRegistry(
            json: """
                [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"],"invoke":["*"]},
                 {"name":"echo-only","secret":"\(echoOnlySecret)","installations":["*"],"invoke":["echo"]},
                 {"name":"no-invoke","secret":"\(noInvokeSecret)","installations":["*"]},
                 {"name":"scoped","secret":"\(otherInstallationSecret)","installations":["00000000-0000-4000-8000-000000000000"],"invoke":["*"]}]
                """)
    }

    static func run(
        configure: @Sendable @escaping (inout GatewayConfiguration) -> Void = { _ in },
        _ body: @Sendable (GatewayHarness) async throws -> Void
    ) async throws {
        try await GatewayHarness.run(
            configure: { config in
                config.callers = Self.callers()
                configure(&config)
            },
            emulatorConfigure: { $0.namedTriggerKeys = ["echo"] },
            body)
    }

    static func invoke(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, _ key: String, body: String? = "{}",
        query: String = "", secret: String = GatewayHarness.callerSecret, headers: [String: String] = [:]
    ) async throws -> GatewayHarness.Answer {
        var all = ["content-type": "application/json"]
        all.merge(headers) { $1 }
        return try await h.call(
            .POST, GatewayHarness.path(installation) + "/invoke/" + key + (query.isEmpty ? "" : "?" + query),
            secret: secret, headers: all, body: body)
    }

    static func json(_ text: String) -> Any? {
        try? JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
    }

    @Test("a call is signed as contract §4 plus payload; the emulator verifies it and refuses a tampered copy")
    func signedCallIsVerified() async throws {
        try await Self.run { h in
            // Configured named triggers are registered with the installation.
            let installation = try await h.installed()
            #expect(try await h.gateway.store.namedTriggerKeys(installation.installationID) == ["echo"])

            let payload = #"{"issue":"KEY-1","fields":{"n":1,"tags":["a",null,true]},"text":"x"}"#
            let answer = try await Self.invoke(h, installation, "echo", body: payload)
            #expect(answer.status == 200)
            #expect(answer.headers["content-type"] == "application/json")
            #expect(answer.headers["x-emulator-internal"] == nil)
            #expect(answer.headers["cache-control"] == "no-store")
            let echoed = answer.json
            #expect((echoed["echo"] as? NSDictionary) == (Self.json(payload) as? NSDictionary))
            #expect(echoed["trigger"] as? String == "echo")
            #expect(echoed["requestId"] as? String == answer.headers["x-token-gateway-request-id"])

            let calls = h.emulator.namedTriggerCalls(for: installation, key: "echo")
            try #require(calls.count == 1)
            let call = calls[0]
            #expect(call.signatureValid)
            #expect(call.idempotencyKey == nil)
            #expect(call.signedIdempotencyKey == nil)
            // The body: the four fields of §4, the trigger's key and the payload, byte for byte.
            let body = try #require(Self.json(String(decoding: call.body, as: UTF8.self)) as? [String: Any])
            #expect(Set(body.keys) == ["requestId", "installationId", "trigger", "issuedAt", "expiresAt", "payload"])
            #expect(body["installationId"] as? String == installation.id)
            #expect(body["trigger"] as? String == "echo")
            let issuedAt = try #require((body["issuedAt"] as? NSNumber)?.int64Value)
            let expiresAt = try #require((body["expiresAt"] as? NSNumber)?.int64Value)
            #expect((9...11).contains(expiresAt - issuedAt))
            #expect(String(decoding: call.body, as: UTF8.self).hasSuffix(",\"payload\":" + payload + "}"))
            let header = try #require(call.signatureHeader)
            let parsed = try #require(TriggerSignature(headerValue: header))
            #expect(header == parsed.headerValue)
            let record = try await h.gateway.store.installation(installation.installationID)
            #expect(parsed.keyId == record?.triggerKeyId)

            // The emulator really checks: the same call replayed verifies, a tampered body does not,
            // and the call sent on to another trigger of the installation (same signing key) is
            // refused: it names the trigger it was signed for.
            let url = try #require(h.emulator.namedTriggerURL(for: installation, key: "echo"))
            let otherURL = h.emulator.defineNamedTrigger(installation, key: "other")
            func send(_ bytes: Data, to target: String? = nil) async throws -> Int {
                var request = HTTPClientRequest(url: target ?? url)
                request.method = .POST
                request.headers.add(name: "content-type", value: "application/json")
                request.headers.add(name: "x-token-gateway-signature", value: header)
                request.body = .bytes(ByteBuffer(bytes: bytes))
                let response = try await h.http.execute(request, timeout: .seconds(10))
                _ = try await response.body.collect(upTo: 1 << 20)
                return Int(response.status.code)
            }
            #expect(try await send(call.body) == 200)
            #expect(try await send(call.body, to: otherURL) == 400)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "other").last?.signatureValid == true)
            let tampered = Data(
                String(decoding: call.body, as: UTF8.self).replacingOccurrences(of: "KEY-1", with: "KEY-2").utf8)
            #expect(try await send(tampered) == 401)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").last?.signatureValid == false)

            // An empty body is a null payload.
            let empty = try await Self.invoke(h, installation, "echo", body: nil)
            #expect(empty.status == 200)
            #expect(empty.json["echo"] is NSNull)
        }
    }

    @Test(
        "scope: no invoke list, a key not listed, an installation outside the set → 403; bad key → 400; no credential → 401"
    )
    func scope() async throws {
        try await Self.run { h in
            let installation = h.emulator.makeInstallation()
            h.emulator.defineNamedTrigger(installation, key: "other")
            try await h.emulator.install(installation)
            #expect(try await h.gateway.store.namedTriggerKeys(installation.installationID) == ["echo", "other"])

            for (secret, key) in [
                (Self.noInvokeSecret, "echo"), (Self.echoOnlySecret, "other"), (Self.otherInstallationSecret, "echo"),
            ] {
                let answer = try await Self.invoke(h, installation, key, secret: secret)
                #expect(answer.status == 403, "\(secret) \(key)")
                #expect(answer.errorCode == "forbidden")
            }
            let unauthenticated = try await Self.invoke(h, installation, "echo", secret: "not-a-caller-secret-at-all")
            #expect(unauthenticated.status == 401)
            #expect(unauthenticated.errorCode == "unauthenticated")
            for bad in ["Echo", "-echo", "e%20cho", String(repeating: "a", count: 65)] {
                let answer = try await Self.invoke(h, installation, bad)
                #expect(answer.status == 400, "\(bad)")
                #expect(answer.errorCode == "invalid_parameter")
            }
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").isEmpty)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "other").isEmpty)

            let allowed = try await Self.invoke(h, installation, "echo", secret: Self.echoOnlySecret)
            #expect(allowed.status == 200)
            let timeout = try await Self.invoke(h, installation, "echo", query: "timeout=50")
            #expect(timeout.status == 400)
            #expect(timeout.errorCode == "invalid_parameter")
            // Given twice (each valid), as on the token route: a proxy could have read the other one.
            let twice = try await Self.invoke(h, installation, "echo", query: "timeout=100&timeout=30000")
            #expect(twice.status == 400)
            #expect(twice.errorCode == "invalid_parameter")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("the payload is size-limited (413) and must be JSON (400); neither reaches the trigger")
    func payloadLimits() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            let large = "{\"x\":\"" + String(repeating: "a", count: 70 * 1024) + "\"}"
            let tooLarge = try await Self.invoke(h, installation, "echo", body: large)
            #expect(tooLarge.status == 413)
            #expect(tooLarge.errorCode == "payload_too_large")
            let notJSON = try await Self.invoke(h, installation, "echo", body: "{not json")
            #expect(notJSON.status == 400)
            #expect(notJSON.errorCode == "invalid_request")
            let wrongType = try await Self.invoke(
                h, installation, "echo", body: "{}", headers: ["content-type": "text/plain"])
            #expect(wrongType.status == 400)
            // JSON in another encoding than UTF-8 (a byte-order mark, UTF-16): 400, as it would be
            // embedded in the signed body as it is.
            for bytes in [
                [0xEF, 0xBB, 0xBF, 0x7B, 0x7D], [0xFF, 0xFE, 0x7B, 0x00, 0x7D, 0x00], [0x7B, 0x00, 0x7D, 0x00],
            ]
                as [[UInt8]]
            {
                let status = try await Self.rawInvoke(h, installation, body: bytes)
                #expect(status.status == 400, "\(bytes)")
                #expect(status.body.contains("invalid_request"))
            }
            // Idempotency-Key given twice: 400 (read joined, it would be another key).
            let twice = try await Self.rawInvoke(
                h, installation, body: Array("{}".utf8), headers: [("idempotency-key", "a"), ("idempotency-key", "b")])
            #expect(twice.status == 400, "\(twice.body)")
            #expect(twice.body.contains("Idempotency-Key must be given once"))
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").isEmpty)
            // Just under the limit passes.
            let fits = "{\"x\":\"" + String(repeating: "a", count: 60 * 1024) + "\"}"
            #expect(try await Self.invoke(h, installation, "echo", body: fits).status == 200)
        }
    }

    @Test("Idempotency-Key: a retry gets the first answer without a second call; another payload is refused")
    func idempotentRetryReplaysTheFirstAnswer() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            let first = try await Self.invoke(
                h, installation, "echo", body: #"{"n":1}"#, headers: ["idempotency-key": "order-42"])
            #expect(first.status == 200)
            #expect(first.headers["idempotent-replayed"] == nil)
            let again = try await Self.invoke(
                h, installation, "echo", body: #"{"n":1}"#, headers: ["idempotency-key": "order-42"])
            #expect(again.status == 200)
            #expect(again.body == first.body)
            #expect(again.headers["content-type"] == "application/json")
            #expect(again.headers["idempotent-replayed"] == "true")
            // The replay names the call that got the answer, as the first answer did.
            #expect(first.headers["x-token-gateway-request-id"] != nil)
            #expect(again.headers["x-token-gateway-request-id"] == first.headers["x-token-gateway-request-id"])
            let calls = h.emulator.namedTriggerCalls(for: installation, key: "echo")
            #expect(calls.count == 1)
            #expect(calls.first?.idempotencyKey == "order-42")
            // The key, scoped to the caller ("full"), is signed with the body: a replayer cannot run
            // the call again under another key, and two callers' keys never meet.
            let scoped = SHA256.hash(data: Array("full\norder-42".utf8)).map { String(format: "%02x", $0) }.joined()
            #expect(calls.first?.signedIdempotencyKey == scoped)
            #expect(calls.first?.signatureValid == true)

            let otherPayload = try await Self.invoke(
                h, installation, "echo", body: #"{"n":2}"#, headers: ["idempotency-key": "order-42"])
            #expect(otherPayload.status == 400)
            #expect(otherPayload.errorCode == "invalid_request")
            // Without the key every request is a call of its own.
            #expect(try await Self.invoke(h, installation, "echo", body: #"{"n":1}"#).status == 200)
            #expect(try await Self.invoke(h, installation, "echo", body: #"{"n":1}"#).status == 200)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 3)
        }
    }

    @Test(
        "kept answers are indexed until they expire; a failed call's claim leaves the index at once, so it holds only live entries"
    )
    func idempotencyIndexHoldsLiveEntries() async throws {
        try await Self.run(configure: { config in
            config.flow.breakerThreshold = 100
            config.invoke.maxAttempts = 1
        }) { h in
            let installation = try await h.installed()
            let index = "tg:{\(installation.id)}:invoke-idem-index"
            h.emulator.setNamedTriggerBehaviour(.fail(status: 503, times: nil), for: installation, key: "echo")
            for n in 0..<5 {
                let failed = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "failed-\(n)"])
                #expect(failed.status == 503)
            }
            #expect(try await h.gateway.redis.send(["EXISTS", index]).int == 0)
            h.emulator.setNamedTriggerBehaviour(.echo, for: installation, key: "echo")
            let before = Int64(Date().timeIntervalSince1970 * 1000)
            for n in 0..<3 {
                let kept = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "kept-\(n)"])
                #expect(kept.status == 200)
            }
            let after = Int64(Date().timeIntervalSince1970 * 1000)
            let entries = try await h.gateway.redis.send(["ZRANGE", index, "0", "-1", "WITHSCORES"]).array ?? []
            #expect(entries.count == 6)
            let retention = h.gateway.configuration.invoke.idempotencyRetention.milliseconds
            for pair in stride(from: 0, to: entries.count - 1, by: 2) {
                let key = entries[pair].string ?? ""
                #expect(key.hasPrefix("tg:{\(installation.id)}:invoke-idem:echo:"))
                // Indexed until the kept answer expires.
                let score = Int64(entries[pair + 1].string.flatMap { Double($0) } ?? 0)
                #expect(score >= before + retention && score <= after + retention)
                // The entry expires then too (set by the server's clock, the score by the gateway's).
                let expiresAt = try await h.gateway.redis.send(["PEXPIRETIME", key]).int ?? 0
                #expect(abs(expiresAt - score) <= 1000)
            }
        }
    }

    @Test(
        "a trigger's 429 (come back later) is relayed but not kept: a retry with the same key calls the trigger again")
    func comeBackLaterIsNotKept() async throws {
        try await Self.run(configure: { $0.flow.breakerThreshold = 100 }) { h in
            let installation = try await h.installed()
            for status in [429, 408] {
                h.emulator.setNamedTriggerBehaviour(.fail(status: status, times: 1), for: installation, key: "echo")
                let later = try await Self.invoke(
                    h, installation, "echo", body: #"{"n":1}"#, headers: ["idempotency-key": "later-\(status)"])
                #expect(later.status == status)
                let again = try await Self.invoke(
                    h, installation, "echo", body: #"{"n":1}"#, headers: ["idempotency-key": "later-\(status)"])
                #expect(again.status == 200)
                #expect(again.headers["idempotent-replayed"] == nil)
            }
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 4)
            // A final 4xx is kept as before.
            h.emulator.setNamedTriggerBehaviour(.fail(status: 409, times: 1), for: installation, key: "echo")
            let conflict = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "final"])
            #expect(conflict.status == 409)
            let replay = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "final"])
            #expect(replay.status == 409)
            #expect(replay.headers["idempotent-replayed"] == "true")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 5)
        }
    }

    @Test(
        "the caller's timeout covers the trigger's whole answer: a head at once and a body that does not come is 504 at the deadline"
    )
    func timeoutCoversTheAnswerBody() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.hangBody(maximum: .seconds(60)), for: installation, key: "echo")
            defer { h.emulator.releaseHeldNamedTriggerCalls() }
            let answer = try await Self.invoke(h, installation, "echo", body: #"{"n":1}"#, query: "timeout=500")
            #expect(answer.status == 504, "\(answer.body)")
            #expect(answer.errorCode == "token_timeout", "\(answer.body)")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("a payload at the size limit reaches the trigger whole: the signed envelope around it is no obstacle")
    func payloadAtTheLimitIsEchoed() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            let filler = String(repeating: "x", count: 64 * 1024 - 16)
            let payload = #"{"s":"\#(filler)"}"#
            #expect(payload.utf8.count <= 64 * 1024)
            let answer = try await Self.invoke(h, installation, "echo", body: payload)
            #expect(answer.status == 200, "\(answer.body.prefix(200))")
            #expect(answer.body.contains(filler))
        }
    }

    @Test("a concurrent duplicate waits for the first call's answer; the trigger runs once")
    func concurrentDuplicateWaits() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.hang(maximum: .seconds(20)), for: installation, key: "echo")
            async let first = Self.invoke(
                h, installation, "echo", body: #"{"n":7}"#, query: "timeout=15000", headers: ["idempotency-key": "dup"])
            #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.heldNamedTriggerCalls == 1 })
            async let second = Self.invoke(
                h, installation, "echo", body: #"{"n":7}"#, query: "timeout=15000", headers: ["idempotency-key": "dup"])
            h.emulator.releaseHeldNamedTriggerCalls()
            let (a, b) = try await (first, second)
            #expect(a.status == 200)
            #expect(b.status == 200)
            #expect(a.body == b.body)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    /// A circuit that opens after `threshold` failed calls, for 30 s.
    static func breaker(threshold: Int, in config: inout GatewayConfiguration) {
        config.flow.breakerThreshold = threshold
        config.flow.breakerOpenBase = .seconds(30)
        config.flow.breakerOpenCap = .seconds(30)
    }

    /// `POST …/invoke/echo` with exactly these body bytes and extra headers (repeated names kept).
    static func rawInvoke(
        _ h: GatewayHarness, _ installation: EmulatedInstallation, body: [UInt8], headers: [(String, String)] = []
    ) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: h.gatewayURL + GatewayHarness.path(installation) + "/invoke/echo")
        request.method = .POST
        request.headers.add(name: "authorization", value: "Bearer \(GatewayHarness.callerSecret)")
        request.headers.add(name: "content-type", value: "application/json")
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        request.body = .bytes(ByteBuffer(bytes: body))
        let response = try await h.http.execute(request, timeout: .seconds(30))
        return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
    }

    @Test("a named trigger's URL that no key of the ring opens is 500 internal_error and logged, not a 503 to retry")
    func unopenableTriggerURL() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            #expect(try await Self.invoke(h, installation, "echo").status == 200)
            // The sealed URL replaced by one sealed under a key id the ring does not have.
            let hash = h.gateway.store.namedTriggersKey(installation.installationID)
            _ = try await h.gateway.redis.send(["HSET", hash, "echo", "gone-key:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"])
            let answer = try await Self.invoke(h, installation, "echo")
            #expect(answer.status == 500, "\(answer.body)")
            #expect(answer.errorCode == "internal_error")
            #expect(answer.headers["retry-after"] == nil)
            #expect(h.allLogs.contains("the named trigger's URL or signing key does not open with the key ring"))
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("a duplicate that waited for a call whose failure opened the circuit gets 503 circuit_open, without a call")
    func duplicateWaitingWhileTheCircuitOpens() async throws {
        try await Self.run(configure: { Self.breaker(threshold: 1, in: &$0) }) { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.hang(maximum: .seconds(20)), for: installation, key: "echo")
            // The first call times out after 1 s (a failure: the circuit opens); the second, with
            // the same key, waits for it meanwhile.
            async let first = Self.invoke(
                h, installation, "echo", body: #"{"n":1}"#, query: "timeout=1000", headers: ["idempotency-key": "circ"])
            #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.heldNamedTriggerCalls == 1 })
            async let second = Self.invoke(
                h, installation, "echo", body: #"{"n":1}"#, query: "timeout=15000", headers: ["idempotency-key": "circ"]
            )
            let a = try await first
            #expect(a.status == 504, "\(a.body)")
            let b = try await second
            #expect(b.status == 503, "\(b.body)")
            #expect(b.errorCode == "circuit_open")
            #expect(b.errorMessage.contains("named trigger"))
            h.emulator.releaseHeldNamedTriggerCalls()
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("retries only with an Idempotency-Key: a 503 or an unreachable trigger is retried with it, never without")
    func retriesOnlyWithIdempotencyKey() async throws {
        let recorder = try await ConnectionRecorder.start()
        defer { Task { await recorder.stop() } }
        try await Self.run(configure: { config in
            config.triggerHosts = try! TriggerHostAllowList(
                parsing: config.triggerHosts.description + "," + recorder.baseURL)
            config.flow.breakerThreshold = 100
        }) { h in
            let installation = try await h.installed()
            // Without the key: one call, its 503 relayed with the allow-listed headers.
            h.emulator.setNamedTriggerBehaviour(.fail(status: 503, times: 1), for: installation, key: "echo")
            let once = try await Self.invoke(h, installation, "echo")
            #expect(once.status == 503)
            #expect(once.headers["retry-after"] == "7")
            #expect((once.json["error"] as? [String: Any])?["code"] as? String == "function_failed")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)

            // With the key: the 503 is retried and the echo comes back.
            h.emulator.setNamedTriggerBehaviour(.fail(status: 503, times: 1), for: installation, key: "echo")
            let retried = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "retry-me"])
            #expect(retried.status == 200)
            let calls = h.emulator.namedTriggerCalls(for: installation, key: "echo")
            #expect(calls.count == 3)
            #expect(calls.suffix(2).allSatisfy { $0.idempotencyKey == "retry-me" && $0.signatureValid })

            // An unreachable trigger (it closes every connection): 502; one attempt without the key,
            // every attempt with it (the audit record counts them; the HTTP client may open more than
            // one connection for one attempt, so connections only show that calls were made).
            let down = try await h.emulator.registerNamedTriggers(installation, ["down": recorder.baseURL + "/x2/down"])
            #expect(down.status == 200)
            func attempts() -> [String] {
                h.logs.captured.filter { $0.contains("trigger_invoked") && $0.contains("trigger.key=down") }
                    .compactMap { line in
                        line.split(separator: " ").first { $0.hasPrefix("trigger.attempts=") }.map(String.init)
                    }
            }
            let failed = try await Self.invoke(h, installation, "down")
            #expect(failed.status == 502)
            #expect(failed.errorCode == "trigger_failed")
            #expect(recorder.connections >= 1)
            let failedAgain = try await Self.invoke(h, installation, "down", headers: ["idempotency-key": "k"])
            #expect(failedAgain.status == 502)
            // A failed call keeps no answer: the same key calls again.
            let before = recorder.connections
            #expect(try await Self.invoke(h, installation, "down", headers: ["idempotency-key": "k"]).status == 502)
            #expect(recorder.connections > before)
            let maxAttempts = h.gateway.configuration.invoke.maxAttempts
            #expect(
                attempts() == [
                    "trigger.attempts=1", "trigger.attempts=\(maxAttempts)", "trigger.attempts=\(maxAttempts)",
                ])
        }
    }

    @Test("a trigger that never answers within the caller's timeout: 504 token_timeout")
    func deadline() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.hang(maximum: .seconds(20)), for: installation, key: "echo")
            let answer = try await Self.invoke(h, installation, "echo", query: "timeout=300")
            h.emulator.releaseHeldNamedTriggerCalls()
            #expect(answer.status == 504)
            #expect(answer.errorCode == "token_timeout")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("consecutive failures open the trigger's circuit: 503 circuit_open without a call; tokens are unaffected")
    func breaker() async throws {
        try await Self.run(configure: { Self.breaker(threshold: 2, in: &$0) }) { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.fail(status: 500, times: nil), for: installation, key: "echo")
            #expect(try await Self.invoke(h, installation, "echo").status == 500)
            #expect(try await Self.invoke(h, installation, "echo").status == 500)
            let open = try await Self.invoke(h, installation, "echo")
            #expect(open.status == 503)
            #expect(open.errorCode == "circuit_open")
            #expect(Int(open.headers["retry-after"] ?? "") ?? 0 >= 1)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 2)
            // The auth trigger has its own circuit.
            #expect(try await h.token(installation).status == 200)
        }
    }

    @Test(
        "failures of calls in flight when the circuit opened are no reopenings: the window stays, the next opening doubles it"
    )
    func breakerWindowWithCallsInFlight() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let now = FlowTime.now()
            @Sendable func failure(at instant: FlowTime) async throws -> Int64? {
                try await h.gateway.store.recordInvocationOutcome(
                    id, key: "echo", succeeded: false, threshold: 2, openBase: .seconds(1), openCap: .seconds(60),
                    now: instant)
            }
            #expect(try await failure(at: now) == nil)
            #expect(try await failure(at: now) == now.unixMilliseconds + 1000)
            // Four more calls that were under way end failing while the circuit is open.
            for _ in 0..<4 { #expect(try await failure(at: now) == nil) }
            let stored = try await h.gateway.redis.send([
                "HGET", "tg:{\(installation.id)}:invoke-breaker", "echo:openUntil",
            ])
            #expect(stored.string == String(now.unixMilliseconds + 1000))
            // After the window, a failed probe reopens it for twice as long (the second opening).
            let later = now + .seconds(2)
            #expect(try await failure(at: later) == later.unixMilliseconds + 2000)
        }
    }

    @Test("too many calls of one installation at once: 503 overloaded with Retry-After")
    func concurrencyCap() async throws {
        try await Self.run(configure: { $0.invoke.maxConcurrencyPerInstallation = 1 }) { h in
            let installation = try await h.installed()
            h.emulator.setNamedTriggerBehaviour(.hang(maximum: .seconds(20)), for: installation, key: "echo")
            async let held = Self.invoke(h, installation, "echo", query: "timeout=15000")
            #expect(try await Events.wait(on: h.emulator.callEvents()) { h.emulator.heldNamedTriggerCalls == 1 })
            let refused = try await Self.invoke(h, installation, "echo")
            #expect(refused.status == 503)
            #expect(refused.errorCode == "overloaded")
            #expect(refused.headers["retry-after"] == "1")
            h.emulator.releaseHeldNamedTriggerCalls()
            #expect(try await held.status == 200)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("uninstall: 410, and the named triggers, circuits and kept answers are gone")
    func uninstall() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            #expect(
                try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "before"]).status == 200)
            let prefix = "tg:{\(installation.id)}:"
            #expect(try await Security.keys(of: installation, in: h.gateway.redis).contains(prefix + "named-triggers"))
            try await h.emulator.uninstall(installation)
            let gone = try await Self.invoke(h, installation, "echo", headers: ["idempotency-key": "before"])
            #expect(gone.status == 410)
            #expect(gone.errorCode == "installation_uninstalled")
            let keys = try await Security.keys(of: installation, in: h.gateway.redis)
            #expect(keys.allSatisfy { !$0.hasPrefix(prefix + "named-triggers") && !$0.hasPrefix(prefix + "invoke") })
            #expect(try await h.gateway.store.namedTriggerKeys(installation.installationID).isEmpty)
            // A re-registration after uninstall stores nothing.
            let again = try await h.emulator.registerNamedTriggers(
                installation, ["echo": h.emulator.namedTriggerURL(for: installation, key: "echo")])
            #expect(again.status == 410)
            #expect(try await h.gateway.store.namedTriggerKeys(installation.installationID).isEmpty)
            // An installation never seen: 404.
            let unknown = h.emulator.makeInstallation()
            #expect(try await Self.invoke(h, unknown, "echo").status == 404)
        }
    }

    @Test("registration: null removes a trigger (422 no_trigger_url), re-registration rotates its URL")
    func removalAndRotation() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            #expect(try await Self.invoke(h, installation, "echo").status == 200)
            let removed = try await h.emulator.registerNamedTriggers(installation, ["echo": nil])
            #expect(removed.status == 200)
            #expect(try await h.gateway.store.namedTriggerKeys(installation.installationID).isEmpty)
            let missing = try await Self.invoke(h, installation, "echo")
            #expect(missing.status == 422)
            #expect(missing.errorCode == "no_trigger_url")
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)

            // Rotation: the key now points at another trigger.
            let second = h.emulator.defineNamedTrigger(installation, key: "second")
            #expect(try await h.emulator.registerNamedTriggers(installation, ["echo": second]).status == 200)
            let rotated = try await Self.invoke(h, installation, "echo")
            #expect(rotated.status == 200)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "second").count == 1)
            #expect(h.emulator.namedTriggerCalls(for: installation, key: "echo").count == 1)
        }
    }

    @Test("registration refuses URLs off the allow-list, bad keys and too many triggers, and stores nothing")
    func registrationRefusals() async throws {
        let recorder = try await ConnectionRecorder.start()
        defer { Task { await recorder.stop() } }
        try await Self.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let authURL = try await h.gateway.store.triggerMaterial(id)?.url
            let good = h.emulator.namedTriggerURL(for: installation, key: "echo")!
            let refusals: [([String: String?], String)] = [
                (["evil": recorder.baseURL + "/x2/a"], "trigger_url_not_allowed"),
                (["evil": "http://localhost:1/x2/a", "fine": good], "trigger_url_not_allowed"),
                (["Bad Key": good], "invalid_request"),
                (["": good], "invalid_request"),
                (Dictionary(uniqueKeysWithValues: (0..<33).map { ("k\($0)", Optional(good)) }), "invalid_request"),
            ]
            for (triggers, code) in refusals {
                let answer = try await h.emulator.register(
                    installation, authTriggerUrl: h.emulator.baseURL + "/x1/moved", triggers: triggers)
                #expect(answer.status == 400, "\(triggers.keys.sorted())")
                #expect(answer.body.contains("\"\(code)\""), "\(triggers.keys.sorted())")
                #expect(!answer.body.contains(recorder.baseURL))
            }
            // Nothing stored: neither the named triggers nor the auth trigger URL sent alongside.
            #expect(try await h.gateway.store.namedTriggerKeys(id) == ["echo"])
            #expect(try await h.gateway.store.triggerMaterial(id)?.url == authURL)
            #expect(recorder.connections == 0)
            // A non-object triggers member.
            let raw = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: [
                    "authorization": "Bearer " + (try h.emulator.mintFIT(for: installation)),
                    "content-type": "application/json",
                ],
                body: #"{"authTriggerUrl":"\#(authURL ?? "")","triggers":["x"]}"#)
            #expect(raw.status == 400)
            #expect(raw.errorCode == "invalid_request")
            // URLs never reach the log.
            #expect(!h.logs.captured.contains { $0.contains("/x2/") })
        }
    }

    @Test("registrations racing for the last places: one wins, the refused ones store no auth-trigger URL")
    func registrationRace() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let good = h.emulator.namedTriggerURL(for: installation, key: "echo")!
            // Each adds 20 triggers to the one there: each passes the count check on its own (21),
            // any two together would not (41 > 32).
            let contenders = 8
            let answers = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
                for i in 0..<contenders {
                    group.addTask {
                        let triggers = Dictionary(
                            uniqueKeysWithValues: (0..<20).map { ("r\(i)-\($0)", Optional(good)) })
                        let answer = try await h.emulator.register(
                            installation, authTriggerUrl: h.emulator.baseURL + "/x1/race-\(i)", triggers: triggers)
                        return (i, answer.status)
                    }
                }
                return try await group.reduce(into: [Int: Int]()) { $0[$1.0] = $1.1 }
            }
            let winners = answers.filter { $0.value == 200 }.map(\.key)
            #expect(winners.count == 1, "\(answers)")
            #expect(answers.values.allSatisfy { $0 == 200 || $0 == 400 }, "\(answers)")
            guard let winner = winners.first else { return }
            // What is stored is the winner's registration only, whichever order the requests ran in.
            #expect(try await h.gateway.store.triggerMaterial(id)?.url == h.emulator.baseURL + "/x1/race-\(winner)")
            let expected = (["echo"] + (0..<20).map { "r\(winner)-\($0)" }).sorted()
            #expect(try await h.gateway.store.namedTriggerKeys(id) == expected)
        }
    }

    @Test("metrics per outcome and a duration histogram; an audit record per call without payload or URL")
    func metricsAndAudit() async throws {
        try await Self.run { h in
            let installation = try await h.installed()
            #expect(
                try await Self.invoke(h, installation, "echo", body: #"{"secretish":"payload-marker"}"#).status == 200)
            #expect(try await Self.invoke(h, installation, "nope").status == 422)
            // Refused for its parameters or payload after the scope checks: counted and audited too.
            #expect(try await Self.invoke(h, installation, "echo", query: "timeout=5").status == 400)
            let tooLarge = "\"" + String(repeating: "a", count: 70 * 1024) + "\""
            #expect(try await Self.invoke(h, installation, "echo", body: tooLarge).status == 413)
            let metrics = try await h.call(.GET, "/metrics", secret: nil).body
            #expect(metrics.contains(#"token_gateway_invocations_total{outcome="success"} 1"#))
            #expect(metrics.contains(#"token_gateway_invocations_total{outcome="not_found"} 1"#))
            #expect(metrics.contains(#"token_gateway_invocations_total{outcome="invalid_request"} 2"#))
            #expect(metrics.contains("token_gateway_invocation_duration_seconds_count 1"))
            #expect(!metrics.contains("echo"))
            let audit = h.logs.captured.filter { $0.contains("trigger_invoked") }
            #expect(audit.count == 4)
            #expect(
                audit.contains { $0.contains("invocation.outcome=invalid_request") && $0.contains("http.status=413") })
            #expect(audit.contains { $0.contains("invocation.outcome=success") && $0.contains("trigger.key=echo") })
            #expect(!h.logs.captured.contains { $0.contains("payload-marker") })
            #expect(!h.logs.captured.contains { $0.contains("/x2/") })
        }
    }
    @Test("the invoke route and the register body answer as Docs/openapi.yaml describes")
    func openAPIConformance() async throws {
        let r = AnswerRecorder()
        let template = "/v1/installations/{installationId}/invoke/{key}"
        try await Self.run(configure: { Self.breaker(threshold: 2, in: &$0) }) { h in
            let installation = try await h.installed()
            let path = GatewayHarness.path(installation) + "/invoke/"
            let json = ["content-type": "application/json"]
            try await h.recorded(
                r, .POST, path + "echo", template: template, status: 200, note: "echo", headers: json, body: #"{"a":1}"#
            )
            for note in ["kept", "replayed"] {
                try await h.recorded(
                    r, .POST, path + "echo?timeout=5000", template: template, status: 200, note: note,
                    headers: json.merging(["idempotency-key": "conf"]) { $1 }, body: #"{"a":2}"#)
            }
            try await h.recorded(
                r, .POST, path + "Bad", template: template, status: 400, note: "bad key", headers: json, body: "{}")
            try await h.recorded(
                r, .POST, path + "echo", template: template, status: 400, note: "not JSON", headers: json, body: "{")
            try await h.recorded(
                r, .POST, path + "echo", template: template, status: 401, note: "no credential", secret: nil,
                headers: json, body: "{}")
            try await h.recorded(
                r, .POST, path + "echo", template: template, status: 403, note: "no invoke list",
                secret: Self.noInvokeSecret,
                headers: json, body: "{}")
            try await h.recorded(
                r, .POST, GatewayHarness.path(h.emulator.makeInstallation()) + "/invoke/echo", template: template,
                status: 404,
                note: "unknown installation", headers: json, body: "{}")
            try await h.recorded(
                r, .POST, path + "echo", template: template, status: 413, note: "payload too large", headers: json,
                body: "\"" + String(repeating: "a", count: 70 * 1024) + "\"")
            try await h.recorded(
                r, .POST, path + "nope", template: template, status: 422, note: "no such trigger", headers: json,
                body: "{}")

            try await Self.recordRelayedErrors(h, r, installation)
            try await Self.recordTimeoutAndGone(h, r, installation)
            try await Self.recordRegister(h, r, installation)
        }
        #expect(r.count >= 18)
        try await r.check()
    }

    /// Relayed errors of a named trigger, then its circuit (threshold 2), recorded for the conformance check.
    private static func recordRelayedErrors(
        _ h: GatewayHarness, _ r: AnswerRecorder, _ installation: EmulatedInstallation
    ) async throws {
        let template = "/v1/installations/{installationId}/invoke/{key}"
        let path = GatewayHarness.path(installation) + "/invoke/"
        let json = ["content-type": "application/json"]
        // Relayed errors, then the circuit (threshold 2).
        h.emulator.setNamedTriggerBehaviour(.fail(status: 409, times: 1), for: installation, key: "echo")
        try await h.recorded(
            r, .POST, path + "echo", template: template, status: 409, note: "relayed 409", headers: json, body: "{}"
        )
        h.emulator.setNamedTriggerBehaviour(.fail(status: 503, times: 1), for: installation, key: "echo")
        try await h.recorded(
            r, .POST, path + "echo", template: template, status: 503, note: "relayed 503", headers: json, body: "{}"
        )
        h.emulator.setNamedTriggerBehaviour(.fail(status: 500, times: nil), for: installation, key: "echo")
        try await h.recorded(
            r, .POST, path + "echo", template: template, status: 500, note: "relayed 500", headers: json, body: "{}"
        )
        let open = try await h.recorded(
            r, .POST, path + "echo", template: template, status: 503, note: "circuit open", headers: json,
            body: "{}")
        #expect(open.errorCode == "circuit_open")
    }

    /// A named-trigger call that times out (504), then one to an uninstalled installation (410).
    private static func recordTimeoutAndGone(
        _ h: GatewayHarness, _ r: AnswerRecorder, _ installation: EmulatedInstallation
    ) async throws {
        let template = "/v1/installations/{installationId}/invoke/{key}"
        let json = ["content-type": "application/json"]
        // 504, then 410.
        let other = try await h.installed()
        h.emulator.setNamedTriggerBehaviour(.hang(maximum: .seconds(20)), for: other, key: "echo")
        let otherPath = GatewayHarness.path(other) + "/invoke/echo"
        try await h.recorded(
            r, .POST, otherPath + "?timeout=300", template: template, status: 504, note: "timeout", headers: json,
            body: "{}")
        h.emulator.releaseHeldNamedTriggerCalls()
        try await h.emulator.uninstall(other)
        try await h.recorded(
            r, .POST, otherPath, template: template, status: 410, note: "uninstalled", headers: json, body: "{}")
    }

    /// The register body with named triggers, and its refusal.
    private static func recordRegister(_ h: GatewayHarness, _ r: AnswerRecorder, _ installation: EmulatedInstallation)
        async throws
    {
        // The register body with named triggers, and its refusal.
        let url = h.emulator.namedTriggerURL(for: installation, key: "echo")!
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 200, note: "with triggers",
            secret: nil,
            headers: try h.forgeHeaders(installation),
            body:
                #"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))","triggers":{"echo":"\#(url)","gone":null}}"#
        )
        try await h.recorded(
            r, .POST, "/forge/register", template: "/forge/register", status: 400,
            note: "trigger off the allow-list",
            secret: nil, headers: try h.forgeHeaders(installation),
            body:
                #"{"authTriggerUrl":"\#(h.emulator.triggerURL(for: installation))","triggers":{"x":"https://evil.example.com/x"}}"#
        )
    }

}
