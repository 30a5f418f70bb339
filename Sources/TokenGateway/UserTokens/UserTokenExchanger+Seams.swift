import FlowEngine

/// Where ``UserTokenExchanger`` gets the installation's system token: ``TokenFlow`` (cache or
/// round trip); unit tests use a stub.
public protocol SystemTokenSource: Sendable {
    /// The installation's system token, valid for at least `minValidity` seconds.
    func systemToken(
        for installation: InstallationID, minValidity: Int64, timeout: Duration, forceRefresh: Bool
    ) async throws(FlowError) -> AccessToken
}

extension TokenFlow: SystemTokenSource {
    public func systemToken(
        for installation: InstallationID, minValidity: Int64, timeout: Duration, forceRefresh: Bool
    ) async throws(FlowError) -> AccessToken {
        try await self.token(
            for: installation, request: .init(minValidity: minValidity, timeout: timeout, forceRefresh: forceRefresh)
        ).token
    }
}

/// The GraphQL exchange of a system token for a user token: ``OfflineUserAuthTokenClient``;
/// unit tests use a stub.
public protocol UserTokenExchangeCall: Sendable {
    func exchange(systemToken: String, context: SiteContext, accountId: UserAccountID, timeout: Duration) async
        -> OfflineUserAuthTokenClient.Outcome
}

extension OfflineUserAuthTokenClient: UserTokenExchangeCall {}
