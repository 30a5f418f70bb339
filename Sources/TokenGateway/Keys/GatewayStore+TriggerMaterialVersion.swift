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
        let installationKey = self.installationKey(id)
        let signingKey = self.signingKeysKey(id)
        var promoted = false
        while true {
            let replies = try await self.redis.pipeline([
                ["HMGET", installationKey, "status", "triggerUrl"],
                ["HMGET", signingKey, "current", "nextActivatesAt"],
            ])
            guard replies.count == 2, let installation = replies[0].array, installation.count == 2,
                let keys = replies[1].array, keys.count == 2
            else { throw RedisError.protocolError }
            if !promoted, let due = keys[1].string.flatMap({ Int64($0) }), due <= now.unixSeconds {
                _ = try await self.redis.eval(
                    TriggerKeyScripts.promoteIfDue, keys: [installationKey, signingKey],
                    arguments: [String(now.unixSeconds)])
                promoted = true
                continue
            }
            guard installation[0].string == InstallationStatus.active.rawValue,
                let sealedURL = installation[1].string, let keyID = keys[0].string
            else { return nil }
            return TriggerMaterialVersion(sealedURL: sealedURL, keyID: keyID)
        }
    }

    /// Opens the trigger material of `version`: reads the sealed signing key (one round trip) and
    /// opens it and the URL. Nil when the key is gone (rotated away or uninstalled since).
    public func openTriggerMaterial(_ id: InstallationID, version: TriggerMaterialVersion) async throws
        -> TriggerMaterial?
    {
        let signingKey = self.signingKeysKey(id)
        guard let sealedKey = try await self.redis.send(["HGET", signingKey, "key:" + version.keyID]).string else {
            return nil
        }
        let url = try self.box.open(version.sealedURL, context: self.installationKey(id) + "#triggerUrl")
        let key = try self.box.open(sealedKey, context: signingKey + "#key:" + version.keyID)
        return TriggerMaterial(url: String(decoding: url, as: UTF8.self), keyID: version.keyID, rawPrivateKey: key)
    }
}
