import HTTPTypes

/// The header names the emulator reads or writes beyond those `HTTPTypes` names, made once.
extension HTTPField.Name {
    /// The gateway's signature on trigger calls (``TriggerSignature/headerName``).
    static let emulatorTriggerSignature = HTTPField.Name(TriggerSignature.headerName)!
    /// A named-trigger call's idempotency key.
    static let emulatorIdempotencyKey = HTTPField.Name("Idempotency-Key")!
    /// A header a named trigger answers with that the gateway must not relay.
    static let emulatorInternal = HTTPField.Name("X-Emulator-Internal")!
}
