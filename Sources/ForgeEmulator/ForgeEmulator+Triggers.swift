import Foundation
import Logging
import Synchronization

/// One call the gateway made to an installation's web trigger.
public struct TriggerRecord: Sendable, Hashable {
    /// When the call arrived.
    public let receivedAt: Date
    /// Whether `X-Token-Gateway-Signature` was well formed, named the registered key id and
    /// verified over the exact body with the registered key.
    public internal(set) var signatureValid: Bool
    /// The key id the header named, if the header parsed.
    public let keyId: String?
    /// The body's `requestId`, if the body parsed.
    public let requestId: String?
    /// The body's `expiresAt`, if the body parsed.
    public let expiresAt: Date?
    /// The status the trigger answered; `nil` while the call is still in progress.
    public internal(set) var answeredStatus: Int?
    /// The emulator's own time on the call: from its arrival to the answer, less the time spent
    /// waiting for the gateway to answer the token deliveries it made (which is the gateway's
    /// time). `nil` while the call is still in progress.
    public internal(set) var ownDuration: Duration?
}

/// Adds up the time one trigger call spends waiting for the gateway's answers to its deliveries.
final class DeliveryStopwatch: Sendable {
    private let waited = Mutex<Duration>(.zero)

    func add(_ duration: Duration) { self.waited.withLock { $0 += duration } }

    var total: Duration { self.waited.withLock { $0 } }
}

/// The body of a trigger call (`spec/contract.md` §4).
struct TriggerCallBody: Codable, Sendable {
    var requestId: String
    var installationId: String
    var issuedAt: Double
    var expiresAt: Double
}

/// What the emulator answers an HTTP request with.
struct EmulatorAnswer: Sendable {
    let status: Int
    let body: Data

    static func json(_ status: Int, _ value: some Encodable) -> EmulatorAnswer {
        EmulatorAnswer(status: status, body: (try? JSONEncoder.emulator.encode(value)) ?? Data("{}".utf8))
    }

    static func error(_ status: Int, code: String, message: String) -> EmulatorAnswer {
        .json(status, ErrorBody(error: .init(code: code, message: message)))
    }

    struct ErrorBody: Codable, Sendable {
        struct Detail: Codable, Sendable {
            var code: String
            var message: String
        }

        var error: Detail
    }

    struct TriggerBody: Codable, Sendable {
        var delivered: Bool
    }
}

extension ForgeEmulator {
    /// Trigger calls received for `installation`, whatever their outcome.
    public func triggerCalls(for installation: EmulatedInstallation) -> Int {
        self.state.withLock { $0.record(for: installation)?.triggerRecords.count ?? 0 }
    }

    /// Trigger calls received for every installation, unknown trigger paths included.
    public var totalTriggerCalls: Int {
        self.state.withLock { $0.totalTriggerCalls }
    }

    /// An event each time a trigger call (auth or named) has been received and recorded, an auth
    /// trigger call answered, or a held named-trigger call is waiting, from now on: tests wait on it instead of polling
    /// ``triggerCalls(for:)``. The stream keeps only the latest event not yet read.
    public func callEvents() -> AsyncStream<Void> {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let key = self.callListeners.withLock { listeners in
            defer { listeners.next += 1 }
            listeners.streams[listeners.next] = continuation
            return listeners.next
        }
        continuation.onTermination = { _ in self.callListeners.withLock { _ = $0.streams.removeValue(forKey: key) } }
        return stream
    }

    /// Tells the streams of ``callEvents()`` that a call was recorded.
    func callRecorded() {
        for listener in self.callListeners.withLock({ Array($0.streams.values) }) { listener.yield() }
    }

    /// Every trigger call received for `installation`, oldest first.
    public func triggerRecords(for installation: EmulatedInstallation) -> [TriggerRecord] {
        self.state.withLock { $0.record(for: installation)?.triggerRecords ?? [] }
    }

