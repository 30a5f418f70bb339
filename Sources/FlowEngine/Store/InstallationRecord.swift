/// Whether an installation may still get tokens.
public enum InstallationStatus: String, Sendable, Hashable {
    case active
    case uninstalled
}

/// The stored metadata of one installation. Never holds a secret: the trigger URL stays sealed
/// in the store and is only read by the trigger client.
public struct InstallationRecord: Sendable, Hashable {
    public var id: InstallationID
    public var appId: String?
    public var cloudId: String?
    public var apiBaseUrl: String?
    public var status: InstallationStatus
    public var triggerRegistered: Bool
    public var triggerKeyId: String?
    /// Unix seconds.
    public var tokenExpiresAt: Int64?
    public var lastTokenAt: Int64?
    /// How the latest stored token came: `trigger`, `push` or `lifecycle` (nil before any).
    public var lastTokenVia: String?
    public var createdAt: Int64
    public var updatedAt: Int64

    init(id: InstallationID, fields: [String: String]) {
        self.id = id
        self.appId = fields["appId"].flatMap { $0.isEmpty ? nil : $0 }
        self.cloudId = fields["cloudId"].flatMap { $0.isEmpty ? nil : $0 }
        self.apiBaseUrl = fields["apiBaseUrl"].flatMap { $0.isEmpty ? nil : $0 }
        self.status = InstallationStatus(rawValue: fields["status"] ?? "") ?? .active
        self.triggerRegistered = !(fields["triggerUrl"] ?? "").isEmpty
        self.triggerKeyId = fields["triggerKeyId"].flatMap { $0.isEmpty ? nil : $0 }
        self.tokenExpiresAt = fields["tokenExpiresAt"].flatMap { Int64($0) }
        self.lastTokenAt = fields["lastTokenAt"].flatMap { Int64($0) }
        self.lastTokenVia = fields["lastTokenVia"].flatMap { $0.isEmpty ? nil : $0 }
        self.createdAt = fields["createdAt"].flatMap { Int64($0) } ?? 0
        self.updatedAt = fields["updatedAt"].flatMap { Int64($0) } ?? self.createdAt
    }
}

/// Metadata taken from a verified Forge Invocation Token, used to create or refresh a record.
public struct InstallationMetadata: Sendable, Hashable {
    public var appId: String?
    public var apiBaseUrl: String?
    public var cloudId: String?

    public init(appId: String? = nil, apiBaseUrl: String? = nil, cloudId: String? = nil) {
        self.appId = appId
        self.apiBaseUrl = apiBaseUrl
        self.cloudId = cloudId
    }
}

/// How an unsolicited token reached the gateway (a solicited one came by `trigger`).
public enum TokenArrival: String, Sendable, Hashable {
    /// Answering an auth trigger the gateway sent.
    case trigger
    /// Pushed unasked (a scheduled trigger, a registration carrying a token).
    case push
    /// With a lifecycle event.
    case lifecycle
}

/// What storing a delivered token did.
public enum TokenStoreOutcome: Sendable, Hashable {
    /// The token is now the stored one.
    case stored
    /// A token with the same or a later expiry was already stored; nothing changed.
    case notNewer
    /// The installation is uninstalled; nothing was stored.
    case uninstalled
}

extension RedisValue {
    /// Reads a flat `[field, value, field, value…]` array (HGETALL) into a dictionary.
    public var fieldDictionary: [String: String] {
        guard let items = self.array else { return [:] }
        var out: [String: String] = [:]
        var i = 0
        while i + 1 < items.count {
            if let k = items[i].string, let v = items[i + 1].string { out[k] = v }
            i += 2
        }
        return out
    }
}
