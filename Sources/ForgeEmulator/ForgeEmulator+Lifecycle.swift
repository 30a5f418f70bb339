import Base64URLCoding
import Crypto
import Foundation

/// The Forge lifecycle events the emulator sends to `POST /forge/lifecycle`.
///
/// Forge documents `installed` and `upgraded` only, with a body that has no `eventType`; the
/// emulator sends them that way. `uninstalled` is not a Forge event (Forge's uninstall signal is the
/// `preUninstall` module, see ``ForgeEmulator/preUninstall(_:fit:)``); it is kept to exercise the
/// gateway's older handling of an `avi:forge:uninstalled:app` body.
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
    /// `nextTriggerKeyId` of a 2xx answer during a key rotation.
    public var nextTriggerKeyId: String? = nil
    /// The answer's body.
    public let body: String
}

/// A lifecycle event body as Forge documents it: `id`, `installerAccountId`, `app{id, version,
/// name, ownerAccountId}`, `environment` and, on upgrade, `permissions`; no `eventType`.
struct LifecycleBody: Codable, Sendable {
    struct App: Codable, Sendable {
        var id: String
        var version: String
        var name: String
        var ownerAccountId: String
    }

    struct Environment: Codable, Sendable {
        var id: String
    }

    struct Permissions: Codable, Sendable {
        var scopes: [String]
    }

    /// Only on the undocumented `avi:forge:uninstalled:app` body.
    var eventType: String?
    var id: String
    var installerAccountId: String
    var app: App
    var environment: Environment
    /// On upgrade only.
    var permissions: Permissions?
    /// Only on the undocumented `avi:forge:uninstalled:app` body: the site ARI.
    var context: String?
}

/// The body of a `preUninstall` invocation: `{"context": {"cloudId", "moduleKey"}, "contextToken"}`.
struct PreUninstallBody: Codable, Sendable {
    struct Context: Codable, Sendable {
        var cloudId: String
        var moduleKey: String
    }

    var context: Context
    var contextToken: String
}

struct RegisterRequestBody: Codable, Sendable {
    var authTriggerUrl: String
    /// `true` starts a trigger-key rotation; left out otherwise.
    var rotateKey: Bool? = nil
    /// Named triggers: a URL sets one, null removes it (see `ForgeEmulator+NamedTriggers.swift`).
    var triggers: [String: String?]? = nil
}

struct RegisterAnswerBody: Codable, Sendable {
    var installationId: String?
    var triggerKeyId: String
    var triggerPublicKey: String
    var nextTriggerKeyId: String?
    var nextTriggerPublicKey: String?
}

extension ForgeEmulator {
    /// The emulated app's name (lifecycle `app.name`).
    static let appName = "Token Gateway companion"
    /// The scopes an upgrade's `permissions` lists.
    static let appScopes = ["read:jira-work", "write:jira-work", "read:confluence-content.all"]
    /// The key of the emulated app's `preUninstall` module.
    static let preUninstallModuleKey = "token-gateway-pre-uninstall"

