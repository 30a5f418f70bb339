import FlowEngine
import HTTPTypes

/// Why a user-token request failed. The user-token codes of contract §1 (`user_token_denied`,
/// `exchange_failed`, `rate_limited`) plus every failure of the system-token flow the exchange
/// builds on (``FlowError``). `==` compares the code. Descriptions never contain a secret.
public struct UserTokenError: Error, Sendable, Hashable, CustomStringConvertible {
    private enum Code: Hashable, Sendable {
        case denied
        case exchangeFailed
        case rateLimited
        case flow(FlowError.Code)
    }

    private let code: Code
    /// For `rateLimited` (and the flow's 503s): how long the caller should wait.
    public let retryAfter: Duration?
    /// A short, secret-free detail.
    public let detail: String?

    private init(_ code: Code, retryAfter: Duration? = nil, detail: String? = nil) {
        self.code = code
        self.retryAfter = retryAfter
        self.detail = detail
    }

    /// Atlassian refused a user token for this account (or did so less than a minute ago).
    public static let denied = UserTokenError(.denied)

    /// The exchange answered 5xx, was unreachable, refused the system token or answered nonsense
    /// on every attempt within the budget.
    public static func exchangeFailed(_ detail: String) -> UserTokenError {
        UserTokenError(.exchangeFailed, detail: detail)
    }

    /// The app's exchange budget is spent, or Atlassian answered 429.
    public static func rateLimited(retryAfter: Duration) -> UserTokenError {
        UserTokenError(.rateLimited, retryAfter: retryAfter)
    }

    /// The caller's own `userExchangesPerMinute` (or, for a forced refresh, `refreshesPerMinute`)
    /// is spent: no exchange was started for it.
    public static func callerLimited(retryAfter: Duration) -> UserTokenError {
        UserTokenError(.rateLimited, retryAfter: retryAfter, detail: Self.callerLimitDetail)
    }

    static let callerLimitDetail = "caller limit"

    /// Whether this is ``callerLimited(retryAfter:)`` (the caller's limit, not the app's budget).
    public var isCallerLimit: Bool { self.code == .rateLimited && self.detail == Self.callerLimitDetail }

    /// A failure of the system-token flow (or of the store, or the caller's deadline).
    public static func flow(_ error: FlowError) -> UserTokenError {
        UserTokenError(.flow(error.code), retryAfter: error.retryAfter, detail: error.detail)
    }

    /// No user token within the caller's timeout.
    public static let timeout = UserTokenError.flow(.tokenTimeout)
    /// Redis could not be reached.
    public static let storeUnavailable = UserTokenError.flow(.storeUnavailable)

    /// The contract error code.
    public var errorCode: String {
        switch self.code {
        case .denied: "user_token_denied"
        case .exchangeFailed: "exchange_failed"
        case .rateLimited: "rate_limited"
        case .flow(let code): code.rawValue
        }
    }

    /// The flow error this wraps, if it wraps one.
    public var flowError: FlowError? {
        guard case .flow(let code) = self.code else { return nil }
        return FlowError(code: code, retryAfter: self.retryAfter, detail: self.detail)
    }

    public static func == (lhs: UserTokenError, rhs: UserTokenError) -> Bool { lhs.code == rhs.code }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.code) }

    public var description: String {
        if let detail { return "UserTokenError(\(self.errorCode): \(detail))" }
        return "UserTokenError(\(self.errorCode))"
    }
}

extension GatewayError {
    /// The contract answer for a user-token failure.
    public init(_ error: UserTokenError) {
        if let flow = error.flowError {
            self.init(flow)
            return
        }
        let retry = error.retryAfter.map(\.retryAfterSeconds)
        switch error.errorCode {
        case "user_token_denied":
            self.init(
                status: .forbidden, code: error.errorCode,
                message: "Atlassian refused a user token for this account")
        case "rate_limited" where error.isCallerLimit:
            self = Gateway.callerRateLimited(retryAfter: retry ?? 1)
        case "rate_limited":
            self.init(
                status: .tooManyRequests, code: error.errorCode,
                message: "the app's user-token exchange budget is spent; try again later", retryAfter: retry ?? 1)
        default:
            self.init(
                status: .badGateway, code: error.errorCode,
                message: "the user-token exchange failed" + (error.detail.map { " (\($0))" } ?? ""))
        }
    }
}
