import Synchronization

@testable import FlowEngine
@testable import TokenGateway

/// A ``UserTokenStore`` in memory, on a ``ManualFlowClock``: expiries follow the clock, and
/// every store, refusal and lease release is announced to the watchers like the Redis store does.
final class InMemoryUserTokenStore: UserTokenStore {
    struct Installation {
        var status: InstallationStatus = .active
        var apiBaseUrl: String?
        var cloudId: String?
    }

    private struct Key: Hashable {
        let installation: InstallationID
        let accountId: String
    }

    private struct State {
        var installations: [InstallationID: Installation] = [:]
        var tokens: [Key: (token: AccessToken, until: FlowTime)] = [:]
        var denied: [Key: FlowTime] = [:]
        var leases: [Key: (owner: String, until: FlowTime)] = [:]
        var exchangeLog: [String: [FlowTime]] = [:]
        var blocked: [String: FlowTime] = [:]
        var watchers: [UInt64: AsyncStream<UserTokenNotice>.Continuation] = [:]
        var nextWatcher: UInt64 = 0
        var watcherWaiters: [CheckedContinuation<Void, Never>] = []
        var leaseAttempts = 0
        var unreachable = false
        /// Stored just before the next lease is taken, without a notice: another process finished.
        var finishedElsewhere: AccessToken?
        /// While not nil, lease takes wait here (in flight) until released.
        var leaseGate: [CheckedContinuation<Void, Never>]?
        var turns = CallTurns()
        var inFlight = 0
        var dropsNotices = false
        /// The next lease take happens, then its answer is lost (a timeout after the command ran).
        var losesNextLeaseAnswer = false
    }

    struct Unreachable: Error {}

    let clock: ManualFlowClock
    private let state = Mutex(State())

    init(clock: ManualFlowClock) {
        self.clock = clock
    }

    // MARK: Test controls

    func install(_ id: InstallationID, _ installation: Installation) {
        self.state.withLock { $0.installations[id] = installation }
    }

    /// Marks the installation uninstalled and deletes its users' tokens and refusals, then
    /// announces it, as the gateway's uninstall script does.
    func uninstall(_ id: InstallationID) {
        self.state.withLock { s in
            s.installations[id, default: Installation()].status = .uninstalled
            s.tokens = s.tokens.filter { $0.key.installation != id }
            s.denied = s.denied.filter { $0.key.installation != id }
        }
        self.announce(.uninstalled(id))
    }

    /// Marks the installation uninstalled without announcing it: an uninstall whose announcement
    /// this process has not heard (yet).
    func uninstallUnannounced(_ id: InstallationID) {
        self.state.withLock { s in s.installations[id, default: Installation()].status = .uninstalled }
    }

