import FlowEngine
import HTTPTypes
import Hummingbird
import NIOCore

/// An error answer of the OAuth 2.0 token endpoint (contract §8, RFC 6749 §5.2, RFC 8693 §2.2.2,
/// RFC 8707 §2): `{"error": "<code>", "error_description": "…"}` with `Cache-Control: no-store`.
///
/// ``errorDescription`` is written for the client and never contains a token, a secret or
/// anything else the client sent.
public struct OAuthError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The RFC 6749 error code (`invalid_request`, `invalid_client`, …).
    public let code: String
    /// The HTTP status: 400, 401 (`invalid_client`), 503 (`temporarily_unavailable`) or 500.
    public let status: HTTPResponse.Status
    /// One secret-free sentence for the client.
    public let errorDescription: String
    /// Seconds for `Retry-After` (only on 503).
    public let retryAfter: Int?

    init(code: String, status: HTTPResponse.Status = .badRequest, description: String, retryAfter: Int? = nil) {
        self.code = code
        self.status = status
        self.errorDescription = description
        self.retryAfter = retryAfter
    }

    public var description: String { "OAuthError(\(self.status.code) \(self.code): \(self.errorDescription))" }

    /// The realm named in `WWW-Authenticate` on every `invalid_client` answer.
    public static let realm = "token-gateway"

    /// 400 `invalid_request`: a missing, repeated or malformed parameter, a request that uses two
    /// client authentication methods, or (RFC 8693 §2.2.2) a `subject_token` that fails verification.
    public static func invalidRequest(_ description: String) -> OAuthError {
        OAuthError(code: "invalid_request", description: description)
    }

    /// 401 `invalid_client` with `WWW-Authenticate: Basic realm="token-gateway"`: no client
    /// authentication, an unknown client, a wrong secret or an unsupported method. One answer for
    /// all, so a client cannot tell an unknown name from a wrong secret.
    public static let invalidClient = OAuthError(
        code: "invalid_client", status: .unauthorized,
        description: "client authentication failed: give a configured caller's name and secret "
            + "as client_id and client_secret (HTTP Basic or form fields)")

    /// 400 `unsupported_grant_type`.
    public static let unsupportedGrantType = OAuthError(
        code: "unsupported_grant_type",
        description: "grant_type must be client_credentials or urn:ietf:params:oauth:grant-type:token-exchange")

    /// 400 `unsupported_grant_type` when token exchange is asked for while Connect is not configured.
    public static let tokenExchangeUnavailable = OAuthError(
        code: "unsupported_grant_type",
        description: "token exchange needs Connect, which this gateway does not have configured; "
            + "grant_type must be client_credentials")

    /// 400 `invalid_target` (RFC 8707): the installation does not exist, is outside the client's
    /// scope or is uninstalled, the Connect tenant is outside the client's scope or has no linked
    /// installation. Every case gives exactly this answer, so a client cannot probe for other tenants.
    public static let invalidTarget = OAuthError(
        code: "invalid_target",
        description: "the target is not an installation this client may use "
            + "(unknown, uninstalled, outside the client's scope, or no installation linked to the tenant)")

    /// 500 `server_error` for anything unexpected (logged by the route).
    public static let serverError = OAuthError(
        code: "server_error", status: .internalServerError, description: "internal error")

    /// 503 `temporarily_unavailable` with `Retry-After`.
    public static func temporarilyUnavailable(_ description: String, retryAfter: Int) -> OAuthError {
        OAuthError(
            code: "temporarily_unavailable", status: .serviceUnavailable, description: description,
            retryAfter: max(1, retryAfter))
    }

    /// The token endpoint's answer for a failure of the token flow (contract §8): an installation
    /// that does not exist or is uninstalled is ``invalidTarget``; every upstream or store trouble
    /// (§2's `no_trigger_url`, `token_timeout`, `trigger_failed`, `circuit_open`,
    /// `store_unavailable`, and a shutdown in progress) is 503 `temporarily_unavailable`.
    ///
    /// `Retry-After` is the flow's own hint when it has one (open circuit, store), else 30 s for
    /// `no_trigger_url` (nothing changes until the installation registers a trigger or a token is
    /// pushed), 5 s for `trigger_failed` and 1 s otherwise.
    public init(_ error: FlowError) {
        let hinted = error.retryAfter.map(\.retryAfterSeconds)
        switch error.code {
        case .installationNotFound, .installationUninstalled:
            self = .invalidTarget
        case .noTriggerURL:
            self = .temporarilyUnavailable(
                "no token is available yet: the installation has registered no auth trigger "
                    + "and no valid token is stored",
                retryAfter: hinted ?? 30)
        case .tokenTimeout:
            self = .temporarilyUnavailable("no token arrived from Forge within the deadline", retryAfter: hinted ?? 1)
        case .triggerFailed:
            self = .temporarilyUnavailable(
                "the installation's auth trigger failed on every attempt", retryAfter: hinted ?? 5)
        case .circuitOpen:
            self = .temporarilyUnavailable(
                "recent auth-trigger round trips for this installation failed; not trying again yet",
                retryAfter: hinted ?? 1)
        case .storeUnavailable:
            self = .temporarilyUnavailable("the token store is unreachable", retryAfter: hinted ?? 1)
        case .shuttingDown:
            self = .temporarilyUnavailable("the gateway is shutting down", retryAfter: hinted ?? 1)
        case .overloaded:
            self = .temporarilyUnavailable("too many callers are already waiting", retryAfter: hinted ?? 1)
        case .cancelled:
            self = .temporarilyUnavailable("the request was cancelled", retryAfter: hinted ?? 1)
        }
    }

    /// The JSON body: `{"error": …, "error_description": …}`.
    public var body: JSONValue {
        .object([("error", .string(self.code)), ("error_description", .string(self.errorDescription))])
    }

    /// The HTTP answer: the body, `Content-Type: application/json`, `Cache-Control: no-store`,
    /// `Pragma: no-cache`, `Retry-After` when set and, for `invalid_client`,
    /// `WWW-Authenticate: Basic realm="token-gateway"`.
    public var response: Response {
        var headers: HTTPFields = [
            .contentType: "application/json", .cacheControl: "no-store", .pragma: "no-cache",
        ]
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        if self.status == .unauthorized { headers[.wwwAuthenticate] = "Basic realm=\"\(Self.realm)\"" }
        return Response(
            status: self.status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: self.body.serialized())))
    }
}
