/// An access token as the gateway holds it: the opaque value and its expiry.
///
/// Its printed and reflected forms (`description`, `dump`, a mirror) never show the value.
public struct AccessToken: Hashable, Sendable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    /// The token itself. A secret: never log it.
    public let value: String
    /// Unix seconds of the token's `exp` claim.
    public let expiresAt: Int64
    /// The trigger request id whose delivery stored this token, or nil for a push.
    public let requestID: String?
    /// Unix seconds when the gateway received the token, when known (for the refresh-ahead window).
    public let receivedAt: Int64?

    public init(value: String, expiresAt: Int64, requestID: String? = nil, receivedAt: Int64? = nil) {
        self.value = value
        self.expiresAt = expiresAt
        self.requestID = requestID
        self.receivedAt = receivedAt
    }

    /// True when the token is inside the last `fraction` of its lifetime at `now` (the
    /// refresh-ahead window). Without a known receipt time the lifetime is taken as one hour.
    public func isStale(at now: FlowTime, fraction: Double) -> Bool {
        guard fraction > 0 else { return false }
        let lifetime = max(self.expiresAt - (self.receivedAt ?? (self.expiresAt - 3600)), 1)
        let window = Int64((Double(lifetime) * min(fraction, 1)).rounded(.up))
        return now.unixSeconds >= self.expiresAt - window
    }

    /// Seconds of validity left at `now` (negative when expired).
    public func secondsLeft(at now: FlowTime) -> Int64 { self.expiresAt - now.unixSeconds }

    public var description: String { "AccessToken(expiresAt: \(self.expiresAt), redacted)" }
    public var debugDescription: String { self.description }
    public var customMirror: Mirror {
        Mirror(
            self, children: ["expiresAt": self.expiresAt, "requestID": self.requestID as Any, "value": "redacted"],
            displayStyle: .struct)
    }
}

/// Where a token handed to a caller came from (contract §2 `source`).
public enum TokenSource: String, Sendable, Hashable {
    /// Served from the store or memory.
    case cache
    /// The request waited for an auth-trigger round trip and its delivery arrived.
    case trigger
    /// A delivery without the round trip's request id arrived while the request waited.
    case push
}

/// A token answer for one caller.
public struct TokenAnswer: Sendable, Hashable {
    public let token: AccessToken
    public let source: TokenSource
    /// The installation's `apiBaseUrl`, when known.
    public let apiBaseUrl: String?

    public init(token: AccessToken, source: TokenSource, apiBaseUrl: String? = nil) {
        self.token = token
        self.source = source
        self.apiBaseUrl = apiBaseUrl
    }
}
