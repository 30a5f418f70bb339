import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// What a named trigger does once it has verified a call. Set with
/// ``ForgeEmulator/setNamedTriggerBehaviour(_:for:key:)`` or the admin route.
///
/// In JSON: `{"type": "echo"}`, `{"type": "fail", "status": 503, "times": 1}` (`times` absent:
/// always), `{"type": "delay", "delayMs": 200}` (then echo), `{"type": "hang", "maxMs": 30000}`
/// (never answer until ``ForgeEmulator/releaseHeldNamedTriggerCalls()``, the admin release route or
/// `maxMs`, default 30 s), `{"type": "hangBody", "maxMs": 30000}` (the same, after sending the answer's
/// status and headers: a body that does not come).
public enum NamedTriggerBehaviour: Sendable, Hashable {
    /// Answer 200 `{"echo": <payload>, "requestId": …, "trigger": <key>, "idempotencyKey": … | null}`
    /// (the signed body's `idempotencyKey`).
    case echo
    /// Answer `status` (with `Retry-After: 7`) the next `times` calls (nil: every call), then echo.
    case fail(status: Int, times: Int?)
    /// Wait, then echo.
    case delay(Duration)
    /// Hold the call without answering until released or `maximum` passed, then echo.
    case hang(maximum: Duration)
    /// Answer 200 and its headers at once, then hold the body until released or `maximum` passed.
    case hangBody(maximum: Duration)
}

extension NamedTriggerBehaviour: Codable {
    private enum CodingKeys: String, CodingKey {
        case type, status, times, delayMs, maxMs
    }

    private enum Kind: String, Codable {
        case echo, fail, delay, hang, hangBody
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        switch try container.decode(Kind.self, forKey: .type) {
        case .echo:
            self = .echo
        case .fail:
            let status = try container.decode(Int.self, forKey: .status)
            guard (200...599).contains(status) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .status, in: container, debugDescription: "not a final HTTP status")
            }
            let times = try container.decodeIfPresent(Int.self, forKey: .times)
            if let times, times < 0 {
                throw DecodingError.dataCorruptedError(forKey: .times, in: container, debugDescription: "negative")
            }
            self = .fail(status: status, times: times)
        case .delay:
            let ms = try container.decode(Int.self, forKey: .delayMs)
            guard (0...600_000).contains(ms) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .delayMs, in: container, debugDescription: "out of range")
            }
            self = .delay(.milliseconds(ms))
        case .hang:
            let ms = try container.decodeIfPresent(Int.self, forKey: .maxMs) ?? 30_000
            guard (0...600_000).contains(ms) else {
                throw DecodingError.dataCorruptedError(forKey: .maxMs, in: container, debugDescription: "out of range")
            }
            self = .hang(maximum: .milliseconds(ms))
        case .hangBody:
            let ms = try container.decodeIfPresent(Int.self, forKey: .maxMs) ?? 30_000
            guard (0...600_000).contains(ms) else {
                throw DecodingError.dataCorruptedError(forKey: .maxMs, in: container, debugDescription: "out of range")
            }
            self = .hangBody(maximum: .milliseconds(ms))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .echo:
            try container.encode(Kind.echo, forKey: .type)
        case .fail(let status, let times):
            try container.encode(Kind.fail, forKey: .type)
            try container.encode(status, forKey: .status)
            try container.encodeIfPresent(times, forKey: .times)
        case .delay(let delay):
            try container.encode(Kind.delay, forKey: .type)
            try container.encode(Self.milliseconds(delay), forKey: .delayMs)
        case .hang(let maximum):
            try container.encode(Kind.hang, forKey: .type)
            try container.encode(Self.milliseconds(maximum), forKey: .maxMs)
        case .hangBody(let maximum):
            try container.encode(Kind.hangBody, forKey: .type)
            try container.encode(Self.milliseconds(maximum), forKey: .maxMs)
        }
    }

    private static func milliseconds(_ d: Duration) -> Int {
        Int(d.components.seconds) * 1000 + Int(d.components.attoseconds / 1_000_000_000_000_000)
    }
}

