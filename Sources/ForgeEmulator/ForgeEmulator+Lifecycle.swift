import Crypto
import Foundation

/// The Forge lifecycle events the emulator sends to `POST /forge/lifecycle`.
public enum ForgeLifecycleEvent: String, Sendable, Hashable, CaseIterable {
    case installed = "avi:forge:installed:app"
    case upgraded = "avi:forge:upgraded:app"
    case uninstalled = "avi:forge:uninstalled:app"
}

/// The gateway's answer to `POST /forge/register`.
public struct RegisterResult: Sendable, Hashable {
    /// HTTP status.
    public let status: Int
    /// `triggerKeyId` of a 2xx answer.
    public let triggerKeyId: String?
    /// `triggerPublicKey` of a 2xx answer: base64url of the raw 32-byte Ed25519 public key.
    public let triggerPublicKey: String?
    /// The answer's body.
    public let body: String
}

struct LifecycleBody: Codable, Sendable {
    struct App: Codable, Sendable {
        var id: String
        var version: String
    }

    struct Environment: Codable, Sendable {
        var id: String
    }

    var eventType: String
    var id: String
    var app: App
    var environment: Environment
    var context: String
    var installerAccountId: String
}

struct RegisterRequestBody: Codable, Sendable {
    var authTriggerUrl: String
    /// Named triggers: a URL sets one, null removes it (see `ForgeEmulator+NamedTriggers.swift`).
    var triggers: [String: String?]? = nil
}

struct RegisterAnswerBody: Codable, Sendable {
    var installationId: String?
    var triggerKeyId: String
    var triggerPublicKey: String
}

extension ForgeEmulator {
    /// Installs the app: sends `avi:forge:installed:app` to `POST {gateway}/forge/lifecycle`, then
    /// registers the web trigger (`POST {gateway}/forge/register` with
    /// `{"authTriggerUrl": baseURL + triggerPath}`) and keeps the trigger key the gateway answers,
    /// to verify trigger calls with.
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` (operation `lifecycle` or
    ///   `register`) on a non-2xx answer, ``ForgeEmulatorError/invalidRegistrationResponse``,
    ///   ``ForgeEmulatorError/notRunning``, or the HTTP client's error.
    public func install(_ installation: EmulatedInstallation) async throws {
        let answer = try await self.sendLifecycleEvent(.installed, for: installation)
        guard answer.isSuccess else {
            throw ForgeEmulatorError.unexpectedStatus(answer.status, operation: "lifecycle")
        }
        self.state.withLock { $0.update(installation) { $0.status = .installed } }
        let registration = try await self.register(installation)
        guard (200..<300).contains(registration.status) else {
            throw ForgeEmulatorError.unexpectedStatus(registration.status, operation: "register")
        }
        self.logger.info(
            "Installation installed",
            metadata: ["installation.id": "\(installation.id)", "trigger.key.id": "\(registration.triggerKeyId ?? "")"]
        )
    }

    /// Sends `POST {gateway}/forge/register` with `{"authTriggerUrl": …}` (default: this emulator's
    /// trigger URL for the installation). On 2xx it keeps the answered Ed25519 key to verify later
    /// trigger calls. A non-2xx answer is returned, not thrown.
    /// - Parameters:
    ///   - authTriggerUrl: The URL to register; default ``triggerURL(for:)``.
    ///   - systemToken: When set, sent as `x-forge-oauth-system` (the gateway stores it as a push).
    ///   - triggers: Named triggers to send (a URL sets, nil removes); default every defined one.
    /// - Throws: ``ForgeEmulatorError/invalidRegistrationResponse`` when a 2xx answer has no usable
    ///   key, ``ForgeEmulatorError/notRunning``, or the HTTP client's error.
    public func register(
        _ installation: EmulatedInstallation,
        authTriggerUrl: String? = nil,
        systemToken: String? = nil,
        triggers: [String: String?]? = nil
    ) async throws -> RegisterResult {
        self.state.withLock { $0.remember(installation) }
        let url = authTriggerUrl ?? self.triggerURL(for: installation)
        var headers: [(String, String)] = []
        if let systemToken { headers.append(("x-forge-oauth-system", systemToken)) }
        let answer = try await self.callGateway(
            path: "/forge/register",
            gatewayURL: nil,
            fit: try self.mintFIT(for: installation),
            headers: headers,
            body: try JSONEncoder.emulator.encode(
                RegisterRequestBody(
                    authTriggerUrl: url, triggers: triggers ?? self.namedTriggersForRegistration(installation)))
        )
        guard answer.isSuccess else {
            self.logger.info(
                "Registration refused",
                metadata: ["installation.id": "\(installation.id)", "http.status": "\(answer.status)"]
            )
            return RegisterResult(status: answer.status, triggerKeyId: nil, triggerPublicKey: nil, body: answer.body)
        }
        guard let decoded = try? JSONDecoder().decode(RegisterAnswerBody.self, from: Data(answer.body.utf8)),
            !decoded.triggerKeyId.isEmpty,
            let rawKey = EmulatorBase64URL.decode(decoded.triggerPublicKey), rawKey.count == 32,
            let publicKey = try? Curve25519.Signing.PublicKey(rawRepresentation: rawKey)
        else {
            throw ForgeEmulatorError.invalidRegistrationResponse
        }
        let key = RegisteredTriggerKey(keyId: decoded.triggerKeyId, publicKey: publicKey)
        self.state.withLock { $0.update(installation) { $0.triggerKey = key } }
        self.logger.info(
            "Trigger registered",
            metadata: ["installation.id": "\(installation.id)", "trigger.key.id": "\(key.keyId)"]
        )
        return RegisterResult(
            status: answer.status,
            triggerKeyId: decoded.triggerKeyId,
            triggerPublicKey: decoded.triggerPublicKey,
            body: answer.body
        )
    }

    /// Sends `avi:forge:upgraded:app`.
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` on a non-2xx answer, or the
    ///   HTTP client's error.
    public func upgrade(_ installation: EmulatedInstallation) async throws {
        let answer = try await self.sendLifecycleEvent(.upgraded, for: installation)
        guard answer.isSuccess else {
            throw ForgeEmulatorError.unexpectedStatus(answer.status, operation: "lifecycle")
        }
        self.logger.info("Installation upgraded", metadata: ["installation.id": "\(installation.id)"])
    }

