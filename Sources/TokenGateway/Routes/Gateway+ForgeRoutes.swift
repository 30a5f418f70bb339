import Crypto
import FlowEngine
import Foundation
import HTTPTypes
import Hummingbird
import Logging

extension Gateway {
    func addForgeRoutes(to router: Router<BasicRequestContext>) {
        router.post("/forge/register") { request, context in
            try await self.forgeCall(request, logger: context.logger) { invocation, id in
                try await self.forgeRegister(request, invocation: invocation, id: id, logger: context.logger)
            }
        }
        router.post("/forge/auth-trigger") { request, context in
            try await self.forgeCall(request, logger: context.logger) { invocation, id in
                try await self.forgeAuthTrigger(request, invocation: invocation, id: id, logger: context.logger)
            }
        }
        router.post("/forge/lifecycle") { request, context in
            try await self.forgeCall(request, logger: context.logger) { invocation, id in
                try await self.forgeLifecycle(request, invocation: invocation, id: id, logger: context.logger)
            }
        }
        router.post("/forge/pre-uninstall") { request, context in
            try await self.forgeCall(request, policy: .backendAllowingPrincipal, logger: context.logger) {
                invocation, id in
                try await self.forgePreUninstall(request, invocation: invocation, id: id, logger: context.logger)
            }
        }
    }

    /// One Forge call: its FIT verified (``verifyInvocation(_:policy:logger:)``), then `handle`,
    /// which claims the FIT's `jti` (``InvocationReplayGuard``) once the call's body was checked
    /// and before it changes state. Counts the FIT's outcome once: a refusal's reason, `replayed`
    /// (401, the `jti` was claimed before), `store_unavailable` (503, the claim could not be
    /// made), else `success`.
    func forgeCall(
        _ request: Request, policy: InvocationPolicy = .backend, logger: Logger,
        _ handle: (InvocationContext, InstallationID) async throws -> Response
    ) async throws -> Response {
        let (invocation, id) = try await self.verifyInvocation(request, policy: policy, logger: logger)
        do {
            let response = try await handle(invocation, id)
            self.metrics.countInvocationToken(outcome: "success")
            return response
        } catch let error as InvocationTokenError {
            self.metrics.countInvocationToken(outcome: error.reason)
            if error == .storeUnavailable {
                logger.warning("could not claim a Forge invocation token's jti", metadata: ["installation.id": "\(id)"])
                throw GatewayError.storeUnavailable
            }
            self.refusalLog.log(
                logger, .notice, "invocation token refused", metadata: ["fit.outcome": "\(error.reason)"])
            throw GatewayError.invalidInvocationToken
        } catch {
            self.metrics.countInvocationToken(outcome: "success")
            throw error
        }
    }

    /// `rotateKey` of a registration: absent or null is false; anything but a JSON boolean is 400.
    static func rotateKeyFlag(_ body: [String: Any]) throws -> Bool {
        guard let raw = body["rotateKey"], !(raw is NSNull) else { return false }
        guard let flag = JSONValue.strictBool(raw) else {
            throw GatewayError.invalidRequest("rotateKey must be a boolean")
        }
        return flag
    }

