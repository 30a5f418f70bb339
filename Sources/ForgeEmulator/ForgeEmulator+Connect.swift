import Base64URLCoding
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import _CryptoExtras

/// The lifecycle callbacks of a Connect app.
public enum ConnectLifecycleEvent: String, Sendable, Hashable, CaseIterable {
    case installed
    case uninstalled
}

/// How a signed install is signed and sent. The defaults make a valid one, as Atlassian sends it.
public struct SignedInstallOptions: Sendable {
    /// How the token is signed.
    public enum Algorithm: Sendable, Hashable {
        /// RS256 with the current install key.
        case rs256
        /// `alg: none`, empty signature.
        case none
        /// `alg: HS256` keyed with the PEM text of the published public key (algorithm confusion).
        case hs256WithPublicKey
    }

    public var algorithm: Algorithm = .rs256
    /// Header `kid`; default the current install key's. Set it to one the key service does not know.
    public var kid: String? = nil
    /// `jti`; default none, as in the lifecycle tokens Atlassian's products send (their claims are
    /// `iss`, `sub`, `qsh`, `context`, `iat`, `exp` and, signed, `aud`). Set one to send it.
    public var jti: String? = nil
    /// Sign with a fresh key that is never published, under the published `kid`.
    public var signWithUnpublishedKey = false
    /// `iss`; default the tenant's `clientKey`.
    public var issuer: String? = nil
    /// `aud`; default `[<app base URL>]`.
    public var audience: [String]? = nil
    /// `aud` as a single string rather than an array.
    public var audienceAsString = false
    /// `iat`; default now. An earlier one makes a callback issued before another.
    public var issuedAt: Date? = nil
    /// `exp`; default `iat` + 180 s.
    public var expiresAt: Date? = nil
    /// `qsh`; default the hash of `POST` and the lifecycle path.
    public var qsh: String? = nil
    /// The authorization scheme; default `JWT` (Atlassian's). `Bearer` makes a wrong one.
    public var scheme = "JWT"
    /// Send no `Authorization` header at all.
    public var omitAuthorization = false
    /// Send this body `clientKey` instead of the tenant's (the token still names the tenant).
    public var bodyClientKey: String? = nil
    /// Change the body after signing: this value replaces the body (for malformed-body tests).
    public var rawBody: String? = nil

    /// Options for a valid signed install.
    public init() {}
}

/// How a product→app Connect JWT is minted. The defaults make a valid one.
public struct ConnectJWTOptions: Sendable {
    /// Which `qsh` to carry.
    public enum QSH: Sendable, Hashable {
        /// The canonical request's hash for the method and URL.
        case computed
        /// The literal `context-qsh`.
        case context
        /// This value.
        case literal(String)
        /// No `qsh` claim.
        case absent
    }

    public var qsh: QSH = .computed
    /// Sign with this secret instead of the tenant's current one (an old secret, say).
    public var secret: String? = nil
    /// `iat`; default now.
    public var issuedAt: Date? = nil
    /// `exp`; default `iat` + 180 s.
    public var expiresAt: Date? = nil
    /// A session token: `aud = [clientKey]`, `iss` = the app key, `qsh` defaulting to `context-qsh`.
    public var sessionToken = false
    /// `sub`; default the tenant's account id.
    public var accountId: String? = nil
    /// The `context` claim, as JSON text of an object.
    public var contextJSON: String? = nil
    /// Header `alg`; anything but `HS256` still signs with HMAC-SHA256.
    public var algorithmName = "HS256"

    /// Options for a valid JWT.
    public init() {}
}

extension ForgeEmulator {
    /// The install-keys base URL to give the gateway (`TOKEN_GATEWAY_CONNECT_KEYS_URL`): a key is
    /// served at `<this>/<kid>` as PEM.
    public var connectKeysURL: String { self.baseURL + "/connect-install-keys" }

    /// The app base URL the Connect side signs installs for (`aud`), and relative to which the
    /// lifecycle paths are hashed; default the gateway URL.
    public var connectAppBaseURL: String {
        self.connect.withLock { $0.appBaseURL } ?? self.gatewayURL
    }

    /// Sets the app base URL (`TOKEN_GATEWAY_CONNECT_BASE_URL` of the gateway under test).
    public func setConnectAppBaseURL(_ url: String) {
        self.connect.withLock { $0.appBaseURL = url }
    }

