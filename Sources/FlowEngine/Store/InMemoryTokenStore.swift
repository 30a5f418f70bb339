import Synchronization

/// A ``TokenStore`` in memory, with the Redis scripts' semantics and time taken from `now`: unit
/// tests drive a ``TokenFlow`` with it and a manual clock, and play the other replicas and Forge
/// through its extra methods (``deliver(_:token:expiresAt:requestID:)``, ``takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:)``).
///
/// Not for production: nothing is shared between processes.
public final class InMemoryTokenStore: TokenStore {
    struct Installation {
        var active: Bool
        var triggerRegistered: Bool
        var apiBaseUrl: String?
    }

    struct Expiring<Value> {
        var value: Value
        var until: FlowTime
    }

    struct Breaker {
        var failures = 0
        var opens = 0
        var openUntil: FlowTime?
    }

    struct State {
        var installations: [InstallationID: Installation] = [:]
        var tokens: [InstallationID: AccessToken] = [:]
        var leases: [InstallationID: Expiring<String>] = [:]
        var pending: [String: Expiring<String>] = [:]
        var holds: [InstallationID: Expiring<String>] = [:]
        var breakers: [InstallationID: Breaker] = [:]
        var subscribers: [UInt64: AsyncStream<TokenStoreNotification>.Continuation] = [:]
        var nextSubscriber: UInt64 = 0
        var dropsNotifications = false
        var triggerMaterial: [InstallationID: TriggerMaterialRead] = [:]
        /// The calls held in flight, per kind, until released (``hold(_:)``).
        var gates: [Gate: [CheckedContinuation<Void, Never>]] = [:]
        var unavailable = false
        var answersLost: Set<String> = []
        var calls: [String: Int] = [:]
        /// The `timeout` each snapshot was asked with, in order.
        var snapshotTimeouts: [Duration?] = []
        var turns = CallTurns()
        /// Calls travelling now (``callsInFlight``).
        var inFlight = 0
    }

    private let state = Mutex(State())
    private let now: @Sendable () -> FlowTime

    /// - Parameter now: the time the store's expiries are judged by (a test's manual clock).
    public init(now: @escaping @Sendable () -> FlowTime) {
        self.now = now
    }

    // MARK: - Playing Forge, the operator and other replicas

    /// Records an active installation.
    public func install(_ id: InstallationID, triggerRegistered: Bool = true, apiBaseUrl: String? = nil) {
        self.state.withLock {
            $0.installations[id] = Installation(
                active: true, triggerRegistered: triggerRegistered, apiBaseUrl: apiBaseUrl)
        }
    }

    /// Marks the installation uninstalled, deletes its token and announces it.
    public func uninstall(_ id: InstallationID) {
        self.state.withLock {
            $0.installations[id]?.active = false
            $0.tokens[id] = nil
        }
        self.publish(.uninstalled(id))
    }

    /// Stores a delivered token as the Redis script does: when its expiry is later than the stored
    /// one's; the round `requestID` is answered when its pending request is open. Announces it.
    /// Like the script, refuses every delivery for an installation uninstalled (nothing changes).
    /// Returns whether it was stored and whether it answered a pending request.
    @discardableResult
    public func deliver(_ id: InstallationID, token value: String, expiresAt: Int64, requestID: String?)
        -> (stored: Bool, solicited: Bool)
    {
        let now = self.now()
        let (stored, solicited) = self.state.withLock { s -> (Bool, Bool) in
            guard s.installations[id]?.active != false else { return (false, false) }
            var solicited = false
            if let requestID, let p = s.pending[Self.pendingKey(id, requestID)], now < p.until, p.value != Self.answered
            {
                // Marked answered for the rest of its lifetime, as the script does.
                s.pending[Self.pendingKey(id, requestID)]?.value = Self.answered
                solicited = true
            }
            let current = s.tokens[id]?.expiresAt ?? 0
            guard expiresAt > current, expiresAt > now.unixSeconds else { return (false, solicited) }
            s.tokens[id] = AccessToken(
                value: value, expiresAt: expiresAt, requestID: solicited ? requestID : nil, receivedAt: now.unixSeconds)
            return (true, solicited)
        }
        if stored || solicited {
            self.publish(.tokenStored(id, requestID: solicited ? requestID : nil, sameToken: !stored))
        }
        return (stored, solicited)
    }

    /// Whether the installation is recorded and active.
    public func isActive(_ id: InstallationID) -> Bool {
        self.state.withLock { $0.installations[id]?.active ?? false }
    }

