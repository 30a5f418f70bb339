import FlowEngine
import Foundation
import Hummingbird

extension Gateway {
    func addCallerRoutes(to router: Router<BasicRequestContext>) {
        router.get("/v1/installations/:id/token") { request, context in
            try await self.tokenRoute(request, context: context, force: false)
        }
        router.post("/v1/installations/:id/token/refresh") { request, context in
            try await self.tokenRoute(request, context: context, force: true)
        }
        router.get("/v1/installations/:id") { request, context in
            let caller = try self.authenticateCaller(request)
            let id = try self.installationParameter(context, caller: caller)
            let record: InstallationRecord?
            do {
                record = try await self.store.installation(id)
            } catch {
                throw GatewayError.storeUnavailable
            }
            guard let record else { throw GatewayError(FlowError.installationNotFound) }
            return Self.json(Self.metadata(record))
        }
        router.get("/v1/installations") { request, context in
            let caller = try self.authenticateCaller(request)
            let query = try CallerQuery(request.uri.queryParameters, once: ["limit", "cursor"])
            var limit = 100
            if let raw = query.get("limit") {
                guard let v = Int(raw), (1...1000).contains(v) else {
                    throw GatewayError.invalidParameter("limit must be an integer in 1…1000")
                }
                limit = v
            }
            var after: String? = nil
            if let raw = query.get("cursor"), !raw.isEmpty {
                guard let bytes = Base64URL.decode(raw), let text = String(validating: bytes, as: UTF8.self),
                    let id = InstallationID(text), id.ari == text
                else { throw GatewayError.invalidParameter("cursor is malformed") }
                after = id.ari
            }
            let page: (records: [InstallationRecord], next: String?)
            do {
                if let scope = caller.installations.values {
                    // A narrow scope pages through its own ids: the cost follows the scope, not the index.
                    page = try await self.store.listInstallations(
                        among: scope.compactMap { InstallationID($0) }, after: after, limit: limit)
                } else {
                    page = try await self.store.listInstallations(after: after, limit: limit) {
                        caller.installations.contains($0.ari)
                    }
                }
            } catch {
                throw GatewayError.storeUnavailable
            }
            return Self.json(
                .object([
                    ("installations", .array(page.records.map(Self.metadata))),
                    ("nextCursor", page.next.map { .string(Base64URL.encode(Array($0.utf8))) } ?? .null),
                ]))
        }
    }

    /// The authenticated caller, or 401.
    func authenticateCaller(_ request: Request) throws -> Caller {
        guard let caller = self.configuration.callers.authenticate(authorization: request.headers[.authorization])
        else {
            throw GatewayError.unauthenticated
        }
        return caller
    }

    /// The `{id}` path segment as an installation the caller may read: 400 when malformed, 403
    /// when outside the caller's set (whether or not it exists).
    func installationParameter(_ context: BasicRequestContext, caller: Caller) throws -> InstallationID {
        guard let raw = context.parameters.get("id"), let id = InstallationID(pathSegment: raw) else {
            throw GatewayError.invalidParameter("installation id must be an installation ARI or its id")
        }
        guard caller.installations.contains(id.ari) else { throw GatewayError.forbidden }
        return id
    }

    func tokenRoute(_ request: Request, context: BasicRequestContext, force: Bool) async throws -> Response {
        let caller = try self.authenticateCaller(request)
        let id = try self.installationParameter(context, caller: caller)
        // One value each: a proxy in front that reads another copy of a repeated `asUser` (or that
        // decodes `as%55ser`, which the gateway reads as `asUser` too) would judge one account
        // while another's token is served.
        let query = try CallerQuery(request.uri.queryParameters, once: ["minValidity", "timeout", "asUser"])
        var options = TokenFlow.Request(
            minValidity: TokenRequestDefaults.minValidity, timeout: TokenRequestDefaults.timeout, forceRefresh: force)
        if let raw = query.get("minValidity") {
            guard let v = Int64(raw), TokenRequestDefaults.minValidityRange.contains(v) else {
                throw GatewayError.invalidParameter("minValidity must be an integer number of seconds in 0…7200")
            }
            options.minValidity = v
        }
        if let raw = query.get("timeout") {
            guard let v = Int64(raw), TokenRequestDefaults.timeoutMillisecondsRange.contains(v) else {
                throw GatewayError.invalidParameter("timeout must be an integer number of milliseconds in 100…30000")
            }
            options.timeout = .milliseconds(v)
        }
        if let asUser = query.get("asUser") {
            return try await self.userTokenRoute(
                caller: caller, installation: id, asUser: asUser, options: options, logger: context.logger)
        }
        // Per-caller limits (contract §2): a forced refresh starts a round trip, so it counts; one
        // refused for an installation unknown or uninstalled starts none and changes nothing.
        if force {
            try await self.requireInstalled(id)
            if let wait = try await self.callerAllowance(
                caller, refresh: true, userExchange: false, logger: context.logger)
            {
                throw Self.callerRateLimited(retryAfter: wait)
            }
        }
        let answer: TokenAnswer
        do {
            answer = try await self.flow.token(for: id, request: options)
        } catch {
            throw GatewayError(error)
        }
        let body = self.handOut(answer, caller: caller, installation: id)
        return Response(status: .ok, headers: TokenAnswerBodies.headers, body: .init(byteBuffer: body))
    }

    /// 404 `installation_not_found` or 410 `installation_uninstalled` unless the installation is active.
    private func requireInstalled(_ id: InstallationID) async throws(GatewayError) {
        let status: InstallationStatus?
        do {
            status = try await self.store.installationStatus(id)
        } catch {
            throw GatewayError.storeUnavailable
        }
        switch status {
        case nil: throw GatewayError(FlowError.installationNotFound)
        case .uninstalled: throw GatewayError(FlowError.installationUninstalled)
        case .active: return
        }
    }

    static func metadata(_ r: InstallationRecord) -> JSONValue {
        .object([
            ("installationId", .string(r.id.ari)),
            ("appId", .optional(r.appId)),
            ("cloudId", .optional(r.cloudId)),
            ("apiBaseUrl", .optional(r.apiBaseUrl)),
            ("status", .string(r.status.rawValue)),
            ("triggerRegistered", .bool(r.triggerRegistered)),
            ("tokenExpiresAt", r.tokenExpiresAt.map { .string(RFC3339.string(unixSeconds: $0)) } ?? .null),
            ("lastTokenAt", r.lastTokenAt.map { .string(RFC3339.string(unixSeconds: $0)) } ?? .null),
            ("triggerKeyId", .optional(r.triggerKeyId)),
            ("createdAt", .string(RFC3339.string(unixSeconds: r.createdAt))),
            ("updatedAt", .string(RFC3339.string(unixSeconds: r.updatedAt))),
        ])
    }
}

/// A caller route's query, its parameter names percent-decoded as their values are (Hummingbird
/// decodes values only), so `as%55ser` is `asUser`, as any proxy in front reads it.
struct CallerQuery {
    private let pairs: [(name: String, value: String)]

    /// - Throws: 400 `invalid_parameter` when one of `once` is given more than once.
    init<Query: Collection>(_ query: Query, once names: [String]) throws
    where Query.Element == (key: Substring, value: Substring) {
        self.pairs = query.map { (String($0.key).removingPercentEncoding ?? String($0.key), String($0.value)) }
        for name in names where self.pairs.lazy.filter({ $0.name == name }).count > 1 {
            throw GatewayError.invalidParameter("\(name) is given more than once")
        }
    }

    /// The value of the first parameter named `name`.
    func get(_ name: String) -> String? {
        self.pairs.first { $0.name == name }?.value
    }
}
