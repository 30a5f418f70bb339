import FlowEngine
import Hummingbird

extension Gateway {
    /// The operator routes: `GET /v1/status` and `GET /v1/installations/{id}/history` (JSON, Bearer),
    /// `GET /status` and `GET /status/installations/{id}` (HTML, HTTP Basic `name:secret`). Only
    /// callers flagged `"operator": true` get an answer; they see the installations in their set.
    /// Registrable on any router, so another listener can serve them too.
    public func addStatusRoutes<Context: RequestContext>(to router: Router<Context>) {
        router.get("/v1/status") { request, _ in
            let caller = try self.authenticateOperator(request, basic: false)
            let report = try await self.statusReport(for: caller)
            return Self.json(report.json, noStore: true)
        }
        router.get("/v1/installations/:id/history") { request, context in
            let caller = try self.authenticateOperator(request, basic: false)
            let id = try self.statusInstallationParameter(context.parameters.get("id"), caller: caller)
            let (row, history) = try await self.installationStatus(id)
            let now = FlowTime.now()
            return Self.json(
                .object([
                    ("installationId", .string(id.ari)),
                    ("installation", StatusReport.installationStateJSON(row, now: now)),
                    ("roundTrips", .array(history.map(StatusReport.roundTripJSON))),
                ]), noStore: true)
        }
        router.get("/status") { request, _ in
            let caller = try self.authenticateOperator(request, basic: true)
            let query = request.uri.queryParameters
            var filter = StatusPage.Filter.all
            if let raw = query.get("state"), !raw.isEmpty {
                guard let f = StatusPage.Filter(rawValue: raw) else {
                    throw GatewayError.invalidParameter(
                        "state must be one of " + StatusPage.Filter.allCases.map(\.rawValue).joined(separator: ", "))
                }
                filter = f
            }
            var page = 1
            if let raw = query.get("page"), !raw.isEmpty {
                guard let p = Int(raw), (1...100_000).contains(p) else {
                    throw GatewayError.invalidParameter("page must be an integer in 1…100000")
                }
                page = p
            }
            let text = String((query.get("q") ?? "").prefix(200))
            let report = try await self.statusReport(for: caller)
            return StatusPage.response(StatusPage.overview(report, filter: filter, text: text, page: page))
        }
        router.get("/status/installations/:id") { request, context in
            let caller = try self.authenticateOperator(request, basic: true)
            let id = try self.statusInstallationParameter(context.parameters.get("id"), caller: caller)
            let (row, history) = try await self.installationStatus(id)
            return StatusPage.response(StatusPage.installation(row, history: history, now: FlowTime.now()))
        }
    }

    /// 401 for no or an unknown credential (with a Basic challenge for the HTML pages), 403 for a
    /// caller that is not an operator.
    func authenticateOperator(_ request: Request, basic: Bool) throws -> Caller {
        let header = request.headers[.authorization]
        let registry = self.configuration.callers
        let caller =
            basic
            ? registry.authenticate(basicAuthorization: header) ?? registry.authenticate(authorization: header)
            : registry.authenticate(authorization: header)
        guard let caller else {
            if basic {
                throw GatewayError(
                    status: .unauthorized, code: "unauthenticated",
                    message: "an operator's name and secret are required",
                    extraHeaders: ["WWW-Authenticate": "Basic realm=\"token-gateway\""])
            }
            throw GatewayError.unauthenticated
        }
        guard caller.isOperator else {
            throw GatewayError(status: .forbidden, code: "forbidden", message: "only operators may read the status")
        }
        return caller
    }

    func statusInstallationParameter(_ raw: String?, caller: Caller) throws -> InstallationID {
        guard let raw, let id = InstallationID(pathSegment: raw) else {
            throw GatewayError.invalidParameter("installation id must be an installation ARI or its id")
        }
        guard caller.installations.contains(id.ari) else { throw GatewayError.forbidden }
        return id
    }

    func statusReport(for caller: Caller) async throws -> StatusReport {
        do {
            return try await StatusReport.collect(gateway: self, scope: caller.installations)
        } catch {
            throw GatewayError.storeUnavailable
        }
    }

    /// One installation's row and its round-trip history; 404 when it was never seen.
    func installationStatus(_ id: InstallationID) async throws -> (StatusReport.Row, [RoundTripRecord]) {
        let record: InstallationRecord?
        let health: [InstallationHealth]
        let history: [RoundTripRecord]
        do {
            record = try await self.store.installation(id)
            health = try await self.store.installationHealth([id])
            history = try await self.store.roundTripHistory(id)
        } catch {
            throw GatewayError.storeUnavailable
        }
        guard let record, let h = health.first else { throw GatewayError(FlowError.installationNotFound) }
        let (rank, reason) = StatusReport.attention(record, h, now: FlowTime.now())
        return (StatusReport.Row(record: record, health: h, attentionRank: rank, attentionReason: reason), history)
    }
}
