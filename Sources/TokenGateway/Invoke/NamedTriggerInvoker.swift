import AsyncHTTPClient
import FlowEngine
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Tracing

/// A trigger's answer as the gateway relays it: status, the allow-listed headers and the body.
public struct InvocationAnswer: Sendable, Hashable {
    /// Response headers passed on to the caller (lower-case names); everything else is dropped.
    public static let relayedHeaders: [String] = ["content-type", "content-language", "retry-after"]

    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
    /// The `requestId` of the call that got this answer, once kept for replays (so a replay
    /// carries it as the first answer did); nil in answers kept by earlier builds.
    public var requestID: String?

    public init(status: Int, headers: [(name: String, value: String)], body: [UInt8], requestID: String? = nil) {
        self.status = status
        self.headers = headers
        self.body = body
        self.requestID = requestID
    }

    public static func == (lhs: InvocationAnswer, rhs: InvocationAnswer) -> Bool {
        lhs.status == rhs.status && lhs.body == rhs.body && lhs.headers.map(\.name) == rhs.headers.map(\.name)
            && lhs.headers.map(\.value) == rhs.headers.map(\.value)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.status)
        hasher.combine(self.body)
    }

    /// Whether a trigger status is relayed: 2xx and 4xx/5xx (1xx and 3xx are not answers to relay).
    public static func isRelayable(status: Int) -> Bool {
        (200..<300).contains(status) || (400..<600).contains(status)
    }

    /// Whether an answer with `status` is kept for idempotent replays: a final one, below 500,
    /// and not one that asks to come back later (408 Request Timeout, 425 Too Early, 429 Too Many
    /// Requests), which a retry with the same key should try again.
    public static func isKept(status: Int) -> Bool {
        status < 500 && ![408, 425, 429].contains(status)
    }

    /// The serialized form kept (sealed) for idempotent replays.
    public func encoded() -> [UInt8] {
        var object: [String: Any] = [
            "s": self.status, "h": self.headers.map { [$0.name, $0.value] },
            "b": Data(self.body).base64EncodedString(),
        ]
        if let requestID = self.requestID { object["r"] = requestID }
        return Array((try? JSONSerialization.data(withJSONObject: object)) ?? Data())
    }

    /// Reads ``encoded()``; nil when the bytes are not such a form.
    public init?(encoded bytes: [UInt8]) {
        guard let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any],
            let status = object["s"] as? Int, let headers = object["h"] as? [[String]],
            let body = (object["b"] as? String).flatMap({ Data(base64Encoded: $0) })
        else { return nil }
        self.init(
            status: status,
            headers: headers.compactMap { pair -> (name: String, value: String)? in
                pair.count == 2 ? (name: pair[0], value: pair[1]) : nil
            },
            body: Array(body), requestID: object["r"] as? String)
    }
}

/// How one named-trigger call ended.
public enum InvocationCallResult: Sendable {
    /// The trigger answered (possibly after retries); relay this.
    case answered(InvocationAnswer, attempts: Int)
    /// The trigger could not be reached (or reset the connection) on every attempt.
    case transportError(attempts: Int)
    /// The caller's deadline passed before the trigger answered.
    case timeout(attempts: Int)
    /// The trigger's answer could not be relayed: too large, or a 1xx/3xx status.
    case invalidAnswer(attempts: Int)

    /// Whether the call counts as a success for the trigger's circuit breaker: any answer below 500.
    public var succeededForBreaker: Bool {
        if case .answered(let answer, _) = self { return answer.status < 500 }
        return false
    }
}

/// When a failed attempt is tried again: only with an `Idempotency-Key`, only after a transport
/// error or a 502/503/504 answer, only while attempts and time remain. A pure function, so the
/// rule is tested on its own.
public enum InvocationRetryPolicy {
    /// Whether attempt `attempt` (1-based) should be followed by another.
    public static func shouldRetry(
        after result: InvocationCallResult, attempt: Int, maxAttempts: Int, idempotent: Bool,
        remaining: Duration, pause: Duration
    ) -> Bool {
        guard idempotent, attempt < maxAttempts, remaining > pause + .milliseconds(50) else { return false }
        switch result {
        case .transportError: return true
        case .answered(let answer, _): return [502, 503, 504].contains(answer.status)
        case .timeout, .invalidAnswer: return false
        }
    }

    /// The pause before attempt `attempt + 1`: `base · 2^(attempt-1)`, at most 1 s, with up to
    /// 25 % jitter taken off (`jitter` in 0…1).
    public static func pause(after attempt: Int, base: Duration, jitter: Double) -> Duration {
        let exponent = min(max(attempt - 1, 0), 10)
        let raw = min(base * (1 << exponent), .seconds(1))
        let factor = 1 - 0.25 * min(max(jitter, 0), 1)
        return .nanoseconds(Int64(Double(raw.nanoseconds) * factor))
    }
}

/// Makes the signed HTTP call to a named trigger: the body of contract §4 plus `"payload"`,
/// signed with the installation's trigger key (`X-Token-Gateway-Signature`), the URL checked
/// against the allow-list again right before the call, redirects never followed, every attempt
/// within the caller's deadline. Never logs the URL or the payload.
public struct NamedTriggerInvoker: Sendable {
    let httpClient: HTTPClient
    let allowList: TriggerHostAllowList
    let configuration: InvokeConfiguration
    let logger: Logger

    public init(
        httpClient: HTTPClient, allowList: TriggerHostAllowList, configuration: InvokeConfiguration, logger: Logger
    ) {
        self.httpClient = httpClient
        self.allowList = allowList
        self.configuration = configuration
        self.logger = logger
    }

