import FlowEngine
import Logging

/// Re-encrypts every secret at rest under the key ring's current key (`token-gateway keys rewrap`).
///
/// It walks the store's keys with `SCAN` (never `KEYS`) in batches. A value is a sealed secret when
/// it has the sealed form (`<keyId>.<base64url>`) and opens with the ring under its own context —
/// the Redis key name, plus `#<field>` for a hash field (the system token is sealed under the key
/// name alone, so both are tried). Each such value not sealed under ``EncryptionKeyRing/currentKeyId``
/// is sealed again under the same context and written back only if it did not change meanwhile
/// (compare-and-set in one script; a string's expiry is kept). Everything else is left alone.
///
/// The walk is resumable: each batch reports the `SCAN` cursor to continue from, and running it
/// again from any cursor (or from the start) is harmless, because values already under the current
/// key are skipped. Keys that exist for the whole walk are visited at least once (a guarantee of
/// `SCAN`).
public struct KeyRewrap: Sendable {
    /// Counts of one batch or of the whole walk.
    public struct Counts: Sendable, Hashable, CustomStringConvertible {
        /// Keys visited.
        public var keys = 0
        /// Sealed values written again under the current key.
        public var rewrapped = 0
        /// Sealed values already under the current key.
        public var alreadyCurrent = 0
        /// Values in the sealed form that no key of the ring opens under their context (a key id
        /// missing from the ring, or a blob copied from elsewhere). They are left as they are.
        public var unopenable = 0
        /// Sealed values not under the current key that changed between every read and write of
        /// three attempts (a value rewritten all the time). They are left for another walk.
        public var busy = 0

        public init() {}

        /// Every value the walk met is under the current key, or not sealed at all.
        public var allCurrent: Bool { self.unopenable == 0 && self.busy == 0 }

        static func + (lhs: Counts, rhs: Counts) -> Counts {
            var out = lhs
            out.keys += rhs.keys
            out.rewrapped += rhs.rewrapped
            out.alreadyCurrent += rhs.alreadyCurrent
            out.unopenable += rhs.unopenable
            out.busy += rhs.busy
            return out
        }

        public var description: String {
            "keys=\(self.keys) rewrapped=\(self.rewrapped) current=\(self.alreadyCurrent) unopenable=\(self.unopenable) busy=\(self.busy)"
        }
    }

    /// The outcome of one batch.
    public struct Batch: Sendable, Hashable {
        /// The cursor to continue from; `"0"` when the walk is complete.
        public var nextCursor: String
        public var counts: Counts
    }

    let redis: RedisClient
    let keys: EncryptionKeyRing
    let pattern: String
    /// The start of a Connect tenant hash's name (`<prefix>:connect:{<clientKey>}`).
    let connectTenantPrefix: String
    /// The start of an installation's keys (`<prefix>:{<ari>}`).
    let installationPrefix: String
    let batchSize: Int
    let logger: Logger
    /// Runs before each compare-and-set, with the Redis key about to be written (tests write the
    /// value there to race the walk).
    var beforeCompareAndSet: @Sendable (String) async throws -> Void = { _ in }

    /// - Parameters:
    ///   - redis: the store's Redis.
    ///   - keys: the ring; its first key seals, every key opens.
    ///   - prefix: the store's key prefix (`tg`); only keys under `<prefix>:` are visited.
    ///   - batchSize: the `SCAN` `COUNT` hint (keys per batch, roughly). Default 500.
    ///   - logger: values that cannot be opened are logged with their key name and field (never the value).
    public init(
        redis: RedisClient, keys: EncryptionKeyRing, prefix: String = "tg", batchSize: Int = 500, logger: Logger
    ) {
        self.redis = redis
        self.keys = keys
        self.pattern = Self.globEscaped(prefix) + ":*"
        self.connectTenantPrefix = prefix + ":connect:{"
        self.installationPrefix = prefix + ":{"
        self.batchSize = max(1, batchSize)
        self.logger = logger
    }

