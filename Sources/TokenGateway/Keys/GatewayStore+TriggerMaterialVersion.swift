import FlowEngine
import RedisKit

extension GatewayStore {
    /// Which trigger material is in force for an installation, read without opening anything: the
    /// sealed trigger URL and the id of the current signing key. A key id names one key for good
    /// and a sealed URL changes whenever the URL is stored again, so material opened for a version
    /// stays right for as long as the version is the one in force.
    public struct TriggerMaterialVersion: Sendable, Hashable {
        public let sealedURL: String
        public let keyID: String

        public init(sealedURL: String, keyID: String) {
            self.sealedURL = sealedURL
            self.keyID = keyID
        }
    }

    /// The trigger material version in force now, in one round trip, or nil when no trigger is
    /// registered or the installation is not active. A next key whose activation time has come is
    /// promoted first (a second and third round trip, once per rotation).
    public func triggerMaterialVersion(_ id: InstallationID, now: FlowTime) async throws -> TriggerMaterialVersion? {
        try await self.readTriggerMaterial(id, now: now, cachedKeyID: nil)?.version
    }

    /// The trigger material version in force now and, unless its key id is `cachedKeyID`, the
    /// sealed signing key of that version, in one round trip (one script), so material not held
    /// yet is opened without a second round trip. Nil when no trigger is registered or the
    /// installation is not active. A due next key is promoted first, as in
    /// ``triggerMaterialVersion(_:now:)``. `timeout`: each command's, when shorter than the
    /// client's own (a trigger attempt's time left).
    public func readTriggerMaterial(
        _ id: InstallationID, now: FlowTime, cachedKeyID: String?, timeout: Duration? = nil
    ) async throws
        -> (version: TriggerMaterialVersion, sealedKey: String?)?
    {
        let timeout = self.commandTimeout(atMost: timeout)
        let installationKey = self.installationKey(id)
        let signingKey = self.signingKeysKey(id)
        var promoted = false
        while true {
            let reply = try await self.redis.eval(
                TriggerMaterialScripts.read, keys: [installationKey, signingKey], arguments: [cachedKeyID ?? ""],
                timeout: timeout)
            guard let items = reply.array, let read = TriggerMaterialRead(reply: items[...]) else {
                throw RedisError.protocolError
            }
            if !promoted, Self.nextKeyIsDue(read, now: now) {
                _ = try await self.redis.eval(
                    TriggerKeyScripts.promoteIfDue, keys: [installationKey, signingKey],
                    arguments: [String(now.unixSeconds)], timeout: timeout)
                promoted = true
                continue
            }
            return Self.materialInForce(read)
        }
    }

    /// True when `read` shows a next signing key whose activation time has come: it is promoted
    /// before any material is used.
    static func nextKeyIsDue(_ read: TriggerMaterialRead, now: FlowTime) -> Bool {
        read.nextActivatesAt.map { $0 <= now.unixSeconds } ?? false
    }

    /// The version in force and the sealed key that `read` found, or nil when no trigger is
    /// registered or the installation is not active.
    static func materialInForce(_ read: TriggerMaterialRead) -> (version: TriggerMaterialVersion, sealedKey: String?)? {
        guard read.status == InstallationStatus.active.rawValue, let sealedURL = read.sealedURL,
            let keyID = read.keyID
        else { return nil }
        return (TriggerMaterialVersion(sealedURL: sealedURL, keyID: keyID), read.sealedKey)
    }

    /// Opens the trigger material of `version`: reads the sealed signing key (one round trip, none
    /// when `read` is the one ``readTriggerMaterial(_:now:cachedKeyID:timeout:)`` returned) and opens it
    /// and the URL. Nil when the key is gone (rotated away or uninstalled since). `timeout` as in
    /// ``readTriggerMaterial(_:now:cachedKeyID:timeout:)``.
    public func openTriggerMaterial(
        _ id: InstallationID, version: TriggerMaterialVersion, sealedKey read: String? = nil,
        timeout: Duration? = nil
    )
        async throws -> TriggerMaterial?
    {
        let signingKey = self.signingKeysKey(id)
        let found: String?
        if let read {
            found = read
        } else {
            found = try await self.redis.send(
                ["HGET", signingKey, "key:" + version.keyID], timeout: self.commandTimeout(atMost: timeout)
            ).string
        }
        guard let sealedKey = found else { return nil }
        let url = try self.open(version.sealedURL, context: self.installationKey(id) + "#triggerUrl", kind: .triggerUrl)
        let key = try self.open(sealedKey, context: signingKey + "#key:" + version.keyID, kind: .signingKey)
        return TriggerMaterial(url: String(decoding: url, as: UTF8.self), keyID: version.keyID, rawPrivateKey: key)
    }
}

extension GatewayStore {
    /// The client's command timeout, or `limit` when that is shorter (never below 1 ms).
    func commandTimeout(atMost limit: Duration?) -> Duration? {
        guard let limit else { return nil }
        return max(min(limit, self.redis.commandTimeout), .milliseconds(1))
    }
}

/// The script behind ``GatewayStore/readTriggerMaterial(_:now:cachedKeyID:timeout:)``. KEYS: the
/// installation, its signing keys. ARGV: the key id whose material the caller holds ("" for none).
/// Returns status, sealed trigger URL, current key id, next key's activation time, and the sealed
/// current key unless its id is ARGV[1].
enum TriggerMaterialScripts {
    static let read = RedisScript(
        """
        local i = redis.call('HMGET', KEYS[1], 'status', 'triggerUrl')
        local k = redis.call('HMGET', KEYS[2], 'current', 'nextActivatesAt')
        local sealed = false
        if k[1] and k[1] ~= ARGV[1] then sealed = redis.call('HGET', KEYS[2], 'key:' .. k[1]) end
        return {i[1], i[2], k[1], k[2], sealed}
        """)
}
