import FlowEngine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

extension Gateway {
    /// The standard OAuth 2.0 face of contract §8: `POST /oauth/token` (client credentials with
    /// `resource`, and token exchange of a Connect JWT) and the RFC 8414 discovery document.
    ///
    /// Every non-2xx answer of `/oauth/token` is an RFC 6749 §5.2 body, including a wrong method.
    func addOAuthRoutes(to router: Router<BasicRequestContext>) {
        router.post(RouterPath(OAuthMetadata.tokenPath)) { request, context in
            await self.oauthToken(request, logger: context.logger)
        }
        router.get(RouterPath(OAuthMetadata.discoveryPath)) { _, _ in
            self.oauthDiscovery()
        }
        // RFC 8414 §3.1: an issuer with a path (`https://example.com/tokens`) is discovered at
        // `/.well-known/oauth-authorization-server/tokens`; served too, for a proxy that forwards it.
        if let suffix = OAuthMetadata.discoveryPathSuffix(publicURL: self.configuration.effectivePublicURL) {
            router.get(RouterPath(OAuthMetadata.discoveryPath + suffix)) { _, _ in
                self.oauthDiscovery()
            }
        }
    }

    /// `GET /.well-known/oauth-authorization-server`: public, cacheable for five minutes.
    func oauthDiscovery() -> Response {
        let bound = self.boundPort.load(ordering: .relaxed)
        let document = OAuthMetadata.document(
            publicURL: self.configuration.effectivePublicURL(boundPort: bound == 0 ? nil : bound),
            tokenExchange: self.connectInstallVerifier != nil)
        return Response(
            status: .ok, headers: [.contentType: "application/json", .cacheControl: "public, max-age=300"],
            body: .init(byteBuffer: ByteBuffer(string: document.serialized())))
    }

    /// What one token request has revealed so far, for its log line. Bounded values only.
    struct OAuthRequestLog {
        var grant = "-"
        var method = "-"
        var caller: String?
    }

    /// `POST /oauth/token`. Never throws: every failure is an RFC 6749 answer.
    func oauthToken(_ request: Request, logger: Logger) async -> Response {
        var log = OAuthRequestLog()
        do {
            return try await self.oauthTokenAnswer(request, log: &log)
        } catch let error as OAuthError {
            let metadata: Logger.Metadata = [
                "oauth.error": "\(error.code)", "oauth.grant_type": "\(log.grant)",
                "oauth.client_auth": "\(log.method)", "caller": "\(log.caller ?? "-")",
            ]
            if error == .serverError {
                logger.error("OAuth token request failed", metadata: metadata)
            } else if error.status == .serviceUnavailable {
                logger.info("OAuth token request could not be served now", metadata: metadata)
            } else {
                self.refusalLog.log(logger, .notice, "OAuth token request refused", metadata: metadata)
            }
            return error.response
        } catch {
            logger.error(
                "OAuth token request failed",
                metadata: ["error.type": "\(String(reflecting: type(of: error)))", "oauth.grant_type": "\(log.grant)"])
            return OAuthError.serverError.response
        }
    }

    private func oauthTokenAnswer(_ request: Request, log: inout OAuthRequestLog) async throws -> Response {
        let bytes: [UInt8]
        do {
            bytes = try await self.readBody(request)
        } catch {
            throw OAuthError.invalidRequest(
                "the request body could not be read (at most \(self.configuration.maxBodySize) bytes)")
        }
        guard let charset = Self.formCharset(request.headers[.contentType]) else {
            throw OAuthError.invalidRequest(
                "Content-Type must be application/x-www-form-urlencoded (charset UTF-8, US-ASCII or ISO-8859-1)")
        }
        let form = try OAuthForm.parse(bytes, charset: charset)

        let credentials = try OAuthClientCredentials.read(
            authorization: request.headers[values: .authorization], form: form)
        log.method = credentials.method.rawValue
        guard let caller = credentials.authenticate(with: self.configuration.callers) else {
            throw OAuthError.invalidClient
        }
        log.caller = caller.name

        guard let grantType = form["grant_type"] else {
            throw OAuthError.invalidRequest("grant_type is required")
        }
        switch grantType {
        case OAuthMetadata.clientCredentialsGrant:
            log.grant = "client_credentials"
            return try await self.oauthClientCredentials(form, caller: caller)
        case OAuthMetadata.tokenExchangeGrant:
            log.grant = "token_exchange"
            return try await self.oauthTokenExchange(form, caller: caller)
        default:
            log.grant = "other"
            throw OAuthError.unsupportedGrantType
        }
    }

