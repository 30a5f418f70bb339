import Logging

/// The gateway's shared state in Redis (see `Docs/operations.md` for the key layout).
///
/// Every secret (tokens, trigger URLs, private keys) is sealed with the ``SecretBox`` using the
/// Redis key name (plus `#field` for a hash field) as additional authenticated data. Every method
/// throws ``RedisError`` when Redis cannot be reached in time.
public final class GatewayStore: Sendable {
    /// The notification channel every process subscribes to.
    public let channel: String
    public let redis: RedisClient
    public let box: any SecretBox
    public let prefix: String
    /// Told of every stored secret that does not open (for a metric).
    public let undecryptable: @Sendable (SecretKind) -> Void
    /// Which routing values may be stored and served.
    let routing: RoutingPolicy

    /// Kinds of sealed values, for ``undecryptable``.
    public enum SecretKind: String, Sendable, CaseIterable {
        case systemToken = "system_token"
        case userToken = "user_token"
        case apiBaseUrl = "api_base_url"
        case connectLink = "connect_link"
        /// The auth trigger's URL: the round trip cannot start (`keys rewrap` before removing a key).
        case triggerUrl = "trigger_url"
        /// A trigger-signing private key.
        case signingKey = "signing_key"
        /// A named trigger's URL.
        case namedTriggerUrl = "named_trigger_url"
        /// A Connect tenant's shared secret.
        case sharedSecret = "shared_secret"
    }

    /// Opens `sealed` (sealed with `context`); a value no key of the ring opens is told to
    /// ``undecryptable`` as `kind` before the error is thrown on.
    public func open(_ sealed: String, context: String, kind: SecretKind) throws -> [UInt8] {
        do {
            return try self.box.open(sealed, context: context)
        } catch {
            self.undecryptable(kind)
            throw error
        }
    }

    public init(
        redis: RedisClient, box: any SecretBox, prefix: String = "tg", routing: RoutingPolicy = RoutingPolicy(),
        undecryptable: @escaping @Sendable (SecretKind) -> Void = { _ in }
    ) {
        self.redis = redis
        self.box = box
        self.prefix = prefix
        self.channel = "\(prefix):events"
        self.routing = routing
        self.undecryptable = undecryptable
    }

    // MARK: Keys

    /// `tg:{<installation ARI>}`: the hash-tagged stem of every key of one installation.
    public func tag(_ id: InstallationID) -> String { "\(self.prefix):{\(id.ari)}" }
    public func installationKey(_ id: InstallationID) -> String { self.tag(id) + ":installation" }
    public func systemTokenKey(_ id: InstallationID) -> String { self.tag(id) + ":token:system" }
    public func signingKeysKey(_ id: InstallationID) -> String { self.tag(id) + ":signing-keys" }
    func leaseKey(_ id: InstallationID) -> String { self.tag(id) + ":lease" }
    func pendingKey(_ id: InstallationID, requestID: String) -> String { self.tag(id) + ":pending:" + requestID }
    /// The sorted set of the installation's user-token and refusal key names, scored by when each
    /// expires (unix ms): entries past their time are dropped on every write, so it holds only live
    /// keys (uninstall deletes them).
    public func userKeysIndexKey(_ id: InstallationID) -> String { self.tag(id) + ":user-keys" }
    /// The set of user-token key names earlier builds kept (never trimmed; it expires with its
    /// longest-lived member). Uninstall still deletes what it names.
    public func legacyUserTokenIndexKey(_ id: InstallationID) -> String { self.tag(id) + ":user-tokens" }
    public func breakerKey(_ id: InstallationID) -> String { self.tag(id) + ":breaker" }
    func holdKey(_ id: InstallationID) -> String { self.tag(id) + ":hold" }
    public var installationsIndexKey: String { "\(self.prefix):installations" }

    // MARK: Installations

