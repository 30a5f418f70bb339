import AsyncHTTPClient
import Crypto
import Foundation
import Logging
import NIOCore
import _CryptoExtras

/// Where the signed-install public keys come from.
public protocol InstallKeyFetcher: Sendable {
    /// The PEM text (`-----BEGIN PUBLIC KEY-----`) published under `kid`, or nil when none is
    /// (404). Throws when the key service cannot be reached or answers anything else.
    func publicKeyPEM(kid: String) async throws -> String?
}

/// Fetches `GET <keysURL>/<kid>` with the gateway's HTTP client.
struct HTTPInstallKeyFetcher: InstallKeyFetcher {
    let httpClient: HTTPClient
    let keysURL: String
    let timeout: Duration
    let logger: Logger

    /// Largest key document read.
    static let maximumKeyBytes = 16 * 1024

    struct FetchError: Error, CustomStringConvertible {
        let description: String
    }

    func publicKeyPEM(kid: String) async throws -> String? {
        var request = HTTPClientRequest(url: SignedInstallVerifier.trimmingTrailingSlashes(self.keysURL) + "/" + kid)
        request.method = .GET
        request.headers.add(name: "Accept", value: "application/x-pem-file, text/plain, */*")
        // The timeout covers the key's body too (the client's own ends with the head).
        let deadline = ContinuousClock.now + self.timeout
        let response = try await self.httpClient.execute(
            request, timeout: .nanoseconds(self.timeout.nanosecondsClamped), logger: self.logger)
        if response.status == .notFound {
            return nil
        }
        guard response.status == .ok else {
            throw FetchError(description: "install key service answered HTTP \(response.status.code)")
        }
        let body = try await response.body.collect(upTo: Self.maximumKeyBytes, before: deadline)
        return String(buffer: body)
    }
}

