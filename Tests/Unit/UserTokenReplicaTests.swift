import Logging
import Metrics
import Synchronization
import Testing

@testable import FlowEngine
@testable import TokenGateway

/// Atlassian's user-token exchange as the replicas see it: each call answers after a random number
/// of scheduling turns with a new token (`utok-<n>`, each one expiring later than the one before).
/// A misbehaving exchange also fails calls at random (3 in 10: a 503, a timeout, a reset).
private final class RandomExchange: UserTokenExchangeCall {
    let seed: UInt64
    let misbehaves: Bool
    let calls = Mutex(0)
    /// Exchange calls on their way now.
    let inFlight = Mutex(0)

    init(seed: UInt64, misbehaves: Bool) {
        self.seed = seed
        self.misbehaves = misbehaves
    }

    func exchange(systemToken: String, context: SiteContext, accountId: UserAccountID, timeout: Duration) async
        -> OfflineUserAuthTokenClient.Outcome
    {
        let call = self.calls.withLock { c -> Int in
            c += 1
            return c
        }
        var random = SplitMix64(seed: self.seed &+ UInt64(call))
        self.inFlight.withLock { $0 += 1 }
        for _ in 0..<Int.random(in: 0..<200, using: &random) { await Task.yield() }
        self.inFlight.withLock { $0 -= 1 }
        if self.misbehaves, random.chance(0.3) {
            return .failed(random.pick([.httpError(status: 503), .timeout, .transportError]))
        }
        return .token(value: "utok-\(call)", ttl: 3600 + Int64(call))
    }
}

/// User-token exchangers of several replicas on one store, callers on each arriving at scattered
/// moments while exchanges run: however the steps interleave, the callers are answered, one
/// exchange serves plain callers, and no exchange lease is left behind.
@Suite("User-token exchangers on one store: whatever the interleaving", .timeLimit(.minutes(1)))
struct UserTokenReplicaTests {
    static let installation = InstallationID("ari:cloud:ecosystem::installation/7a3c9e52-4d1b-4f6a-8b20-3c4d5e6f7a8b")!
    static let cloud = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
    static let account = UserAccountID("557058:replica-user")!

    typealias Caller = Interleaving.Caller

