import FlowEngine
import Foundation
import Hummingbird
import Logging

extension Gateway {
    /// Counts one request of `caller` against its per-minute limits (contract §2 *(v1.1)*), in
    /// Redis so every replica shares them: a forced refresh, a user-token exchange, or both. A
    /// refusal is logged to `logger` (the request's, so the line carries its request id).
    ///
    /// - Returns: nil when admitted (and counted), else the seconds to wait; then nothing was counted.
    /// - Throws: ``GatewayError/storeUnavailable`` when Redis cannot be reached.
    func callerAllowance(_ caller: Caller, refresh: Bool, userExchange: Bool, logger: Logger) async throws(GatewayError)
        -> Int?
    {
        var counters: [CallerLimitCounter] = []
        if refresh { counters.append(.init(kind: "refresh", limit: caller.limits.refreshesPerMinute)) }
        if userExchange { counters.append(.init(kind: "user-exchange", limit: caller.limits.userExchangesPerMinute)) }
        guard !counters.isEmpty else { return nil }
        let allowance: CallerAllowance
        do {
            allowance = try await self.store.admitCaller(tag: caller.storeTag, counters: counters, now: FlowTime.now())
        } catch {
            throw GatewayError.storeUnavailable
        }
        switch allowance {
        case .admitted:
            return nil
        case .refused(let seconds):
            logger.notice(
                "caller limit reached",
                metadata: [
                    "caller": "\(caller.name)", "limit.kind": "\(counters.map(\.kind).joined(separator: ","))",
                ])
            return seconds
        }
    }

    /// 429 `rate_limited` with `Retry-After` for a caller over one of its limits.
    static func callerRateLimited(retryAfter seconds: Int) -> GatewayError {
        GatewayError(
            status: .tooManyRequests, code: "rate_limited",
            message: "this caller's per-minute limit is spent; try again later", retryAfter: seconds)
    }
}