    /// Another process holds the user's lease for `ttl`.
    func holdLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) {
        let until = self.clock.now() + ttl
        self.state.withLock { $0.leases[Key(installation: id, accountId: accountId)] = (owner, until) }
    }

    func leaseOwner(_ id: InstallationID, accountId: String) -> String? {
        let now = self.clock.now()
        return self.state.withLock { s in
            s.leases[Key(installation: id, accountId: accountId)].flatMap { $0.until > now ? $0.owner : nil }
        }
    }

    var leaseAttempts: Int { self.state.withLock { $0.leaseAttempts } }

    /// The user's token as a snapshot would read it now.
    func storedToken(_ id: InstallationID, accountId: String) -> AccessToken? {
        let now = self.clock.now()
        return self.state.withLock { s in
            s.tokens[Key(installation: id, accountId: accountId)].flatMap { $0.until > now ? $0.token : nil }
        }
    }

    /// Lease takes from now on wait, as calls in flight, until ``releaseLeaseTakes()``.
    func holdLeaseTakes() {
        self.state.withLock { s in if s.leaseGate == nil { s.leaseGate = [] } }
    }

    /// Lets the lease takes held by ``holdLeaseTakes()`` go on, and those after them at once.
    func releaseLeaseTakes() {
        let held = self.state.withLock { s -> [CheckedContinuation<Void, Never>] in
            defer { s.leaseGate = nil }
            return s.leaseGate ?? []
        }
        for take in held { take.resume() }
    }

    /// Answers to token writes: while held, a token is written (and announced), and then the
    /// answer to the process that stored it waits, as a call in flight, until released.
    let storeAnswers = TestGate()

    /// Lease releases: while held, a release waits, as a call in flight, before it takes effect.
    let releases = TestGate()

    /// Lease extensions: while held, an extension waits, as a call in flight, before it runs.
    let extensions = TestGate()

    /// Snapshot reads: while held, a read waits, as a call in flight, before it reads.
    let snapshots = TestGate()

    /// How many lease takes wait for ``releaseLeaseTakes()``.
    var leaseTakesHeld: Int { self.state.withLock { $0.leaseGate?.count ?? 0 } }

    /// Returns once someone watches the store's notices.
    func waitForWatcher() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ready = self.state.withLock { s -> Bool in
                if !s.watchers.isEmpty { return true }
                s.watcherWaiters.append(continuation)
                return false
            }
            if ready { continuation.resume() }
        }
    }

    /// Another process stores `token` (and lets its lease go) just before this one takes the lease.
    func finishElsewhereBeforeNextLease(_ token: AccessToken) {
        self.state.withLock { $0.finishedElsewhere = token }
    }

    /// Another process stores `token` and its notice is lost (Redis pub/sub drops messages on a
    /// reconnect): only a later read sees it.
    func storeWithoutNotice(_ id: InstallationID, accountId: String, token: AccessToken, cacheUntil: Int64) {
        let key = Key(installation: id, accountId: accountId)
        self.state.withLock { $0.tokens[key] = (token, FlowTime(unixSeconds: cacheUntil)) }
    }

    /// Tells the watchers their subscription is back (a resync), as the Redis store does after a
    /// reconnection.
    func resubscribe() {
        self.announce(.resync)
    }

    func setUnreachable(_ unreachable: Bool) {
        self.state.withLock { $0.unreachable = unreachable }
    }

    /// At most how many scheduling turns each store call takes before it acts (``CallTurns``).
    var callTurns: Int {
        get { self.state.withLock { $0.turns.limit } }
        set { self.state.withLock { $0.turns.limit = newValue } }
    }

    /// While true, no notice reaches the watchers (pub/sub delivers at most once).
    var dropsNotices: Bool {
        get { self.state.withLock { $0.dropsNotices } }
        set { self.state.withLock { $0.dropsNotices = newValue } }
    }

    /// The next lease take is made, then throws as if its answer were lost.
    func loseNextLeaseAnswer() {
        self.state.withLock { $0.losesNextLeaseAnswer = true }
    }

    /// How many watch the store's notices now.
    var watcherCount: Int { self.state.withLock { $0.watchers.count } }

    /// Checks the store is reachable, after up to ``callTurns`` scheduling turns of travel.
    private func check() async throws {
        let turns = self.state.withLock { s -> Int in
            s.inFlight += 1
            return s.turns.next()
        }
        for _ in 0..<turns { await Task.yield() }
        self.state.withLock { $0.inFlight -= 1 }
        if self.state.withLock({ $0.unreachable }) { throw Unreachable() }
    }

    /// Calls on their way to the store now (a test that moves the manual clock holds it while any
    /// is: a round trip takes scheduling turns, not clock time).
    var callsInFlight: Int { self.state.withLock { $0.inFlight } }

    private func announce(_ notice: UserTokenNotice) {
        let watchers = self.state.withLock { $0.dropsNotices ? [] : Array($0.watchers.values) }
        for watcher in watchers { watcher.yield(notice) }
    }

    // MARK: UserTokenStore

    func snapshot(_ id: InstallationID, accountId: String, timeout: Duration?) async throws -> UserTokenSnapshot {
        await self.snapshots.pass()
        try await self.check()
        let now = self.clock.now()
        let key = Key(installation: id, accountId: accountId)
        return self.state.withLock { s in
            let installation = s.installations[id]
            return UserTokenSnapshot(
                exists: installation != nil, status: installation?.status ?? .active,
                apiBaseUrl: installation?.apiBaseUrl, cloudId: installation?.cloudId,
                token: s.tokens[key].flatMap { $0.until > now ? $0.token : nil },
                deniedFor: s.denied[key].flatMap { $0 > now ? $0 - now : nil },
                leaseRemaining: s.leases[key].flatMap { $0.until > now ? $0.until - now : nil })
        }
    }

    func store(
        _ id: InstallationID, accountId: String, token: AccessToken, cacheUntil: Int64, now: FlowTime
    ) async throws -> UserTokenStoreOutcome {
        try await self.check()
        let key = Key(installation: id, accountId: accountId)
        let outcome = self.state.withLock { s -> UserTokenStoreOutcome in
            if s.installations[id]?.status == .uninstalled { return .uninstalled }
            s.denied[key] = nil
            guard cacheUntil > now.unixSeconds else { return .tooShortLived }
            s.tokens[key] = (token, FlowTime(unixSeconds: cacheUntil))
            return .stored
        }
        if outcome == .stored { self.announce(.user(id, accountId: accountId)) }
        await self.storeAnswers.pass()
        return outcome
    }

    @discardableResult
    func rememberDenial(_ id: InstallationID, accountId: String, for duration: Duration) async throws -> Bool {
        try await self.check()
        let until = self.clock.now() + duration
        let key = Key(installation: id, accountId: accountId)
        let done = self.state.withLock { s -> Bool in
            if s.installations[id]?.status == .uninstalled { return false }
            s.denied[key] = until
            s.tokens[key] = nil
            return true
        }
        if done { self.announce(.user(id, accountId: accountId)) }
        return done
    }

    func acquireLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws -> Bool {
        await withCheckedContinuation { (take: CheckedContinuation<Void, Never>) in
            let waits = self.state.withLock { s -> Bool in
                guard s.leaseGate != nil else { return false }
                s.leaseGate?.append(take)
                return true
            }
            if !waits { take.resume() }
        }
        try await self.check()
        let now = self.clock.now()
        let key = Key(installation: id, accountId: accountId)
        let (won, lost) = self.state.withLock { s -> (Bool, Bool) in
            s.leaseAttempts += 1
            if let token = s.finishedElsewhere {
                s.tokens[key] = (token, FlowTime(unixSeconds: token.expiresAt))
                s.finishedElsewhere = nil
            }
            let lost = s.losesNextLeaseAnswer
            s.losesNextLeaseAnswer = false
            if let lease = s.leases[key], lease.until > now { return (false, lost) }
            s.leases[key] = (owner, now + ttl)
            return (true, lost)
        }
        if lost { throw Unreachable() }
        return won
    }

    @discardableResult
    func extendLease(_ id: InstallationID, accountId: String, owner: String, ttl: Duration) async throws -> Bool {
        await self.extensions.pass()
        try await self.check()
        let now = self.clock.now()
        let key = Key(installation: id, accountId: accountId)
        return self.state.withLock { s in
            guard let lease = s.leases[key], lease.owner == owner, lease.until > now else { return false }
            // As the Redis script: only lengthens.
            s.leases[key] = (owner, max(lease.until, now + ttl))
            return true
        }
    }

    @discardableResult
    func releaseLease(_ id: InstallationID, accountId: String, owner: String) async throws -> Bool {
        await self.releases.pass()
        try await self.check()
        let key = Key(installation: id, accountId: accountId)
        let released = self.state.withLock { s -> Bool in
            guard s.leases[key]?.owner == owner else { return false }
            s.leases[key] = nil
            return true
        }
        if released { self.announce(.user(id, accountId: accountId)) }
        return released
    }

    func admitExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission
    {
        try await self.admission(scope: scope, limit: limit, window: window, now: now, recording: true)
    }

    func peekExchange(scope: String, limit: Int, window: Duration, now: FlowTime) async throws
        -> UserExchangeAdmission
    {
        try await self.admission(scope: scope, limit: limit, window: window, now: now, recording: false)
    }

    /// The sliding-log budget, as the Redis script keeps it; `recording` counts the exchange.
    private func admission(scope: String, limit: Int, window: Duration, now: FlowTime, recording: Bool)
        async throws -> UserExchangeAdmission
    {
        try await self.check()
        return self.state.withLock { s in
            if let blocked = s.blocked[scope], blocked > now { return .refused(retryAfter: blocked - now) }
            let log = (s.exchangeLog[scope] ?? []).filter { $0 > now - window }
            if log.count >= limit { return .refused(retryAfter: max(log[0] + window - now, .milliseconds(1))) }
            if recording { s.exchangeLog[scope] = log + [now] }
            return .admitted
        }
    }

    func blockExchanges(scope: String, for duration: Duration) async throws {
        try await self.check()
        let until = self.clock.now() + duration
        self.state.withLock { s in s.blocked[scope] = max(s.blocked[scope] ?? until, until) }
    }

    func exchangesUsed(scope: String, window: Duration, now: FlowTime) async throws -> Int {
        self.state.withLock { s in (s.exchangeLog[scope] ?? []).filter { $0 > now - window }.count }
    }

    func watch(_ handle: @Sendable (UserTokenNotice) async -> Void) async {
        let (stream, continuation) = AsyncStream.makeStream(of: UserTokenNotice.self)
        let (id, waiting) = self.state.withLock { s -> (UInt64, [CheckedContinuation<Void, Never>]) in
            s.nextWatcher += 1
            s.watchers[s.nextWatcher] = continuation
            defer { s.watcherWaiters = [] }
            return (s.nextWatcher, s.watcherWaiters)
        }
        for waiter in waiting { waiter.resume() }
        continuation.onTermination = { _ in self.state.withLock { _ = $0.watchers.removeValue(forKey: id) } }
        for await notice in stream { await handle(notice) }
    }
}

