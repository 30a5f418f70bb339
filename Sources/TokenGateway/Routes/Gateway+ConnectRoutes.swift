import FlowEngine
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1

extension Gateway {
    /// The routes of contract §5. They answer 404 `not_found` while no Connect base URL is configured.
    func addConnectRoutes(to router: Router<BasicRequestContext>) {
        router.post("/connect/installed") { request, context in
            try await self.connectLifecycle(request, event: .installed, logger: context.logger)
        }
        router.post("/connect/uninstalled") { request, context in
            try await self.connectLifecycle(request, event: .uninstalled, logger: context.logger)
        }
        router.post("/v1/connect/verify") { request, context in
            try await self.connectVerify(request, logger: context.logger)
        }
        router.post("/v1/connect/sign") { request, context in
            try await self.connectSign(request, logger: context.logger)
        }
    }

    enum ConnectLifecycleEvent: String {
        case installed
        case uninstalled
    }

    /// The signed-install verifier, or 404 when Connect is not configured.
    private func connectVerifier() throws -> SignedInstallVerifier {
        guard let verifier = self.connectInstallVerifier else { throw GatewayError.notFound }
        return verifier
    }

    // MARK: Lifecycle

    /// `POST /connect/installed` and `/connect/uninstalled`: authenticate the signed install first
    /// (401 `invalid_signed_install`, nothing stored), then store; 204.
    func connectLifecycle(_ request: Request, event: ConnectLifecycleEvent, logger: Logger) async throws -> Response {
        let verifier = try self.connectVerifier()
        let verified: VerifiedSignedInstall
        do {
            verified = try await verifier.verify(
                authorization: request.headers[.authorization], method: request.method.rawValue,
                uri: request.uri.string
            ) {
                // Contract §5: any failure of a lifecycle callback is 401, an oversized body too.
                do { return try await self.readBody(request) } catch is NIOTooManyBytesError {
                    throw SignedInstallError.bodyTooLarge
                } catch is HTTPParserError {
                    throw SignedInstallError.invalidBody
                }
            }
        } catch let error as SignedInstallError {
            self.refusalLog.log(
                logger, .notice, "Connect signed install refused",
                metadata: ["connect.event": "\(event.rawValue)", "connect.outcome": "\(error.reason)"])
            throw GatewayError.invalidSignedInstall
        }
        let payload = verified.payload
        let clientKey = verified.clientKey
        guard Self.isStorableClientKey(clientKey) else {
            throw GatewayError.invalidSignedInstall("clientKey must be 1–256 visible ASCII characters without braces")
        }
        let installationId = try await self.connectInstallationLink(payload, clientKey: clientKey, logger: logger)
        let appKey = payload["key"]?.connectString.flatMap { $0.isEmpty ? nil : $0 }
        let baseUrl = payload["baseUrl"]?.connectString.flatMap { $0.isEmpty ? nil : $0 }
        // The payload is kept as received, except for the secret, which is sealed on its own.
        let payloadJSON = ConnectJSON.sortedObject(payload.filter { $0.key != "sharedSecret" }).serialized()
        let mark = GatewayStore.SignedInstallMark(
            tokenDigest: verified.replayDigest, bodyDigest: verified.bodyDigest,
            expiresAtUnixSeconds: verified.expiresAt,
            skewSeconds: Int64(SignedInstallVerifier.seconds(verifier.configuration.clockSkew).rounded(.up)),
            issuedAt: verified.issuedAt, namesOneCallback: verified.namesOneCallback,
            earlierTokenDigest: verified.earlierReplayDigest)
        let outcome: GatewayStore.ConnectCallbackOutcome
        switch event {
        case .installed:
            guard let secret = payload["sharedSecret"]?.connectString, !secret.isEmpty else {
                throw GatewayError.invalidSignedInstall("sharedSecret (a non-empty string) is required")
            }
            guard let appKey else { throw GatewayError.invalidSignedInstall("key (the app key, a string) is required") }
            guard let baseUrl, ConnectURL.isAbsoluteHTTP(baseUrl) else {
                throw GatewayError.invalidSignedInstall("baseUrl (an absolute http(s) URL) is required")
            }
            do {
                outcome = try await self.store.storeConnectInstall(
                    ConnectInstallation(
                        clientKey: clientKey, appKey: appKey, baseUrl: baseUrl, payloadJSON: payloadJSON,
                        sharedSecret: Array(secret.utf8), installationId: installationId),
                    mark: mark, now: FlowTime.now())
            } catch {
                throw self.connectStoreError(error, clientKey: clientKey, logger: logger)
            }
        case .uninstalled:
            do {
                outcome = try await self.store.storeConnectUninstall(
                    clientKey: clientKey, appKey: appKey, baseUrl: baseUrl, payloadJSON: payloadJSON,
                    installationId: installationId, mark: mark, now: FlowTime.now())
            } catch {
                throw self.connectStoreError(error, clientKey: clientKey, logger: logger)
            }
        }
        try Self.logConnectOutcome(
            outcome, event: event, clientKey: clientKey, baseUrl: baseUrl, installationId: installationId,
            logger: logger)
        return Response(status: .noContent, headers: [.cacheControl: "no-store"])
    }