    /// Installs the app: sends `avi:forge:installed:app` to `POST {gateway}/forge/lifecycle`, then
    /// registers the web trigger (`POST {gateway}/forge/register` with
    /// `{"authTriggerUrl": baseURL + triggerPath}`) and keeps the trigger key the gateway answers,
    /// to verify trigger calls with.
    ///
    /// As Forge does, the lifecycle event is delivered again on a non-2xx answer (401 included), a
    /// timeout or a failed call, up to ``ForgeEmulatorConfiguration/eventRetries`` times,
    /// ``ForgeEmulatorConfiguration/eventRetryInterval`` apart; the registration (the companion's
    /// install handler) is made again the same way when the gateway answered 5xx (the handler asks
    /// Forge for a retry then; a 4xx is a configuration problem it only logs).
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` (operation `lifecycle` or
    ///   `register`) when the last delivery got a non-2xx answer,
    ///   ``ForgeEmulatorError/invalidRegistrationResponse``, ``ForgeEmulatorError/notRunning``, or
    ///   the HTTP client's error of the last delivery.
    ///
    /// With `lifecycleSystemToken` (default: ``ForgeEmulatorConfiguration/endpointsCarrySystemToken``),
    /// the lifecycle call and the registration each carry a fresh system token in
    /// `x-forge-oauth-system`, as an endpoint and a remote declared with `auth.appSystemToken` get it.
    public func install(_ installation: EmulatedInstallation, lifecycleSystemToken: Bool? = nil) async throws {
        let carriesToken = lifecycleSystemToken ?? self.configuration.endpointsCarrySystemToken
        let token = carriesToken ? try self.mintAccessToken(for: installation) : nil
        let answer = try await self.deliveredAsEvent(retryingWhen: { !(200..<300).contains($0) }) {
            try await self.sendLifecycleEvent(.installed, for: installation, systemToken: token).status
        }
        guard (200..<300).contains(answer) else {
            throw ForgeEmulatorError.unexpectedStatus(answer, operation: "lifecycle")
        }
        self.state.withLock { $0.update(installation) { $0.status = .installed } }
        let keyId = try await self.runInstallHandler(installation, systemToken: carriesToken)
        self.logger.info(
            "Installation installed",
            metadata: ["installation.id": "\(installation.id)", "trigger.key.id": "\(keyId ?? "")"]
        )
    }

    /// The companion's install handler, which runs on `installed` and `upgraded` alike
    /// (`Docs/forge-companion.md`): registers the web trigger, made again as Forge delivers events
    /// when the gateway answered 5xx or could not be reached (the companion returns an
    /// `InvocationError` for both; a 4xx is a configuration problem the handler only logs).
    /// Its `invokeRemote` carries a fresh system token when `systemToken` is set (a remote declared
    /// with `auth.appSystemToken`). Returns the trigger key id the gateway answered.
    private func runInstallHandler(_ installation: EmulatedInstallation, systemToken: Bool) async throws -> String? {
        let registered = try await self.deliveredAsEvent(retryingWhen: { $0 >= 500 }) {
            let token = systemToken ? try self.mintAccessToken(for: installation) : nil
            return try await self.register(installation, systemToken: token).status
        }
        guard (200..<300).contains(registered) else {
            throw ForgeEmulatorError.unexpectedStatus(registered, operation: "register")
        }
        return self.state.withLock { $0.record(for: installation)?.triggerKey?.keyId }
    }

    /// Runs `call` (one delivery of an event, answering its HTTP status) as Forge delivers events:
    /// again after ``ForgeEmulatorConfiguration/eventRetryInterval`` while `retryingWhen` says so
    /// of its status or it failed (a timeout, a refused connection), up to
    /// ``ForgeEmulatorConfiguration/eventRetries`` more times. Returns the last status, or throws
    /// the last failure. A ``ForgeEmulatorError`` (not running, an unusable answer) ends it at once.
    func deliveredAsEvent(retryingWhen retry: (Int) -> Bool, _ call: () async throws -> Int) async throws -> Int {
        var attempt = 0
        while true {
            do {
                let status = try await call()
                if !retry(status) || attempt >= self.configuration.eventRetries { return status }
            } catch let error as ForgeEmulatorError {
                throw error  // not a failed delivery (not running, an unusable answer)
            } catch {
                if attempt >= self.configuration.eventRetries { throw error }
            }
            attempt += 1
            try await Task.sleep(for: self.configuration.eventRetryInterval)
        }
    }

    /// Sends `POST {gateway}/forge/register` with `{"authTriggerUrl": …}` (default: this emulator's
    /// trigger URL for the installation). On 2xx it keeps the keys the answer names (the current
    /// one and, during a rotation, the next one), as the companion does, to verify later trigger
    /// calls with either. A non-2xx answer is returned, not thrown.
    /// - Parameters:
    ///   - authTriggerUrl: The URL to register; default ``triggerURL(for:)``.
    ///   - rotateKey: Sends `"rotateKey": true`, which starts a trigger-key rotation (the
    ///     companion's weekly `rotate` function).
    ///   - systemToken: When set, sent as `x-forge-oauth-system` (the gateway stores it as a push).
    ///   - triggers: Named triggers to send (a URL sets, nil removes); default every defined one.
    /// - Throws: ``ForgeEmulatorError/invalidRegistrationResponse`` when a 2xx answer has no usable
    ///   key, ``ForgeEmulatorError/notRunning``, or the HTTP client's error.
    public func register(
        _ installation: EmulatedInstallation,
        authTriggerUrl: String? = nil,
        rotateKey: Bool = false,
        systemToken: String? = nil,
        triggers: [String: String?]? = nil
    ) async throws -> RegisterResult {
        self.state.withLock { $0.remember(installation) }
        let url = authTriggerUrl ?? self.triggerURL(for: installation)
        var headers: [(String, String)] = []
        if let systemToken { headers.append(("x-forge-oauth-system", systemToken)) }
        let named = triggers ?? self.namedTriggersForRegistration(installation)
        let answer = try await self.callGateway(
            path: "/forge/register",
            gatewayURL: nil,
            fit: try self.mintFIT(for: installation),
            headers: headers,
            body: try JSONEncoder.emulator.encode(
                RegisterRequestBody(authTriggerUrl: url, rotateKey: rotateKey ? true : nil, triggers: named))
        )
        if answer.isSuccess, let systemToken { self.rememberDelivered(systemToken, for: installation) }
        if answer.isSuccess, let named {
            // Each function knows the keys it is registered under, and runs only calls naming one.
            self.namedTriggers.withLock {
                $0.registered(named, base: self.baseURL + "/x2/", installationId: installation.id)
            }
        }
        guard answer.isSuccess else {
            self.logger.info(
                "Registration refused",
                metadata: ["installation.id": "\(installation.id)", "http.status": "\(answer.status)"]
            )
            return RegisterResult(status: answer.status, triggerKeyId: nil, triggerPublicKey: nil, body: answer.body)
        }
        guard let decoded = try? JSONDecoder().decode(RegisterAnswerBody.self, from: Data(answer.body.utf8)),
            let key = Self.registeredKey(id: decoded.triggerKeyId, publicKey: decoded.triggerPublicKey)
        else {
            throw ForgeEmulatorError.invalidRegistrationResponse
        }
        var next: RegisteredTriggerKey?
        if let nextID = decoded.nextTriggerKeyId {
            guard let nextKey = Self.registeredKey(id: nextID, publicKey: decoded.nextTriggerPublicKey ?? "") else {
                throw ForgeEmulatorError.invalidRegistrationResponse
            }
            next = nextKey
        }
        self.state.withLock {
            $0.update(installation) {
                $0.triggerKey = key
                $0.nextTriggerKey = next
            }
        }
        self.logger.info(
            "Trigger registered",
            metadata: ["installation.id": "\(installation.id)", "trigger.key.id": "\(key.keyId)"]
        )
        return RegisterResult(
            status: answer.status,
            triggerKeyId: decoded.triggerKeyId,
            triggerPublicKey: decoded.triggerPublicKey,
            nextTriggerKeyId: decoded.nextTriggerKeyId,
            body: answer.body
        )
    }

    /// An answered key: a non-empty id and a base64url raw 32-byte Ed25519 public key, else nil.
    private static func registeredKey(id: String, publicKey: String) -> RegisteredTriggerKey? {
        guard !id.isEmpty, let raw = Base64URL.decode(publicKey), raw.count == 32,
            let key = try? Curve25519.Signing.PublicKey(rawRepresentation: raw)
        else { return nil }
        return RegisteredTriggerKey(keyId: id, publicKey: key)
    }

    /// Rotates the installation's web-trigger URL as `webTrigger.getUrl(key, forceCreate)` does
    /// (protocol §2a): a new URL, the old one answering 404 from now on. Then the companion
    /// registers the new URL with the gateway (with a system token, as on install, unless
    /// ``ForgeEmulatorConfiguration/endpointsCarrySystemToken`` is off). Returns that registration.
    /// - Throws: as ``register(_:authTriggerUrl:rotateKey:systemToken:triggers:)``.
    public func rotateTriggerURL(_ installation: EmulatedInstallation) async throws -> RegisterResult {
        self.state.withLock { $0.rotateTrigger(of: installation, to: "/x1/" + Self.randomTriggerId()) }
        let token = self.configuration.endpointsCarrySystemToken ? try self.mintAccessToken(for: installation) : nil
        let result = try await self.register(installation, systemToken: token)
        self.logger.info("Trigger URL rotated", metadata: ["installation.id": "\(installation.id)"])
        return result
    }

    /// Sends `avi:forge:upgraded:app`, delivered again as Forge delivers events (see
    /// ``install(_:lifecycleSystemToken:)``), then runs the companion's install handler as Forge
    /// does on a major upgrade: it registers the web trigger again, which repairs a lost or
    /// replaced registration (the gateway keeps the installation's key and takes the URL).
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` (operation `lifecycle` or
    ///   `register`) when the last delivery got a non-2xx answer,
    ///   ``ForgeEmulatorError/invalidRegistrationResponse``, or the HTTP client's error of the last
    ///   delivery.
    ///
    /// With `lifecycleSystemToken` (default: ``ForgeEmulatorConfiguration/endpointsCarrySystemToken``),
    /// the lifecycle call and the registration each carry a fresh system token in
    /// `x-forge-oauth-system`, as an endpoint and a remote declared with `auth.appSystemToken` get it.
    public func upgrade(_ installation: EmulatedInstallation, lifecycleSystemToken: Bool? = nil) async throws {
        let carriesToken = lifecycleSystemToken ?? self.configuration.endpointsCarrySystemToken
        let token = carriesToken ? try self.mintAccessToken(for: installation) : nil
        let answer = try await self.deliveredAsEvent(retryingWhen: { !(200..<300).contains($0) }) {
            try await self.sendLifecycleEvent(.upgraded, for: installation, systemToken: token).status
        }
        guard (200..<300).contains(answer) else {
            throw ForgeEmulatorError.unexpectedStatus(answer, operation: "lifecycle")
        }
        let keyId = try await self.runInstallHandler(installation, systemToken: carriesToken)
        self.logger.info(
            "Installation upgraded",
            metadata: ["installation.id": "\(installation.id)", "trigger.key.id": "\(keyId ?? "")"]
        )
    }

    /// Uninstalls the app as Forge does: invokes the `preUninstall` module's endpoint
    /// (`POST {gateway}/forge/pre-uninstall`), delivered again as Forge delivers events (see
    /// ``install(_:lifecycleSystemToken:)``); the web trigger answers 404 from then on. As on
    /// Forge, the `preUninstall` call does not block the uninstall: the app (and its web trigger)
    /// is gone whatever the gateway answered, and a failure is thrown afterwards.
    /// - Throws: ``ForgeEmulatorError/unexpectedStatus(_:operation:)`` (operation `pre-uninstall`)
    ///   when the last delivery got a non-2xx answer, or the HTTP client's error of the last delivery.
    public func uninstall(_ installation: EmulatedInstallation) async throws {
        let answer: Result<Int, any Error>
        do {
            answer = .success(
                try await self.deliveredAsEvent(retryingWhen: { !(200..<300).contains($0) }) {
                    try await self.preUninstall(installation).status
                })
        } catch {
            answer = .failure(error)
        }
        self.state.withLock {
            $0.update(installation) { record in
                record.status = .uninstalled
                record.triggerKey = nil
                record.nextTriggerKey = nil
            }
        }
        self.logger.info("Installation uninstalled", metadata: ["installation.id": "\(installation.id)"])
        let status = try answer.get()
        guard (200..<300).contains(status) else {
            throw ForgeEmulatorError.unexpectedStatus(status, operation: "pre-uninstall")
        }
    }

    /// Sends the `preUninstall` invocation to `POST {gateway}/forge/pre-uninstall` with a FIT made
    /// with `fit` (a `core:endpoint` FIT; Forge's may also name a non-user `principal`) and the
    /// body `{"context": {"cloudId", "moduleKey"}, "contextToken"}`, and returns the answer whatever
    /// its status. It does not change the emulator's record of the installation.
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    public func preUninstall(_ installation: EmulatedInstallation, fit: FITOptions = FITOptions()) async throws
        -> GatewayAnswer
    {
        self.state.withLock { $0.remember(installation) }
        let body = PreUninstallBody(
            context: .init(cloudId: installation.cloudId, moduleKey: Self.preUninstallModuleKey),
            contextToken: Self.randomHex(bytes: 32))
        let answer = try await self.callGateway(
            path: "/forge/pre-uninstall",
            gatewayURL: nil,
            fit: try self.mintFIT(for: installation, options: fit),
            headers: [],
            body: try JSONEncoder.emulator.encode(body),
            asEvent: true
        )
        self.logger.debug(
            "preUninstall answered",
            metadata: ["installation.id": "\(installation.id)", "http.status": "\(answer.status)"])
        return answer
    }

    /// Sends one lifecycle event to `POST {gateway}/forge/lifecycle` with a FIT made with `fit`,
    /// and returns the answer whatever its status. `installed` and `upgraded` carry Forge's
    /// documented body (no `eventType`; `permissions` on upgrade); `uninstalled` carries
    /// `"eventType": "avi:forge:uninstalled:app"` and the site ARI as `context`.
    /// - Parameter systemToken: Sent as `x-forge-oauth-system` when set (an endpoint declared with
    ///   `auth.appSystemToken`).
    /// - Throws: ``ForgeEmulatorError/notRunning`` or the HTTP client's error.
    public func sendLifecycleEvent(
        _ event: ForgeLifecycleEvent,
        for installation: EmulatedInstallation,
        fit: FITOptions = FITOptions(),
        systemToken: String? = nil
    ) async throws -> GatewayAnswer {
        self.state.withLock { $0.remember(installation) }
        let body = LifecycleBody(
            eventType: event == .uninstalled ? event.rawValue : nil,
            id: installation.id,
            installerAccountId: self.installerAccountId,
            app: .init(
                id: self.configuration.appId, version: Self.appVersion, name: Self.appName,
                ownerAccountId: self.installerAccountId),
            environment: .init(id: self.environmentId),
            permissions: event == .upgraded ? .init(scopes: Self.appScopes) : nil,
            context: event == .uninstalled ? installation.siteARI : nil
        )
        var headers: [(String, String)] = []
        if let systemToken { headers.append(("x-forge-oauth-system", systemToken)) }
        let answer = try await self.callGateway(
            path: "/forge/lifecycle",
            gatewayURL: nil,
            fit: try self.mintFIT(for: installation, options: fit),
            headers: headers,
            body: try JSONEncoder.emulator.encode(body),
            asEvent: true
        )
        if answer.isSuccess, let systemToken { self.rememberDelivered(systemToken, for: installation) }
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