    /// Uninstalls the app: sends `avi:forge:uninstalled:app`; the web trigger answers 404 from then on.
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` on a non-2xx answer, or the
    ///   HTTP client's error.
    public func uninstall(_ installation: EmulatedInstallation) async throws {
        let answer = try await self.sendLifecycleEvent(.uninstalled, for: installation)
        guard answer.isSuccess else {
            throw ForgeEmulatorError.unexpectedStatus(answer.status, operation: "lifecycle")
        }
        self.state.withLock {
            $0.update(installation) { record in
                record.status = .uninstalled
                record.triggerKey = nil
            }
        }
        self.logger.info("Installation uninstalled", metadata: ["installation.id": "\(installation.id)"])
    }

    /// Sends one lifecycle event to `POST {gateway}/forge/lifecycle` with a FIT made with `fit`,
    /// and returns the answer whatever its status.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    public func sendLifecycleEvent(
        _ event: ForgeLifecycleEvent,
        for installation: EmulatedInstallation,
        fit: FITOptions = FITOptions()
    ) async throws -> GatewayAnswer {
        self.state.withLock { $0.remember(installation) }
        let body = LifecycleBody(
            eventType: event.rawValue,
            id: installation.id,
            app: .init(id: self.configuration.appId, version: Self.appVersion),
            environment: .init(id: self.environmentId),
            context: installation.siteARI,
            installerAccountId: self.installerAccountId
        )
        let answer = try await self.callGateway(
            path: "/forge/lifecycle",
            gatewayURL: nil,
            fit: try self.mintFIT(for: installation, options: fit),
            headers: [],
            body: try JSONEncoder.emulator.encode(body)
        )
        self.logger.debug(
            "Lifecycle event answered",
            metadata: [
                "installation.id": "\(installation.id)", "forge.event": "\(event.rawValue)",
                "http.status": "\(answer.status)",
            ]
        )
        return answer
    }
}
