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
        let response = try await self.httpClient.execute(
            request, timeout: .nanoseconds(self.timeout.nanosecondsClamped), logger: self.logger)
        if response.status == .notFound {
            return nil
        }
        guard response.status == .ok else {
            throw FetchError(description: "install key service answered HTTP \(response.status.code)")
        }
        let body = try await response.body.collect(upTo: Self.maximumKeyBytes)
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
/// draw on a per-minute budget.
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
    /// Token bucket of fetches: ``fetchesPerMinute`` tokens, refilled continuously.
    private var budget: Double
    private var budgetUpdatedAt: ContinuousClock.Instant?
    let fetchesPerMinute: Int

    init(fetchesPerMinute: Int) {
        self.fetchesPerMinute = max(fetchesPerMinute, 1)
        self.budget = Double(self.fetchesPerMinute)
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
        guard self.takeFetchToken(now: now) else { return .fail(.keyUnavailable) }
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

    private mutating func takeFetchToken(now: ContinuousClock.Instant) -> Bool {
        let capacity = Double(self.fetchesPerMinute)
        if let last = self.budgetUpdatedAt {
            let elapsed = SignedInstallVerifier.seconds(now - last)
            self.budget = min(capacity, self.budget + elapsed * capacity / 60)
        }
        self.budgetUpdatedAt = now
        guard self.budget >= 1 else { return false }
        self.budget -= 1
        return true
    }
}

extension SignedInstallVerifier {
    /// The RSA public key published under `kid`; never any other key.
    func publicKey(kid: String) async throws(SignedInstallError) -> _RSA.Signing.PublicKey {
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
