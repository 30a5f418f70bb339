import AsyncHTTPClient
import Foundation
import Logging
import NIOCore

/// Calls Atlassian's `offlineUserAuthToken` GraphQL mutation: exchanges an app system token for
/// a user token (offline user impersonation; `spec/protocol.md` §1).
///
/// The operation follows Atlassian's "Calling Atlassian app APIs from a remote" page
/// (developer.atlassian.com, section "Offline user impersonation"): `POST` to the GraphQL gateway
/// with `Authorization: Bearer <app system token>`, the mutation
/// `forge_remote_offlineUserAuthToken($input: OfflineUserAuthTokenInput!)` selecting
/// `success errors { message } authToken { token ttl }`, and the variables
/// `{"input": {"contextIds": ["<site ARI>"], "userId": "<accountId>"}}`. `ttl` is the token's
/// lifetime in seconds.
///
/// One call per ``exchange(systemToken:context:accountId:timeout:)``; retries, budgets and
/// caching belong to ``UserTokenExchanger``. Redirects are never followed (the gateway's HTTP
/// client is configured so).
public struct OfflineUserAuthTokenClient: Sendable {
    /// The GraphQL document sent, exactly as Atlassian documents it.
    public static let mutation =
        "mutation forge_remote_offlineUserAuthToken($input: OfflineUserAuthTokenInput!) { "
        + "offlineUserAuthToken(input: $input) { success errors { message } authToken { token ttl } } }"
    /// The operation name inside ``mutation``.
    public static let operationName = "forge_remote_offlineUserAuthToken"
    /// Largest answer read.
    static let maxAnswerBytes = 256 * 1024

    /// Why one call did not produce a token, when trying again may help (or may not).
    public enum Failure: Sendable, Hashable {
        /// HTTP 5xx (or 408).
        case httpError(status: Int)
        /// Connection refused, reset, DNS failure, TLS failure…
        case transportError
        /// No answer within the call's timeout.
        case timeout
        /// A 2xx answer that is not a usable mutation result.
        case invalidResponse
        /// A 4xx that is none of 401, 403, 429 (a malformed request on our side).
        case rejected(status: Int)

        /// Whether another attempt may succeed.
        public var isRetryable: Bool {
            switch self {
            case .httpError, .transportError, .timeout: true
            case .invalidResponse, .rejected: false
            }
        }

        /// The bounded metric word.
        public var outcome: String {
            switch self {
            case .httpError, .rejected: "http_error"
            case .transportError: "transport_error"
            case .timeout: "timeout"
            case .invalidResponse: "invalid_response"
            }
        }

        /// A secret-free detail for errors and logs.
        public var detail: String {
            switch self {
            case .httpError(let status), .rejected(let status): "HTTP \(status)"
            case .transportError: "unreachable"
            case .timeout: "timed out"
            case .invalidResponse: "malformed answer"
            }
        }
    }

    /// What one call came to.
    public enum Outcome: Sendable, Hashable {
        /// A user token and its `ttl` in seconds (if the answer had one).
        case token(value: String, ttl: Int64?)
        /// Atlassian refused a token for this user (`success: false`, or 403). `message` is
        /// Atlassian's first error message, cut to 200 characters; it is for logs only.
        case denied(message: String?)
        /// The system token was refused (401): it expired or was revoked.
        case systemTokenRefused
        /// Atlassian's rate limit (429), with its `Retry-After` when it sent a readable one.
        case rateLimited(retryAfter: Duration?)
        /// Anything else.
        case failed(Failure)

        /// The bounded metric word of `token_gateway_user_exchanges_total`.
        public var outcome: String {
            switch self {
            case .token: "success"
            case .denied: "denied"
            case .systemTokenRefused: "unauthorized"
            case .rateLimited: "rate_limited"
            case .failed(let failure): failure.outcome
            }
        }
    }

    let httpClient: HTTPClient
    /// The GraphQL endpoint (`TOKEN_GATEWAY_FORGE_GRAPHQL_URL`).
    public let url: String
    let logger: Logger

    public init(httpClient: HTTPClient, url: String, logger: Logger) {
        self.httpClient = httpClient
        self.url = url
        self.logger = logger
    }

    /// The exact request body of an exchange.
    public static func body(context: SiteContext, accountId: UserAccountID) -> [UInt8] {
        Array(
            JSONValue.object([
                ("operationName", .string(Self.operationName)),
                ("query", .string(Self.mutation)),
                (
                    "variables",
                    .object([
                        (
                            "input",
                            .object([
                                ("contextIds", .array([.string(context.ari)])),
                                ("userId", .string(accountId.value)),
                            ])
                        )
                    ])
                ),
            ]).serialized().utf8)
    }

    /// Makes one exchange call, ending within `timeout`. Never throws: every failure is an ``Outcome``.
    public func exchange(
        systemToken: String, context: SiteContext, accountId: UserAccountID, timeout: Duration
    )
        async -> Outcome
    {
        var request = HTTPClientRequest(url: self.url)
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.headers.add(name: "accept", value: "application/json")
        request.headers.add(name: "authorization", value: "Bearer " + systemToken)
        request.headers.add(name: "user-agent", value: "token-gateway")
        request.body = .bytes(ByteBuffer(bytes: Self.body(context: context, accountId: accountId)))
        // The call's timeout covers the answer's body too (the client's own ends with its head).
        let deadline = ContinuousClock.now + timeout
        do {
            let response = try await self.httpClient.execute(request, timeout: .nanoseconds(timeout.nanoseconds))
            let status = Int(response.status.code)
            let retryAfter = response.headers.first(name: "retry-after")
            // An error answer is decided by its status line: its body (large, or slow to come)
            // must not turn a 429 or a 401 into a failure of another kind. Only a 2xx (the GraphQL
            // answer) and a 403 (its message, for the log) are read.
            guard (200..<300).contains(status) || status == 403 else {
                return Self.classify(status: status, retryAfter: retryAfter, body: [], now: Date())
            }
            let body: [UInt8]
            do {
                body = Array(
                    try await response.body.collect(upTo: Self.maxAnswerBytes, before: deadline).readableBytesView)
            } catch  where status == 403 {
                return .denied(message: nil)
            }
            return Self.classify(status: status, retryAfter: retryAfter, body: body, now: Date())
        } catch let error as HTTPClientError
            where error == .deadlineExceeded || error == .readTimeout
        {
            return .failed(.timeout)
        } catch is CancellationError {
            return .failed(.timeout)
        } catch is NIOTooManyBytesError {
            return .failed(.invalidResponse)
        } catch {
            self.logger.debug("user-token exchange call failed", metadata: ["error.type": "\(type(of: error))"])
            return .failed(.transportError)
        }
    }

