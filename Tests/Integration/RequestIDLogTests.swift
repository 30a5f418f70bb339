import AsyncHTTPClient
import Foundation
import NIOCore
import Testing

@testable import TokenGateway

/// Every answer names its request id (`X-Request-Id`), and the routes log through the request's
/// logger, so each of their log lines carries that id as `http.request_id`.
@Suite("Request ids in answers and logs")
struct RequestIDLogTests {
    @Test("a route's log line carries the request id of its answer, and each request has its own")
    func routeLogLinesCarryTheAnswersRequestID() async throws {
        try await GatewayHarness.run { h in
            var ids: [String] = []
            for _ in 0..<2 {
                // No client authentication: the OAuth route refuses it and logs the refusal.
                var request = HTTPClientRequest(url: h.gatewayURL + "/oauth/token")
                request.method = .POST
                request.headers.add(name: "Content-Type", value: "application/x-www-form-urlencoded")
                request.body = .bytes(ByteBuffer(string: "grant_type=client_credentials"))
                let response = try await h.http.execute(request, timeout: .seconds(10))
                #expect((400..<500).contains(response.status.code))
                let id = try #require(response.headers.first(name: "X-Request-Id"))
                #expect(!id.isEmpty)
                ids.append(id)
            }
            #expect(ids[0] != ids[1])
            let refusals = h.logs.captured.filter { $0.contains("OAuth token request refused") }
            for id in ids {
                #expect(refusals.filter { $0.contains("http.request_id=\(id)") }.count == 1, "\(refusals)")
            }
        }
    }

    @Test("error answers of unknown routes carry a request id too")
    func unknownRouteAnswerCarriesARequestID() async throws {
        try await GatewayHarness.run { h in
            let response = try await h.http.execute(
                HTTPClientRequest(url: h.gatewayURL + "/no/such/route"), timeout: .seconds(10))
            #expect(response.status.code == 404)
            #expect(response.headers.first(name: "X-Request-Id")?.isEmpty == false)
        }
    }
}
