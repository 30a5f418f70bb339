import RedisKit

/// What the token flow needs from persistence, and nothing more: the seam between ``TokenFlow``
/// and the store shared by every replica. ``RedisTokenStore`` is the production implementation,
/// ``InMemoryTokenStore`` the one unit tests drive with a manual clock.
///
/// Every method may throw when the store cannot be reached; the flow then answers
/// `store_unavailable` or falls back as the contract says. No method returns or logs a secret
/// other than the token it was asked for.
public protocol TokenStore: Sendable {
    /// What a token request needs in one read: the installation's state, its token, circuit and hold.
    func snapshot(_ id: InstallationID, timeout: Duration?) async throws -> TokenStoreSnapshot

    /// The snapshot and, in the same round trip, the installation's lease when the read shows that
    /// `intent`'s caller needs a round (no token valid for it, or a forced refresh) and one can run
    /// (the installation active, a trigger registered, the circuit closed, no hold): taken as
    /// ``takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:material:)`` takes it. Nil lease: not
    /// taken (not needed, not possible, or held by another round).
    func snapshot(_ id: InstallationID, timeout: Duration?, takingLease intent: SnapshotLeaseIntent?)
        async throws -> (snapshot: TokenStoreSnapshot, lease: SnapshotLease?)

    /// Takes the installation's lease for `ttl` unless another round holds it, its circuit is open,
    /// (when `respectingHold`) a hold is in force, or (with `unlessNewerThan`) a token expiring
    /// after that instant (Unix seconds) and still valid is stored; in the same step it records the
    /// round's pending request `requestID` (owned by `replicaID`), so its delivery is recognised
    /// on any replica. The check and the take are one step: a round that another replica ends
    /// between this replica's last read and its take (token stored, lease released) is seen.
    func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?
    ) async throws -> TokenStoreLeaseOutcome

    /// Takes the lease as ``takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:)``
    /// does and, when it is taken and `material` asks for it, reads the installation's trigger
    /// material in the same round trip (for the round's first trigger call).
    func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?, material: TriggerMaterialQuery?
    ) async throws -> (outcome: TokenStoreLeaseOutcome, material: TriggerMaterialRead?)

    /// Extends the lease and the round's pending request to `ttl` from now, only while `requestID`
    /// holds the lease; never shortens either (extensions may land in any order). False: the lease
    /// is not `requestID`'s (another owner, or none).
    @discardableResult
    func extendLease(_ id: InstallationID, requestID: String, ttl: Duration) async throws -> Bool

    /// Releases the lease, only while `requestID` holds it.
    func releaseLease(_ id: InstallationID, requestID: String) async throws

    /// Puts the installation's rounds on hold for `duration`, announces it, and with
    /// `releasingLease` releases the lease in the same step if `requestID` still holds it.
    func placeHold(_ id: InstallationID, requestID: String, duration: Duration, releasingLease: Bool) async throws

    /// The stored token with the `apiBaseUrl` and the hold, and (with `requestID`) whether that
    /// round's pending request is still open.
    func roundProbe(_ id: InstallationID, requestID: String?) async throws -> TokenStoreProbe

    /// Records the verdict of a round this process led for the circuit breaker; returns the
    /// instant until which the circuit is now open, or nil when it is closed.
    func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime
    ) async throws -> FlowTime?

    /// Records the verdict as ``recordRoundOutcome(_:succeeded:threshold:openBase:openCap:now:)``
    /// does and, in the same step, releases the lease while `requestID` holds it (the round ended).
    func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime,
        releasingLease requestID: String
    ) async throws -> FlowTime?

    /// The announcements of every replica (tokens stored, holds, uninstalls), until the task
    /// iterating it is cancelled.
    func notifications() -> AsyncStream<TokenStoreNotification>

    /// Whether a call that failed with `error` may still have changed the store (a timeout after
    /// the command was sent, a cancelled wait); false when it certainly never reached it.
    func mayHaveRun(failingWith error: any Error) -> Bool

    /// Whether `error` says the store cannot be reached (not reached at all, or the connection
    /// lost under way), as opposed to one call running out of its own time or being cancelled.
    func isUnreachable(_ error: any Error) -> Bool
}