/// One call the gateway made to a named trigger.
public struct NamedTriggerCall: Sendable, Hashable {
    public let receivedAt: Date
    /// Whether `X-Token-Gateway-Signature` named the installation's registered key and verified
    /// over the exact body.
    public let signatureValid: Bool
    /// The body's `requestId`, if the body parsed.
    public let requestId: String?
    /// The `Idempotency-Key` header, if any.
    public let idempotencyKey: String?
    /// The body's `idempotencyKey` (signed with the rest), if any: what the echo answers with, as
    /// the companion deduplicates on it, never on the unsigned header.
    public let signedIdempotencyKey: String?
    /// The exact body bytes and signature header, so tests can replay or tamper with them.
    public let body: Data
    public let signatureHeader: String?
    /// The status answered; nil while the call is in progress.
    public internal(set) var answeredStatus: Int?
}

/// The emulator's named triggers: per installation and key a path `/x2/<random id>`, a behaviour
/// and the calls received.
struct EmulatorNamedTriggers: Sendable {
    struct Trigger: Sendable {
        let installationId: String
        let key: String
        let triggerId: String
        var behaviour: NamedTriggerBehaviour
        var calls: [NamedTriggerCall] = []
        /// The keys the gateway accepted the function under (its own `key` until one was): the
        /// `trigger` a call may name.
        var registeredAs: Set<String> = []

        /// Whether a call naming `trigger` is this function's to run.
        func runs(_ trigger: String?) -> Bool {
            guard let trigger else { return false }
            return self.registeredAs.isEmpty ? trigger == self.key : self.registeredAs.contains(trigger)
        }
    }

    /// Notes the keys the gateway accepted `installationId`'s functions under: `triggers` maps a
    /// key to a URL `base + <trigger id>`, or to nil (the key removed).
    mutating func registered(_ triggers: [String: String?], base: String, installationId: String) {
        for (key, url) in triggers {
            for id in self.triggers.keys where self.triggers[id]?.installationId == installationId {
                self.triggers[id]?.registeredAs.remove(key)
            }
            guard let url, url.hasPrefix(base) else { continue }
            let triggerId = String(url.dropFirst(base.count))
            if self.triggers[triggerId]?.installationId == installationId {
                self.triggers[triggerId]?.registeredAs.insert(key)
            }
        }
    }

    /// Trigger id → trigger.
    var triggers: [String: Trigger] = [:]
    /// Held (`hang`) calls waiting to be released.
    var held: [UUID: CheckedContinuation<Void, Never>] = [:]

    func trigger(installationId: String, key: String) -> Trigger? {
        self.triggers.values.first { $0.installationId == installationId && $0.key == key }
    }

    func triggers(of installationId: String) -> [Trigger] {
        self.triggers.values.filter { $0.installationId == installationId }.sorted { $0.key < $1.key }
    }
}

/// The body of a named-trigger call: contract §4's fields plus `trigger`, `idempotencyKey` and
/// `payload`.
struct NamedTriggerCallBody: Decodable, Sendable {
    var requestId: String
    var installationId: String
    /// The key of the trigger the call is for (signed with the rest).
    var trigger: String?
    var issuedAt: Double
    var expiresAt: Double
    var idempotencyKey: String?
}

struct NamedTriggerSummary: Codable, Sendable {
    var key: String
    var url: String
    var behaviour: NamedTriggerBehaviour
    var calls: Int
    /// The gateway's status for the registration this change sent, if one was sent.
    var registrationStatus: Int?
}

extension ForgeEmulator {
    // MARK: Public API

    /// Defines (or keeps) the named trigger `key` of `installation` with `behaviour` and returns its
    /// URL. Nothing is sent to the gateway: see ``registerNamedTriggers(_:_:)`` or ``register(_:authTriggerUrl:systemToken:triggers:)``.
    @discardableResult
    public func defineNamedTrigger(
        _ installation: EmulatedInstallation, key: String, behaviour: NamedTriggerBehaviour = .echo
    ) -> String {
        self.state.withLock { $0.remember(installation) }
        let triggerId = self.namedTriggers.withLock { state -> String in
            if var existing = state.trigger(installationId: installation.id, key: key) {
                existing.behaviour = behaviour
                state.triggers[existing.triggerId] = existing
                return existing.triggerId
            }
            let id = Self.randomTriggerId()
            state.triggers[id] = .init(installationId: installation.id, key: key, triggerId: id, behaviour: behaviour)
            return id
        }
        return self.baseURL + "/x2/" + triggerId
    }

    /// The URL of a defined named trigger, or nil.
    public func namedTriggerURL(for installation: EmulatedInstallation, key: String) -> String? {
        self.namedTriggers.withLock { $0.trigger(installationId: installation.id, key: key) }
            .map { self.baseURL + "/x2/" + $0.triggerId }
    }