    /// Creates or refreshes an installation (lifecycle installed/upgraded). Returns false when the
    /// installation is uninstalled (which stays so).
    @discardableResult
    public func upsertInstallation(_ id: InstallationID, metadata: InstallationMetadata, now: FlowTime) async throws
        -> Bool
    {
        let r = try await self.redis.eval(
            GatewayScripts.upsertInstallation, keys: [self.installationKey(id)],
            arguments: [
                String(now.unixSeconds), metadata.appId ?? "", self.sealAPIBaseURL(metadata.apiBaseUrl, id),
                metadata.cloudId ?? "", self.channel, id.ari,
            ])
        let code = r.int ?? 0
        if code == 1 { try await self.index(id) }
        return code >= 0
    }

    /// The installation's metadata, or nil when it was never seen.
    public func installation(_ id: InstallationID) async throws -> InstallationRecord? {
        let r = try await self.redis.send(["HGETALL", self.installationKey(id)])
        let fields = r.fieldDictionary
        if fields.isEmpty { return nil }
        var record = InstallationRecord(id: id, fields: fields)
        record.apiBaseUrl = self.openAPIBaseURL(fields["apiBaseUrl"], id)
        return record
    }

    /// The installation's status alone (one `HGET`), or nil when it was never seen.
    public func installationStatus(_ id: InstallationID) async throws -> InstallationStatus? {
        guard let text = try await self.redis.send(["HGET", self.installationKey(id), "status"]).string else {
            return nil
        }
        return InstallationStatus(rawValue: text) ?? .active
    }

    /// Outcome of a registration.
    public enum RegistrationOutcome: Sendable {
        /// `replacedUnopenableKey`: the kept signing key did not open with the key ring (a key
        /// removed before `keys rewrap` finished), so the candidate replaced it.
        case registered(keyID: String, rawPrivateKey: [UInt8], replacedUnopenableKey: Bool = false)
        case uninstalled
    }

    /// Stores (or rotates) the sealed trigger URL; keeps the current signing key or stores the
    /// candidate one when none exists. Returns the key in force. A kept key that does not open
    /// with the key ring is replaced by the candidate (a pending rotation is dropped with it): the
    /// registration's answer hands the Forge side the new public key, so the installation's round
    /// trips work again.
    public func register(
        _ id: InstallationID, triggerURL: String, candidateKeyID: String, candidateKey: [UInt8],
        metadata: InstallationMetadata, now: FlowTime
    ) async throws -> RegistrationOutcome {
        try await self.register(
            id, triggerURL: triggerURL, candidateKeyID: candidateKeyID, candidateKey: candidateKey, metadata: metadata,
            now: now, again: true)
    }

    /// ``register(_:triggerURL:candidateKeyID:candidateKey:metadata:now:)``, once more (`again`)
    /// when another registration replaced an unopenable key meanwhile: its key is then answered.
    private func register(
        _ id: InstallationID, triggerURL: String, candidateKeyID: String, candidateKey: [UInt8],
        metadata: InstallationMetadata, now: FlowTime, again: Bool
    ) async throws -> RegistrationOutcome {
        let installationKey = self.installationKey(id)
        let signingKey = self.signingKeysKey(id)
        let sealedURL = try self.box.seal(Array(triggerURL.utf8), context: installationKey + "#triggerUrl")
        let sealedKey = try self.box.seal(candidateKey, context: signingKey + "#key:" + candidateKeyID)
        let r = try await self.redis.eval(
            GatewayScripts.register, keys: [installationKey, signingKey],
            arguments: [
                String(now.unixSeconds), sealedURL, candidateKeyID, sealedKey, metadata.appId ?? "",
                self.sealAPIBaseURL(metadata.apiBaseUrl, id), metadata.cloudId ?? "", self.channel, id.ari,
            ])
        guard let items = r.array, let first = items.first?.int else { throw RedisError.protocolError }
        if first < 0 { return .uninstalled }
        guard items.count == 3, let keyID = items[1].string, let sealed = items[2].string else {
            throw RedisError.protocolError
        }
        let raw: [UInt8]
        do {
            raw = try self.open(sealed, context: signingKey + "#key:" + keyID, kind: .signingKey)
        } catch {
            let replaced = try await self.redis.eval(
                GatewayScripts.replaceSigningKey, keys: [installationKey, signingKey],
                arguments: [String(now.unixSeconds), keyID, candidateKeyID, sealedKey])
            switch replaced.int {
            case 1: raw = candidateKey
            case 0: return .uninstalled
            default:
                // Another registration replaced it meanwhile: its key is the one in force.
                guard again else { throw error }
                return try await self.register(
                    id, triggerURL: triggerURL, candidateKeyID: candidateKeyID, candidateKey: candidateKey,
                    metadata: metadata, now: now, again: false)
            }
            try await self.index(id)
            return .registered(keyID: candidateKeyID, rawPrivateKey: raw, replacedUnopenableKey: true)
        }
        try await self.index(id)
        return .registered(keyID: keyID, rawPrivateKey: raw)
    }

