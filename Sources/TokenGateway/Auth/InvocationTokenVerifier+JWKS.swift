import AsyncHTTPClient
import Foundation
import JWTKit
import Logging
import NIOCore
import Synchronization

extension InvocationTokenVerifier {
    /// Where keys come from.
    enum KeySource: Sendable {
        /// Fetched from the JWKS URL with this client, cached per URL.
        case remote(HTTPClient)
        /// A fixed key set (tests, offline use).
        case fixed([String: Insecure.RSA.PublicKey])
    }

    typealias KeySet = [String: Insecure.RSA.PublicKey]
    typealias FetchTask = Task<Result<KeySet, InvocationTokenError>, Never>

    /// The cached key set of one JWKS URL.
    struct KeyCacheEntry: Sendable {
        /// Keys of the last successful fetch, by `kid`.
        var keys: KeySet = [:]
        /// When the last successful fetch completed.
        var fetchedAt: ContinuousClock.Instant?
        /// When the last fetch started.
        var lastAttempt: ContinuousClock.Instant?
        /// Whether the last completed fetch failed.
        var lastAttemptFailed = false
        /// The fetch in flight; concurrent lookups wait for it instead of starting their own.
        var inFlight: FetchTask?
    }

    private enum Lookup: Sendable {
        case found(Insecure.RSA.PublicKey)
        case wait(FetchTask)
        case fail(InvocationTokenError)
    }

    /// The RSA key the JWKS at `jwksURL` holds for `kid`; never any other key.
    ///
    /// Only the configured JWKS (``Configuration/jwksURL``) is trusted: a token that would select
    /// another key set (the staging JWKS, chosen by the token's own unverified `app.apiBaseUrl`) is
    /// refused as signed by an unknown key. A staging app configures the staging JWKS as its JWKS.
    func publicKey(kid: String, jwksURL: String) async throws(InvocationTokenError) -> Insecure.RSA.PublicKey {
        guard jwksURL == self.configuration.jwksURL else { throw .unknownKey }
        let httpClient: HTTPClient
        switch self.keySource {
        case .fixed(let keys):
            guard let key = keys[kid] else { throw .unknownKey }
            return key
        case .remote(let client):
            httpClient = client
        }

        let configuration = self.configuration
        let now = ContinuousClock.now
        let lookup = self.keyCache.withLock { cache -> Lookup in
            var entry = cache[jwksURL] ?? KeyCacheEntry()
            defer { cache[jwksURL] = entry }

            let cachedKey = entry.keys[kid]
            let isFresh = entry.fetchedAt.map { now - $0 < configuration.jwksCacheLifetime } ?? false
            if isFresh, let cachedKey { return .found(cachedKey) }
            // Stale while revalidating: a key the last fetch held serves at once (within the
            // stale-if-error lifetime) while a fetch brings the set up to date, so a slow JWKS
            // never holds up Forge's calls (which time out after 5 s). Only a kid not held waits.
            let staleKey = cachedKey.flatMap { self.isUsableWhileStale(entry, now: now) ? $0 : nil }
            if let inFlight = entry.inFlight { return staleKey.map { .found($0) } ?? .wait(inFlight) }

            let minimumGap =
                entry.lastAttemptFailed ? configuration.jwksFailureRetryInterval : configuration.jwksRefreshInterval
            let mayFetch = entry.lastAttempt.map { now - $0 >= minimumGap } ?? true
            guard mayFetch else {
                if let staleKey { return .found(staleKey) }
                // The kid cannot be checked against a current key set because the JWKS is failing.
                if entry.lastAttemptFailed { return .fail(.jwksUnavailable) }
                return .fail(.unknownKey)
            }
            entry.lastAttempt = now
            let task = FetchTask { await self.fetchAndCache(jwksURL: jwksURL, httpClient: httpClient) }
            entry.inFlight = task
            return staleKey.map { .found($0) } ?? .wait(task)
        }

        switch lookup {
        case .found(let key):
            return key
        case .fail(let error):
            throw error
        case .wait(let task):
            switch await task.value {
            case .success(let keys):
                guard let key = keys[kid] else { throw .unknownKey }
                return key
            case .failure(let error):
                // Stale-if-error: keys from an earlier fetch stay usable for a bounded time.
                let stale = self.keyCache.withLock { cache -> Insecure.RSA.PublicKey? in
                    guard let entry = cache[jwksURL], self.isUsableWhileStale(entry, now: ContinuousClock.now) else {
                        return nil
                    }
                    return entry.keys[kid]
                }
                if let stale { return stale }
                throw error
            }
        }
    }

    /// The JWKS fetch in flight for `jwksURL`, if any (tests await it).
    func jwksFetchInFlight(_ jwksURL: String) -> FetchTask? {
        self.keyCache.withLock { $0[jwksURL]?.inFlight }
    }

    private func isUsableWhileStale(_ entry: KeyCacheEntry, now: ContinuousClock.Instant) -> Bool {
        guard let fetchedAt = entry.fetchedAt else { return false }
        return now - fetchedAt < self.configuration.jwksStaleIfErrorLifetime
    }

