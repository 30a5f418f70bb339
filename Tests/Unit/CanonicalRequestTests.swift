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

    static func loadVectors(filePath: String = #filePath) throws -> [VectorFile.Case] {
        let url = URL(fileURLWithPath: filePath)
            .deletingLastPathComponent()
            .appendingPathComponent("../../../shared/vectors/qsh.json")
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