    /// What the trigger client needs: the trigger URL and the current signing key, opened.
    /// Its printed and reflected forms show the key id only: the URL and the key are credentials.
    public struct TriggerMaterial: Sendable, CustomStringConvertible, CustomDebugStringConvertible,
        CustomReflectable
    {
        public let url: String
        public let keyID: String
        public let rawPrivateKey: [UInt8]

        public init(url: String, keyID: String, rawPrivateKey: [UInt8]) {
            self.url = url
            self.keyID = keyID
            self.rawPrivateKey = rawPrivateKey
        }

        public var description: String { "TriggerMaterial(keyID: \(self.keyID), url and key redacted)" }
        public var debugDescription: String { self.description }
        public var customMirror: Mirror { Mirror(self, children: ["keyID": self.keyID]) }
    }

    /// The trigger URL and signing key, or nil when no trigger is registered.
    public func triggerMaterial(_ id: InstallationID) async throws -> TriggerMaterial? {
        let installationKey = self.installationKey(id)
        let signingKey = self.signingKeysKey(id)
        let replies = try await self.redis.pipeline([
            ["HMGET", installationKey, "status", "triggerUrl"],
            ["HGET", signingKey, "current"],
        ])
        guard replies.count == 2, let fields = replies[0].array, fields.count == 2,
            fields[0].string == InstallationStatus.active.rawValue,
            let sealedURL = fields[1].string, let keyID = replies[1].string
        else { return nil }
        guard let sealedKey = try await self.redis.send(["HGET", signingKey, "key:" + keyID]).string else {
            return nil
        }
        let url = try self.open(sealedURL, context: installationKey + "#triggerUrl", kind: .triggerUrl)
        let key = try self.open(sealedKey, context: signingKey + "#key:" + keyID, kind: .signingKey)
        return TriggerMaterial(url: String(decoding: url, as: UTF8.self), keyID: keyID, rawPrivateKey: key)
    }

    /// Marks the installation uninstalled and deletes its tokens and keys at once; announces it.
    public func uninstall(_ id: InstallationID, now: FlowTime) async throws {
        _ = try await self.redis.eval(
            GatewayScripts.uninstall,
            keys: [
                self.installationKey(id), self.systemTokenKey(id), self.signingKeysKey(id),
                self.legacyUserTokenIndexKey(id), self.userKeysIndexKey(id),
            ],
            arguments: [String(now.unixSeconds), self.channel, id.ari])
        try await self.index(id)
    }

    /// Adds the installation to the listing index, then marks its record `indexed` (the index is
    /// another key, in another slot with Redis Cluster: not in the scripts' step). A write whose
    /// script ran but whose indexing failed leaves the mark unset, so the next write of the
    /// installation indexes it again.
    private func index(_ id: InstallationID) async throws {
        _ = try await self.redis.send(["ZADD", self.installationsIndexKey, "NX", "0", id.ari])
        _ = try await self.redis.send(["HSET", self.installationKey(id), "indexed", "1"])
    }