    /// The app key every emulated tenant installs.
    public var connectAppKey: String { self.connect.withLock { $0.appKey } }

    /// Makes a new tenant on a new site (fresh `clientKey`, shared secret and account) and
    /// remembers it. Nothing is sent; see ``connectInstall(_:options:gatewayURL:)``.
    /// - Parameters:
    ///   - product: `jira` (no context path) or `confluence` (`/wiki`).
    ///   - linkedTo: a Forge installation to name in the payload (Connect on Forge).
    ///   - clientKey: the tenant's `clientKey`; default a fresh UUID.
    public func makeConnectTenant(
        product: String = "jira", linkedTo installation: EmulatedInstallation? = nil, clientKey: String? = nil
    ) -> EmulatedConnectTenant {
        let site = "site-" + Self.randomHex(bytes: 6)
        let contextPath = product == "confluence" ? "/wiki" : ""
        let tenant = EmulatedConnectTenant(
            clientKey: clientKey ?? UUID().uuidString.lowercased(),
            appKey: self.connectAppKey,
            baseUrl: "https://\(site).atlassian.net\(contextPath)",
            productType: product,
            sharedSecret: Self.newSharedSecret(),
            installationId: installation?.id,
            cloudId: installation?.cloudId ?? UUID().uuidString.lowercased(),
            accountId: "557058:" + UUID().uuidString.lowercased(),
            serviceEntitlementNumber: "SEN-\(Int.random(in: 1_000_000...9_999_999))")
        self.connect.withLock { $0.remember(tenant) }
        return tenant
    }

    /// Every Connect tenant the emulator knows, in creation order.
    public var connectTenants: [EmulatedConnectTenant] {
        self.connect.withLock { $0.orderedTenants.map(\.tenant) }
    }

    /// The tenant with this `clientKey`, as the emulator currently knows it (current secret).
    public func connectTenant(clientKey: String) -> EmulatedConnectTenant? {
        self.connect.withLock { $0.tenants[clientKey]?.tenant }
    }

    /// Where the tenant stands.
    public func connectStatus(of tenant: EmulatedConnectTenant) -> EmulatedConnectTenantStatus? {
        self.connect.withLock { $0.tenants[tenant.clientKey]?.status }
    }

    /// Gives the tenant a new shared secret (as a product does on reinstall) and returns it; the
    /// gateway learns it from the next ``connectInstall(_:options:gatewayURL:)``.
    @discardableResult
    public func rotateSharedSecret(of tenant: EmulatedConnectTenant) -> EmulatedConnectTenant {
        self.connect.withLock { state in
            var current = state.tenants[tenant.clientKey]?.tenant ?? tenant
            current.sharedSecret = Self.newSharedSecret()
            if state.tenants[tenant.clientKey] == nil {
                state.remember(current)
            } else {
                state.tenants[tenant.clientKey]?.tenant = current
            }
            return current
        }
    }

    /// Signs installs with the published install key `kid` again (after a rotation); false when
    /// no key is published under it.
    @discardableResult
    public func signInstalls(withKid kid: String) -> Bool {
        self.connect.withLock { state in
            guard state.installKeys[kid] != nil else { return false }
            state.currentKid = kid
            return true
        }
    }

    /// Starts signing installs with a new install key under a new `kid` (the old keys stay
    /// published). Returns the new `kid`.
    /// - Throws: if key generation fails.
    @discardableResult
    public func rotateInstallKey() throws -> String {
        let key = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let kid = UUID().uuidString.lowercased()
        self.connect.withLock { state in
            state.installKeys[kid] = key
            state.currentKid = kid
        }
        return kid
    }

    /// The `kid` signed installs currently use.
    /// - Throws: if the first key cannot be generated.
    public func currentInstallKeyId() throws -> String {
        try self.currentInstallKey().kid
    }

    /// The PEM public key published under `kid`, as `GET /connect-install-keys/{kid}` serves it.
    public func installKeyPEM(kid: String) -> String? {
        self.connect.withLock { $0.installKeys[kid]?.publicKey.pemRepresentation }
    }

    /// How often the gateway fetched the install key `kid`.
    public func installKeyFetches(kid: String) -> Int {
        self.connect.withLock { $0.keyFetches[kid] ?? 0 }
    }