    /// Changes what a defined named trigger does.
    public func setNamedTriggerBehaviour(
        _ behaviour: NamedTriggerBehaviour, for installation: EmulatedInstallation, key: String
    ) {
        self.namedTriggers.withLock { state in
            guard var trigger = state.trigger(installationId: installation.id, key: key) else { return }
            trigger.behaviour = behaviour
            state.triggers[trigger.triggerId] = trigger
        }
    }

    /// The calls a named trigger received, oldest first.
    public func namedTriggerCalls(for installation: EmulatedInstallation, key: String) -> [NamedTriggerCall] {
        self.namedTriggers.withLock { $0.trigger(installationId: installation.id, key: key)?.calls ?? [] }
    }

    /// Lets every held (`hang`) call answer now.
    public func releaseHeldNamedTriggerCalls() {
        let held = self.namedTriggers.withLock { state -> [CheckedContinuation<Void, Never>] in
            defer { state.held = [:] }
            return Array(state.held.values)
        }
        for continuation in held { continuation.resume() }
    }

    /// Calls held right now.
    public var heldNamedTriggerCalls: Int { self.namedTriggers.withLock { $0.held.count } }

    /// Sends `POST /forge/register` with the installation's auth trigger URL and `triggers`
    /// (a URL sets a named trigger, nil removes it).
    public func registerNamedTriggers(_ installation: EmulatedInstallation, _ triggers: [String: String?]) async throws
        -> RegisterResult
    {
        try await self.register(installation, triggers: triggers)
    }

    /// The `triggers` member a registration carries when none is given: every defined named trigger
    /// of the installation, after defining the configured ones (``ForgeEmulatorConfiguration/namedTriggerKeys``)
    /// with ``NamedTriggerBehaviour/echo``; nil when there is none.
    func namedTriggersForRegistration(_ installation: EmulatedInstallation) -> [String: String?]? {
        for key in self.configuration.namedTriggerKeys where self.namedTriggerURL(for: installation, key: key) == nil {
            self.defineNamedTrigger(installation, key: key)
        }
        let defined = self.namedTriggers.withLock { $0.triggers(of: installation.id) }
        if defined.isEmpty { return nil }
        var triggers: [String: String?] = [:]
        for trigger in defined { triggers[trigger.key] = self.baseURL + "/x2/" + trigger.triggerId }
        return triggers
    }

    // MARK: The trigger

    /// Answers `POST /x2/{triggerId}` as a named web-trigger function does: verify the signature
    /// with the installation's registered key (401), check the body and its deadline (400), then
    /// behave as set. Unknown triggers and uninstalled installations answer 404.
    func answerNamedTrigger(triggerId: String, signatureHeader: String?, idempotencyKey: String?, body: Data) async
        -> Response
    {
        let callBody = try? JSONDecoder().decode(NamedTriggerCallBody.self, from: body)
        let signature = signatureHeader.flatMap(TriggerSignature.init(headerValue:))
        guard let trigger = self.namedTriggers.withLock({ $0.triggers[triggerId] }) else {
            return Self.namedAnswer(404, ["error": ["code": "not_found", "message": "no web trigger at this path"]])
        }
        let record = self.state.withLock { $0.record(matching: trigger.installationId) }
        let signatureValid = record?.verifies(signature, body: body) ?? false
        let call = NamedTriggerCall(
            receivedAt: Date(), signatureValid: signatureValid, requestId: callBody?.requestId,
            idempotencyKey: idempotencyKey, signedIdempotencyKey: callBody?.idempotencyKey, body: body,
            signatureHeader: signatureHeader, answeredStatus: nil)
        let (index, behaviour) = self.namedTriggers.withLock { state -> (Int, NamedTriggerBehaviour) in
            state.triggers[triggerId]?.calls.append(call)
            let behaviour = state.triggers[triggerId]?.behaviour ?? .echo
            if case .fail(let status, let times?) = behaviour {
                state.triggers[triggerId]?.behaviour = times <= 1 ? .echo : .fail(status: status, times: times - 1)
            }
            return ((state.triggers[triggerId]?.calls.count ?? 1) - 1, behaviour)
        }
        self.callRecorded()
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(trigger.installationId)"
        logger[metadataKey: "trigger.key"] = "\(trigger.key)"
        let response = await self.runNamedTrigger(
            trigger, installationActive: record?.status != .uninstalled, signatureValid: signatureValid,
            callBody: callBody, body: body, idempotencyKey: idempotencyKey, behaviour: behaviour)
        self.namedTriggers.withLock { state in
            if state.triggers[triggerId]?.calls.indices.contains(index) == true {
                state.triggers[triggerId]?.calls[index].answeredStatus = Int(response.status.code)
            }
        }
        logger.info("Named trigger call answered", metadata: ["http.status": "\(response.status.code)"])
        return response
    }