    /// Logs what a verified lifecycle callback did; throws 401 for a replay (the same token with
    /// another body: only the method, path and query are signed, not the body).
    private static func logConnectOutcome(
        _ outcome: GatewayStore.ConnectCallbackOutcome, event: ConnectLifecycleEvent, clientKey: String,
        baseUrl: String?, installationId: InstallationID?, logger: Logger
    ) throws {
        let tenant: Logger.Metadata = ["connect.client_key": "\(clientKey)", "connect.event": "\(event.rawValue)"]
        switch outcome {
        case .stored(let created) where event == .installed:
            logger.info(
                "Connect tenant installed",
                metadata: tenant.merging(
                    [
                        "connect.base_url": "\(baseUrl ?? "-")", "connect.reinstall": "\(!created)",
                        "installation.id": "\(installationId?.ari ?? "-")",
                    ], uniquingKeysWith: { $1 }))
        case .stored:
            logger.info("Connect tenant uninstalled", metadata: tenant)
        case .repeated:
            logger.info("Connect callback repeated with the same token and body; nothing changed", metadata: tenant)
        case .superseded where event == .installed:
            // Answered as a failed install, not 204: Atlassian must not take the tenant as
            // installed with a secret the gateway did not keep (an install signed a moment before
            // an uninstall by a host whose clock is behind); installing again sends a later one.
            logger.notice(
                "Connect install issued before the last callback applied arrived late; refused, nothing changed",
                metadata: tenant)
            throw GatewayError.invalidSignedInstall(
                "a lifecycle callback of this tenant issued later (iat) was already applied; install again")
        case .superseded:
            logger.notice(
                "Connect callback issued before the last one applied arrived late; nothing changed", metadata: tenant)
        case .replayed:
            logger.notice(
                "Connect signed install refused", metadata: tenant.merging(["connect.outcome": "replayed"]) { $1 })
            throw GatewayError.invalidSignedInstall
        }
    }

    /// The Forge installation a payload names in `installationId` (an ARI; a bare id is accepted
    /// too), or nil. A value that names no installation is logged and not linked: the install
    /// itself still succeeds.
    ///
    /// The link drives the OAuth token exchange (a tenant's JWT buys the linked installation's
    /// token). It is refused only when the payload's `cloudId` and the cloud id the installation's
    /// own record holds (from its verified FITs) are both known and differ: the payload then names
    /// an installation of another site.
    private func connectInstallationLink(_ payload: [String: JSONValue], clientKey: String, logger: Logger) async throws
        -> InstallationID?
    {
        guard let raw = payload["installationId"], raw != .null else { return nil }
        guard let text = raw.connectString, let id = InstallationID(text) else {
            logger.warning("Connect payload names no valid installation; not linked")
            return nil
        }
        guard let cloudId = payload["cloudId"]?.connectString, !cloudId.isEmpty else { return id }
        let record: InstallationRecord?
        do {
            record = try await self.store.installation(id)
        } catch {
            throw self.connectStoreError(error, clientKey: clientKey, logger: logger)
        }
        if let recorded = record?.cloudId, recorded != cloudId {
            logger.notice(
                "Connect payload's cloudId is not the installation's; not linked",
                metadata: ["connect.client_key": "\(clientKey)", "installation.id": "\(id.ari)"])
            return nil
        }
        return id
    }

