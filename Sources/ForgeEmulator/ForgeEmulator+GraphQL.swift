import Base64URLCoding
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// How the emulated GraphQL gateway misbehaves. Set with ``ForgeEmulator/setGraphQLFault(_:)``.
///
/// In JSON (the admin route `POST /admin/graphql/fault`): `{"type": "none"}`,
/// `{"type": "failWith", "status": 503, "times": 2}`, `{"type": "respondSlowly", "delayMs": 3000}`,
/// `{"type": "rejectSystemToken", "times": 1}`.
public enum GraphQLFault: Sendable, Hashable {
    /// Behave normally.
    case none
    /// Answer HTTP `status` (with a GraphQL error body) the next `times` calls, then behave normally.
    case failWith(status: Int, times: Int)
    /// Wait, then behave normally.
    case respondSlowly(Duration)
    /// Answer 401 the next `times` calls, as for an expired or revoked system token.
    case rejectSystemToken(times: Int)
}

extension GraphQLFault: Codable {
    private enum CodingKeys: String, CodingKey {
        case type, status, times, delayMs
    }

    private enum Kind: String, Codable {
        case none, failWith, respondSlowly, rejectSystemToken
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        switch try container.decode(Kind.self, forKey: .type) {
        case .none:
            self = .none
        case .failWith:
            let status = try container.decode(Int.self, forKey: .status)
            guard (100...599).contains(status) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .status, in: container, debugDescription: "not an HTTP status")
            }
            self = .failWith(status: status, times: try Self.decodeTimes(container))
        case .respondSlowly:
            let milliseconds = try container.decode(Int64.self, forKey: .delayMs)
            guard milliseconds >= 0 else {
                throw DecodingError.dataCorruptedError(forKey: .delayMs, in: container, debugDescription: "negative")
            }
            self = .respondSlowly(.milliseconds(milliseconds))
        case .rejectSystemToken:
            self = .rejectSystemToken(times: try Self.decodeTimes(container))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .none:
            try container.encode(Kind.none, forKey: .type)
        case .failWith(let status, let times):
            try container.encode(Kind.failWith, forKey: .type)
            try container.encode(status, forKey: .status)
            try container.encode(times, forKey: .times)
        case .respondSlowly(let delay):
            try container.encode(Kind.respondSlowly, forKey: .type)
            try container.encode(
                delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000, forKey: .delayMs
            )
        case .rejectSystemToken(let times):
            try container.encode(Kind.rejectSystemToken, forKey: .type)
            try container.encode(times, forKey: .times)
        }
    }

    private static func decodeTimes(_ container: KeyedDecodingContainer<CodingKeys>) throws -> Int {
        let times = try container.decodeIfPresent(Int.self, forKey: .times) ?? 1
        guard times >= 0 else {
            throw DecodingError.dataCorruptedError(forKey: .times, in: container, debugDescription: "negative")
        }
        return times
    }
}

/// One call the gateway made to the emulated GraphQL endpoint.
public struct UserTokenExchangeRecord: Sendable, Hashable {
    /// When the call arrived.
    public let receivedAt: Date
    /// The installation whose site the call's `contextIds` named, if any.
    public let installationId: String?
    /// The `userId` asked for, if the body parsed.
    public let accountId: String?
    /// The `contextIds` sent.
    public let contextIds: [String]
    /// The HTTP status answered.
    public let status: Int
    /// `token`, `refused`, `unauthorized`, `rate_limited`, `failed` or `invalid`.
    public let outcome: String
}

/// The emulated GraphQL gateway's state, in its own `Mutex`.
struct EmulatorGraphQLState: Sendable {
    var fault: GraphQLFault = .none
    /// Answers left for `.failWith` / `.rejectSystemToken`.
    var remaining = 0
    var refusedAccounts: Set<String> = []
    var userTokenLifetime: Duration = .seconds(3600)
    var opaqueUserTokens = false
    /// The rate limit (calls per minute); nil for none. Atlassian's: 1,000 a minute per app.
    var rateLimitPerMinute: Int? = 1000
    /// Arrival times of the calls of the last minute, for the rate limit.
    var recentCalls: [Date] = []
    var records: [UserTokenExchangeRecord] = []
    /// (installation, account) → the last user token handed out.
    var lastTokens: [String: String] = [:]