    /// `POST /forge/register`: records the auth trigger URL (and named triggers) of the invoking
    /// installation and answers with its trigger signing keys.
    func forgeRegister(_ request: Request, invocation: InvocationContext, id: InstallationID, logger: Logger)
        async throws -> Response
    {
        let body = try await self.readJSONObject(request)
        guard let url = body["authTriggerUrl"] as? String, !url.isEmpty else {
            throw GatewayError.invalidRequest("authTriggerUrl (a string) is required")
        }
        guard self.configuration.triggerHosts.allows(url) else {
            logger.notice("refused trigger URL outside the allow-list", metadata: ["installation.id": "\(id)"])
            throw GatewayError(
                status: .badRequest, code: "trigger_url_not_allowed",
                message: "authTriggerUrl is not on the gateway's allow-list of trigger hosts")
        }
        let rotateKey = try Self.rotateKeyFlag(body)
        let pushed = self.keepable(self.tokenAlongside(request, id: id, logger: logger), id: id, logger: logger)
        let namedTriggers = try await self.namedTriggerRegistration(body, installation: id, logger: logger)
        let candidate = TriggerSigningKey.generate()
        let now = FlowTime.now()
        let outcome: GatewayStore.RegistrationOutcome
        let keys: GatewayStore.TriggerKeys?
        var namedTriggersStored = false
        try await self.replayGuard.claim(id, invocation)
        do {
            // Named triggers first: their count is checked in the same step that stores them, so a
            // change refused there (another registration took the room meanwhile) stores nothing.
            try await self.storeNamedTriggers(namedTriggers, installation: id, now: now, logger: logger)
            namedTriggersStored = !namedTriggers.isEmpty
            outcome = try await self.store.register(
                id, triggerURL: url, candidateKeyID: candidate.keyId, candidateKey: candidate.rawPrivateKey,
                metadata: invocation.metadata, now: now)
            guard case .registered(_, _, let replaced) = outcome else {
                throw GatewayError(FlowError.installationUninstalled)
            }
            if replaced {
                logger.error(
                    "the installation's signing key did not open with the key ring: a new key was issued to the Forge side",
                    metadata: ["installation.id": "\(id)", "trigger.key.id": "\(candidate.keyId)"])
            }
            if rotateKey {
                let next = TriggerSigningKey.generate()
                keys = try await self.store.rotateTriggerKey(
                    id, candidateKeyID: next.keyId, candidateKey: next.rawPrivateKey,
                    overlap: self.configuration.triggerKeyOverlap, now: now)
            } else {
                keys = try await self.store.triggerKeys(id, now: now)
            }
        } catch let error as GatewayError {
            // Uninstalled before anything was stored: the 410 uses nothing up. Every other refusal
            // keeps the claim (a 503's step may have been stored; a 400's FIT is spent).
            if error.code == FlowError.Code.installationUninstalled.rawValue, !namedTriggersStored {
                await self.replayGuard.release(id, invocation)
            }
            throw error
        } catch is EncryptionError {
            // The stored signing key does not open with the key ring (a key removed before `keys
            // rewrap` finished): retrying cannot help, so no 503.
            logger.error(
                "the installation's signing key does not open with the key ring", metadata: ["installation.id": "\(id)"]
            )
            throw GatewayError.internalError
        } catch {
            throw GatewayError.storeUnavailable
        }
        // Registered a moment ago, so a key exists unless an uninstall came in between.
        guard let keys else { throw GatewayError(FlowError.installationUninstalled) }
        self.apiBaseUrlRecorded(id, invocation)
        if let pushed { await self.storeTokenSentWithRegistration(pushed, id: id, request, invocation, logger: logger) }
        logger.info(
            "auth trigger registered",
            metadata: [
                "installation.id": "\(id)", "trigger.key_id": "\(keys.current.keyID)",
                "trigger.next_key_id": "\(keys.next?.keyID ?? "-")",
            ])
        return Self.json(.object(try Self.registrationAnswer(id, keys: keys)))
    }

    /// Stores the token a registration sent along. The registration (a rotation's next key
    /// included) is stored by then: its answer carries the keys the Forge side must learn, so a
    /// token that cannot be stored now does not turn it into a failure (a rotation answered 503
    /// after its next key was saved would leave the Forge side without the key that soon signs).
    /// The token is an extra: the next request that needs one triggers a round trip.
    private func storeTokenSentWithRegistration(
        _ token: AccessToken, id: InstallationID, _ request: Request, _ invocation: InvocationContext, logger: Logger
    ) async {
        do {
            _ = try await self.storeDelivery(
                id, token: token, requestID: nil, invocation: invocation, trace: Self.forgeTrace(request),
                logger: logger)
        } catch {
            logger.warning(
                "the token sent with the registration was not stored; the registration stands",
                metadata: [
                    "installation.id": "\(id)", "error.code": "\((error as? GatewayError)?.code ?? "internal_error")",
                ])
        }
    }

