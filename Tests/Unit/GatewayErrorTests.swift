import Testing

@testable import FlowEngine
@testable import TokenGateway

/// Contract §1: every error code has one status; 503 and 429 answers carry `Retry-After`.
@Suite("Gateway errors from flow errors")
struct GatewayErrorTests {
    @Test("each flow error's code has the contract's status, and only 503s and 429s carry Retry-After")
    func statusesFollowTheContract() {
        let statuses: [String: Int] = [
            "installation_not_found": 404, "installation_uninstalled": 410, "no_trigger_url": 422,
            "token_timeout": 504, "trigger_failed": 502, "circuit_open": 503, "store_unavailable": 503,
            "internal_error": 500, "overloaded": 503,
        ]
        for code in FlowError.Code.allCases {
            let error = GatewayError(FlowError(code: code, detail: nil))
            let status = Int(error.status.code)
            #expect(statuses[error.code] == status, "\(code) → \(error.code) \(status)")
            #expect((error.retryAfter != nil) == (status == 503 || status == 429), "\(code)")
        }
        // A request cancelled under way: 500 internal_error (it was a 503 with that code).
        let cancelled = GatewayError(FlowError(code: .cancelled, detail: nil))
        #expect(cancelled.status == .internalServerError)
        #expect(cancelled.code == "internal_error")
    }
}