    /// Consumes one answer of a counted fault: the status to answer instead, or nil to go on.
    mutating func takeFault() -> Int? {
        switch self.fault {
        case .failWith(let status, _) where self.remaining > 0:
            self.remaining -= 1
            return status
        case .rejectSystemToken where self.remaining > 0:
            self.remaining -= 1
            return 401
        default:
            return nil
        }
    }

    /// Counts a call against the rate limit: nil when admitted, else the seconds until a slot frees.
    mutating func admit(at now: Date) -> Int? {
        guard let limit = self.rateLimitPerMinute else { return nil }
        self.recentCalls.removeAll { now.timeIntervalSince($0) >= 60 }
        if self.recentCalls.count >= limit, let oldest = self.recentCalls.first {
            return max(1, Int((60 - now.timeIntervalSince(oldest)).rounded(.up)))
        }
        self.recentCalls.append(now)
        return nil
    }
}

/// The GraphQL request body the emulator understands (variables form).
struct GraphQLRequestBody: Decodable {
    struct Variables: Decodable {
        struct Input: Decodable {
            var contextIds: [String]
            var userId: String
        }

        var input: Input
    }

    var query: String
    var variables: Variables?
}

/// The claims the emulator reads from a system token it minted.
private struct SystemTokenClaims: Decodable {
    var exp: Int
    var installationId: String?
}

/// The claims of a user token the emulator mints.
struct UserTokenClaims: Codable, Sendable {
    var iss: String
    var sub: String
    var aud: String
    var iat: Int
    var exp: Int
    var jti: String
    var installationId: String
    var context: String
}

extension ForgeEmulator {
    /// Serves Atlassian's GraphQL gateway for the `offlineUserAuthToken` mutation (offline user
    /// impersonation), with its admin routes:
    /// - `POST /graphql` — `Authorization: Bearer <system token minted by this emulator>`, body
    ///   `{"query": "mutation … offlineUserAuthToken(input: $input) …", "variables": {"input":
    ///   {"contextIds": ["ari:cloud:<product>::site/<cloudId>"], "userId": "<accountId>"}}}`.
    ///   Answers `{"data": {"offlineUserAuthToken": {"success": true, "errors": [], "authToken":
    ///   {"token": "…", "ttl": 3600}}}}`; `success: false` with an error message for a refused
    ///   user, an unknown or uninstalled site, or a system token of another installation; 401 for
    ///   a missing, forged or expired system token; 429 with `Retry-After` past its own rate limit;
    ///   and whatever ``GraphQLFault`` is set.
    /// - `POST /admin/graphql/fault` — body a ``GraphQLFault`` in JSON.
    /// - `POST /admin/graphql/users` — body `{"accountId": "…", "refused": true}`.
    /// - `POST /admin/graphql/rate-limit` — body `{"perMinute": 10}` (`null` for none).
    /// - `GET /admin/graphql/stats` — `{"calls": n, "tokens": n}`.
    func addGraphQLRoutes(to router: Router<EmulatorRequestContext>) {
        router.post("/graphql") { request, _ -> Response in
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            return await self.answerGraphQL(
                authorization: request.headers[.authorization], body: Data(buffer: body)
            ).response
        }

        let admin = router.group("admin/graphql").add(middleware: LoopbackOnlyMiddleware())
        admin.post("fault") { request, _ -> Response in
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            guard let fault = try? JSONDecoder().decode(GraphQLFault.self, from: Data(buffer: body)) else {
                return EmulatorAnswer.error(400, code: "invalid_request", message: "body must be a GraphQL fault")
                    .response
            }
            self.setGraphQLFault(fault)
            return EmulatorAnswer.json(200, fault).response
        }
        admin.post("users") { request, _ -> Response in
            struct UserPolicy: Codable {
                var accountId: String
                var refused: Bool
            }
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            guard let policy = try? JSONDecoder().decode(UserPolicy.self, from: Data(buffer: body)) else {
                return EmulatorAnswer.error(
                    400, code: "invalid_request", message: "body must be {\"accountId\", \"refused\"}"
                ).response
            }
            if policy.refused {
                self.refuseUserTokens(for: policy.accountId)
            } else {
                self.allowUserTokens(for: policy.accountId)
            }
            return EmulatorAnswer.json(200, policy).response
        }
        admin.post("rate-limit") { request, _ -> Response in
            struct Limit: Codable { var perMinute: Int? }
            let body = try await request.body.collect(upTo: Self.maximumRequestBytes)
            guard let limit = try? JSONDecoder().decode(Limit.self, from: Data(buffer: body)),
                limit.perMinute.map({ $0 >= 0 }) ?? true
            else {
                return EmulatorAnswer.error(400, code: "invalid_request", message: "body must be {\"perMinute\": n}")
                    .response
            }
            self.setGraphQLRateLimit(perMinute: limit.perMinute)
            return EmulatorAnswer.json(200, limit).response
        }
        admin.get("stats") { _, _ -> Response in
            struct Stats: Codable {
                var calls: Int
                var tokens: Int
            }
            let stats = self.graphQL.withLock { s in
                Stats(calls: s.records.count, tokens: s.records.filter { $0.outcome == "token" }.count)
            }
            return EmulatorAnswer.json(200, stats).response
        }
    }

