import AsyncHTTPClient
import Base64URLCoding
import Crypto
import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization
import _CryptoExtras

/// Settings of a ``ForgeEmulator``.
public struct ForgeEmulatorConfiguration: Sendable {
    /// The app id of the built-in demo app, used when none is given.
    public static let demoAppId = "ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"

    /// Address to listen on. Default `127.0.0.1`; the admin routes answer loopback clients only.
    public var host: String = "127.0.0.1"
    /// Port to listen on. Default `0`: an ephemeral port (see ``ForgeEmulator/waitUntilReady()``).
    public var port: Int = 0
    /// The Forge app id (`ari:cloud:ecosystem::app/<uuid>`), the FIT `aud` and `app.id`.
    public var appId: String
    /// Base URL of the gateway, such as `http://127.0.0.1:8080`. A trailing `/` is ignored.
    public var gatewayURL: String
    /// Lifetime of the access tokens the emulator mints when none is asked for. Default 1 h (Forge
    /// tokens live at most ``maximumTokenLifetime``). Scheduled pushes mint theirs with at least
    /// ``scheduledPushMinimumLifetime`` left, as Forge guarantees.
    public var tokenLifetime: Duration = .seconds(3600)
    /// The longest a Forge token lives: 4 h.
    public static let maximumTokenLifetime: Duration = .seconds(4 * 3600)
    /// What a scheduled trigger's token has left at least: Forge guarantees 2 h.
    public static let scheduledPushMinimumLifetime: Duration = .seconds(2 * 3600)
    /// When set, `run()` pushes a fresh token to every installed installation on this period.
    /// Default `nil`: no scheduled pushes.
    public var scheduledPushInterval: Duration? = nil
    /// Cap on each call to the gateway made as an `invokeRemote` (a registration, a delivery that
    /// answers a trigger call, a UI module's call): 25 s by default, Forge's limit.
    public var remoteCallTimeout: Duration = .seconds(25)
    /// How long a web trigger's function may run (Forge's runtime limit: 55 s). An invocation still
    /// running then is cut off, and the web trigger answers 500.
    public var webTriggerRuntimeLimit: Duration = .seconds(55)
    /// Cap on each event and scheduled-trigger call (lifecycle events, `preUninstall`, pushes):
    /// 5 s by default, Forge's limit for them.
    public var eventCallTimeout: Duration = .seconds(5)
    /// How often Forge delivers again an event or scheduled push that failed (non-2xx, timeout or
    /// 401): 4. Lifecycle events, `preUninstall` and the install handler's registration (on a 5xx)
    /// are retried so by ``ForgeEmulator/install(_:lifecycleSystemToken:)``,
    /// ``ForgeEmulator/upgrade(_:)`` and ``ForgeEmulator/uninstall(_:)``.
    public var eventRetries: Int = 4
    /// The wait between those retries: 60 s by default, as Forge waits.
    public var eventRetryInterval: Duration = .seconds(60)
    /// Named triggers (echoing) every registration defines and registers (`"triggers"`); default none.
    public var namedTriggerKeys: [String] = []
    /// Whether the app's lifecycle endpoint and its remote are declared with `auth.appSystemToken`,
    /// as the manifest of `Docs/forge-companion.md` declares them. Default `true`: lifecycle events
    /// (`installed`, `upgraded`) and the install handler's registration (an `invokeRemote`) carry a
    /// fresh system token in `x-forge-oauth-system`, so the gateway starts off with one, as Forge
    /// does. `false` models an app declared without it: an installation then starts with no token.
    public var endpointsCarrySystemToken = true

    /// Creates a configuration.
    /// - Parameters:
    ///   - appId: The Forge app id; default ``demoAppId``.
    ///   - gatewayURL: Base URL of the gateway.
    public init(appId: String = ForgeEmulatorConfiguration.demoAppId, gatewayURL: String) {
        self.appId = appId
        self.gatewayURL = gatewayURL
    }
}

/// One emulated Forge app installation on one site.
public struct EmulatedInstallation: Sendable, Hashable {
    /// The installation ARI, `ari:cloud:ecosystem::installation/<uuid>` (the FIT's `app.installationId`).
    public let id: String
    /// The site's cloud id.
    public let cloudId: String
    /// The product, such as `jira`.
    public let product: String
    /// `https://api.atlassian.com/ex/<product>/<cloudId>`; change it to send another one in FITs.
    public var apiBaseUrl: String
    /// The site ARI, `ari:cloud:<product>::site/<cloudId>` (the lifecycle event's `context`).
    public var siteARI: String
    /// Path of this installation's web trigger on the emulator, `/x1/<random id>`.
    public let triggerPath: String

