import FlowEngine
import Foundation
import Logging
import NIOHTTP1
import Testing

@testable import TokenGateway

@Suite("Fast answers: which requests they take, read byte by byte")
struct FastAnswerParsingTests {
    @Test(
        "the token route's target is recognised in its plain and percent-encoded forms only",
        arguments: [
            ("/v1/installations/abc/token", "abc", nil),
            ("/v1/installations/abc/token?minValidity=60", "abc", "minValidity=60"),
            ("/v1/installations/abc/token?", "abc", ""),
            (
                "/v1/installations/ari%3Acloud%3Aecosystem%3A%3Ainstallation%2Fx/token",
                "ari%3Acloud%3Aecosystem%3A%3Ainstallation%2Fx", nil
            ),
        ] as [(String, String, String?)])
    func tokenTargets(target: String, segment: String, query: String?) throws {
        let parsed = try #require(Gateway.tokenTarget(target))
        #expect(String(parsed.segment) == segment)
        #expect(parsed.query.map(String.init) == query)
    }

    @Test(
        "other targets go to the router",
        arguments: [
            "/v1/installations//token", "/v1/installations/a/b/token", "/v1/installations/abc/token/",
            "/v1/installations/abc", "/v1/installations/abc/tokens", "/V1/installations/abc/token",
            "/v1/installations/abc/token/refresh", "v1/installations/abc/token", "/health/live",
        ])
    func otherTargets(target: String) {
        #expect(Gateway.tokenTarget(target) == nil)
    }

    @Test(
        "queries of plain minValidity and timeout in range are read; every other query goes to the router",
        arguments: [
            (nil, 300), ("", 300), ("minValidity=0", 0), ("minValidity=7200", 7200), ("timeout=100", 300),
            ("timeout=30000&minValidity=60", 60), ("minValidity=7201", nil), ("timeout=99", nil),
            ("minValidity=-1", nil), ("minValidity=+5", nil), ("minValidity=", nil), ("minValidity", nil),
            ("minValidity=60&minValidity=60", nil), ("asUser=557058:a", nil), ("minValidity=60&", nil),
            ("&minValidity=60", nil), ("x=1", nil), ("minValidity=1e3", nil), ("minValidity=0000060", nil),
            ("minvalidity=60", nil), ("minValidity=6%30", nil),
        ] as [(String?, Int64?)])
    func queries(query: String?, expected: Int64?) {
        #expect(Gateway.fastMinValidity(query.map { Substring($0) }) == expected)
    }

    @Test("the Date header is the IMF-fixdate Foundation writes, for every kind of day")
    func dates() {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        var seconds: [Int64] = [0, 59, 86_399, 86_400, 951_782_400, 1_709_164_800, 1_796_446_816, 4_102_444_799]
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 { seconds.append(Int64.random(in: 0...4_102_444_799, using: &generator)) }
        for second in seconds {
            let expected = formatter.string(from: Date(timeIntervalSince1970: TimeInterval(second)))
            #expect(HTTPDate.string(unixSeconds: second) == expected, "\(second)")
        }
    }

    @Test("only bodiless GETs over HTTP/1.1 without connection handling of their own are answered fast")
    func bodiless() {
        func request(
            _ headers: HTTPHeaders, method: HTTPMethod = .GET, version: HTTPVersion = .http1_1,
            uri: String = "/health/live"
        ) -> FastRequest? {
            FastAnswerHandler.fastRequest(HTTPRequestHead(version: version, method: method, uri: uri, headers: headers))
        }
        #expect(request([:])?.target == "/health/live")
        #expect(request(["Content-Length": "0"]) != nil)
        #expect(request(["Authorization": "Bearer a"])?.authorization == "Bearer a")
        #expect(request(["AUTHORIZATION": "Bearer a"])?.authorization == "Bearer a")
        #expect(request(["Authorization": "Bearer a", "authorization": "Bearer b"]) == nil)
        #expect(request(["Content-Length": "2"]) == nil)
        #expect(request(["Transfer-Encoding": "chunked"]) == nil)
        #expect(request(["Connection": "close"]) == nil)
        #expect(request(["connection": "Keep-Alive"]) != nil)
        #expect(request(["Connection": "upgrade"]) == nil)
        #expect(request(["Expect": "100-continue"]) == nil)
        #expect(request([:], method: .HEAD) == nil)
        #expect(request([:], method: .POST) == nil)
        #expect(request([:], version: .http1_0) == nil)
        #expect(request([:], uri: "http://127.0.0.1/health/live") == nil)
        #expect(request([:], uri: "*") == nil)
    }
}

@Suite("Audit records of repeated answers: fields formatted once")
struct AuditFormattedFieldsTests {
    @Test(
        "a record from fields formatted once is the line the field-by-field record writes",
        arguments: [LogFormat.logfmt, .json])
    func sameLine(format: LogFormat) throws {
        let sink = LogSink.memory()
        let handler = GatewayLogHandler(label: AuditLog.label, format: format, level: .info, sink: sink)
        let audit = AuditLog(auditLogger: Logger(label: AuditLog.label) { _ in handler })
        for caller in ["billing", "odd \"name\" = x\\y", "ünïcødé\u{202E}"] {
            audit.tokenHandedOut(
                caller: caller, installation: HotPathFixtures.installation, source: "cache",
                expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", accountId: nil, via: "api")
            let fields = try #require(
                audit.handedOutFields(
                    caller: caller, installation: HotPathFixtures.installation, source: "cache",
                    expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", via: "api"))
            audit.tokenHandedOut(fields)
            let lines = sink.captured.suffix(2).map(Self.withoutTimestamp)
            #expect(lines.count == 2 && lines[0] == lines[1], "\(lines)")
        }
    }

    static func withoutTimestamp(_ line: String) -> String {
        line.replacing(/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/, with: "TS")
    }

    @Test("a handler other than the gateway's own gets no formatted fields: records keep the metadata path")
    func otherHandler() {
        let audit = AuditLog(auditLogger: Logger(label: AuditLog.label) { _ in SwiftLogNoOpLogHandler() })
        #expect(
            audit.handedOutFields(
                caller: "billing", installation: HotPathFixtures.installation, source: "cache",
                expiresAt: "2030-03-17T17:46:40Z", fingerprint: "0123456789ab", via: "api") == nil)
    }
}
