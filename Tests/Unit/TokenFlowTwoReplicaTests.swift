import Logging
import Metrics
import Synchronization
import Testing

@testable import FlowEngine

/// Forge as the replicas see it: a trigger call delivers the token to one replica (at random, after
/// a random number of scheduling turns), then answers 2xx. A misbehaving Forge also fails calls
/// (2 in 10), answers 2xx without delivering (1 in 10), or delivers the stored token again (1 in 10).
private final class DeliveringTrigger: TriggerSender {
    let store: InMemoryTokenStore
    let clock: ManualFlowClock
    let seed: UInt64
    let misbehaves: Bool
    let replicas = Mutex<[TokenFlow]>([])
    let calls = Mutex(0)

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
        var random = SplitMix64(seed: self.seed &+ UInt64(call))
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
        flow.deliveryArriving(installation, requestID: requestID)
        let value = again?.value ?? "tok-\(call)"
        let (stored, solicited) = self.store.deliver(
            installation, token: value, expiresAt: expiresAt, requestID: requestID)
        if stored {
            let rid = solicited ? requestID : nil
            flow.tokenDelivered(
                installation,
                token: AccessToken(
                    value: value, expiresAt: expiresAt, requestID: rid, receivedAt: self.clock.now().unixSeconds),
                solicitedBy: rid)
        }
        for _ in 0..<Int.random(in: 0..<10, using: &random) { await Task.yield() }
        return .accepted
    }
}

/// Replicas on one store, callers on each arriving at scattered moments while rounds run: however
/// the steps interleave, the callers are answered, one trigger call serves plain callers, and no
/// lease is left behind.
@Suite("Replicas on one store: whatever the interleaving", .timeLimit(.minutes(1)))
struct TokenFlowTwoReplicaTests {
    static let id = InstallationID("ari:cloud:ecosystem::installation/5d2e8f41-3b6a-4c8e-9f10-2a7b3c4d5e6f")!

    /// One caller: when it starts (scheduling turns after the test's start) and what it asks.
    struct Caller: Sendable {
        var delay: Int
        var request: TokenFlow.Request
    }

    @Test("callers on two replicas, scattered in time: one trigger call, one token, no lease left", arguments: 0..<200)
    func oneRoundTrip(seed: Int) async throws {
        var random = SplitMix64(seed: UInt64(seed))
        let callers = (0..<12).map { _ in Caller(delay: Int.random(in: 0..<60, using: &random), request: .init()) }
        let run = try await Self.run(replicas: 2, callers: callers, seed: seed)
        #expect(run.failures.isEmpty)
        #expect(run.tokens.count == 12)
        #expect(Set(run.tokens).count == 1)
        #expect(run.triggerCalls == 1)
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "forced refreshes and long minValidity among the callers of three replicas: every caller answered, no lease left",
        arguments: 0..<200)
    func everyCallerAnswered(seed: Int) async throws {
        let callers = Self.mixedCallers(seed: UInt64(seed) &+ 0x5EED)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed)
        #expect(run.failures.isEmpty)
        #expect(run.tokens.count == 18)
        #expect(run.leaseLeft == nil)
    }

    @Test(
        "Forge failing, not delivering or handing out the stored token at random: every caller gets its answer by its deadline",
        arguments: 0..<200)
    func everyCallerAnsweredByItsDeadline(seed: Int) async throws {
        let callers = Self.mixedCallers(seed: UInt64(seed) &+ 0xF0F0)
        let run = try await Self.run(replicas: 3, callers: callers, seed: seed, misbehaving: true)
        #expect(run.tokens.count + run.failures.count == 18)
        // Forge's misbehaviour is all a caller can see: no store error, no cancellation.
        let expected: Set<FlowError.Code> = [.tokenTimeout, .triggerFailed, .circuitOpen]
        #expect(run.failures.allSatisfy { expected.contains($0.code) }, "\(run.failures)")
        #expect(run.leaseLeft == nil)
    }

    /// Eighteen callers: one in five forces a refresh, and their `minValidity` ranges up to nearly
    /// the tokens' whole lifetime.
    static func mixedCallers(seed: UInt64) -> [Caller] {
        var random = SplitMix64(seed: seed)
        return (0..<18).map { _ in
            Caller(
                delay: Int.random(in: 0..<300, using: &random),
                request: .init(minValidity: random.pick([0, 60, 300, 3500]), forceRefresh: random.chance(0.2)))
        }
    }

    enum Answer: Sendable {
        case token(String)
        case failed(FlowError)
    }

    struct Run {
        var tokens: [String]
        var failures: [FlowError]
        var triggerCalls: Int
        var leaseLeft: String?
    }

    /// `replicas` flows on one in-memory store and a manual clock. Odd seeds lose every
    /// announcement (as while the replicas' subscriptions reconnect), so followers learn of tokens
    /// only by their re-reads; each store call is a round trip of up to 0–30 scheduling turns.
    static func run(replicas: Int, callers: [Caller], seed: Int, misbehaving: Bool = false) async throws -> Run {
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
                replicaID: "replica-\(index)",
                clock: clock)
        }
        trigger.replicas.withLock { $0 = flows }
        return try await withThrowingTaskGroup(of: Void.self) { running in
            for flow in flows { running.addTask { try await flow.run() } }
            while store.subscriberCount < replicas { await Task.yield() }
            var run = await Self.answers(
                flows, callers, clock: clock, seed: UInt64(seed), steps: misbehaving ? 400 : 150)
            for flow in flows { await flow.shutdown() }
            try await running.waitForAll()
            run.triggerCalls = trigger.calls.withLock { $0 }
            run.leaseLeft = store.leaseOwner(Self.id)
            return run
        }
    }

    /// Starts each caller on replica `index % replicas` after its delay; the clock moves on in 50 ms
    /// steps (the followers' re-reads, the retries' backoff) until all are answered, at most `steps`
    /// of them: 150 (7.5 s) stay below the callers' 10 s deadline, 400 (20 s) go past it.
    private static func answers(
        _ flows: [TokenFlow], _ callers: [Caller], clock: ManualFlowClock, seed: UInt64, steps: Int
    ) async -> Run {
        await withTaskGroup(of: Answer?.self) { group in
            for (index, caller) in callers.enumerated() {
                let flow = flows[index % flows.count]
                group.addTask {
                    for _ in 0..<caller.delay { await Task.yield() }
                    do {
                        return .token(try await flow.token(for: Self.id, request: caller.request).token.value)
                    } catch let error as FlowError {
                        return .failed(error)
                    } catch {
                        return .failed(FlowError(code: .cancelled, detail: "\(error)"))
                    }
                }
            }
            let pending = Mutex(callers.count)
            group.addTask {
                var turns = SplitMix64(seed: seed &+ 1)
                for _ in 0..<steps where pending.withLock({ $0 }) > 0 {
                    for _ in 0..<(1 + Int.random(in: 0..<30, using: &turns)) { await Task.yield() }
                    clock.advance(by: .milliseconds(50))
                }
                return nil
            }
            var run = Run(tokens: [], failures: [], triggerCalls: 0, leaseLeft: nil)
            for await answer in group {
                guard let answer else { continue }
                pending.withLock { $0 -= 1 }
                switch answer {
                case .token(let token): run.tokens.append(token)
                case .failed(let error): run.failures.append(error)
                }
            }
            return run
        }
    }
}