    /// Sends the `installed` callback with a signed install to `POST {gateway}/connect/installed`
    /// and returns the gateway's answer; on 2xx the tenant counts as installed.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    @discardableResult
    public func connectInstall(
        _ tenant: EmulatedConnectTenant, options: SignedInstallOptions = SignedInstallOptions(),
        gatewayURL: String? = nil
    ) async throws -> GatewayAnswer {
        try await self.sendConnectLifecycle(.installed, tenant: tenant, options: options, gatewayURL: gatewayURL)
    }

    /// Sends the `uninstalled` callback (signed install) to `POST {gateway}/connect/uninstalled`.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    @discardableResult
    public func connectUninstall(
        _ tenant: EmulatedConnectTenant, options: SignedInstallOptions = SignedInstallOptions(),
        gatewayURL: String? = nil
    ) async throws -> GatewayAnswer {
        try await self.sendConnectLifecycle(.uninstalled, tenant: tenant, options: options, gatewayURL: gatewayURL)
    }

    /// The lifecycle body the product sends (protocol.md §3), as JSON: the fields Atlassian
    /// documents, with `installationId` for a tenant linked to a Forge installation and no
    /// `cloudId` (Atlassian's example payload carries none).
    public func connectLifecyclePayload(_ event: ConnectLifecycleEvent, tenant: EmulatedConnectTenant) -> Data {
        let current = self.connectTenant(clientKey: tenant.clientKey) ?? tenant
        let payload = ConnectLifecyclePayload(
            key: current.appKey, clientKey: current.clientKey, sharedSecret: current.sharedSecret,
            serverVersion: "100248", pluginsVersion: "1001.0.0-SNAPSHOT", baseUrl: current.baseUrl,
            displayUrl: current.baseUrl, productType: current.productType,
            description: "Atlassian \(current.productType) at \(current.baseUrl)",
            serviceEntitlementNumber: current.serviceEntitlementNumber, eventType: event.rawValue,
            installationId: current.installationId, cloudId: nil)
        return (try? JSONEncoder.emulator.encode(payload)) ?? Data("{}".utf8)
    }