    // MARK: Knobs

    /// Makes the GraphQL endpoint misbehave from the next call on (``GraphQLFault/none`` restores
    /// normal behaviour); a counted fault restarts its count.
    public func setGraphQLFault(_ fault: GraphQLFault) {
        self.graphQL.withLock { s in
            s.fault = fault
            switch fault {
            case .failWith(_, let times), .rejectSystemToken(let times): s.remaining = times
            case .none, .respondSlowly: s.remaining = 0
            }
        }
        self.logger.info("GraphQL fault set", metadata: ["forge.emulator.graphql.fault": "\(fault)"])
    }

    /// Atlassian refuses user tokens for this account from now on (`success: false`).
    public func refuseUserTokens(for accountId: String) {
        _ = self.graphQL.withLock { $0.refusedAccounts.insert(accountId) }
    }

    /// Atlassian hands out user tokens for this account again.
    public func allowUserTokens(for accountId: String) {
        _ = self.graphQL.withLock { $0.refusedAccounts.remove(accountId) }
    }

    /// Calls per minute after which the endpoint answers 429 with `Retry-After` (default 1,000, as
    /// Atlassian's); nil for no limit.
    public func setGraphQLRateLimit(perMinute: Int?) {
        self.graphQL.withLock {
            $0.rateLimitPerMinute = perMinute
            $0.recentCalls = []
        }
    }

    /// The `ttl` of the user tokens handed out from now on. Default 1 h.
    public func setUserTokenLifetime(_ lifetime: Duration) {
        self.graphQL.withLock { $0.userTokenLifetime = lifetime }
    }

    /// When true, user tokens are opaque strings (no JWT, no `exp`): only `ttl` tells their expiry.
    public func setOpaqueUserTokens(_ opaque: Bool) {
        self.graphQL.withLock { $0.opaqueUserTokens = opaque }
    }

    // MARK: Observations

    /// Every call to the GraphQL endpoint, oldest first.
    public var userTokenExchangeRecords: [UserTokenExchangeRecord] {
        self.graphQL.withLock { $0.records }
    }

    /// Calls that named `installation`'s site and `accountId`, whatever their outcome.
    public func userTokenExchanges(for installation: EmulatedInstallation, accountId: String) -> Int {
        self.graphQL.withLock { s in
            s.records.filter { $0.installationId == installation.id && $0.accountId == accountId }.count
        }
    }

