import Foundation
import Testing

@testable import TokenGateway

@Suite("Trust roots")
struct TrustRootTests {
    @Test("loopback means localhost, a dotted 127.0.0.0/8 address or ::1, written as such")
    func loopback() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "127.255.255.255", "[::1]", "::1"] {
            #expect(TrustRoot.isLoopback(host), "\(host)")
        }
        for host in [
            "127.evil.example", "127.0.0.1.nip.io", "127.0.0.1.", "127.0.0", "127.0.0.256", "127.00.0.1", "0x7f.0.0.1",
            "2130706433", "128.0.0.1", "localhost.evil.example", "evil-localhost", "[::2]", "[::ffff:127.0.0.1]", "",
            "127.0.0.-1", "127.0.0.1:80",
        ] {
            #expect(!TrustRoot.isLoopback(host), "\(host)")
        }
    }

    @Test("trust roots must be https, or http to loopback; anything else names the setting")
    func trustRootURLs() throws {
        for url in [
            "https://forge.cdn.prod.atlassian-dev.net/.well-known/jwks.json", "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks", "http://[::1]:9/x",
        ] {
            #expect(try TrustRoot.validate(url, setting: "S") == url)
        }
        for url in [
            "http://127.evil.example/jwks", "http://forge.example/jwks", "ftp://127.0.0.1/x", "https://user:pw@host/x",
            "jwks.json", "http://127.0.0.1.nip.io/x",
        ] {
            #expect(throws: ConfigurationError.self, "\(url)") { try TrustRoot.validate(url, setting: "S") }
        }
    }

    @Test("the trigger allow-list's plain-http entries need a loopback host written as such")
    func triggerAllowListLoopback() throws {
        #expect(throws: (any Error).self) { try TriggerHostAllowList(parsing: "http://127.evil.example:8080") }
        #expect(throws: (any Error).self) { try TriggerHostAllowList(parsing: "http://127.0.0.1.nip.io:80") }
        _ = try TriggerHostAllowList(parsing: "http://127.0.0.1:8080,http://localhost:9,http://[::1]:7")
    }

    @Test("a trigger URL whose host is percent-encoded is refused: the decoded name could hide another address")
    func triggerAllowListRefusesEncodedHosts() throws {
        let list = try TriggerHostAllowList(parsing: "*.hello.atlassian-dev.net,exact.example.com,http://127.0.0.1:9")
        for url in [
            "https://10.0.0.5%00.hello.atlassian-dev.net/x1/a", "https://10.0.0.5%2F.hello.atlassian-dev.net/x1/a",
            "https://evil%2Etest.hello.atlassian-dev.net/x1/a", "https://ab%63.hello.atlassian-dev.net/x1/a",
            "https://exact%2Eexample.com/x", "http://127.0.0.%31:9/x",
        ] {
            #expect(!list.allows(url), "\(url)")
        }
        #expect(list.allows("https://abc.hello.atlassian-dev.net/x1/a"))
        #expect(list.allows("https://exact.example.com/x"))
        #expect(list.allows("http://127.0.0.1:9/x"))
    }
}
