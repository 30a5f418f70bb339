import Foundation
import Testing

@testable import TokenGateway

@Suite struct CanonicalRequestTests {
    struct VectorFile: Decodable {
        struct Case: Decodable {
            let method: String
            let url: String
            let canonical: String
            let qsh: String
            let tenantBaseUrl: String?
            let fullUrl: String?
        }

        let cases: [Case]
    }

    /// The vectors in `Fixtures/qsh.json` beside this file (computed with Atlassian's atlassian-jwt
    /// library; see `Fixtures/README.md`).
    static func loadVectors(filePath: String = #filePath) throws -> [VectorFile.Case] {
        let url = URL(fileURLWithPath: filePath)
            .deletingLastPathComponent()
            .appendingPathComponent("Fixtures/qsh.json")
            .standardizedFileURL
        let data = try Data(contentsOf: url)
        return try JSONDecoder().decode(VectorFile.self, from: data).cases
    }

    static func basePath(of tenantBaseUrl: String) -> String {
        URLComponents(string: tenantBaseUrl)?.path ?? ""
    }

    @Test func vectorsLoad() throws {
        let cases = try Self.loadVectors()
        #expect(cases.count >= 20)
    }

    @Test func everyVectorCanonicalAndQSHMatch() throws {
        for vector in try Self.loadVectors() {
            #expect(
                CanonicalRequest.canonical(method: vector.method, url: vector.url) == vector.canonical,
                "\(vector.method) \(vector.url)"
            )
            #expect(CanonicalRequest.qsh(method: vector.method, url: vector.url) == vector.qsh, "\(vector.url)")
        }
    }

    @Test func vectorsWithAContextPathMatchFromTheFullURL() throws {
        let withBase = try Self.loadVectors().filter { $0.tenantBaseUrl != nil }
        #expect(!withBase.isEmpty)
        for vector in withBase {
            let base = Self.basePath(of: vector.tenantBaseUrl!)
            let full = try #require(vector.fullUrl)
            #expect(CanonicalRequest.canonical(method: vector.method, url: full, basePath: base) == vector.canonical)
            #expect(CanonicalRequest.qsh(method: vector.method, url: full, basePath: base) == vector.qsh)
            // The same path given relative with the context path still in it.
            let relative = String(full.dropFirst(vector.tenantBaseUrl!.count - base.count))
            #expect(
                CanonicalRequest.canonical(method: vector.method, url: relative, basePath: base + "/")
                    == vector.canonical
            )
        }
    }

    @Test func protocolExamples() {
        #expect(CanonicalRequest.canonical(method: "GET", url: "/?param=foo") == "GET&/&param=foo")
        #expect(CanonicalRequest.canonical(method: "POST", url: "/user") == "POST&/user&")
    }

    @Test func absoluteURLsDropSchemeHostAndFragment() {
        #expect(
            CanonicalRequest.canonical(
                method: "get",
                url: "https://example.atlassian.net/rest/api/3/myself?b=1&a=2#frag"
            )
                == "GET&/rest/api/3/myself&a=2&b=1"
        )
        #expect(CanonicalRequest.canonical(method: "GET", url: "https://example.atlassian.net") == "GET&/&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "https://example.atlassian.net?x=1") == "GET&/&x=1")
        #expect(CanonicalRequest.canonical(method: "GET", url: "http://127.0.0.1:8080/a/?x=1") == "GET&/a&x=1")
    }

    @Test func basePathRemovedOnlyAsWholeSegments() {
        #expect(CanonicalRequest.canonical(method: "GET", url: "/wiki/rest", basePath: "/wiki") == "GET&/rest&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/wiki", basePath: "/wiki") == "GET&/&")
        #expect(
            CanonicalRequest.canonical(method: "GET", url: "/wikipedia/x", basePath: "/wiki") == "GET&/wikipedia/x&"
        )
        #expect(CanonicalRequest.canonical(method: "GET", url: "/other/x", basePath: "/wiki") == "GET&/other/x&")
    }

    @Test("the cases issue #5 lists, spelled out")
    func listedCases() {
        // protocol.md §3 examples
        #expect(CanonicalRequest.canonical(method: "GET", url: "/?param=foo") == "GET&/&param=foo")
        #expect(
            CanonicalRequest.canonical(
                method: "GET",
                url: "/path/to/service?zee_last=param&repeated=parameter%201&first=param&repeated=parameter%202")
                == "GET&/path/to/service&first=param&repeated=parameter%201,parameter%202&zee_last=param")
        #expect(CanonicalRequest.canonical(method: "POST", url: "/user") == "POST&/user&")
        // repeated parameters: values sorted, joined with ','
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?r=3&r=1&r=2") == "GET&/q&r=1,2,3")
        // spaces and '+' (a '+' is a space; a literal plus is %2B)
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?v=x+y&w=x%20y") == "GET&/q&v=x%20y&w=x%20y")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?plus=a%2Bb") == "GET&/q&plus=a%2Bb")
        // '*' encoded, '~' kept
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?s=a*b&t=a~b") == "GET&/q&s=a%2Ab&t=a~b")
        // unicode: UTF-8 bytes percent-encoded with upper-case hex
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?u=%C3%A9t%C3%A9") == "GET&/q&u=%C3%A9t%C3%A9")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/q?u=\u{e9}") == "GET&/q&u=%C3%A9")
        // empty path, trailing slash, '&' in the path
        #expect(CanonicalRequest.canonical(method: "GET", url: "?a=1") == "GET&/&a=1")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/path/") == "GET&/path&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/") == "GET&/&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/a&b/c") == "GET&/a%26b/c&")
        // the jwt parameter dropped
        #expect(CanonicalRequest.canonical(method: "GET", url: "/i?jwt=a.b.c&b=2&a=1") == "GET&/i&a=1&b=2")
        // a base-URL path prefix removed
        #expect(
            CanonicalRequest.canonical(method: "GET", url: "/wiki/rest/api/content?limit=5", basePath: "/wiki")
                == "GET&/rest/api/content&limit=5")
        #expect(
            CanonicalRequest.qsh(
                method: "GET", url: "https://x.atlassian.net/wiki/rest/api/content?limit=5&start=0", basePath: "/wiki")
                == CanonicalRequest.qsh(method: "GET", url: "/rest/api/content?limit=5&start=0"))
    }

    @Test func queryEdgeCases() {
        // jwt only → empty query; empty pieces ignored; invalid escapes kept literally (then encoded).
        #expect(CanonicalRequest.canonical(method: "GET", url: "/x?jwt=a.b.c") == "GET&/x&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/x?a=1&&b=2&") == "GET&/x&a=1&b=2")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/x?a=%zz&b=%4") == "GET&/x&a=%25zz&b=%254")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/x?a=b=c") == "GET&/x&a=b%3Dc")
        #expect(CanonicalRequest.canonical(method: "GET", url: "/x?") == "GET&/x&")
        #expect(CanonicalRequest.canonical(method: "GET", url: "") == "GET&/&")
    }
}
