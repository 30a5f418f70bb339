import Benchmark
import FlowEngine
import Foundation
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOEmbedded
import NIOHTTP1
@_spi(Benchmarks) import TokenGateway

// One benchmark per layer of the cached `GET …/token`, in the order a request passes them:
// caller authentication, the installation id, the cache hit (in TokenGatewayBenchmarks.swift),
// the answer's bytes, the audit record, and the whole router answer.

func hotPathBenchmarks(fixtures: HotPathFixtures) {
    // MARK: Caller authentication

    Benchmark("CallerRegistry.authenticate remembered secret x1000", configuration: .init(scalingFactor: .kilo)) {
        benchmark in
        let header = fixtures.authorization
        for _ in benchmark.scaledIterations {
            blackHole(fixtures.callers.authenticate(authorization: header))
        }
    }

    // MARK: Installation id

    Benchmark("InstallationID(pathSegment:) bare id x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(InstallationID(pathSegment: fixtures.bareID))
        }
    }

    Benchmark("InstallationID(pathSegment:) ARI x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(InstallationID(pathSegment: fixtures.installation.ari))
        }
    }

    // MARK: Answer bytes

    Benchmark("TokenAnswerBodies.prepared kept bytes x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(fixtures.bodies.body(installation: fixtures.installation, answer: fixtures.answer))
        }
    }

    Benchmark("TokenAnswerBodies.encode 1 KiB token x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(BenchmarkAccess.encodeAnswer(installation: fixtures.installation.ari, answer: fixtures.answer))
        }
    }

    // MARK: Audit record

    Benchmark("AuditLog.tokenHandedOut into AuditBuffer x1000", configuration: .init(scalingFactor: .kilo)) {
        benchmark in
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            BenchmarkAccess.tokenHandedOut(
                fixtures.audit, caller: "bench", installation: fixtures.installation, source: "cache",
                expiresAt: "2027-01-15T08:00:00Z", fingerprint: "0123456789ab")
        }
        benchmark.stopMeasurement()
        // Emptied outside the measurement, so the buffer never fills up.
        let lines = await BenchmarkAccess.takeLines(fixtures.auditBuffer)
        precondition(lines?.count == benchmark.scaledIterations.count, "an audit record was not queued")
    }

    // MARK: Whole router answer

    Benchmark("Router cached GET token answer x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let responder = fixtures.responder
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let request = Request(head: fixtures.tokenRequestHead, body: RequestBody(buffer: ByteBuffer()))
            let response = try await responder.respond(to: request, context: fixtures.context())
            precondition(response.status == .ok)
            blackHole(response)
        }
        benchmark.stopMeasurement()
        let lines = await BenchmarkAccess.takeLines(fixtures.routerAuditBuffer)
        precondition(lines?.count == benchmark.scaledIterations.count, "an answer was not audited")
    }
}

/// The fast answer (the cached `GET …/token` answered in the connection's pipeline, without the
/// router): the handler in an `EmbeddedChannel`, a request head and end in, the answer's three
/// parts out.
func fastAnswerBenchmarks(fixtures: HotPathFixtures) {
    Benchmark("FastAnswerHandler cached GET token x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let channel = EmbeddedChannel(handler: BenchmarkAccess.fastAnswerHandler(fixtures.gateway))
        let head = HTTPRequestHead(
            version: .http1_1, method: .GET, uri: "/v1/installations/\(fixtures.bareID)/token",
            headers: ["Host": "127.0.0.1", "Authorization": fixtures.authorization])
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try channel.writeInbound(HTTPServerRequestPart.head(head))
            try channel.writeInbound(HTTPServerRequestPart.end(nil))
            var parts = 0
            while let part = try channel.readOutbound(as: HTTPServerResponsePart.self) {
                blackHole(part)
                parts += 1
            }
            precondition(parts == 3, "the request was not answered fast")
        }
        benchmark.stopMeasurement()
        let lines = await BenchmarkAccess.takeLines(fixtures.routerAuditBuffer)
        precondition(lines?.count == benchmark.scaledIterations.count, "an answer was not audited")
    }
}

