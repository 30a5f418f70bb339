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

/// The table of known routes (405 answers with `Allow`, the documentation check) is read from the
/// routes themselves.
@Suite("The route table")
struct RouteTableTests {
    @Test("every served path appears once with its methods; the OAuth wrong-method answers are not routes")
    func routeTableIsReadFromTheRouter() async throws {
        try await GatewayHarness.run { h in
            let table = h.gateway.knownRoutes
            let paths = table.map { "/" + $0.segments.joined(separator: "/") }
            #expect(Set(paths).count == paths.count)
            let methods = Dictionary(uniqueKeysWithValues: zip(paths, table.map { Set($0.methods.map(\.rawValue)) }))
            #expect(methods["/v1/installations/:id/token"] == ["GET"])
            #expect(methods["/v1/installations/:id/token/refresh"] == ["POST"])
            #expect(methods["/v1/installations/:id/invoke/:key"] == ["POST"])
            #expect(methods["/oauth/token"] == ["POST"])
            #expect(methods["/health/ready"] == ["GET"])
            #expect(methods["/status/installations/:id"] == ["GET"])
            #expect(paths.count == 22)

            // A known path with another method: 405 with the methods the table names.
            let wrong = try await h.call(.DELETE, "/forge/register", secret: nil)
            #expect(wrong.status == 405)
            #expect(wrong.headers["allow"] == "POST")
            #expect(wrong.errorCode == "method_not_allowed")
        }
    }
}
