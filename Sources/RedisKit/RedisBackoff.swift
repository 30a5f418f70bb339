/// The reconnect delay policy: capped exponential growth with "equal jitter".
enum RedisBackoff {
    /// The delay before the next connect attempt after `failures` consecutive failures.
    ///
    /// The nominal delay is `base · 2^(failures − 1)`, capped at `cap`. Half of it is always waited and the other
    /// half is scaled by `jitter`, so the result lies in `[nominal / 2, nominal]`: it never exceeds `cap`, never
    /// drops below half the nominal delay, and spreads out reconnects of many clients after a shared outage.
    ///
    /// - Parameters:
    ///   - failures: consecutive failed attempts since the last success; `0` (or less) means no delay.
    ///   - base: the nominal delay after the first failure.
    ///   - cap: the largest nominal delay.
    ///   - jitter: a number in `0...1` (pass `Double.random(in: 0...1)`); values outside are clamped.
    static func delay(afterFailures failures: Int, base: Duration, cap: Duration, jitter: Double) -> Duration {
        guard failures > 0, base > .zero, cap > .zero else {
            return .zero
        }
        let capNanoseconds = Self.nanoseconds(cap)
        var nominal = min(Self.nanoseconds(base), capNanoseconds)
        // Doubling at most 62 times keeps the arithmetic in range; the cap is reached long before.
        for _ in 1..<min(failures, 62) where nominal < capNanoseconds {
            nominal = min(nominal * 2, capNanoseconds)
        }
        let clampedJitter = jitter.isNaN ? 0 : min(max(jitter, 0), 1)
        let half = nominal / 2
        return .nanoseconds(half + Int64((Double(nominal - half) * clampedJitter).rounded(.down)))
    }

    private static func nanoseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow {
            return seconds > 0 ? .max / 4 : 0
        }
        return min(scaled.addingReportingOverflow(attoseconds / 1_000_000_000).partialValue, .max / 4)
    }
}