/// What the hot-path benchmarks share: a caller registry, a gateway whose flow holds the token
/// in memory (its Redis a listener that never accepts), and audit buffers nobody writes out.
final class HotPathFixtures: Sendable {
    let secret = "bench-caller-secret-0123456789"
    var authorization: String { "Bearer " + self.secret }
    let callers: CallerRegistry
    let installation: InstallationID
    let bareID: String
    let answer: TokenAnswer
    let bodies = BenchmarkAccess.AnswerBodies()
    let auditBuffer: AuditBuffer
    let audit: AuditLog
    let routerAuditBuffer: AuditBuffer
    let gateway: Gateway
    let responder: RouterResponder<BasicRequestContext>
    let tokenRequestHead: HTTPRequest
    let channel: EmbeddedChannel
    let logger: Logger
    let requestLogger = Logger(label: "token-gateway") { label in
        GatewayLogHandler(label: label, format: .logfmt, level: .critical, sink: .memory())
    }

    init(tokenValue: String, fakeRedisPort: Int) throws {
        let quiet = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })
        self.logger = quiet
        let callersJSON = #"[{"name":"bench","secret":"\#(self.secret)","installations":["*"]}]"#
        self.callers = try CallerRegistry(json: callersJSON)
        precondition(self.callers.authenticate(authorization: "Bearer " + self.secret) != nil)
        self.bareID = UUID().uuidString.lowercased()
        self.installation = InstallationID(pathSegment: self.bareID)!
        let expiresAt = Int64(Date().timeIntervalSince1970) + 3600
        self.answer = TokenAnswer(
            token: AccessToken(value: tokenValue, expiresAt: expiresAt), source: .cache,
            apiBaseUrl: "https://api.atlassian.com/ex/jira/0f2e6b2c-1111-2222-3333-444455556666")

        // The gateway's own log handler, writing into a buffer (as in production, where a
        // background service empties it).
        let dropped = Counter(label: "bench_audit_dropped")
        self.auditBuffer = AuditBuffer(downstream: .memory(), capacity: 1 << 20, dropped: dropped)
        let auditHandler = GatewayLogHandler(
            label: AuditLog.label, format: .logfmt, level: .info, sink: .buffered(self.auditBuffer))
        var auditLogger = Logger(label: AuditLog.label, factory: { _ in auditHandler })
        auditLogger.logLevel = .info
        self.audit = AuditLog(auditLogger: auditLogger)

        self.routerAuditBuffer = AuditBuffer(downstream: .memory(), capacity: 1 << 20, dropped: dropped)
        let routerBuffer = self.routerAuditBuffer
        let gatewayLogger = Logger(label: "token-gateway") { label in
            GatewayLogHandler(label: label, format: .logfmt, level: .info, sink: .buffered(routerBuffer))
        }
        let configuration = try GatewayConfiguration.load(environment: [
            "TOKEN_GATEWAY_REDIS_URL": "redis://127.0.0.1:\(fakeRedisPort)/0",
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": callersJSON,
        ])
        self.gateway = Gateway(configuration: configuration, logger: gatewayLogger)
        let now = FlowTime.now()
        self.gateway.flow.tokenDelivered(
            self.installation,
            token: AccessToken(value: tokenValue, expiresAt: expiresAt, requestID: nil, receivedAt: now.unixSeconds),
            solicitedBy: nil)
        self.responder = self.gateway.makeRouter().buildResponder()
        self.tokenRequestHead = HTTPRequest(
            method: .get, scheme: "http", authority: "127.0.0.1",
            path: "/v1/installations/\(self.bareID)/token", headerFields: [.authorization: "Bearer " + self.secret])
        self.channel = EmbeddedChannel()
    }

    /// A request's context as Hummingbird's server makes it: its logger (the gateway's handler,
    /// writing nothing below critical) carries the request id.
    func context() -> BasicRequestContext {
        var logger = self.requestLogger
        logger[metadataKey: "hb.request.id"] = .string(RequestID().description)
        return BasicRequestContext(source: ApplicationRequestContextSource(channel: self.channel, logger: logger))
    }
}