    /// One page of installations ordered by id, starting after `cursor` (an installation ARI),
    /// keeping only ids `filter` accepts. Returns the records and the id to continue after when
    /// more remain. Reads the ordered index (a sorted set) with ZRANGEBYLEX, never KEYS.
    public func listInstallations(after cursor: String?, limit: Int, filter: (InstallationID) -> Bool) async throws
        -> (records: [InstallationRecord], next: String?)
    {
        var ids: [InstallationID] = []
        var start = cursor.map { "(" + $0 } ?? "-"
        let batch = min(max(limit + 1, 64), 1001)
        scan: while ids.count <= limit {
            let reply = try await self.redis.send([
                "ZRANGEBYLEX", self.installationsIndexKey, start, "+", "LIMIT", "0", String(batch),
            ])
            let page = (reply.array ?? []).compactMap { $0.string }
            for raw in page {
                if let id = InstallationID(raw), id.ari == raw, filter(id) {
                    ids.append(id)
                    if ids.count > limit { break scan }
                }
            }
            if page.count < batch { break }
            start = "(" + page.last!
        }
        return try await self.loadPage(ids, limit: limit)
    }

    // MARK: Tokens

    /// What a token request needs in one round trip: the installation's state and its token.
    public struct RequestSnapshot: Sendable {
        public var exists: Bool
        public var status: InstallationStatus
        public var triggerRegistered: Bool
        public var apiBaseUrl: String?
        public var token: AccessToken?
        /// Unix milliseconds until which the installation's circuit is open (0: closed).
        public var circuitOpenUntil: Int64
        /// How long the installation's round trips stay on hold (nil: no hold).
        public var holdRemaining: Duration?
    }

    /// Reads the installation's status and stored system token in one pipelined round trip.
    public func snapshot(_ id: InstallationID, timeout: Duration? = nil) async throws -> RequestSnapshot {
        let tokenKey = self.systemTokenKey(id)
        let replies = try await self.redis.pipeline(
            [
                ["HMGET", self.installationKey(id), "status", "triggerUrl", "apiBaseUrl"],
                ["HMGET", tokenKey, "exp", "v", "rid", "at"],
                ["HGET", self.breakerKey(id), "openUntil"],
                ["PTTL", self.holdKey(id)],
            ], timeout: timeout)
        return try await self.requestSnapshot(id, replies: replies)
    }

    /// Decodes the four replies of a snapshot (installation, token, circuit, hold), in the order
    /// ``snapshot(_:timeout:)`` reads them.
    func requestSnapshot(_ id: InstallationID, replies: [RedisValue]) async throws -> RequestSnapshot {
        guard replies.count == 4, let inst = replies[0].array, inst.count == 3, let tok = replies[1].array,
            tok.count == 4
        else { throw RedisError.protocolError }
        let statusText = inst[0].string
        let tokenKey = self.systemTokenKey(id)
        return RequestSnapshot(
            exists: statusText != nil,
            status: InstallationStatus(rawValue: statusText ?? "") ?? .active,
            triggerRegistered: !(inst[1].string ?? "").isEmpty,
            apiBaseUrl: self.openAPIBaseURL(inst[2].string, id),
            token: await self.openTokenOrDrop(key: tokenKey, exp: tok[0], sealed: tok[1], rid: tok[2], at: tok[3]),
            circuitOpenUntil: replies[2].string.flatMap { Int64($0) } ?? 0,
            holdRemaining: Self.remaining(replies[3]))
    }

    /// A PTTL reply as a duration, nil when the key is absent or has no expiry.
    static func remaining(_ reply: RedisValue) -> Duration? {
        guard let ms = reply.int, ms > 0 else { return nil }
        return .milliseconds(ms)
    }

