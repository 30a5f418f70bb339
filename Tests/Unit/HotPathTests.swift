import Crypto
import FlowEngine
import Foundation
import Logging
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle
import Testing

@testable import TokenGateway

@Suite("Audit buffer: never blocks a request, never drops silently")
struct AuditBufferTests {
    /// The value of an unlabelled counter in the registry's exposition.
    static func counterValue(_ registry: PrometheusCollectorRegistry, _ name: String) -> Double? {
        var bytes: [UInt8] = []
        registry.emit(into: &bytes)
        let text = String(decoding: bytes, as: UTF8.self)
        for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.dropFirst(name.count + 1))
        }
        return nil
    }

    @Test("every record queued before graceful shutdown is written, in order per writer")
    func flushedOnShutdown() async throws {
        let registry = PrometheusCollectorRegistry()
        let metrics = GatewayMetrics(factory: PrometheusMetricsFactory(registry: registry))
        let sink = LogSink.memory()
        let buffer = AuditBuffer(downstream: sink, capacity: 100_000, dropped: metrics.auditRecordsDropped)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: AuditFlushService(buffer: buffer))],
                logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            await withTaskGroup(of: Void.self) { writers in
                for writer in 0..<4 {
                    writers.addTask {
                        for n in 0..<500 { LogSink.buffered(buffer).write("w\(writer) n\(n)\n") }
                    }
                }
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let lines = sink.captured
        #expect(lines.count == 2000)
        for writer in 0..<4 {
            #expect(lines.filter { $0.hasPrefix("w\(writer) ") } == (0..<500).map { "w\(writer) n\($0)\n" })
        }
        #expect(buffer.dropped == 0)
        #expect(buffer.pending == 0)
        #expect(Self.counterValue(registry, "token_gateway_audit_records_dropped_total") == 0)
        // After shutdown a record is written directly.
        LogSink.buffered(buffer).write("late\n")
        #expect(sink.captured.last == "late\n")
    }

    @Test("a full buffer counts exactly what it drops, and keeps what it holds")
    func overflowCounted() async throws {
        let registry = PrometheusCollectorRegistry()
        let metrics = GatewayMetrics(factory: PrometheusMetricsFactory(registry: registry))
        let sink = LogSink.memory()
        let buffer = AuditBuffer(downstream: sink, capacity: 5, dropped: metrics.auditRecordsDropped)
        for n in 0..<12 { buffer.append("n\(n)\n") }
        #expect(buffer.pending == 5)
        #expect(buffer.dropped == 7)
        #expect(Self.counterValue(registry, "token_gateway_audit_records_dropped_total") == 7)
        #expect(sink.captured.isEmpty)
        buffer.flush()
        #expect(sink.captured == (0..<5).map { "n\($0)\n" })
        // Room again: nothing more is dropped.
        buffer.append("again\n")
        #expect(buffer.dropped == 7)
        #expect(buffer.pending == 1)
    }

    @Test("a gateway logging to a stream queues audit records and runs the flush service first")
    func gatewayUsesTheBuffer() throws {
        let handler = GatewayLogHandler(label: "token-gateway", format: .logfmt, level: .info, sink: .standardError)
        let logger = Logger(label: "token-gateway") { _ in handler }
        let gateway = Gateway(configuration: try HotPathFixtures.configuration(), logger: logger)
        defer { try? gateway.httpClient.syncShutdown() }
        let buffer = try #require(gateway.auditBuffer)
        #expect(gateway.services().first is AuditFlushService)
        gateway.audit.tokenHandedOut(
            caller: "billing", installation: HotPathFixtures.installation, source: "cache", expiresAt: 1_900_000_000,
            token: "eyJ.secret.token")
        #expect(buffer.pending == 1)
        // Written here rather than by a flush service (this test runs none); standard error takes it.
        buffer.close()
        buffer.flush()
        #expect(buffer.pending == 0)
        // A memory sink (tests) is written directly.
        let memory = Gateway(
            configuration: try HotPathFixtures.configuration(),
            logger: Logger(label: "token-gateway") { _ in
                GatewayLogHandler(label: "token-gateway", format: .logfmt, level: .info, sink: .memory())
            })
        defer { try? memory.httpClient.syncShutdown() }
        #expect(memory.auditBuffer == nil)
        #expect(!(memory.services().first is AuditFlushService))
    }
}

@Suite("Tracing costs nothing when no tracer is bootstrapped")
struct TracingOffTests {
    @Test("without a bootstrapped instrument the tracing middleware is left out of the router")
    func noInstrument() {
        // The process bootstraps no instrument in tests, so answers keep a body of known length
        // that leaves with its head in one write.
        #expect(!Gateway.tracingBootstrapped)
    }
}

enum HotPathFixtures {
    static let installation = InstallationID("ari:cloud:ecosystem::installation/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")!

    static func configuration() throws -> GatewayConfiguration {
        try GatewayConfiguration.load(environment: [
            "TOKEN_GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0",
            "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
            "TOKEN_GATEWAY_CALLERS": #"[{"name":"billing","secret":"s3cret-value-0123456789","installations":["*"]}]"#,
        ])
    }
}