    /// `grant_type=client_credentials`: the token of the installation `resource` names.
    private func oauthClientCredentials(_ form: OAuthForm, caller: Caller) async throws -> Response {
        guard let resource = form["resource"] else {
            throw OAuthError.invalidRequest("resource (the installation ARI) is required")
        }
        guard let installation = InstallationID(resource), caller.installations.contains(installation.ari) else {
            throw OAuthError.invalidTarget
        }
        return try await self.oauthIssue(installation, caller: caller, exchange: false)
    }

    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`: verifies the Connect JWT as
    /// `POST /v1/connect/verify` does and answers the token of the tenant's linked installation.
    private func oauthTokenExchange(_ form: OAuthForm, caller: Caller) async throws -> Response {
        guard let verifier = self.connectInstallVerifier else { throw OAuthError.tokenExchangeUnavailable }
        guard let subjectToken = form["subject_token"] else {
            throw OAuthError.invalidRequest("subject_token (the Connect JWT of the inbound request) is required")
        }
        guard let subjectTokenType = form["subject_token_type"] else {
            throw OAuthError.invalidRequest("subject_token_type is required")
        }
        guard subjectTokenType == OAuthMetadata.jwtTokenType else {
            throw OAuthError.invalidRequest("subject_token_type must be \(OAuthMetadata.jwtTokenType)")
        }
        if let requested = form["requested_token_type"], requested != OAuthMetadata.accessTokenType {
            throw OAuthError.invalidRequest(
                "requested_token_type, when given, must be \(OAuthMetadata.accessTokenType)")
        }
        if form["actor_token"] != nil || form["actor_token_type"] != nil {
            throw OAuthError.invalidRequest("actor_token is not supported")
        }
        guard let rawMethod = form["connect_method"], (1...16).contains(rawMethod.utf8.count),
            rawMethod.utf8.allSatisfy({ (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) })
        else {
            throw OAuthError.invalidRequest(
                "connect_method (the inbound request's HTTP method, such as GET) is required")
        }
        guard let url = form["connect_url"] else {
            throw OAuthError.invalidRequest("connect_url (the inbound request's path and query) is required")
        }

        let clientKey: String
        do {
            clientKey = try ConnectJWT.unverifiedTenant(of: subjectToken)
        } catch {
            throw Self.refusedSubjectToken(error)
        }
        // Outside the caller's tenants: the same answer whether or not the tenant exists.
        guard caller.clientKeys.contains(clientKey) else { throw OAuthError.invalidTarget }
        let record: ConnectTenantRecord?
        do {
            record = Self.isStorableClientKey(clientKey) ? try await self.store.connectTenant(clientKey) : nil
        } catch is RedisError {
            throw OAuthError.temporarilyUnavailable("the token store is unreachable", retryAfter: 1)
        }
        guard let record else { throw Self.refusedSubjectToken(.unknownTenant) }
        guard record.status == .installed, let secret = record.sharedSecret else {
            throw Self.refusedSubjectToken(.uninstalledTenant)
        }
        do {
            _ = try ConnectJWT.verify(
                subjectToken, clientKey: clientKey, secret: secret.bytes, method: rawMethod.uppercased(), url: url,
                basePath: verifier.basePath)
        } catch {
            throw Self.refusedSubjectToken(error)
        }
        guard let installation = record.installationId, caller.installations.contains(installation.ari) else {
            throw OAuthError.invalidTarget
        }
        if let resource = form["resource"], InstallationID(resource) != installation {
            throw OAuthError.invalidTarget
        }
        return try await self.oauthIssue(installation, caller: caller, exchange: true)
    }

    /// RFC 8693 §2.2.2: a subject token that fails verification is `invalid_request`; the
    /// description names the failed check, never the token or a secret.
    private static func refusedSubjectToken(_ error: ConnectJWTError) -> OAuthError {
        .invalidRequest("the subject_token was refused: \(error.message)")
    }

    /// The installation's token through the same flow as `GET /v1/installations/{id}/token`
    /// (cache, one coalesced round trip, the default 300 s validity and 10 s deadline), audited,
    /// with the installation's `apiBaseUrl`.
    private func oauthIssue(_ installation: InstallationID, caller: Caller, exchange: Bool) async throws -> Response {
        let answer: TokenAnswer
        do {
            answer = try await self.flow.token(
                for: installation,
                request: TokenFlow.Request(
                    minValidity: TokenRequestDefaults.minValidity, timeout: TokenRequestDefaults.timeout,
                    forceRefresh: false))
        } catch {
            throw OAuthError(error)
        }
        self.audit.tokenHandedOut(
            caller: caller.name, installation: installation, source: answer.source.rawValue,
            expiresAt: answer.token.expiresAt, token: answer.token.value, via: "oauth")
        let expiresIn = max(0, answer.token.expiresAt - FlowTime.now().unixSeconds)
        var fields: [(String, JSONValue)] = [("access_token", .string(answer.token.value))]
        if exchange { fields.append(("issued_token_type", .string(OAuthMetadata.accessTokenType))) }
        fields += [("token_type", "Bearer"), ("expires_in", .int(expiresIn))]
        // Contract §2 (v1.1): the installation's apiBaseUrl whichever way its token is served, this
        // one included (an extra member, as RFC 6749 §5.1 allows); null while no FIT carried one.
        fields.append(("apiBaseUrl", answer.apiBaseUrl.map { .string($0) } ?? .null))
        return Response(
            status: .ok,
            headers: [
                .contentType: "application/json", .cacheControl: "no-store", .pragma: "no-cache",
            ],
            body: .init(byteBuffer: ByteBuffer(string: JSONValue.object(fields).serialized())))
    }

    /// `application/x-www-form-urlencoded`, with at most a UTF-8 (or US-ASCII) charset parameter.
    static func isFormContentType(_ value: String?) -> Bool { Self.formCharset(value) != nil }

    /// The charset of an `application/x-www-form-urlencoded` body: UTF-8 unless the `charset`
    /// parameter says US-ASCII (read as UTF-8, of which it is a subset) or ISO-8859-1 (Apache
    /// HttpClient's default label for forms). Nil for another media type or charset.
    static func formCharset(_ value: String?) -> OAuthForm.Charset? {
        guard let value else { return nil }
        let parts = value.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        guard parts.first == "application/x-www-form-urlencoded" else { return nil }
        var charset = OAuthForm.Charset.utf8
        for parameter in parts.dropFirst() where !parameter.isEmpty {
            guard parameter.hasPrefix("charset=") else { continue }
            let name = parameter.dropFirst("charset=".count).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
            switch name {
            case "utf-8", "utf8", "us-ascii": charset = .utf8
            case "iso-8859-1", "iso_8859-1", "latin1", "l1": charset = .latin1
            default: return nil
            }
        }
        return charset
    }
}

extension OAuthError {
    /// 405 for a method other than POST on the token endpoint (``ErrorMiddleware`` answers it,
    /// whatever the method, with `Allow: POST`).
    static let methodNotAllowed = OAuthError(
        code: "invalid_request", status: .methodNotAllowed, description: "the token endpoint takes POST")

    /// The answer to `/oauth/token` called with any method but POST: an RFC 6749 body, not the
    /// gateway's.
    static var methodNotAllowedResponse: Response {
        var response = OAuthError.methodNotAllowed.response
        response.headers[.allow] = "POST"
        return response
    }
}