extension Duration {
    fileprivate var nanosecondsClamped: Int64 {
        let (seconds, attoseconds) = self.components
        return seconds.multipliedReportingOverflow(by: 1_000_000_000).overflow
            ? Int64.max : seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

/// The install public keys by `kid`. A rotated key always gets a new `kid`, so a cached key never
/// goes stale; the least recently used one is dropped when the cache is full. A failed `kid` is
/// not fetched again for a while, concurrent lookups of one `kid` share one fetch, and fetches
/// draw on per-minute budgets:
///
/// - each `kid` is fetched at most ``fetchesPerKidPerMinute`` times a minute;
/// - every fetch takes from one shared budget of ``fetchesPerMinute``, of which a third is kept
///   for `kid`s whose key was fetched and used before (remembered by name, even after the key
///   left the cache). Unauthenticated requests naming random `kid`s (nothing is verified before
///   the key is there) can spend only the other two thirds, so they cannot keep a known key from
///   being fetched again.
struct InstallKeyCache: Sendable {
    typealias PublicKey = _RSA.Signing.PublicKey
    typealias FetchTask = Task<Result<PublicKey, SignedInstallError>, Never>

    enum Entry: Sendable {
        case key(_RSA.Signing.PublicKey, lastUsed: UInt64)
        case fetching(FetchTask)
        case failed(SignedInstallError, retryAt: ContinuousClock.Instant)
    }

    enum Lookup: Sendable {
        case found(_RSA.Signing.PublicKey)
        case wait(FetchTask)
        case fetch(FetchTask)
        case fail(SignedInstallError)
    }

    private(set) var entries: [String: Entry] = [:]
    private var useCounter: UInt64 = 0
    /// Token bucket of fetches open to any `kid`: ``fetchesPerMinute`` less the reserved share.
    private var openBudget: Double
    /// Token bucket kept for `kid`s seen before (``reservedFetchesPerMinute``).
    private var reservedBudget: Double
    private var budgetUpdatedAt: ContinuousClock.Instant?
    let fetchesPerMinute: Int
    /// The share of ``fetchesPerMinute`` only `kid`s seen before may use: a third (none below 3).
    let reservedFetchesPerMinute: Int
    /// Fetches of one `kid` a minute.
    let fetchesPerKidPerMinute: Int
    /// `kid`s whose key verified before (by name, least recently seen dropped beyond ``maximumSeenKids``).
    private(set) var seenKids: [String: UInt64] = [:]
    static let maximumSeenKids = 1024
    /// Fetches per `kid` in the current minute (entries older than a minute are dropped).
    private var kidFetches: [String: (count: Int, since: ContinuousClock.Instant)] = [:]

    init(fetchesPerMinute: Int, fetchesPerKidPerMinute: Int = 2) {
        self.fetchesPerMinute = max(fetchesPerMinute, 1)
        self.reservedFetchesPerMinute = self.fetchesPerMinute / 3
        self.fetchesPerKidPerMinute = max(fetchesPerKidPerMinute, 1)
        self.openBudget = Double(self.fetchesPerMinute - self.reservedFetchesPerMinute)
        self.reservedBudget = Double(self.reservedFetchesPerMinute)
    }

    /// Whether `kid` is neither held, nor being fetched or refused for now, nor known to have
    /// verified before (a fetch of it would take the open share).
    func isUnknown(kid: String, now: ContinuousClock.Instant) -> Bool {
        guard self.seenKids[kid] == nil else { return false }
        switch self.entries[kid] {
        case .key, .fetching: return false
        case .failed(_, let retryAt): return now >= retryAt
        case nil: return true
        }
    }

    /// Remembers that the key of `kid` verified a token: later fetches of it may use the reserved share.
    mutating func keyWasUsed(kid: String) {
        self.useCounter += 1
        self.seenKids[kid] = self.useCounter
        if self.seenKids.count > Self.maximumSeenKids,
            let oldest = self.seenKids.min(by: { $0.value < $1.value })?.key
        {
            self.seenKids[oldest] = nil
        }
    }

    /// Finds the key for `kid`, or decides to fetch it with `makeTask` (not started here: the
    /// task's body runs once the caller released the lock).
    mutating func lookup(kid: String, now: ContinuousClock.Instant, makeTask: () -> FetchTask) -> Lookup {
        switch self.entries[kid] {
        case .key(let key, _):
            self.useCounter += 1
            self.entries[kid] = .key(key, lastUsed: self.useCounter)
            return .found(key)
        case .fetching(let task):
            return .wait(task)
        case .failed(let error, let retryAt) where now < retryAt:
            return .fail(error)
        case .failed, nil:
            break
        }
        guard self.takeFetchToken(kid: kid, now: now) else { return .fail(.keyUnavailable) }
        let task = makeTask()
        self.entries[kid] = .fetching(task)
        return .fetch(task)
    }

    /// Records the outcome of a fetch of `kid`.
    mutating func fetchCompleted(
        kid: String, result: Result<_RSA.Signing.PublicKey, SignedInstallError>, retryAt: ContinuousClock.Instant,
        maximumKeys: Int
    ) {
        switch result {
        case .success(let key):
            self.useCounter += 1
            self.entries[kid] = .key(key, lastUsed: self.useCounter)
            self.evict(keeping: max(maximumKeys, 1))
        case .failure(let error):
            self.entries[kid] = .failed(error, retryAt: retryAt)
            // Failure markers expire; drop the ones that did so it cannot grow without bound.
            let now = ContinuousClock.now
            self.entries = self.entries.filter { _, entry in
                if case .failed(_, let until) = entry { return now < until }
                return true
            }
        }
    }

    /// Number of keys held.
    var keyCount: Int {
        self.entries.values.reduce(0) { count, entry in
            if case .key = entry { return count + 1 }
            return count
        }
    }

    private mutating func evict(keeping limit: Int) {
        var keys = self.entries.compactMap { kid, entry -> (String, UInt64)? in
            if case .key(_, let lastUsed) = entry { return (kid, lastUsed) }
            return nil
        }
        guard keys.count > limit else { return }
        keys.sort { $0.1 < $1.1 }
        for (kid, _) in keys.prefix(keys.count - limit) {
            self.entries[kid] = nil
        }
    }

    private mutating func takeFetchToken(kid: String, now: ContinuousClock.Instant) -> Bool {
        let openCapacity = Double(self.fetchesPerMinute - self.reservedFetchesPerMinute)
        let reservedCapacity = Double(self.reservedFetchesPerMinute)
        if let last = self.budgetUpdatedAt {
            let elapsed = max(0, SignedInstallVerifier.seconds(now - last))
            self.openBudget = min(openCapacity, self.openBudget + elapsed * openCapacity / 60)
            self.reservedBudget = min(reservedCapacity, self.reservedBudget + elapsed * reservedCapacity / 60)
        }
        self.budgetUpdatedAt = now
        // Per kid: at most `fetchesPerKidPerMinute` in any minute that began with its first fetch.
        self.kidFetches = self.kidFetches.filter { now - $0.value.since < .seconds(60) }
        var perKid = self.kidFetches[kid] ?? (0, now)
        guard perKid.count < self.fetchesPerKidPerMinute else { return false }
        if self.seenKids[kid] != nil, self.reservedBudget >= 1 {
            self.reservedBudget -= 1
        } else if self.openBudget >= 1 {
            self.openBudget -= 1
        } else {
            return false
        }
        perKid.count += 1
        self.kidFetches[kid] = perKid
        return true
    }
}

/// Remembers the `kid`s whose key verified a signed install, for every replica and across
/// restarts: a replica that has not verified one itself yet (it just started) still fetches a
/// known `kid` from the reserved share, which a flood of made-up `kid`s cannot spend.
public protocol InstallKeyIDRegistry: Sendable {
    /// Every `kid` whose key verified a signed install before (a bounded set).
    func knownInstallKeyIDs() async throws -> Set<String>
    /// Records that the key of `kid` verified a signed install.
    func rememberInstallKeyID(_ kid: String) async throws
}

extension SignedInstallVerifier {
    /// Records that the key of `kid` verified a token, in this process and, the first time, in the
    /// registry (a failure there only costs the reserved share to replicas that start meanwhile).
    func keyVerified(kid: String) async {
        let first = self.cache.withLock { cache in
            defer { cache.keyWasUsed(kid: kid) }
            return cache.seenKids[kid] == nil
        }
        guard first, let registry = self.registry else { return }
        do {
            try await registry.rememberInstallKeyID(kid)
        } catch {
            self.logger.notice(
                "could not record a Connect install key id", metadata: ["connect.kid": "\(kid)"])
        }
    }

    /// Before a fetch from the open share: a `kid` another replica (or an earlier run) verified
    /// with is known here too. The registry is read at most once per
    /// ``registryRefreshInterval`` (a flood of made-up `kid`s costs Redis nothing more).
    private func learnFromRegistry(kid: String) async {
        guard let registry = self.registry, self.cache.withLock({ $0.isUnknown(kid: kid, now: .now) }) else { return }
        let now = ContinuousClock.now
        var known = self.registryKids.withLock { read in
            read.flatMap { now - $0.at < Self.registryRefreshInterval ? $0.kids : nil }
        }
        if known == nil {
            do {
                let kids = try await registry.knownInstallKeyIDs()
                self.registryKids.withLock { $0 = (kids, now) }
                known = kids
            } catch {
                // Not an empty registry: the last read (if any) stands, and the next lookup reads
                // again, so known `kid`s keep their reserved share once Redis answers.
                known = self.registryKids.withLock { $0?.kids }
            }
        }
        if known?.contains(kid) == true {
            self.cache.withLock { $0.keyWasUsed(kid: kid) }
        }
    }

    /// How long a read of the registry is used before it is read again.
    static let registryRefreshInterval: Duration = .seconds(30)

    /// The RSA public key published under `kid`; never any other key.
    func publicKey(kid: String) async throws(SignedInstallError) -> _RSA.Signing.PublicKey {
        await self.learnFromRegistry(kid: kid)
        let lookup = self.cache.withLock { cache in
            cache.lookup(kid: kid, now: .now) {
                // Created under the lock, but it only runs (and awaits the fetch) once the lock is released.
                InstallKeyCache.FetchTask { await self.fetchKey(kid: kid) }
            }
        }
        switch lookup {
        case .found(let key):
            return key
        case .fail(let error):
            throw error
        case .wait(let task):
            return try await task.value.get()
        case .fetch(let task):
            let result = await task.value
            let retryAt = ContinuousClock.now + self.configuration.failedKeyRetryInterval
            let maximumKeys = self.configuration.maximumCachedKeys
            self.cache.withLock {
                $0.fetchCompleted(kid: kid, result: result, retryAt: retryAt, maximumKeys: maximumKeys)
            }
            return try result.get()
        }
    }

    private func fetchKey(kid: String) async -> Result<_RSA.Signing.PublicKey, SignedInstallError> {
        let pem: String?
        do {
            pem = try await self.fetcher.publicKeyPEM(kid: kid)
        } catch {
            self.logger.warning(
                "could not fetch a Connect install key",
                metadata: ["connect.kid": "\(kid)", "error.type": "\(Self.describe(error))"])
            return .failure(.keyUnavailable)
        }
        guard let pem else {
            self.logger.notice("no Connect install key under this kid", metadata: ["connect.kid": "\(kid)"])
            return .failure(.unknownKey)
        }
        guard let key = try? _RSA.Signing.PublicKey(pemRepresentation: pem), key.keySizeInBits >= 2048 else {
            self.logger.warning("unusable Connect install key", metadata: ["connect.kid": "\(kid)"])
            return .failure(.unknownKey)
        }
        self.logger.debug("fetched a Connect install key", metadata: ["connect.kid": "\(kid)"])
        return .success(key)
    }

    private static func describe(_ error: any Error) -> String {
        if let error = error as? HTTPInstallKeyFetcher.FetchError { return error.description }
        if let error = error as? HTTPClientError { return "\(error)" }
        if error is CancellationError { return "cancelled" }
        return String(reflecting: type(of: error))
    }
}
