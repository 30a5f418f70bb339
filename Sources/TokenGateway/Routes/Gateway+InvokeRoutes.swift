import Crypto
import FlowEngine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// Named triggers: registration (`"triggers"` in `/forge/register`) and
/// `POST /v1/installations/{id}/invoke/{key}` (see `Docs/invoke.md`).
extension Gateway {
    func addInvokeRoutes(to router: Router<BasicRequestContext>) {
        router.post("/v1/installations/:id/invoke/:key") { request, context in
            try await self.invokeRoute(request, context: context)
        }
    }

    // MARK: Registration

    /// Validates the `triggers` member of a `/forge/register` body before anything is stored:
    /// 400 `invalid_request` or `trigger_url_not_allowed`, and 400 `invalid_request` when the
    /// installation would end up with more than ``NamedTriggerRegistration/maxCount`` triggers.
    func namedTriggerRegistration(_ body: [String: Any], installation id: InstallationID, logger: Logger) async throws
        -> NamedTriggerRegistration
    {
        let registration: NamedTriggerRegistration
        do {
            registration = try NamedTriggerRegistration(
                parsing: body["triggers"], allowList: self.configuration.triggerHosts)
        } catch {
            if error.code == "trigger_url_not_allowed" {
                logger.notice(
                    "refused named-trigger URL outside the allow-list", metadata: ["installation.id": "\(id)"])
            }
            throw GatewayError(status: .badRequest, code: error.code, message: error.message)
        }
        if registration.changes.contains(where: { $0.url != nil }) {
            let existing: [String]
            do {
                existing = try await self.store.namedTriggerKeys(id)
            } catch {
                throw GatewayError.storeUnavailable
            }
            var keys = Set(existing)
            for change in registration.changes {
                if change.url == nil { keys.remove(change.key) } else { keys.insert(change.key) }
            }
            if keys.count > NamedTriggerRegistration.maxCount { throw Self.tooManyNamedTriggers }
        }
        return registration
    }

    /// Stores validated named triggers, before the registration itself (see `forgeRegister`).
    func storeNamedTriggers(
        _ registration: NamedTriggerRegistration, installation id: InstallationID, now: FlowTime, logger: Logger
    ) async throws {
        if registration.isEmpty { return }
        let outcome: GatewayStore.NamedTriggerUpdate
        do {
            outcome = try await self.store.updateNamedTriggers(
                id, changes: registration.changes, maxCount: NamedTriggerRegistration.maxCount, now: now)
        } catch {
            throw GatewayError.storeUnavailable
        }
        switch outcome {
        case .updated:
            logger.info(
                "named triggers registered",
                metadata: [
                    "installation.id": "\(id)",
                    "trigger.keys":
                        "\(registration.changes.filter { $0.url != nil }.map { $0.key }.joined(separator: ","))",
                    "trigger.removed_keys":
                        "\(registration.changes.filter { $0.url == nil }.map { $0.key }.joined(separator: ","))",
                ])
        case .uninstalled:
            throw GatewayError(FlowError.installationUninstalled)
        case .tooMany:
            throw Self.tooManyNamedTriggers
        }
    }

    static let tooManyNamedTriggers = GatewayError.invalidRequest(
        "an installation may register at most \(NamedTriggerRegistration.maxCount) named triggers")

    static let overloaded = GatewayError(
        status: .serviceUnavailable, code: "overloaded",
        message: "too many calls to this installation's triggers are in progress", retryAfter: 1)

    static let processOverloaded = GatewayError(
        status: .serviceUnavailable, code: "overloaded",
        message: "too many named-trigger calls are in progress on this gateway", retryAfter: 1)

    // MARK: Invocation

    /// What one invocation did, for its metric and audit record.
    private struct InvocationTrace {
        /// The request's logger: its lines carry the request id.
        let logger: Logger
        var outcome = "not_found"
        var requestID: String?
        var attempts = 0
        var calledFor: Duration = .zero
    }

