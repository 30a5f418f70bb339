import AsyncHTTPClient
import Foundation
import NIOCore

/// The gateway's answer to one call: status and body text.
public struct GatewayAnswer: Sendable, Hashable {
    /// HTTP status.
    public let status: Int
    /// Body as UTF-8 text (empty when there was none).
    public let body: String

    /// Whether the status is 2xx.
    public var isSuccess: Bool { (200..<300).contains(self.status) }
}

extension ForgeEmulator {
    /// Largest gateway answer body the emulator reads.
    static let maximumAnswerBytes = 1 << 20

    /// `POST {gateway}{path}` as Forge's `invokeRemote` does: `authorization: Bearer <FIT>`, fresh
    /// `x-b3-traceid`/`x-b3-spanid`, a JSON body, capped at the configured remote-call timeout (or,
    /// for an event or a scheduled trigger, `asEvent`, at the event-call timeout).
    /// - Parameters:
    ///   - path: Path on the gateway, starting with `/`.
    ///   - gatewayURL: Base URL; default ``gatewayURL``.
    ///   - fit: The FIT to send, or `nil` for none.
    ///   - headers: More headers; they replace defaults of the same name.
    ///   - body: The JSON body.
    func callGateway(
        path: String,
        gatewayURL: String?,
        fit: String?,
        headers: [(String, String)],
        body: Data,
        asEvent: Bool = false
    ) async throws -> GatewayAnswer {
        let client = try self.httpClient()
        var request = HTTPClientRequest(url: try Self.gatewayEndpoint(gatewayURL ?? self.gatewayURL, path: path))
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.headers.add(name: "x-b3-traceid", value: Self.randomHex(bytes: 16))
        request.headers.add(name: "x-b3-spanid", value: Self.randomHex(bytes: 8))
        if let fit {
            request.headers.add(name: "authorization", value: "Bearer " + fit)
        }
        for (name, value) in headers {
            request.headers.replaceOrAdd(name: name, value: value)
        }
        request.body = .bytes(ByteBuffer(bytes: body))

        let timeout = asEvent ? self.configuration.eventCallTimeout : self.configuration.remoteCallTimeout
        let response = try await client.execute(request, timeout: TimeAmount(timeout))
        let answerBody = try await response.body.collect(upTo: Self.maximumAnswerBytes)
        return GatewayAnswer(status: Int(response.status.code), body: String(buffer: answerBody))
    }

    /// `base` (an absolute http(s) URL, trailing `/` ignored) joined with `path`.
    static func gatewayEndpoint(_ base: String, path: String) throws -> String {
        guard let components = URLComponents(string: base),
            let scheme = components.scheme?.lowercased(), scheme == "http" || scheme == "https",
            components.host?.isEmpty == false
        else { throw ForgeEmulatorError.invalidGatewayURL }
        var trimmed = Substring(base)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        return String(trimmed) + path
    }
}