    /// Answers `POST /x1/{triggerId}` as the companion web-trigger function does: verify the
    /// signature with the registered key (401), check the body and its deadline (400), apply the
    /// fault, deliver a fresh token through `/forge/auth-trigger` and answer 200 once that returned
    /// 2xx (else 502). Unknown or uninstalled triggers answer 404.
    func answerTrigger(triggerId: String, signatureHeader: String?, body: Data) async -> EmulatorAnswer {
        let receivedAt = Date()
        let clock = ContinuousClock()
        let started = clock.now
        let stopwatch = DeliveryStopwatch()
        let signature = signatureHeader.flatMap(TriggerSignature.init(headerValue:))
        let callBody = try? JSONDecoder().decode(TriggerCallBody.self, from: body)

        struct Admission {
            let record: EmulatedInstallationRecord
            let index: Int
            let signatureValid: Bool
        }
        let admission: Admission? = self.state.withLock { state in
            state.countTriggerCall()
            guard let record = state.recordForTrigger(id: triggerId) else { return nil }
            let signatureValid = record.verifies(signature, body: body)
            let index = record.triggerRecords.count
            state.updateRecord(id: record.installation.id) {
                $0.triggerRecords.append(
                    TriggerRecord(
                        receivedAt: receivedAt,
                        signatureValid: signatureValid,
                        keyId: signature?.keyId,
                        requestId: callBody?.requestId,
                        expiresAt: callBody.map { Date(timeIntervalSince1970: $0.expiresAt) },
                        answeredStatus: nil
                    )
                )
            }
            return Admission(record: record, index: index, signatureValid: signatureValid)
        }
        self.callRecorded()
        guard let admission else {
            self.logger.info("Trigger call for an unknown trigger", metadata: ["forge.trigger.id": "\(triggerId)"])
            return .error(404, code: "not_found", message: "no web trigger at this path")
        }

        let installation = admission.record.installation
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(installation.id)"
        if let requestId = callBody?.requestId {
            logger[metadataKey: "trigger.request.id"] = "\(requestId)"
        }

        let invocationLogger = logger
        let answer = await self.withinRuntimeLimit(logger: logger) {
            await self.runTrigger(
                admission.record,
                signatureValid: admission.signatureValid,
                callBody: callBody,
                logger: invocationLogger,
                stopwatch: stopwatch
            )
        }
        let ownDuration = (clock.now - started) - stopwatch.total
        self.state.withLock {
            $0.updateRecord(id: installation.id) {
                $0.triggerRecords[admission.index].answeredStatus = answer.status
                $0.triggerRecords[admission.index].ownDuration = ownDuration
            }
        }
        self.callRecorded()
        logger.info("Trigger call answered", metadata: ["http.status": "\(answer.status)"])
        return answer
    }

    /// Runs a web trigger's invocation within ``ForgeEmulatorConfiguration/webTriggerRuntimeLimit``
    /// (Forge's 55 s): past it the invocation is cut off (cancelled) and the caller gets 500.
    private func withinRuntimeLimit(
        logger: Logger, _ invocation: @escaping @Sendable () async -> EmulatorAnswer
    ) async -> EmulatorAnswer {
        let limit = self.configuration.webTriggerRuntimeLimit
        return await withTaskGroup(of: EmulatorAnswer?.self) { group in
            group.addTask { await invocation() }
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            guard let first else {
                logger.info("Trigger invocation cut off at the runtime limit")
                return .error(500, code: "runtime_limit", message: "the web trigger's function ran past its time limit")
            }
            return first
        }
    }