    /// A `clientKey` that can be a store key: 1–256 visible ASCII characters, no `{` or `}` (which
    /// would change the Redis Cluster hash tag).
    static func isStorableClientKey(_ clientKey: String) -> Bool {
        (1...256).contains(clientKey.utf8.count)
            && clientKey.utf8.allSatisfy { byte in
                byte > 0x20 && byte < 0x7F && byte != UInt8(ascii: "{") && byte != UInt8(ascii: "}")
            }
    }

    /// 503 for Redis failures; anything else (a secret that does not open) is logged and a 500.
    private func connectStoreError(_ error: any Error, clientKey: String, logger: Logger) -> GatewayError {
        if error is RedisError { return GatewayError.storeUnavailable }
        logger.error(
            "Connect tenant record unusable",
            metadata: ["connect.client_key": "\(clientKey)", "error.type": "\(String(reflecting: type(of: error)))"])
        return GatewayError.internalError
    }

    /// The tenant's record; 503 when the store is unreachable.
    private func connectTenantRecord(_ clientKey: String, logger: Logger) async throws -> ConnectTenantRecord? {
        guard Self.isStorableClientKey(clientKey) else { return nil }
        do {
            return try await self.store.connectTenant(clientKey)
        } catch {
            throw self.connectStoreError(error, clientKey: clientKey, logger: logger)
        }
    }

    // MARK: Verify

    /// `POST /v1/connect/verify` `{"jwt", "method", "url"}`: is this inbound Connect request genuine?
    func connectVerify(_ request: Request, logger: Logger) async throws -> Response {
        let verifier = try self.connectVerifier()
        let caller = try self.authenticateCaller(request)
        if caller.clientKeys.values?.isEmpty == true { throw GatewayError.forbidden }
        let body = try await self.readJSONObject(request)
        guard let jwt = body["jwt"] as? String, !jwt.isEmpty else {
            throw GatewayError.invalidRequest("jwt (a string) is required")
        }
        let method = try Self.connectMethod(body)
        guard let url = body["url"] as? String else {
            throw GatewayError.invalidRequest("url (a string: the request's path and query) is required")
        }

        let clientKey: String
        do {
            clientKey = try ConnectJWT.unverifiedTenant(of: jwt)
        } catch {
            throw self.refusedConnectJWT(error, caller: caller, logger: logger)
        }
        guard caller.clientKeys.contains(clientKey) else { throw GatewayError.forbidden }
        guard let record = try await self.connectTenantRecord(clientKey, logger: logger) else {
            throw self.refusedConnectJWT(.unknownTenant, caller: caller, logger: logger)
        }
        guard record.status == .installed, let secret = record.sharedSecret else {
            throw self.refusedConnectJWT(.uninstalledTenant, caller: caller, logger: logger)
        }
        let verified: VerifiedConnectJWT
        do {
            verified = try ConnectJWT.verify(
                jwt, clientKey: clientKey, secret: secret.bytes, method: method, url: url,
                basePath: verifier.basePath)
        } catch {
            throw self.refusedConnectJWT(error, caller: caller, logger: logger)
        }
        logger.debug(
            "Connect JWT verified",
            metadata: [
                "caller": "\(caller.name)", "connect.client_key": "\(clientKey)",
                "connect.context_qsh": "\(verified.isContextQSH)",
            ])
        return Self.json(
            .object([
                ("clientKey", .string(clientKey)),
                ("accountId", .optional(verified.accountId)),
                ("installationId", .optional(record.installationId?.ari)),
                ("context", verified.context ?? .null),
            ]))
    }

