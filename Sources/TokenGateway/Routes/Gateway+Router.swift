import FlowEngine
import Hummingbird
import NIOCore
import Tracing

extension Gateway {
    /// The routes of contract §2, §3 and §6, wrapped in the observability and error middleware.
    public func makeRouter() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: ObservabilityMiddleware(metrics: self.metrics))
        // One span per request; the context of an incoming trace (traceparent, b3, …) is
        // extracted by whatever instrument the operator bootstraps (OpenTelemetry, for example)
        // before the router is made. Without one the middleware is left out: it would cost a
        // span per request and split every answer into three writes (head, body, end).
        if Self.tracingBootstrapped { router.add(middleware: TracingMiddleware()) }
        let separateOperations = self.configuration.operationsListener != nil
        let known = separateOperations ? Self.knownRoutes.filter { !Self.isOperationsRoute($0.segments) } : Self.knownRoutes
        router.add(middleware: ErrorMiddleware(knownRoutes: known))
        self.addCallerRoutes(to: router)
        self.addForgeRoutes(to: router)
        // With a separate operations listener (`TOKEN_GATEWAY_OPS_PORT`), health, metrics and the
        // operator pages are served there only: the port Forge and callers reach never shows them.
        if !separateOperations { self.addOperationsSurface(to: router) }
        self.addConnectRoutes(to: router)
        self.addOAuthRoutes(to: router)
        self.addInvokeRoutes(to: router)
        self.addStatusRoutes(to: router)
        return router
    }

    /// The router of the separate operations listener: only the operations surface.
    public func makeOperationsRouter() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: ObservabilityMiddleware(metrics: self.metrics))
        let known = Self.knownRoutes.filter { Self.isOperationsRoute($0.segments) }
        router.add(middleware: ErrorMiddleware(knownRoutes: known))
        self.addOperationsSurface(to: router)
        // The operator pages are reachable here too (operator callers only, as on the main port).
        self.addStatusRoutes(to: router)
        return router
    }

    /// Everything meant for operators rather than for Forge or callers: health, metrics and
    /// operator pages. Served on the main listener, or only on the operations listener when one is
    /// configured. Routes for operators are added here (and their first path segment to
    /// ``operationsPathRoots``).
    func addOperationsSurface(to router: Router<BasicRequestContext>) {
        self.addOperationsRoutes(to: router)
    }

    /// First path segments of the operations surface.
    static let operationsPathRoots: Set<Substring> = ["health", "metrics"]

    static func isOperationsRoute(_ segments: [Substring]) -> Bool {
        segments.first.map { Self.operationsPathRoots.contains($0) } ?? false
    }

    static let knownRoutes: [(segments: [Substring], methods: [HTTPRequest.Method])] = [
        (["v1", "installations", ":id", "token"], [.get]),
        (["v1", "installations", ":id", "token", "refresh"], [.post]),
        (["v1", "installations", ":id"], [.get]),
        (["v1", "installations", ":id", "invoke", ":key"], [.post]),
        (["v1", "installations"], [.get]),
        (["forge", "register"], [.post]),
        (["forge", "auth-trigger"], [.post]),
        (["forge", "lifecycle"], [.post]),
        (["forge", "pre-uninstall"], [.post]),
        (["health", "live"], [.get]),
        (["health", "ready"], [.get]),
        (["metrics"], [.get]),
        (["connect", "installed"], [.post]),
        (["connect", "uninstalled"], [.post]),
        (["v1", "connect", "verify"], [.post]),
        (["v1", "connect", "sign"], [.post]),
        (["oauth", "token"], [.post]),
        ([".well-known", "oauth-authorization-server"], [.get]),
        (["v1", "status"], [.get]),
        (["v1", "installations", ":id", "history"], [.get]),
        (["status"], [.get]),
        (["status", "installations", ":id"], [.get]),
    ]

    /// Whether an instrument other than the no-op one is bootstrapped (`InstrumentationSystem`).
    static var tracingBootstrapped: Bool {
        let instrument = InstrumentationSystem.instrument
        return !(instrument is NoOpTracer || instrument is NoOpInstrument)
    }

    /// A JSON response.
    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok, noStore: Bool = false) -> Response {
        var headers: HTTPFields = [.contentType: "application/json"]
        if noStore { headers[.cacheControl] = "no-store" }
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: value.serialized())))
    }

    /// Reads the whole body, refusing more than the configured size (413).
    func readBody(_ request: Request) async throws -> [UInt8] {
        var buffer = try await request.body.collect(upTo: self.configuration.maxBodySize)
        return buffer.readBytes(length: buffer.readableBytes) ?? []
    }

    /// Reads a JSON object body; a non-empty body must be `application/json`.
    func readJSONObject(_ request: Request, emptyIsObject: Bool = false) async throws -> [String: Any] {
        let bytes = try await self.readBody(request)
        let blank = bytes.allSatisfy { $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }
        if !blank {
            let contentType = request.headers[.contentType]?.lowercased() ?? ""
            let mediaType = contentType.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
            guard mediaType == "application/json" || mediaType.hasSuffix("+json") else {
                throw GatewayError.invalidRequest("Content-Type must be application/json")
            }
        }
        return try JSONBody.object(bytes, emptyIsObject: emptyIsObject)
    }
}