    /// The stored token, if any.
    public func token(_ id: InstallationID) -> AccessToken? {
        self.state.withLock { $0.tokens[id] }
    }

    /// The owner value of the installation's lease, if one is held.
    public func leaseOwner(_ id: InstallationID) -> String? {
        let now = self.now()
        return self.state.withLock { s in s.leases[id].flatMap { now < $0.until ? $0.value : nil } }
    }

    /// The replica that owns round `requestID`'s open pending request, if it is open.
    public func pendingOwner(_ id: InstallationID, requestID: String) -> String? {
        let now = self.now()
        return self.state.withLock { s in
            s.pending[Self.pendingKey(id, requestID)].flatMap {
                now < $0.until && $0.value != Self.answered ? $0.value : nil
            }
        }
    }

    /// Round `requestID`'s lease and pending request run out now, unanswered, as their keys do
    /// together when an extension of theirs failed.
    public func expireLease(_ id: InstallationID, requestID: String) {
        self.state.withLock { s in
            if s.leases[id]?.value == requestID { s.leases[id] = nil }
            s.pending[Self.pendingKey(id, requestID)] = nil
        }
    }

    /// The value of a pending request a delivery answered (the script's `=`).
    private static let answered = "="

    /// While true, announcements are lost (as while a subscriber reconnects).
    public var dropsNotifications: Bool {
        get { self.state.withLock { $0.dropsNotifications } }
        set { self.state.withLock { $0.dropsNotifications = newValue } }
    }

    /// Sets the trigger material a taken lease reads for `id` when the sender asks for it (as the
    /// Redis lease script does); nil: none is read.
    public func setTriggerMaterial(_ read: TriggerMaterialRead?, for id: InstallationID) {
        self.state.withLock { $0.triggerMaterial[id] = read }
    }

    /// A kind of call a test can hold in flight.
    public enum Gate: Hashable, Sendable {
        /// Snapshots (reads of a token request).
        case snapshot
        /// Snapshots' answers, after their read of the store (and the lease it took): an answer on
        /// its way back while the store changes, as a Redis reply in flight.
        case snapshotAnswer
        /// Lease takes of a round (``takeLease(_:requestID:replicaID:ttl:respectingHold:unlessNewerThan:)``).
        case takeLease
        /// Hold writes (``placeHold(_:requestID:duration:releasingLease:)``).
        case placeHold
        /// Lease extensions (``extendLease(_:requestID:ttl:)``).
        case extendLease
    }

    /// Calls of this kind from now on wait, as calls in flight, until ``release(_:)``.
    public func hold(_ gate: Gate) {
        self.state.withLock { s in if s.gates[gate] == nil { s.gates[gate] = [] } }
    }

    /// Lets the calls held by ``hold(_:)`` go on, and those after them at once.
    public func release(_ gate: Gate) {
        let held = self.state.withLock { $0.gates.removeValue(forKey: gate) ?? [] }
        for call in held { call.resume() }
    }

    /// How many calls of this kind wait for ``release(_:)``.
    public func held(_ gate: Gate) -> Int {
        self.state.withLock { $0.gates[gate]?.count ?? 0 }
    }

    /// Snapshots from now on wait, as reads in flight, until ``releaseSnapshots()``.
    public func holdSnapshots() { self.hold(.snapshot) }

    /// Lets the snapshots held by ``holdSnapshots()`` answer, and those after them at once.
    public func releaseSnapshots() { self.release(.snapshot) }

    /// How many snapshots wait for ``releaseSnapshots()``.
    public var snapshotsHeld: Int { self.held(.snapshot) }

    /// Waits while calls of this kind are held.
    private func pass(_ gate: Gate) async {
        guard self.state.withLock({ $0.gates[gate] != nil }) else { return }
        await withCheckedContinuation { (call: CheckedContinuation<Void, Never>) in
            let waits = self.state.withLock { s -> Bool in
                guard s.gates[gate] != nil else { return false }
                s.gates[gate]?.append(call)
                return true
            }
            if !waits { call.resume() }
        }
    }

    /// At most how many scheduling turns each call of the flow takes before it acts (``CallTurns``).
    public var callTurns: Int {
        get { self.state.withLock { $0.turns.limit } }
        set { self.state.withLock { $0.turns.limit = newValue } }
    }

