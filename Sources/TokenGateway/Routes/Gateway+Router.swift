import FlowEngine
import Hummingbird
import NIOCore
import Tracing

extension Gateway {
    /// The routes of contract §2, §3 and §6, wrapped in the request-id, observability and error
    /// middleware.
    public func makeRouter() -> Router<BasicRequestContext> {
        // With a separate operations listener (`TOKEN_GATEWAY_OPS_PORT`), health, metrics and the
        // operator pages are served there only: the port Forge and callers reach never shows them.
        let operations = self.configuration.operationsListener == nil
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: ObservabilityMiddleware(metrics: self.metrics))
        // One span per request; the context of an incoming trace (traceparent, b3, …) is
        // extracted by whatever instrument the operator bootstraps (OpenTelemetry, for example)
        // before the router is made. Without one the middleware is left out: it would cost a
        // span per request and split every answer into three writes (head, body, end).
        if Self.tracingBootstrapped { router.add(middleware: TracingMiddleware()) }
        let known = Self.routeTable { self.addServedRoutes(to: $0, operations: operations) }
        router.add(middleware: ErrorMiddleware(knownRoutes: known))
        self.addServedRoutes(to: router, operations: operations)
        return router
    }

    /// The router of the separate operations listener: only the operations surface.
    public func makeOperationsRouter() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: ObservabilityMiddleware(metrics: self.metrics))
        router.add(middleware: ErrorMiddleware(knownRoutes: Self.routeTable { self.addOperationsSurface(to: $0) }))
        self.addOperationsSurface(to: router)
        return router
    }

    /// Every route of the main listener: the operations surface too when `operations` is set. The
    /// table of known routes (for 405 answers and the documentation check) is read from these.
    func addServedRoutes(to router: Router<BasicRequestContext>, operations: Bool) {
        self.addCallerRoutes(to: router)
        self.addForgeRoutes(to: router)
        if operations { self.addOperationsSurface(to: router) }
        self.addConnectRoutes(to: router)
        self.addOAuthRoutes(to: router)
        self.addInvokeRoutes(to: router)
    }

    /// A route table: path segments (`:name` for a parameter) and methods of every route `add`
    /// puts on a router, in the router's order.
    static func routeTable(
        _ add: (Router<BasicRequestContext>) -> Void
    ) -> [(segments: [Substring], methods: [HTTPRequest.Method])] {
        let probe = Router(context: BasicRequestContext.self)
        add(probe)
        var table: [(segments: [Substring], methods: [HTTPRequest.Method])] = []
        for route in probe.routes {
            let segments = route.path.components.map { element -> Substring in
                let text = element.description
                guard text.hasPrefix("{"), text.hasSuffix("}") else { return Substring(text) }
                return ":" + text.dropFirst().dropLast()
            }
            if let index = table.firstIndex(where: { $0.segments == segments }) {
                table[index].methods.append(route.method)
            } else {
                table.append((segments, [route.method]))
            }
        }
        return table
    }

    /// Every route the gateway serves on either listener, read from the routes themselves.
    public var knownRoutes: [(segments: [Substring], methods: [HTTPRequest.Method])] {
        Self.routeTable { self.addServedRoutes(to: $0, operations: true) }
    }

    /// Everything meant for operators rather than for Forge or callers: health, metrics and
    /// operator pages. Served on the main listener, or only on the operations listener when one is
    /// configured. Routes for operators are added here.
    func addOperationsSurface(to router: Router<BasicRequestContext>) {
        self.addOperationsRoutes(to: router)
        self.addStatusRoutes(to: router)
    }

    /// Whether an instrument other than the no-op one is bootstrapped (`InstrumentationSystem`).
    static var tracingBootstrapped: Bool {
        let instrument = InstrumentationSystem.instrument
        return !(instrument is NoOpTracer || instrument is NoOpInstrument)
    }

    /// The header fields of a JSON response.
    static let jsonFields: HTTPFields = [.contentType: "application/json"]

    /// A JSON response.
    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok, noStore: Bool = false) -> Response {
        var headers = Self.jsonFields
        if noStore { headers[.cacheControl] = "no-store" }
        return Response(
            status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: value.serialized())))
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
            let mediaType =
                contentType.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
            guard mediaType == "application/json" || mediaType.hasSuffix("+json") else {
                throw GatewayError.invalidRequest("Content-Type must be application/json")
            }
        }
        return try JSONBody.object(bytes, emptyIsObject: emptyIsObject)
    }
}