    /// Fetches and parses the JWKS, records the outcome in the cache and clears the in-flight marker.
    private func fetchAndCache(jwksURL: String, httpClient: HTTPClient) async -> Result<KeySet, InvocationTokenError> {
        let result: Result<KeySet, InvocationTokenError>
        do {
            let keys = try await self.fetchJWKS(jwksURL: jwksURL, httpClient: httpClient)
            self.logger.debug("Fetched Forge JWKS", metadata: ["jwks.url": "\(jwksURL)", "jwks.keys": "\(keys.count)"])
            result = .success(keys)
        } catch {
            self.logger.warning(
                "Could not fetch the Forge JWKS",
                metadata: ["jwks.url": "\(jwksURL)", "error": "\(Self.describe(error))"]
            )
            result = .failure(.jwksUnavailable)
        }
        let completedAt = ContinuousClock.now
        self.keyCache.withLock { cache in
            var entry = cache[jwksURL] ?? KeyCacheEntry()
            entry.inFlight = nil
            switch result {
            case .success(let keys):
                entry.keys = keys
                entry.fetchedAt = completedAt
                entry.lastAttemptFailed = false
            case .failure:
                entry.lastAttemptFailed = true
            }
            cache[jwksURL] = entry
        }
        return result
    }

    private struct FetchError: Error, CustomStringConvertible {
        let description: String
    }

    private func fetchJWKS(jwksURL: String, httpClient: HTTPClient) async throws -> KeySet {
        let timeout = self.configuration.jwksFetchTimeout
        let logger = self.logger
        let headTimeout = TimeAmount.nanoseconds(Int64(Self.seconds(timeout) * 1_000_000_000))
        let body = try await withThrowingTaskGroup(of: ByteBuffer?.self) { group in
            group.addTask {
                var request = HTTPClientRequest(url: jwksURL)
                request.method = .GET
                request.headers.add(name: "Accept", value: "application/json")
                let response = try await httpClient.execute(request, timeout: headTimeout, logger: logger)
                guard response.status == .ok else {
                    throw FetchError(description: "JWKS answered HTTP \(response.status.code)")
                }
                return try await response.body.collect(upTo: 1 << 20)
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let buffer = first else {
                throw FetchError(description: "JWKS fetch timed out")
            }
            return buffer
        }
        return try Self.parseJWKS(Data(body.readableBytesView), logger: self.logger)
    }

    private static func describe(_ error: any Error) -> String {
        if let error = error as? FetchError { return error.description }
        if let error = error as? HTTPClientError { return "\(error)" }
        if error is CancellationError { return "cancelled" }
        return String(reflecting: type(of: error))
    }

    // MARK: - JWKS parsing

    /// One entry of a JWKS, read leniently so one unsupported key does not spoil the set.
    private struct RawJWK: Decodable {
        var kty: String?
        var kid: String?
        var alg: String?
        var use: String?
        var n: String?
        var e: String?

        private enum CodingKeys: String, CodingKey { case kty, kid, alg, use, n, e }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            self.kty = try? container.decodeIfPresent(String.self, forKey: .kty)
            self.kid = try? container.decodeIfPresent(String.self, forKey: .kid)
            self.alg = try? container.decodeIfPresent(String.self, forKey: .alg)
            self.use = try? container.decodeIfPresent(String.self, forKey: .use)
            self.n = try? container.decodeIfPresent(String.self, forKey: .n)
            self.e = try? container.decodeIfPresent(String.self, forKey: .e)
        }
    }

    private struct RawJWKS: Decodable {
        var keys: [Lenient]

        struct Lenient: Decodable {
            var jwk: RawJWK?
            init(from decoder: any Decoder) throws { self.jwk = try? RawJWK(from: decoder) }
        }
    }

    /// The RS256 signing keys of a JWKS document, by `kid`: RSA keys with a `kid`, `alg` absent or
    /// `RS256`, `use` absent or `sig`, and at least 2048 bits. Other entries are skipped; a `kid`
    /// that appears more than once is dropped altogether (ambiguous).
    ///
    /// - Throws: ``InvocationTokenError/jwksUnavailable`` when the document is not a JWKS.
    static func parseJWKS(_ data: Data, logger: Logger) throws(InvocationTokenError) -> KeySet {
        let document: RawJWKS
        do {
            document = try JSONDecoder().decode(RawJWKS.self, from: data)
        } catch {
            throw .jwksUnavailable
        }
        var keys: KeySet = [:]
        var duplicates: Set<String> = []
        for raw in document.keys.compactMap(\.jwk) {
            guard raw.kty == "RSA", let kid = raw.kid, !kid.isEmpty,
                raw.alg == nil || raw.alg == "RS256",
                raw.use == nil || raw.use == "sig",
                let n = raw.n, let e = raw.e,
                let key = try? Insecure.RSA.PublicKey(modulus: n, exponent: e)
            else {
                logger.debug("Skipping an unusable JWKS entry", metadata: ["jwks.kid": "\(raw.kid ?? "")"])
                continue
            }
            if keys.updateValue(key, forKey: kid) != nil { duplicates.insert(kid) }
        }
        for kid in duplicates {
            logger.warning("JWKS names a kid more than once; ignoring it", metadata: ["jwks.kid": "\(kid)"])
            keys[kid] = nil
        }
        return keys
    }
}
