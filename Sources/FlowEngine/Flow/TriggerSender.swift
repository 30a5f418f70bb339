/// Sends one auth-trigger call (contract §4). Implemented by the gateway's HTTP trigger client.
public protocol TriggerSender: Sendable {
    /// Sends attempt `attempt` of the round trip `requestID` and reports how it ended. Never
    /// takes longer than `timeout`.
    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult

    /// What the store should read for this installation's next trigger call along with a round's
    /// lease, in the same round trip; nil when the sender reads its material itself.
    func triggerMaterialQuery(for installation: InstallationID) -> TriggerMaterialQuery?

    /// Sends the attempt as ``sendTrigger(installation:requestID:attempt:issuedAt:expiresAt:timeout:)``
    /// does, with `material`: what the store read for it with the round's lease (first attempts
    /// only), which spares the sender its own read.
    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration, material: TriggerMaterialRead?
    ) async -> TriggerAttemptResult
}

extension TriggerSender {
    public func triggerMaterialQuery(for installation: InstallationID) -> TriggerMaterialQuery? { nil }

    public func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration, material: TriggerMaterialRead?
    ) async -> TriggerAttemptResult {
        await self.sendTrigger(
            installation: installation, requestID: requestID, attempt: attempt, issuedAt: issuedAt,
            expiresAt: expiresAt, timeout: timeout)
    }
}

/// Asks the store to read an installation's trigger material along with a round's lease.
public struct TriggerMaterialQuery: Sendable, Hashable {
    /// The id of the signing key the sender holds opened: its sealed key is not read again.
    public var heldKeyID: String?

    public init(heldKeyID: String?) {
        self.heldKeyID = heldKeyID
    }
}

/// Which trigger material the store has in force for an installation, as read along with a
/// round's lease: sealed, never opened by the flow, which only hands it to the trigger sender.
public struct TriggerMaterialRead: Sendable, Hashable {
    /// The installation's status (`active`, `uninstalled`), nil when it is unknown.
    public var status: String?
    /// The sealed trigger URL, nil when none is registered.
    public var sealedURL: String?
    /// The id of the signing key in force.
    public var keyID: String?
    /// When the next signing key becomes current (Unix seconds), if one is waiting.
    public var nextActivatesAt: Int64?
    /// The sealed signing key in force; nil when it is the one the query said was held.
    public var sealedKey: String?

    public init(
        status: String?, sealedURL: String?, keyID: String?, nextActivatesAt: Int64?, sealedKey: String?
    ) {
        self.status = status
        self.sealedURL = sealedURL
        self.keyID = keyID
        self.nextActivatesAt = nextActivatesAt
        self.sealedKey = sealedKey
    }
}

/// How one trigger call ended.
public enum TriggerAttemptResult: Sendable, Hashable {
    /// 2xx: the Forge side says the token has been delivered.
    case accepted
    case failed(TriggerFailure)
    /// Nothing was sent: no trigger is in force for the installation (it is not active, or has no
    /// trigger registered). The flow reads the store to learn which: an installation uninstalled
    /// ends its rounds with `installation_uninstalled`; anything else counts as a failed attempt
    /// (`transport_error`).
    case notSent
}
