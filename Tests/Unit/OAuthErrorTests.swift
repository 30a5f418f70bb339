import FlowEngine
import Foundation
import Testing

@testable import TokenGateway

@Suite("OAuth error answers and discovery document")
struct OAuthErrorTests {
    @Test("error answers: RFC 6749 body, no-store, WWW-Authenticate on invalid_client, Retry-After on 503")
    func responses() throws {
        let client = OAuthError.invalidClient.response
        #expect(client.status == .unauthorized)
        #expect(client.headers[.wwwAuthenticate] == "Basic realm=\"token-gateway\"")
        #expect(client.headers[.cacheControl] == "no-store")
        #expect(client.headers[.contentType] == "application/json")
        let body = OAuthError.invalidClient.body.serialized()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: String])
        #expect(Set(object.keys) == ["error", "error_description"])
        #expect(object["error"] == "invalid_client")

        let busy = OAuthError.temporarilyUnavailable("x", retryAfter: 0).response
        #expect(busy.status == .serviceUnavailable)
        #expect(busy.headers[.retryAfter] == "1")
        #expect(busy.headers[.wwwAuthenticate] == nil)
        #expect(OAuthError.invalidTarget.response.headers[.retryAfter] == nil)
    }

    @Test("flow failures map per contract §8")
    func flowMapping() {
        #expect(OAuthError(FlowError(code: .installationNotFound)) == .invalidTarget)
        #expect(OAuthError(FlowError(code: .installationUninstalled)) == .invalidTarget)
        let upstream: [FlowError.Code] = [
            .noTriggerURL, .tokenTimeout, .triggerFailed, .circuitOpen, .storeUnavailable,
        ]
        for code in upstream {
            let error = OAuthError(FlowError(code: code))
            #expect(error.code == "temporarily_unavailable")
            #expect(error.status == .serviceUnavailable)
            #expect((error.retryAfter ?? 0) >= 1)
        }
        #expect(OAuthError(FlowError(code: .circuitOpen, retryAfter: .milliseconds(12_300))).retryAfter == 13)
        #expect(OAuthError(FlowError(code: .storeUnavailable, retryAfter: .seconds(4))).retryAfter == 4)
    }

    @Test("the RFC 8414 document names the token endpoint, grants and client authentication methods")
    func discoveryDocument() throws {
        let text = OAuthMetadata.document(publicURL: "https://tokens.example.test", tokenExchange: true).serialized()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(object["issuer"] as? String == "https://tokens.example.test")
        #expect(object["token_endpoint"] as? String == "https://tokens.example.test/oauth/token")
        #expect(
            object["grant_types_supported"] as? [String]
                == ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"])
        #expect(
            object["token_endpoint_auth_methods_supported"] as? [String] == [
                "client_secret_basic", "client_secret_post",
            ])
        #expect(object["response_types_supported"] as? [String] == [])
        let without = OAuthMetadata.document(publicURL: "http://127.0.0.1:8080", tokenExchange: false).serialized()
        #expect(without.contains(#""grant_types_supported":["client_credentials"]"#))
    }

    @Test("the discovery path suffix is the public URL's path, when it is plain")
    func discoverySuffix() {
        #expect(OAuthMetadata.discoveryPathSuffix(publicURL: "https://example.com/tokens") == "/tokens")
        #expect(OAuthMetadata.discoveryPathSuffix(publicURL: "https://example.com/a/b-c_d.e~f") == "/a/b-c_d.e~f")
        for none in [
            "https://example.com", "https://example.com/", "http://127.0.0.1:8080", "https://x/{id}", "https://x/a:b",
        ] {
            #expect(OAuthMetadata.discoveryPathSuffix(publicURL: none) == nil, "\(none)")
        }
    }

    @Test("only form bodies are read, with a UTF-8, US-ASCII or ISO-8859-1 charset")
    func contentTypes() {
        #expect(Gateway.isFormContentType("application/x-www-form-urlencoded"))
        #expect(Gateway.isFormContentType("Application/X-WWW-Form-Urlencoded; charset=UTF-8"))
        #expect(Gateway.isFormContentType("application/x-www-form-urlencoded;charset=\"utf-8\""))
        #expect(!Gateway.isFormContentType(nil))
        #expect(!Gateway.isFormContentType("application/json"))
        #expect(!Gateway.isFormContentType("multipart/form-data; boundary=x"))
        #expect(!Gateway.isFormContentType("application/x-www-form-urlencoded; charset=utf-16"))
        #expect(Gateway.formCharset("application/x-www-form-urlencoded; charset=US-ASCII") == .utf8)
        #expect(Gateway.formCharset("application/x-www-form-urlencoded; charset=ISO-8859-1") == .latin1)
        #expect(Gateway.formCharset("application/x-www-form-urlencoded") == .utf8)
    }

    @Test("an ISO-8859-1 form body is read as ISO-8859-1; the same bytes as UTF-8 are refused")
    func latin1Form() throws {
        let body = Array("grant_type=client_credentials&client_id=odd+client&client_secret=c+%E9-1".utf8)
        let form = try OAuthForm.parse(body, charset: .latin1)
        #expect(form["client_secret"] == "c é-1")
        #expect(form["client_id"] == "odd client")
        #expect(throws: OAuthError.self) { try OAuthForm.parse(body, charset: .utf8) }
    }
}
