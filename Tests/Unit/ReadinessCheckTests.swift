import Synchronization
import Testing

@testable import TokenGateway

@Suite("Readiness: one store check for many probes")
struct ReadinessCheckTests {
    /// A probe that counts its runs and answers once the test lets it.
    final class GatedProbe: Sendable {
        let state = Mutex((runs: 0, answer: nil as Bool?, waiting: [CheckedContinuation<Bool, Never>]()))

        var runs: Int { self.state.withLock { $0.runs } }

        func run() async -> Bool {
            await withCheckedContinuation { continuation in
                let answer = self.state.withLock { state -> Bool? in
                    state.runs += 1
                    if state.answer == nil { state.waiting.append(continuation) }
                    return state.answer
                }
                if let answer { continuation.resume(returning: answer) }
            }
        }

        func answer(_ ready: Bool) {
            let waiting = self.state.withLock { state in
                state.answer = ready
                defer { state.waiting = [] }
                return state.waiting
            }
            for continuation in waiting { continuation.resume(returning: ready) }
        }

        func started() async {
            while self.runs == 0 { await Task.yield() }
        }
    }

    @Test("callers asking while a check runs share it; its outcome is reused while recent", arguments: [true, false])
    func sharedAndReused(ready: Bool) async throws {
        let check = ReadinessCheck(maximumAge: .seconds(3600))
        let probe = GatedProbe()
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask { await check.isReady { await probe.run() } }
            await probe.started()
            for _ in 0..<20 { group.addTask { await check.isReady { await probe.run() } } }
            probe.answer(ready)
            for try await answer in group { #expect(answer == ready) }
        }
        #expect(probe.runs == 1)
        // Recent: answered again without a check.
        #expect(await check.isReady { await probe.run() } == ready)
        #expect(probe.runs == 1)
    }

    @Test("an outcome older than the maximum age is checked again")
    func checkedAgainWhenOld() async {
        let check = ReadinessCheck(maximumAge: .zero)
        let probe = GatedProbe()
        probe.answer(true)
        #expect(await check.isReady { await probe.run() })
        #expect(await check.isReady { await probe.run() })
        #expect(probe.runs == 2)
    }
}
