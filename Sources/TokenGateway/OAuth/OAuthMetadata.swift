import Foundation

/// The names of the token endpoint's protocol (RFC 6749, RFC 8693) and its discovery document
/// (RFC 8414).
public enum OAuthMetadata {
    /// The token endpoint's path.
    public static let tokenPath = "/oauth/token"
    /// The discovery document's path (RFC 8414 §3).
    public static let discoveryPath = "/.well-known/oauth-authorization-server"

    /// `grant_type` of the client credentials grant (RFC 6749 §4.4).
    public static let clientCredentialsGrant = "client_credentials"
    /// `grant_type` of token exchange (RFC 8693 §2.1).
    public static let tokenExchangeGrant = "urn:ietf:params:oauth:grant-type:token-exchange"
    /// `subject_token_type` of a Connect JWT (RFC 8693 §3).
    public static let jwtTokenType = "urn:ietf:params:oauth:token-type:jwt"
    /// `issued_token_type` (and the only `requested_token_type` accepted) of an exchange (RFC 8693 §3).
    public static let accessTokenType = "urn:ietf:params:oauth:token-type:access_token"

    /// The path of `publicURL` (no trailing slash), where RFC 8414 §3.1 puts it after the discovery
    /// path; nil when it has none, or when a segment holds anything but unreserved characters (RFC 3986).
    public static func discoveryPathSuffix(publicURL: String) -> String? {
        guard let path = URLComponents(string: publicURL)?.path, path != "", path != "/" else { return nil }
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        let unreserved = { (c: UInt8) in
            (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c)
                || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "~")
        }
        guard path.hasPrefix("/"), segments.allSatisfy({ !$0.isEmpty && $0.utf8.allSatisfy(unreserved) }) else {
            return nil
        }
        return path
    }

    /// The grant types this gateway serves: token exchange only while Connect is configured.
    public static func grantTypes(tokenExchange: Bool) -> [String] {
        tokenExchange ? [Self.clientCredentialsGrant, Self.tokenExchangeGrant] : [Self.clientCredentialsGrant]
    }

    /// The RFC 8414 document for a gateway reached at `publicURL` (no trailing slash).
    ///
    /// `issuer` is `publicURL`; `token_endpoint` is absolute; `response_types_supported` is empty
    /// because the gateway has no authorization endpoint (no grant it serves uses one).
    public static func document(publicURL: String, tokenExchange: Bool) -> JSONValue {
        .object([
            ("issuer", .string(publicURL)),
            ("token_endpoint", .string(publicURL + Self.tokenPath)),
            ("grant_types_supported", .array(Self.grantTypes(tokenExchange: tokenExchange).map { .string($0) })),
            (
                "token_endpoint_auth_methods_supported",
                .array(OAuthClientAuthenticationMethod.allCases.map { .string($0.rawValue) })
            ),
            ("response_types_supported", .array([])),
        ])
    }
}
