import FlowEngine
import Foundation
import Logging
import Testing

@testable import TokenGateway

/// Contract §7's defaults table, read back from a configuration loaded with only the required
/// settings; and the defaults of §3 (trigger allow-list) and §5 (Connect install keys URL).
@Suite struct ConfigurationDefaultsTests {
    static let required: [String: String] = [
        "TOKEN_GATEWAY_FORGE_APP_ID": "ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        "TOKEN_GATEWAY_ENCRYPTION_KEYS": "k1:" + Data(repeating: 7, count: 32).base64EncodedString(),
        "TOKEN_GATEWAY_CALLERS": #"[{"name":"a","secret":"caller-secret-0123456789","installations":["*"]}]"#,
    ]

    @Test func theDefaultsTable() throws {
        let config = try GatewayConfiguration.load(environment: Self.required)
        #expect(config.host == "127.0.0.1")
        #expect(config.port == 8080)
        #expect(config.redis.endpoint == .direct(host: "127.0.0.1", port: 6379))
        #expect(config.redis.database == 0)
        #expect(config.redis.password == nil)
        #expect(config.forgeJWKSURL == "https://forge.cdn.prod.atlassian-dev.net/.well-known/jwks.json")
        #expect(config.connectBaseURL == nil)
        #expect(config.connectKeysURL == "https://connect-install-keys.atlassian.com")
        #expect(config.forgeGraphQLURL == "https://api.atlassian.com/graphql")
        #expect(config.userExchangesPerMinute == 1000)
        #expect(config.publicURL == nil)
        #expect(config.effectivePublicURL == "http://127.0.0.1:8080")
        #expect(config.logLevel == .info)
        #expect(config.eventLoopAffinity == .shared)
    }

    @Test(
        "whitespace around a value (a file's or a YAML block's last newline) is not part of it; only whitespace is unset"
    )
    func valuesAreTrimmed() throws {
        var environment = Self.required
        environment["TOKEN_GATEWAY_PORT"] = "9090\n"
        environment["TOKEN_GATEWAY_TRIGGER_HOSTS"] = " *.webtrigger.atlassian.app\n"
        environment["TOKEN_GATEWAY_REFRESH_AHEAD_FRACTION"] = "0.3\r\n"
        environment["TOKEN_GATEWAY_LOG_LEVEL"] = "debug\n"
        environment["TOKEN_GATEWAY_HOST"] = " \n"
        let config = try GatewayConfiguration.load(environment: environment)
        #expect(config.port == 9090)
        #expect(config.triggerHosts.allows("https://a.webtrigger.atlassian.app/x"))
        #expect(!config.triggerHosts.allows("https://a.hello.atlassian-dev.net/x"))
        #expect(config.flow.refreshAheadFraction == 0.3)
        #expect(config.logLevel == .debug)
        #expect(config.host == "127.0.0.1")
    }

    @Test("every list setting refuses an empty entry (a doubled or trailing comma), naming the setting")
    func listsRefuseEmptyEntries() throws {
        for (variable, value) in [
            ("TOKEN_GATEWAY_TRIGGER_HOSTS", "*.webtrigger.atlassian.app,,*.hello.atlassian-dev.net"),
            ("TOKEN_GATEWAY_TRIGGER_HOSTS", "*.webtrigger.atlassian.app,"),
            ("TOKEN_GATEWAY_API_BASE_URL_PREFIXES", "https://api.atlassian.com/ex/, ,https://example.com/"),
            ("TOKEN_GATEWAY_FORGE_MODULE_KEYS", "gateway-endpoint,"),
        ] {
            var environment = Self.required
            environment[variable] = value
            let refusal = Self.refusal(environment)
            #expect(refusal?.setting == variable, "\(variable)=\(value): \(String(describing: refusal))")
            #expect(refusal?.problem.contains("comma") == true, "\(String(describing: refusal))")
        }
    }

    /// The configuration error loading `environment` gives, or nil when it loads.
    static func refusal(_ environment: [String: String]) -> ConfigurationError? {
        do {
            _ = try GatewayConfiguration.load(environment: environment)
            return nil
        } catch {
            return error
        }
    }

    @Test(
        "listening on every address without a public URL, or an http public URL off loopback, is warned about (OAuth discovery would name it)"
    )
    func publicURLWarning() throws {
        for (host, publicURL, warned) in [
            ("0.0.0.0", nil, true), ("::", nil, true), ("0:0:0:0:0:0:0:0", nil, true), ("127.0.0.1", nil, false),
            ("0.0.0.0", "https://tokens.example.com", false),
            // An http public URL, set or the default: warned about unless it is loopback.
            ("gateway-1.internal.example.com", nil, true), ("10.0.0.5", nil, true), ("::1", nil, false),
            ("localhost", nil, false),
            ("127.0.0.1", "http://tokens.example.com", true), ("0.0.0.0", "HTTP://10.0.0.5:8080/gw", true),
            ("127.0.0.1", "http://127.0.0.1:8080", false), ("127.0.0.1", "http://localhost:8080", false),
        ] as [(String, String?, Bool)] {
            var environment = Self.required
            environment["TOKEN_GATEWAY_HOST"] = host
            environment["TOKEN_GATEWAY_PUBLIC_URL"] = publicURL
            let config = try GatewayConfiguration.load(environment: environment)
            #expect((config.publicURLWarning != nil) == warned, "\(host) \(publicURL ?? "-")")
        }
    }

