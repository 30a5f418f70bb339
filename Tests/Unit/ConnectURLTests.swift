import FlowEngine
import Testing

@testable import TokenGateway

@Suite("Connect URL rules")
struct ConnectURLTests {
    @Test("a URL is under a tenant's base URL only with the same scheme, host, port and path prefix")
    func under() {
        let jira = "https://acme.atlassian.net"
        #expect(ConnectURL.isURL("https://acme.atlassian.net/rest/api/3/myself?x=1", under: jira))
        #expect(ConnectURL.isURL("https://ACME.atlassian.net:443/rest", under: jira))
        #expect(ConnectURL.isURL("https://acme.atlassian.net", under: jira + "/"))
        #expect(!ConnectURL.isURL("http://acme.atlassian.net/rest", under: jira))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net:8443/rest", under: jira))
        #expect(!ConnectURL.isURL("https://evil.example/rest", under: jira))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net.evil.example/rest", under: jira))
        #expect(!ConnectURL.isURL("https://user@acme.atlassian.net/rest", under: jira))
        #expect(!ConnectURL.isURL("/rest/api/3/myself", under: jira))

        let wiki = "https://acme.atlassian.net/wiki"
        #expect(ConnectURL.isURL("https://acme.atlassian.net/wiki/rest/api/content", under: wiki))
        #expect(ConnectURL.isURL("https://acme.atlassian.net/wiki", under: wiki + "/"))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net/wikipedia", under: wiki))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net/rest/api/3/myself", under: wiki))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net/wiki/../rest", under: wiki))
        #expect(!ConnectURL.isURL("https://acme.atlassian.net/wiki/%2E%2E/rest", under: wiki))
    }

    @Test("the base path of a base URL has no trailing slash")
    func basePath() {
        #expect(ConnectURL.basePath(of: "https://acme.atlassian.net/wiki/") == "/wiki")
        #expect(ConnectURL.basePath(of: "https://acme.atlassian.net") == "")
        #expect(ConnectURL.basePath(of: "https://acme.atlassian.net/") == "")
    }

    @Test("printed and dumped forms of stored tenant values never show the shared secret")
    func redaction() {
        let secret = "s3cr3t-shared-value-0123456789"
        let box = ConnectSharedSecret(Array(secret.utf8))
        let install = ConnectInstallation(
            clientKey: "ck", appKey: "app", baseUrl: "https://x.atlassian.net", payloadJSON: "{}",
            sharedSecret: Array(secret.utf8), installationId: nil)
        var dumped = ""
        dump(box, to: &dumped)
        dump(install, to: &dumped)
        let texts = ["\(box)", String(reflecting: box), "\(install)", String(reflecting: install), dumped]
        let bytes = Array(secret.utf8).map(String.init).joined(separator: ", ")
        for text in texts {
            #expect(!text.contains(secret))
            #expect(!text.contains(bytes))
        }
    }

    @Test("storable clientKeys are visible ASCII without braces")
    func clientKeys() {
        #expect(Gateway.isStorableClientKey("6f2a3c1e-0000-4000-8000-000000000000"))
        #expect(Gateway.isStorableClientKey("jira:12345"))
        #expect(!Gateway.isStorableClientKey(""))
        #expect(!Gateway.isStorableClientKey("a}b"))
        #expect(!Gateway.isStorableClientKey("a b"))
        #expect(!Gateway.isStorableClientKey(String(repeating: "k", count: 257)))
    }
}