/// Calls that pass it wait while it is held, until the test lets them go.
final class TestGate: Sendable {
    private let state = Mutex((holding: false, held: [CheckedContinuation<Void, Never>]()))

    /// Calls that pass from now on wait until ``release()``.
    func hold() { self.state.withLock { $0.holding = true } }

    /// Lets the waiting calls go on, and those after them pass at once.
    func release() {
        let held = self.state.withLock { gate -> [CheckedContinuation<Void, Never>] in
            gate.holding = false
            defer { gate.held = [] }
            return gate.held
        }
        for continuation in held { continuation.resume() }
    }

    /// Calls waiting now.
    var heldCount: Int { self.state.withLock { $0.held.count } }

    /// Returns at once, or when released while held.
    func pass() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let wait = self.state.withLock { gate -> Bool in
                if gate.holding { gate.held.append(continuation) }
                return gate.holding
            }
            if !wait { continuation.resume() }
        }
    }
}

/// The GraphQL exchange, answered from a script; a call can be held until the test lets it go.
final class ScriptedExchangeCall: UserTokenExchangeCall {
    private struct State {
        var answers: [OfflineUserAuthTokenClient.Outcome] = []
        var calls: [String] = []
        var callWatchers: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    private let state = Mutex(State())
    /// Held, the exchange calls wait until it is released.
    let gate = TestGate()

