/// Capped exponential backoff with "equal jitter".
///
/// The delay before retry `attempt` (1 for the first retry) is
/// `d = min(cap, base * 2^(attempt-1))`, and the value returned lies in `[d/2, d]`, chosen by
/// `jitter` in `0...1`. Half the delay is guaranteed (so retries never bunch up at zero), the
/// other half is spread to keep many replicas or installations from retrying in lockstep.
/// Pure: the randomness is an input so tests can pin it.
public enum Backoff {
    public static func delay(attempt: Int, base: Duration, cap: Duration, jitter: Double) -> Duration {
        precondition(attempt >= 1, "attempt counts from 1")
        let exponent = min(attempt - 1, 30)
        let raw = base.nanoseconds.multipliedReportingOverflow(by: Int64(1) << exponent)
        let capped = raw.overflow ? cap.nanoseconds : min(raw.partialValue, cap.nanoseconds)
        let j = min(max(jitter, 0), 1)
        let half = capped / 2
        return .nanoseconds(half + Int64(Double(capped - half) * j))
    }
}