    /// The members of a registration's answer: the key in force and, during a rotation, the next.
    static func registrationAnswer(_ id: InstallationID, keys: GatewayStore.TriggerKeys) throws -> [(String, JSONValue)]
    {
        let current = try TriggerSigningKey(keyId: keys.current.keyID, rawPrivateKey: keys.current.rawPrivateKey)
        var answer: [(String, JSONValue)] = [
            ("installationId", .string(id.ari)), ("triggerKeyId", .string(current.keyId)),
            ("triggerPublicKey", .string(current.publicKeyBase64URL)),
        ]
        if let nextKey = keys.next, let activatesAt = keys.nextActivatesAt {
            let next = try TriggerSigningKey(keyId: nextKey.keyID, rawPrivateKey: nextKey.rawPrivateKey)
            answer += [
                ("nextTriggerKeyId", .string(next.keyId)), ("nextTriggerPublicKey", .string(next.publicKeyBase64URL)),
                ("nextTriggerKeyActivatesAt", .string(RFC3339.string(unixSeconds: activatesAt))),
            ]
        }
        return answer
    }

    /// `POST /forge/auth-trigger`: a system token delivered by the app, in answer to a trigger call
    /// (`requestId`) or pushed.
    func forgeAuthTrigger(_ request: Request, invocation: InvocationContext, id: InstallationID, logger: Logger)
        async throws -> Response
    {
        guard let token = try self.optionalSystemToken(request) else { throw GatewayError.missingToken }
        let body = try await self.readJSONObject(request, emptyIsObject: true)
        var requestID: String? = nil
        if let raw = body["requestId"], !(raw is NSNull) {
            guard let s = raw as? String else { throw GatewayError.invalidRequest("requestId must be a string") }
            // One the gateway never sends (too long, or not visible ASCII) is an unknown request
            // id, which is not an error (contract §3): the token is taken as pushed.
            if (1...128).contains(s.utf8.count), s.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) { requestID = s }
        }
        let userLifetime = try self.checkDeliveredUserToken(request, id: id, logger: logger)
        var lifetime = Self.deliveredLifetime(token, now: FlowTime.now())
        // A delivery is kept only if each of its tokens is (contract §3): with a user token under
        // 60 s, the delivery is one of a nearly expired token, whatever the system token's `exp`.
        if lifetime == .acceptable, userLifetime == .nearlyExpired { lifetime = .nearlyExpired }
        switch lifetime {
        case .tooLong:
            logger.notice("refused a delivered token that lives too long", metadata: ["installation.id": "\(id)"])
            throw GatewayError.invalidToken("the system token's exp is more than 24 hours ahead")
        case .nearlyExpired:
            // Never stored or served (the store refuses a token with under 60 s left), but it goes
            // through the store as any delivery does: one that answers a round trip ends it (its
            // callers get `trigger_failed` at once instead of waiting out their deadline); the FIT's
            // `jti` is claimed and its `apiBaseUrl` recorded, as for a token that is not newer (for
            // an installation never seen, nothing changes); uninstalled is 410.
            logger.notice("dropped a nearly expired delivered token", metadata: ["installation.id": "\(id)"])
        case .acceptable:
            break
        }
        let stored = try await self.storeDelivery(
            id, token: token, requestID: requestID, invocation: invocation, trace: Self.forgeTrace(request),
            claimingInvocation: true, keepable: lifetime == .acceptable, logger: logger)
        return Self.json(.object([("stored", .bool(stored))]))
    }

    /// `POST /forge/lifecycle`: installed/upgraded records the installation (keeping a token that came
    /// along), uninstalled removes it; other events are ignored.
    func forgeLifecycle(_ request: Request, invocation: InvocationContext, id: InstallationID, logger: Logger)
        async throws -> Response
    {
        let body = try await self.readJSONObject(request)
        // Forge's documented body (id, installerAccountId, app, environment, permissions) has
        // no eventType: such a call is installed/upgraded.
        var eventType = "avi:forge:installed:app"
        if let raw = body["eventType"], !(raw is NSNull) {
            guard let value = raw as? String else { throw GatewayError.invalidRequest("eventType must be a string") }
            eventType = value
        }
        let offered = self.tokenAlongside(request, id: id, logger: logger)
        if Self.lifecycleEventsApplied.contains(eventType) { try await self.replayGuard.claim(id, invocation) }
        do {
            switch eventType {
            case "avi:forge:installed:app", "avi:forge:upgraded:app":
                let active = try await self.store.upsertInstallation(
                    id, metadata: invocation.metadata, now: FlowTime.now())
                if active { self.apiBaseUrlRecorded(id, invocation) }
                logger.info(
                    "installation recorded", metadata: ["installation.id": "\(id)", "lifecycle.event": "\(eventType)"])
                if active, let pushed = self.keepable(offered, id: id, logger: logger) {
                    _ = try await self.storeDelivery(
                        id, token: pushed, requestID: nil, invocation: invocation, trace: Self.forgeTrace(request),
                        arrival: .lifecycle, logger: logger)
                }
            case "avi:forge:uninstalled:app":
                try await self.uninstallInstallation(id, signal: eventType, logger: logger)
            default:
                logger.debug("lifecycle event ignored", metadata: ["lifecycle.event": "\(eventType.prefix(64))"])
                return Self.json(.object([("ok", true), ("ignored", true)]))
            }
        } catch let error as GatewayError {
            throw error
        } catch {
            throw GatewayError.storeUnavailable
        }
        return Self.json(.object([("ok", true)]))
    }

    /// The FIT's `apiBaseUrl` was just recorded for `id` (a registration or a lifecycle event):
    /// this process's answers from memory carry it at once, as the other replicas' do once the
    /// store's announcement reaches them.
    func apiBaseUrlRecorded(_ id: InstallationID, _ invocation: InvocationContext) {
        if let url = self.store.storableAPIBaseURL(invocation.apiBaseUrl) { self.flow.apiBaseUrlSeen(id, url) }
    }

    /// The lifecycle events that change state; others are answered and ignored (claiming no `jti`).
    static let lifecycleEventsApplied: Set<String> = [
        "avi:forge:installed:app", "avi:forge:upgraded:app", "avi:forge:uninstalled:app",
    ]

    /// `POST /forge/pre-uninstall`: the endpoint of the app's preUninstall module. Its body
    /// (context.cloudId, context.moduleKey, contextToken) is not trusted: the installation is the FIT's.
    func forgePreUninstall(_ request: Request, invocation: InvocationContext, id: InstallationID, logger: Logger)
        async throws -> Response
    {
        _ = try await self.readJSONObject(request, emptyIsObject: true)
        try await self.replayGuard.claim(id, invocation)
        do {
            try await self.uninstallInstallation(id, signal: "preUninstall", logger: logger)
        } catch let error as GatewayError {
            throw error
        } catch {
            throw GatewayError.storeUnavailable
        }
        return Self.json(.object([("ok", true)]))
    }

    /// Marks an installation uninstalled and deletes its tokens, user tokens and signing keys at
    /// once (recording it as uninstalled when it was never seen), then its named triggers; idempotent.
    func uninstallInstallation(_ id: InstallationID, signal: String, logger: Logger) async throws {
        try await self.store.uninstall(id, now: FlowTime.now())
        try await self.store.deleteNamedTriggerState(id)
        self.flow.installationUninstalled(id)
        self.triggerClient.installationUninstalled(id)
        logger.info("installation uninstalled", metadata: ["installation.id": "\(id)", "lifecycle.event": "\(signal)"])
    }

    /// What the lifetime rules (contract §3) make of a delivered token.
    enum DeliveredLifetime: Sendable, Equatable {
        case acceptable
        /// `exp` more than ``maximumDeliveredLifetime`` ahead: refused (Forge tokens live at most 4 h).
        case tooLong
        /// Less than ``minimumDeliveredRemaining`` left: never stored or served.
        case nearlyExpired
    }

    /// Longest a delivered token may still live, in seconds (24 h).
    static let maximumDeliveredLifetime: Int64 = 24 * 3600
    /// Shortest remaining life of a delivered token that is kept, in seconds.
    static let minimumDeliveredRemaining: Int64 = 60

    static func deliveredLifetime(_ token: AccessToken, now: FlowTime) -> DeliveredLifetime {
        let remaining = token.expiresAt - now.unixSeconds
        if remaining > Self.maximumDeliveredLifetime { return .tooLong }
        if remaining < Self.minimumDeliveredRemaining { return .nearlyExpired }
        return .acceptable
    }

    /// The user token a delivery may carry (`x-forge-oauth-user`) is held to the system token's
    /// lifetime rules (contract §3): one whose `exp` is more than 24 h ahead refuses the whole
    /// delivery (400 `invalid_token`, nothing stored); one with under 60 s left makes the delivery
    /// one of a nearly expired token (200 `{"stored": false}`, nothing kept). The gateway keeps no
    /// user token from a delivery (user tokens come from the exchange), so one without a readable
    /// `exp` changes nothing and is ignored (nil, as when there is none).
    func checkDeliveredUserToken(_ request: Request, id: InstallationID, logger: Logger) throws -> DeliveredLifetime? {
        guard let value = request.headers[.forgeOAuthUser] else { return nil }
        // Repeated, the header's values would be read joined (`a, b`) and no `exp` read at all.
        guard request.headers[values: .forgeOAuthUser].count == 1 else {
            throw GatewayError.invalidToken("x-forge-oauth-user must be given once")
        }
        let token = HeaderValue.trimmed(value)
        guard !token.isEmpty, let exp = TokenClaims.expiry(of: token) else { return nil }
        let lifetime = Self.deliveredLifetime(AccessToken(value: token, expiresAt: exp), now: FlowTime.now())
        if lifetime == .tooLong {
            logger.notice("refused a delivered user token that lives too long", metadata: ["installation.id": "\(id)"])
            throw GatewayError.invalidToken("the user token's exp is more than 24 hours ahead")
        }
        return lifetime
    }

    /// A token that came along with a registration or lifecycle call, or nil when the lifetime
    /// rules drop it (the call itself proceeds).
    func keepable(_ token: AccessToken?, id: InstallationID, logger: Logger) -> AccessToken? {
        guard let token else { return nil }
        let verdict = Self.deliveredLifetime(token, now: FlowTime.now())
        guard verdict == .acceptable else {
            logger.notice(
                "dropped a token outside the accepted lifetime",
                metadata: ["installation.id": "\(id)", "token.verdict": "\(verdict)"])
            return nil
        }
        return token
    }

    /// Verifies the Forge Invocation Token of a request: 401 `invalid_invocation_token` on any
    /// failure, and 403 `forbidden` for a valid FIT that `policy` does not accept (one from a user's
    /// browser, or a module key outside `TOKEN_GATEWAY_FORGE_MODULE_KEYS`). Every Forge route
    /// accepts only backend invocations. Records nothing: the call claims the `jti` later.
    /// Counts refusals; ``forgeCall(_:policy:logger:_:)`` counts the rest.
    func verifyInvocation(_ request: Request, policy: InvocationPolicy = .backend, logger: Logger) async throws
        -> (InvocationContext, InstallationID)
    {
        guard let header = request.headers[.authorization], header.utf8.count > 7,
            header.prefix(7).lowercased() == "bearer "
        else {
            self.metrics.countInvocationToken(outcome: "missing")
            throw GatewayError.invalidInvocationToken
        }
        let token = HeaderValue.trimmed(header.dropFirst(7))
        let invocation: InvocationContext
        do {
            invocation = try await self.verifier.verify(token, policy: policy)
        } catch let error as InvocationTokenError {
            self.metrics.countInvocationToken(outcome: error.reason)
            if error.isForbidden {
                self.refusalLog.log(
                    logger, .notice, "invocation token of a kind this route refuses",
                    metadata: ["fit.outcome": "\(error.reason)", "fit.detail": "\(error.detail ?? "-")"])
                throw GatewayError(
                    status: .forbidden, code: "forbidden",
                    message: "only invocations from the app's backend (core:endpoint) may call this route")
            }
            self.refusalLog.log(
                logger, .notice, "invocation token refused", metadata: ["fit.outcome": "\(error.reason)"])
            throw GatewayError.invalidInvocationToken
        } catch {
            self.metrics.countInvocationToken(outcome: "malformed")
            throw GatewayError.invalidInvocationToken
        }
        guard let id = InstallationID(invocation.installationId), id.ari == invocation.installationId else {
            self.metrics.countInvocationToken(outcome: "malformed")
            throw GatewayError.invalidInvocationToken
        }
        return (invocation, id)
    }

    /// The system token that came along with a registration or lifecycle call, or nil: absent,
    /// empty or without a readable `exp`, it is dropped (logged) and the call proceeds (contract §3:
    /// on these routes a token is optional, and one the rules refuse is dropped).
    func tokenAlongside(_ request: Request, id: InstallationID, logger: Logger) -> AccessToken? {
        do {
            return try self.optionalSystemToken(request)
        } catch {
            logger.notice(
                "dropped a system token without a readable exp; the call proceeds",
                metadata: ["installation.id": "\(id)"])
            return nil
        }
    }

    /// The `x-forge-oauth-system` token with its expiry, nil when absent; 400 `missing_token` when
    /// empty and `invalid_token` when its `exp` cannot be read.
    func optionalSystemToken(_ request: Request) throws -> AccessToken? {
        guard let value = request.headers[.forgeOAuthSystem] else { return nil }
        // Repeated, the header's values would be read joined (`a, b`): one token only.
        guard request.headers[values: .forgeOAuthSystem].count == 1 else {
            throw GatewayError.invalidToken("x-forge-oauth-system must be given once")
        }
        let token = HeaderValue.trimmed(value)
        if token.isEmpty { throw GatewayError.missingToken }
        guard let exp = TokenClaims.expiry(of: token) else {
            throw GatewayError.invalidToken("the system token has no readable exp claim")
        }
        return AccessToken(value: token, expiresAt: exp)
    }

    /// Stores a delivered token durably, then wakes this process's waiters. Returns whether it
    /// replaced the stored token.
    /// Forge's trace ids of a request.
    static func forgeTrace(_ request: Request) -> ForgeTrace {
        ForgeTrace(
            traceID: request.headers[.b3TraceID],
            spanID: request.headers[.b3SpanID])
    }

    /// With `claimingInvocation`, the FIT's `jti` is claimed in the same store step: a replayed
    /// one changes nothing and throws ``InvocationTokenError/replayed``.
    func storeDelivery(
        _ id: InstallationID, token: AccessToken, requestID: String?, invocation: InvocationContext,
        trace: ForgeTrace? = nil, arrival: TokenArrival = .push, claimingInvocation: Bool = false,
        keepable: Bool = true, logger: Logger
    )
        async throws -> Bool
    {
        let result: GatewayStore.DeliveryResult
        if let requestID { self.flow.deliveryArriving(id, requestID: requestID) }
        let generation = self.flow.deliveryGeneration()
        let now = FlowTime.now()
        // A delivery that must not be kept asks for more validity than its token has: the store
        // then takes it as it takes a nearly expired one (nothing stored; its round trip ended).
        let minimumValidity: Duration =
            keepable
            ? .seconds(Self.minimumDeliveredRemaining) : .seconds(max(token.expiresAt - now.unixSeconds, 0) + 1)
        do {
            result = try await self.store.storeDeliveredToken(
                id, token: token, requestID: requestID, metadata: invocation.metadata, now: now,
                minimumValidity: minimumValidity, arrival: arrival, origin: self.flow.replicaID,
                firstUse: claimingInvocation ? self.replayGuard.firstUseKey(id, invocation) : nil)
        } catch is GatewayStore.FirstUseKeyTaken {
            if let requestID { self.flow.deliveryNotStored(id, requestID: requestID) }
            throw InvocationTokenError.replayed
        } catch {
            if let requestID { self.flow.deliveryNotStored(id, requestID: requestID) }
            logger.warning("could not store delivered token", metadata: ["installation.id": "\(id)"])
            if claimingInvocation { throw InvocationTokenError.storeUnavailable }
            throw GatewayError.storeUnavailable
        }
        if result.outcome == .uninstalled {
            if let requestID { self.flow.deliveryNotStored(id, requestID: requestID) }
            throw GatewayError(FlowError.installationUninstalled)
        }
        if result.solicited {
            self.metrics.flow.tokensReceivedSolicited.increment()
        } else {
            self.metrics.flow.tokensReceivedPushed.increment()
        }
        let solicitedBy = result.solicited ? requestID : nil
        if result.outcome == .stored {
            self.flow.tokenDelivered(
                id,
                token: AccessToken(
                    value: token.value, expiresAt: token.expiresAt, requestID: solicitedBy,
                    receivedAt: FlowTime.now().unixSeconds),
                apiBaseUrl: result.apiBaseUrl, solicitedBy: solicitedBy, storedAt: generation)
        } else if solicitedBy == nil {
            // No newer token, but the FIT may name a new apiBaseUrl: answers from memory carry it.
            self.flow.apiBaseUrlSeen(id, result.apiBaseUrl)
        } else if let solicitedBy {
            // The round trip brought no newer token (Forge re-delivered the one held): its callers
            // get the newest one and round trips go on hold.
            do {
                let current = try await self.store.systemToken(id)
                self.flow.deliveryBroughtNoNewerToken(
                    id, requestID: solicitedBy, newest: current, apiBaseUrl: result.apiBaseUrl, storedAt: generation)
            } catch {
                // The leader learns it from the notification or its poll.
            }
        }
        self.audit.tokenReceived(
            installation: id, kind: result.solicited ? "solicited" : "pushed", expiresAt: token.expiresAt,
            token: token.value, stored: result.outcome == .stored, requestID: requestID, trace: trace)
        return result.outcome == .stored
    }
}

