import Testing

@testable import RedisKit

@Suite struct BackoffDelayTests {
    let base = Duration.milliseconds(50)
    let cap = Duration.seconds(2)

    func delay(_ failures: Int, jitter: Double) -> Duration {
        Backoff.delay(attempt: failures, base: self.base, cap: self.cap, jitter: jitter)
    }

    @Test func noFailureMeansNoDelay() {
        #expect(self.delay(0, jitter: 1) == .zero)
        #expect(self.delay(-3, jitter: 1) == .zero)
    }

    @Test func nominalDelayDoublesFromTheBase() {
        #expect(self.delay(1, jitter: 1) == .milliseconds(50))
        #expect(self.delay(2, jitter: 1) == .milliseconds(100))
        #expect(self.delay(3, jitter: 1) == .milliseconds(200))
        #expect(self.delay(6, jitter: 1) == .milliseconds(1600))
    }

    @Test func jitterKeepsAtLeastHalfTheNominalDelay() {
        #expect(self.delay(1, jitter: 0) == .milliseconds(25))
        #expect(self.delay(3, jitter: 0) == .milliseconds(100))
        #expect(self.delay(3, jitter: 0.5) == .milliseconds(150))
    }

    @Test func delayNeverExceedsTheCap() {
        for failures in [7, 8, 20, 61, 62, 63, 1000, Int.max] {
            for jitter in [0, 0.25, 0.999, 1] {
                let delay = self.delay(failures, jitter: jitter)
                #expect(delay <= self.cap, "failures \(failures) jitter \(jitter)")
                #expect(delay >= self.cap / 2, "failures \(failures) jitter \(jitter)")
            }
        }
    }

    @Test func randomJitterStaysWithinBounds() {
        for failures in 1...12 {
            let nominal = min(self.base * (1 << (failures - 1)), self.cap)
            for _ in 0..<50 {
                let delay = self.delay(failures, jitter: Double.random(in: 0...1))
                #expect(delay >= nominal / 2 && delay <= nominal)
            }
        }
    }

    @Test func outOfRangeJitterIsClamped() {
        #expect(self.delay(2, jitter: -5) == .milliseconds(50))
        #expect(self.delay(2, jitter: 7) == .milliseconds(100))
        #expect(self.delay(2, jitter: .nan) == .milliseconds(50))
    }

    @Test func aBaseAboveTheCapIsCapped() {
        #expect(Backoff.delay(attempt: 1, base: .seconds(10), cap: .seconds(1), jitter: 1) == .seconds(1))
    }
}