extension TokenStore {
    /// Without knowing better: any failed call may have run.
    public func mayHaveRun(failingWith error: any Error) -> Bool { true }

    /// Without knowing better: what certainly never ran could not reach the store.
    public func isUnreachable(_ error: any Error) -> Bool { !self.mayHaveRun(failingWith: error) }

    /// A store that takes no lease with its snapshot: the round takes it in a step of its own.
    public func snapshot(_ id: InstallationID, timeout: Duration?, takingLease intent: SnapshotLeaseIntent?)
        async throws -> (snapshot: TokenStoreSnapshot, lease: SnapshotLease?)
    {
        (try await self.snapshot(id, timeout: timeout), nil)
    }

    /// A store that reads no trigger material with the lease: the sender reads its own.
    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?, material: TriggerMaterialQuery?
    ) async throws -> (outcome: TokenStoreLeaseOutcome, material: TriggerMaterialRead?) {
        let outcome = try await self.takeLease(
            id, requestID: requestID, replicaID: replicaID, ttl: ttl, respectingHold: respectingHold,
            unlessNewerThan: unlessNewerThan)
        return (outcome, nil)
    }

    /// Takes the lease whatever token is stored (an operator's or a test's take).
    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool
    ) async throws -> TokenStoreLeaseOutcome {
        try await self.takeLease(
            id, requestID: requestID, replicaID: replicaID, ttl: ttl, respectingHold: respectingHold,
            unlessNewerThan: nil)
    }
}

extension TokenStore {
    /// A store without a combined step: the lease is released, then the verdict recorded.
    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime,
        releasingLease requestID: String
    ) async throws -> FlowTime? {
        try? await self.releaseLease(id, requestID: requestID)
        return try await self.recordRoundOutcome(
            id, succeeded: succeeded, threshold: threshold, openBase: openBase, openCap: openCap, now: now)
    }
}

/// A lease a token request's snapshot may take in its round trip (for the round the request
/// would start), and what decides whether it is needed.
public struct SnapshotLeaseIntent: Sendable, Hashable {
    /// The round's request id (the lease's owner value and the pending request's name).
    public var requestID: String
    /// The replica that would lead the round (the pending request's owner).
    public var replicaID: String
    public var ttl: Duration
    /// The caller's `minValidity`: a stored token valid for less needs a round.
    public var minValidity: Int64
    /// A forced refresh: a round is needed whatever the stored token.
    public var forced: Bool
    /// The instant the token's validity and the circuit are judged at.
    public var now: FlowTime
    /// The trigger material to read with the lease, as for ``TokenStore/takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:material:)``.
    public var material: TriggerMaterialQuery?

    public init(
        requestID: String, replicaID: String, ttl: Duration, minValidity: Int64, forced: Bool, now: FlowTime,
        material: TriggerMaterialQuery?
    ) {
        self.requestID = requestID
        self.replicaID = replicaID
        self.ttl = ttl
        self.minValidity = minValidity
        self.forced = forced
        self.now = now
        self.material = material
    }
}

extension TriggerMaterialRead {
    /// The material as the store's scripts return it: status, sealed trigger URL, key id, next
    /// key's activation time, sealed key (nil entries where the store has none). Nil unless there
    /// are exactly five.
    public init?(reply: ArraySlice<RedisValue>) {
        guard reply.count == 5 else { return nil }
        let f = Array(reply)
        self.init(
            status: f[0].string, sealedURL: f[1].string, keyID: f[2].string,
            nextActivatesAt: f[3].string.flatMap { Int64($0) }, sealedKey: f[4].string)
    }
}

/// A lease a snapshot took (``TokenStore/snapshot(_:timeout:takingLease:)``).
public struct SnapshotLease: Sendable, Hashable {
    public var requestID: String
    /// The trigger material read with it, when it was asked for.
    public var material: TriggerMaterialRead?
    /// When the lease runs out (the intent's `now` plus its `ttl`), unless extended.
    public var expires: FlowTime

