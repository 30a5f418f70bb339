import FlowEngine
import HTTPTypes
import Hummingbird

/// An error answer of the contract (§1): a status, a fixed `code`, a secret-free message and,
/// for 503 and 429, `Retry-After`.
public struct GatewayError: HTTPResponseError, Sendable, Hashable, CustomStringConvertible {
    public let status: HTTPResponse.Status
    public let code: String
    public let message: String
    public let retryAfter: Int?
    public let extraHeaders: [String: String]

    public init(
        status: HTTPResponse.Status, code: String, message: String, retryAfter: Int? = nil,
        extraHeaders: [String: String] = [:]
    ) {
        self.status = status
        self.code = code
        self.message = message
        self.retryAfter = retryAfter
        self.extraHeaders = extraHeaders
    }

    public var description: String { "GatewayError(\(self.status.code) \(self.code): \(self.message))" }

    /// The contract's error body: `{"error": {"code": …, "message": …}}`.
    public var body: ByteBuffer {
        ByteBuffer(
            string: JSONValue.object([
                ("error", .object([("code", .string(self.code)), ("message", .string(self.message))]))
            ]).serialized())
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var headers: HTTPFields = [.contentType: "application/json", .cacheControl: "no-store"]
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        for (name, value) in self.extraHeaders {
            if let field = HTTPField.Name(name) { headers[field] = value }
        }
        return Response(status: self.status, headers: headers, body: .init(byteBuffer: self.body))
    }

    public static let unauthenticated = GatewayError(
        status: .unauthorized, code: "unauthenticated", message: "a valid caller credential is required",
        extraHeaders: ["WWW-Authenticate": "Bearer realm=\"token-gateway\""])
    public static let forbidden = GatewayError(
        status: .forbidden, code: "forbidden", message: "this caller may not use this resource")
    public static let notFound = GatewayError(status: .notFound, code: "not_found", message: "no such route")
    public static let methodNotAllowed = GatewayError(
        status: .methodNotAllowed, code: "method_not_allowed", message: "method not allowed on this route")
    public static let payloadTooLarge = GatewayError(
        status: .contentTooLarge, code: "payload_too_large", message: "request body is too large")
    public static let internalError = GatewayError(
        status: .internalServerError, code: "internal_error", message: "internal error")
    /// 401 for a refused Forge Invocation Token, with the challenge every 401 carries (RFC 9110
    /// §15.5.2; RFC 6750 §3's `invalid_token`). No realm: it is no caller credential that failed.
    public static let invalidInvocationToken = GatewayError(
        status: .unauthorized, code: "invalid_invocation_token", message: "the Forge invocation token was refused",
        extraHeaders: ["WWW-Authenticate": "Bearer error=\"invalid_token\""])
    public static let missingToken = GatewayError(
        status: .badRequest, code: "missing_token", message: "the x-forge-oauth-system header is required")
    public static let storeUnavailable = GatewayError(
        status: .serviceUnavailable, code: "store_unavailable", message: "the token store is unreachable", retryAfter: 1
    )

    public static func invalidRequest(_ message: String) -> GatewayError {
        GatewayError(status: .badRequest, code: "invalid_request", message: message)
    }
    public static func invalidParameter(_ message: String) -> GatewayError {
        GatewayError(status: .badRequest, code: "invalid_parameter", message: message)
    }
    public static func invalidToken(_ message: String) -> GatewayError {
        GatewayError(status: .badRequest, code: "invalid_token", message: message)
    }

    /// The contract answer for a flow failure.
    public init(_ error: FlowError) {
        let retry = error.retryAfter.map(\.retryAfterSeconds)
        switch error.code {
        case .installationNotFound:
            self.init(status: .notFound, code: error.code.rawValue, message: "installation not found")
        case .installationUninstalled:
            self.init(
                status: .gone, code: error.code.rawValue, message: "the app was uninstalled from this installation")
        case .noTriggerURL:
            self.init(
                status: .unprocessableContent, code: error.code.rawValue,
                message: "the installation registered no auth trigger and no valid token is stored")
        case .tokenTimeout:
            self.init(
                status: .gatewayTimeout, code: error.code.rawValue, message: "no token arrived within the timeout")
        case .triggerFailed:
            self.init(
                status: .badGateway, code: error.code.rawValue,
                message: "the auth trigger failed on every attempt" + (error.detail.map { " (\($0))" } ?? ""))
        case .circuitOpen:
            self.init(
                status: .serviceUnavailable, code: error.code.rawValue,
                message: "recent auth-trigger round trips failed; not trying again yet", retryAfter: retry ?? 1)
        case .storeUnavailable:
            self.init(
                status: .serviceUnavailable, code: error.code.rawValue, message: "the token store is unreachable",
                retryAfter: retry ?? 1)
        case .cancelled:
            // The request was cancelled under way (its caller went away): contract §1's
            // `internal_error` is a 500.
            self.init(status: .internalServerError, code: "internal_error", message: "request cancelled")
        case .overloaded:
            self.init(
                status: .serviceUnavailable, code: "overloaded",
                message: "too many callers are already waiting; try again shortly", retryAfter: retry ?? 1)
        case .shuttingDown:
            self.init(
                status: .serviceUnavailable, code: "store_unavailable", message: "the gateway is shutting down",
                retryAfter: retry ?? 1)
        }
    }
}
