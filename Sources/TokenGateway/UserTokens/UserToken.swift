import FlowEngine

/// A user token as the leased-round machine sees it (``UserRoundMachine``): the token, the
/// installation's `apiBaseUrl` read with it, and the round that exchanged it.
struct UserToken: LeasedRoundValue {
    typealias Failure = UserTokenError

    let token: AccessToken
    let apiBaseUrl: String?
    let roundID: String?

    var expiresAt: Int64 { self.token.expiresAt }

    /// User tokens are not refreshed ahead: a caller whose token is too short-lived asks again.
    func isStale(at now: FlowTime, fraction: Double) -> Bool { false }

    /// The machine's own failures as user-token errors: a last exchange call that failed (or a
    /// deadline while waiting to retry one) is `exchange_failed` (502), any other deadline
    /// `token_timeout` (504), the rest are the flow's.
    static func failure(_ error: FlowError) -> UserTokenError {
        guard error.code == .triggerFailed else { return .flow(error) }
        return .exchangeFailed(error.detail ?? "the exchange failed")
    }
}

/// One user's exchange rounds: the leased-round machine shared with system tokens, over user tokens.
typealias UserRoundMachine = LeasedRoundStateMachine<UserToken>

extension TriggerFailure {
    /// The kind of a retryable exchange failure, as the round machine counts attempts.
    init(_ failure: OfflineUserAuthTokenClient.Failure) {
        switch failure {
        case .timeout: self = .timeout
        case .transportError: self = .transportError
        case .httpError, .rejected, .invalidResponse: self = .httpError
        }
    }
}
