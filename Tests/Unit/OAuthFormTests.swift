import Testing

@testable import TokenGateway

@Suite("OAuth form bodies (application/x-www-form-urlencoded)")
struct OAuthFormTests {
    private func parse(_ text: String) throws(OAuthError) -> OAuthForm { try OAuthForm.parse(Array(text.utf8)) }

    @Test("percent escapes and + decode; names and values are UTF-8")
    func decoding() throws {
        let form = try self.parse(
            "grant_type=client_credentials&resource=ari%3Acloud%3Aecosystem%3A%3Ainstallation%2Fabc"
                + "&scope=read+write&note=caf%C3%A9+%2B1&na%6De=x")
        #expect(form["grant_type"] == "client_credentials")
        #expect(form["resource"] == "ari:cloud:ecosystem::installation/abc")
        #expect(form["scope"] == "read write")
        #expect(form["note"] == "café +1")
        #expect(form["name"] == "x")
    }

    @Test("empty values count as omitted; empty pairs are skipped; a name without = has no value")
    func emptyValues() throws {
        let form = try self.parse("&grant_type=client_credentials&&resource=&scope&")
        #expect(form["grant_type"] == "client_credentials")
        #expect(form["resource"] == nil)
        #expect(form["scope"] == nil)
        #expect(form.names == ["grant_type"])
        #expect(try self.parse("").names.isEmpty)
    }

    @Test("a = inside a value is kept")
    func equalsInValue() throws {
        #expect(try self.parse("subject_token=a.b.c%3D%3D&x=y=z")["x"] == "y=z")
    }

    @Test("a repeated parameter is invalid_request, also when one copy is empty or encoded differently")
    func repeated() {
        for body in ["resource=a&resource=b", "resource=a&resource=", "resource=a&re%73ource=a"] {
            #expect(throws: OAuthError.self) { try self.parse(body) }
            do {
                _ = try self.parse(body)
            } catch {
                #expect(error.code == "invalid_request")
                #expect(error.errorDescription.contains("'resource' is repeated"))
                #expect(!error.errorDescription.contains("a&"))
            }
        }
    }

    @Test("a description names a parameter only with the characters RFC 6749 §5.2 allows")
    func descriptionCharacters() {
        let allowed = { (c: Unicode.Scalar) in
            (0x20...0x21).contains(c.value) || (0x23...0x5B).contains(c.value) || (0x5D...0x7E).contains(c.value)
        }
        for body in ["a%22b=1&a%22b=2", "a%5Cb=1&a%5Cb=2", "x%27y=1&x%27y=2", "resource=a&resource=b", "q%22=%FF"] {
            do {
                _ = try self.parse(body)
                Issue.record("accepted \(body)")
            } catch {
                #expect(error.errorDescription.unicodeScalars.allSatisfy(allowed), "\(error.errorDescription)")
            }
        }
    }

    @Test("invalid escapes, non-UTF-8 bytes and empty names are invalid_request")
    func malformed() {
        for body in ["a=%ZZ", "a=%4", "a=%", "a=%FF%FE", "%FF=1", "=value", "%zz=1"] {
            do {
                _ = try self.parse(body)
                Issue.record("accepted \(body)")
            } catch {
                #expect(error.code == "invalid_request")
                #expect(error.status == .badRequest)
            }
        }
    }

    @Test("more than 64 parameters are refused")
    func tooMany() {
        let body = (0..<65).map { "p\($0)=1" }.joined(separator: "&")
        #expect(throws: OAuthError.self) { try self.parse(body) }
        #expect((try? self.parse((0..<64).map { "p\($0)=1" }.joined(separator: "&")))?.names.count == 64)
    }
}