@Suite("Token answer bytes written once per cached token")
struct TokenAnswerBodyTests {
    static let installation = "ari:cloud:ecosystem::installation/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"

    @Test(
        "the direct writer makes the general JSON writer's bytes for every source, with and without apiBaseUrl",
        arguments: [TokenSource.cache, .trigger, .push])
    func sameBytes(source: TokenSource) throws {
        let tokens = ["eyJhbGciOi.eyJzdWIi.c2ln", "tok\"with\\quotes\u{1}and\ncontrol", "ünïcødé-token"]
        let bases: [String?] = [
            nil, "https://api.atlassian.com/ex/jira/0f2e6b2c-1111-2222-3333-444455556666", "https://x.example/\"odd\\",
        ]
        for token in tokens {
            for base in bases {
                for expiresAt: Int64 in [0, 1_900_000_000, 253_402_300_799] {
                    let answer = TokenAnswer(
                        token: AccessToken(value: token, expiresAt: expiresAt), source: source, apiBaseUrl: base)
                    let fast = String(buffer: TokenAnswerBodies.encode(installation: Self.installation, answer: answer))
                    let slow = TokenAnswerBodies.slowBody(installation: Self.installation, answer: answer)
                    #expect(fast == slow)
                    let parsed = try #require(
                        try JSONSerialization.jsonObject(with: Data(fast.utf8)) as? [String: Any])
                    #expect(parsed["accessToken"] as? String == token)
                    #expect(parsed["apiBaseUrl"] as? String == base)
                    #expect(parsed["source"] as? String == source.rawValue)
                }
            }
        }
    }

    @Test("answers from the cache reuse their bytes until the token, expiry or apiBaseUrl changes")
    func reusedUntilChanged() {
        let bodies = TokenAnswerBodies()
        let id = HotPathFixtures.installation
        func check(_ answer: TokenAnswer) -> TokenAnswerBodies.Prepared {
            let prepared = bodies.prepared(installation: id, answer: answer)
            #expect(String(buffer: prepared.body) == TokenAnswerBodies.slowBody(installation: id.ari, answer: answer))
            #expect(prepared.fingerprint == AuditLog.fingerprint(answer.token.value))
            #expect(prepared.expiresAt == RFC3339.string(unixSeconds: answer.token.expiresAt))
            return prepared
        }
        let base = "https://api.atlassian.com/ex/jira/a"
        let first = TokenAnswer(
            token: AccessToken(value: "t1", expiresAt: 1_900_000_000), source: .cache, apiBaseUrl: base)
        let a = check(first)
        let b = check(first)
        // The same storage: written once.
        #expect(a.body.withUnsafeReadableBytes { $0.baseAddress } == b.body.withUnsafeReadableBytes { $0.baseAddress })
        #expect(bodies.count == 1)
        _ = check(
            TokenAnswer(token: AccessToken(value: "t1", expiresAt: 1_900_000_000), source: .cache, apiBaseUrl: nil))
        _ = check(
            TokenAnswer(
                token: AccessToken(value: "t1", expiresAt: 1_900_000_000), source: .cache, apiBaseUrl: base + "x"))
        _ = check(
            TokenAnswer(token: AccessToken(value: "t2", expiresAt: 1_900_000_000), source: .cache, apiBaseUrl: base))
        _ = check(
            TokenAnswer(token: AccessToken(value: "t2", expiresAt: 1_900_000_001), source: .cache, apiBaseUrl: base))
        // Other sources are written for their answer and not kept.
        let trigger = TokenAnswer(
            token: AccessToken(value: "t3", expiresAt: 1_900_000_000), source: .trigger, apiBaseUrl: base)
        _ = check(trigger)
        _ = check(
            TokenAnswer(token: AccessToken(value: "t3", expiresAt: 1_900_000_000), source: .cache, apiBaseUrl: base))
        #expect(bodies.count == 1)
    }

    @Test("the kept answers are bounded")
    func bounded() {
        let bodies = TokenAnswerBodies(capacity: 3)
        for n in 0..<10 {
            let id = InstallationID("ari:cloud:ecosystem::installation/00000000-0000-0000-0000-00000000000\(n)")!
            _ = bodies.prepared(
                installation: id, answer: TokenAnswer(token: AccessToken(value: "t\(n)", expiresAt: 1), source: .cache))
            #expect(bodies.count <= 3)
        }
    }
}

