import Logging
import Testing

@testable import TokenGateway

/// `TOKEN_GATEWAY_API_BASE_URL_PREFIXES` at work: an `apiBaseUrl` outside them is refused, and the
/// operator is told once per origin why installations answer `apiBaseUrl: null`.
@Suite("apiBaseUrl policy")
struct APIBaseURLPolicyTests {
    @Test("a refused apiBaseUrl is logged once per origin, with its origin and never its path")
    func refusedOriginsAreLoggedOnce() {
        let sink = LogSink.memory()
        let logger = Logger(label: "t") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: sink) }
        let policy = RefusedAPIBaseURLOrigins(prefixes: ["https://api.atlassian.com/ex/"], logger: logger)
        #expect(policy.allows("https://api.atlassian.com/ex/jira/1b7c"))
        #expect(sink.captured.isEmpty)
        #expect(!policy.allows("https://api.stg.atlassian.com/ex/jira/site-one"))
        #expect(!policy.allows("https://api.stg.atlassian.com/ex/jira/site-two"))
        #expect(!policy.allows("http://127.0.0.1:9999/ex/jira/x"))
        #expect(sink.captured.count == 2, "\(sink.captured)")
        #expect(sink.captured[0].contains("https://api.stg.atlassian.com"))
        #expect(sink.captured[0].contains("TOKEN_GATEWAY_API_BASE_URL_PREFIXES"))
        #expect(sink.captured[1].contains("http://127.0.0.1"))
        #expect(!sink.captured.joined().contains("site-one"))
    }

    @Test("by default a FIT's apiBaseUrl is taken as it is: any plain https URL, or http to loopback")
    func defaultTakesTheFITsValue() {
        let sink = LogSink.memory()
        let logger = Logger(label: "t") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: sink) }
        let policy = RefusedAPIBaseURLOrigins(prefixes: GatewayConfiguration.anyAPIBaseURL, logger: logger)
        for url in [
            "https://api.atlassian.com/ex/jira/1b7c", "https://api.stg.atlassian.com/ex/confluence/x",
            "http://127.0.0.1:9999/ex/jira/x", "http://localhost:8081/ex/jira/x", "http://[::1]:80/ex/jira/x",
            // Loopback on the default port.
            "http://localhost/ex/jira/c1", "http://127.0.0.1/ex/jira/c1", "http://[::1]/ex/jira/c1",
        ] {
            #expect(policy.allows(url), "\(url)")
        }
        for url in [
            "http://api.atlassian.com/ex/jira/1", "https://api.atlassian.com/ex/jira/1@evil.example",
            "https://api.atlassian.com/ex/../x", "https:///ex/jira", "ftp://api.atlassian.com/ex/jira/1",
            "http://127.0.0.1.evil.example/ex", "http://localhost.evil.example/ex", "http://localhost//ex", "",
        ] {
            #expect(!policy.allows(url), "\(url)")
        }
    }
}