    /// A signed-install token for `POST <app base URL><path>` of `tenant`.
    /// - Throws: if signing fails.
    public func mintSignedInstall(
        for tenant: EmulatedConnectTenant, path: String, options: SignedInstallOptions = SignedInstallOptions()
    ) throws -> String {
        let (currentKid, key) = try self.currentInstallKey()
        let appBaseURL = self.connectAppBaseURL
        let basePath = URLComponents(string: appBaseURL)?.percentEncodedPath ?? ""
        let iat = Self.unixSeconds(options.issuedAt ?? Date())
        let exp = options.expiresAt.map(Self.unixSeconds) ?? iat + 180
        let audience = options.audience ?? [appBaseURL]
        var claims: [(String, JWTClaimValue)] = [
            ("iss", .string(options.issuer ?? tenant.clientKey)),
            // An account id, as in the lifecycle tokens Atlassian sends (never read by the gateway).
            ("sub", .string(tenant.accountId)),
            ("iat", .int(iat)),
            ("exp", .int(exp)),
            ("qsh", .string(options.qsh ?? ConnectCanonicalRequest.qsh(method: "POST", url: path, basePath: basePath))),
            ("context", .object([])),
        ]
        if let jti = options.jti { claims.append(("jti", .string(jti))) }
        claims.append(
            ("aud", options.audienceAsString ? .string(audience.first ?? "") : .array(audience.map { .string($0) })))
        let algorithmName: String
        switch options.algorithm {
        case .rs256: algorithmName = "RS256"
        case .none: algorithmName = "none"
        case .hs256WithPublicKey: algorithmName = "HS256"
        }
        let header = EmulatorJWTHeader(alg: algorithmName, kid: options.kid ?? currentKid, typ: "JWT")
        let input =
            Base64URL.encode(try JSONEncoder.emulator.encode(header)) + "."
            + Base64URL.encode(Data(JWTClaimValue.object(claims).json.utf8))
        let signature: Data
        switch options.algorithm {
        case .rs256:
            let signer = options.signWithUnpublishedKey ? try _RSA.Signing.PrivateKey(keySize: .bits2048) : key
            signature = try signer.signature(for: Data(input.utf8), padding: .insecurePKCS1v1_5).rawRepresentation
        case .none:
            signature = Data()
        case .hs256WithPublicKey:
            let secret = SymmetricKey(data: Data(key.publicKey.pemRepresentation.utf8))
            signature = Data(HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: secret))
        }
        return input + "." + Base64URL.encode(signature)
    }

    /// Mints the HS256 JWT the product puts on a request to the app: `iss` = `clientKey`, `sub` =
    /// the tenant's account, `iat`, `exp`, and the `qsh` of `method url` (`url` relative to the app
    /// base URL, or absolute). `options` make defective ones.
    public func mintConnectJWT(
        for tenant: EmulatedConnectTenant, method: String = "GET", url: String = "/",
        options: ConnectJWTOptions = ConnectJWTOptions()
    ) -> String {
        let current = self.connectTenant(clientKey: tenant.clientKey) ?? tenant
        let basePath = URLComponents(string: self.connectAppBaseURL)?.percentEncodedPath ?? ""
        let iat = Self.unixSeconds(options.issuedAt ?? Date())
        let exp = options.expiresAt.map(Self.unixSeconds) ?? iat + 180
        var claims: [(String, JWTClaimValue)] = [
            ("iss", .string(options.sessionToken ? current.appKey : current.clientKey)),
            ("sub", .string(options.accountId ?? current.accountId)),
            ("iat", .int(iat)),
            ("exp", .int(exp)),
        ]
        if options.sessionToken { claims.append(("aud", .array([.string(current.clientKey)]))) }
        let qsh: String?
        switch options.qsh {
        case .computed:
            qsh =
                options.sessionToken
                ? "context-qsh" : ConnectCanonicalRequest.qsh(method: method, url: url, basePath: basePath)
        case .context: qsh = "context-qsh"
        case .literal(let value): qsh = value
        case .absent: qsh = nil
        }
        if let qsh { claims.append(("qsh", .string(qsh))) }
        if let context = options.contextJSON { claims.append(("context", .raw(context))) }
        let header = #"{"alg":"\#(options.algorithmName)","typ":"JWT"}"#
        let input =
            Base64URL.encode(Data(header.utf8)) + "."
            + Base64URL.encode(Data(JWTClaimValue.object(claims).json.utf8))
        let secret = SymmetricKey(data: Data((options.secret ?? current.sharedSecret).utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: secret)
        return input + "." + Base64URL.encode(Data(mac))
    }

    // MARK: Internals

    static func newSharedSecret() -> String {
        Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) })
    }

    /// The current install key, generated on first use (outside the lock).
    func currentInstallKey() throws -> (kid: String, key: _RSA.Signing.PrivateKey) {
        let current = self.connect.withLock { state in
            state.currentKid.flatMap { kid in state.installKeys[kid].map { (kid, $0) } }
        }
        if let current { return current }
        let key = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let kid = UUID().uuidString.lowercased()
        return self.connect.withLock { state in
            if let existing = state.currentKid, let existingKey = state.installKeys[existing] {
                return (existing, existingKey)
            }
            state.installKeys[kid] = key
            state.currentKid = kid
            return (kid, key)
        }
    }

    private func sendConnectLifecycle(
        _ event: ConnectLifecycleEvent, tenant: EmulatedConnectTenant, options: SignedInstallOptions,
        gatewayURL: String?
    ) async throws -> GatewayAnswer {
        let path = "/connect/" + event.rawValue
        var body = self.connectLifecyclePayload(event, tenant: tenant)
        if let other = options.bodyClientKey,
            var object = try JSONSerialization.jsonObject(with: body) as? [String: Any]
        {
            object["clientKey"] = other
            body = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        }
        if let raw = options.rawBody { body = Data(raw.utf8) }
        var headers: [(String, String)] = []
        if !options.omitAuthorization {
            let token = try self.mintSignedInstall(for: tenant, path: path, options: options)
            headers.append(("authorization", options.scheme + " " + token))
        }
        let answer = try await self.callGateway(
            path: path, gatewayURL: gatewayURL, fit: nil, headers: headers, body: body)
        // Atlassian counts an install as done on 200 or 204 only (protocol.md §3).
        if answer.status == 200 || answer.status == 204 {
            self.connect.withLock { state in
                state.tenants[tenant.clientKey]?.status = event == .installed ? .installed : .uninstalled
            }
        }
        self.logger.info(
            "Connect lifecycle sent",
            metadata: [
                "connect.client_key": "\(tenant.clientKey)", "connect.event": "\(event.rawValue)",
                "http.status": "\(answer.status)",
            ])
        return answer
    }
}