    @Test(
        "listen hosts: IP literals and host names are taken, anything else is a configuration error naming the setting")
    func listenHosts() throws {
        let good = [
            ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"), ("::", "::"), ("::1", "::1"), ("[::1]", "::1"),
            ("localhost", "localhost"), ("gateway-1.internal.example.com", "gateway-1.internal.example.com"),
        ]
        for (raw, expected) in good {
            for variable in ["TOKEN_GATEWAY_HOST", "TOKEN_GATEWAY_OPS_HOST"] {
                var environment = Self.required
                environment[variable] = raw
                environment["TOKEN_GATEWAY_OPS_PORT"] = "9090"
                let config = try GatewayConfiguration.load(environment: environment)
                let host = variable == "TOKEN_GATEWAY_HOST" ? config.host : config.operationsListener?.host
                #expect(host == expected, "\(variable)=\(raw)")
            }
        }
        let bad = [
            "gateway host", "-gateway.example.com", "gateway..example.com", "gate_way.example.com",
            "http://127.0.0.1", "127.0.0.1:8080", String(repeating: "a", count: 64) + ".example.com",
        ]
        for raw in bad {
            for variable in ["TOKEN_GATEWAY_HOST", "TOKEN_GATEWAY_OPS_HOST"] {
                var environment = Self.required
                environment[variable] = raw
                environment["TOKEN_GATEWAY_OPS_PORT"] = "9090"
                do {
                    _ = try GatewayConfiguration.load(environment: environment)
                    Issue.record("\(variable)=\(raw) was taken")
                } catch {
                    #expect(error.setting == variable, "\(variable)=\(raw)")
                    #expect(!error.description.contains(raw), "\(error)")
                }
            }
        }
    }

    @Test func theEventLoopAffinityIsSharedOrPinned() throws {
        for (value, expected) in [("shared", EventLoopAffinity.shared), ("pinned", .pinned), ("PINNED", .pinned)] {
            var environment = Self.required
            environment["TOKEN_GATEWAY_EVENT_LOOP_AFFINITY"] = value
            #expect(try GatewayConfiguration.load(environment: environment).eventLoopAffinity == expected)
        }
        var environment = Self.required
        environment["TOKEN_GATEWAY_EVENT_LOOP_AFFINITY"] = "sometimes"
        #expect(
            throws: ConfigurationError(
                setting: "TOKEN_GATEWAY_EVENT_LOOP_AFFINITY", problem: "must be shared or pinned")
        ) {
            try GatewayConfiguration.load(environment: environment)
        }
    }

    @Test("base URL settings take scheme, host, port and path; a query, fragment or credentials is refused")
    func baseURLSettings() throws {
        for variable in ["TOKEN_GATEWAY_PUBLIC_URL", "TOKEN_GATEWAY_CONNECT_BASE_URL"] {
            for good in [
                "https://tokens.example.com", "https://tokens.example.com:8443/gateway", "http://127.0.0.1:8080/",
            ] {
                var environment = Self.required
                environment[variable] = good
                _ = try GatewayConfiguration.load(environment: environment)
            }
            for bad in [
                "https://tokens.example.com/?a=b", "https://tokens.example.com#top",
                "https://user:pw@tokens.example.com",
                "ftp://tokens.example.com", "tokens.example.com",
            ] {
                var environment = Self.required
                environment[variable] = bad
                do {
                    _ = try GatewayConfiguration.load(environment: environment)
                    Issue.record("\(variable)=\(bad) was taken")
                } catch {
                    #expect(error.setting == variable, "\(variable)=\(bad)")
                    #expect(!error.description.contains("pw"), "\(error)")
                }
            }
        }
    }

    @Test func thePublicURLDefaultFollowsHostAndPort() throws {
        var environment = Self.required
        environment["TOKEN_GATEWAY_HOST"] = "10.1.2.3"
        environment["TOKEN_GATEWAY_PORT"] = "9090"
        #expect(try GatewayConfiguration.load(environment: environment).effectivePublicURL == "http://10.1.2.3:9090")
    }

    @Test func theDefaultTriggerAllowListIsForgesWebTriggerHostsOverHTTPS() throws {
        let allowList = try GatewayConfiguration.load(environment: Self.required).triggerHosts
        for url in [
            "https://0123abcd.hello.atlassian-dev.net/x1/trigger", "https://a.b.webtrigger.atlassian.app/x",
        ] {
            #expect(allowList.allows(url), "\(url)")
        }
        for url in [
            "http://0123abcd.hello.atlassian-dev.net/x1/trigger", "https://hello.atlassian-dev.net/x",
            "https://0123abcd.hello.atlassian-dev.net:8443/x", "https://webtrigger.atlassian.app.example.com/x",
            "https://example.com/x", "http://127.0.0.1:8080/x", "https://localhost/x",
        ] {
            #expect(!allowList.allows(url), "\(url)")
        }
    }

    @Test func theConnectVerifierFetchesKeysFromTheDefaultURL() throws {
        var environment = Self.required
        environment["TOKEN_GATEWAY_CONNECT_BASE_URL"] = "https://app.example.com"
        let config = try GatewayConfiguration.load(environment: environment)
        #expect(config.connectKeysURL == SignedInstallVerifier.productionKeysURL)
        #expect(
            SignedInstallVerifier.Configuration(appBaseURL: "https://app.example.com").keysURL
                == "https://connect-install-keys.atlassian.com")
    }
}
