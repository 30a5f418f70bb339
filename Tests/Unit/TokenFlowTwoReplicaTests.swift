import Logging
import Metrics
import Synchronization
import Testing

@testable import FlowEngine

/// Forge as two replicas see it: a trigger call delivers the token to one replica (at random, after
/// a random number of scheduling turns), then answers 2xx.
private final class DeliveringTrigger: TriggerSender {
    let store: InMemoryTokenStore
    let clock: ManualFlowClock
    let seed: UInt64
    let replicas = Mutex<[TokenFlow]>([])
    let calls = Mutex(0)

    init(store: InMemoryTokenStore, clock: ManualFlowClock, seed: UInt64) {
        self.store = store
        self.clock = clock
        self.seed = seed
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
        // The delivery route of that replica: noted, stored (and announced), handed to its flow.
        let expiresAt = self.clock.now().unixSeconds + 3600
        flow.deliveryArriving(installation, requestID: requestID)
        let value = "tok-\(call)"
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

/// Two replicas on one store, callers on both arriving at scattered moments while the round runs:
/// however the steps interleave, one trigger call serves them all, and no lease is left behind.
@Suite("Two replicas, one store: one round trip whatever the interleaving", .timeLimit(.minutes(1)))
struct TokenFlowTwoReplicaTests {
    static let id = InstallationID("ari:cloud:ecosystem::installation/5d2e8f41-3b6a-4c8e-9f10-2a7b3c4d5e6f")!

    @Test("callers on two replicas, scattered in time: one trigger call, one token, no lease left", arguments: 0..<200)
    func oneRoundTrip(seed: Int) async throws {
        let clock = ManualFlowClock()
        let store = InMemoryTokenStore(now: { clock.now() })
        store.install(Self.id)
        // Odd seeds lose every announcement (as while the replicas' subscriptions reconnect): the
        // followers learn of the token only by their re-reads.
        store.dropsNotifications = seed % 2 == 1
        // Each store call is a round trip of up to 0–30 scheduling turns, other work running meanwhile.
        store.callTurns = (seed / 2) % 31
        let trigger = DeliveringTrigger(store: store, clock: clock, seed: UInt64(seed) &* 7919)
        let flows = ["replica-a", "replica-b"].map { name in
            TokenFlow(
                configuration: TokenFlowConfiguration(), store: store, trigger: trigger,
                metrics: FlowMetrics(factory: NOOPMetricsHandler.instance),
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), replicaID: name,
                clock: clock)
        }
        trigger.replicas.withLock { $0 = flows }
        try await withThrowingTaskGroup(of: Void.self) { running in
            for flow in flows { running.addTask { try await flow.run() } }
            while store.subscriberCount < 2 { await Task.yield() }
            let tokens = await Self.callers(flows, clock: clock, seed: UInt64(seed))
            #expect(tokens.count == 12)
            #expect(Set(tokens).count == 1)
            #expect(trigger.calls.withLock { $0 } == 1)
            for flow in flows { await flow.shutdown() }
            try await running.waitForAll()
        }
        #expect(store.leaseOwner(Self.id) == nil)
    }

    /// Six callers on each replica, each starting after a random number of scheduling turns; the
    /// clock moves on in 50 ms steps (the followers' re-reads) until all are answered. Returns the
    /// tokens they got.
    private static func callers(_ flows: [TokenFlow], clock: ManualFlowClock, seed: UInt64) async -> [String] {
        await withTaskGroup(of: String?.self) { group in
            var random = SplitMix64(seed: seed)
            for i in 0..<12 {
                let flow = flows[i % 2]
                let delay = Int.random(in: 0..<60, using: &random)
                group.addTask {
                    for _ in 0..<delay { await Task.yield() }
                    return try? await flow.token(for: Self.id, request: .init()).token.value
                }
            }
            let pending = Mutex(12)
            group.addTask {
                // Follower re-reads come by the clock; bounded well below the callers' 10 s deadline.
                var turns = SplitMix64(seed: seed &+ 1)
                for _ in 0..<150 where pending.withLock({ $0 }) > 0 {
                    for _ in 0..<(1 + Int.random(in: 0..<30, using: &turns)) { await Task.yield() }
                    clock.advance(by: .milliseconds(50))
                }
                return nil
            }
            var tokens: [String] = []
            for await token in group {
                guard let token else { continue }
                tokens.append(token)
                pending.withLock { $0 -= 1 }
            }
            return tokens
        }
    }
}
