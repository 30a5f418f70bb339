import FlowEngine
import HTTPTypes
import Hummingbird
import Logging
import NIOHTTP1

/// Turns every error into the contract's error body: ``GatewayError``s as they are, Hummingbird's
/// own (unknown route, body too large, …) mapped to their codes, anything else a logged 500.
/// Also answers 405 for a known route called with the wrong method.
struct ErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    let knownRoutes: [(segments: [Substring], methods: [HTTPRequest.Method])]

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        do {
            return try await next(request, context)
        } catch let error as GatewayError {
            return try error.response(from: request, context: context)
        } catch let error as any HTTPResponseError {
            // Hummingbird's own errors (`HTTPError`, a body over the limit as `NIOTooManyBytesError`,
            // …) by status; their messages are not passed on.
            let mapped: GatewayError
            switch error.status {
            case .notFound:
                if let allowed = self.allowedMethods(for: request.uri.path) {
                    // Every non-2xx answer of the OAuth token endpoint is an RFC 6749 body (contract §1).
                    if Self.isOAuthTokenPath(request.uri.path) { return OAuthError.methodNotAllowedResponse }
                    mapped = GatewayError(
                        status: .methodNotAllowed, code: "method_not_allowed",
                        message: "method not allowed on this route",
                        extraHeaders: ["Allow": allowed.map(\.rawValue).joined(separator: ", ")])
                } else {
                    mapped = .notFound
                }
            case .contentTooLarge: mapped = .payloadTooLarge
            case .badRequest: mapped = .invalidRequest("malformed request")
            case .methodNotAllowed: mapped = .methodNotAllowed
            case .unsupportedMediaType: mapped = .invalidRequest("unsupported content type")
            default:
                if error.status.code >= 500 {
                    context.logger.error("unexpected HTTP error", metadata: ["http.status": "\(error.status.code)"])
                    mapped = .internalError
                } else {
                    mapped = GatewayError(status: error.status, code: "invalid_request", message: "request refused")
                }
            }
            return try mapped.response(from: request, context: context)
        } catch is HTTPParserError {
            // The request's body did not parse (a chunked body's framing): the client's fault.
            // The connection ends after this answer (nothing after the error can be read): said so.
            return try GatewayError(
                status: .badRequest, code: "invalid_request", message: "malformed request body",
                extraHeaders: ["Connection": "close"]
            ).response(from: request, context: context)
        } catch {
            context.logger.error(
                "unhandled error",
                metadata: ["error.type": "\(type(of: error))", "http.path": "\(context.endpointPath ?? "-")"])
            return try GatewayError.internalError.response(from: request, context: context)
        }
    }

    /// Whether `path` is the OAuth token endpoint's (a trailing `/` or doubled `/` aside, as the
    /// route table reads paths).
    static func isOAuthTokenPath(_ path: String) -> Bool {
        path.split(separator: "/", omittingEmptySubsequences: true)
            .elementsEqual(OAuthMetadata.tokenPath.split(separator: "/", omittingEmptySubsequences: true))
    }

    func allowedMethods(for path: String) -> [HTTPRequest.Method]? {
        let segments = path.split(separator: "/", omittingEmptySubsequences: true)
        for route in self.knownRoutes where route.segments.count == segments.count {
            if zip(route.segments, segments).allSatisfy({ $0.hasPrefix(":") || $0 == $1 }) {
                return route.methods
            }
        }
        return nil
    }
}

/// Gives every HTTP request an id: the `http.request_id` metadata of the request's logger
/// (`context.logger`, which the routes log through) and the `X-Request-Id` header of its answer, so
/// the log lines of an answer can be found. The id is Hummingbird's per-request id; an id the client
/// sends is not used. (`request.id` stays the id of a trigger round trip, `rq_…`.)
struct RequestIDMiddleware<Context: RequestContext>: RouterMiddleware {
    static var metadataKey: String { "http.request_id" }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        var context = context
        // Hummingbird's id lives in its request logger's metadata (`context.id` force-unwraps it);
        // a log handler that keeps no metadata would leave it out, so one is made here instead.
        let id = context.logger[metadataKey: "hb.request.id"]?.description ?? Self.makeID()
        context.logger[metadataKey: Self.metadataKey] = .string(id)
        var response = try await next(request, context)
        response.headers[.requestID] = id
        return response
    }

    /// A request id of its own: 16 hex digits.
    static func makeID() -> String {
        let value = UInt64.random(in: 0...UInt64.max)
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}

/// Counts answers by route template and status, and logs each request at debug level with the
/// Forge trace ids. Never logs headers.
struct ObservabilityMiddleware<Context: RequestContext>: RouterMiddleware {
    let metrics: GatewayMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        let response = try await next(request, context)
        let route = Self.routeLabel(context.endpointPath)
        self.metrics.countRequest(route: route, status: Int(response.status.code))
        if response.status == .unauthorized, Self.challengesACaller(response.headers[.wwwAuthenticate]) {
            self.metrics.countCallerAuthenticationFailure(route: route)
        }
        if context.logger.logLevel <= .debug {
            var metadata: Logger.Metadata = [
                "http.method": "\(request.method.rawValue)", "http.route": "\(route)",
                "http.status": "\(response.status.code)",
            ]
            if let trace = request.headers[.b3TraceID] { metadata["trace.id"] = "\(trace.prefix(64))" }
            if let span = request.headers[.b3SpanID] { metadata["span.id"] = "\(span.prefix(64))" }
            context.logger.debug("request", metadata: metadata)
        }
        return response
    }

    /// Whether a 401's challenge asks for a caller credential: `Bearer` (the caller routes) or
    /// `Basic` (`/oauth/token`, the status page) in the gateway's realm. A Connect tenant's JWT or a
    /// Forge invocation token refused is answered without it (or with `JWT`), and is not counted.
    static func challengesACaller(_ challenge: String?) -> Bool {
        guard let challenge else { return false }
        return challenge.hasSuffix(#"realm="token-gateway""#)
    }

    /// The `route` label: the route template, or `unmatched` when no route matched (Hummingbird's
    /// not-found responder names its path `NotFound`; a wrong method on a known path lands there too).
    static func routeLabel(_ endpointPath: String?) -> String {
        guard let endpointPath, endpointPath != "NotFound" else { return "unmatched" }
        return endpointPath
    }
}
