import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// The request context of the emulator's routes: Hummingbird's core context plus the peer address,
/// so the admin routes can refuse non-loopback clients.
struct EmulatorRequestContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let remoteAddress: SocketAddress?

    init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
    }

    /// Whether the peer is on the loopback interface (or a Unix socket).
    var isFromLoopback: Bool {
        guard let remoteAddress else { return false }
        if case .unixDomainSocket = remoteAddress { return true }
        guard let ip = remoteAddress.ipAddress else { return false }
        return ip.hasPrefix("127.") || ip == "::1" || ip.hasPrefix("::ffff:127.")
    }
}

/// Answers 403 to any client that is not on the loopback interface.
struct LoopbackOnlyMiddleware: RouterMiddleware {
    typealias Context = EmulatorRequestContext

    func handle(
        _ request: Request,
        context: Context,
        next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        guard context.isFromLoopback else {
            return EmulatorAnswer.error(403, code: "forbidden", message: "admin routes answer loopback clients only")
                .response
        }
        return try await next(request, context)
    }
}

extension EmulatorAnswer {
    var response: Response {
        // 1xx, 204 and 304 answers carry no body.
        if self.status < 200 || self.status == 204 || self.status == 304 {
            return Response(status: HTTPResponse.Status(code: self.status), headers: [.cacheControl: "no-store"])
        }
        return Response(
            status: HTTPResponse.Status(code: self.status),
            headers: [.contentType: "application/json", .cacheControl: "no-store"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: self.body))
        )
    }
}

/// An installation as the admin routes show it (never a token or a key).
struct InstallationSummary: Codable, Sendable {
    var id: String
    var cloudId: String
    var product: String
    var apiBaseUrl: String
    var siteARI: String
    var triggerPath: String
    var triggerUrl: String
    var status: EmulatedInstallationStatus
    var triggerKeyId: String?
    var triggerCalls: Int
    var fault: TriggerFault
}

struct CreateInstallationRequest: Codable, Sendable {
    var product: String?
}

struct PushRequest: Codable, Sendable {
    /// Seconds from now until the pushed token's `exp`; default the configured token lifetime.
    var expiresInSeconds: Int?
    /// Pad the pushed token to about this many bytes (at most 16 KiB), as real tokens carry more
    /// claims than the emulator's; default no padding.
    var tokenBytes: Int?
}

struct PushAnswer: Codable, Sendable {
    /// The gateway's status.
    var status: Int
    /// The gateway's answer body.
    var body: String
}

struct StatsAnswer: Codable, Sendable {
    var totalTriggerCalls: Int
    var installations: [String: Int]
    /// Per installation, the emulator's own time on its answered trigger calls in milliseconds,
    /// summed: arrival to answer less the wait for the gateway's answers to the deliveries
    /// (``TriggerRecord/ownDuration``).
    var triggerProcessingMillis: [String: Double]
}

extension ForgeEmulator {
    /// Largest request body the emulator reads.
    static let maximumRequestBytes = 64 * 1024
    /// Largest `tokenBytes` a push may ask for.
    static let maximumPaddedTokenBytes = 16 * 1024

    /// The emulator's routes.
    ///
    /// Forge's side:
    /// - `GET /.well-known/jwks.json` — the JWKS with the FIT signing key (RS256, `kid`, `use: sig`).
    /// - `POST /x1/{triggerId}` — an installation's web trigger (see ``TriggerFault`` for faults).
    ///
    /// Admin routes, for `token-gateway emulate` driven by hand with curl. They need no
    /// authentication and answer loopback clients only (403 otherwise); they never show a token:
    /// - `GET /admin/installations` — every installation with its status, trigger URL and calls.
    /// - `POST /admin/installations` — body optional `{"product": "jira"}`: makes and installs one
    ///   (with a system token on the lifecycle event and the registration unless the emulator runs
    ///   with ``ForgeEmulatorConfiguration/endpointsCarrySystemToken`` off, `--no-install-tokens`);
    ///   201 with it, or 502 when the gateway refused (the installation is kept as `created`).
    /// - `POST /admin/installations/{id}/push` — body optional `{"expiresInSeconds": 7200, "tokenBytes": 1500}`:
    ///   pushes a fresh token (padded to about `tokenBytes`); 200 `{"status": <gateway status>, "body": "<gateway body>"}`.
    /// - `POST /admin/installations/{id}/upgrade` — sends `avi:forge:upgraded:app`, then registers
    ///   the web trigger again as the companion's install handler does (both with a system token,
    ///   as on install); 200 with it, 502 when the gateway refused.
    /// - `POST /admin/installations/{id}/uninstall` — invokes the `preUninstall` module
    ///   (`POST {gateway}/forge/pre-uninstall`); 200 with it.
    /// - `POST /admin/installations/{id}/ui-invoke` — body `{"path": "/forge/register", "body": {…},
    ///   "moduleType": "xen:macro", "systemToken": true}`: calls the gateway as a UI module from a
    ///   user's browser would (a FIT with that module type, `principal` and `context`; with
    ///   `systemToken`, a made-up token header); 200 `{"status": <gateway status>, "body": "<gateway body>"}`.
    /// - `POST /admin/installations/{id}/fault` — body a ``TriggerFault`` in JSON; 200 with it.
    /// - `GET /admin/stats` — `{"totalTriggerCalls": n, "installations": {"<id>": n},
    ///   "triggerProcessingMillis": {"<id>": ms}}` (the emulator's own time on the trigger calls).
    ///
    /// `{id}` is the installation's UUID or its full ARI (percent-encoded).
    func makeRouter() -> Router<EmulatorRequestContext> {
        let router = Router(context: EmulatorRequestContext.self)

        router.get("/.well-known/jwks.json") { _, _ -> Response in
            Response(
                status: .ok,
                headers: [.contentType: "application/json", .cacheControl: "public, max-age=300"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: self.keys.jwksDocument))
            )
        }

