/// Settings of `POST /v1/installations/{id}/invoke/{key}` (named-trigger calls). Every default is
/// documented in `Docs/invoke.md`.
public struct InvokeConfiguration: Sendable, Hashable {
    /// Most invocations of one installation in progress at once on one gateway process; more get
    /// 503 `overloaded` with `Retry-After`. Default 8 (`TOKEN_GATEWAY_INVOKE_MAX_CONCURRENCY`).
    public var maxConcurrencyPerInstallation: Int = 8
    /// Most invocations in progress at once on one gateway process, all installations together
    /// (each may hold its payload and the trigger's answer in memory); more get 503 `overloaded`.
    /// Default 256.
    public var maxConcurrencyTotal: Int = 256
    /// Largest caller body (the payload) accepted; larger gets 413 `payload_too_large`. Default 64 KiB.
    public var maxPayloadSize: Int = 64 * 1024
    /// Largest trigger answer body relayed; a larger one is 502 `trigger_failed`. Default 1 MiB.
    public var maxAnswerSize: Int = 1 << 20
    /// How long the answer to a call with an `Idempotency-Key` is kept and replayed. Default 24 h.
    public var idempotencyRetention: Duration = .seconds(24 * 3600)
    /// Most attempts of one call, made only when the caller sent an `Idempotency-Key` and the
    /// trigger was unreachable or answered 502, 503 or 504. Default 3.
    public var maxAttempts: Int = 3
    /// First pause between attempts; doubles per attempt (with jitter), at most 1 s. Default 100 ms.
    public var retryBase: Duration = .milliseconds(100)

    public init() {}
}
