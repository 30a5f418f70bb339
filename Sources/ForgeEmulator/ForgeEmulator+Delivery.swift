import Foundation

extension ForgeEmulator {
    /// The gateway's answer to one token delivery (`POST /forge/auth-trigger`).
    ///
    /// Nested in ``ForgeEmulator`` because FlowEngine has a `DeliveryResult` of its own; code that
    /// imports both names this one `ForgeEmulator.DeliveryResult`.
    public struct DeliveryResult: Sendable, Hashable {
        /// HTTP status.
        public let status: Int
        /// Body as UTF-8 text.
        public let body: String
        /// The delivered system token (empty when none was sent).
        public let token: String

        /// Whether the status is 2xx.
        public var isSuccess: Bool { (200..<300).contains(self.status) }
    }
}

struct DeliveryBody: Codable, Sendable {
    var requestId: String?
}

extension ForgeEmulator {
    /// Pushes a freshly minted system token unasked, the way a scheduled trigger delivers one:
    /// `POST {gateway}/forge/auth-trigger` with a FIT, `x-forge-oauth-system` and the body `{}`,
    /// once (no redelivery) and with a token of the configured lifetime unless `expiresAt` says
    /// otherwise. ``scheduledPush(_:)`` is the faithful one: a token with at least 2 h left, and
    /// redeliveries.
    /// - Parameters:
    ///   - expiresAt: The token's `exp`; default now + the configured token lifetime.
    ///   - gatewayURL: Another base URL (another replica); default ``gatewayURL``.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error; any HTTP answer is
    ///   returned.
    @discardableResult
    public func push(
        _ installation: EmulatedInstallation,
        expiresAt: Date? = nil,
        to gatewayURL: String? = nil
    ) async throws -> DeliveryResult {
        let token = try self.mintAccessToken(for: installation, expiresAt: expiresAt)
        let result = try await self.deliver(installation, systemToken: token, requestId: nil, to: gatewayURL)
        self.logger.info(
            "Token pushed",
            metadata: ["installation.id": "\(installation.id)", "http.status": "\(result.status)"]
        )
        return result
    }

    /// Raw delivery for tests: `POST {gateway}/forge/auth-trigger` with a FIT made with `fit`,
    /// `systemToken` as `x-forge-oauth-system` (none when `nil`), and the body
    /// `{"requestId": …}` (or `{}` when `requestId` is `nil`).
    /// - Parameters:
    ///   - gatewayURL: Another base URL (another replica); default ``gatewayURL``.
    ///   - userToken: Sent as `x-forge-oauth-user` when set.
    ///   - headers: More headers; they replace the emulator's own of the same name (such as
    ///     `authorization`).
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error; any HTTP answer is
    ///   returned.
    @discardableResult
    public func deliver(
        _ installation: EmulatedInstallation,
        systemToken: String?,
        requestId: String?,
        fit: FITOptions = FITOptions(),
        to gatewayURL: String? = nil,
        userToken: String? = nil,
        headers: [String: String] = [:]
    ) async throws -> DeliveryResult {
        try await self.deliver(
            installation, systemToken: systemToken, requestId: requestId, fit: fit, to: gatewayURL,
            userToken: userToken,
            headers: headers, gatewayWait: nil)
    }

    /// ``deliver(_:systemToken:requestId:fit:to:userToken:headers:)``, adding the time spent
    /// waiting for the gateway's answer (the HTTP exchange, after the FIT is minted) to `gatewayWait`.
    func deliver(
        _ installation: EmulatedInstallation,
        systemToken: String?,
        requestId: String?,
        fit: FITOptions = FITOptions(),
        to gatewayURL: String? = nil,
        userToken: String? = nil,
        headers: [String: String] = [:],
        gatewayWait: DeliveryStopwatch?
    ) async throws -> DeliveryResult {
        self.state.withLock { $0.remember(installation) }
        var allHeaders: [(String, String)] = []
        if let systemToken { allHeaders.append(("x-forge-oauth-system", systemToken)) }
        if let userToken { allHeaders.append(("x-forge-oauth-user", userToken)) }
        allHeaders.append(contentsOf: headers.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })

        let invocationToken = try self.mintFIT(for: installation, options: fit)
        let body = try JSONEncoder.emulator.encode(DeliveryBody(requestId: requestId))
        let clock = ContinuousClock()
        let sent = clock.now
        let answer = try await self.callGateway(
            path: "/forge/auth-trigger",
            gatewayURL: gatewayURL,
            fit: invocationToken,
            headers: allHeaders,
            body: body,
            // Unasked, a delivery is a scheduled trigger's call; one that answers a trigger call is
            // the web trigger's `invokeRemote`.
            asEvent: requestId == nil
        )
        gatewayWait?.add(clock.now - sent)
        if answer.isSuccess, let systemToken { self.rememberDelivered(systemToken, for: installation) }
        self.logger.debug(
            "Delivery answered",
            metadata: [
                "installation.id": "\(installation.id)", "trigger.request.id": "\(requestId ?? "")",
                "http.status": "\(answer.status)",
            ]
        )
        return DeliveryResult(status: answer.status, body: answer.body, token: systemToken ?? "")
    }

    /// Keeps `token` as the last one delivered (Forge's token cache, which the `redeliverCached`
    /// fault hands out again): a delivery, a lifecycle event or a registration answered 2xx.
    func rememberDelivered(_ token: String, for installation: EmulatedInstallation) {
        self.state.withLock { $0.update(installation) { $0.lastDeliveredToken = token } }
    }

    /// The last system token a delivery, lifecycle event or registration of this installation got a
    /// 2xx answer for.
    public func lastDeliveredToken(for installation: EmulatedInstallation) -> String? {
        self.state.withLock { $0.record(for: installation)?.lastDeliveredToken }
    }
}
