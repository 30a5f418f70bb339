import Logging
import Metrics
import Synchronization
import Testing

@testable import FlowEngine

/// Forge as the replicas see it: a trigger call delivers the token to one replica (at random, after
/// a random number of scheduling turns), then answers 2xx. A misbehaving Forge also fails calls
/// (2 in 10), answers 2xx without delivering (1 in 10), or delivers the stored token again (1 in 10).
/// An installation uninstalled has no trigger material: nothing is sent, as with the gateway's
/// trigger client, and a delivery already on its way is refused by the store.
private final class DeliveringTrigger: TriggerSender {
    let store: InMemoryTokenStore
    let clock: ManualFlowClock
    let seed: UInt64
    let misbehaves: Bool
    let replicas = Mutex<[TokenFlow]>([])
    let calls = Mutex(0)
    /// Trigger calls on their way now.
    let inFlight = Mutex(0)

    init(store: InMemoryTokenStore, clock: ManualFlowClock, seed: UInt64, misbehaves: Bool) {
        self.store = store
        self.clock = clock
        self.seed = seed
        self.misbehaves = misbehaves
    }

    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult {
        let call = self.calls.withLock { c -> Int in
            c += 1
            return c
        }
        guard self.store.isActive(installation) else { return .notSent }
        var random = SplitMix64(seed: self.seed &+ UInt64(call))
        self.inFlight.withLock { $0 += 1 }
        defer { self.inFlight.withLock { $0 -= 1 } }
        for _ in 0..<Int.random(in: 0..<200, using: &random) { await Task.yield() }
        let replicas = self.replicas.withLock { $0 }
        let flow = replicas[Int.random(in: 0..<replicas.count, using: &random)]
        let behaviour = self.misbehaves ? Int.random(in: 0..<10, using: &random) : 9
        if behaviour < 2 { return .failed(random.pick([.httpError, .transportError, .timeout])) }
        if behaviour == 2 { return .accepted }
        // The delivery route of that replica: noted, stored (and announced), handed to its flow.
        // Each round trip's token expires later than the one before it, unless Forge hands out
        // the stored one again.
        let again = behaviour == 3 ? self.store.token(installation) : nil
        let expiresAt = again?.expiresAt ?? self.clock.now().unixSeconds + 3600 + Int64(call)
        self.deliver(
            again?.value ?? "tok-\(call)", expiresAt: expiresAt, to: flow, installation: installation,
            requestID: requestID)
        for _ in 0..<Int.random(in: 0..<10, using: &random) { await Task.yield() }
        return .accepted
    }

    /// `pushes` tokens pushed unasked (a scheduled trigger), each to a random replica at a random
    /// moment, and each expiring later than any round trip's.
    func push(_ pushes: Int, installation: InstallationID) async {
        var random = SplitMix64(seed: self.seed &+ 0x9054)
        for k in 0..<pushes {
            for _ in 0..<Int.random(in: 0..<150, using: &random) { await Task.yield() }
            let replicas = self.replicas.withLock { $0 }
            let flow = replicas[Int.random(in: 0..<replicas.count, using: &random)]
            self.deliver(
                "push-\(k)", expiresAt: self.clock.now().unixSeconds + 5000 + Int64(k), to: flow,
                installation: installation, requestID: nil)
        }
    }

    /// The delivery route of `flow`'s replica: noted, stored (and announced), handed to its flow.
    private func deliver(
        _ value: String, expiresAt: Int64, to flow: TokenFlow, installation: InstallationID, requestID: String?
    ) {
        if let requestID { flow.deliveryArriving(installation, requestID: requestID) }
        let (stored, solicited) = self.store.deliver(
            installation, token: value, expiresAt: expiresAt, requestID: requestID)
        guard stored else { return }
        let rid = solicited ? requestID : nil
        flow.tokenDelivered(
            installation,
            token: AccessToken(
                value: value, expiresAt: expiresAt, requestID: rid, receivedAt: self.clock.now().unixSeconds),
            solicitedBy: rid)
    }
}

