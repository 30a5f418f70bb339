import Foundation
import Testing

@testable import TokenGateway

@Suite("OAuth client authentication (client_secret_basic, client_secret_post)")
struct OAuthClientAuthenticationTests {
    static let registry = try! CallerRegistry(
        json: """
            [{"name":"billing","secret":"s3cret-billing-0123456789","installations":["*"]},
             {"name":"odd client","secret":"a+b%zz:c é-0123456789","installations":["*"]}]
            """)

    private func form(_ text: String) throws -> OAuthForm { try OAuthForm.parse(Array(text.utf8)) }

    private func basic(_ id: String, _ secret: String) -> String {
        "Basic " + Data("\(id):\(secret)".utf8).base64EncodedString()
    }

    private func encode(_ value: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return value.addingPercentEncoding(withAllowedCharacters: allowed)!.replacingOccurrences(of: "%20", with: "+")
    }

    @Test("HTTP Basic: the scheme is case-insensitive, padding optional, and the caller is authenticated")
    func basicAuthentication() throws {
        for header in [
            self.basic("billing", "s3cret-billing-0123456789"),
            "basic " + Data("billing:s3cret-billing-0123456789".utf8).base64EncodedString(),
            "BASIC "
                + Data("billing:s3cret-billing-0123456789".utf8).base64EncodedString().replacingOccurrences(
                    of: "=", with: ""),
        ] {
            let credentials = try OAuthClientCredentials.read(authorization: [header], form: try self.form(""))
            #expect(credentials.method == .clientSecretBasic)
            #expect(credentials.authenticate(with: Self.registry)?.name == "billing")
        }
    }

    @Test("HTTP Basic parts are form-urlencoded (RFC 6749 §2.3.1) and decoded; the raw parts are accepted too")
    func basicEncoding() throws {
        let encoded = self.basic(self.encode("odd client"), self.encode("a+b%zz:c é-0123456789"))
        let raw = self.basic("odd client", "a+b%zz:c é-0123456789")
        for header in [encoded, raw] {
            let credentials = try OAuthClientCredentials.read(authorization: [header], form: try self.form(""))
            #expect(credentials.clientID == "odd client")
            #expect(credentials.authenticate(with: Self.registry)?.name == "odd client")
        }
        // `+` in an encoded secret is a space, so a raw "+" secret also gets its literal reading.
        let plus = try OAuthClientCredentials.read(
            authorization: [self.basic("odd+client", "x")], form: try self.form(""))
        #expect(plus.candidates.map(\.id) == ["odd client", "odd+client"])
    }

    @Test("HTTP Basic in ISO-8859-1 (Python requests' encoding of a str) authenticates as well as in UTF-8")
    func basicLatin1() throws {
        let latin1 = Array("odd client:a+b%zz:c é-0123456789".unicodeScalars.map { UInt8($0.value) })
        #expect(String(validating: latin1, as: UTF8.self) == nil)
        let header = "Basic " + Data(latin1).base64EncodedString()
        let credentials = try OAuthClientCredentials.read(authorization: [header], form: try self.form(""))
        #expect(credentials.authenticate(with: Self.registry)?.name == "odd client")
        // A byte that is no UTF-8 is read as its Latin-1 character, which matches no caller.
        let stray = "Basic " + Data([0x62, 0x3A, 0xFF]).base64EncodedString()
        let other = try OAuthClientCredentials.read(authorization: [stray], form: try self.form(""))
        #expect(other.candidates.map(\.secret) == ["\u{FF}"])
        #expect(other.authenticate(with: Self.registry) == nil)
    }

    @Test("client_secret_post reads client_id and client_secret from the form")
    func post() throws {
        let credentials = try OAuthClientCredentials.read(
            authorization: [], form: try self.form("client_id=billing&client_secret=s3cret-billing-0123456789"))
        #expect(credentials.method == .clientSecretPost)
        #expect(credentials.authenticate(with: Self.registry)?.name == "billing")
        let wrong = try OAuthClientCredentials.read(
            authorization: [], form: try self.form("client_id=billing&client_secret=nope"))
        #expect(wrong.authenticate(with: Self.registry) == nil)
        let unknown = try OAuthClientCredentials.read(
            authorization: [], form: try self.form("client_id=nobody&client_secret=s3cret-billing-0123456789"))
        #expect(unknown.authenticate(with: Self.registry) == nil)
    }

    @Test("two methods at once, another client_id or a repeated Authorization are invalid_request")
    func invalidRequests() throws {
        let header = self.basic("billing", "s3cret-billing-0123456789")
        let cases: [([String], String)] = [
            ([header], "client_id=billing&client_secret=s3cret-billing-0123456789"),
            ([header], "client_secret=s3cret-billing-0123456789"),
            ([header], "client_id=other"),
            ([header, header], ""),
        ]
        for (authorization, body) in cases {
            do {
                _ = try OAuthClientCredentials.read(authorization: authorization, form: try self.form(body))
                Issue.record("accepted \(body)")
            } catch let error as OAuthError {
                #expect(error.code == "invalid_request")
            }
        }
        // The same client named in the body as well is fine (RFC 6749 §3.2.1).
        let same = try OAuthClientCredentials.read(authorization: [header], form: try self.form("client_id=billing"))
        #expect(same.authenticate(with: Self.registry)?.name == "billing")
    }

    @Test("a body client_id picks the Basic reading that names it: the other reading does not authenticate")
    func bodyClientIDPicksTheReading() throws {
        let registry = try CallerRegistry(
            json: #"[{"name":"a b","secret":"plain-secret-0123456789","installations":["*"]}]"#)
        // `a+b` reads as "a b" (form-decoded) and as "a+b" (as sent).
        let header = self.basic("a+b", "plain-secret-0123456789")
        let decoded = try OAuthClientCredentials.read(authorization: [header], form: try self.form("client_id=a+b"))
        #expect(decoded.authenticate(with: registry)?.name == "a b")
        let raw = try OAuthClientCredentials.read(authorization: [header], form: try self.form("client_id=a%2Bb"))
        #expect(raw.candidates.map(\.id) == ["a+b"])
        #expect(raw.authenticate(with: registry) == nil)
    }

    @Test("no credentials, another scheme, a malformed Basic value or half a form pair are invalid_client")
    func invalidClients() throws {
        let cases: [([String], String)] = [
            ([], ""),
            ([], "client_id=billing"),
            ([], "client_secret=s3cret-billing-0123456789"),
            (["Bearer s3cret-billing-0123456789"], ""),
            (["Basic"], ""),
            (["Basic !!!not-base64"], ""),
            (["Basic " + Data("no-colon".utf8).base64EncodedString()], ""),
            (["Basic " + Data(":secret".utf8).base64EncodedString()], ""),
        ]
        for (authorization, body) in cases {
            do {
                _ = try OAuthClientCredentials.read(authorization: authorization, form: try self.form(body))
                Issue.record("accepted \(authorization) \(body)")
            } catch let error as OAuthError {
                #expect(error == .invalidClient)
                #expect(error.status == .unauthorized)
            }
        }
    }

    @Test("the credentials' description never shows the secret")
    func redacted() throws {
        let credentials = try OAuthClientCredentials.read(
            authorization: [self.basic("billing", "s3cret-billing-0123456789")], form: try self.form(""))
        var dumped = ""
        dump(credentials, to: &dumped)
        for text in ["\(credentials)", String(reflecting: credentials), dumped] {
            #expect(!text.contains("s3cret"), "\(text)")
            #expect(text.contains("billing"))
        }
    }
}