    /// Walks the whole keyspace from `cursor`, calling `progress` after every batch with the cursor
    /// to resume from and the batch's counts.
    ///
    /// - Returns: the totals.
    /// - Throws: ``RedisError`` when Redis fails; the walk can be resumed from the last reported cursor,
    ///   except after ``RedisError/topologyChanged`` (slots moved between a cluster's shards), when only
    ///   a new walk from `"0"` can go on.
    @discardableResult
    public func run(from cursor: String = "0", progress: (Batch) -> Void = { _ in }) async throws -> Counts {
        var cursor = cursor
        var total = Counts()
        repeat {
            let batch = try await self.step(cursor: cursor)
            total = total + batch.counts
            progress(batch)
            cursor = batch.nextCursor
        } while cursor != "0"
        return total
    }

    /// Runs one `SCAN` batch from `cursor` and rewraps what it found.
    ///
    /// - Throws: ``RedisError`` when Redis fails or answers something unexpected.
    public func step(cursor: String) async throws -> Batch {
        // Every primary of a cluster in turn; the cursor says which.
        let (next, names) = try await self.redis.scan(cursor: cursor, match: self.pattern, count: self.batchSize)
        var counts = Counts()
        counts.keys = names.count
        if names.isEmpty { return Batch(nextCursor: next, counts: counts) }
        let types = try await self.redis.pipeline(names.map { ["TYPE", $0] })
        for (name, type) in zip(names, types) {
            switch type.string {
            case "string": counts = counts + (try await self.rewrapString(name))
            case "hash": counts = counts + (try await self.rewrapHash(name))
            default: continue  // sets, sorted sets and lists hold ids, never secrets
            }
        }
        return Batch(nextCursor: next, counts: counts)
    }

    // MARK: Values

    private enum Verdict {
        case notSealed
        case current
        case unopenable
        case rewrapped(String)
    }

    /// What to do with one value found under `contexts` (tried in order). A `deterministic` value
    /// is sealed again the way it was written, deterministically (scripts compare it in place).
    private func verdict(_ value: String, contexts: [String], deterministic: Bool = false) -> Verdict {
        guard let keyID = EncryptionKeyRing.keyId(of: value), Self.looksSealed(value) else { return .notSealed }
        for context in contexts {
            guard let plaintext = try? self.keys.open(value, context: context) else { continue }
            if keyID == self.keys.currentKeyId {
                // A deterministic value a walk of an earlier build sealed with a random nonce is
                // written again as the store writes it.
                guard deterministic, let wanted = try? self.keys.sealDeterministically(plaintext, context: context),
                    wanted != value
                else { return .current }
                return .rewrapped(wanted)
            }
            let resealed =
                deterministic
                ? try? self.keys.sealDeterministically(plaintext, context: context)
                : try? self.keys.seal(plaintext, context: context)
            guard let sealed = resealed else { return .unopenable }
            return .rewrapped(sealed)
        }
        return .unopenable
    }

    /// Routing data sealed deterministically (``GatewayStore``'s `apiBaseUrl` of an installation,
    /// a Connect tenant's `installationId` link).
    func isDeterministicField(_ field: String, of name: String) -> Bool {
        switch field {
        case "apiBaseUrl": return name.hasPrefix(self.installationPrefix) && name.hasSuffix("}:installation")
        case "installationId": return name.hasPrefix(self.connectTenantPrefix) && name.hasSuffix("}")
        default: return false
        }
    }

    private func rewrapHash(_ name: String) async throws -> Counts {
        var counts = Counts()
        var fields = try await self.redis.send(["HGETALL", name]).pairs
        for attempt in 1...Self.attempts {
            var changed: [(String, String)] = []
            for (field, value) in fields where !self.isPlainField(field, of: name) {
                let verdict = self.verdict(
                    value, contexts: [name + "#" + field, name],
                    deterministic: self.isDeterministicField(field, of: name))
                if attempt == Self.attempts, case .rewrapped = verdict {
                    // Changed on every earlier attempt: not written again in this walk.
                    counts.busy += 1
                    self.logBusy(name, field: field)
                    continue
                }
                switch verdict {
                case .notSealed: continue
                case .current: counts.alreadyCurrent += 1
                case .unopenable:
                    counts.unopenable += 1
                    self.logUnopenable(name, field: field)
                case .rewrapped(let sealed):
                    try await self.beforeCompareAndSet(name)
                    let written = try await self.redis.eval(
                        Self.compareAndSet, keys: [name], arguments: [field, value, sealed])
                    if written.int == 1 {
                        counts.rewrapped += 1
                    } else {
                        changed.append((field, value))
                    }
                }
            }
            // Fields written by someone else meanwhile: look at their new values again.
            if changed.isEmpty { break }
            let fresh = try await self.redis.send(["HMGET", name] + changed.map(\.0))
            fields = zip(changed.map(\.0), fresh.array ?? []).compactMap { field, value in
                value.string.map { (field, $0) }
            }
        }
        return counts
    }