    /// The stored system token, or nil.
    public func systemToken(_ id: InstallationID) async throws -> AccessToken? {
        let tokenKey = self.systemTokenKey(id)
        let r = try await self.redis.send(["HMGET", tokenKey, "exp", "v", "rid", "at"])
        guard let items = r.array, items.count == 4 else { throw RedisError.protocolError }
        return await self.openTokenOrDrop(key: tokenKey, exp: items[0], sealed: items[1], rid: items[2], at: items[3])
    }

    /// The stored token, or nil when there is none or it does not open with any key of the ring
    /// (a key removed too early, or a value copied from another installation's key). Such a token
    /// is counted, then deleted if it is still the stored one, so the next delivery is stored
    /// whatever its expiry: it is treated as absent and a new one is fetched.
    private func openTokenOrDrop(key: String, exp: RedisValue, sealed: RedisValue, rid: RedisValue, at: RedisValue)
        async -> AccessToken?
    {
        do {
            return try self.openToken(key: key, exp: exp, sealed: sealed, rid: rid, at: at)
        } catch {
            self.undecryptable(.systemToken)
            if let sealedText = sealed.string {
                _ = try? await self.redis.eval(GatewayScripts.dropIfUnchanged, keys: [key], arguments: [sealedText])
            }
            return nil
        }
    }

    /// What a process waiting on a round trip reads: the stored token with the installation's
    /// `apiBaseUrl`, whether the round trip's pending request is still open, and the hold.
    public struct RoundProbe: Sendable {
        public var token: AccessToken?
        public var apiBaseUrl: String?
        /// The pending request of the round trip is still there (no delivery answered it yet).
        /// Always false for a request id that never had one (a follower's).
        public var pendingOpen: Bool
        /// A delivery answered the round trip's pending request (it is marked so until it
        /// expires). False for one that expired unanswered, or never was.
        public var pendingAnswered = false
        /// How long the installation's round trips stay on hold (nil: no hold).
        public var holdRemaining: Duration?
        /// The installation was uninstalled.
        public var uninstalled = false
    }

    /// The stored token, the `apiBaseUrl`, the hold, whether the installation was uninstalled and
    /// (with `requestID`) whether that round trip's pending request is still open, in one
    /// pipelined round trip.
    public func roundProbe(_ id: InstallationID, requestID: String?) async throws -> RoundProbe {
        let tokenKey = self.systemTokenKey(id)
        // The pending request first: a pipeline is not one step, and a delivery that lands between
        // two of its commands must not look like one that answered the request without storing
        // its token (read the other way round, the old token and the request answered).
        var commands: [[String]] = requestID.map { [["GET", self.pendingKey(id, requestID: $0)]] } ?? []
        let first = commands.count
        commands += [
            ["HMGET", tokenKey, "exp", "v", "rid", "at"],
            ["HMGET", self.installationKey(id), "apiBaseUrl", "status"],
            ["PTTL", self.holdKey(id)],
        ]
        let replies = try await self.redis.pipeline(commands)
        guard replies.count == commands.count, let tok = replies[first].array, tok.count == 4,
            let installation = replies[first + 1].array, installation.count == 2
        else {
            throw RedisError.protocolError
        }
        return RoundProbe(
            token: await self.openTokenOrDrop(key: tokenKey, exp: tok[0], sealed: tok[1], rid: tok[2], at: tok[3]),
            apiBaseUrl: self.openAPIBaseURL(installation[0].string, id),
            pendingOpen: requestID != nil && replies[0].string.map { $0 != "=" } == true,
            pendingAnswered: requestID != nil && replies[0].string == "=",
            holdRemaining: Self.remaining(replies[first + 2]), uninstalled: installation[1].string == "uninstalled")
    }

    /// The stored system token with the installation's `apiBaseUrl` and hold.
    public func systemTokenEntry(_ id: InstallationID) async throws -> RoundProbe {
        try await self.roundProbe(id, requestID: nil)
    }