    @Test(
        "callers on two replicas, scattered in time: one exchange, one token, no lease left", arguments: 0..<200)
    func oneExchange(seed: Int) async throws {
        let callers = Interleaving.plainCallers(12, seed: UInt64(seed), spread: 60)
        let run = try await Self.run(replicas: 2, callers: callers, seed: seed)
        #expect(run.failures.isEmpty, "\(run.failures)")
        #expect(run.answers.count == 12)
        #expect(Set(run.tokens).count == 1)
        #expect(run.calls == 1)
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "forced refreshes and long minValidity among the callers of three replicas: every caller answered with a token it accepts, no lease left",
        arguments: 0..<200)
    func everyCallerAnswered(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0x5EED)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed)
        #expect(run.failures.isEmpty, "\(run.failures)")
        #expect(run.answers.count == 18)
        // A forced refresh never gets back the token the store held when it asked.
        run.expectForcedRefreshesGotNewTokens()
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "an exchange failing at random: every caller gets a token or its failure by its deadline, no lease left",
        arguments: 0..<200)
    func everyCallerAnsweredByItsDeadline(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0xF0F0)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed, misbehaving: true)
        #expect(run.answers.count + run.failures.count == 18)
        // The exchange's failures are all a caller can see: no store error, no cancellation.
        let expected: Set<UserTokenError> = [.timeout, .exchangeFailed("")]
        #expect(run.failures.allSatisfy { expected.contains($0) }, "\(run.failures)")
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "callers going away at random moments among the callers of three replicas: the others answered, no lease left",
        arguments: 0..<200)
    func callersLeaving(seed: Int) async throws {
        let callers = Interleaving.leavingCallers(seed: UInt64(seed) &+ 0xC0DE)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed)
        // A caller that went away got `cancelled` (or its token, when that came first); the others
        // got a token.
        #expect(run.answers.count + run.failures.count == 18)
        #expect(run.failures.count <= callers.filter { $0.leavesAfter != nil }.count)
        let cancelled = UserTokenError.flow(FlowError(code: .cancelled, detail: nil))
        #expect(run.failures.allSatisfy { $0 == cancelled }, "\(run.failures)")
        run.expectForcedRefreshesGotNewTokens()
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "the installation uninstalled at a random moment among the callers of three replicas: a token or 410 for each, no lease left, 410 on every replica after",
        arguments: 0..<200)
    func uninstallAmongRounds(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0x0410)
        var random = SplitMix64(seed: UInt64(seed) &+ 0x0411)
        let run = try await Self.run(
            replicas: 3, callers: callers, seed: seed, uninstallAfter: Int.random(in: 0..<400, using: &random))
        // A caller answered before the uninstall reached the store's reads gets a token; the
        // others 410 (an exchange in flight too: its token is not stored for a gone installation).
        let gone = UserTokenError.flow(.installationUninstalled)
        #expect(run.answers.count + run.failures.count == 18)
        #expect(run.failures.allSatisfy { $0 == gone }, "\(run.failures)")
        #expect(run.leaseLeft == nil)
        // Afterwards every replica answers 410 and calls nobody.
        #expect(run.afterward.count == 3)
        #expect(run.afterward.allSatisfy { $0 == gone }, "\(run.afterward)")
        #expect(run.callsAfterward == 0)
    }

    typealias Answer = Interleaving.Answer
    typealias Run = Interleaving.Run<UserTokenError>

    /// `replicas` exchangers on one in-memory store, one system-token source and a manual clock.
    /// Odd seeds lose every notice (pub/sub delivers at most once), so followers learn of tokens
    /// only by their re-reads; each store call is a round trip of 0–30 scheduling turns.
    /// `uninstallAfter`: the installation is uninstalled this many scheduling turns after the
    /// start; once the callers are answered, each replica is asked once more (``Run/afterward``).
    static func run(
        replicas: Int, callers: [Caller], seed: Int, misbehaving: Bool = false, uninstallAfter: Int? = nil
    ) async throws -> Run {
        let clock = ManualFlowClock()
        let store = InMemoryUserTokenStore(clock: clock)
        store.install(
            Self.installation,
            .init(apiBaseUrl: "https://api.atlassian.com/ex/jira/\(Self.cloud)", cloudId: Self.cloud))
        store.dropsNotices = seed % 2 == 1
        store.callTurns = (seed / 2) % 31
        let client = RandomExchange(seed: UInt64(seed) &* 7919, misbehaves: misbehaving)
        let systemTokens = StubSystemTokens(clock: clock)
        let exchangers = (0..<replicas).map { _ in
            UserTokenExchanger(
                configuration: .init(), store: store, systemTokens: systemTokens, client: client,
                metrics: UserExchangeMetrics(factory: NOOPMetricsHandler.instance),
                audit: AuditLog(logger: Logger(label: "test.audit", factory: { _ in SwiftLogNoOpLogHandler() })),
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }),
                clock: clock, jitter: { 0.5 })
        }
        return try await withThrowingTaskGroup(of: Void.self) { running in
            for exchanger in exchangers { running.addTask { try await exchanger.run() } }
            while store.watcherCount < replicas { await Task.yield() }
            let uninstalling = Task {
                guard let uninstallAfter else { return }
                for _ in 0..<uninstallAfter { await Task.yield() }
                store.uninstall(Self.installation)
            }
            let outcomes = await Interleaving.answers(
                callers, clock: clock, seed: UInt64(seed), steps: misbehaving ? 400 : 150,
                busy: { store.callsInFlight > 0 || client.inFlight.withLock { $0 } > 0 }
            ) { index, caller -> Result<Answer, UserTokenError> in
                let stored = store.storedToken(Self.installation, accountId: Self.account.value)
                let request = UserTokenExchanger.Request(
                    minValidity: caller.minValidity ?? 300, forceRefresh: caller.forced)
                do {
                    let answer = try await exchangers[index % exchangers.count].token(
                        for: Self.installation, accountId: Self.account, request: request)
                    return .success(
                        Answer(token: answer.token.value, forced: caller.forced, replaced: stored?.value))
                } catch let error as UserTokenError {
                    return .failure(error)
                } catch {
                    return .failure(.flow(FlowError(code: .cancelled, detail: "\(error)")))
                }
            }
            var run = Run(outcomes)
            // Every caller is answered: the leases go back (a lease given up goes before its
            // callers' answers; one won for a round already over, just after). Shutting down would
            // release any lease left, so it is read before.
            for _ in 0..<20_000 where store.leaseOwner(Self.installation, accountId: Self.account.value) != nil {
                await Task.yield()
            }
            run.leaseLeft = store.leaseOwner(Self.installation, accountId: Self.account.value)
            await uninstalling.value
            if uninstallAfter != nil {
                let calls = client.calls.withLock { $0 }
                for exchanger in exchangers {
                    do {
                        _ = try await exchanger.token(
                            for: Self.installation, accountId: Self.account, request: .init())
                        run.afterward.append(nil)
                    } catch {
                        run.afterward.append(error as? UserTokenError)
                    }
                }
                run.callsAfterward = client.calls.withLock { $0 } - calls
            }
            running.cancelAll()
            try await running.waitForAll()
            run.calls = client.calls.withLock { $0 }
            return run
        }
    }
}