/// Replicas on one store, callers on each arriving at scattered moments while rounds run: however
/// the steps interleave, the callers are answered, one trigger call serves plain callers, and no
/// lease is left behind.
@Suite("Replicas on one store: whatever the interleaving", .timeLimit(.minutes(1)))
struct TokenFlowTwoReplicaTests {
    static let id = InstallationID("ari:cloud:ecosystem::installation/5d2e8f41-3b6a-4c8e-9f10-2a7b3c4d5e6f")!

    typealias Caller = Interleaving.Caller

    @Test("callers on two replicas, scattered in time: one trigger call, one token, no lease left", arguments: 0..<200)
    func oneRoundTrip(seed: Int) async throws {
        let callers = Interleaving.plainCallers(12, seed: UInt64(seed), spread: 60)
        let run = try await Self.run(replicas: 2, callers: callers, seed: seed)
        #expect(run.failures.isEmpty)
        #expect(run.tokens.count == 12)
        #expect(Set(run.tokens).count == 1)
        #expect(run.calls == 1)
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "forced refreshes and long minValidity among the callers of three replicas: every caller answered, no lease left",
        arguments: 0..<200)
    func everyCallerAnswered(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0x5EED)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed)
        #expect(run.failures.isEmpty)
        #expect(run.tokens.count == 18)
        // A forced refresh never gets back the token the store held when it asked.
        run.expectForcedRefreshesGotNewTokens()
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "Forge failing, not delivering or handing out the stored token at random: every caller gets its answer by its deadline",
        arguments: 0..<200)
    func everyCallerAnsweredByItsDeadline(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0xF0F0)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed, misbehaving: true)
        #expect(run.tokens.count + run.failures.count == 18)
        // Forge's misbehaviour is all a caller can see: no store error, no cancellation.
        let expected: Set<FlowError.Code> = [.tokenTimeout, .triggerFailed, .circuitOpen]
        #expect(run.failures.allSatisfy { expected.contains($0.code) }, "\(run.failures)")
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
        #expect(run.tokens.count + run.failures.count == 18)
        #expect(run.failures.count <= callers.filter { $0.leavesAfter != nil }.count)
        #expect(run.failures.allSatisfy { $0.code == .cancelled }, "\(run.failures)")
        run.expectForcedRefreshesGotNewTokens()
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "tokens pushed unasked at random moments, later than any round trip's, among the callers of three replicas: every caller answered, no lease left",
        arguments: 0..<200)
    func pushesAmongRounds(seed: Int) async throws {
        let callers = Interleaving.mixedCallers(seed: UInt64(seed) &+ 0x9054)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed, pushes: 3)
        // A round trip that ends after a push brings no newer token: its callers get the pushed
        // one (a forced refresh too, as the contract says), so no forced-refresh check here.
        #expect(run.failures.isEmpty, "\(run.failures)")
        #expect(run.tokens.count == 18)
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
        // A caller answered before its replica heard of the uninstall gets a token; the others 410
        // (a round in flight ends with it too: by the notice, or by its re-read when that was lost).
        #expect(run.tokens.count + run.failures.count == 18)
        #expect(run.failures.allSatisfy { $0.code == .installationUninstalled }, "\(run.failures)")
        #expect(run.leaseLeft == nil)
        // Once each replica's subscription is up again (with notices lost, after the reconnection
        // that ends the loss), every replica answers 410 and calls nobody.
        #expect(run.afterward.count == 3)
        #expect(run.afterward.allSatisfy { $0?.code == .installationUninstalled }, "\(run.afterward)")
        #expect(run.callsAfterward == 0)
    }

    typealias Answer = Interleaving.Answer
    typealias Run = Interleaving.Run<FlowError>

    /// `replicas` flows on one in-memory store and a manual clock, caller `i` on replica
    /// `i % replicas`. Odd seeds lose every announcement (as while the replicas' subscriptions
    /// reconnect), so followers learn of tokens only by their re-reads; each store call is a round
    /// trip of up to 0–30 scheduling turns.
    /// `uninstallAfter`: the installation is uninstalled this many scheduling turns after the
    /// start; once the callers are answered, the replicas' subscriptions come up again (ending any
    /// loss of announcements) and each replica is asked once more (``Run/afterward``).
    static func run(
        replicas: Int, callers: [Caller], seed: Int, misbehaving: Bool = false, pushes: Int = 0,
        uninstallAfter: Int? = nil
    ) async throws -> Run {
        let clock = ManualFlowClock()
        let store = InMemoryTokenStore(now: { clock.now() })
        store.install(Self.id)
        store.dropsNotifications = seed % 2 == 1
        store.callTurns = (seed / 2) % 31
        let trigger = DeliveringTrigger(
            store: store, clock: clock, seed: UInt64(seed) &* 7919, misbehaves: misbehaving)
        let flows = (0..<replicas).map { index in
            TokenFlow(
                configuration: TokenFlowConfiguration(), store: store, trigger: trigger,
                metrics: FlowMetrics(factory: NOOPMetricsHandler.instance),
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }),
                replicaID: "replica-\(index)", clock: clock)
        }
        trigger.replicas.withLock { $0 = flows }
        return try await withThrowingTaskGroup(of: Void.self) { running in
            for flow in flows { running.addTask { try await flow.run() } }
            while flows.contains(where: { $0.subscriptionsHandled == 0 }) { await Task.yield() }
            running.addTask { await trigger.push(pushes, installation: Self.id) }
            let uninstalling = Task {
                guard let uninstallAfter else { return }
                for _ in 0..<uninstallAfter { await Task.yield() }
                store.uninstall(Self.id)
            }
            let answers = await Interleaving.answers(
                callers, clock: clock, seed: UInt64(seed), steps: misbehaving ? 400 : 150,
                busy: { store.callsInFlight > 0 || trigger.inFlight.withLock { $0 } > 0 }
            ) { index, caller -> Result<Answer, FlowError> in
                let stored = store.token(Self.id)?.value
                let request = TokenFlow.Request(minValidity: caller.minValidity ?? 300, forceRefresh: caller.forced)
                do {
                    let token = try await flows[index % flows.count].token(for: Self.id, request: request).token
                    return .success(Answer(token: token.value, forced: caller.forced, replaced: stored))
                } catch let error as FlowError {
                    return .failure(error)
                } catch {
                    return .failure(FlowError(code: .cancelled, detail: "\(error)"))
                }
            }
            var run = Run(answers)
            // Every caller is answered: the lease goes back (with the round's verdict, or at once
            // when a take won it for a round already over). Shutting down would release a lease
            // left, so it is read before.
            for _ in 0..<20_000 where store.leaseOwner(Self.id) != nil { await Task.yield() }
            if store.leaseOwner(Self.id) != nil,
                flows.contains(where: { $0.roundState(Self.id) == .awaitingDelivery && $0.waiterCount(Self.id) == 0 })
            {
                // A round whose callers are gone sees its trigger call through: one that answered
                // 2xx without a delivery keeps the lease until its delivery grace runs out (the only
                // lease allowed to outlive the callers).
                clock.advance(by: TokenFlowConfiguration().deliveryGrace)
                for _ in 0..<20_000 where store.leaseOwner(Self.id) != nil { await Task.yield() }
            }
            run.leaseLeft = store.leaseOwner(Self.id)
            await uninstalling.value
            if uninstallAfter != nil {
                store.dropsNotifications = false
                store.resubscribe()
                while flows.contains(where: { $0.subscriptionsHandled < 2 }) { await Task.yield() }
                let calls = trigger.calls.withLock { $0 }
                for flow in flows {
                    do {
                        _ = try await flow.token(for: Self.id, request: TokenFlow.Request())
                        run.afterward.append(nil)
                    } catch {
                        run.afterward.append(error as? FlowError)
                    }
                }
                run.callsAfterward = trigger.calls.withLock { $0 } - calls
            }
            for flow in flows { await flow.shutdown() }
            try await running.waitForAll()
            run.calls = trigger.calls.withLock { $0 }
            return run
        }
    }
}