    /// Lets other work run for up to ``callTurns`` scheduling turns.
    private func travel() async {
        let turns = self.state.withLock { s -> Int in
            s.inFlight += 1
            return s.turns.next()
        }
        for _ in 0..<turns { await Task.yield() }
        self.state.withLock { $0.inFlight -= 1 }
    }

    /// Calls on their way to the store now (a test that moves a manual clock holds it while any
    /// is: a round trip takes scheduling turns, not clock time).
    public var callsInFlight: Int { self.state.withLock { $0.inFlight } }

    /// While true, every call throws (the store is unreachable).
    public var isUnavailable: Bool {
        get { self.state.withLock { $0.unavailable } }
        set { self.state.withLock { $0.unavailable = newValue } }
    }

    /// The next `method` call (`snapshot`, `takeLease`) takes effect and then throws, as a Redis
    /// script whose answer is lost (a timeout after it ran).
    public func loseAnswer(of method: String) {
        self.state.withLock { _ = $0.answersLost.insert(method) }
    }

    private func answer(_ method: String) throws {
        if self.state.withLock({ $0.answersLost.remove(method) }) != nil { throw LostAnswer() }
    }

    /// How many subscribers listen to the announcements now.
    public var subscriberCount: Int {
        self.state.withLock { $0.subscribers.count }
    }

    /// The `timeout` each snapshot (taking a lease or not) was asked with, in order.
    public var snapshotTimeouts: [Duration?] {
        self.state.withLock { $0.snapshotTimeouts }
    }

    /// How many times the flow called `method` (`snapshot`, `takeLease`, `roundProbe`, …).
    public func calls(_ method: String) -> Int {
        self.state.withLock { $0.calls[method] ?? 0 }
    }

    /// Tells every subscriber its subscription is down, as the Redis client does when the
    /// connection is lost or subscribing is refused.
    public func unsubscribe() {
        let subscribers = self.state.withLock { s in Array(s.subscribers.values) }
        for subscriber in subscribers { subscriber.yield(.unsubscribed) }
    }

    /// Tells every subscriber its subscription came up again, as the Redis client does after a
    /// reconnection (announcements made meanwhile are lost: see ``dropsNotifications``).
    public func resubscribe() {
        let subscribers = self.state.withLock { s in Array(s.subscribers.values) }
        for subscriber in subscribers { subscriber.yield(.subscribed) }
    }

    /// Announces `notification` to every subscriber (unless announcements are being lost).
    public func publish(_ notification: TokenStoreNotification) {
        let subscribers = self.state.withLock { s in s.dropsNotifications ? [] : Array(s.subscribers.values) }
        for subscriber in subscribers { subscriber.yield(notification) }
    }

    // MARK: - TokenStore

    struct Unavailable: Error {}
    /// The call took effect but its answer was lost (``loseAnswer(of:)``).
    struct LostAnswer: Error {}

    /// A call refused while the store is unavailable never ran; one whose answer was lost did.
    public func mayHaveRun(failingWith error: any Error) -> Bool {
        !(error is Unavailable)
    }

    private func call(_ method: String) throws {
        let unavailable = self.state.withLock { s -> Bool in
            s.calls[method, default: 0] += 1
            return s.unavailable
        }
        if unavailable { throw Unavailable() }
    }

    private static func pendingKey(_ id: InstallationID, _ requestID: String) -> String { id.ari + " " + requestID }

    private static func remaining(_ e: Expiring<String>?, now: FlowTime) -> Duration? {
        guard let e, now < e.until else { return nil }
        return e.until - now
    }

    public func snapshot(_ id: InstallationID, timeout: Duration?) async throws -> TokenStoreSnapshot {
        self.state.withLock { $0.snapshotTimeouts.append(timeout) }
        await self.pass(.snapshot)
        await self.travel()
        try self.call("snapshot")
        let snapshot = self.readSnapshot(id)
        await self.pass(.snapshotAnswer)
        return snapshot
    }

    private func readSnapshot(_ id: InstallationID) -> TokenStoreSnapshot {
        let now = self.now()
        return self.state.withLock { s in
            let installation = s.installations[id]
            let circuit = s.breakers[id]?.openUntil.flatMap { now < $0 ? $0 : nil }
            return TokenStoreSnapshot(
                exists: installation != nil, active: installation?.active ?? false,
                triggerRegistered: installation?.triggerRegistered ?? false, apiBaseUrl: installation?.apiBaseUrl,
                token: s.tokens[id].flatMap { $0.expiresAt > now.unixSeconds ? $0 : nil }, circuitOpenUntil: circuit,
                holdRemaining: Self.remaining(s.holds[id], now: now))
        }
    }

