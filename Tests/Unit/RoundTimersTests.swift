import Testing

@testable import FlowEngine

@Suite("RoundTimers: armed, waited for, fired or cancelled", .timeLimit(.minutes(1)))
struct RoundTimersTests {
    @Test("a timer fires at its deadline and is disarmed then; a second wait on it returns false at once")
    func firesAtItsDeadline() async {
        let clock = ManualFlowClock()
        let timers = RoundTimers<Int>(clock: clock)
        timers.arm(1)
        async let fired = timers.wait(1, until: clock.now() + .seconds(5))
        await clock.waitForSleepers(1)
        clock.advance(by: .seconds(5))
        #expect(await fired)
        #expect(timers.count == 0)
        #expect(await timers.wait(1, until: clock.now()) == false)
    }

    @Test("a cancelled timer's wait returns false without its deadline; other timers go on")
    func cancelEndsTheWait() async {
        let clock = ManualFlowClock()
        let timers = RoundTimers<Int>(clock: clock)
        timers.arm(1)
        timers.arm(2)
        async let first = timers.wait(1, until: clock.now() + .seconds(60))
        async let second = timers.wait(2, until: clock.now() + .seconds(1))
        await clock.waitForSleepers(2)
        timers.cancel(1)
        #expect(await first == false)
        clock.advance(by: .seconds(1))
        #expect(await second)
        #expect(timers.count == 0)
    }

    @Test("a timer cancelled before its wait starts is not waited for")
    func cancelBeforeTheWait() async {
        let clock = ManualFlowClock()
        let timers = RoundTimers<Int>(clock: clock)
        timers.arm(7)
        timers.cancel(7)
        #expect(await timers.wait(7, until: clock.now() + .seconds(60)) == false)
        #expect(clock.sleeperCount == 0)
    }

    @Test("cancelAll ends every wait (shutdown)")
    func cancelAllEndsEveryWait() async {
        let clock = ManualFlowClock()
        let timers = RoundTimers<Int>(clock: clock)
        for key in 0..<3 { timers.arm(key) }
        await withTaskGroup(of: Bool.self) { group in
            for key in 0..<3 { group.addTask { await timers.wait(key, until: clock.now() + .seconds(60)) } }
            await clock.waitForSleepers(3)
            timers.cancelAll()
            for await fired in group { #expect(!fired) }
        }
        #expect(timers.count == 0)
        #expect(clock.sleeperCount == 0)
    }
}