    func invokeRoute(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        let caller = try self.authenticateCaller(request)
        let id = try self.installationParameter(context, caller: caller)
        guard let key = context.parameters.get("key"), NamedTriggerKey.isValid(key) else {
            throw GatewayError.invalidParameter(
                "the trigger key must be 1–64 characters of a–z 0–9 _ -, starting with a letter or digit")
        }
        guard caller.invoke.contains(key) else { throw GatewayError.forbidden }
        let parameters: (timeout: Duration, idempotencyKey: String?, payload: [UInt8])
        do {
            parameters = try await self.invocationParameters(request)
        } catch let error as any HTTPResponseError {
            // Past the scope checks, so counted and audited like every other invocation (400, or
            // 413 for a payload over the limit, which Hummingbird reports as its own error). A
            // client gone while its body was read is no answer, and is not counted.
            var refused = InvocationTrace(logger: context.logger)
            refused.outcome = "invalid_request"
            self.finishInvocation(
                caller: caller, id: id, key: key, trace: refused, status: Int(error.status.code),
                idempotent: request.headers[.idempotencyKey] != nil)
            throw error
        }
        let (timeout, idempotencyKey, payload) = parameters

        var trace = InvocationTrace(logger: context.logger)
        let response: Response
        do {
            response = try await self.invoke(
                id, key: key, caller: caller, payload: payload, idempotencyKey: idempotencyKey,
                deadline: started.advanced(by: timeout), trace: &trace, logger: context.logger)
        } catch let error as GatewayError {
            self.finishInvocation(
                caller: caller, id: id, key: key, trace: trace, status: Int(error.status.code),
                idempotent: idempotencyKey != nil)
            throw error
        }
        self.finishInvocation(
            caller: caller, id: id, key: key, trace: trace, status: Int(response.status.code),
            idempotent: idempotencyKey != nil)
        return response
    }