    /// The snapshot and, as the Redis script does, the lease when the caller needs a round and one
    /// can run (counted as `snapshot`, and `leaseWithSnapshot` when the lease is taken).
    public func snapshot(_ id: InstallationID, timeout: Duration?, takingLease intent: SnapshotLeaseIntent?)
        async throws -> (snapshot: TokenStoreSnapshot, lease: SnapshotLease?)
    {
        self.state.withLock { $0.snapshotTimeouts.append(timeout) }
        await self.pass(.snapshot)
        await self.travel()
        try self.call("snapshot")
        let (snapshot, lease) = self.readSnapshot(id, takingLease: intent)
        try self.answer("snapshot")
        await self.pass(.snapshotAnswer)
        return (snapshot, lease)
    }

    private func readSnapshot(_ id: InstallationID, takingLease intent: SnapshotLeaseIntent?)
        -> (snapshot: TokenStoreSnapshot, lease: SnapshotLease?)
    {
        let snapshot = self.readSnapshot(id)
        guard let intent else { return (snapshot, nil) }
        let stored = self.state.withLock { $0.tokens[id] }
        let needed =
            intent.forced || stored.map { $0.expiresAt < intent.now.unixSeconds + intent.minValidity } ?? true
        let possible =
            snapshot.active && snapshot.triggerRegistered && snapshot.holdRemaining == nil
            && (snapshot.circuitOpenUntil.map { $0 <= intent.now } ?? true)
        guard needed, possible else { return (snapshot, nil) }
        let now = self.now()
        let taken = self.state.withLock { s -> Bool in
            guard
                Self.setLease(
                    &s, id, requestID: intent.requestID, replicaID: intent.replicaID, ttl: intent.ttl, now: now)
            else { return false }
            s.calls["leaseWithSnapshot", default: 0] += 1
            return true
        }
        guard taken else { return (snapshot, nil) }
        let material = intent.material.flatMap { self.triggerMaterial(id, $0) }
        return (
            snapshot, SnapshotLease(requestID: intent.requestID, material: material, expires: intent.now + intent.ttl)
        )
    }

