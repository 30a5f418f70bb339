import Foundation

/// How a client authenticated at the token endpoint (RFC 6749 §2.3.1).
public enum OAuthClientAuthenticationMethod: String, Sendable, Hashable, CaseIterable {
    /// `Authorization: Basic base64(urlencode(client_id) ":" urlencode(client_secret))`.
    case clientSecretBasic = "client_secret_basic"
    /// `client_id` and `client_secret` form fields.
    case clientSecretPost = "client_secret_post"
}

/// The client credentials of one token request, read but not yet checked.
///
/// Holds a secret: its `description`, `debugDescription` and mirror show the method and the client
/// id only.
public struct OAuthClientCredentials: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    /// How they were presented.
    public let method: OAuthClientAuthenticationMethod
    /// `(client_id, client_secret)` readings to try, in order. For HTTP Basic the first is the
    /// RFC 6749 §2.3.1 reading (each part form-urlencoded, so decoded here); the second, present
    /// only when it differs, is the parts as sent, because many stock clients (Python's
    /// `requests`, authlib, curl's `-u`) do not encode them. Both are checked against the same
    /// configured secret; when the form also names a `client_id`, only the reading with that id
    /// is kept, so the body never names a client other than the one that authenticated.
    let candidates: [(id: String, secret: String)]

    init(method: OAuthClientAuthenticationMethod, candidates: [(id: String, secret: String)]) {
        self.method = method
        self.candidates = candidates
    }

    /// The client id as first read (for logs; never the secret).
    public var clientID: String { self.candidates.first?.id ?? "" }

    public var description: String { "OAuthClientCredentials(\(self.method.rawValue), client_id: \(self.clientID))" }

    public var debugDescription: String { self.description }

    public var customMirror: Mirror { Mirror(self, children: ["description": self.description]) }

    public static func == (lhs: OAuthClientCredentials, rhs: OAuthClientCredentials) -> Bool {
        lhs.method == rhs.method && lhs.candidates.elementsEqual(rhs.candidates, by: { $0 == $1 })
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.method)
        for candidate in self.candidates {
            hasher.combine(candidate.id)
            hasher.combine(candidate.secret)
        }
    }

    /// Reads the client credentials from the `Authorization` header fields and the form.
    ///
    /// - Parameters:
    ///   - authorization: every `Authorization` field of the request (usually none or one).
    ///   - form: the parsed body.
    /// - Throws: ``OAuthError/invalidRequest(_:)`` when the request uses both HTTP Basic and
    ///   `client_secret`, gives a form `client_id` that differs from the Basic one, or repeats
    ///   `Authorization`; ``OAuthError/invalidClient`` when no credentials are given, the
    ///   `Authorization` scheme is not Basic, the Basic value is malformed, or only one of
    ///   `client_id` and `client_secret` is in the form.
    public static func read(authorization: [String], form: OAuthForm) throws(OAuthError) -> OAuthClientCredentials {
        guard authorization.count <= 1 else {
            throw .invalidRequest("the Authorization header is repeated")
        }
        if let header = authorization.first {
            guard let basic = Self.basicCredentials(header) else { throw .invalidClient }
            if form["client_secret"] != nil {
                throw .invalidRequest(
                    "the client authenticated twice (HTTP Basic and client_secret); use exactly one method")
            }
            // RFC 6749 §3.2.1 lets a client name itself in the body as well; it must be the same
            // client, so only the Basic readings that name it authenticate.
            if let formID = form["client_id"] {
                let named = basic.filter { $0.id == formID }
                guard !named.isEmpty else {
                    throw .invalidRequest("client_id in the body differs from the HTTP Basic client")
                }
                return OAuthClientCredentials(method: .clientSecretBasic, candidates: named)
            }
            return OAuthClientCredentials(method: .clientSecretBasic, candidates: basic)
        }
        guard let id = form["client_id"], let secret = form["client_secret"] else { throw .invalidClient }
        return OAuthClientCredentials(method: .clientSecretPost, candidates: [(id, secret)])
    }

    /// The readings of an `Authorization: Basic …` value, or nil when it is not Basic or is malformed
    /// (not base64, no `:`, or an empty client id).
    static func basicCredentials(_ header: String) -> [(id: String, secret: String)]? {
        let trimmed = header.trimmingCharacters(in: .whitespaces)
        guard let space = trimmed.firstIndex(of: " "), trimmed[..<space].lowercased() == "basic" else { return nil }
        var encoded = trimmed[trimmed.index(after: space)...].trimmingCharacters(in: .whitespaces)
        guard !encoded.isEmpty, encoded.utf8.count <= 4096 else { return nil }
        while encoded.utf8.count % 4 != 0 { encoded += "=" }
        // RFC 7617 leaves the charset to the client: UTF-8 when it is valid UTF-8, else ISO-8859-1
        // (Python requests' HTTPBasicAuth encodes a str as Latin-1).
        guard let data = Data(base64Encoded: encoded),
            let text = OAuthForm.Charset.utf8.string(Array(data)) ?? OAuthForm.Charset.latin1.string(Array(data)),
            let colon = text.firstIndex(of: ":")
        else { return nil }
        let rawID = String(text[..<colon])
        let rawSecret = String(text[text.index(after: colon)...])
        var candidates: [(id: String, secret: String)] = []
        if let id = Self.formDecoded(rawID), let secret = Self.formDecoded(rawSecret), !id.isEmpty {
            candidates.append((id, secret))
        }
        if !rawID.isEmpty, !candidates.contains(where: { $0.id == rawID && $0.secret == rawSecret }) {
            candidates.append((rawID, rawSecret))
        }
        return candidates.isEmpty ? nil : candidates
    }

    private static func formDecoded(_ text: String) -> String? {
        OAuthForm.decode(Array(text.utf8)).flatMap { String(validating: $0, as: UTF8.self) }
    }

    /// The caller these credentials authenticate, or nil. Every reading is checked (each check
    /// hashes the secret and compares digests in constant time), whatever the earlier ones gave.
    public func authenticate(with registry: CallerRegistry) -> Caller? {
        var match: Caller?
        for candidate in self.candidates {
            let caller = registry.authenticate(name: candidate.id, secret: candidate.secret)
            if match == nil { match = caller }
        }
        return match
    }
}
