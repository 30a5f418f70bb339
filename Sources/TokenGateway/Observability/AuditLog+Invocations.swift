import FlowEngine
import Logging

extension AuditLog {
    /// A caller invoked a named trigger. The record names the caller, the installation, the trigger
    /// key, the outcome (an `InvocationMetrics` outcome word), the status answered, the gateway's
    /// request id and whether an `Idempotency-Key` was sent; never the payload, the answer or the URL.
    public func invocation(
        caller: String, installation: InstallationID, trigger: String, outcome: String, status: Int,
        requestID: String?, idempotent: Bool, attempts: Int, durationMilliseconds: Int64
    ) {
        self.logger.info(
            "named trigger invoked",
            metadata: [
                "audit.event": "trigger_invoked", "caller": "\(caller)", "installation.id": "\(installation)",
                "trigger.key": "\(trigger)", "invocation.outcome": "\(outcome)", "http.status": "\(status)",
                "request.id": "\(requestID ?? "-")", "invocation.idempotent": "\(idempotent)",
                "trigger.attempts": "\(attempts)", "invocation.duration_ms": "\(durationMilliseconds)",
            ])
    }
}