    /// Creates an installation value from its parts. Most code wants
    /// ``ForgeEmulator/makeInstallation(product:)`` instead.
    public init(id: String, cloudId: String, product: String, apiBaseUrl: String, siteARI: String, triggerPath: String)
    {
        self.id = id
        self.cloudId = cloudId
        self.product = product
        self.apiBaseUrl = apiBaseUrl
        self.siteARI = siteARI
        self.triggerPath = triggerPath
    }

    /// The UUID part of ``id`` (what follows `installation/`).
    public var uuid: String {
        guard let slash = self.id.lastIndex(of: "/") else { return self.id }
        return String(self.id[self.id.index(after: slash)...])
    }
}

/// Plays Atlassian's side of the token gateway's protocols on a laptop or in tests: it serves a
/// JWKS, mints Forge Invocation Tokens and access tokens, sends lifecycle events and registrations,
/// answers the gateway's signed auth-trigger calls by delivering tokens to `/forge/auth-trigger`
/// (with injectable faults), pushes tokens unasked, and can do so on a schedule.
///
/// It is a `Service`: `run()` serves HTTP (see ``ForgeEmulator/makeRouter()`` for the routes) until
/// graceful shutdown or cancellation, and owns the HTTP client every outbound call uses, so calls
/// to the gateway (``install(_:)``, ``push(_:expiresAt:to:)``, …) work while `run()` runs.
/// Minting (``mintFIT(for:options:)``, ``mintAccessToken(for:expiresAt:)``) works at any time.
public final class ForgeEmulator: Sendable, Service {
    let configuration: ForgeEmulatorConfiguration
    let logger: Logger
    let keys: EmulatorKeys
    /// The Forge environment of the emulated app (one per emulator).
    let environmentId: String
    /// The account that "installs" every installation.
    let installerAccountId: String
    let state: Mutex<EmulatorState>
    /// The Connect side's state (tenants, install keys); see `ForgeEmulator+Connect.swift`.
    let connect: Mutex<ConnectEmulatorState>
    /// The GraphQL gateway's state (user-token exchanges); see `ForgeEmulator+GraphQL.swift`.
    let graphQL: Mutex<EmulatorGraphQLState>
    /// Named triggers; see `ForgeEmulator+NamedTriggers.swift`.
    let namedTriggers = Mutex(EmulatorNamedTriggers())
    /// The streams of ``callEvents()``.
    let callListeners = Mutex((next: UInt64(0), streams: [UInt64: AsyncStream<Void>.Continuation]()))

    /// Creates an emulator with fresh keys (two 2048-bit RSA keys and an HMAC key).
    /// - Throws: if key generation fails.
    public init(configuration: ForgeEmulatorConfiguration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        self.keys = try EmulatorKeys()
        self.environmentId = UUID().uuidString.lowercased()
        self.installerAccountId = "557058:" + UUID().uuidString.lowercased()
        self.state = Mutex(EmulatorState(gatewayURL: configuration.gatewayURL))
        self.connect = Mutex(ConnectEmulatorState())
        self.graphQL = Mutex(EmulatorGraphQLState())
    }

    // MARK: Service

    /// Serves HTTP on the configured address until graceful shutdown or cancellation; runs the
    /// scheduled pushes and late deliveries; shuts the HTTP client down before returning.
    /// - Throws: ``ForgeEmulatorError/alreadyRunning``, or the server's error (such as a bind failure).
    public func run() async throws {
        // Forge counts a redirect as an error (protocol: "Redirects count as errors"): a 3xx
        // is answered as it is, never followed.
        var clientConfiguration = HTTPClient.Configuration()
        clientConfiguration.redirectConfiguration = .disallow
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: clientConfiguration)
        let (jobs, jobsContinuation) = AsyncStream.makeStream(of: DeferredJob.self)
        do {
            try self.state.withLock { try $0.start(client: client, jobs: jobsContinuation) }
        } catch {
            try await client.shutdown()
            throw error
        }