    /// The trigger material set for `id`, without the sealed key the query says is held.
    private func triggerMaterial(_ id: InstallationID, _ query: TriggerMaterialQuery) -> TriggerMaterialRead? {
        var read = self.state.withLock { $0.triggerMaterial[id] }
        if read?.keyID == query.heldKeyID { read?.sealedKey = nil }
        return read
    }

    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?
    ) async throws -> TokenStoreLeaseOutcome {
        await self.pass(.takeLease)
        await self.travel()
        try self.call("takeLease")
        let now = self.now()
        return self.state.withLock { s in
            if respectingHold, let held = Self.remaining(s.holds[id], now: now) { return .held(remaining: held) }
            if let unlessNewerThan, let t = s.tokens[id], t.expiresAt > now.unixSeconds,
                t.expiresAt > unlessNewerThan
            {
                return .newerStored
            }
            if let openUntil = s.breakers[id]?.openUntil, now < openUntil { return .circuitOpen(until: openUntil) }
            return Self.setLease(&s, id, requestID: requestID, replicaID: replicaID, ttl: ttl, now: now)
                ? .taken : .busy
        }
    }

    /// Takes the lease with its pending request unless another holds it, as the scripts do.
    private static func setLease(
        _ s: inout State, _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, now: FlowTime
    ) -> Bool {
        if let lease = s.leases[id], now < lease.until { return false }
        s.leases[id] = Expiring(value: requestID, until: now + ttl)
        s.pending[Self.pendingKey(id, requestID)] = Expiring(value: replicaID, until: now + ttl)
        return true
    }

    public func takeLease(
        _ id: InstallationID, requestID: String, replicaID: String, ttl: Duration, respectingHold: Bool,
        unlessNewerThan: Int64?, material: TriggerMaterialQuery?
    ) async throws -> (outcome: TokenStoreLeaseOutcome, material: TriggerMaterialRead?) {
        let outcome = try await self.takeLease(
            id, requestID: requestID, replicaID: replicaID, ttl: ttl, respectingHold: respectingHold,
            unlessNewerThan: unlessNewerThan)
        try self.answer("takeLease")
        guard outcome == .taken, let material else { return (outcome, nil) }
        return (outcome, self.triggerMaterial(id, material))
    }

    @discardableResult
    public func extendLease(_ id: InstallationID, requestID: String, ttl: Duration) async throws -> Bool {
        await self.pass(.extendLease)
        await self.travel()
        try self.call("extendLease")
        let now = self.now()
        return self.state.withLock { s in
            guard let lease = s.leases[id], lease.value == requestID, now < lease.until else { return false }
            // Only lengthens, as the Redis script does.
            s.leases[id]?.until = max(lease.until, now + ttl)
            if let pending = s.pending[Self.pendingKey(id, requestID)] {
                s.pending[Self.pendingKey(id, requestID)]?.until = max(pending.until, now + ttl)
            }
            return true
        }
    }

    public func releaseLease(_ id: InstallationID, requestID: String) async throws {
        await self.travel()
        try self.call("releaseLease")
        self.state.withLock { s in
            if s.leases[id]?.value == requestID { s.leases[id] = nil }
            s.pending[Self.pendingKey(id, requestID)] = nil
        }
    }

    public func placeHold(_ id: InstallationID, requestID: String, duration: Duration, releasingLease: Bool)
        async throws
    {
        await self.pass(.placeHold)
        await self.travel()
        try self.call("placeHold")
        let now = self.now()
        self.state.withLock { s in
            s.holds[id] = Expiring(value: requestID, until: now + duration)
            if releasingLease {
                if s.leases[id]?.value == requestID { s.leases[id] = nil }
                s.pending[Self.pendingKey(id, requestID)] = nil
            }
        }
        self.publish(.holdPlaced(id))
    }

    public func roundProbe(_ id: InstallationID, requestID: String?) async throws -> TokenStoreProbe {
        await self.travel()
        try self.call("roundProbe")
        let now = self.now()
        return self.state.withLock { s in
            let pending = requestID.flatMap { s.pending[Self.pendingKey(id, $0)] }.flatMap { now < $0.until ? $0 : nil }
            return TokenStoreProbe(
                token: s.tokens[id].flatMap { $0.expiresAt > now.unixSeconds ? $0 : nil },
                apiBaseUrl: s.installations[id]?.apiBaseUrl,
                pendingOpen: pending.map { $0.value != Self.answered } ?? false,
                pendingAnswered: pending?.value == Self.answered, holdRemaining: Self.remaining(s.holds[id], now: now),
                uninstalled: s.installations[id]?.active == false)
        }
    }

    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime
    ) async throws -> FlowTime? {
        await self.travel()
        try self.call("recordRoundOutcome")
        return self.state.withLock { s in
            Self.record(
                &s, id, succeeded: succeeded, threshold: threshold, openBase: openBase, openCap: openCap, now: now)
        }
    }

    /// One step, as the Redis script does (counted as `recordRoundOutcomeReleasingLease`).
    public func recordRoundOutcome(
        _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration, openCap: Duration, now: FlowTime,
        releasingLease requestID: String
    ) async throws -> FlowTime? {
        await self.travel()
        try self.call("recordRoundOutcomeReleasingLease")
        return self.state.withLock { s in
            if s.leases[id]?.value == requestID { s.leases[id] = nil }
            s.pending[Self.pendingKey(id, requestID)] = nil
            return Self.record(
                &s, id, succeeded: succeeded, threshold: threshold, openBase: openBase, openCap: openCap, now: now)
        }
    }

    private static func record(
        _ s: inout State, _ id: InstallationID, succeeded: Bool, threshold: Int, openBase: Duration,
        openCap: Duration, now: FlowTime
    ) -> FlowTime? {
        guard !succeeded else {
            s.breakers[id] = nil
            return nil
        }
        var breaker = s.breakers[id] ?? Breaker()
        breaker.failures += 1
        defer { s.breakers[id] = breaker }
        guard breaker.failures >= threshold else { return nil }
        breaker.opens += 1
        let window = min(openBase * (1 << min(breaker.opens - 1, 20)), openCap)
        breaker.openUntil = now + window
        return breaker.openUntil
    }

    public func notifications() -> AsyncStream<TokenStoreNotification> {
        let (stream, continuation) = AsyncStream.makeStream(of: TokenStoreNotification.self)
        let id = self.state.withLock { s -> UInt64 in
            s.nextSubscriber += 1
            s.subscribers[s.nextSubscriber] = continuation
            return s.nextSubscriber
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) }
        }
        continuation.yield(.subscribed)
        return stream
    }
}