    private func runTrigger(
        _ record: EmulatedInstallationRecord,
        signatureValid: Bool,
        callBody: TriggerCallBody?,
        logger: Logger,
        stopwatch: DeliveryStopwatch
    ) async -> EmulatorAnswer {
        let installation = record.installation
        guard record.status != .uninstalled else {
            return .error(404, code: "not_found", message: "the app is not installed")
        }

        // Platform faults: before the function runs.
        if case .respondSlowly(let delay) = record.fault {
            try? await Task.sleep(for: delay)
        }
        if let status = self.takeInjectedFailure(installationId: installation.id) {
            logger.info("Trigger fails by injected fault", metadata: ["http.status": "\(status)"])
            return .error(status, code: "injected_fault", message: "injected trigger failure")
        }

        // The function: verify, then deliver.
        guard signatureValid else {
            return .error(401, code: "invalid_signature", message: "missing or invalid X-Token-Gateway-Signature")
        }
        guard let callBody else {
            return .error(
                400, code: "invalid_request", message: "body must be {requestId, installationId, issuedAt, expiresAt}")
        }
        guard callBody.installationId == installation.id else {
            return .error(400, code: "invalid_request", message: "installationId is not this trigger's installation")
        }
        guard callBody.expiresAt >= Date().timeIntervalSince1970 else {
            return .error(400, code: "expired", message: "expiresAt has passed")
        }

        let requestId = callBody.requestId
        switch record.fault {
        case .acceptWithoutDelivery:
            logger.info("Trigger accepted without delivery (injected fault)")
            return .json(200, EmulatorAnswer.TriggerBody(delivered: false))

        case .deliverLate(let delay):
            self.schedule(
                DeferredJob {
                    do {
                        try await Task.sleep(for: delay)
                    } catch {
                        return
                    }
                    _ = await self.deliverForTrigger(
                        installation, requestId: requestId, gatewayURL: nil, times: 1, logger: logger)
                }
            )
            return .json(200, EmulatorAnswer.TriggerBody(delivered: false))

        case .deliverTwice:
            return await self.deliverForTrigger(
                installation, requestId: requestId, gatewayURL: nil, times: 2, logger: logger, stopwatch: stopwatch)

        case .deliverVia(let gatewayURL):
            return await self.deliverForTrigger(
                installation,
                requestId: requestId,
                gatewayURL: gatewayURL,
                times: 1,
                logger: logger,
                stopwatch: stopwatch
            )

        case .redeliverCached:
            return await self.deliverForTrigger(
                installation, requestId: requestId, gatewayURL: nil, times: 1, logger: logger, stopwatch: stopwatch,
                reuseLastToken: true)

        case .none, .failWith, .respondSlowly:
            return await self.deliverForTrigger(
                installation, requestId: requestId, gatewayURL: nil, times: 1, logger: logger, stopwatch: stopwatch)
        }
    }

    /// Mints one token (or, with `reuseLastToken`, takes the one delivered last, as Forge's token
    /// cache does) and delivers it `times` times; 200 when every delivery answered 2xx, else 502.
    /// The time spent waiting for the gateway's answers is added to `stopwatch`.
    private func deliverForTrigger(
        _ installation: EmulatedInstallation,
        requestId: String,
        gatewayURL: String?,
        times: Int,
        logger: Logger,
        stopwatch: DeliveryStopwatch? = nil,
        reuseLastToken: Bool = false
    ) async -> EmulatorAnswer {
        do {
            let cached = reuseLastToken ? self.lastDeliveredToken(for: installation) : nil
            let token = try cached ?? self.mintAccessToken(for: installation)
            var allSucceeded = true
            for _ in 0..<times {
                let result = try await self.deliver(
                    installation, systemToken: token, requestId: requestId, to: gatewayURL, gatewayWait: stopwatch)
                logger.info("Token delivered for trigger", metadata: ["http.status": "\(result.status)"])
                allSucceeded = allSucceeded && result.isSuccess
            }
            guard allSucceeded else {
                return .error(502, code: "delivery_failed", message: "the gateway refused the delivery")
            }
            return .json(200, EmulatorAnswer.TriggerBody(delivered: true))
        } catch {
            logger.warning("Token delivery failed", metadata: ["error": "\(error)"])
            return .error(502, code: "delivery_failed", message: "the gateway could not be reached")
        }
    }
}
