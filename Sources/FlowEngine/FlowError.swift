/// Why a token request failed. Each case maps to one contract error code (contract §1).
///
/// Descriptions never contain a secret.
public struct FlowError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable, CaseIterable {
        case installationNotFound = "installation_not_found"
        case installationUninstalled = "installation_uninstalled"
        case noTriggerURL = "no_trigger_url"
        case tokenTimeout = "token_timeout"
        case triggerFailed = "trigger_failed"
        case circuitOpen = "circuit_open"
        case storeUnavailable = "store_unavailable"
        case cancelled = "cancelled"
        case shuttingDown = "shutting_down"
        /// Too many callers already waiting, for this installation or in total.
        case overloaded = "overloaded"
    }

    public let code: Code
    /// For `circuitOpen` and `storeUnavailable`: how long the caller should wait before retrying.
    public let retryAfter: Duration?
    /// A short, secret-free detail (for example the last trigger failure).
    public let detail: String?

    public init(code: Code, retryAfter: Duration? = nil, detail: String? = nil) {
        self.code = code
        self.retryAfter = retryAfter
        self.detail = detail
    }

    public static let installationNotFound = FlowError(code: .installationNotFound)
    public static let installationUninstalled = FlowError(code: .installationUninstalled)
    public static let noTriggerURL = FlowError(code: .noTriggerURL)
    public static let tokenTimeout = FlowError(code: .tokenTimeout)
    public static let triggerFailed = FlowError(code: .triggerFailed)
    public static let storeUnavailable = FlowError(code: .storeUnavailable, retryAfter: .seconds(1))
    public static let cancelled = FlowError(code: .cancelled)
    /// Too many callers already wait (for the installation, or in this process): try again soon.
    public static let overloaded = FlowError(code: .overloaded, retryAfter: .seconds(1))
    public static let shuttingDown = FlowError(code: .shuttingDown, retryAfter: .seconds(1))
    public static func circuitOpen(retryAfter: Duration) -> FlowError {
        FlowError(code: .circuitOpen, retryAfter: retryAfter)
    }

    public static func == (lhs: FlowError, rhs: FlowError) -> Bool { lhs.code == rhs.code }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.code) }

    public var description: String {
        if let detail { return "FlowError(\(self.code.rawValue): \(detail))" }
        return "FlowError(\(self.code.rawValue))"
    }
}
