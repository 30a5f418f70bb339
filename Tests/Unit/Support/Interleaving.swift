import Synchronization
import Testing

@testable import FlowEngine

/// The callers of the seeded interleaving tests (``TokenFlowTwoReplicaTests``,
/// ``UserTokenReplicaTests``) and the run that starts them while a manual clock moves on.
enum Interleaving {
    /// One caller: when it starts (scheduling turns after the test's start) and what it asks
    /// (nil `minValidity`: the request's default).
    struct Caller: Sendable {
        var delay: Int
        var minValidity: Int64?
        var forced = false
        /// Goes away (its task cancelled) this many scheduling turns after it asked, if set.
        var leavesAfter: Int?
    }

    /// `count` callers with the default request, starting within `spread` turns.
    static func plainCallers(_ count: Int, seed: UInt64, spread: Int) -> [Caller] {
        var random = SplitMix64(seed: seed)
        return (0..<count).map { _ in Caller(delay: Int.random(in: 0..<spread, using: &random)) }
    }

    /// Eighteen callers: one in five forces a refresh, and their `minValidity` ranges up to nearly
    /// the tokens' whole lifetime.
    static func mixedCallers(seed: UInt64) -> [Caller] {
        var random = SplitMix64(seed: seed)
        return (0..<18).map { _ in
            Caller(
                delay: Int.random(in: 0..<300, using: &random), minValidity: random.pick([0, 60, 300, 3500]),
                forced: random.chance(0.2))
        }
    }

    /// The mixed callers, of which about one in four goes away 0–200 turns after it asked.
    static func leavingCallers(seed: UInt64) -> [Caller] {
        var random = SplitMix64(seed: seed &+ 0x1EAF)
        return Self.mixedCallers(seed: seed).map { caller in
            var caller = caller
            if random.chance(0.25) { caller.leavesAfter = Int.random(in: 0..<200, using: &random) }
            return caller
        }
    }

    /// Starts `ask(index, caller)` for each caller after its delay; the clock moves on in 50 ms
    /// steps (the followers' re-reads, the retries' backoff) until all are answered, at most `steps`
    /// of them: 150 (7.5 s) stay below the callers' 10 s deadline, 400 (20 s) go past it. The
    /// answers come in the order they arrived.
    ///
    /// The scheduler may leave a call (to the store, or to Atlassian) waiting while the steps run
    /// out; a follower that then needs its re-read timer (its notice lost) would wait for a clock
    /// that no longer moves. So, with callers still waiting once the steps are spent, up to 40 more
    /// (2 s, still short of the deadline) are taken, each once no call is out (`busy` false).
    static func answers<Answer: Sendable>(
        _ callers: [Caller], clock: ManualFlowClock, seed: UInt64, steps: Int,
        busy: @escaping @Sendable () -> Bool = { false },
        ask: @escaping @Sendable (Int, Caller) async -> Answer
    ) async -> [Answer] {
        await withTaskGroup(of: Answer?.self) { group in
            for (index, caller) in callers.enumerated() {
                group.addTask {
                    for _ in 0..<caller.delay { await Task.yield() }
                    guard let leavesAfter = caller.leavesAfter else { return await ask(index, caller) }
                    let asking = Task { await ask(index, caller) }
                    for _ in 0..<leavesAfter { await Task.yield() }
                    asking.cancel()
                    return await asking.value
                }
            }
            let pending = Mutex(callers.count)
            group.addTask {
                var turns = SplitMix64(seed: seed &+ 1)
                for step in 0..<(steps + 40) where pending.withLock({ $0 }) > 0 {
                    for _ in 0..<(1 + Int.random(in: 0..<30, using: &turns)) { await Task.yield() }
                    // Bounded, should a call never come back.
                    if step >= steps { for _ in 0..<100_000 where busy() { await Task.yield() } }
                    clock.advance(by: .milliseconds(50))
                }
                return nil
            }
            var answers: [Answer] = []
            for await answer in group {
                guard let answer else { continue }
                pending.withLock { $0 -= 1 }
                answers.append(answer)
            }
            return answers
        }
    }
}

extension Interleaving {
    /// A caller's token, whether it forced a refresh, and the token the store held when it asked.
    struct Answer: Sendable {
        var token: String
        var forced: Bool
        var replaced: String?
    }

    /// What a run ended with: the callers' tokens and failures (in the order they came), the calls
    /// made to Atlassian (trigger calls or exchanges), and a lease left once all were answered.
    struct Run<Failure: Error & Sendable> {
        var answers: [Answer] = []
        var failures: [Failure] = []
        var calls = 0
        var leaseLeft: String?
        /// One more request on each replica once the callers are answered, where a test makes
        /// them: its failure, or nil for a token.
        var afterward: [Failure?] = []
        /// The calls made to Atlassian by those requests.
        var callsAfterward = 0

        init(_ outcomes: [Result<Answer, Failure>]) {
            for outcome in outcomes {
                switch outcome {
                case .success(let answer): self.answers.append(answer)
                case .failure(let error): self.failures.append(error)
                }
            }
        }

        var tokens: [String] { self.answers.map(\.token) }

        /// No forced refresh got back the token the store held when it asked.
        func expectForcedRefreshesGotNewTokens(sourceLocation: SourceLocation = #_sourceLocation) {
            for answer in self.answers where answer.forced {
                #expect(
                    answer.token != answer.replaced, "a forced refresh got back \(answer.token)",
                    sourceLocation: sourceLocation)
            }
        }
    }
}