    private func rewrapString(_ name: String) async throws -> Counts {
        var counts = Counts()
        for attempt in 1...Self.attempts {
            guard let value = try await self.redis.send(["GET", name]).string else { return counts }
            switch self.verdict(value, contexts: [name]) {
            case .notSealed: return counts
            case .current:
                counts.alreadyCurrent += 1
                return counts
            case .unopenable:
                counts.unopenable += 1
                self.logUnopenable(name, field: nil)
                return counts
            case .rewrapped(let sealed):
                if attempt == Self.attempts {
                    // Changed on every earlier attempt: not written again in this walk.
                    counts.busy += 1
                    self.logBusy(name, field: nil)
                    return counts
                }
                try await self.beforeCompareAndSet(name)
                let written = try await self.redis.eval(
                    Self.compareAndSet, keys: [name], arguments: ["", value, sealed])
                if written.int == 1 {
                    counts.rewrapped += 1
                    return counts
                }
            }
        }
        return counts
    }

    /// Reads of a value, each followed by a write when it is not under the current key: a value
    /// that changed after each of the first `attempts - 1` is counted as busy on the last read.
    static let attempts = 4

    private func logBusy(_ name: String, field: String?) {
        self.logger.warning(
            "sealed value changed on every attempt to rewrap it; left for another walk",
            metadata: ["redis.key": "\(name)", "redis.field": "\(field ?? "-")"])
    }

    private func logUnopenable(_ name: String, field: String?) {
        self.logger.warning(
            "sealed value does not open with any key of the ring; left as it is",
            metadata: ["redis.key": "\(name)", "redis.field": "\(field ?? "-")"])
    }

    /// Fields known to hold plain text whatever they look like: a Connect tenant's app `key`, base
    /// URL, payload and status are the install payload's own values, and an app key such as
    /// `acme.<38 or more letters, digits and dashes>` has the shape of a sealed value (which would
    /// then count as one that does not open, on every walk).
    func isPlainField(_ field: String, of name: String) -> Bool {
        name.hasPrefix(self.connectTenantPrefix) && name.hasSuffix("}") && Self.connectTenantPlainFields.contains(field)
    }

    /// ``isPlainField(_:of:)`` for the store's key prefix `prefix`.
    public static func isPlainField(_ field: String, of name: String, prefix: String) -> Bool {
        name.hasPrefix(prefix + ":connect:{") && name.hasSuffix("}") && Self.connectTenantPlainFields.contains(field)
    }

    static let connectTenantPlainFields: Set<String> = ["key", "baseUrl", "payload", "status"]

    /// Sealed blobs are `<keyId>.<base64url>` of at least a nonce and a tag (28 bytes → 38 characters).
    static func looksSealed(_ value: String) -> Bool {
        guard let dot = value.firstIndex(of: ".") else { return false }
        let payload = value[value.index(after: dot)...]
        return payload.utf8.count >= 38
            && payload.utf8.allSatisfy { b in
                (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D
                    || b == 0x5F
            }
    }

    static func globEscaped(_ s: String) -> String {
        var out = ""
        for c in s {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }

    /// KEYS: the key. ARGV: field ('' for a string), expected value, new value. Writes only if the
    /// value is still the expected one; a string keeps its expiry. Returns 1 when written.
    static let compareAndSet = RedisScript(
        """
        if ARGV[1] == '' then
          if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return 0 end
          if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
          local ttl = redis.call('PTTL', KEYS[1])
          redis.call('SET', KEYS[1], ARGV[3])
          if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
          return 1
        end
        if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
        if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
        redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
        return 1
        """)
}

extension RedisValue {
    /// A flat `[field, value, …]` reply (HGETALL) as pairs, skipping values that are not text.
    fileprivate var pairs: [(String, String)] {
        guard let items = self.array else { return [] }
        var out: [(String, String)] = []
        var i = 0
        while i + 1 < items.count {
            if let k = items[i].string, let v = items[i + 1].string { out.append((k, v)) }
            i += 2
        }
        return out
    }
}
