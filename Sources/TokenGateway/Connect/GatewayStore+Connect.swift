import FlowEngine

/// Whether a Connect tenant has the app installed.
public enum ConnectTenantStatus: String, Sendable, Hashable {
    case installed
    case uninstalled
}

/// A Connect tenant's shared secret, opened from the store. Its printed and reflected forms show
/// nothing of the secret.
public struct ConnectSharedSecret: Sendable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    /// The secret's UTF-8 bytes (the HMAC key of the tenant's HS256 JWTs).
    public let bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var description: String { "ConnectSharedSecret(redacted)" }
    public var debugDescription: String { self.description }
    public var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// One Connect tenant (a `clientKey`) as stored by its last verified lifecycle callback.
public struct ConnectTenantRecord: Sendable, CustomStringConvertible {
    /// The tenant's `clientKey`, the store key.
    public let clientKey: String
    public let status: ConnectTenantStatus
    /// The app key (`key` of the install payload): the `iss` of the app's own JWTs.
    public let appKey: String?
    /// The product's `baseUrl` (may carry a context path such as `/wiki`).
    public let baseUrl: String?
    /// The Forge installation the payload named, if any.
    public let installationId: InstallationID?
    /// The install payload as received, with `sharedSecret` removed (JSON text).
    public let payloadJSON: String
    /// The shared secret; nil once the tenant has uninstalled.
    public let sharedSecret: ConnectSharedSecret?
    /// Unix seconds: first seen, last change, last install and uninstall.
    public let createdAt: Int64
    public let updatedAt: Int64
    public let installedAt: Int64?
    public let uninstalledAt: Int64?

    public var description: String {
        "ConnectTenantRecord(clientKey: \(self.clientKey), status: \(self.status.rawValue))"
    }
}

/// What a verified `installed` callback stores. Its printed and reflected forms leave the secret out.
public struct ConnectInstallation: Sendable, CustomStringConvertible, CustomReflectable {
    public var clientKey: String
    public var appKey: String
    public var baseUrl: String
    /// The payload without `sharedSecret`, as JSON text.
    public var payloadJSON: String
    /// The shared secret's UTF-8 bytes; sealed before it reaches Redis.
    public var sharedSecret: [UInt8]
    public var installationId: InstallationID?

    public init(
        clientKey: String, appKey: String, baseUrl: String, payloadJSON: String, sharedSecret: [UInt8],
        installationId: InstallationID?
    ) {
        self.clientKey = clientKey
        self.appKey = appKey
        self.baseUrl = baseUrl
        self.payloadJSON = payloadJSON
        self.sharedSecret = sharedSecret
        self.installationId = installationId
    }

    public var description: String { "ConnectInstallation(clientKey: \(self.clientKey), baseUrl: \(self.baseUrl))" }
    public var customMirror: Mirror {
        Mirror(self, children: ["clientKey": self.clientKey, "appKey": self.appKey, "baseUrl": self.baseUrl])
    }
}

extension GatewayStore {
    /// `tg:connect:{<clientKey>}`: the tenant's hash. The hash tag keeps the key in one Cluster slot.
    public func connectTenantKey(_ clientKey: String) -> String { "\(self.prefix):connect:{\(clientKey)}" }

    /// The sealing context of the tenant's shared secret (key name plus `#sharedSecret`), so a
    /// sealed secret copied under another tenant's key fails to open.
    func connectSecretContext(_ clientKey: String) -> String { self.connectTenantKey(clientKey) + "#sharedSecret" }

    /// `tg:seen-install:<digest>`: the replay guard of one signed-install token.
    func seenSignedInstallKey(_ digest: String) -> String { "\(self.prefix):seen-install:\(digest)" }

    /// Context of a Connect tenant's sealed installation link.
    func connectLinkContext(_ clientKey: String) -> String { self.connectTenantKey(clientKey) + "#installationId" }

    /// The sealed form of a tenant's installation link, or `""` for none.
    func sealConnectLink(_ id: InstallationID?, clientKey: String) -> String {
        guard let id else { return "" }
        return (try? self.box.sealDeterministically(Array(id.ari.utf8), context: self.connectLinkContext(clientKey)))
            ?? ""
    }

    /// The installation a stored (sealed) link names, or nil when there is none or it does not open (counted).
    func openConnectLink(_ stored: String?, clientKey: String) -> InstallationID? {
        guard let stored, !stored.isEmpty else { return nil }
        guard let bytes = try? self.box.open(stored, context: self.connectLinkContext(clientKey)),
            let text = String(validating: bytes, as: UTF8.self), let id = InstallationID(text)
        else {
            self.undecryptable(.connectLink)
            return nil
        }
        return id
    }

    /// Records a signed-install token (by `digest`, a hex SHA-256 naming it) until
    /// `expiresAtUnixSeconds` plus the clock skew; false when it was recorded already (a replay).
    public func firstUseOfSignedInstall(
        digest: String, expiresAtUnixSeconds: Int64, skewSeconds: Int64, now: FlowTime
    ) async throws -> Bool {
        let ttl = max((expiresAtUnixSeconds - now.unixSeconds + skewSeconds + 1) * 1000, 1000)
        let r = try await self.redis.send(["SET", self.seenSignedInstallKey(digest), "1", "NX", "PX", String(ttl)])
        return r.string == "OK"
    }