    private func openToken(key: String, exp: RedisValue, sealed: RedisValue, rid: RedisValue, at: RedisValue) throws
        -> AccessToken?
    {
        guard let expText = exp.string, let expiresAt = Int64(expText), let sealedText = sealed.string else {
            return nil
        }
        let value = try self.box.open(sealedText, context: key)
        let requestID = rid.string.flatMap { $0.isEmpty ? nil : $0 }
        return AccessToken(
            value: String(decoding: value, as: UTF8.self), expiresAt: expiresAt, requestID: requestID,
            receivedAt: at.string.flatMap { Int64($0) })
    }

    /// A key that a change may make only once: set with `NX` in the change's own step, expiring
    /// after `lifetime`. It must carry the installation's hash tag (``tag(_:)``).
    public struct FirstUseKey: Sendable, Hashable {
        public var key: String
        public var lifetime: Duration

        public init(key: String, lifetime: Duration) {
            self.key = key
            self.lifetime = lifetime
        }
    }

    /// The change's ``FirstUseKey`` existed already: nothing was changed.
    public struct FirstUseKeyTaken: Error, Sendable, Hashable {}

    /// Result of storing a delivered token.
    public struct DeliveryResult: Sendable {
        public var outcome: TokenStoreOutcome
        /// The installation record was created by this delivery.
        public var created: Bool
        /// The delivery answered a pending request of this installation.
        public var solicited: Bool
        /// The installation's `apiBaseUrl` after the delivery (the latest FIT's), if known.
        public var apiBaseUrl: String? = nil
    }

    /// Stores a delivered token atomically: only if its expiry is strictly later than the stored
    /// one's; the key expires with the token; a matching pending request is marked answered; every
    /// process is notified (`token <ari> <requestId|->`, with ` same` when the delivery answered a
    /// pending request without replacing the token). The FIT's `apiBaseUrl` and `cloudId` replace
    /// the recorded ones (the latest FIT wins). A token with less than `minimumValidity` left at
    /// `now` is never stored (answered `notNewer`), though it still answers its pending request;
    /// for an installation never seen it changes nothing at all (no record, no first-use key).
    /// `arrival` says how an unsolicited token came (a delivery that answers a pending request is
    /// recorded as `trigger`). `origin`, the storing replica's id, is named in the announcement.
    ///
    /// With `firstUse`, a key in the installation's hash slot that must not exist yet: it is set in
    /// the same step, and when it exists nothing at all changes and ``FirstUseKeyTaken`` is thrown.
    public func storeDeliveredToken(
        _ id: InstallationID, token: AccessToken, requestID: String?, metadata: InstallationMetadata, now: FlowTime,
        minimumValidity: Duration = .seconds(60), arrival: TokenArrival = .push, origin: String? = nil,
        firstUse: FirstUseKey? = nil
    ) async throws -> DeliveryResult {
        let tokenKey = self.systemTokenKey(id)
        let sealed = try self.box.seal(Array(token.value.utf8), context: tokenKey)
        let rid = requestID ?? ""
        let sealedBaseURL = self.sealAPIBaseURL(metadata.apiBaseUrl, id)
        var keys = [self.installationKey(id), tokenKey, self.pendingKey(id, requestID: rid)]
        var arguments = [
            String(token.expiresAt), sealed, String(now.unixSeconds), rid, self.channel, id.ari,
            metadata.appId ?? "", sealedBaseURL, metadata.cloudId ?? "",
            String(now.unixSeconds + minimumValidity.components.seconds), arrival.rawValue, origin ?? "",
        ]
        if let firstUse {
            keys.append(firstUse.key)
            arguments.append(String(max(firstUse.lifetime.milliseconds, 1)))
        }
        let r = try await self.redis.eval(GatewayScripts.storeToken, keys: keys, arguments: arguments)
        guard let items = r.array, items.count >= 3, let s = items[0].int, let c = items[1].int,
            let sol = items[2].int
        else { throw RedisError.protocolError }
        if s == -2 { throw FirstUseKeyTaken() }
        if c == 1 || (s >= 0 && items.count > 4 && items[4].int == 0) { try await self.index(id) }
        let outcome: TokenStoreOutcome = s == 1 ? .stored : (s == 0 ? .notNewer : .uninstalled)
        // The stored value is most often the one just sent (sealed deterministically): its
        // plaintext is known without opening it.
        let stored = items.count > 3 ? items[3].string : nil
        let baseURL =
            stored != nil && stored == sealedBaseURL && !sealedBaseURL.isEmpty
            ? metadata.apiBaseUrl : self.openAPIBaseURL(stored, id)
        return DeliveryResult(outcome: outcome, created: c == 1, solicited: sol == 1, apiBaseUrl: baseURL)
    }