    /// The invocation's `timeout`, `Idempotency-Key` and payload, validated (400, or 413 for a
    /// payload over the limit).
    private func invocationParameters(_ request: Request) async throws -> (
        timeout: Duration, idempotencyKey: String?, payload: [UInt8]
    ) {
        var timeout = TokenRequestDefaults.timeout
        // Given twice, a proxy and the gateway could each read a different one: refused, as on the
        // token route.
        if let raw = try CallerQuery(request.uri.queryParameters, once: ["timeout"]).get("timeout") {
            guard let v = Int64(raw), TokenRequestDefaults.timeoutMillisecondsRange.contains(v) else {
                throw GatewayError.invalidParameter("timeout must be an integer number of milliseconds in 100…30000")
            }
            timeout = .milliseconds(v)
        }
        var idempotencyKey: String?
        if let raw = request.headers[.idempotencyKey] {
            // Repeated, the header's values would be read joined (`a, b`).
            guard request.headers[values: .idempotencyKey].count == 1 else {
                throw GatewayError.invalidRequest("Idempotency-Key must be given once")
            }
            guard (1...255).contains(raw.utf8.count), raw.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }),
                raw.first != " ", raw.last != " "
            else {
                throw GatewayError.invalidRequest("Idempotency-Key must be 1–255 visible ASCII characters")
            }
            idempotencyKey = raw
        }
        return (timeout, idempotencyKey, try await self.readInvocationPayload(request))
    }

    private func finishInvocation(
        caller: Caller, id: InstallationID, key: String, trace: InvocationTrace, status: Int, idempotent: Bool
    ) {
        self.invocationMetrics.count(outcome: trace.outcome)
        if trace.attempts > 0 { self.invocationMetrics.duration.recordNanoseconds(trace.calledFor.nanoseconds) }
        self.audit.invocation(
            caller: caller.name, installation: id, trigger: key, outcome: trace.outcome, status: status,
            requestID: trace.requestID, idempotent: idempotent, attempts: trace.attempts,
            durationMilliseconds: trace.calledFor.nanoseconds / 1_000_000)
    }

    /// The caller's body as the JSON to embed: any JSON value (`null` when the body is empty),
    /// `Content-Type: application/json`, at most `invoke.maxPayloadSize` bytes (413).
    func readInvocationPayload(_ request: Request) async throws -> [UInt8] {
        var buffer = try await request.body.collect(upTo: self.configuration.invoke.maxPayloadSize)
        var bytes = buffer.readBytes(length: buffer.readableBytes) ?? []
        func isSpace(_ b: UInt8) -> Bool { b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09 }
        while let last = bytes.last, isSpace(last) { bytes.removeLast() }
        let leading = bytes.prefix(while: isSpace).count
        if leading > 0 { bytes.removeFirst(leading) }
        if bytes.isEmpty { return Array("null".utf8) }
        let contentType = request.headers[.contentType]?.lowercased() ?? ""
        let mediaType = contentType.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        guard mediaType == "application/json" || mediaType.hasSuffix("+json") else {
            throw GatewayError.invalidRequest("Content-Type must be application/json")
        }
        // UTF-8 only (RFC 8259 §8.1; the bytes are embedded in the signed body as they are): no
        // byte-order mark, no UTF-16 or UTF-32.
        guard bytes.first != 0xEF, bytes.first != 0x00, bytes.count < 2 || bytes[1] != 0x00,
            String(validating: bytes, as: UTF8.self) != nil
        else {
            throw GatewayError.invalidRequest("request body is not UTF-8 JSON")
        }
        guard JSONBody.depth(of: bytes) <= 32 else {
            throw GatewayError.invalidRequest("JSON body is nested too deeply (at most 32 levels)")
        }
        guard (try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed])) != nil else {
            throw GatewayError.invalidRequest("request body is not valid JSON")
        }
        return bytes
    }

    private func invoke(
        _ id: InstallationID, key: String, caller: Caller, payload: [UInt8], idempotencyKey: String?,
        deadline: ContinuousClock.Instant, trace: inout InvocationTrace, logger: Logger
    ) async throws -> Response {
        if let refusal = self.invocationLimiter.acquire(id) {
            trace.outcome = "overloaded"
            throw refusal == .installationBusy ? Self.overloaded : Self.processOverloaded
        }
        defer { self.invocationLimiter.release(id) }

        var logger = logger
        logger[metadataKey: "installation.id"] = "\(id)"
        logger[metadataKey: "trigger.key"] = "\(key)"

        var lookup = try await self.namedTrigger(id, key: key, trace: &trace)

        // An Idempotency-Key: answer from the first call with it, or become that first call. Keys are
        // scoped to the caller, so two callers never see each other's answers.
        let requestOwner = "inv_" + Base64URL.encode((0..<12).map { _ in UInt8.random(in: .min ... .max) })
        var claim: IdempotencyClaimed?
        if let idempotencyKey {
            switch try await self.claimIdempotencyKey(
                idempotencyKey, id: id, key: key, caller: caller, payload: payload, owner: requestOwner,
                deadline: deadline, trace: &trace)
            {
            case .claimed(let claimed):
                claim = claimed
                // The trigger may have changed while this request waited for an earlier one with
                // the key (its circuit opened, the installation was uninstalled): read it again.
                if claimed.waited {
                    do {
                        lookup = try await self.namedTrigger(id, key: key, trace: &trace)
                    } catch {
                        try? await self.store.releaseIdempotencyKey(
                            id, trigger: key, digest: claimed.digest, owner: claimed.owner)
                        throw error
                    }
                }
            case .replay(let response): return response
            }
        }

        guard case .found(let material) = lookup else {
            if let claim {
                try? await self.store.releaseIdempotencyKey(id, trigger: key, digest: claim.digest, owner: claim.owner)
            }
            trace.outcome = "circuit_open"
            let until: Int64
            if case .circuitOpen(let u) = lookup { until = u } else { until = 0 }
            let wait = max(0, until - FlowTime.now().unixMilliseconds)
            throw GatewayError(
                status: .serviceUnavailable, code: "circuit_open",
                message: "recent consecutive calls to this named trigger failed; try again later",
                retryAfter: max(1, Duration.milliseconds(wait).retryAfterSeconds))
        }

        let requestID = requestOwner
        trace.requestID = requestID
        logger[metadataKey: "request.id"] = "\(requestID)"
        let now = FlowTime.now()
        let expiresAt = now + ContinuousClock.now.duration(to: deadline)
        let body = NamedTriggerInvoker.body(
            requestID: requestID, installation: id, trigger: key, issuedAt: now.unixSeconds,
            expiresAt: (expiresAt.nanoseconds + 999_999_999) / 1_000_000_000, idempotencyKey: claim?.digest,
            payload: payload)
        let callStarted = ContinuousClock.now
        let result = await self.namedTriggerInvoker.call(
            material: material, body: body, idempotencyKey: idempotencyKey, deadline: deadline, logger: logger)
        trace.calledFor = callStarted.duration(to: .now)
        await self.recordInvocationOutcome(id, key: key, result: result, logger: logger)
        return try await self.answer(result, id: id, key: key, requestID: requestID, claim: claim, trace: &trace)
    }

    /// The named trigger's material, or that its circuit is open; refusals for an unknown or
    /// uninstalled installation or an unknown key, 503 when the store is unreachable.
    private func namedTrigger(_ id: InstallationID, key: String, trace: inout InvocationTrace) async throws
        -> GatewayStore.NamedTriggerLookup
    {
        let lookup: GatewayStore.NamedTriggerLookup
        do {
            lookup = try await self.store.namedTriggerMaterial(id, key: key, now: FlowTime.now())
        } catch is EncryptionError {
            throw self.unopenable("the named trigger's URL or signing key", id: id, key: key, trace: &trace)
        } catch {
            trace.outcome = "store_unavailable"
            throw GatewayError.storeUnavailable
        }
        switch lookup {
        case .installationNotFound: throw GatewayError(FlowError.installationNotFound)
        case .uninstalled: throw GatewayError(FlowError.installationUninstalled)
        case .noTrigger:
            throw GatewayError(
                status: .unprocessableContent, code: "no_trigger_url",
                message: "the installation registered no trigger under this key")
        case .circuitOpen, .found: return lookup
        }
    }

    /// 500 `internal_error` for a stored secret of the trigger (`what`) that does not open with the
    /// key ring, logged: a key was removed from the ring before `keys rewrap` finished, so retrying
    /// cannot help (no 503).
    private func unopenable(_ what: String, id: InstallationID, key: String, trace: inout InvocationTrace)
        -> GatewayError
    {
        trace.logger.error(
            "\(what) does not open with the key ring", metadata: ["installation.id": "\(id)", "trigger.key": "\(key)"])
        trace.outcome = "internal_error"
        return GatewayError.internalError
    }

    /// An Idempotency-Key this request owns: the digest it is stored under and the owner.
    private struct IdempotencyClaimed {
        let digest: String
        let owner: String
        /// The claim came after waiting for an earlier request with the key.
        var waited = false
    }

    private enum IdempotencyOutcome {
        /// This request makes the call.
        case claimed(IdempotencyClaimed)
        /// An earlier request with the key finished: its answer, replayed.
        case replay(Response)
    }

    /// Claims `idempotencyKey` for this request, or replays the answer of the first request with
    /// it; waits (with growing pauses, until the deadline) while that request is still calling.
    private func claimIdempotencyKey(
        _ idempotencyKey: String, id: InstallationID, key: String, caller: Caller, payload: [UInt8], owner: String,
        deadline: ContinuousClock.Instant, trace: inout InvocationTrace
    ) async throws -> IdempotencyOutcome {
        let digest = Self.hex(SHA256.hash(data: Array((caller.name + "\n" + idempotencyKey).utf8)))
        let fingerprint = Self.hex(SHA256.hash(data: payload))
        var waits = 0
        while true {
            // A claim whose holder dies expires 5 s after the holder's deadline: measured at each
            // try, so a request that waited first claims only for what is left of its time.
            let pendingTTL = ContinuousClock.now.duration(to: deadline) + .seconds(5)
            let result: GatewayStore.IdempotencyClaim
            do {
                result = try await self.store.claimIdempotencyKey(
                    id, trigger: key, digest: digest, fingerprint: fingerprint, owner: owner,
                    pendingTTL: pendingTTL)
            } catch is EncryptionError {
                throw self.unopenable("the answer kept for an Idempotency-Key", id: id, key: key, trace: &trace)
            } catch {
                trace.outcome = "store_unavailable"
                throw GatewayError.storeUnavailable
            }
            switch result {
            case .claimed:
                return .claimed(IdempotencyClaimed(digest: digest, owner: owner, waited: waits > 0))
            case .done(let bytes):
                guard let answer = InvocationAnswer(encoded: bytes) else {
                    trace.outcome = "store_unavailable"
                    throw GatewayError.storeUnavailable
                }
                trace.outcome = "replayed"
                trace.requestID = answer.requestID
                return .replay(Self.relay(answer, requestID: answer.requestID, replayed: true))
            case .payloadMismatch:
                trace.outcome = "not_found"
                throw GatewayError.invalidRequest("this Idempotency-Key was used with a different payload")
            case .inProgress:
                // A concurrent request with the same key is calling the trigger: wait for its answer,
                // polling at growing, jittered pauses (20–40 ms at first, at most 250 ms).
                waits += 1
                let pause = Backoff.delay(
                    attempt: waits, base: .milliseconds(40), cap: .milliseconds(250), jitter: .random(in: 0...1))
                let left = ContinuousClock.now.duration(to: deadline)
                guard left > pause, !Task.isCancelled else {
                    trace.outcome = "timeout"
                    throw GatewayError(
                        status: .gatewayTimeout, code: "token_timeout",
                        message: "an earlier request with this Idempotency-Key was still in progress at the timeout")
                }
                try? await Task.sleep(for: pause)
            }
        }
    }

    /// The trigger's circuit: transport errors, timeouts and 5xx answers count as failures.
    private func recordInvocationOutcome(
        _ id: InstallationID, key: String, result: InvocationCallResult, logger: Logger
    ) async {
        do {
            let openUntil = try await self.store.recordInvocationOutcome(
                id, key: key, succeeded: result.succeededForBreaker,
                threshold: self.configuration.flow.breakerThreshold, openBase: self.configuration.flow.breakerOpenBase,
                openCap: self.configuration.flow.breakerOpenCap, now: FlowTime.now())
            if let openUntil {
                logger.notice(
                    "named-trigger circuit opened after consecutive failed calls",
                    metadata: ["circuit.open_until_ms": "\(openUntil)"])
            }
        } catch {
            logger.warning("could not record the named-trigger call for its circuit")
        }
    }

    /// The caller's answer to a call that was made; completes or releases the Idempotency-Key.
    private func answer(
        _ result: InvocationCallResult, id: InstallationID, key: String, requestID: String,
        claim: IdempotencyClaimed?, trace: inout InvocationTrace
    ) async throws -> Response {
        switch result {
        case .answered(let answer, let attempts):
            trace.attempts = attempts
            trace.outcome = (200..<300).contains(answer.status) ? "success" : "http_error"
            if let claim {
                // Final answers are kept and replayed; a 5xx (or a "come back later") answer lets a
                // later retry call again.
                if InvocationAnswer.isKept(status: answer.status) {
                    var kept = answer
                    kept.requestID = requestID
                    _ = try? await self.store.completeIdempotencyKey(
                        id, trigger: key, digest: claim.digest, owner: claim.owner, answer: kept.encoded(),
                        retention: self.configuration.invoke.idempotencyRetention)
                } else {
                    try? await self.store.releaseIdempotencyKey(
                        id, trigger: key, digest: claim.digest, owner: claim.owner)
                }
            }
            return Self.relay(answer, requestID: requestID, replayed: false)
        case .timeout(let attempts):
            trace.attempts = attempts
            trace.outcome = "timeout"
            if let claim {
                try? await self.store.releaseIdempotencyKey(id, trigger: key, digest: claim.digest, owner: claim.owner)
            }
            throw GatewayError(
                status: .gatewayTimeout, code: "token_timeout", message: "the trigger did not answer within the timeout"
            )
        case .transportError(let attempts), .invalidAnswer(let attempts):
            trace.attempts = attempts
            let invalid: Bool
            if case .invalidAnswer = result { invalid = true } else { invalid = false }
            trace.outcome = invalid ? "invalid_answer" : "transport_error"
            if let claim {
                try? await self.store.releaseIdempotencyKey(id, trigger: key, digest: claim.digest, owner: claim.owner)
            }
            throw GatewayError(
                status: .badGateway, code: "trigger_failed",
                message: invalid
                    ? "the trigger's answer could not be relayed (too large or not a final status)"
                    : "the trigger could not be reached")
        }
    }

    /// The caller's answer: the trigger's status, its allow-listed headers and its body.
    static func relay(_ answer: InvocationAnswer, requestID: String?, replayed: Bool, now: Date = Date()) -> Response {
        var headers: HTTPFields = [.cacheControl: "no-store"]
        for (name, value) in answer.headers {
            if let field = HTTPField.Name(name) { headers[field] = value }
        }
        // Contract §1: a 503 or 429 carries Retry-After in seconds. The trigger's own is kept as
        // seconds (an HTTP date becomes the seconds until it; a day or more is a day); none, or an
        // unreadable one, is 1.
        if answer.status == 503 || answer.status == 429 {
            let given = headers[.retryAfter]
            var seconds = OfflineUserAuthTokenClient.retryAfter(given, now: now)?.retryAfterSeconds
            if seconds == nil, let given, let n = Int64(given.trimmingCharacters(in: .whitespaces)), n >= 86_400 {
                seconds = 86_400
            }
            headers[.retryAfter] = String(seconds ?? 1)
        }
        if let requestID { headers[.tokenGatewayRequestID] = requestID }
        if replayed { headers[.idempotentReplayed] = "true" }
        let status = HTTPResponse.Status(code: answer.status)
        if answer.status == 204 || answer.status == 304 {
            return Response(status: status, headers: headers)
        }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: answer.body)))
    }

    static func hex(_ digest: SHA256.Digest) -> String {
        digest.map { String(format: "%02x", $0) }.joined()
    }
}