/// The Connect lifecycle body (protocol.md §3).
struct ConnectLifecyclePayload: Codable, Sendable {
    var key: String
    var clientKey: String
    var sharedSecret: String
    var serverVersion: String
    var pluginsVersion: String
    var baseUrl: String
    var displayUrl: String
    var productType: String
    var description: String
    var serviceEntitlementNumber: String
    var eventType: String
    var installationId: String?
    var cloudId: String?
}

/// JWT claims written in a fixed order (so tests can build odd shapes, such as `aud` as a string).
enum JWTClaimValue: Sendable {
    case string(String)
    case int(Int)
    case array([JWTClaimValue])
    case object([(String, JWTClaimValue)])
    /// JSON text inserted as is.
    case raw(String)

    var json: String {
        switch self {
        case .string(let value):
            let data = (try? JSONEncoder.emulator.encode(value)) ?? Data("\"\"".utf8)
            return String(decoding: data, as: UTF8.self)
        case .int(let value): return String(value)
        case .array(let items): return "[" + items.map(\.json).joined(separator: ",") + "]"
        case .object(let fields):
            return "{" + fields.map { JWTClaimValue.string($0.0).json + ":" + $0.1.json }.joined(separator: ",") + "}"
        case .raw(let text): return text
        }
    }
}

// MARK: - Routes

/// A Connect tenant as the admin routes show it (never its secret).
struct ConnectTenantSummary: Codable, Sendable {
    var clientKey: String
    var appKey: String
    var baseUrl: String
    var productType: String
    var installationId: String?
    var accountId: String
    var status: EmulatedConnectTenantStatus
}

struct CreateConnectTenantRequest: Codable, Sendable {
    var product: String?
    /// A Forge installation (ARI or UUID) of this emulator to link.
    var installationId: String?
}

struct MintConnectJWTRequest: Codable, Sendable {
    var method: String?
    var url: String?
    var contextQsh: Bool?
}

struct ConnectLifecycleAnswer: Codable, Sendable {
    var tenant: ConnectTenantSummary
    var gatewayStatus: Int
    var gatewayBody: String
}

extension ForgeEmulator {
    /// The Connect side's routes.
    ///
    /// Atlassian's side:
    /// - `GET /connect-install-keys/{kid}` — the signed-install public key as PEM (404 when unknown).
    ///
    /// Admin routes (loopback clients only; never show a secret):
    /// - `GET /admin/connect/tenants` — every tenant with its status.
    /// - `POST /admin/connect/tenants` — body optional `{"product": "jira"|"confluence",
    ///   "installationId": "<installation of this emulator>"}`: makes a tenant and sends its signed
    ///   install; 201 `{"tenant", "gatewayStatus", "gatewayBody"}`.
    /// - `POST /admin/connect/tenants/{clientKey}/reinstall` — new shared secret, signed install again.
    /// - `POST /admin/connect/tenants/{clientKey}/uninstall` — sends the uninstalled callback.
    /// - `POST /admin/connect/tenants/{clientKey}/jwt` — body `{"method": "GET", "url": "/path?x=1",
    ///   "contextQsh": false}`: 200 `{"jwt": "…"}`, the JWT the product would put on that request.
    func addConnectRoutes(to router: Router<EmulatorRequestContext>) {
        router.get("/connect-install-keys/:kid") { _, context -> Response in
            let kid = try context.parameters.require("kid")
            let key = self.connect.withLock { state -> _RSA.Signing.PublicKey? in
                state.keyFetches[kid, default: 0] += 1
                return state.installKeys[kid]?.publicKey
            }
            guard let key else {
                return EmulatorAnswer.error(404, code: "not_found", message: "no install key under this kid").response
            }
            return Response(
                status: .ok, headers: [.contentType: "application/x-pem-file", .cacheControl: "public, max-age=86400"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: key.pemRepresentation)))
        }

        let admin = router.group("admin/connect").add(middleware: LoopbackOnlyMiddleware())

