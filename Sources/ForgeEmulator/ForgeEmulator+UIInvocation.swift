import Foundation

/// What a UI invocation sends (``ForgeEmulator/invokeFromUI(_:path:body:fit:systemToken:)``).
struct UIInvocationRequest: Codable, Sendable {
    /// Gateway path, such as `/forge/register`.
    var path: String
    /// The JSON body to send (any JSON object; default `{}`).
    var body: [String: EmulatorJSON]?
    /// `app.module.type` of the UI module; default `xen:macro`.
    var moduleType: String?
    /// Whether to add a made-up `x-forge-oauth-system` header, as `requestRemote` lets a user do.
    var systemToken: Bool?
}

/// A JSON value, to pass an arbitrary body through the admin route.
indirect enum EmulatorJSON: Codable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([EmulatorJSON])
    case object([String: EmulatorJSON])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let b = try? container.decode(Bool.self) {
            self = .bool(b)
        } else if let n = try? container.decode(Double.self) {
            self = .number(n)
        } else if let s = try? container.decode(String.self) {
            self = .string(s)
        } else if let a = try? container.decode([EmulatorJSON].self) {
            self = .array(a)
        } else {
            self = .object(try container.decode([String: EmulatorJSON].self))
        }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let b): try container.encode(b)
        case .number(let n): try container.encode(n)
        case .string(let s): try container.encode(s)
        case .array(let a): try container.encode(a)
        case .object(let o): try container.encode(o)
        }
    }
}

extension ForgeEmulator {
    /// Calls the gateway the way a UI module does from a user's browser (`invokeRemote` or
    /// `requestRemote` from `@forge/bridge`): a FIT whose `app.module.type` is the UI module's, with
    /// `principal` and `context` (``FITOptions/ui(moduleType:moduleKey:principal:)``), the path and
    /// body the user chose and, with `systemToken`, a made-up `x-forge-oauth-system` header. The
    /// gateway must refuse every such call on its Forge routes. Returns the answer whatever its status.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    public func invokeFromUI(
        _ installation: EmulatedInstallation,
        path: String,
        body: Data = Data("{}".utf8),
        fit: FITOptions = .ui(),
        systemToken: String? = nil
    ) async throws -> GatewayAnswer {
        self.state.withLock { $0.remember(installation) }
        var headers: [(String, String)] = []
        if let systemToken { headers.append(("x-forge-oauth-system", systemToken)) }
        let answer = try await self.callGateway(
            path: path, gatewayURL: nil, fit: try self.mintFIT(for: installation, options: fit), headers: headers,
            body: body)
        self.logger.debug(
            "UI invocation answered",
            metadata: ["installation.id": "\(installation.id)", "http.status": "\(answer.status)"])
        return answer
    }
}
