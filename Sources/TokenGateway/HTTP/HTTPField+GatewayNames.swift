import HTTPTypes

/// The header names the gateway reads or writes beyond those `HTTPTypes` names, made once.
extension HTTPField.Name {
    /// The Forge system token pushed with an invocation (`x-forge-oauth-system`).
    static let forgeOAuthSystem = HTTPField.Name("x-forge-oauth-system")!
    /// The Forge user token sent with an invocation made with a user in session (`x-forge-oauth-user`).
    static let forgeOAuthUser = HTTPField.Name("x-forge-oauth-user")!
    /// Forge's B3 trace id, logged as `trace.id`.
    static let b3TraceID = HTTPField.Name("x-b3-traceid")!
    /// Forge's B3 span id, logged as `span.id`.
    static let b3SpanID = HTTPField.Name("x-b3-spanid")!
    /// A named-trigger call's idempotency key (contract §6).
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    /// Marks a named-trigger answer replayed from an earlier call with the same key.
    static let idempotentReplayed = HTTPField.Name("Idempotent-Replayed")!
    /// The `requestId` a named trigger saw.
    static let tokenGatewayRequestID = HTTPField.Name("X-Token-Gateway-Request-Id")!
    /// The id of this request in the gateway's logs (metadata `request.id`), on every answer.
    static let requestID = HTTPField.Name("X-Request-Id")!
    static let pragma = HTTPField.Name("Pragma")!
    static let referrerPolicy = HTTPField.Name("Referrer-Policy")!
}