        let app = Application(
            router: self.makeRouter(),
            configuration: .init(address: .hostname(self.configuration.host, port: self.configuration.port)),
            onServerRunning: { channel in
                // Only record the port here: Hummingbird accepts connections once this returns.
                self.serverDidStart(port: channel.localAddress?.port)
            },
            logger: self.logger
        )

        let outcome: Result<Void, any Error>
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await app.run()
                }
                group.addTask {
                    await withDiscardingTaskGroup { jobGroup in
                        for await job in jobs {
                            jobGroup.addTask { await job.run() }
                        }
                    }
                }
                if let interval = self.configuration.scheduledPushInterval {
                    group.addTask {
                        try? await self.runScheduledPushes(every: interval)
                    }
                }
                // The server ends on graceful shutdown, cancellation or error; everything else
                // follows it.
                defer { group.cancelAll() }
                try await group.next()
            }
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }

        let waiters = self.state.withLock { $0.stop() }
        jobsContinuation.finish()
        for waiter in waiters {
            waiter.resume(throwing: ForgeEmulatorError.stopped)
        }
        try await client.shutdown()
        try outcome.get()
    }

    /// Waits until `run()` has bound its socket and returns the port.
    /// - Throws: ``ForgeEmulatorError/stopped`` when `run()` ends first (such as on a bind
    ///   failure), `CancellationError` when the waiting task is cancelled.
    public func waitUntilReady() async throws -> Int {
        let id = UUID()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                let immediate = self.state.withLock { $0.addReadyWaiter(id: id, continuation) }
                switch immediate {
                case .wait: break
                case .ready(let port): continuation.resume(returning: port)
                case .fail(let error): continuation.resume(throwing: error)
                }
            }
        } onCancel: {
            let waiter = self.state.withLock { $0.removeReadyWaiter(id: id) }
            waiter?.resume(throwing: CancellationError())
        }
    }

    /// The emulator's base URL, `http://<host>:<port>`; meaningful once ``waitUntilReady()`` returned.
    public var baseURL: String {
        let port = self.state.withLock { $0.boundPort } ?? self.configuration.port
        let host = self.configuration.host.contains(":") ? "[\(self.configuration.host)]" : self.configuration.host
        return "http://\(host):\(port)"
    }

    /// The JWKS URL to give the gateway (`TOKEN_GATEWAY_FORGE_JWKS_URL`).
    public var jwksURL: String { self.baseURL + "/.well-known/jwks.json" }

    /// The entry for the gateway's `TOKEN_GATEWAY_TRIGGER_HOSTS` that allows this emulator's
    /// trigger URLs, `http://<host>:<port>`.
    public var triggerHostEntry: String { self.baseURL }

    /// The gateway base URL outbound calls go to when no other is named; starts as the
    /// configuration's ``ForgeEmulatorConfiguration/gatewayURL``.
    public var gatewayURL: String {
        self.state.withLock { $0.gatewayURL }
    }

    /// Points later outbound calls (lifecycle events, registrations, deliveries, pushes) at another
    /// gateway base URL. For set-ups where the gateway needs the emulator's JWKS URL before its own
    /// port is known: start the emulator with a placeholder, then set the real URL here.
    public func setGatewayURL(_ gatewayURL: String) {
        self.state.withLock { $0.gatewayURL = gatewayURL }
        self.logger.info("Gateway URL set", metadata: ["forge.emulator.gateway.url": "\(gatewayURL)"])
    }

    /// The full web-trigger URL of an installation on this emulator (the rotated one after
    /// ``rotateTriggerURL(_:)``).
    public func triggerURL(for installation: EmulatedInstallation) -> String {
        self.baseURL + (self.state.withLock { $0.record(for: installation)?.triggerPath } ?? installation.triggerPath)
    }

    // MARK: Installations

    /// Creates a new installation on a new site (fresh UUIDs and trigger path) and remembers it, so
    /// its web trigger answers. Nothing is sent to the gateway; see ``install(_:)``.
    public func makeInstallation(product: String = "jira", uuid: String? = nil) -> EmulatedInstallation {
        let cloudId = UUID().uuidString.lowercased()
        let installation = EmulatedInstallation(
            id: "ari:cloud:ecosystem::installation/" + (uuid ?? UUID().uuidString.lowercased()),
            cloudId: cloudId,
            product: product,
            apiBaseUrl: "https://api.atlassian.com/ex/\(product)/\(cloudId)",
            siteARI: "ari:cloud:\(product)::site/\(cloudId)",
            triggerPath: "/x1/" + Self.randomTriggerId()
        )
        self.state.withLock { $0.remember(installation) }
        return installation
    }

    /// Every installation the emulator knows, in creation order.
    public var installations: [EmulatedInstallation] {
        self.state.withLock { $0.orderedRecords.map(\.installation) }
    }

    /// The installation whose id is `id`: the full ARI or the UUID after `installation/`.
    public func installation(withId id: String) -> EmulatedInstallation? {
        self.state.withLock { $0.record(matching: id)?.installation }
    }

    // MARK: Internals

    private func serverDidStart(port: Int?) {
        let port = port ?? self.configuration.port
        let waiters = self.state.withLock { $0.serverDidStart(port: port) }
        self.logger.info("Forge emulator listening", metadata: ["forge.emulator.port": "\(port)"])
        for waiter in waiters { waiter.resume(returning: port) }
    }

    /// Every `interval`, a push to every installed installation, each on its own (a push being
    /// retried does not hold up the next round).
    private func runScheduledPushes(every interval: Duration) async throws {
        try await withThrowingDiscardingTaskGroup { group in
            while true {
                try await Task.sleep(for: interval)
                // One push at a time per installation: one still being retried is skipped.
                let due = self.state.withLock { state in
                    let installed = state.orderedRecords.filter { $0.status == .installed }.map(\.installation)
                    let due = installed.filter { !state.retryingPushes.contains($0.id) }
                    state.retryingPushes.formUnion(due.map(\.id))
                    return due
                }
                for installation in due {
                    group.addTask {
                        await self.scheduledPush(installation)
                        _ = self.state.withLock { $0.retryingPushes.remove(installation.id) }
                    }
                }
            }
        }
    }

    /// One scheduled trigger's call, as Forge makes it: a token with at least 2 h left (whatever the
    /// lifetime of the tokens minted for round trips), retried with the same token up to
    /// ``ForgeEmulatorConfiguration/eventRetries`` times, ``ForgeEmulatorConfiguration/eventRetryInterval``
    /// apart, on a non-2xx answer (401 included) or a failed call (a timeout included).
    func scheduledPush(_ installation: EmulatedInstallation) async {
        let lifetime = max(self.configuration.tokenLifetime, ForgeEmulatorConfiguration.scheduledPushMinimumLifetime)
        guard
            let token = try? self.mintAccessToken(
                for: installation, expiresAt: Date().addingTimeInterval(Self.seconds(lifetime)))
        else { return }
        for attempt in 0...max(self.configuration.eventRetries, 0) {
            // Forge stops calling an installation once the app is uninstalled (a retry included).
            guard self.state.withLock({ $0.record(for: installation)?.status == .installed }) else { return }
            let metadata: Logger.Metadata = ["installation.id": "\(installation.id)", "attempt": "\(attempt + 1)"]
            do {
                let result = try await self.deliver(installation, systemToken: token, requestId: nil)
                self.logger.debug(
                    "Scheduled push answered", metadata: metadata.merging(["http.status": "\(result.status)"]) { $1 })
                if (200..<300).contains(result.status) { return }
            } catch {
                self.logger.warning("Scheduled push failed", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            }
            guard attempt < self.configuration.eventRetries else { return }
            do {
                try await Task.sleep(for: self.configuration.eventRetryInterval)
            } catch {
                return
            }

        }
    }

    /// The HTTP client of the running emulator.
    func httpClient() throws -> HTTPClient {
        guard let client = self.state.withLock({ $0.client }) else { throw ForgeEmulatorError.notRunning }
        return client
    }

    /// Hands work that must outlive a request (a late delivery) to `run()`'s task group.
    func schedule(_ job: DeferredJob) {
        let continuation = self.state.withLock { $0.jobs }
        continuation?.yield(job)
    }

    static func randomTriggerId() -> String {
        Base64URL.encode(SymmetricKey(size: .bits128).withUnsafeBytes { Data($0) })
    }

    static func randomHex(bytes count: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in String(format: "%02x", UInt8.random(in: .min ... .max, using: &generator)) }
            .joined()
    }
}

/// Work `run()` executes in its own task group (so it ends with `run()`).
struct DeferredJob: Sendable {
    let run: @Sendable () async -> Void
}
