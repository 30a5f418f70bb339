import Foundation
import Testing

@testable import FlowEngine
@testable import TokenGateway

@Suite("Status page: operators, escaping, ordering, round-trip records")
struct StatusPageUnitTests {
    static let secret = "operator-secret-0123456789abcdef"

    @Test("\"operator\": true marks an operator; it defaults to false and must be a boolean")
    func operatorFlag() throws {
        let registry = try CallerRegistry(
            json: """
                [{"name":"ops","secret":"\(Self.secret)","installations":["*"],"operator":true},
                 {"name":"app","secret":"app-secret-0123456789abcdef"}]
                """)
        #expect(registry.callers.map(\.isOperator) == [true, false])
        #expect(throws: ConfigurationValueError.self) {
            try CallerRegistry(json: #"[{"name":"ops","secret":"\#(Self.secret)","operator":"yes"}]"#)
        }
        // A number is no boolean (Foundation's `as? Bool` would take 1 as true).
        #expect(throws: ConfigurationValueError.self) {
            try CallerRegistry(json: #"[{"name":"ops","secret":"\#(Self.secret)","operator":1}]"#)
        }
    }

    @Test("HTTP Basic credentials name the caller; a wrong secret, name or encoding does not")
    func basicCredentials() throws {
        let registry = try CallerRegistry(json: #"[{"name":"ops","secret":"\#(Self.secret)","operator":true}]"#)
        func basic(_ text: String) -> String { "Basic " + Data(text.utf8).base64EncodedString() }
        #expect(registry.authenticate(basicAuthorization: basic("ops:\(Self.secret)"))?.name == "ops")
        #expect(
            registry.authenticate(basicAuthorization: "basic " + Data("ops:\(Self.secret)".utf8).base64EncodedString())?
                .name == "ops")
        #expect(registry.authenticate(basicAuthorization: basic("ops:wrong")) == nil)
        #expect(registry.authenticate(basicAuthorization: basic("other:\(Self.secret)")) == nil)
        #expect(registry.authenticate(basicAuthorization: basic("ops")) == nil)
        #expect(registry.authenticate(basicAuthorization: "Basic !!!") == nil)
        #expect(registry.authenticate(basicAuthorization: "Bearer \(Self.secret)") == nil)
        #expect(registry.authenticate(basicAuthorization: nil) == nil)
    }

    @Test("interpolated text is HTML-escaped")
    func escaping() {
        #expect(
            StatusPage.escape(#"<script>alert("x")</script> & 'y'"#)
                == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;")
        #expect(StatusPage.escape("a\u{1}b") == "a\u{FFFD}b")
    }

    @Test("round-trip records keep only numbers and words, and read back")
    func recordEncoding() {
        let record = RoundTripRecord(
            startedAt: 1_700_000_000_123, durationMs: 250, outcome: "http error", attempts: 2, replica: "gw_1")
        let copy = RoundTripRecord(encoded: record.encoded)
        #expect(copy?.outcome == "httperror")
        #expect(copy?.startedAt == 1_700_000_000_123)
        #expect(copy?.durationMs == 250)
        #expect(copy?.attempts == 2)
        #expect(copy?.replica == "gw_1")
        #expect(RoundTripRecord(encoded: "v2 1 2 x 1 r") == nil)
    }

    @Test("the chart is an SVG with a text alternative and one mark per round trip of the last hour")
    func chart() {
        let now = FlowTime(unixSeconds: 1_800_000_000)
        let records = [
            RoundTripRecord(
                startedAt: now.unixMilliseconds - 60_000, durationMs: 120, outcome: "success", attempts: 1, replica: "a"
            ),
            RoundTripRecord(
                startedAt: now.unixMilliseconds - 120_000, durationMs: 4_000, outcome: "timeout", attempts: 2,
                replica: "a"),
            RoundTripRecord(
                startedAt: now.unixMilliseconds - 7_200_000, durationMs: 10, outcome: "success", attempts: 1,
                replica: "a"),
        ]
        let svg = StatusPage.chart(records, now: now, id: "c")
        #expect(svg.contains("role=\"img\""))
        #expect(svg.contains("2 round trips in the last hour: 1 success, 1 timeout; slowest 4000 ms."))
        #expect(svg.components(separatedBy: "<circle").count - 1 == 1)
        #expect(svg.components(separatedBy: "stroke=\"#c62828\"").count - 1 == 1)
        #expect(!svg.contains("http"))
    }
}
