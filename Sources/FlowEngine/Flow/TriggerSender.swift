/// Sends one auth-trigger call (contract §4). Implemented by the gateway's HTTP trigger client.
public protocol TriggerSender: Sendable {
    /// Sends attempt `attempt` of the round trip `requestID` and reports how it ended. Never
    /// takes longer than `timeout`.
    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult
}

/// How one trigger call ended.
public enum TriggerAttemptResult: Sendable, Hashable {
    /// 2xx: the Forge side says the token has been delivered.
    case accepted
    case failed(TriggerFailure)
}