    /// The exact body bytes of a named-trigger call: `{"requestId", "installationId", "trigger",
    /// "issuedAt", "expiresAt", "idempotencyKey" (when the caller sent an `Idempotency-Key`),
    /// "payload"}` with `payload` the caller's JSON, byte for byte. `trigger` is the key of the
    /// trigger called: every named trigger of an installation trusts the same signing key, so a
    /// function that checks it is its own cannot be sent a call captured on its way to another.
    /// `idempotencyKey` is the caller's key scoped to the caller (hex SHA-256 of its name, a newline
    /// and the key: what the gateway keeps answers under), signed with the rest, so a function that
    /// deduplicates on it can neither be made to run a captured call again under another key nor
    /// mix up two callers' keys.
    public static func body(
        requestID: String, installation: InstallationID, trigger: String, issuedAt: Int64, expiresAt: Int64,
        idempotencyKey: String? = nil, payload: [UInt8]
    ) -> [UInt8] {
        var fields: [(String, JSONValue)] = [
            ("requestId", .string(requestID)), ("installationId", .string(installation.ari)),
            ("trigger", .string(trigger)), ("issuedAt", .int(issuedAt)), ("expiresAt", .int(expiresAt)),
        ]
        if let idempotencyKey { fields.append(("idempotencyKey", .string(idempotencyKey))) }
        var head = Array(JSONValue.object(fields).serialized().utf8)
        head.removeLast()  // the closing brace
        head += Array(",\"payload\":".utf8)
        head += payload
        head.append(UInt8(ascii: "}"))
        return head
    }

    /// Calls the trigger at `material` with `body` until it answers, the attempts are spent or
    /// `deadline` passes. `idempotencyKey` (when the caller sent one) is passed on and allows retries.
    public func call(
        material: GatewayStore.TriggerMaterial, body: [UInt8], idempotencyKey: String?,
        deadline: ContinuousClock.Instant,
        logger: Logger
    ) async -> InvocationCallResult {
        guard self.allowList.allows(material.url) else {
            logger.error("stored named-trigger URL is not on the allow-list; not calling it")
            return .transportError(attempts: 0)
        }
        let signature: String
        do {
            let key = try TriggerSigningKey(keyId: material.keyID, rawPrivateKey: material.rawPrivateKey)
            signature = try key.signatureHeader(for: body)
        } catch {
            logger.error("could not sign named-trigger call", metadata: ["error": "\(type(of: error))"])
            return .transportError(attempts: 0)
        }
        var attempt = 1
        while true {
            let result = await self.attempt(
                url: material.url, body: body, signature: signature, idempotencyKey: idempotencyKey,
                deadline: deadline, attempt: attempt, logger: logger)
            let pause = InvocationRetryPolicy.pause(
                after: attempt, base: self.configuration.retryBase, jitter: Double.random(in: 0...1))
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard
                InvocationRetryPolicy.shouldRetry(
                    after: result, attempt: attempt, maxAttempts: self.configuration.maxAttempts,
                    idempotent: idempotencyKey != nil, remaining: remaining, pause: pause)
            else { return result }
            logger.debug("retrying named-trigger call", metadata: ["trigger.attempt": "\(attempt)"])
            do {
                try await Task.sleep(for: pause)
            } catch {
                return .timeout(attempts: attempt)
            }
            attempt += 1
        }
    }

    private func attempt(
        url: String, body: [UInt8], signature: String, idempotencyKey: String?, deadline: ContinuousClock.Instant,
        attempt: Int, logger: Logger
    ) async -> InvocationCallResult {
        let remaining = ContinuousClock.now.duration(to: deadline)
        guard remaining > .zero else { return .timeout(attempts: attempt - 1) }
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.headers.add(name: "x-token-gateway-signature", value: signature)
        request.headers.add(name: "user-agent", value: "token-gateway")
        if let idempotencyKey { request.headers.add(name: "idempotency-key", value: idempotencyKey) }
        request.body = .bytes(ByteBuffer(bytes: body))
        InstrumentationSystem.instrument.inject(
            ServiceContext.current ?? .topLevel, into: &request.headers, using: HTTPHeadersInjector())
        do {
            let response = try await self.httpClient.execute(request, timeout: .nanoseconds(remaining.nanoseconds))
            let status = Int(response.status.code)
            var buffer: ByteBuffer
            do {
                buffer = try await response.body.collect(upTo: self.configuration.maxAnswerSize, before: deadline)
            } catch is NIOTooManyBytesError {
                logger.notice(
                    "named trigger answered more than the relay limit", metadata: ["http.status": "\(status)"])
                return .invalidAnswer(attempts: attempt)
            }
            guard InvocationAnswer.isRelayable(status: status) else {
                logger.notice(
                    "named trigger answered a status that is not relayed", metadata: ["http.status": "\(status)"])
                return .invalidAnswer(attempts: attempt)
            }
            var headers: [(name: String, value: String)] = []
            for name in InvocationAnswer.relayedHeaders {
                if let value = response.headers.first(name: name), value.utf8.count <= 1024 {
                    headers.append((name, value))
                }
            }
            logger.debug(
                "named trigger answered", metadata: ["http.status": "\(status)", "trigger.attempt": "\(attempt)"])
            return .answered(
                InvocationAnswer(
                    status: status, headers: headers, body: buffer.readBytes(length: buffer.readableBytes) ?? []),
                attempts: attempt)
        } catch let error as HTTPClientError
            where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout
        {
            return ContinuousClock.now < deadline ? .transportError(attempts: attempt) : .timeout(attempts: attempt)
        } catch {
            if error is CancellationError || ContinuousClock.now >= deadline { return .timeout(attempts: attempt) }
            logger.notice("named-trigger call failed", metadata: ["error": "\(type(of: error))"])
            return .transportError(attempts: attempt)
        }
    }
}
