import FlowEngine

/// What a user-token request needs in one round trip: the installation's state, the cached user
/// token, a remembered refusal and whether some process is exchanging for that user right now.
public struct UserTokenSnapshot: Sendable {
    /// The installation was ever seen.
    public var exists: Bool
    public var status: InstallationStatus
    public var apiBaseUrl: String?
    public var cloudId: String?
    /// The cached user token, when there is one that could be opened.
    public var token: AccessToken?
    /// Time left on a remembered refusal of this user; nil when none is remembered.
    public var deniedFor: Duration?
    /// Time left on the user's exchange lease; nil when no process holds it.
    public var leaseRemaining: Duration?

    /// Some process holds the user's exchange lease.
    public var exchangeInFlight: Bool { self.leaseRemaining != nil }

    public init(
        exists: Bool, status: InstallationStatus, apiBaseUrl: String? = nil, cloudId: String? = nil,
        token: AccessToken? = nil, deniedFor: Duration? = nil, leaseRemaining: Duration? = nil
    ) {
        self.exists = exists
        self.status = status
        self.apiBaseUrl = apiBaseUrl
        self.cloudId = cloudId
        self.token = token
        self.deniedFor = deniedFor
        self.leaseRemaining = leaseRemaining
    }
}

/// Whether the app-wide exchange budget lets one more exchange through.
public enum UserExchangeAdmission: Sendable, Hashable {
    /// Counted; go ahead.
    case admitted
    /// The budget is spent (or Atlassian asked every replica to back off): try again after this long.
    case refused(retryAfter: Duration)
}

/// What storing an exchanged user token did.
public enum UserTokenStoreOutcome: Sendable, Hashable {
    /// Cached until shortly before its expiry.
    case stored
    /// Too close to its expiry to be worth caching; nothing was written.
    case tooShortLived
    /// The installation is uninstalled; nothing was written.
    case uninstalled
}

/// What a user-token store announces to every process.
public enum UserTokenNotice: Sendable, Hashable {
    /// The user's cached token or refusal changed, or its exchange lease was given up.
    case user(InstallationID, accountId: String)
    /// The installation was uninstalled (its user tokens went with it).
    case uninstalled(InstallationID)
    /// Notices may have been lost (the subscription was re-established): re-read what you wait for.
    case resync
}

/// Where user tokens (offline user impersonation, contract §2 `?asUser=`) are cached and their
/// exchanges coordinated between processes: the cache, remembered refusals, the per-user exchange
/// lease and the app-wide exchange budget. ``RedisUserTokenStore`` is the gateway's; unit tests use
/// an in-memory one. `accountId`s reaching it are already validated (letters, digits, `:`, `_`, `-`).
/// Every method throws when the store cannot be reached in time.
public protocol UserTokenStore: Sendable {
    /// The installation's status and site, the cached user token, a remembered refusal and the
    /// exchange lease, read together. A cached token that cannot be opened reads as absent.
    func snapshot(_ id: InstallationID, accountId: String, timeout: Duration?) async throws -> UserTokenSnapshot

    /// Caches an exchanged token until `cacheUntil` (unix seconds) and clears a remembered refusal;
    /// announces it. Nothing is written for an uninstalled installation or when `cacheUntil` is not
    /// after `now`.
    func store(
        _ id: InstallationID, accountId: String, token: AccessToken, cacheUntil: Int64, now: FlowTime
    ) async throws -> UserTokenStoreOutcome

    /// Remembers a refusal of the user for `duration` and drops the cached token; announces it.
    /// Returns false (and writes nothing) for an uninstalled installation.
    @discardableResult
    func rememberDenial(_ id: InstallationID, accountId: String, for duration: Duration) async throws -> Bool

    /// Takes the user's exchange lease for `ttl` if nobody holds it.
    func acquireLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws -> Bool

    /// Extends the user's exchange lease to `ttl` from now only while `owner` holds it; never
    /// shortens it (extensions may land in any order). True while `owner` holds it.
    @discardableResult
    func extendLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws -> Bool

    /// Releases the user's exchange lease only while `owner` holds it; announces it when released.
    @discardableResult
    func releaseLease(_ id: InstallationID, accountId: String, owner: String) async throws -> Bool

    /// Counts one exchange against the budget of `limit` per `window` shared by every process,
    /// unless the budget is spent or a hold (``blockExchanges(scope:for:)``) is in force.
    func admitExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission

    /// What ``admitExchange(scope:limit:window:now:)`` would answer now, counting nothing: a
    /// round checks it before it fetches a system token (which may take a trigger round trip).
    func peekExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission

    /// Holds every exchange of every process back for `duration`; a longer hold is kept.
    func blockExchanges(scope: String, for duration: Duration) async throws

    /// Exchanges counted against the budget `scope` within `window` before `now`.
    func exchangesUsed(scope: String, window: Duration, now: FlowTime) async throws -> Int

    /// Hands the store's announcements to `handle`, one at a time, until the calling task is
    /// cancelled or the store shuts down.
    func watch(_ handle: @Sendable (UserTokenNotice) async -> Void) async
}