    /// Largest named-trigger call the emulator reads (1 MiB).
    static let maximumNamedTriggerCallBytes = 1 << 20

    private func runNamedTrigger(
        _ trigger: EmulatorNamedTriggers.Trigger, installationActive: Bool, signatureValid: Bool,
        callBody: NamedTriggerCallBody?, body: Data, idempotencyKey: String?, behaviour: NamedTriggerBehaviour
    ) async -> Response {
        guard installationActive else {
            return Self.namedAnswer(404, ["error": ["code": "not_found", "message": "the app is not installed"]])
        }
        guard signatureValid else {
            return Self.namedAnswer(
                401,
                ["error": ["code": "invalid_signature", "message": "missing or invalid X-Token-Gateway-Signature"]])
        }
        guard let callBody,
            let object = try? JSONSerialization.jsonObject(with: body, options: [.fragmentsAllowed]) as? [String: Any],
            object.keys.contains("payload")
        else {
            return Self.namedAnswer(
                400,
                [
                    "error": [
                        "code": "invalid_request",
                        "message": "body must be {requestId, installationId, trigger, issuedAt, expiresAt, payload}",
                    ]
                ])
        }
        guard callBody.installationId == trigger.installationId else {
            return Self.namedAnswer(
                400,
                ["error": ["code": "invalid_request", "message": "installationId is not this trigger's installation"]])
        }
        // A call signed for another trigger of the installation (the key is the same for all of
        // them) is a captured call sent on: not this function's to run.
        guard trigger.runs(callBody.trigger) else {
            return Self.namedAnswer(
                400, ["error": ["code": "invalid_request", "message": "the call is for another trigger"]])
        }
        guard callBody.expiresAt >= Date().timeIntervalSince1970 else {
            return Self.namedAnswer(400, ["error": ["code": "expired", "message": "expiresAt has passed"]])
        }
        switch behaviour {
        case .echo:
            break
        case .fail(let status, _):
            return Self.namedAnswer(
                status, ["error": ["code": "function_failed", "message": "injected named-trigger failure"]],
                retryAfter: true)
        case .delay(let delay):
            try? await Task.sleep(for: delay)
        case .hang(let maximum):
            await self.holdUntilReleased(maximum: maximum)
        case .hangBody(let maximum):
            return Response(
                status: .ok, headers: [.contentType: "application/json"],
                body: ResponseBody { writer in
                    await self.holdUntilReleased(maximum: maximum)
                    try await writer.write(ByteBuffer(string: #"{"late":true}"#))
                    try await writer.finish(nil)
                })
        }
        return Self.namedAnswer(
            200,
            [
                "echo": object["payload"] ?? NSNull(), "requestId": callBody.requestId, "trigger": trigger.key,
                "idempotencyKey": callBody.idempotencyKey.map { $0 as Any } ?? NSNull(),
            ])
    }

    /// Waits until ``releaseHeldNamedTriggerCalls()``, cancellation or `maximum`.
    private func holdUntilReleased(maximum: Duration) async {
        let id = UUID()
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withTaskCancellationHandler {
                    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                        let resumeNow = self.namedTriggers.withLock { state -> Bool in
                            if Task.isCancelled { return true }
                            state.held[id] = continuation
                            return false
                        }
                        if resumeNow { continuation.resume() } else { self.callRecorded() }
                    }
                } onCancel: {
                    let continuation = self.namedTriggers.withLock { $0.held.removeValue(forKey: id) }
                    continuation?.resume()
                }
            }
            group.addTask { try? await Task.sleep(for: maximum) }
            await group.next()
            group.cancelAll()
        }
    }

    /// A JSON answer; `Retry-After: 7` when asked; always an `X-Emulator-Internal` header the
    /// gateway must not relay.
    static func namedAnswer(_ status: Int, _ object: [String: Any], retryAfter: Bool = false) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        var headers: HTTPFields = [.contentType: "application/json", .cacheControl: "no-store"]
        headers[.emulatorInternal] = "not-for-callers"
        if retryAfter { headers[.retryAfter] = "7" }
        return Response(
            status: HTTPResponse.Status(code: status), headers: headers,
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }

    // MARK: Routes

    /// `POST /x2/{triggerId}` (the named triggers) and their admin routes (loopback only):
    /// - `GET /admin/installations/{id}/named-triggers` — `[{"key", "url", "behaviour", "calls"}]`;
    /// - `PUT /admin/installations/{id}/named-triggers/{key}` — body optional, a behaviour (default
    ///   echo): defines the trigger and, when the installation is installed, registers it with the
    ///   gateway; 200 with it and `registrationStatus`;
    /// - `DELETE /admin/installations/{id}/named-triggers/{key}` — registers its removal (`null`);
    /// - `POST /admin/named-triggers/release` — lets every held call answer.
    func addNamedTriggerRoutes(to router: Router<EmulatorRequestContext>) {
        router.post("/x2/:triggerId") { request, context -> Response in
            let triggerId = try context.parameters.require("triggerId")
            // A call carries the caller's payload (up to the gateway's limit) inside the signed
            // envelope, so it may be larger than the admin routes' bodies.
            let body = try await request.body.collect(upTo: Self.maximumNamedTriggerCallBytes)
            return await self.answerNamedTrigger(
                triggerId: triggerId, signatureHeader: request.headers[.emulatorTriggerSignature],
                idempotencyKey: request.headers[.emulatorIdempotencyKey], body: Data(buffer: body))
        }

        let admin = router.group("admin").add(middleware: LoopbackOnlyMiddleware())
        admin.get("installations/:id/named-triggers") { _, context -> Response in
            guard let installation = self.namedTriggerInstallation(context) else { return Self.noInstallation }
            let list = self.namedTriggers.withLock { $0.triggers(of: installation.id) }.map {
                NamedTriggerSummary(
                    key: $0.key, url: self.baseURL + "/x2/" + $0.triggerId, behaviour: $0.behaviour,
                    calls: $0.calls.count)
            }
            return EmulatorAnswer.json(200, list).response
        }
        admin.put("installations/:id/named-triggers/:key") { request, context -> Response in
            guard let installation = self.namedTriggerInstallation(context) else { return Self.noInstallation }
            let key = try context.parameters.require("key")
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            var behaviour = NamedTriggerBehaviour.echo
            if body.readableBytes > 0 {
                guard let decoded = try? JSONDecoder().decode(NamedTriggerBehaviour.self, from: Data(buffer: body))
                else {
                    return EmulatorAnswer.error(
                        400, code: "invalid_request", message: "body must be a behaviour, such as {\"type\": \"echo\"}"
                    ).response
                }
                behaviour = decoded
            }
            let url = self.defineNamedTrigger(installation, key: key, behaviour: behaviour)
            var status: Int?
            if self.state.withLock({ $0.record(for: installation)?.status }) == .installed {
                do {
                    status = try await self.registerNamedTriggers(installation, [key: url]).status
                } catch {
                    return EmulatorAnswer.error(502, code: "register_failed", message: "\(error)").response
                }
            }
            let calls = self.namedTriggerCalls(for: installation, key: key).count
            return EmulatorAnswer.json(
                200,
                NamedTriggerSummary(key: key, url: url, behaviour: behaviour, calls: calls, registrationStatus: status)
            ).response
        }
        admin.delete("installations/:id/named-triggers/:key") { _, context -> Response in
            guard let installation = self.namedTriggerInstallation(context) else { return Self.noInstallation }
            let key = try context.parameters.require("key")
            let result: RegisterResult
            do {
                result = try await self.registerNamedTriggers(installation, [key: nil])
            } catch {
                return EmulatorAnswer.error(502, code: "register_failed", message: "\(error)").response
            }
            if (200..<300).contains(result.status) {
                self.namedTriggers.withLock { state in
                    if let trigger = state.trigger(installationId: installation.id, key: key) {
                        state.triggers[trigger.triggerId] = nil
                    }
                }
            }
            return EmulatorAnswer.json(200, PushAnswer(status: result.status, body: result.body)).response
        }
        admin.post("named-triggers/release") { _, _ -> Response in
            self.releaseHeldNamedTriggerCalls()
            return EmulatorAnswer.json(200, ["released": true]).response
        }
    }

    private static var noInstallation: Response {
        EmulatorAnswer.error(404, code: "installation_not_found", message: "no such installation").response
    }

    private func namedTriggerInstallation(_ context: EmulatorRequestContext) -> EmulatedInstallation? {
        guard let raw = context.parameters.get("id") else { return nil }
        return self.installation(withId: raw.removingPercentEncoding ?? raw)
    }
}
