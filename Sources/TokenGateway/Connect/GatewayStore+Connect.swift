import Crypto
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

    /// `tg:connect:{<clientKey>}:seen-install:<digest>`: the replay guard of one signed-install
    /// token (in the tenant's hash slot, so the lifecycle scripts check and record it).
    func seenSignedInstallKey(_ clientKey: String, digest: String) -> String {
        self.connectTenantKey(clientKey) + ":seen-install:" + digest
    }

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

    /// What a verified lifecycle callback did to the tenant's record.
    public enum ConnectCallbackOutcome: Sendable, Hashable {
        /// Stored; `created` when the tenant was not known before. A token without `jti` seen before
        /// with the same body (a retry, or an identical new token) is stored again.
        case stored(created: Bool)
        /// A token with a `jti` seen before with the same body (a retry whose first answer was
        /// lost): nothing changed, so a later callback already applied stays applied.
        case repeated
        /// A token seen before with another body: with a `jti`, at any time; without one, more
        /// than a second after it was first seen (whole seconds: within up to two). Refused,
        /// nothing changed.
        case replayed
        /// A callback issued before the one the record holds (it arrived late): nothing changed.
        case superseded
    }

    /// How a lifecycle callback's signed-install token is remembered (the replay guard) and
    /// ordered among the tenant's callbacks.
    public struct SignedInstallMark: Sendable, Hashable {
        /// Names the token (``VerifiedSignedInstall/replayDigest``).
        public var tokenDigest: String
        /// Names the body (``VerifiedSignedInstall/bodyDigest``).
        public var bodyDigest: String
        /// How long the guard remembers the token: until its `exp` plus the clock skew.
        public var expiresAtUnixSeconds: Int64
        public var skewSeconds: Int64
        /// The token's `iat`; a callback issued before the last one applied changes nothing.
        public var issuedAt: Int64?
        /// The token carries a `jti`: it names one callback, so another body is always a replay.
        /// Without one, two callbacks signed in the same second by a signer that adds none have
        /// the same token (RS256 is deterministic): another body is taken within a second of the
        /// first (a reinstall with a new secret), refused after.
        public var namesOneCallback: Bool
        /// How builds before the guard named the token as signed named it (a digest of its text):
        /// checked and recorded too, so replicas of both builds refuse each other's tokens during a
        /// rolling upgrade. Nil when it is `tokenDigest` (a token with a `jti`).
        public var earlierTokenDigest: String?

        public init(
            tokenDigest: String, bodyDigest: String, expiresAtUnixSeconds: Int64, skewSeconds: Int64, issuedAt: Int64?,
            namesOneCallback: Bool = true, earlierTokenDigest: String? = nil
        ) {
            self.earlierTokenDigest = earlierTokenDigest
            self.tokenDigest = tokenDigest
            self.bodyDigest = bodyDigest
            self.expiresAtUnixSeconds = expiresAtUnixSeconds
            self.skewSeconds = skewSeconds
            self.issuedAt = issuedAt
            self.namesOneCallback = namesOneCallback
        }

        func ttlMilliseconds(now: FlowTime) -> Int64 {
            max((self.expiresAtUnixSeconds - now.unixSeconds + self.skewSeconds + 1) * 1000, 1000)
        }
    }

    /// Replaces the tenant's record with a verified install: the whole earlier hash goes (old
    /// secret, old payload, old link), the new payload and sealed secret take its place, status
    /// `installed`. `createdAt` survives reinstalls. One script with the replay guard's check and
    /// record, so no reader sees a mix and a callback refused or failed here uses up nothing.
    public func storeConnectInstall(_ install: ConnectInstallation, mark: SignedInstallMark, now: FlowTime)
        async throws -> ConnectCallbackOutcome
    {
        let sealed = try self.box.seal(install.sharedSecret, context: self.connectSecretContext(install.clientKey))
        return try await self.runLifecycleScript(
            ConnectScripts.install, clientKey: install.clientKey, mark: mark,
            arguments: [
                install.payloadJSON, sealed, install.appKey, install.baseUrl,
                self.sealConnectLink(install.installationId, clientKey: install.clientKey),
            ], now: now)
    }

    /// Marks the tenant uninstalled and drops its shared secret; the record stays so a late request
    /// can be told apart from an unknown tenant. A tenant never seen is recorded as uninstalled with
    /// `payloadJSON` (already without its secret). The replay guard as for
    /// ``storeConnectInstall(_:mark:now:)``.
    public func storeConnectUninstall(
        clientKey: String, appKey: String?, baseUrl: String?, payloadJSON: String, installationId: InstallationID?,
        mark: SignedInstallMark, now: FlowTime
    ) async throws -> ConnectCallbackOutcome {
        try await self.runLifecycleScript(
            ConnectScripts.uninstall, clientKey: clientKey, mark: mark,
            arguments: [
                payloadJSON, appKey ?? "", baseUrl ?? "", self.sealConnectLink(installationId, clientKey: clientKey),
            ], now: now)
    }

    /// ARGV[1...5] of both scripts: now, the guard's values, its TTL in ms, `iat` or '', and '1'
    /// when the token names one callback (``SignedInstallMark/namesOneCallback``). The
    /// guard's value is the body digest keyed with the key ring (sealed deterministically, then
    /// hashed): the body holds the shared secret, so its plain hash is not left in Redis. ARGV[2]
    /// holds it under each key of the ring, comma-separated, the sealing key's first (the one
    /// stored): a retry that straddles an encryption-key rotation is still told from a replay.
    private func markArguments(_ mark: SignedInstallMark, clientKey: String, now: FlowTime) throws -> [String] {
        let sealed = try self.box.sealDeterministicallyUnderEveryKey(
            Array(mark.bodyDigest.utf8), context: self.connectTenantKey(clientKey) + "#install-body")
        let keyed = sealed.map { blob in
            SHA256.hash(data: Array(blob.utf8)).map { String(format: "%02x", $0) }.joined()
        }
        return [
            String(now.unixSeconds), keyed.joined(separator: ","), String(mark.ttlMilliseconds(now: now)),
            mark.issuedAt.map { String($0) } ?? "", mark.namesOneCallback ? "1" : "0",
        ]
    }

    /// The replay guard's key of builds before the guard moved into the tenant's hash slot
    /// (`tg:seen-install:<digest>`). While replicas of both run (a rolling upgrade), a token one
    /// of them accepted must be refused by the other: this build reads it before its script and
    /// sets it after a stored callback, as those builds do.
    func legacySeenSignedInstallKey(_ digest: String) -> String { "\(self.prefix):seen-install:\(digest)" }

    /// Runs a lifecycle script with the replay guard of both builds (``legacySeenSignedInstallKey(_:)``).
    private func runLifecycleScript(
        _ script: RedisScript, clientKey: String, mark: SignedInstallMark, arguments: [String], now: FlowTime
    ) async throws -> ConnectCallbackOutcome {
        let digests = [mark.tokenDigest] + (mark.earlierTokenDigest.map { [$0] } ?? [])
        let legacy = digests.map { self.legacySeenSignedInstallKey($0) }
        let guardKeys = digests.map { self.seenSignedInstallKey(clientKey, digest: $0) }
        // Accepted by a replica of an earlier build (its key set, ours not): refused here as there.
        // (Ours set too: this build accepted it, and the script tells a retry from a replay.)
        if try await self.redis.send(["EXISTS"] + legacy).int ?? 0 > 0,
            try await self.redis.send(["EXISTS"] + guardKeys).int == 0
        {
            return .replayed
        }
        let r = try await self.redis.eval(
            script, keys: [self.connectTenantKey(clientKey), guardKeys[0], guardKeys.last!],
            arguments: try self.markArguments(mark, clientKey: clientKey, now: now) + arguments)
        let outcome = try self.connectOutcome(r)
        if case .stored = outcome {
            // The callback is stored: a failure to leave the earlier builds' mark does not undo
            // that, so it is not answered as a failure (Atlassian would retry a change made).
            for key in legacy {
                _ = try? await self.redis.send(["SET", key, "1", "NX", "PX", String(mark.ttlMilliseconds(now: now))])
            }
        }
        return outcome
    }

    private func connectOutcome(_ reply: RedisValue) throws -> ConnectCallbackOutcome {
        switch reply.int {
        case 1: return .stored(created: true)
        case 0: return .stored(created: false)
        case -1: return .replayed
        case -2: return .repeated
        case -3: return .superseded
        default: throw RedisError.protocolError
        }
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
            secret = ConnectSharedSecret(
                try self.open(sealed, context: self.connectSecretContext(clientKey), kind: .sharedSecret))
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

/// The scripts of the Connect tenant hash. KEYS: the tenant, the token's replay-guard key, and its
/// guard key as builds before named tokens as signed named it (the same key for a token with a
/// `jti`); all in one hash slot. A guard found under either is the token's; both are recorded.
/// ARGV[1...5]: now (s), the body digest under each key (comma-separated, the one to store
/// first), guard TTL (ms), `iat` or '', '1' when the token names one callback. Both begin with
/// ``guardPrelude``: -1 for a token seen before with another body (with a `jti`; without one, more
/// than a second after it was first seen), -2 for a token with a `jti` seen before with the same
/// body (a retry: nothing to do), -3 for a callback issued before the last one applied
/// (`eventIat`, kept across reinstalls); otherwise the guard is recorded (`<body digest>:<first
/// seen>`, keeping the first-seen time) and the change applied.
enum ConnectScripts {
    static let guardPrelude = """
        local seen = redis.call('GET', KEYS[2]) or redis.call('GET', KEYS[3])
        local firstSeen = tonumber(ARGV[1])
        local mine = ARGV[2]
        local comma = string.find(ARGV[2], ',', 1, true)
        if comma then mine = string.sub(ARGV[2], 1, comma - 1) end
        if seen then
          -- `<body digest>:<first seen>`; a value without the time (an earlier build's) counts as
          -- seen long ago.
          local sep = string.find(seen, ':', 1, true)
          local body = seen
          firstSeen = 0
          if sep then
            body = string.sub(seen, 1, sep - 1)
            firstSeen = tonumber(string.sub(seen, sep + 1)) or 0
          end
          local same = string.find(',' .. ARGV[2] .. ',', ',' .. body .. ',', 1, true) ~= nil
          if same and ARGV[5] == '1' then return -2 end
          if not same and (ARGV[5] == '1' or tonumber(ARGV[1]) - firstSeen > 1) then return -1 end
        end
        local last = redis.call('HGET', KEYS[1], 'eventIat')
        if ARGV[4] ~= '' and last and tonumber(ARGV[4]) < tonumber(last) then return -3 end
        if not seen then firstSeen = tonumber(ARGV[1]) end
        for _, k in ipairs({KEYS[2], KEYS[3]}) do
          local ttl = redis.call('PTTL', k)
          if ttl > 0 then
            redis.call('SET', k, mine .. ':' .. firstSeen, 'PX', ttl)
          else
            redis.call('SET', k, mine .. ':' .. firstSeen, 'PX', ARGV[3])
          end
        end
        local eventIat = last
        if ARGV[4] ~= '' then eventIat = ARGV[4] end

        """

    /// ARGV[6...]: payload, sealed secret, app key, baseUrl, sealed installation link or ''.
    /// Returns 1 when the tenant is new, else 0 (or the guard's answer).
    static let install = RedisScript(
        guardPrelude + """
            local created = redis.call('HGET', KEYS[1], 'createdAt')
            redis.call('DEL', KEYS[1])
            redis.call('HSET', KEYS[1], 'status', 'installed', 'payload', ARGV[6], 'sharedSecret', ARGV[7],
              'key', ARGV[8], 'baseUrl', ARGV[9], 'createdAt', created or ARGV[1], 'updatedAt', ARGV[1],
              'installedAt', ARGV[1])
            if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'installationId', ARGV[10]) end
            if eventIat then redis.call('HSET', KEYS[1], 'eventIat', eventIat) end
            if created then return 0 end
            return 1
            """)

    /// ARGV[6...]: payload, app key, baseUrl, sealed installation link or ''. A known tenant keeps
    /// its payload and link; its secret goes. Returns 1 when the tenant is new, else 0 (or the
    /// guard's answer).
    static let uninstall = RedisScript(
        guardPrelude + """
            local created = redis.call('HGET', KEYS[1], 'createdAt')
            if eventIat then redis.call('HSET', KEYS[1], 'eventIat', eventIat) end
            if created then
              redis.call('HDEL', KEYS[1], 'sharedSecret')
              redis.call('HSET', KEYS[1], 'status', 'uninstalled', 'updatedAt', ARGV[1], 'uninstalledAt', ARGV[1])
              return 0
            end
            redis.call('HSET', KEYS[1], 'status', 'uninstalled', 'payload', ARGV[6], 'key', ARGV[7], 'baseUrl', ARGV[8],
              'createdAt', ARGV[1], 'updatedAt', ARGV[1], 'uninstalledAt', ARGV[1])
            if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'installationId', ARGV[9]) end
            return 1
            """)
}

extension GatewayStore: InstallKeyIDRegistry {
    /// `tg:connect:install-kids`: the `kid`s whose key verified a signed install (a sorted set
    /// scored by when that was last recorded; the newest ``maximumInstallKeyIDs`` kept).
    var installKeyIDsKey: String { "\(self.prefix):connect:install-kids" }

    static let maximumInstallKeyIDs = 1024

    public func isKnownInstallKeyID(_ kid: String) async throws -> Bool {
        try await self.redis.send(["ZSCORE", self.installKeyIDsKey, kid]).string != nil
    }

    public func knownInstallKeyIDs() async throws -> Set<String> {
        let reply = try await self.redis.send(["ZRANGE", self.installKeyIDsKey, "0", "-1"])
        return Set((reply.array ?? []).compactMap(\.string))
    }

    public func rememberInstallKeyID(_ kid: String) async throws {
        _ = try await self.redis.eval(
            ConnectScripts.rememberInstallKeyID, keys: [self.installKeyIDsKey],
            arguments: [kid, String(FlowTime.now().unixMilliseconds), String(Self.maximumInstallKeyIDs)])
    }
}

extension ConnectScripts {
    /// KEYS: the set of install key ids. ARGV: the kid, now (ms), how many to keep.
    static let rememberInstallKeyID = RedisScript(
        """
        redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
        redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
        return 1
        """)
}
