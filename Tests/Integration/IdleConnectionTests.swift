import FlowEngine
import ForgeEmulator
import Foundation
import Testing

@testable import TokenGateway

/// `TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS`: a client connection that sends nothing while no answer is
/// due to it is closed; one waiting for its answer is not.
@Suite("HTTP: idle client connections")
struct IdleConnectionTests {
    static let closed = "token_gateway_http_idle_connections_closed_total"

    @Test(
        "a connection silent mid-head, mid-body or between requests is closed; a caller waiting for its token is not")
    func idleClientsAreClosed() async throws {
        try await GatewayHarness.run(configure: { $0.httpIdleTimeout = .seconds(1) }) { h in
            let port = try FastAnswerTests.port(h.gatewayURL)
            // Half a head, then nothing: closed by the gateway (the client would give up after 30 s).
            let head = try await RawHTTP.exchange(
                Array("GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n".utf8), port: port, timeout: .seconds(30))
            #expect(head.closedByServer && head.received.isEmpty)
            // A body that stops after 10 of its 100 bytes: closed, and nothing was answered.
            let body = try await RawHTTP.exchange(
                Array(
                    ("POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                        + "Content-Length: 100\r\n\r\ngrant_type").utf8), port: port, timeout: .seconds(30))
            #expect(body.closedByServer && body.received.isEmpty)
            // A kept-alive connection after its answer (a fast one): closed.
            let kept = try await RawHTTP.exchange(
                Array(FastAnswerTests.get("/health/live", keepAlive: true).utf8), port: port, timeout: .seconds(30))
            #expect(kept.closedByServer)
            #expect(kept.received.hasPrefix("HTTP/1.1 200"), "\(kept.received.prefix(200))")
            // Counted (the test's own HTTP client, idle between calls, may add to it).
            #expect(try await SameTokenRoundTripTests.sample(h, Self.closed) >= 3)
            let logged = h.allLogs.split(separator: "\n").filter {
                $0.contains("sent nothing for the idle timeout") && $0.contains("http.request_incomplete=true")
            }
            #expect(logged.count == 1, "the stalled body (the half head had no request yet)")

            // A caller whose token takes longer than the idle timeout (the delivery comes 2 s
            // after the trigger call) gets it: its connection is not closed while it waits.
            let installation = try await h.installed()
            h.emulator.setFault(.deliverLate(.seconds(2)), for: installation)
            let waited = try await RawHTTP.exchange(
                Array(FastAnswerTests.get(GatewayHarness.path(installation) + "/token", close: true).utf8), port: port,
                timeout: .seconds(30))
            #expect(waited.received.hasPrefix("HTTP/1.1 200"), "\(waited.received.prefix(300))")
            #expect(waited.received.contains(#""source":"trigger""#))
        }
    }
}