        admin.get("tenants") { _, _ -> Response in
            let records = self.connect.withLock { $0.orderedTenants }
            return EmulatorAnswer.json(200, records.map(Self.summary)).response
        }

        admin.post("tenants") { request, _ -> Response in
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            var create = CreateConnectTenantRequest()
            if body.readableBytes > 0 {
                guard let decoded = try? JSONDecoder().decode(CreateConnectTenantRequest.self, from: Data(buffer: body))
                else {
                    return EmulatorAnswer.error(
                        400, code: "invalid_request",
                        message: "body must be {\"product\": \"…\", \"installationId\": \"…\"}"
                    ).response
                }
                create = decoded
            }
            var linked: EmulatedInstallation?
            if let id = create.installationId {
                guard let installation = self.installation(withId: id) else {
                    return EmulatorAnswer.error(
                        404, code: "installation_not_found", message: "no such installation"
                    ).response
                }
                linked = installation
            }
            let tenant = self.makeConnectTenant(product: create.product ?? "jira", linkedTo: linked)
            return await self.lifecycleAnswer(201, tenant: tenant) { try await self.connectInstall(tenant) }
        }

        admin.post("tenants/:clientKey/reinstall") { _, context -> Response in
            guard let tenant = self.connectTenant(in: context) else { return Self.unknownTenant.response }
            let rotated = self.rotateSharedSecret(of: tenant)
            return await self.lifecycleAnswer(200, tenant: rotated) { try await self.connectInstall(rotated) }
        }

        admin.post("tenants/:clientKey/uninstall") { _, context -> Response in
            guard let tenant = self.connectTenant(in: context) else { return Self.unknownTenant.response }
            return await self.lifecycleAnswer(200, tenant: tenant) { try await self.connectUninstall(tenant) }
        }

        admin.post("tenants/:clientKey/jwt") { request, context -> Response in
            guard let tenant = self.connectTenant(in: context) else { return Self.unknownTenant.response }
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            var mint = MintConnectJWTRequest()
            if body.readableBytes > 0 {
                guard let decoded = try? JSONDecoder().decode(MintConnectJWTRequest.self, from: Data(buffer: body))
                else {
                    return EmulatorAnswer.error(
                        400, code: "invalid_request", message: "body must be {\"method\": \"GET\", \"url\": \"/path\"}"
                    ).response
                }
                mint = decoded
            }
            var options = ConnectJWTOptions()
            if mint.contextQsh == true { options.qsh = .context }
            let jwt = self.mintConnectJWT(
                for: tenant, method: mint.method ?? "GET", url: mint.url ?? "/", options: options)
            return EmulatorAnswer.json(200, ["jwt": jwt]).response
        }
    }

    private static var unknownTenant: EmulatorAnswer {
        .error(404, code: "tenant_not_found", message: "no such Connect tenant")
    }

    private func connectTenant(in context: EmulatorRequestContext) -> EmulatedConnectTenant? {
        guard let raw = context.parameters.get("clientKey") else { return nil }
        return self.connectTenant(clientKey: raw.removingPercentEncoding ?? raw)
    }

    private func lifecycleAnswer(
        _ status: Int, tenant: EmulatedConnectTenant, send: () async throws -> GatewayAnswer
    ) async -> Response {
        do {
            let answer = try await send()
            let record = self.connect.withLock { $0.tenants[tenant.clientKey] }
            let summary =
                record.map(Self.summary)
                ?? Self.summary(ConnectEmulatorState.TenantRecord(tenant: tenant, status: .created, sequence: 0))
            return EmulatorAnswer.json(
                answer.isSuccess ? status : 502,
                ConnectLifecycleAnswer(tenant: summary, gatewayStatus: answer.status, gatewayBody: answer.body)
            ).response
        } catch {
            return EmulatorAnswer.error(502, code: "lifecycle_failed", message: "\(error)").response
        }
    }

    private static func summary(_ record: ConnectEmulatorState.TenantRecord) -> ConnectTenantSummary {
        ConnectTenantSummary(
            clientKey: record.tenant.clientKey, appKey: record.tenant.appKey, baseUrl: record.tenant.baseUrl,
            productType: record.tenant.productType, installationId: record.tenant.installationId,
            accountId: record.tenant.accountId, status: record.status)
    }
}
