import Foundation

/// How an installation's web trigger misbehaves. Set with ``ForgeEmulator/setFault(_:for:)``.
///
/// ``respondSlowly(_:)`` and ``failWith(status:times:)`` act like the platform, before the trigger
/// function runs (so before the signature check); the others act in the function, after the
/// signature, the body and its deadline were checked.
///
/// In JSON (the admin route `POST /admin/installations/{id}/fault`):
/// `{"type": "none"}`, `{"type": "failWith", "status": 503, "times": 2}`,
/// `{"type": "acceptWithoutDelivery"}`, `{"type": "deliverLate", "delayMs": 3000}`,
/// `{"type": "deliverTwice"}`, `{"type": "deliverVia", "gatewayURL": "http://127.0.0.1:8081"}`,
/// `{"type": "respondSlowly", "delayMs": 3000}`, `{"type": "redeliverCached"}`.
public enum TriggerFault: Sendable, Hashable {
    /// Behave normally.
    case none
    /// Answer `status` the next `times` calls, then behave normally.
    case failWith(status: Int, times: Int)
    /// Answer 200 but never deliver.
    case acceptWithoutDelivery
    /// Answer 200 at once and deliver after the delay.
    case deliverLate(Duration)
    /// Deliver the same token twice, then answer.
    case deliverTwice
    /// Deliver to another gateway replica's base URL.
    case deliverVia(gatewayURL: String)
    /// Wait, then behave normally.
    case respondSlowly(Duration)
    /// Deliver the token delivered last (the same token string and `exp`), as Forge's token
    /// cache does: the gateway gets no newer token. A fresh one is minted (and then re-delivered)
    /// only when none was delivered yet.
    case redeliverCached
}

extension TriggerFault: Codable {
    private enum CodingKeys: String, CodingKey {
        case type, status, times, delayMs, gatewayURL
    }

    private enum Kind: String, Codable {
        case none, failWith, acceptWithoutDelivery, deliverLate, deliverTwice, deliverVia, respondSlowly
        case redeliverCached
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        switch try container.decode(Kind.self, forKey: .type) {
        case .none:
            self = .none
        case .failWith:
            let status = try container.decode(Int.self, forKey: .status)
            guard (100...599).contains(status) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .status, in: container, debugDescription: "not an HTTP status")
            }
            let times = try container.decodeIfPresent(Int.self, forKey: .times) ?? 1
            guard times >= 0 else {
                throw DecodingError.dataCorruptedError(forKey: .times, in: container, debugDescription: "negative")
            }
            self = .failWith(status: status, times: times)
        case .acceptWithoutDelivery:
            self = .acceptWithoutDelivery
        case .deliverLate:
            self = .deliverLate(try Self.decodeDelay(container))
        case .deliverTwice:
            self = .deliverTwice
        case .deliverVia:
            self = .deliverVia(gatewayURL: try container.decode(String.self, forKey: .gatewayURL))
        case .respondSlowly:
            self = .respondSlowly(try Self.decodeDelay(container))
        case .redeliverCached:
            self = .redeliverCached
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .none:
            try container.encode(Kind.none, forKey: .type)
        case .failWith(let status, let times):
            try container.encode(Kind.failWith, forKey: .type)
            try container.encode(status, forKey: .status)
            try container.encode(times, forKey: .times)
        case .acceptWithoutDelivery:
            try container.encode(Kind.acceptWithoutDelivery, forKey: .type)
        case .deliverLate(let delay):
            try container.encode(Kind.deliverLate, forKey: .type)
            try container.encode(Self.milliseconds(delay), forKey: .delayMs)
        case .deliverTwice:
            try container.encode(Kind.deliverTwice, forKey: .type)
        case .deliverVia(let gatewayURL):
            try container.encode(Kind.deliverVia, forKey: .type)
            try container.encode(gatewayURL, forKey: .gatewayURL)
        case .respondSlowly(let delay):
            try container.encode(Kind.respondSlowly, forKey: .type)
            try container.encode(Self.milliseconds(delay), forKey: .delayMs)
        case .redeliverCached:
            try container.encode(Kind.redeliverCached, forKey: .type)
        }
    }

    private static func decodeDelay(_ container: KeyedDecodingContainer<CodingKeys>) throws -> Duration {
        let milliseconds = try container.decode(Int64.self, forKey: .delayMs)
        guard milliseconds >= 0 else {
            throw DecodingError.dataCorruptedError(forKey: .delayMs, in: container, debugDescription: "negative")
        }
        return .milliseconds(milliseconds)
    }

    private static func milliseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    }
}

extension ForgeEmulator {
    /// Makes `installation`'s web trigger misbehave from the next call on (``TriggerFault/none``
    /// restores normal behaviour). Setting ``TriggerFault/failWith(status:times:)`` restarts its count.
    public func setFault(_ fault: TriggerFault, for installation: EmulatedInstallation) {
        self.state.withLock { state in
            state.update(installation) { record in
                record.fault = fault
                if case .failWith(_, let times) = fault {
                    record.remainingFailures = times
                } else {
                    record.remainingFailures = 0
                }
            }
        }
        self.logger.info(
            "Trigger fault set",
            metadata: ["installation.id": "\(installation.id)", "forge.emulator.fault": "\(fault)"]
        )
    }

    /// The fault currently set for `installation`.
    public func fault(for installation: EmulatedInstallation) -> TriggerFault {
        self.state.withLock { $0.record(for: installation)?.fault ?? .none }
    }

    /// Consumes one answer of a `.failWith` fault: the status to answer, or `nil` to go on normally.
    func takeInjectedFailure(installationId: String) -> Int? {
        self.state.withLock { state in
            var status: Int?
            state.updateRecord(id: installationId) { record in
                guard case .failWith(let failureStatus, _) = record.fault, record.remainingFailures > 0 else { return }
                record.remainingFailures -= 1
                status = failureStatus
            }
            return status
        }
    }
}