    // MARK: Round trips

    /// Puts the installation's round trips on hold for `duration` (`tg:{id}:hold`, holding the
    /// request id of the round trip that brought no newer token) and announces it (`hold <ari>`);
    /// with `releasingLease`, releases the lease in the same script if `requestID` still holds it.
    public func placeHold(_ id: InstallationID, requestID: String, duration: Duration, releasingLease: Bool)
        async throws
    {
        _ = try await self.redis.eval(
            GatewayScripts.placeHold,
            keys: [self.holdKey(id), self.leaseKey(id), self.pendingKey(id, requestID: requestID)],
            arguments: [
                requestID, String(max(duration.milliseconds, 1)), releasingLease ? "1" : "0", self.channel, id.ari,
            ])
    }

    /// Extends the lease (and the round trip's pending request, named like the lease's owner)
    /// only while `owner` holds it.
    @discardableResult
    public func extendLease(_ id: InstallationID, owner: String, ttl: Duration) async throws -> Bool {
        let r = try await self.redis.eval(
            GatewayScripts.extendIfOwner, keys: [self.leaseKey(id), self.pendingKey(id, requestID: owner)],
            arguments: [owner, String(max(ttl.milliseconds, 1))])
        return r.int == 1
    }

    /// Releases the lease only while `owner` holds it (compare, then delete), and the round trip's
    /// pending request (named like the lease's owner) with it.
    @discardableResult
    public func releaseLease(_ id: InstallationID, owner: String) async throws -> Bool {
        let r = try await self.redis.eval(
            GatewayScripts.releaseIfOwner, keys: [self.leaseKey(id), self.pendingKey(id, requestID: owner)],
            arguments: [owner])
        return r.int == 1
    }

    // MARK: Circuit breaking

    /// Records the outcome of a round trip this process led and, with `owner`, releases the lease
    /// in the same step while `owner` holds it. Returns the instant (unix ms) until which the
    /// circuit is now open, or nil when it is closed.
    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime,
        releasingLease owner: String? = nil
    ) async throws -> Int64? {
        let r = try await self.redis.eval(
            GatewayScripts.recordRound,
            keys: [self.breakerKey(id), self.leaseKey(id), self.pendingKey(id, requestID: owner ?? "")],
            arguments: [
                succeeded ? "1" : "0", String(threshold), String(openBase.milliseconds), String(openCap.milliseconds),
                String(now.unixMilliseconds), owner ?? "",
            ])
        guard let items = r.array, items.count == 2, let opened = items[0].int else { throw RedisError.protocolError }
        return opened == 1 ? items[1].int : nil
    }

    /// Answers when Redis answers.
    public func ping() async throws {
        try await self.redis.ping(timeout: nil)
    }
}

extension GatewayStore.RegistrationOutcome: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Names the key id, never the private key.
    public var description: String {
        switch self {
        case .registered(let keyID, _, let replaced):
            "registered(keyID: \(keyID), rawPrivateKey: <redacted>, replacedUnopenableKey: \(replaced))"
        case .uninstalled:
            "uninstalled"
        }
    }

    public var debugDescription: String { self.description }

    public var customMirror: Mirror { Mirror(self, children: ["description": self.description]) }
}