    public init(requestID: String, material: TriggerMaterialRead?, expires: FlowTime) {
        self.requestID = requestID
        self.material = material
        self.expires = expires
    }
}

/// What ``TokenStore/snapshot(_:timeout:)`` read.
public struct TokenStoreSnapshot: Sendable, Hashable {
    /// The installation is known.
    public var exists: Bool
    /// The installation is active (not uninstalled).
    public var active: Bool
    /// A trigger URL is registered (rounds can run).
    public var triggerRegistered: Bool
    public var apiBaseUrl: String?
    public var token: AccessToken?
    /// The instant until which the circuit is open (nil: closed).
    public var circuitOpenUntil: FlowTime?
    /// How long the installation's rounds stay on hold (nil: no hold).
    public var holdRemaining: Duration?

    public init(
        exists: Bool, active: Bool, triggerRegistered: Bool, apiBaseUrl: String? = nil, token: AccessToken? = nil,
        circuitOpenUntil: FlowTime? = nil, holdRemaining: Duration? = nil
    ) {
        self.exists = exists
        self.active = active
        self.triggerRegistered = triggerRegistered
        self.apiBaseUrl = apiBaseUrl
        self.token = token
        self.circuitOpenUntil = circuitOpenUntil
        self.holdRemaining = holdRemaining
    }
}

/// What ``TokenStore/roundProbe(_:requestID:)`` read.
public struct TokenStoreProbe: Sendable, Hashable {
    public var token: AccessToken?
    public var apiBaseUrl: String?
    /// The round's pending request is still open (no delivery answered it yet). Always false for
    /// a request id that never had one (a follower's).
    public var pendingOpen: Bool
    /// A delivery answered the round's pending request. False for one that expired unanswered (with
    /// a lease whose extension failed, say): that says nothing of a delivery.
    public var pendingAnswered: Bool
    /// How long the installation's rounds stay on hold (nil: no hold).
    public var holdRemaining: Duration?
    /// The installation was uninstalled (a follower whose notice of it was lost learns it here).
    public var uninstalled: Bool

    public init(
        token: AccessToken?, apiBaseUrl: String?, pendingOpen: Bool, pendingAnswered: Bool = false,
        holdRemaining: Duration?, uninstalled: Bool = false
    ) {
        self.token = token
        self.apiBaseUrl = apiBaseUrl
        self.pendingOpen = pendingOpen
        self.pendingAnswered = pendingAnswered
        self.holdRemaining = holdRemaining
        self.uninstalled = uninstalled
    }
}

/// What ``TokenStore/takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:)`` found.
public enum TokenStoreLeaseOutcome: Sendable, Hashable {
    /// The lease is ours and the pending request recorded.
    case taken
    /// Another round holds it.
    case busy
    /// The installation's rounds are on hold for this long; the lease was not taken.
    case held(remaining: Duration)
    /// A token expiring later than the round's `unlessNewerThan` is stored (another round ended
    /// meanwhile): the lease was not taken; the round's callers read it.
    case newerStored
    /// The installation's circuit is open until this instant (a round led elsewhere opened it
    /// while this one followed): the lease was not taken; the round's callers get `circuit_open`.
    case circuitOpen(until: FlowTime)
}

/// One announcement on the store's channel.
public enum TokenStoreNotification: Sendable, Hashable {
    /// The subscription is (again) in place: announcements may have been lost meanwhile.
    case subscribed
    /// The subscription is not in place (lost, or refused): announcements are missed until the
    /// next ``subscribed``.
    case unsubscribed
    /// A token was stored (`requestID`: the round it answered, nil for a push), or, with
    /// `sameToken`, a delivery answered round `requestID` without replacing the stored token.
    /// `origin`: the replica that stored it, when the announcement names one.
    case tokenStored(InstallationID, requestID: String?, sameToken: Bool, origin: String? = nil)
    /// The installation's rounds were put on hold.
    case holdPlaced(InstallationID)
    /// The installation's `apiBaseUrl` changed.
    case apiBaseURLChanged(InstallationID)
    /// The installation was uninstalled.
    case uninstalled(InstallationID)
}
