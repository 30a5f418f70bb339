/// Capped exponential backoff with "equal jitter": the one retry-delay policy of the code base (Redis
/// reconnects, trigger retries, user-token exchange retries).
///
/// The nominal delay before retry `attempt` (1 for the first retry) is `d = min(cap, base · 2^(attempt − 1))`,
/// and the value returned lies in `[d / 2, d]`, chosen by `jitter` in `0...1`. Half the delay is always waited
/// (so retries never bunch up at zero); the other half is spread so that many clients, replicas or
/// installations do not retry in lockstep after a shared outage. Pure: the randomness is an input, so tests
/// can pin it (pass `Double.random(in: 0...1)` in production).
public enum Backoff {
    /// The delay before retry `attempt`.
    ///
    /// - Parameters:
    ///   - attempt: consecutive failures so far (1 for the first retry); `0` or less means no delay.
    ///   - base: the nominal delay before the first retry; a base above `cap` is capped.
    ///   - cap: the largest nominal delay; the result never exceeds it.
    ///   - jitter: a number in `0...1`; values outside (and NaN) are clamped.
    public static func delay(attempt: Int, base: Duration, cap: Duration, jitter: Double) -> Duration {
        guard attempt > 0, base > .zero, cap > .zero else {
            return .zero
        }
        let capNanoseconds = Self.nanoseconds(cap)
        var nominal = min(Self.nanoseconds(base), capNanoseconds)
        // Doubling at most 62 times keeps the arithmetic in range; the cap is reached long before.
        for _ in 1..<min(attempt, 62) where nominal < capNanoseconds {
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