    /// Replaces the tenant's record with a verified install: the whole earlier hash goes (old
    /// secret, old payload, old link), the new payload and sealed secret take its place, status
    /// `installed`. `createdAt` survives reinstalls. One script, so no reader sees a mix.
    ///
    /// - Returns: true when the tenant was not known before.
    @discardableResult
    public func storeConnectInstall(_ install: ConnectInstallation, now: FlowTime) async throws -> Bool {
        let key = self.connectTenantKey(install.clientKey)
        let sealed = try self.box.seal(install.sharedSecret, context: self.connectSecretContext(install.clientKey))
        let r = try await self.redis.eval(
            ConnectScripts.install, keys: [key],
            arguments: [
                String(now.unixSeconds), install.payloadJSON, sealed, install.appKey, install.baseUrl,
                self.sealConnectLink(install.installationId, clientKey: install.clientKey),
            ])
        guard let created = r.int else { throw RedisError.protocolError }
        return created == 1
    }

    /// Marks the tenant uninstalled and drops its shared secret; the record stays so a late request
    /// can be told apart from an unknown tenant. A tenant never seen is recorded as uninstalled with
    /// `payloadJSON` (already without its secret).
    public func storeConnectUninstall(
        clientKey: String, appKey: String?, baseUrl: String?, payloadJSON: String, installationId: InstallationID?,
        now: FlowTime
    ) async throws {
        _ = try await self.redis.eval(
            ConnectScripts.uninstall, keys: [self.connectTenantKey(clientKey)],
            arguments: [
                String(now.unixSeconds), payloadJSON, appKey ?? "", baseUrl ?? "",
                self.sealConnectLink(installationId, clientKey: clientKey),
            ])
    }

    /// The tenant's record with its shared secret opened, or nil when the `clientKey` was never seen.
    ///
    /// - Throws: ``RedisError`` when Redis cannot be reached; the ``SecretBox``'s error when the
    ///   sealed secret cannot be opened (unknown key id, corrupt, or copied from another key).
    public func connectTenant(_ clientKey: String) async throws -> ConnectTenantRecord? {
        let key = self.connectTenantKey(clientKey)
        let fields = try await self.redis.send(["HGETALL", key]).fieldDictionary
        guard let statusText = fields["status"], let status = ConnectTenantStatus(rawValue: statusText) else {
            return nil
        }
        var secret: ConnectSharedSecret?
        if status == .installed, let sealed = fields["sharedSecret"], !sealed.isEmpty {
            secret = ConnectSharedSecret(try self.box.open(sealed, context: self.connectSecretContext(clientKey)))
        }
        func nonEmpty(_ name: String) -> String? { fields[name].flatMap { $0.isEmpty ? nil : $0 } }
        func seconds(_ name: String) -> Int64? { fields[name].flatMap { Int64($0) } }
        return ConnectTenantRecord(
            clientKey: clientKey,
            status: status,
            appKey: nonEmpty("key"),
            baseUrl: nonEmpty("baseUrl"),
            installationId: self.openConnectLink(fields["installationId"], clientKey: clientKey),
            payloadJSON: fields["payload"] ?? "{}",
            sharedSecret: secret,
            createdAt: seconds("createdAt") ?? 0,
            updatedAt: seconds("updatedAt") ?? 0,
            installedAt: seconds("installedAt"),
            uninstalledAt: seconds("uninstalledAt"))
    }
}

/// The scripts of the Connect tenant hash. Each touches one key only.
enum ConnectScripts {
    /// KEYS: tenant. ARGV: now, payload, sealed secret, app key, baseUrl, installation ARI or ''.
    /// Returns 1 when the tenant is new, else 0.
    static let install = RedisScript(
        """
        local created = redis.call('HGET', KEYS[1], 'createdAt')
        redis.call('DEL', KEYS[1])
        redis.call('HSET', KEYS[1], 'status', 'installed', 'payload', ARGV[2], 'sharedSecret', ARGV[3],
          'key', ARGV[4], 'baseUrl', ARGV[5], 'createdAt', created or ARGV[1], 'updatedAt', ARGV[1],
          'installedAt', ARGV[1])
        if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'installationId', ARGV[6]) end
        if created then return 0 end
        return 1
        """)

    /// KEYS: tenant. ARGV: now, payload, app key, baseUrl, installation ARI or ''. A known tenant
    /// keeps its payload and link; its secret goes.
    static let uninstall = RedisScript(
        """
        local created = redis.call('HGET', KEYS[1], 'createdAt')
        if created then
          redis.call('HDEL', KEYS[1], 'sharedSecret')
          redis.call('HSET', KEYS[1], 'status', 'uninstalled', 'updatedAt', ARGV[1], 'uninstalledAt', ARGV[1])
          return 0
        end
        redis.call('HSET', KEYS[1], 'status', 'uninstalled', 'payload', ARGV[2], 'key', ARGV[3], 'baseUrl', ARGV[4],
          'createdAt', ARGV[1], 'updatedAt', ARGV[1], 'uninstalledAt', ARGV[1])
        if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'installationId', ARGV[5]) end
        return 1
        """)
}