    /// Every call to the GraphQL endpoint, whatever it named.
    public var totalUserTokenExchanges: Int {
        self.graphQL.withLock { $0.records.count }
    }

    /// The last user token handed out for `installation` and `accountId`.
    public func lastUserToken(for installation: EmulatedInstallation, accountId: String) -> String? {
        self.graphQL.withLock { $0.lastTokens[installation.id + " " + accountId] }
    }

    // MARK: Answering

    /// Answers `POST /graphql` (see ``addGraphQLRoutes(to:)``).
    func answerGraphQL(authorization: String?, body: Data) async -> GraphQLAnswer {
        let receivedAt = Date()
        let parsed = try? JSONDecoder().decode(GraphQLRequestBody.self, from: body)
        let input = parsed?.variables?.input
        let installation = input.flatMap { self.installation(forContexts: $0.contextIds) }

        func record(_ status: Int, _ outcome: String) {
            let entry = UserTokenExchangeRecord(
                receivedAt: receivedAt, installationId: installation?.installation.id, accountId: input?.userId,
                contextIds: input?.contextIds ?? [], status: status, outcome: outcome)
            self.graphQL.withLock { $0.records.append(entry) }
        }

        let (fault, injected, limited) = self.graphQL.withLock { s -> (GraphQLFault, Int?, Int?) in
            let injected = s.takeFault()
            return (s.fault, injected, injected == nil ? s.admit(at: receivedAt) : nil)
        }
        if case .respondSlowly(let delay) = fault {
            try? await Task.sleep(for: delay)
        }
        if let injected {
            record(injected, injected == 401 ? "unauthorized" : "failed")
            return .error(
                injected, message: injected == 401 ? "Unauthorized" : "Injected failure", statusCode: injected)
        }
        if let limited {
            record(429, "rate_limited")
            var answer = GraphQLAnswer.error(429, message: "Rate limit exceeded", statusCode: 429)
            answer.retryAfter = limited
            return answer
        }

        guard let claims = self.verifySystemToken(authorization), claims.exp > Self.unixSeconds(Date()) else {
            record(401, "unauthorized")
            return .error(401, message: "Unauthorized", statusCode: 401)
        }
        guard let parsed, let input, parsed.query.contains("offlineUserAuthToken") else {
            record(200, "invalid")
            let error: [String: Any] = [
                "message": "Validation error: expected the offlineUserAuthToken mutation with $input",
                "extensions": ["classification": "ValidationError"],
            ]
            return .json(200, ["errors": [error]])
        }
        func refuse(_ message: String) -> GraphQLAnswer {
            record(200, "refused")
            let result: [String: Any] = ["success": false, "errors": [["message": message]], "authToken": NSNull()]
            return .json(200, ["data": ["offlineUserAuthToken": result]])
        }
        guard let installation, installation.status == .installed else {
            let contexts = input.contextIds.joined(separator: ", ")
            return refuse("Could not load permissions for app user in the provided contextIds of [\(contexts)]")
        }
        if let owner = claims.installationId, owner != installation.installation.id {
            return refuse("The app system token does not belong to the installation of the provided contextIds")
        }
        let (refused, lifetime, opaque) = self.graphQL.withLock {
            ($0.refusedAccounts.contains(input.userId), $0.userTokenLifetime, $0.opaqueUserTokens)
        }
        if refused || input.userId.isEmpty {
            return refuse("User \(input.userId) cannot be impersonated by this app")
        }
        let ttl = max(1, Int(lifetime.components.seconds))
        let token: String
        do {
            token = try self.mintUserToken(
                for: installation.installation, accountId: input.userId,
                expiresAt: opaque ? nil : receivedAt.addingTimeInterval(TimeInterval(ttl)))
        } catch {
            record(500, "failed")
            return .error(500, message: "Internal error", statusCode: 500)
        }
        self.graphQL.withLock { $0.lastTokens[installation.installation.id + " " + input.userId] = token }
        record(200, "token")
        let authToken: [String: Any] = ["token": token, "ttl": ttl]
        let result: [String: Any] = ["success": true, "errors": [Any](), "authToken": authToken]
        return .json(200, ["data": ["offlineUserAuthToken": result]])
    }