@Suite("Caller authentication remembers verified secrets by keyed tag")
struct VerifiedCredentialsTests {
    static let registry = try! CallerRegistry(
        json: #"[{"name":"billing","secret":"billing-secret-00001","installations":["*"]},"#
            + #"{"name":"reports","secretSha256":"\#(SHA256Hex.of("reports-secret-00002"))"}]"#)

    @Test("a repeated secret authenticates as the same caller; wrong and near secrets never do")
    func repeated() {
        let registry = Self.registry
        for _ in 0..<3 {
            #expect(registry.authenticate(authorization: "Bearer billing-secret-00001")?.name == "billing")
            #expect(registry.authenticate(authorization: "bearer reports-secret-00002")?.name == "reports")
            #expect(registry.authenticate(authorization: "Bearer billing-secret-00002") == nil)
            #expect(registry.authenticate(authorization: "Bearer billing-secret-0000") == nil)
            #expect(registry.authenticate(authorization: "Bearer billing-secret-00001x") == nil)
            #expect(registry.authenticate(authorization: "Bearer reports-secret-00002 x") == nil)
        }
    }

    @Test("tags are keyed per process instance and differ for different secrets")
    func tags() {
        let one = VerifiedCredentials()
        let two = VerifiedCredentials()
        #expect(one.tag("s") == one.tag("s"))
        #expect(one.tag("s") != one.tag("t"))
        #expect(one.tag("s") != two.tag("s"))
        for n in 0..<(VerifiedCredentials.capacity + 10) { one.remember(one.tag("s\(n)"), caller: 0) }
        #expect(one.count <= VerifiedCredentials.capacity)
    }
}

enum SHA256Hex {
    static func of(_ s: String) -> String {
        SHA256.hash(data: Array(s.utf8)).map { String(format: "%02x", $0) }.joined()
    }
}

@Suite("Audit records handed out per request are written from their fields, without a metadata dictionary")
struct AuditDirectLineTests {
    /// The line's timestamp (`ts=…` or `"ts":"…"`).
    static func timestamp(of line: String, format: LogFormat) -> String? {
        switch format {
        case .logfmt:
            guard line.hasPrefix("ts=") else { return nil }
            return line.dropFirst(3).split(separator: " ").first.map(String.init)
        case .json:
            guard line.hasPrefix(#"{"ts":""#) else { return nil }
            return line.dropFirst(7).split(separator: "\"").first.map(String.init)
        }
    }

    @Test(
        "the direct line is the line the metadata path writes, for plain and odd values, with and without an account",
        arguments: [LogFormat.logfmt, .json])
    func sameLine(format: LogFormat) throws {
        let sink = LogSink.memory()
        let handler = GatewayLogHandler(label: AuditLog.label, format: format, level: .info, sink: sink)
        let audit = AuditLog(auditLogger: Logger(label: AuditLog.label) { _ in handler })
        #expect(audit.direct != nil)
        let callers = ["billing", "odd \"name\" = x\\y", "ünïcødé\u{202E}"]
        let accounts: [String?] = [nil, "5b10ac8d82e05b22cc7d4ef5", "with space"]
        for caller in callers {
            for account in accounts {
                for via in ["api", "oauth"] {
                    audit.tokenHandedOut(
                        caller: caller, installation: HotPathFixtures.installation, source: "cache",
                        expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", accountId: account, via: via)
                    let line = try #require(sink.captured.last)
                    var metadata: Logger.Metadata = [
                        "audit.event": "token_handed_out", "caller": "\(caller)",
                        "installation.id": "\(HotPathFixtures.installation)", "token.source": "cache",
                        "token.expires_at": "2030-03-17T17:46:40Z", "token.fingerprint": "0123456789ab",
                        "audit.via": "\(via)",
                    ]
                    if let account { metadata["account.id"] = "\(account)" }
                    let ts = try #require(Self.timestamp(of: line, format: format))
                    let epoch = Date(timeIntervalSince1970: 0)
                    let expected =
                        GatewayLogHandler.format(
                            format: format, timestamp: epoch, level: .info, label: AuditLog.label,
                            message: "token handed out", metadata: metadata
                        ).replacingOccurrences(of: GatewayLogHandler.timestamp(epoch), with: ts) + "\n"
                    #expect(line == expected)
                }
            }
        }
        #expect(sink.captured.count == callers.count * accounts.count * 2)
    }

    @Test("a handler with metadata of its own keeps the metadata path, and its fields stay in the record")
    func handlerMetadataKept() throws {
        let sink = LogSink.memory()
        let handler = GatewayLogHandler(label: AuditLog.label, format: .logfmt, level: .info, sink: sink)
        let audit = AuditLog(logger: Logger(label: AuditLog.label) { _ in handler })
        #expect(audit.direct == nil)
        audit.tokenHandedOut(
            caller: "billing", installation: HotPathFixtures.installation, source: "cache",
            expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", accountId: nil, via: "api")
        let line = try #require(sink.captured.last)
        #expect(line.contains(" audit=true "))
        #expect(line.contains(" audit.event=token_handed_out "))
        #expect(line.contains(" token.fingerprint=0123456789ab "))
    }

    @Test("a record below the handler's level is not written")
    func levelRespected() {
        let sink = LogSink.memory()
        let handler = GatewayLogHandler(label: AuditLog.label, format: .logfmt, level: .warning, sink: sink)
        let audit = AuditLog(auditLogger: Logger(label: AuditLog.label) { _ in handler })
        audit.tokenHandedOut(
            caller: "billing", installation: HotPathFixtures.installation, source: "cache",
            expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", accountId: nil, via: "api")
        #expect(sink.captured.isEmpty)
    }
}