    private func refusedConnectJWT(_ error: ConnectJWTError, caller: Caller, logger: Logger) -> GatewayError {
        logger.notice(
            "Connect JWT refused", metadata: ["caller": "\(caller.name)", "connect.outcome": "\(error.reason)"])
        return GatewayError.invalidConnectJWT(error)
    }

    // MARK: Sign

    /// `POST /v1/connect/sign` `{"clientKey", "method", "url"}`: a short-lived JWT for the app's own
    /// call to the tenant's product.
    func connectSign(_ request: Request, logger: Logger) async throws -> Response {
        _ = try self.connectVerifier()
        let caller = try self.authenticateCaller(request)
        let body = try await self.readJSONObject(request)
        guard let clientKey = body["clientKey"] as? String, !clientKey.isEmpty else {
            throw GatewayError.invalidRequest("clientKey (a string) is required")
        }
        let method = try Self.connectMethod(body)
        guard let url = body["url"] as? String, ConnectURL.isAbsoluteHTTP(url) else {
            throw GatewayError.invalidRequest("url (an absolute http(s) URL on the tenant's product) is required")
        }
        guard caller.clientKeys.contains(clientKey) else { throw GatewayError.forbidden }
        guard let record = try await self.connectTenantRecord(clientKey, logger: logger), record.status == .installed,
            let secret = record.sharedSecret, let appKey = record.appKey, let baseUrl = record.baseUrl
        else { throw GatewayError.tenantNotFound }
        guard ConnectURL.isURL(url, under: baseUrl) else {
            throw GatewayError.invalidRequest("url is not under the tenant's baseUrl (scheme, host, port and path)")
        }
        let signed = ConnectJWT.sign(
            appKey: appKey, method: method, url: url, basePath: ConnectURL.basePath(of: baseUrl),
            secret: secret.bytes)
        logger.info(
            "Connect JWT signed",
            metadata: [
                "caller": "\(caller.name)", "connect.client_key": "\(clientKey)", "http.method": "\(method)",
                "token.expires_at": "\(signed.expiresAt)",
            ])
        return Self.json(
            .object([
                ("jwt", .string(signed.token)),
                ("expiresAt", .string(RFC3339.string(unixSeconds: signed.expiresAt))),
            ]), noStore: true)
    }

    /// The body's `method`: 1–16 letters, upper-cased.
    static func connectMethod(_ body: [String: Any]) throws -> String {
        guard let method = body["method"] as? String, (1...16).contains(method.utf8.count),
            method.utf8.allSatisfy({ (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) })
        else { throw GatewayError.invalidRequest("method (an HTTP method such as GET) is required") }
        return method.uppercased()
    }
}

extension GatewayError {
    /// 401 for any signed-install failure (contract §5).
    public static let invalidSignedInstall = GatewayError(
        status: .unauthorized, code: "invalid_signed_install",
        message: "the signed install (Authorization: JWT, RS256) was refused",
        extraHeaders: ["WWW-Authenticate": "JWT"])
    /// 401 for a signed install whose signature checked out but whose payload cannot be installed
    /// (contract §5: any failure is `invalid_signed_install`): `problem` says what is missing.
    static func invalidSignedInstall(_ problem: String) -> GatewayError {
        GatewayError(
            status: .unauthorized, code: "invalid_signed_install",
            message: "the signed install was refused: \(problem)",
            extraHeaders: ["WWW-Authenticate": "JWT"])
    }

    /// 404 for an unknown tenant, or one that has uninstalled the app.
    public static let tenantNotFound = GatewayError(
        status: .notFound, code: "tenant_not_found",
        message: "no Connect tenant has the app installed under this clientKey")

    /// 401 naming the failed check of a Connect JWT, with the `JWT` challenge (RFC 9110 §15.5.2:
    /// every 401 carries one).
    public static func invalidConnectJWT(_ error: ConnectJWTError) -> GatewayError {
        GatewayError(
            status: .unauthorized, code: "invalid_connect_jwt", message: error.message,
            extraHeaders: ["WWW-Authenticate": "JWT"])
    }
}