    /// Mints a user token: a JWT (HS256 with the emulator's access-token key) with `sub` the
    /// account and `exp` `expiresAt`, or, when `expiresAt` is nil, an opaque random string.
    /// - Throws: if encoding fails.
    public func mintUserToken(
        for installation: EmulatedInstallation, accountId: String, expiresAt: Date?
    ) throws
        -> String
    {
        guard let expiresAt else {
            return "utk_" + Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) })
        }
        let now = Date()
        let claims = UserTokenClaims(
            iss: "forge-emulator", sub: accountId, aud: "api.atlassian.com", iat: Self.unixSeconds(now),
            exp: Self.unixSeconds(expiresAt), jti: UUID().uuidString.lowercased(), installationId: installation.id,
            context: installation.siteARI)
        let encoder = JSONEncoder.emulator
        let signingInput =
            Base64URL.encode(try encoder.encode(EmulatorJWTHeader(alg: "HS256", kid: nil, typ: "JWT"))) + "."
            + Base64URL.encode(try encoder.encode(claims))
        let mac = HMAC<SHA256>.authenticationCode(for: Data(signingInput.utf8), using: self.keys.accessTokenKey)
        return signingInput + "." + Base64URL.encode(Data(mac))
    }

    /// The installation whose site ARI (or `ari:cloud:<product>:<cloudId>:workspace/…` form) is
    /// among `contextIds`.
    private func installation(forContexts contextIds: [String]) -> EmulatedInstallationRecord? {
        let records = self.state.withLock { $0.orderedRecords }
        for context in contextIds {
            if let match = records.first(where: { $0.installation.siteARI == context }) { return match }
        }
        return nil
    }

    /// The claims of a system token this emulator minted (HS256 with its key), or nil.
    private func verifySystemToken(_ authorization: String?) -> SystemTokenClaims? {
        guard let authorization, authorization.count > 7, authorization.prefix(7).lowercased() == "bearer " else {
            return nil
        }
        let token = authorization.dropFirst(7).trimmingCharacters(in: .whitespaces)
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let signature = Base64URL.decode(parts[2]),
            let headerData = Base64URL.decode(parts[0]).map({ Data($0) }),
            let header = try? JSONDecoder().decode(EmulatorJWTHeader.self, from: headerData), header.alg == "HS256",
            HMAC<SHA256>.isValidAuthenticationCode(
                signature, authenticating: Data((parts[0] + "." + parts[1]).utf8), using: self.keys.accessTokenKey),
            let payload = Base64URL.decode(parts[1]).map({ Data($0) })
        else { return nil }
        return try? JSONDecoder().decode(SystemTokenClaims.self, from: payload)
    }
}

/// An answer of the GraphQL endpoint.
struct GraphQLAnswer: Sendable {
    let status: Int
    let body: Data
    var retryAfter: Int?

    static func json(_ status: Int, _ object: [String: Any]) -> GraphQLAnswer {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return GraphQLAnswer(status: status, body: data, retryAfter: nil)
    }

    /// A request-level GraphQL error with `extensions.statusCode`.
    static func error(_ status: Int, message: String, statusCode: Int) -> GraphQLAnswer {
        let error: [String: Any] = ["message": message, "extensions": ["statusCode": statusCode]]
        return .json(status, ["errors": [error]])
    }

    var response: Response {
        var headers: HTTPFields = [.contentType: "application/json", .cacheControl: "no-store"]
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        return Response(
            status: HTTPResponse.Status(code: self.status), headers: headers,
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: self.body)))
    }
}
