/// Identifies one caller waiting for a token in one process.
public struct WaiterID: Hashable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "w\(self.raw)" }
}

/// Identifies a timer the state machine asked for. A timer whose id is no longer current is ignored.
public struct TimerID: Hashable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public var description: String { "t\(self.raw)" }
}

/// How one trigger attempt failed (the `outcome` label of `token_gateway_trigger_attempts_total`).
public enum TriggerFailure: String, Sendable, Hashable {
    /// The trigger answered non-2xx.
    case httpError = "http_error"
    /// Connecting or sending failed.
    case transportError = "transport_error"
    /// The trigger did not answer within the attempt timeout.
    case timeout = "timeout"
    /// The trigger answered 2xx but no token arrived within the delivery grace.
    case noDelivery = "no_delivery"
}

/// Settings of the token flow. Every default is documented in `Docs/operations.md`.
public struct TokenFlowConfiguration: Sendable, Hashable {
    /// Trigger attempts per round trip (the first one included). Default 4.
    public var maxAttempts: Int = 4
    /// Longest wait for one trigger call to answer, whatever its callers' deadline (see
    /// ``workOutlivesCallers``). Default 10 s.
    public var attemptTimeout: Duration = .seconds(10)
    /// How long after a 2xx from the trigger the token may still arrive before the attempt counts
    /// as `no_delivery`. Default 3 s.
    public var deliveryGrace: Duration = .seconds(3)
    /// First retry delay; doubles per retry up to `backoffCap`, with jitter (see ``Backoff``). Default 100 ms.
    public var backoffBase: Duration = .milliseconds(100)
    /// Longest retry delay. Default 2 s.
    public var backoffCap: Duration = .seconds(2)
    /// How long the lease outlives the round trip's deadline. Default 2 s.
    public var leaseGrace: Duration = .seconds(2)
    /// How long a caller waits for the store read that verifies a token held in memory but not
    /// verified (while the store's announcements are not heard, or right after they are back);
    /// then that token is served, as when the store cannot be reached.
    public var verifyReadTimeout: Duration = .milliseconds(250)
    /// While following another process's round trip (or waiting for a delivery), a timer re-reads
    /// the store first after this interval, a safety net for a lost notification… Default 50 ms.
    public var pollInitial: Duration = .milliseconds(50)
    /// …growing to at most this one. Default 1 s.
    public var pollCap: Duration = .seconds(1)
    /// Deadline of a background (refresh-ahead) round trip. Default 30 s.
    public var backgroundDeadline: Duration = .seconds(30)
    /// Refresh-ahead window: a token in the last `refreshAheadFraction` of its lifetime is still
    /// served, and one background round trip fetches the next. 0 turns refresh-ahead off. Default 0.25.
    public var refreshAheadFraction: Double = 0.25
    /// After a background round trip failed, the next one waits at least this long. Default 10 s.
    public var refreshAheadCooldown: Duration = .seconds(10)
    /// Consecutive failed round trips of one installation that open its circuit. Default 5.
    public var breakerThreshold: Int = 5
    /// Whether a led round's verdict is reported for circuit breaking (`roundFinished`). Default
    /// true; an owner without a circuit (user-token exchanges) turns it off.
    public var circuitBreaking: Bool = true
    /// Whether a round sees its work in flight through when its last caller leaves (its deadline
    /// passed, or it went away): the attempt keeps ``attemptTimeout`` and its delivery grace, the
    /// lease is kept (extended to cover them), callers arriving meanwhile join, and the verdict is
    /// the work's own. Default true; an owner whose work costs a budget nobody should spend for a
    /// caller that left (user-token exchanges) turns it off: its attempts are bounded by the
    /// callers' deadline and the round ends with its last caller.
    public var workOutlivesCallers: Bool = true
    /// Whether a failed attempt re-reads the store as its retry waits: the work's value may have
    /// been stored although the attempt's own answer failed (a trigger's token arrives by a
    /// delivery of its own), and a store that cannot be reached is found then (its callers get a
    /// still-valid value held in memory, ``LeasedRoundStateMachine/storeFailed(requestID:fallback:now:)``).
    /// Default true; an owner whose attempt returns the value itself (user-token exchanges) turns it off.
    public var rereadsAfterFailedAttempt: Bool = true
    /// First open window of a circuit; doubles on every reopening up to `breakerOpenCap`. Default 5 s.
    public var breakerOpenBase: Duration = .seconds(5)
    /// Longest open window. Default 5 min.
    public var breakerOpenCap: Duration = .seconds(300)
    /// After a round trip that brought no newer token (Forge handed out the token it had cached),
    /// no request and no refresh-ahead starts another round trip for the installation for this
    /// long, on any replica (the hold is kept in the store); a forced refresh still starts one.
    /// Default 60 s.
    public var sameTokenHold: Duration = .seconds(60)
    /// The least validity a token must have left to be served when a round trip brought no newer
    /// one, or while the hold lasts (less: 502 `trigger_failed`). Default 60 s.
    public var heldTokenMinimumValidity: Duration = .seconds(60)
    /// Callers of one installation that may wait in this process at once, for a round trip or
    /// for a store read (their own or one they share); more get `overloaded` (503) at once.
    /// Default 1000.
    public var maxWaitersPerInstallation: Int = 1000
    /// Callers that may wait in this process at once (as above), over all installations.
    /// Default 10,000.
    public var maxWaiters: Int = 10_000

    public init() {}
}

/// What a hold did, for metrics (`token_gateway_same_token_round_trips_total`,
/// `token_gateway_round_trips_held_total`).
public enum HoldEvent: String, Sendable, Hashable, CaseIterable {
    /// A round trip this process led brought no newer token; its callers got the newest one.
    case sameTokenServed = "served"
    /// A round trip this process led brought no newer token and the newest has too little time
    /// left: its callers got `trigger_failed`.
    case sameTokenExpiring = "expiring"
    /// A request was answered under a hold instead of starting a round trip.
    case requestHeld = "request"
    /// A refresh-ahead round trip was not started because of a hold.
    case refreshAheadHeld = "refresh_ahead"
}

/// The system-token round machine: the leased-round machine over access tokens.
public typealias TokenFlowStateMachine = LeasedRoundStateMachine<AccessToken>

/// What a ``TokenFlowStateMachine`` asks its owner to do.
public typealias FlowAction = TokenFlowStateMachine.Action

/// A hold on an installation's round trips, over access tokens (see ``LeasedRoundStateMachine/Hold``).
public typealias RoundTripHold = TokenFlowStateMachine.Hold

extension AccessToken: LeasedRoundValue {
    public var roundID: String? { self.requestID }
}

extension FlowError {
    /// A round trip brought no newer token and the newest one has too little time left to serve.
    public static let noUsableToken = FlowError(
        code: .triggerFailed, detail: "the auth trigger returned no newer token and the newest one expires within 60 s")
}