extension InvocationContext {
    var metadata: InstallationMetadata {
        InstallationMetadata(appId: self.appId, apiBaseUrl: self.apiBaseUrl, cloudId: self.cloudId)
    }
}

/// Reads the few claims the gateway needs from an access token without trusting it: tokens are
/// opaque except for `exp`.
public enum TokenClaims {
    /// Largest token accepted.
    public static let maxLength = 16 * 1024

    /// The `exp` claim (unix seconds) of a JWT (three base64url parts), or nil when it cannot be read.
    public static func expiry(of token: String) -> Int64? {
        guard token.utf8.count <= Self.maxLength, token.utf8.allSatisfy(Self.isJWTByte) else { return nil }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let payload = Base64URL.decode(String(parts[1])),
            let value = (try? JSONDecoder().decode(ExpiryClaim.self, from: Data(payload)))?.exp
        else { return nil }
        guard value.isFinite, value >= 1, value < 1e11 else { return nil }
        return Int64(value)
    }

    /// A byte of a compact JWT: the base64url alphabet and `.`.
    static func isJWTByte(_ byte: UInt8) -> Bool { byte == UInt8(ascii: ".") || Base64URL.isAlphabetByte(byte) }

    /// A JSON object's `exp`, when it is a number; its other members are not read.
    private struct ExpiryClaim: Decodable {
        var exp: Double?

        private enum CodingKeys: String, CodingKey { case exp }

        init(from decoder: any Decoder) throws {
            self.exp = try? decoder.container(keyedBy: CodingKeys.self).decodeIfPresent(Double.self, forKey: .exp)
        }
    }
}
