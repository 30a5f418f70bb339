import FlowEngine
import Hummingbird
import Logging

extension Gateway {
    /// `GET /v1/installations/{id}/token?asUser=<accountId>` and `POST …/token/refresh?asUser=…`
    /// (contract §2): a user token for that account. `options` are the already validated
    /// `minValidity`, `timeout` and whether a refresh is forced. The caller is authenticated and
    /// allowed to read the installation.
    func userTokenRoute(
        caller: Caller, installation id: InstallationID, asUser raw: String, options: TokenFlow.Request,
        logger: Logger
    )
        async throws -> Response
    {
        guard let account = UserAccountID(raw) else {
            throw GatewayError.invalidParameter(
                "asUser must be 1–128 characters of letters, digits, ':', '_' and '-'")
        }
        let answer: UserTokenExchanger.Answer
        do {
            answer = try await self.userTokens.token(
                for: id, accountId: account,
                request: .init(
                    minValidity: options.minValidity, timeout: options.timeout, forceRefresh: options.forceRefresh)
            ) { () async throws(UserTokenError) in
                // Per-caller limits: only an exchange about to start counts (a forced one also as a refresh).
                let wait: Int?
                do {
                    wait = try await self.callerAllowance(
                        caller, refresh: options.forceRefresh, userExchange: true, logger: logger)
                } catch {
                    throw UserTokenError.storeUnavailable
                }
                if let wait { throw UserTokenError.callerLimited(retryAfter: .seconds(wait)) }
            }
        } catch {
            throw GatewayError(error)
        }
        self.audit.tokenHandedOut(
            caller: caller.name, installation: id, source: answer.source.rawValue, expiresAt: answer.token.expiresAt,
            token: answer.token.value, accountId: account.value)
        return Self.json(
            .object([
                ("installationId", .string(id.ari)),
                ("accountId", .string(account.value)),
                ("tokenType", "Bearer"),
                ("accessToken", .string(answer.token.value)),
                ("expiresAt", .string(RFC3339.string(unixSeconds: answer.token.expiresAt))),
                ("apiBaseUrl", .optional(answer.apiBaseUrl)),
                ("source", .string(answer.source.rawValue)),
            ]), noStore: true)
    }
}