    /// Reads one answer of the GraphQL endpoint. Pure.
    ///
    /// - 2xx with `data.offlineUserAuthToken`: `success: true` and a non-empty `authToken.token`
    ///   is a token; `success: false` is a refusal; anything else is `invalidResponse`.
    /// - 2xx without it: the top-level GraphQL `errors` decide through
    ///   `extensions.statusCode` (401, 403, 429, 5xx) or `extensions.errorType`/`classification`
    ///   (`UNAUTHENTICATED`, `FORBIDDEN`, `RATE_LIMITED`); otherwise `invalidResponse`.
    /// - 401 refused system token, 403 refusal, 429 rate limit, 408 and 5xx retryable, other
    ///   statuses `rejected`.
    public static func classify(status: Int, retryAfter: String?, body: [UInt8], now: Date) -> Outcome {
        switch status {
        case 200..<300:
            break
        case 401:
            return .systemTokenRefused
        case 403:
            return .denied(message: Self.firstErrorMessage(Self.parse(body)))
        case 429:
            return .rateLimited(retryAfter: Self.retryAfter(retryAfter, now: now))
        case 408, 500..<600:
            return .failed(.httpError(status: status))
        default:
            return .failed(.rejected(status: status))
        }
        guard let root = Self.parse(body) else { return .failed(.invalidResponse) }
        if let data = root["data"] as? [String: Any], let result = data["offlineUserAuthToken"] as? [String: Any] {
            let success = result["success"] as? Bool
            if success == true {
                guard let auth = result["authToken"] as? [String: Any], let token = auth["token"] as? String,
                    !token.isEmpty, token.utf8.count <= 16 * 1024
                else { return .failed(.invalidResponse) }
                var ttl: Int64? = nil
                if let raw = auth["ttl"], let n = JSONValue.strictNumber(raw), n.isFinite, n > 0, n < 1e9 {
                    ttl = Int64(n)
                }
                return .token(value: token, ttl: ttl)
            }
            if success == false {
                return .denied(message: Self.firstErrorMessage(result))
            }
            return .failed(.invalidResponse)
        }
        // No mutation result: a request-level GraphQL error.
        for error in (root["errors"] as? [[String: Any]]) ?? [] {
            let extensions = error["extensions"] as? [String: Any] ?? [:]
            let code = (extensions["statusCode"] as? NSNumber)?.intValue
            let kind = ((extensions["errorType"] ?? extensions["classification"]) as? String)?.uppercased()
            if code == 401 || kind == "UNAUTHENTICATED" || kind == "UNAUTHORIZED" { return .systemTokenRefused }
            if code == 429 || kind == "RATE_LIMITED" {
                return .rateLimited(retryAfter: Self.retryAfter(retryAfter, now: now))
            }
            if code == 403 || kind == "FORBIDDEN" { return .denied(message: Self.firstErrorMessage(root)) }
            if let code, (500..<600).contains(code) { return .failed(.httpError(status: code)) }
        }
        return .failed(.invalidResponse)
    }

    /// A `Retry-After` value: delta-seconds or an HTTP date; nil when absent or unreadable.
    public static func retryAfter(_ header: String?, now: Date) -> Duration? {
        guard let header = header?.trimmingCharacters(in: .whitespaces), !header.isEmpty else { return nil }
        if let seconds = Int64(header) {
            return seconds >= 0 && seconds < 86_400 ? .seconds(seconds) : nil
        }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: header) else { return nil }
        let seconds = date.timeIntervalSince(now)
        guard seconds < 86_400 else { return nil }
        return .seconds(max(0, Int64(seconds.rounded(.up))))
    }

    private static func parse(_ body: [UInt8]) -> [String: Any]? {
        guard !body.isEmpty else { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]
    }

    private static func firstErrorMessage(_ object: [String: Any]?) -> String? {
        guard let errors = object?["errors"] as? [[String: Any]], let message = errors.first?["message"] as? String
        else { return nil }
        return String(message.prefix(200))
    }
}

extension OfflineUserAuthTokenClient.Outcome: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The outcome without the user token itself.
    public var description: String {
        switch self {
        case .token(_, let ttl): "token(value: <redacted>, ttl: \(ttl.map(String.init) ?? "nil"))"
        case .denied(let message): "denied(message: \(message ?? "nil"))"
        case .systemTokenRefused: "systemTokenRefused"
        case .rateLimited(let retryAfter): "rateLimited(retryAfter: \(retryAfter.map { "\($0)" } ?? "nil"))"
        case .failed(let failure): "failed(\(failure.outcome))"
        }
    }

    public var debugDescription: String { self.description }

    public var customMirror: Mirror { Mirror(self, children: ["description": self.description]) }
}