        router.post("/x1/:triggerId") { request, context -> Response in
            let triggerId = try context.parameters.require("triggerId")
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            let signatureHeader = request.headers[.emulatorTriggerSignature]
            return await self.answerTrigger(
                triggerId: triggerId,
                signatureHeader: signatureHeader,
                body: Data(buffer: body)
            ).response
        }

        self.addAdminRoutes(to: router)
        self.addConnectRoutes(to: router)
        self.addGraphQLRoutes(to: router)
        self.addNamedTriggerRoutes(to: router)
        return router
    }

    /// An admin route that runs a lifecycle step on the named installation: 404 for an unknown
    /// one, 502 `failureCode` when the gateway refused, else 200 with the installation.
    private func adminLifecycle(
        _ context: EmulatorRequestContext, failureCode: String,
        _ step: (EmulatedInstallation) async throws -> Void
    ) async -> Response {
        guard let installation = self.installation(in: context) else { return Self.unknownInstallation.response }
        do {
            try await step(installation)
        } catch {
            return EmulatorAnswer.error(502, code: failureCode, message: "\(error)").response
        }
        return EmulatorAnswer.json(200, self.summary(of: installation)).response
    }

    /// The admin routes of ``makeRouter()``'s list, loopback clients only.
    private func addAdminRoutes(to router: Router<EmulatorRequestContext>) {
        let admin = router.group("admin").add(middleware: LoopbackOnlyMiddleware())

        admin.get("installations") { _, _ -> Response in
            EmulatorAnswer.json(200, self.summaries()).response
        }

        admin.post("installations") { request, _ -> Response in
            try await self.adminCreateInstallation(request)
        }

        admin.post("installations/:id/push") { request, context -> Response in
            try await self.adminPush(request, context: context)
        }

        admin.post("installations/:id/upgrade") { _, context -> Response in
            await self.adminLifecycle(context, failureCode: "upgrade_failed") { try await self.upgrade($0) }
        }

        admin.post("installations/:id/uninstall") { _, context -> Response in
            await self.adminLifecycle(context, failureCode: "uninstall_failed") { try await self.uninstall($0) }
        }

        admin.post("installations/:id/ui-invoke") { request, context -> Response in
            try await self.adminUIInvoke(request, context: context)
        }

        admin.post("installations/:id/fault") { request, context -> Response in
            guard let installation = self.installation(in: context) else { return Self.unknownInstallation.response }
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            guard let fault = try? JSONDecoder().decode(TriggerFault.self, from: Data(buffer: body)) else {
                return EmulatorAnswer.error(
                    400, code: "invalid_request", message: "body must be a fault, such as {\"type\": \"none\"}"
                ).response
            }
            self.setFault(fault, for: installation)
            return EmulatorAnswer.json(200, self.summary(of: installation)).response
        }

        admin.get("stats") { _, _ -> Response in
            self.adminStats()
        }
    }

    /// `POST /admin/installations`: creates and installs an installation.
    private func adminCreateInstallation(_ request: Request) async throws -> Response {
        let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
        let create: CreateInstallationRequest
        if body.readableBytes == 0 {
            create = CreateInstallationRequest(product: nil)
        } else if let decoded = try? JSONDecoder().decode(CreateInstallationRequest.self, from: Data(buffer: body)) {
            create = decoded
        } else {
            return EmulatorAnswer.error(400, code: "invalid_request", message: "body must be {\"product\": \"…\"}")
                .response
        }
        let installation = self.makeInstallation(product: create.product ?? "jira")
        do {
            try await self.install(installation)
        } catch {
            return EmulatorAnswer.error(502, code: "install_failed", message: "\(error)").response
        }
        return EmulatorAnswer.json(201, self.summary(of: installation)).response
    }

    /// `POST /admin/installations/{id}/push`: pushes a token (optionally padded) to the gateway.
    private func adminPush(_ request: Request, context: EmulatorRequestContext) async throws -> Response {
        guard let installation = self.installation(in: context) else { return Self.unknownInstallation.response }
        let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
        var expiresAt: Date?
        var tokenBytes = 0
        if body.readableBytes > 0 {
            guard let push = try? JSONDecoder().decode(PushRequest.self, from: Data(buffer: body)),
                (0...Self.maximumPaddedTokenBytes).contains(push.tokenBytes ?? 0)
            else {
                return EmulatorAnswer.error(
                    400, code: "invalid_request",
                    message: "body must be {\"expiresInSeconds\": n, \"tokenBytes\": n ≤ 16384}"
                ).response
            }
            expiresAt = push.expiresInSeconds.map { Date().addingTimeInterval(TimeInterval($0)) }
            tokenBytes = push.tokenBytes ?? 0
        }
        do {
            let result =
                tokenBytes > 0
                ? try await self.deliver(
                    installation,
                    systemToken: try self.mintAccessToken(
                        for: installation, expiresAt: expiresAt, minimumLength: tokenBytes),
                    requestId: nil)
                : try await self.push(installation, expiresAt: expiresAt)
            return EmulatorAnswer.json(200, PushAnswer(status: result.status, body: result.body)).response
        } catch {
            return EmulatorAnswer.error(502, code: "push_failed", message: "\(error)").response
        }
    }

    /// `POST /admin/installations/{id}/ui-invoke`: calls the gateway as a UI module would.
    private func adminUIInvoke(_ request: Request, context: EmulatorRequestContext) async throws -> Response {
        guard let installation = self.installation(in: context) else { return Self.unknownInstallation.response }
        let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
        guard let call = try? JSONDecoder().decode(UIInvocationRequest.self, from: Data(buffer: body)),
            call.path.hasPrefix("/"), !call.path.contains("://")
        else {
            return EmulatorAnswer.error(
                400, code: "invalid_request",
                message:
                    "body must be {\"path\": \"/forge/…\", \"body\": {…}, \"moduleType\": \"xen:macro\", \"systemToken\": true}"
            ).response
        }
        do {
            let payload = try JSONEncoder.emulator.encode(call.body ?? [:])
            let token = call.systemToken == true ? try self.mintAccessToken(for: installation) : nil
            let answer = try await self.invokeFromUI(
                installation, path: call.path, body: payload, fit: .ui(moduleType: call.moduleType ?? "xen:macro"),
                systemToken: token)
            return EmulatorAnswer.json(200, PushAnswer(status: answer.status, body: answer.body)).response
        } catch {
            return EmulatorAnswer.error(502, code: "ui_invoke_failed", message: "\(error)").response
        }
    }

    /// `GET /admin/stats`: trigger calls and the emulator's own time on them.
    private func adminStats() -> Response {
        let stats = self.state.withLock { state in
            StatsAnswer(
                totalTriggerCalls: state.totalTriggerCalls,
                installations: Dictionary(
                    state.orderedRecords.map { ($0.installation.id, $0.triggerRecords.count) },
                    uniquingKeysWith: { first, _ in first }
                ),
                triggerProcessingMillis: Dictionary(
                    state.orderedRecords.map { record in
                        let own = record.triggerRecords.compactMap(\.ownDuration).reduce(Duration.zero, +)
                        return (
                            record.installation.id,
                            Double(own.components.seconds) * 1000
                                + Double(own.components.attoseconds) / 1e15
                        )
                    },
                    uniquingKeysWith: { first, _ in first }
                )
            )
        }
        return EmulatorAnswer.json(200, stats).response
    }

    private static var unknownInstallation: EmulatorAnswer {
        .error(404, code: "installation_not_found", message: "no such installation")
    }

    private func installation(in context: EmulatorRequestContext) -> EmulatedInstallation? {
        guard let raw = context.parameters.get("id") else { return nil }
        return self.installation(withId: raw.removingPercentEncoding ?? raw)
    }

    private func summaries() -> [InstallationSummary] {
        self.state.withLock { $0.orderedRecords }.map(self.summary(of:))
    }

    private func summary(of installation: EmulatedInstallation) -> InstallationSummary {
        let record =
            self.state.withLock { $0.record(for: installation) }
            ?? EmulatedInstallationRecord(
                installation: installation, sequence: 0, triggerPath: installation.triggerPath)
        return self.summary(of: record)
    }

    private func summary(of record: EmulatedInstallationRecord) -> InstallationSummary {
        InstallationSummary(
            id: record.installation.id,
            cloudId: record.installation.cloudId,
            product: record.installation.product,
            apiBaseUrl: record.installation.apiBaseUrl,
            siteARI: record.installation.siteARI,
            triggerPath: record.triggerPath,
            triggerUrl: self.triggerURL(for: record.installation),
            status: record.status,
            triggerKeyId: record.triggerKey?.keyId,
            triggerCalls: record.triggerRecords.count,
            fault: record.fault
        )
    }
}
