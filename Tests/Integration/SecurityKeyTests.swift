import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import NIOHTTP1
import Synchronization
import Testing

@testable import TokenGateway

/// Issue #4 item 5: secrets at rest are bound to their Redis key, the key ring rotates with
/// `keys rewrap`, and trigger-signing keys rotate per installation with an overlap window.
@Suite("Security: keys at rest and trigger-key rotation", .serialized)
struct SecurityKeyTests {
    static func ring(_ spec: [(String, [UInt8])]) throws -> EncryptionKeyRing {
        try EncryptionKeyRing(keys: spec.map { (id: $0.0, key: SymmetricKey(data: $0.1)) })
    }

    static func randomKey() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }

    static func redis(_ url: String = GatewayHarness.redisURL) throws -> RedisClient {
        // A generous timeout: these tests share two cores with the whole suite.
        var configuration = try RedisConfiguration(url: url)
        configuration.commandTimeout = .seconds(10)
        return RedisClient(configuration: configuration, logger: Logger(label: "security-test"))
    }

    static func installation() -> InstallationID {
        InstallationID(UUID().uuidString.lowercased())!
    }

    /// Fills a store: two installations with trigger URLs, signing keys (one mid-rotation) and
    /// tokens, a user token, and a Connect tenant: nine sealed values.
    static func seed(_ store: GatewayStore) async throws -> [InstallationID] {
        let now = FlowTime.now()
        var ids: [InstallationID] = []
        for n in 0..<2 {
            let id = Self.installation()
            let key = TriggerSigningKey.generate()
            _ = try await store.register(
                id, triggerURL: "https://t\(n).hello.atlassian-dev.net/x1/secret-\(n)", candidateKeyID: key.keyId,
                candidateKey: key.rawPrivateKey,
                metadata: .init(appId: "app", apiBaseUrl: "https://api.atlassian.com/ex/jira/\(id.shortID)"), now: now)
            _ = try await store.storeDeliveredToken(
                id, token: AccessToken(value: "token-\(n)-\(UUID())", expiresAt: now.unixSeconds + 3600),
                requestID: nil,
                metadata: .init(), now: now)
            ids.append(id)
        }
        let next = TriggerSigningKey.generate()
        _ = try await store.rotateTriggerKey(
            ids[0], candidateKeyID: next.keyId, candidateKey: next.rawPrivateKey, overlap: .seconds(600), now: now)
        _ = try await RedisUserTokenStore(installations: store).store(
            ids[1], accountId: "557058:user-1",
            token: AccessToken(value: "user-token-\(UUID())", expiresAt: now.unixSeconds + 3600),
            cacheUntil: now.unixSeconds + 3000, now: now)
        _ = try await store.storeConnectInstall(
            ConnectInstallation(
                clientKey: "client-\(UUID())", appKey: Self.sealedLookingAppKey,
                baseUrl: "https://example.atlassian.net",
                payloadJSON: "{}", sharedSecret: Array("shared-\(UUID())".utf8), installationId: ids[0]),
            mark: .init(
                tokenDigest: "token-\(UUID())", bodyDigest: "body", expiresAtUnixSeconds: now.unixSeconds + 180,
                skewSeconds: 5, issuedAt: now.unixSeconds),
            now: now)
        return ids
    }

    /// Every sealed value under `prefix`: (key, field, key id).
    static func sealedValues(prefix: String, redis: RedisClient) async throws -> [(String, String, String)] {
        var out: [(String, String, String)] = []
        for key in try await Security.scan(pattern: "\(prefix):*", in: redis) {
            guard try await redis.send(["TYPE", key]).string == "hash" else { continue }
            let items = try await redis.send(["HGETALL", key]).array ?? []
            var i = 0
            while i + 1 < items.count {
                if let field = items[i].string, let value = items[i + 1].string, KeyRewrap.looksSealed(value),
                    !KeyRewrap.isPlainField(field, of: key, prefix: prefix),
                    let keyID = EncryptionKeyRing.keyId(of: value)
                {
                    out.append((key, field, keyID))
                }
                i += 2
            }
        }
        return out
    }

    static func opensEverything(_ store: GatewayStore, _ ids: [InstallationID]) async throws {
        for id in ids {
            #expect(try await store.systemToken(id) != nil)
            #expect(try await store.triggerMaterial(id) != nil)
            #expect(try await store.triggerKeys(id, now: FlowTime.now()) != nil)
        }
        #expect(try await store.systemToken(ids[0])?.value.hasPrefix("token-0-") == true)
    }

    @Test("a sealed value copied under another installation's key does not open, and is counted by kind")
    func copiedBlobsFailToDecrypt() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let counted = Mutex<[GatewayStore.SecretKind]>([])
        let store = GatewayStore(
            redis: redis, box: try Self.ring([("k1", Self.randomKey())]), prefix: prefix,
            undecryptable: { kind in counted.withLock { $0.append(kind) } })
        let ids = try await Self.seed(store)
        let (a, b) = (ids[0], ids[1])

        // Token: A's sealed token under B's token key.
        let tokenA = try await redis.send(["HGET", store.systemTokenKey(a), "v"]).string!
        _ = try await redis.send(["HSET", store.systemTokenKey(b), "v", tokenA])
        // It does not open: treated as absent (and dropped, so the next delivery is stored).
        #expect(try await store.systemToken(b) == nil)
        #expect(try await redis.send(["EXISTS", store.systemTokenKey(b)]).int == 0)

        // Routing data: A's sealed apiBaseUrl under B's installation hash is not served.
        let baseA = try #require(try await redis.send(["HGET", store.installationKey(a), "apiBaseUrl"]).string)
        #expect(!baseA.contains("atlassian"), "the apiBaseUrl is sealed")
        _ = try await redis.send(["HSET", store.installationKey(b), "apiBaseUrl", baseA])
        #expect(try await store.installation(b)?.apiBaseUrl == nil)
        #expect(try await store.installation(a)?.apiBaseUrl == "https://api.atlassian.com/ex/jira/\(a.shortID)")

        // Trigger URL: A's under B's installation hash.
        let urlA = try await redis.send(["HGET", store.installationKey(a), "triggerUrl"]).string!
        _ = try await redis.send(["HSET", store.installationKey(b), "triggerUrl", urlA])
        await #expect(throws: EncryptionError.authenticationFailed) { try await store.triggerMaterial(b) }

        // Signing key: A's private key under B's hash and B's key id.
        let keysA = "\(prefix):{\(a.ari)}:signing-keys"
        let keysB = "\(prefix):{\(b.ari)}:signing-keys"
        let idA = try await redis.send(["HGET", keysA, "current"]).string!
        let idB = try await redis.send(["HGET", keysB, "current"]).string!
        let sealedA = try await redis.send(["HGET", keysA, "key:" + idA]).string!
        _ = try await redis.send(["HSET", keysB, "key:" + idB, sealedA])
        await #expect(throws: EncryptionError.authenticationFailed) {
            try await store.triggerKeys(b, now: FlowTime.now())
        }

        // A Connect shared secret under another tenant's key.
        let tenants = try await Security.scan(pattern: "\(prefix):connect:*", in: redis)
        let tenantKey = try #require(tenants.first)
        let sealedSecret = try #require(try await redis.send(["HGET", tenantKey, "sharedSecret"]).string)
        _ = try await redis.send([
            "HSET", store.connectTenantKey("other-tenant"), "status", "installed", "sharedSecret", sealedSecret,
        ])
        await #expect(throws: EncryptionError.authenticationFailed) { try await store.connectTenant("other-tenant") }
        // Each kind that did not open was counted (for token_gateway_undecryptable_secrets_total).
        let kinds = Set(counted.withLock { $0 })
        #expect(kinds == [.systemToken, .apiBaseUrl, .triggerUrl, .signingKey, .sharedSecret], "\(kinds)")

        // The same blob still opens where it belongs.
        #expect(try await store.systemToken(a) != nil)
        #expect(try await store.triggerMaterial(a) != nil)
        await redis.shutdown()
    }

    @Test(
        "signed-install guard in the store: a retry, a replay, a late callback, an earlier build's record; no plain body hash kept"
    )
    func connectLifecycleGuard() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let store = GatewayStore(redis: redis, box: try Self.ring([("k1", Self.randomKey())]), prefix: prefix)
        let now = FlowTime.now()
        func install(_ secret: String) -> ConnectInstallation {
            ConnectInstallation(
                clientKey: "tenant-1", appKey: "app", baseUrl: "https://t.atlassian.net", payloadJSON: "{}",
                sharedSecret: Array(secret.utf8), installationId: nil)
        }
        func mark(_ token: String, body: String, iat: Int64?) -> GatewayStore.SignedInstallMark {
            .init(
                tokenDigest: token, bodyDigest: body, expiresAtUnixSeconds: now.unixSeconds + 180, skewSeconds: 5,
                issuedAt: iat)
        }
        let first = mark("token-a", body: "body-a", iat: now.unixSeconds)
        #expect(
            try await store.storeConnectInstall(install("secret-a-0123456789"), mark: first, now: now)
                == .stored(created: true))
        // A retry (the same token, with a jti, and the same body) changes nothing.
        #expect(try await store.storeConnectInstall(install("secret-a-0123456789"), mark: first, now: now) == .repeated)
        // Without a jti: the same body is stored again; another body is taken within a second of
        // the first sight, refused after.
        var quick = mark("token-q", body: "body-q1", iat: now.unixSeconds)
        quick.namesOneCallback = false
        _ = try await store.storeConnectInstall(install("secret-q-0123456789"), mark: quick, now: now)
        #expect(
            try await store.storeConnectInstall(install("secret-q-0123456789"), mark: quick, now: now)
                == .stored(created: false))
        quick.bodyDigest = "body-q2"
        #expect(
            try await store.storeConnectInstall(install("secret-a-0123456789"), mark: quick, now: now + .seconds(1))
                == .stored(created: false))
        quick.bodyDigest = "body-q3"
        #expect(
            try await store.storeConnectInstall(install("forged-0123456789"), mark: quick, now: now + .seconds(2))
                == .replayed)
        let forged = mark("token-a", body: "body-b", iat: now.unixSeconds)
        #expect(try await store.storeConnectInstall(install("forged-0123456789"), mark: forged, now: now) == .replayed)
        let late = mark("token-old", body: "body-c", iat: now.unixSeconds - 10)
        #expect(try await store.storeConnectInstall(install("older-0123456789"), mark: late, now: now) == .superseded)
        #expect(try await store.connectTenant("tenant-1")?.sharedSecret?.bytes == Array("secret-a-0123456789".utf8))
        // A guard value without its first-seen time (an earlier build's) counts as seen long ago.
        let quickKey = store.seenSignedInstallKey("tenant-1", digest: "token-q")
        let quickValue = try #require(try await redis.send(["GET", quickKey]).string)
        _ = try await redis.send(["SET", quickKey, String(quickValue.split(separator: ":")[0]), "KEEPTTL"])
        quick.bodyDigest = "body-q4"
        #expect(try await store.storeConnectInstall(install("forged-0123456789"), mark: quick, now: now) == .replayed)
        // The guard holds a keyed digest, not the body's plain hash.
        let guardValue = try await redis.send(["GET", store.seenSignedInstallKey("tenant-1", digest: "token-a")]).string
        #expect(guardValue != nil && guardValue != "body-a")
        // A token a replica of an earlier build accepted (its key, tg:seen-install:<digest>) is
        // refused here too, and changes nothing; one this build accepted sets that key as well.
        _ = try await redis.send(["SET", "\(prefix):seen-install:token-e", "1", "PX", "60000"])
        let earlier = mark("token-e", body: "body-e", iat: now.unixSeconds + 1)
        #expect(
            try await store.storeConnectInstall(install("earlier-0123456789"), mark: earlier, now: now) == .replayed)
        #expect(try await store.connectTenant("tenant-1")?.sharedSecret?.bytes == Array("secret-a-0123456789".utf8))
        #expect(try await redis.send(["EXISTS", "\(prefix):seen-install:token-a"]).int == 1)
        await redis.shutdown()
    }

    @Test("a signed install retried across an encryption-key rotation is a retry, and another body still a replay")
    func connectGuardAcrossRotation() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let (k1, k2) = (Self.randomKey(), Self.randomKey())
        // The replica that took the first delivery, and one whose ring already seals with k2.
        let before = GatewayStore(redis: redis, box: try Self.ring([("k1", k1)]), prefix: prefix)
        let after = GatewayStore(redis: redis, box: try Self.ring([("k2", k2), ("k1", k1)]), prefix: prefix)
        let now = FlowTime.now()
        func install(_ secret: String) -> ConnectInstallation {
            ConnectInstallation(
                clientKey: "tenant-r", appKey: "app", baseUrl: "https://t.atlassian.net", payloadJSON: "{}",
                sharedSecret: Array(secret.utf8), installationId: nil)
        }
        let mark = GatewayStore.SignedInstallMark(
            tokenDigest: "token-r", bodyDigest: "body-r", expiresAtUnixSeconds: now.unixSeconds + 180, skewSeconds: 5,
            issuedAt: now.unixSeconds)
        #expect(
            try await before.storeConnectInstall(install("secret-r-0123456789"), mark: mark, now: now)
                == .stored(created: true))
        #expect(try await after.storeConnectInstall(install("secret-r-0123456789"), mark: mark, now: now) == .repeated)
        var forged = mark
        forged.bodyDigest = "body-forged"
        #expect(try await after.storeConnectInstall(install("forged-0123456789"), mark: forged, now: now) == .replayed)
        // The other way round, in step 2 of the documented rollout: a replica not yet restarted
        // holds [k1, k2] from step 1.
        let stepOne = GatewayStore(redis: redis, box: try Self.ring([("k1", k1), ("k2", k2)]), prefix: prefix)
        var second = mark
        second.tokenDigest = "token-s"
        second.issuedAt = now.unixSeconds + 1
        #expect(
            try await after.storeConnectInstall(install("secret-s-0123456789"), mark: second, now: now)
                == .stored(created: false))
        #expect(
            try await stepOne.storeConnectInstall(install("secret-s-0123456789"), mark: second, now: now) == .repeated)
        #expect(try await after.connectTenant("tenant-r")?.sharedSecret?.bytes == Array("secret-s-0123456789".utf8))
        await redis.shutdown()
    }

    @Test(
        "the documented rotation rolls out in two steps: a replica still on [old, new] opens what one on [new, old] sealed, and drops nothing"
    )
    func twoStepRollout() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let (old, new) = (("k-old", Self.randomKey()), ("k-new", Self.randomKey()))
        let counted = Mutex(0)
        // Step 1 everywhere: the new key is known but not used to seal.
        let stepOne = GatewayStore(
            redis: redis, box: try Self.ring([old, new]), prefix: prefix,
            undecryptable: { _ in counted.withLock { $0 += 1 } })
        let ids = try await Self.seed(stepOne)
        // Step 2 on one replica: it seals with the new key…
        let stepTwo = GatewayStore(redis: redis, box: try Self.ring([new, old]), prefix: prefix)
        let now = FlowTime.now()
        let fresh = AccessToken(value: "token-0-rolled-\(UUID())", expiresAt: now.unixSeconds + 7200)
        _ = try await stepTwo.storeDeliveredToken(ids[0], token: fresh, requestID: nil, metadata: .init(), now: now)
        let sealed = try await Self.sealedValues(prefix: prefix, redis: redis)
        #expect(sealed.contains { $0.0 == stepOne.systemTokenKey(ids[0]) && $0.2 == "k-new" })
        // …and a replica still on step 1 opens it, and everything else, and drops nothing.
        #expect(try await stepOne.systemToken(ids[0])?.value == fresh.value)
        try await Self.opensEverything(stepOne, ids)
        try await Self.opensEverything(stepTwo, ids)
        #expect(counted.withLock { $0 } == 0)
        #expect(try await stepTwo.systemToken(ids[0])?.value == fresh.value)
        await redis.shutdown()
    }

    @Test("a token blob copied under another installation is never served to a caller")
    func copiedTokenIsNotServed() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let a = try await h.installed()
            let b = try await h.installed()
            let pushedA = try await h.emulator.push(a)
            #expect(pushedA.status == 200)
            // B's token key gets A's sealed token (and expiry), as an attacker with write access
            // to Redis could copy it; B's gateway memory holds no token of its own.
            let store = h.gateway.store
            let fields = try await h.gateway.redis.send(["HGETALL", store.systemTokenKey(a.installationID)])
            _ = try await h.gateway.redis.send(
                ["HSET", store.systemTokenKey(b.installationID)] + (fields.array ?? []).compactMap(\.string))
            // It does not open under B's key: treated as absent, B gets a token of its own.
            let answer = try await h.token(b)
            #expect(!answer.body.contains(pushedA.token))
            #expect(answer.status == 200)
            #expect(answer.json["source"] as? String == "trigger")
            #expect(h.emulator.triggerCalls(for: b) == 1)
            // A is unaffected.
            #expect(try await h.token(a).json["accessToken"] as? String == pushedA.token)
        }
    }

    /// A Connect app key with the shape of a sealed value (`<key id>.<38+ base64url characters>`):
    /// plain text all the same, which the rewrap must leave alone and not count as unopenable.
    static let sealedLookingAppKey = "acme.jira-servicedesk-approvals-automation-cloud"

    /// Routing data is sealed again deterministically by `rewrap`, as the store writes it (the
    /// store's scripts compare it in place), also a value an earlier walk sealed with a random nonce.
    static func expectRoutingDataDeterministic(
        redis: RedisClient, ring k2Ring: EncryptionKeyRing, store new: GatewayStore, ids: [InstallationID],
        prefix: String, rewrap: KeyRewrap
    ) async throws {
        var routing: [(key: String, field: String)] = ids.map { (new.installationKey($0), "apiBaseUrl") }
        for tenant in try await Security.scan(pattern: "\(prefix):connect:{*}", in: redis) {
            routing.append((tenant, "installationId"))
        }
        var checked = 0
        for (key, field) in routing {
            guard let sealed = try await redis.send(["HGET", key, field]).string, !sealed.isEmpty else { continue }
            let plaintext = try k2Ring.open(sealed, context: key + "#" + field)
            #expect(sealed == (try k2Ring.sealDeterministically(plaintext, context: key + "#" + field)), "\(field)")
            checked += 1
        }
        #expect(checked == 3)
        // One that an earlier build's walk sealed with a random nonce under the current key is
        // written again deterministically.
        let (randomKey, randomField) = routing[0]
        let plain = try k2Ring.open(
            try #require(try await redis.send(["HGET", randomKey, randomField]).string),
            context: randomKey + "#" + randomField)
        _ = try await redis.send([
            "HSET", randomKey, randomField, try k2Ring.seal(plain, context: randomKey + "#" + randomField),
        ])
        let fix = try await rewrap.run()
        #expect(fix.rewrapped == 1)
        #expect(
            try await redis.send(["HGET", randomKey, randomField]).string
                == (try k2Ring.sealDeterministically(plain, context: randomKey + "#" + randomField)))
    }

    @Test("KeyRewrap re-seals everything under the new key, resumably and idempotently")
    func rewrapLibrary() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let k1 = Self.randomKey()
        let k2 = Self.randomKey()
        let old = GatewayStore(redis: redis, box: try Self.ring([("k1", k1)]), prefix: prefix)
        let ids = try await Self.seed(old)
        let before = try await Self.sealedValues(prefix: prefix, redis: redis)
        // Tokens, trigger URLs, signing keys, the user token, the shared secret, and the routing
        // data: both apiBaseUrls and the Connect link.
        #expect(before.count == 12)
        #expect(before.allSatisfy { $0.2 == "k1" })
        let tokenTTL = try await redis.send(["PTTL", old.systemTokenKey(ids[0])]).int ?? -1

        // One small batch, then "interrupted": resume from the reported cursor.
        let logs = LogSink.memory()
        let logger = Logger(label: "rewrap") {
            GatewayLogHandler(label: $0, format: .logfmt, level: .debug, sink: logs)
        }
        let rewrap = KeyRewrap(
            redis: redis, keys: try Self.ring([("k2", k2), ("k1", k1)]), prefix: prefix, batchSize: 2, logger: logger)
        let first = try await rewrap.step(cursor: "0")
        var total = first.counts
        if first.nextCursor != "0" {
            let rest = try await rewrap.run(from: first.nextCursor)
            total.rewrapped += rest.rewrapped
            total.unopenable += rest.unopenable
        }
        #expect(total.rewrapped == before.count)
        #expect(total.unopenable == 0)

        let after = try await Self.sealedValues(prefix: prefix, redis: redis)
        #expect(after.count == before.count)
        #expect(after.allSatisfy { $0.2 == "k2" })
        // Expiries are kept.
        let ttlAfter = try await redis.send(["PTTL", old.systemTokenKey(ids[0])]).int ?? -1
        #expect(ttlAfter > 0 && ttlAfter <= tokenTTL)

        // Everything opens with the new key alone, and says the same as before.
        let new = GatewayStore(redis: redis, box: try Self.ring([("k2", k2)]), prefix: prefix)
        try await Self.opensEverything(new, ids)
        #expect(try await new.triggerMaterial(ids[1])?.url == "https://t1.hello.atlassian-dev.net/x1/secret-1")
        let userKey = RedisUserTokenStore(installations: new).tokenKey(ids[1], accountId: "557058:user-1")
        let userSealed = try #require(try await redis.send(["HGET", userKey, "v"]).string)
        let userToken = try Self.ring([("k2", k2)]).open(userSealed, context: userKey)
        #expect(String(decoding: userToken, as: UTF8.self).hasPrefix("user-token-"))

        try await Self.expectRoutingDataDeterministic(
            redis: redis, ring: try Self.ring([("k2", k2)]), store: new, ids: ids, prefix: prefix, rewrap: rewrap)
        // A second run changes nothing.
        let again = try await rewrap.run()
        #expect(again.rewrapped == 0)
        #expect(again.alreadyCurrent == before.count)

        // A ring without the old key cannot open k1 blobs: they are counted and left alone.
        let stray = try await new.redis.send([
            "HSET", "\(prefix):stray", "v", try Self.ring([("k1", k1)]).seal([1, 2, 3], context: "\(prefix):stray#v"),
        ])
        #expect(stray.int == 1)
        let partial = try await KeyRewrap(
            redis: redis, keys: try Self.ring([("k2", k2)]), prefix: prefix, logger: logger
        ).run()
        #expect(partial.unopenable == 1)
        #expect(try await redis.send(["HGET", "\(prefix):stray", "v"]).string?.hasPrefix("k1.") == true)
        #expect(!logs.captured.joined().contains(Data(k1).base64EncodedString()))
        await redis.shutdown()
    }

    @Test("KeyRewrap counts a value that changes on every attempt to write it as busy, and a later walk rewraps it")
    func rewrapCountsBusyValues() async throws {
        let redis = try Self.redis()
        let prefix = "tgsec-\(UUID().uuidString.prefix(8))"
        let (k1, k2) = (Self.randomKey(), Self.randomKey())
        let oldRing = try Self.ring([("k1", k1)])
        let (stringKey, hashKey) = ("\(prefix):s", "\(prefix):h")
        // A string, a hash field that keeps changing and one that does not: all under k1.
        _ = try await redis.send(["SET", stringKey, try oldRing.seal([1], context: stringKey), "PX", "600000"])
        _ = try await redis.send([
            "HSET", hashKey, "busy", try oldRing.seal([2], context: hashKey + "#busy"),
            "calm", try oldRing.seal([3], context: hashKey + "#calm"),
        ])
        // Someone else writes a new k1 value before each of the walk's writes to the busy ones.
        let writes = Mutex(0)
        let logs = LogSink.memory()
        var rewrap = KeyRewrap(
            redis: redis, keys: try Self.ring([("k2", k2), ("k1", k1)]), prefix: prefix,
            logger: Logger(label: "rewrap") { GatewayLogHandler(label: $0, format: .logfmt, level: .debug, sink: logs) }
        )
        rewrap.beforeCompareAndSet = { name in
            let n = writes.withLock {
                $0 += 1
                return $0
            }
            let plaintext: [UInt8] = [UInt8(n), 9]
            if name == stringKey {
                _ = try await redis.send(["SET", name, try oldRing.seal(plaintext, context: name), "KEEPTTL"])
            } else {
                _ = try await redis.send(["HSET", name, "busy", try oldRing.seal(plaintext, context: name + "#busy")])
            }
        }
        let busy = try await rewrap.run()
        #expect(busy.busy == 2)
        #expect(busy.rewrapped == 1)  // the calm field
        #expect(busy.unopenable == 0)
        #expect(!busy.allCurrent)
        #expect(busy.description.hasSuffix("busy=2"))
        let warnings = logs.captured.filter { $0.contains("changed on every attempt to rewrap it") }
        #expect(warnings.count == 2)
        #expect(warnings.contains { $0.contains(stringKey) } && warnings.contains { $0.contains("redis.field=busy") })
        // What the other writer wrote last is what is stored: the walk overwrote nothing.
        let stored = try #require(try await redis.send(["HGET", hashKey, "busy"]).string)
        #expect(EncryptionKeyRing.keyId(of: stored) == "k1")

        // Once the values stop changing, a walk rewraps them and reports everything current.
        rewrap.beforeCompareAndSet = { _ in }
        let calm = try await rewrap.run()
        #expect(calm.rewrapped == 2 && calm.busy == 0 && calm.alreadyCurrent == 1 && calm.allCurrent)
        #expect(try await redis.send(["PTTL", stringKey]).int ?? -1 > 0)
        _ = try await redis.send(["DEL", stringKey, hashKey])
        await redis.shutdown()
    }

    @Test("token-gateway keys rewrap runs against Redis, prints its cursor, and resumes with --cursor")
    func rewrapCommand() async throws {
        let server = try await RedisServerProcess.start()
        let redis = try Self.redis(server.url)
        let k1 = Self.randomKey()
        let k2 = Self.randomKey()
        let old = GatewayStore(redis: redis, box: try Self.ring([("k1", k1)]))
        let ids = try await Self.seed(old)
        let count = try await Self.sealedValues(prefix: "tg", redis: redis).count
        let ringText = "k2:\(Data(k2).base64EncodedString()),k1:\(Data(k1).base64EncodedString())"

        let first = try Self.runCommand(
            ["keys", "rewrap", "--batch-size", "1"],
            environment: ["TOKEN_GATEWAY_REDIS_URL": server.url, "TOKEN_GATEWAY_ENCRYPTION_KEYS": ringText])
        #expect(first.status == 0, "\(first.output)")
        let progress = first.output.split(separator: "\n").filter { $0.hasPrefix("rewrap progress cursor=") }
        #expect(progress.count >= 2)
        #expect(first.output.contains("rewrap done keys="))
        #expect(first.output.contains("rewrapped=\(count)"))
        #expect(!first.output.contains(Data(k2).base64EncodedString()))

        // Resume from a cursor printed mid-way: harmless, nothing left to do.
        let cursor = String(progress[0].split(separator: " ")[2].dropFirst("cursor=".count))
        let resumed = try Self.runCommand(
            ["keys", "rewrap", "--cursor", cursor],
            environment: ["TOKEN_GATEWAY_REDIS_URL": server.url, "TOKEN_GATEWAY_ENCRYPTION_KEYS": ringText])
        #expect(resumed.status == 0)
        #expect(resumed.output.contains("rewrapped=0"))

        let new = GatewayStore(redis: redis, box: try Self.ring([("k2", k2)]))
        try await Self.opensEverything(new, ids)

        let missing = try Self.runCommand(["keys", "rewrap"], environment: ["TOKEN_GATEWAY_REDIS_URL": server.url])
        #expect(missing.status == 2)
        #expect(missing.output.contains("TOKEN_GATEWAY_ENCRYPTION_KEYS"))
        await redis.shutdown()
        await server.stop()
    }

    static func runCommand(_ arguments: [String], environment: [String: String]) throws -> (
        status: Int32, output: String
    ) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: GatewayProcess.binary)
        process.arguments = arguments
        process.environment = environment.merging(["PATH": "/usr/bin:/bin"]) { a, _ in a }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Two installed installations, their signing-key hashes, A's current key id and A's sealed
    /// key (a value that does not open under B's key names).
    static func twoInstallations(_ h: GatewayHarness) async throws -> (
        a: EmulatedInstallation, b: EmulatedInstallation, keysA: String, keysB: String, idA: String, sealedA: String
    ) {
        let (a, b) = (try await h.installed(), try await h.installed())
        let store = h.gateway.store
        let (keysA, keysB) = (store.signingKeysKey(a.installationID), store.signingKeysKey(b.installationID))
        let idA = try #require(try await h.gateway.redis.send(["HGET", keysA, "current"]).string)
        let sealedA = try #require(try await h.gateway.redis.send(["HGET", keysA, "key:" + idA]).string)
        return (a, b, keysA, keysB, idA, sealedA)
    }

    @Test(
        "a registration whose stored signing key does not open with the key ring issues a new key, and the installation's round trips work again"
    )
    func unopenableSigningKeyIsReplacedByARegistration() async throws {
        try await GatewayHarness.run { h in
            let (_, b, keysA, keysB, idA, sealedA) = try await Self.twoInstallations(h)
            let idB = try #require(try await h.gateway.redis.send(["HGET", keysB, "current"]).string)
            _ = try await h.gateway.redis.send(["HSET", keysB, "key:" + idB, sealedA])
            // B's key does not open: no round trip can be signed.
            #expect(try await h.token(b).status == 502)
            #expect(h.emulator.triggerCalls(for: b) == 0)
            // The Forge side registers again (its install or upgrade handler): a new key, answered to it.
            let registered = try await h.emulator.register(b)
            #expect(registered.status == 200, "\(registered.body)")
            let newID = try #require(registered.triggerKeyId)
            #expect(newID != idB)
            #expect(try await h.gateway.redis.send(["HGET", keysB, "current"]).string == newID)
            #expect(try await h.gateway.redis.send(["HEXISTS", keysB, "key:" + idB]).int == 0)
            let answer = try await h.token(b)
            #expect(answer.status == 200, "\(answer.body)")
            #expect(answer.json["source"] as? String == "trigger")
            let records = h.emulator.triggerRecords(for: b)
            #expect(records.map(\.keyId) == [newID])
            #expect(records.allSatisfy { $0.signatureValid })
            // A's key is untouched.
            #expect(try await h.gateway.redis.send(["HGET", keysA, "current"]).string == idA)
        }
    }

    @Test(
        "a next trigger key that does not open with the key ring is given up: a registration answers without it, a new rotation starts afresh"
    )
    func unopenableNextKeyIsGivenUp() async throws {
        try await GatewayHarness.run { h in
            let (_, b, _, keysB, _, sealedA) = try await Self.twoInstallations(h)
            let store = h.gateway.store
            let candidate = TriggerSigningKey.generate()
            let rotating = try await store.rotateTriggerKey(
                b.installationID, candidateKeyID: candidate.keyId, candidateKey: candidate.rawPrivateKey,
                overlap: .seconds(600), now: FlowTime.now())
            let nextID = try #require(rotating?.next?.keyID)
            _ = try await h.gateway.redis.send(["HSET", keysB, "key:" + nextID, sealedA])
            // A plain registration: 200 with the key in force, the broken rotation given up.
            let registered = try await h.emulator.register(b)
            #expect(registered.status == 200, "\(registered.body)")
            #expect(!registered.body.contains("nextTriggerKeyId"))
            #expect(try await h.gateway.redis.send(["HGET", keysB, "next"]).isNull)
            // A new rotation announces a next key that opens.
            let again = TriggerSigningKey.generate()
            let rotated = try await store.rotateTriggerKey(
                b.installationID, candidateKeyID: again.keyId, candidateKey: again.rawPrivateKey,
                overlap: .seconds(600), now: FlowTime.now())
            #expect(rotated?.next?.keyID == again.keyId)
            #expect(try await h.token(b).status == 200)
        }
    }

    @Test("rotateKey announces a next trigger key, keeps signing with the current one, then switches")
    func triggerKeyRotation() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let installation = try await h.installed()
            let id = installation.installationID
            let original = try #require(try await h.gateway.store.installation(id)?.triggerKeyId)

            // A number is no boolean: refused (400), and no key is rotated.
            for value in ["1", "0", "\"true\""] {
                let refused = try await h.call(
                    .POST, "/forge/register", secret: nil,
                    headers: [
                        "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                        "content-type": "application/json",
                    ],
                    body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":\(value)}")
                #expect(refused.status == 400, "rotateKey \(value)")
                #expect(refused.errorCode == "invalid_request")
            }
            #expect(try await h.gateway.store.triggerKeys(id, now: FlowTime.now())?.next == nil)

            // Announce: the answer names the current key and the next one with its activation time.
            let fit = try h.emulator.mintFIT(for: installation)
            let rotate = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: ["authorization": "Bearer \(fit)", "content-type": "application/json"],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":true}")
            #expect(rotate.status == 200)
            #expect(rotate.json["triggerKeyId"] as? String == original)
            let nextID = try #require(rotate.json["nextTriggerKeyId"] as? String)
            let nextPublic = try #require(rotate.json["nextTriggerPublicKey"] as? String)
            #expect(nextID != original)
            #expect(rotate.json["nextTriggerKeyActivatesAt"] is String)

            // A retried rotation announces the same next key.
            let retried = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: [
                    "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                    "content-type": "application/json",
                ],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":true}")
            #expect(retried.json["nextTriggerKeyId"] as? String == nextID)

            // During the overlap the gateway signs with the current key only.
            #expect(try await h.token(installation).status == 200)
            #expect(h.emulator.triggerRecords(for: installation).last?.keyId == original)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)

            // After the window: the next key signs, the old private key is gone.
            let later = FlowTime.now() + .seconds(3600)
            let keys = try #require(try await h.gateway.store.triggerKeys(id, now: later))
            #expect(keys.current.keyID == nextID)
            #expect(keys.next == nil)
            #expect(
                try TriggerSigningKey(keyId: nextID, rawPrivateKey: keys.current.rawPrivateKey).publicKeyBase64URL
                    == nextPublic)
            let hash = try await h.gateway.redis.send(["HKEYS", "tg:{\(installation.id)}:signing-keys"])
            let fields = (hash.array ?? []).compactMap(\.string)
            #expect(!fields.contains("key:" + original))
            #expect(try await h.gateway.store.installation(id)?.triggerKeyId == nextID)
            let material = try #require(try await h.gateway.store.currentTriggerMaterial(id, now: FlowTime.now()))
            #expect(material.keyID == nextID)

            // The trigger is now signed with the new key (the emulator, which only knows the key
            // it was told at registration, sees the new key id).
            _ = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh?timeout=1500")
            #expect(h.emulator.triggerRecords(for: installation).last?.keyId == nextID)

            // A plain re-registration now answers the new key, so the Forge side can follow.
            let reregistered = try await h.emulator.register(installation)
            #expect(reregistered.triggerKeyId == nextID)
            #expect(reregistered.triggerPublicKey == nextPublic)
            let fresh = try await h.call(.POST, GatewayHarness.path(installation) + "/token/refresh")
            #expect(fresh.status == 200)
            #expect(h.emulator.triggerRecords(for: installation).last?.signatureValid == true)
        }
    }

    @Test(
        "a rotation whose token sent along cannot be stored still answers its keys: the Forge side learns the next key"
    )
    func rotationAnswersWhenItsPushedTokenIsNotStored() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let id = installation.installationID
            // The token key holds something the store script cannot write over (WRONGTYPE): the
            // pushed token's store step fails after the rotation is saved.
            let tokenKey = "tg:{\(installation.id)}:token:system"
            _ = try await h.gateway.redis.send(["DEL", tokenKey])
            _ = try await h.gateway.redis.send(["SET", tokenKey, "not-a-hash"])
            let pushed = try h.emulator.mintAccessToken(for: installation)
            let rotate = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: [
                    "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                    "content-type": "application/json", "x-forge-oauth-system": pushed,
                ],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":true}")
            #expect(rotate.status == 200, "\(rotate.body)")
            let nextID = try #require(rotate.json["nextTriggerKeyId"] as? String)
            #expect(try await h.gateway.store.triggerKeys(id, now: FlowTime.now())?.next?.keyID == nextID)
            #expect(!rotate.body.contains(pushed))
            #expect(h.logs.captured.contains { $0.contains("the token sent with the registration was not stored") })
            #expect(!h.logs.captured.joined().contains(pushed))
            _ = try await h.gateway.redis.send(["DEL", tokenKey])
        }
    }

    @Test("with a zero overlap the rotated key signs at once")
    func immediateRotation() async throws {
        try await GatewayHarness.run(configure: { $0.triggerKeyOverlap = .zero }) { h in
            let installation = try await h.installed()
            let original = try await h.gateway.store.installation(installation.installationID)?.triggerKeyId
            let fit = try h.emulator.mintFIT(for: installation)
            let rotate = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: ["authorization": "Bearer \(fit)", "content-type": "application/json"],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":true}")
            #expect(rotate.status == 200)
            let current = try #require(rotate.json["triggerKeyId"] as? String)
            #expect(current != original)
            #expect(rotate.json["nextTriggerKeyId"] == nil)
            let bad = try await h.call(
                .POST, "/forge/register", secret: nil,
                headers: [
                    "authorization": "Bearer \(try h.emulator.mintFIT(for: installation))",
                    "content-type": "application/json",
                ],
                body: "{\"authTriggerUrl\":\"\(h.emulator.triggerURL(for: installation))\",\"rotateKey\":\"yes\"}")
            #expect(bad.status == 400)
            #expect(bad.errorCode == "invalid_request")
        }
    }
}
