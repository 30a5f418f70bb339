#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// An instant on the wall clock, in nanoseconds since the Unix epoch.
///
/// The flow engine takes time as an input: the state machine never reads a clock, its owner
/// passes `now` with every event. Wall time (not a monotonic clock) is used because token
/// expiries are wall-clock unix seconds.
public struct FlowTime: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var nanoseconds: Int64

    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
    public init(unixSeconds: Int64) { self.nanoseconds = unixSeconds &* 1_000_000_000 }

    /// Whole unix seconds (rounded down).
    public var unixSeconds: Int64 { self.nanoseconds / 1_000_000_000 }
    /// Unix milliseconds (rounded down).
    public var unixMilliseconds: Int64 { self.nanoseconds / 1_000_000 }

    /// The current wall-clock time.
    public static func now() -> FlowTime {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return FlowTime(nanoseconds: Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec))
    }

    public static func < (lhs: FlowTime, rhs: FlowTime) -> Bool { lhs.nanoseconds < rhs.nanoseconds }

    public static func + (lhs: FlowTime, rhs: Duration) -> FlowTime {
        FlowTime(nanoseconds: lhs.nanoseconds &+ rhs.nanoseconds)
    }

    public static func - (lhs: FlowTime, rhs: Duration) -> FlowTime {
        FlowTime(nanoseconds: lhs.nanoseconds &- rhs.nanoseconds)
    }

    public static func - (lhs: FlowTime, rhs: FlowTime) -> Duration {
        .nanoseconds(lhs.nanoseconds &- rhs.nanoseconds)
    }

    public var description: String { "\(self.nanoseconds / 1_000_000)ms" }
}

extension Duration {
    /// The duration in whole nanoseconds (saturating).
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = self.components
        let (ns, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return ns &+ attoseconds / 1_000_000_000
    }

    /// The duration in whole milliseconds (saturating).
    public var milliseconds: Int64 { self.nanoseconds / 1_000_000 }

    /// The duration as an HTTP `Retry-After` value: whole seconds, rounded up, at least 1 (a
    /// client told to retry after 0 s would retry at once).
    public var retryAfterSeconds: Int {
        max(1, Int((self.nanoseconds + 999_999_999) / 1_000_000_000))
    }

    /// The duration as fractional seconds.
    public var seconds: Double { Double(self.nanoseconds) / 1e9 }
}