    /// Answers in order; the last one repeats.
    init(_ answers: [OfflineUserAuthTokenClient.Outcome]) {
        self.state.withLock { $0.answers = answers }
    }

    /// The system tokens of the calls made so far.
    var calls: [String] { self.state.withLock { $0.calls } }

    /// Calls wait in ``exchange(systemToken:context:accountId:timeout:)`` until ``release()``.
    func hold() { self.gate.hold() }

    func release() { self.gate.release() }

    /// Returns once `count` calls have been made.
    func waitForCalls(_ count: Int) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ready = self.state.withLock { s -> Bool in
                if s.calls.count >= count { return true }
                s.callWatchers.append((count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    func exchange(systemToken: String, context: SiteContext, accountId: UserAccountID, timeout: Duration) async
        -> OfflineUserAuthTokenClient.Outcome
    {
        let ready = self.state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.calls.append(systemToken)
            let count = s.calls.count
            let ready = s.callWatchers.filter { $0.count <= count }.map(\.continuation)
            s.callWatchers.removeAll { $0.count <= count }
            return ready
        }
        for watcher in ready { watcher.resume() }
        await self.gate.pass()
        return self.state.withLock { s in
            s.answers.count > 1 ? s.answers.removeFirst() : s.answers[0]
        }
    }
}

/// System tokens `sys-1`, `sys-2`, …: a new one on every forced refresh.
final class StubSystemTokens: SystemTokenSource {
    private let state = Mutex((generation: 1, forced: 0, requests: 0, failure: FlowError?.none))
    let clock: ManualFlowClock

    init(clock: ManualFlowClock) { self.clock = clock }

    var forcedRefreshes: Int { self.state.withLock { $0.forced } }
    /// System tokens asked for so far (each may cost a trigger round trip in the gateway).
    var requests: Int { self.state.withLock { $0.requests } }

    func fail(with error: FlowError) { self.state.withLock { $0.failure = error } }

    /// Another process got a fresh system token: the next fetch answers it without being forced.
    func renewElsewhere() { self.state.withLock { $0.generation += 1 } }

    /// Forced fetches wait (before they renew the token) until ``releaseForced()``.
    private let forcedGate = TestGate()

    func holdForced() { self.forcedGate.hold() }

    func releaseForced() { self.forcedGate.release() }

    /// Forced fetches waiting at the gate.
    var forcedHeld: Int { self.forcedGate.heldCount }

    /// How long each fetch takes on the manual clock (it is advanced by that much).
    let fetchTime = Mutex<Duration>(.zero)

    func systemToken(for installation: InstallationID, minValidity: Int64, timeout: Duration, forceRefresh: Bool)
        async throws(FlowError) -> AccessToken
    {
        if forceRefresh { await self.forcedGate.pass() }
        let (generation, failure) = self.state.withLock { s -> (Int, FlowError?) in
            s.requests += 1
            if forceRefresh {
                s.generation += 1
                s.forced += 1
            }
            return (s.generation, s.failure)
        }
        if let failure { throw failure }
        let fetchTime = self.fetchTime.withLock { $0 }
        if fetchTime > .zero { self.clock.advance(by: fetchTime) }
        return AccessToken(value: "sys-\(generation)", expiresAt: self.clock.now().unixSeconds + 3600)
    }
}
