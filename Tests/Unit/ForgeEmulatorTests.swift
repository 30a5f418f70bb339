import AsyncHTTPClient
import Base64URLCoding
import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import JWTKit
import Logging
import NIOCore
import Synchronization
import Testing

@testable import ForgeEmulator

// MARK: - A minimal gateway on loopback

/// What the fake gateway checks in every FIT.
private struct FakeGatewayFITClaims: JWTPayload {
    struct App: Codable, Sendable {
        var installationId: String
    }

    var iss: IssuerClaim
    var aud: AudienceClaim
    var exp: ExpirationClaim
    var app: App

    func verify(using _: some JWTAlgorithm) async throws {
        try self.exp.verifyNotExpired()
        guard self.iss.value == "forge/invocation-token" else {
            throw JWTError.claimVerificationFailure(failedClaim: self.iss, reason: "iss")
        }
    }
}

private struct ForgeEmulatorTestTimeout: Error {}

/// Runs `operation`, failing with `ForgeEmulatorTestTimeout` if it takes longer than `limit`.
private func withDeadline<T: Sendable>(
    _ limit: Duration = .seconds(10),
    _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw ForgeEmulatorTestTimeout()
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}

/// Plays the gateway's side of the routes Forge calls: verifies FITs with the emulator's JWKS,
/// hands out one Ed25519 trigger key, records lifecycle events, registrations and deliveries.
private final class FakeGateway: Sendable {
    struct Delivery: Sendable {
        let installationId: String
        let requestId: String?
        let systemToken: String?
        let traceId: String?
    }

    private struct State {
        var deliveries: [Delivery] = []
        var events: [String] = []
        var registeredURLs: [String] = []
        var deliveryStatus = 200
        var hangDeliveries = false
        /// Per route (`lifecycle`, `register`, `pre-uninstall`): statuses to answer first, in order.
        var failures: [String: [Int]] = [:]
        var calls: [String: Int] = [:]
        var waiters: [UUID: (count: Int, continuation: CheckedContinuation<Void, any Error>)] = [:]
    }

    let signingKey = Curve25519.Signing.PrivateKey()
    let keyId = "tk_fake_gateway"
    let verifier = JWTKeyCollection()
    private let state = Mutex(State())

    var deliveries: [Delivery] { self.state.withLock { $0.deliveries } }
    var events: [String] { self.state.withLock { $0.events } }
    var registeredURLs: [String] { self.state.withLock { $0.registeredURLs } }

    func setDeliveryStatus(_ status: Int) {
        self.state.withLock { $0.deliveryStatus = status }
    }

    /// The next calls of `route` (`lifecycle`, `register`, `pre-uninstall`) answer these statuses.
    func fail(_ route: String, with statuses: [Int]) {
        self.state.withLock { $0.failures[route] = statuses }
    }

    /// How many calls `route` got.
    func calls(_ route: String) -> Int { self.state.withLock { $0.calls[route, default: 0] } }

    /// Counts a call of `route` and answers the failure status queued for it, if any.
    private func failure(_ route: String) -> Response? {
        let status = self.state.withLock { s -> Int? in
            s.calls[route, default: 0] += 1
            guard var queued = s.failures[route], !queued.isEmpty else { return nil }
            let status = queued.removeFirst()
            s.failures[route] = queued
            return status
        }
        return status.map { Self.json(HTTPResponse.Status(code: $0), "{}") }
    }

    /// Deliveries are held unanswered until ``releaseHeldDeliveries()``.
    private let held = AsyncStream<Void>.makeStream()

    func holdDeliveries() {
        self.state.withLock { $0.hangDeliveries = true }
    }

    func releaseHeldDeliveries() {
        self.state.withLock { $0.hangDeliveries = false }
        self.held.continuation.finish()
    }

    /// Waits until at least `count` deliveries arrived.
    func waitForDeliveries(_ count: Int) async throws -> [Delivery] {
        let id = UUID()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let ready = self.state.withLock { state -> Bool in
                    if state.deliveries.count >= count { return true }
                    state.waiters[id] = (count, continuation)
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            self.state.withLock { $0.waiters.removeValue(forKey: id) }?.continuation.resume(
                throwing: CancellationError())
        }
        return self.deliveries
    }

    private func record(_ delivery: Delivery) -> Int {
        let (status, ready) = self.state.withLock { state in
            state.deliveries.append(delivery)
            let ready = state.waiters.filter { $0.value.count <= state.deliveries.count }
            for id in ready.keys { state.waiters.removeValue(forKey: id) }
            return (state.deliveryStatus, ready.values.map(\.continuation))
        }
        for continuation in ready { continuation.resume() }
        return status
    }

    private func verifiedInstallation(_ request: Request) async -> String? {
        guard let authorization = request.headers[.authorization], authorization.hasPrefix("Bearer ") else {
            return nil
        }
        return try? await self.verifier.verify(String(authorization.dropFirst(7)), as: FakeGatewayFITClaims.self).app
            .installationId
    }

    private static func json(_ status: HTTPResponse.Status, _ text: String) -> Response {
        Response(
            status: status, headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    func makeRouter() -> Router<BasicRequestContext> {
        let router = Router()
        router.post("/forge/lifecycle") { request, _ -> Response in
            guard await self.verifiedInstallation(request) != nil else { return Self.json(.unauthorized, "{}") }
            if let failure = self.failure("lifecycle") { return failure }
            let body = try await request.body.collect(upTo: 65536)
            let object = try JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any]
            // Forge's documented body has no eventType; an upgrade lists permissions.
            let event = object?["eventType"] as? String ?? (object?["permissions"] != nil ? "upgraded" : "installed")
            self.state.withLock { $0.events.append(event) }
            return Self.json(.ok, "{}")
        }
        router.post("/forge/pre-uninstall") { request, _ -> Response in
            guard await self.verifiedInstallation(request) != nil else { return Self.json(.unauthorized, "{}") }
            if let failure = self.failure("pre-uninstall") { return failure }
            let body = try await request.body.collect(upTo: 65536)
            let object = try JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any]
            let context = object?["context"] as? [String: Any]
            let ok =
                context?["cloudId"] is String && context?["moduleKey"] is String && object?["contextToken"] is String
            self.state.withLock { $0.events.append(ok ? "preUninstall" : "malformed preUninstall") }
            return Self.json(.ok, "{}")
        }
        router.post("/forge/register") { request, _ -> Response in
            guard let installationId = await self.verifiedInstallation(request) else {
                return Self.json(.unauthorized, "{}")
            }
            if let failure = self.failure("register") { return failure }
            let body = try await request.body.collect(upTo: 65536)
            let object = try JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any]
            guard let url = object?["authTriggerUrl"] as? String else { return Self.json(.badRequest, "{}") }
            self.state.withLock { $0.registeredURLs.append(url) }
            let publicKey = Base64URL.encode(self.signingKey.publicKey.rawRepresentation)
            return Self.json(
                .ok,
                #"{"installationId":"\#(installationId)","triggerKeyId":"\#(self.keyId)","triggerPublicKey":"\#(publicKey)"}"#
            )
        }
        // A proxy that redirects to the real route (Forge does not follow it).
        router.post("/moved/forge/auth-trigger") { _, _ -> Response in
            Response(status: .temporaryRedirect, headers: [.location: "/forge/auth-trigger"])
        }
        router.post("/forge/auth-trigger") { request, _ -> Response in
            guard let installationId = await self.verifiedInstallation(request) else {
                return Self.json(.unauthorized, "{}")
            }
            if self.state.withLock({ $0.hangDeliveries }) {
                for await _ in self.held.stream {}
            }
            let body = try await request.body.collect(upTo: 65536)
            let object = try JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any]
            let status = self.record(
                Delivery(
                    installationId: installationId,
                    requestId: object?["requestId"] as? String,
                    systemToken: request.headers[HTTPField.Name("x-forge-oauth-system")!],
                    traceId: request.headers[HTTPField.Name("x-b3-traceid")!]
                )
            )
            return Self.json(HTTPResponse.Status(code: status), #"{"stored":true}"#)
        }
        return router
    }
}

private let silentLogger = Logger(label: "forge-emulator-test", factory: { _ in SwiftLogNoOpLogHandler() })

/// Two redeliveries of a failed event or push, 10 ms apart (Forge: four, 60 s apart).
private let fastEventRetries: @Sendable (inout ForgeEmulatorConfiguration) -> Void = {
    $0.eventRetries = 2
    $0.eventRetryInterval = .milliseconds(10)
}

/// Starts `count` fake gateways and an emulator pointed at the first, runs `body`, then stops all.
private func withEmulator(
    gateways count: Int = 1,
    configure: @Sendable (inout ForgeEmulatorConfiguration) -> Void = { _ in },
    _ body: @Sendable (ForgeEmulator, [FakeGateway], [String]) async throws -> Void
) async throws {
    let gateways = (0..<count).map { _ in FakeGateway() }
    try await withThrowingTaskGroup(of: Void.self) { group in
        var urls: [String] = []
        for gateway in gateways {
            let (ports, portContinuation) = AsyncStream.makeStream(of: Int.self)
            let app = Application(
                router: gateway.makeRouter(),
                configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                onServerRunning: { channel in portContinuation.yield(channel.localAddress?.port ?? 0) },
                logger: silentLogger
            )
            group.addTask { try await app.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            urls.append("http://127.0.0.1:\(port)")
        }

        var configuration = ForgeEmulatorConfiguration(gatewayURL: urls[0])
        configure(&configuration)
        let emulator = try ForgeEmulator(configuration: configuration, logger: silentLogger)
        for gateway in gateways {
            _ = try await gateway.verifier.add(jwksJSON: emulator.jwksJSON)
        }
        group.addTask { try await emulator.run() }
        _ = try await withDeadline { try await emulator.waitUntilReady() }

        do {
            try await body(emulator, gateways, urls)
        } catch {
            group.cancelAll()
            throw error
        }
        group.cancelAll()
    }
}

/// Calls an installation's web trigger as the gateway does; returns the status.
private func callTrigger(
    _ emulator: ForgeEmulator,
    _ installation: EmulatedInstallation,
    gateway: FakeGateway,
    requestId: String = UUID().uuidString,
    installationId: String? = nil,
    expiresIn: Int = 30,
    keyId: String? = nil,
    signingKey: Curve25519.Signing.PrivateKey? = nil,
    header: String?? = .none,
    path: String? = nil
) async throws -> Int {
    let now = Int(Date().timeIntervalSince1970)
    let body = Data(
        #"{"requestId":"\#(requestId)","installationId":"\#(installationId ?? installation.id)","issuedAt":\#(now),"expiresAt":\#(now + expiresIn)}"#
            .utf8
    )
    var request = HTTPClientRequest(url: emulator.baseURL + (path ?? installation.triggerPath))
    request.method = .POST
    request.headers.add(name: "content-type", value: "application/json")
    let signature = try TriggerSignature.sign(
        body: body,
        keyId: keyId ?? gateway.keyId,
        privateKey: signingKey ?? gateway.signingKey
    )
    switch header {
    case .none: request.headers.add(name: TriggerSignature.headerName, value: signature.headerValue)
    case .some(.some(let value)): request.headers.add(name: TriggerSignature.headerName, value: value)
    case .some(.none): break
    }
    request.body = .bytes(ByteBuffer(data: body))
    let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
    _ = try await response.body.collect(upTo: 1 << 20)
    return Int(response.status.code)
}

private func tokenExpiry(_ token: String) throws -> Int {
    let payload = Data(try #require(Base64URL.decode(token.split(separator: ".")[1])))
    let object = try #require(try JSONSerialization.jsonObject(with: payload) as? [String: Any])
    return try #require(object["exp"] as? Int)
}

private func get(_ url: String) async throws -> (status: Int, body: String) {
    let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(10))
    return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
}

private func post(_ url: String, json: String? = nil) async throws -> (status: Int, body: String) {
    var request = HTTPClientRequest(url: url)
    request.method = .POST
    if let json {
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(string: json))
    }
    let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
    return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
}

// MARK: - Tests

@Suite struct ForgeEmulatorTests {
    @Test func servesItsJWKSOverLoopback() async throws {
        let emulator = try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:1"),
            logger: silentLogger
        )
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await emulator.run() }
            let port = try await withDeadline { try await emulator.waitUntilReady() }
            #expect(port > 0)
            #expect(emulator.baseURL == "http://127.0.0.1:\(port)")
            #expect(emulator.triggerHostEntry == emulator.baseURL)
            #expect(emulator.jwksURL == "http://127.0.0.1:\(port)/.well-known/jwks.json")
            #expect(try await emulator.waitUntilReady() == port)

            let response = try await get(emulator.jwksURL)
            #expect(response.status == 200)
            #expect(response.body == emulator.jwksJSON)
            let keys = try await JWTKeyCollection().add(jwksJSON: response.body)
            _ = try await keys.getKey(for: JWKIdentifier(string: emulator.signingKeyId))

            await #expect(throws: ForgeEmulatorError.alreadyRunning) { try await emulator.run() }
            group.cancelAll()
        }
        // run() returned: the HTTP client is gone and waiting for readiness fails at once.
        await #expect(throws: ForgeEmulatorError.stopped) { try await emulator.waitUntilReady() }
        await #expect(throws: ForgeEmulatorError.notRunning) { try await emulator.push(emulator.makeInstallation()) }
    }

    @Test func outboundCallsNeedRun() async throws {
        let emulator = try ForgeEmulator(configuration: .init(gatewayURL: "http://127.0.0.1:1"), logger: silentLogger)
        await #expect(throws: ForgeEmulatorError.notRunning) { try await emulator.install(emulator.makeInstallation()) }
    }

    @Test func aBindFailureEndsRunAndFailsWaiters() async throws {
        try await withEmulator { first, _, urls in
            var configuration = ForgeEmulatorConfiguration(gatewayURL: urls[0])
            configuration.port = try await first.waitUntilReady()
            let second = try ForgeEmulator(configuration: configuration, logger: silentLogger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await #expect(throws: (any Error).self) { try await second.run() } }
                await #expect(throws: ForgeEmulatorError.stopped) {
                    try await withDeadline { try await second.waitUntilReady() }
                }
                try await group.waitForAll()
            }
        }
    }

    @Test func installSendsTheLifecycleEventAndRegistersTheTrigger() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            #expect(gateway.events == ["installed"])
            #expect(gateway.registeredURLs == [emulator.triggerURL(for: installation)])
            #expect(emulator.triggerURL(for: installation) == emulator.baseURL + installation.triggerPath)

            let result = try await emulator.register(installation, authTriggerUrl: "https://elsewhere.example/x1/a")
            #expect(result.status == 200)
            #expect(result.triggerKeyId == gateway.keyId)
            #expect(result.triggerPublicKey == Base64URL.encode(gateway.signingKey.publicKey.rawRepresentation))
            #expect(gateway.registeredURLs.last == "https://elsewhere.example/x1/a")

            // An upgrade runs the install handler again: the registration points at the web
            // trigger once more (a lost or replaced registration is repaired), and it works.
            try await emulator.upgrade(installation)
            #expect(gateway.events == ["installed", "upgraded"])
            #expect(
                gateway.registeredURLs == [
                    emulator.triggerURL(for: installation), "https://elsewhere.example/x1/a",
                    emulator.triggerURL(for: installation),
                ])
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 200)
            #expect(gateway.deliveries.count == 1)

            try await emulator.uninstall(installation)
            #expect(gateway.events == ["installed", "upgraded", "preUninstall"])
            // The web trigger is gone with the app.
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 404)
            #expect(emulator.triggerRecords(for: installation).map(\.answeredStatus) == [200, 404])
            #expect(gateway.deliveries.count == 1)
        }
    }

    @Test func lifecycleEventWithADefectiveFITIsRefused() async throws {
        try await withEmulator { emulator, _, _ in
            var options = FITOptions()
            options.signWithUnpublishedKey = true
            let installation = emulator.makeInstallation()
            let answer = try await emulator.sendLifecycleEvent(.installed, for: installation, fit: options)
            #expect(answer.status == 401)
        }
    }

    @Test func aSignedTriggerCallDeliversAFreshToken() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)

            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "req-1") == 200)
            let delivery = try #require(gateway.deliveries.first)
            #expect(gateway.deliveries.count == 1)
            #expect(delivery.installationId == installation.id)
            #expect(delivery.requestId == "req-1")
            #expect(delivery.traceId?.count == 32)
            let token = try #require(delivery.systemToken)
            #expect(emulator.lastDeliveredToken(for: installation) == token)
            let lifetime = try tokenExpiry(token) - Int(Date().timeIntervalSince1970)
            #expect(lifetime > 3500 && lifetime <= 3600)

            let records = emulator.triggerRecords(for: installation)
            #expect(records.count == 1)
            #expect(records[0].signatureValid)
            #expect(records[0].keyId == gateway.keyId)
            #expect(records[0].requestId == "req-1")
            #expect(records[0].answeredStatus == 200)
            #expect(records[0].expiresAt != nil)
            #expect(emulator.triggerCalls(for: installation) == 1)
            #expect(emulator.totalTriggerCalls == 1)

            // The gateway refusing the delivery makes the trigger answer 502.
            gateway.setDeliveryStatus(500)
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 502)
        }
    }

    @Test func triggerCallsThatFailVerificationAreRefusedWithoutDelivery() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            let other = emulator.makeInstallation()

            #expect(try await callTrigger(emulator, installation, gateway: gateway, signingKey: .init()) == 401)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, keyId: "tk_other") == 401)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, header: .some(nil)) == 401)
            #expect(
                try await callTrigger(
                    emulator, installation, gateway: gateway, header: "keyId=\(gateway.keyId),signature=AAAA") == 401)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, expiresIn: -5) == 400)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, installationId: other.id) == 400)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, path: "/x1/unknown") == 404)
            // Made but never registered: no key to verify with.
            #expect(try await callTrigger(emulator, other, gateway: gateway) == 401)

            #expect(gateway.deliveries.isEmpty)
            let records = emulator.triggerRecords(for: installation)
            #expect(records.map(\.answeredStatus) == [401, 401, 401, 401, 400, 400])
            #expect(records.map(\.signatureValid) == [false, false, false, false, true, true])
            #expect(emulator.triggerCalls(for: installation) == 6)
            #expect(emulator.totalTriggerCalls == 8)
        }
    }

    @Test func failWithAnswersTheStatusThenRecovers() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            emulator.setFault(.failWith(status: 503, times: 2), for: installation)
            #expect(emulator.fault(for: installation) == .failWith(status: 503, times: 2))

            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 503)
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 503)
            #expect(gateway.deliveries.isEmpty)
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 200)
            #expect(gateway.deliveries.count == 1)
        }
    }

    @Test func acceptWithoutDeliveryAnswers200AndDeliversNothing() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            // The install's own token (sent with its lifecycle event and registration) is the last.
            let installed = emulator.lastDeliveredToken(for: installation)
            #expect(installed != nil)
            emulator.setFault(.acceptWithoutDelivery, for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateway) == 200)
            #expect(gateway.deliveries.isEmpty)
            #expect(emulator.lastDeliveredToken(for: installation) == installed)

            emulator.setFault(.none, for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "after") == 200)
            #expect(gateway.deliveries.map(\.requestId) == ["after"])
        }
    }

    @Test func deliverTwiceSendsTheSameTokenTwiceBeforeAnswering() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            emulator.setFault(.deliverTwice, for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "twice") == 200)
            let deliveries = gateway.deliveries
            #expect(deliveries.count == 2)
            #expect(deliveries.map(\.requestId) == ["twice", "twice"])
            #expect(deliveries[0].systemToken != nil && deliveries[0].systemToken == deliveries[1].systemToken)
        }
    }

    @Test func redeliverCachedSendsTheTokenDeliveredLastAgain() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            let pushed = try await emulator.push(installation, expiresAt: Date().addingTimeInterval(900))
            emulator.setFault(.redeliverCached, for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "again") == 200)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "once-more") == 200)
            let deliveries = gateway.deliveries
            #expect(deliveries.map(\.requestId) == [nil, "again", "once-more"])
            // The same token string, so the same exp: Forge's cache handing out what it handed out before.
            #expect(deliveries.allSatisfy { $0.systemToken == pushed.token })

            // With nothing delivered yet (an install without a token), one token is minted and from
            // then on re-delivered.
            let fresh = emulator.makeInstallation()
            try await emulator.install(fresh, lifecycleSystemToken: false)
            #expect(emulator.lastDeliveredToken(for: fresh) == nil)
            emulator.setFault(.redeliverCached, for: fresh)
            #expect(try await callTrigger(emulator, fresh, gateway: gateway, requestId: "first") == 200)
            #expect(try await callTrigger(emulator, fresh, gateway: gateway, requestId: "second") == 200)
            let tokens = gateway.deliveries.suffix(2).map(\.systemToken)
            #expect(tokens[0] != nil && tokens[0] == tokens[1] && tokens[0] == emulator.lastDeliveredToken(for: fresh))
        }
    }

    @Test func deliverLateAnswersFirstAndDeliversAfterTheDelay() async throws {
        try await withEmulator { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            emulator.setFault(.deliverLate(.seconds(2)), for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateway, requestId: "late") == 200)
            #expect(gateway.deliveries.isEmpty)
            let deliveries = try await withDeadline { try await gateway.waitForDeliveries(1) }
            #expect(deliveries.map(\.requestId) == ["late"])
        }
    }

    @Test func deliverViaSendsToAnotherReplica() async throws {
        try await withEmulator(gateways: 2) { emulator, gateways, urls in
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            emulator.setFault(.deliverVia(gatewayURL: urls[1]), for: installation)
            #expect(try await callTrigger(emulator, installation, gateway: gateways[0], requestId: "via") == 200)
            #expect(gateways[0].deliveries.isEmpty)
            #expect(gateways[1].deliveries.map(\.requestId) == ["via"])
        }
    }

    @Test func pushDeliversAnUnaskedTokenWithTheRequestedExpiry() async throws {
        try await withEmulator(gateways: 2) { emulator, gateways, urls in
            let installation = emulator.makeInstallation()
            let expiresAt = Date().addingTimeInterval(7200)
            let result = try await emulator.push(installation, expiresAt: expiresAt)
            #expect(result.status == 200)
            #expect(result.body == #"{"stored":true}"#)
            #expect(try tokenExpiry(result.token) == Int(expiresAt.timeIntervalSince1970))
            let delivery = try #require(gateways[0].deliveries.first)
            #expect(delivery.requestId == nil)
            #expect(delivery.systemToken == result.token)
            #expect(emulator.lastDeliveredToken(for: installation) == result.token)

            _ = try await emulator.push(installation, to: urls[1])
            #expect(gateways[1].deliveries.count == 1)

            // Raw deliveries: no token, a defective FIT.
            let missing = try await emulator.deliver(installation, systemToken: nil, requestId: "r")
            #expect(missing.token == "")
            #expect(gateways[0].deliveries.last?.systemToken == nil)
            var options = FITOptions()
            options.algorithm = .none
            let refused = try await emulator.deliver(installation, systemToken: "t", requestId: nil, fit: options)
            #expect(refused.status == 401)
            #expect(gateways[0].deliveries.count == 2)
        }
    }

    @Test(
        "scheduled pushes reach every installed installation, each token with at least 2 h left (Forge's guarantee) even when minted tokens live shorter"
    )
    func scheduledPushesReachEveryInstalledInstallation() async throws {
        try await withEmulator(configure: {
            $0.scheduledPushInterval = .milliseconds(50)
            $0.tokenLifetime = .seconds(600)
        }) { emulator, gateways, _ in
            let installed = emulator.makeInstallation()
            try await emulator.install(installed)
            _ = emulator.makeInstallation()  // never installed: no pushes
            let deliveries = try await withDeadline { try await gateways[0].waitForDeliveries(3) }
            #expect(deliveries.allSatisfy { $0.installationId == installed.id && $0.requestId == nil })
            let now = Int(Date().timeIntervalSince1970)
            for delivery in deliveries {
                let left = try tokenExpiry(try #require(delivery.systemToken)) - now
                #expect(left >= 2 * 3600 - 60 && left <= 4 * 3600, "\(left) s left")
            }
        }
    }

    @Test(
        "a scheduled push that fails is retried with the same token, eventRetries times; a new scheduled push brings a new token"
    )
    func scheduledPushesAreRetriedLikeForgeEvents() async throws {
        try await withEmulator(configure: fastEventRetries) { emulator, gateways, _ in
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            gateways[0].setDeliveryStatus(500)
            await emulator.scheduledPush(installation)
            let failed = gateways[0].deliveries
            #expect(failed.count == 3)
            #expect(Set(failed.map(\.systemToken)).count == 1)
            gateways[0].setDeliveryStatus(200)
            await emulator.scheduledPush(installation)
            let all = gateways[0].deliveries
            #expect(all.count == 4)
            #expect(all[3].systemToken != failed[0].systemToken)
            // Once uninstalled, no push and no retry.
            try await emulator.uninstall(installation)
            await emulator.scheduledPush(installation)
            #expect(gateways[0].deliveries.count == 4)
        }
    }

    @Test("a redirect is an error, as Forge counts it: the 307 is answered as it is, not followed")
    func redirectsAreNotFollowed() async throws {
        try await withEmulator { emulator, gateways, urls in
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            let moved = try await emulator.push(installation, to: urls[0] + "/moved")
            #expect(moved.status == 307)
            #expect(gateways[0].deliveries.isEmpty)
            // Straight to the route, the same push arrives.
            #expect(try await emulator.push(installation).status == 200)
            #expect(gateways[0].deliveries.count == 1)
        }
    }

    @Test(
        "lifecycle events and preUninstall are delivered again on a non-2xx answer, as Forge does; the registration again on a 5xx only"
    )
    func eventsAreDeliveredAgain() async throws {
        try await withEmulator(configure: fastEventRetries) { emulator, gateways, _ in
            let gateway = gateways[0]
            let installation = emulator.makeInstallation()
            // The lifecycle event is refused twice (503, then 401), the registration once (503).
            gateway.fail("lifecycle", with: [503, 401])
            gateway.fail("register", with: [503])
            try await emulator.install(installation)
            #expect(gateway.calls("lifecycle") == 3)
            #expect(gateway.calls("register") == 2)
            #expect(gateway.registeredURLs.count == 1)

            // Refused every time: eventRetries more deliveries, then the failure is reported.
            gateway.fail("lifecycle", with: [500, 500, 500])
            await #expect(throws: ForgeEmulatorError.unexpectedStatus(500, operation: "lifecycle")) {
                try await emulator.upgrade(installation)
            }
            #expect(gateway.calls("lifecycle") == 6)

            // A 4xx registration is not retried: a configuration problem the handler only logs.
            let other = emulator.makeInstallation()
            gateway.fail("register", with: [400])
            await #expect(throws: ForgeEmulatorError.unexpectedStatus(400, operation: "register")) {
                try await emulator.install(other)
            }
            #expect(gateway.calls("register") == 3)

            gateway.fail("pre-uninstall", with: [503])
            try await emulator.uninstall(installation)
            #expect(gateway.calls("pre-uninstall") == 2)
            #expect(gateway.events.suffix(1) == ["preUninstall"])
        }
    }

    @Test(
        "events and scheduled pushes are capped at the event-call timeout (Forge's 5 s), not the 25 s of an invokeRemote",
        .timeLimit(.minutes(1))
    )
    func eventCallsHaveTheirOwnTimeout() async throws {
        // The cap is long enough for the install (an event call too) to pass on a loaded machine,
        // and far below the invokeRemote timeout and the test's time limit.
        try await withEmulator(configure: {
            $0.eventCallTimeout = .seconds(3)
            $0.remoteCallTimeout = .seconds(120)
        }) { emulator, gateways, _ in
            let installation = emulator.makeInstallation()
            try await emulator.install(installation)
            gateways[0].holdDeliveries()
            defer { gateways[0].releaseHeldDeliveries() }
            await #expect(throws: (any Error).self) { try await emulator.push(installation) }
        }
    }

    @Test func adminRoutesDriveTheEmulatorByHand() async throws {
        try await withEmulator { emulator, gateways, _ in
            let created = try await post(emulator.baseURL + "/admin/installations", json: #"{"product":"confluence"}"#)
            #expect(created.status == 201)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(created.body.utf8)) as? [String: Any])
            let id = try #require(object["id"] as? String)
            #expect(object["status"] as? String == "installed")
            #expect(object["product"] as? String == "confluence")
            #expect(object["triggerKeyId"] as? String == gateways[0].keyId)
            let installation = try #require(emulator.installation(withId: id))
            #expect(object["triggerUrl"] as? String == emulator.triggerURL(for: installation))

            let listed = try await get(emulator.baseURL + "/admin/installations")
            #expect(listed.status == 200 && listed.body.contains(id))

            let fault = try await post(
                emulator.baseURL + "/admin/installations/\(installation.uuid)/fault",
                json: #"{"type":"failWith","status":500,"times":1}"#
            )
            #expect(fault.status == 200)
            #expect(emulator.fault(for: installation) == .failWith(status: 500, times: 1))
            #expect(
                try await post(emulator.baseURL + "/admin/installations/\(installation.uuid)/fault", json: "{}").status
                    == 400)
            #expect(try await callTrigger(emulator, installation, gateway: gateways[0]) == 500)

            let push = try await post(
                emulator.baseURL + "/admin/installations/\(installation.uuid)/push",
                json: #"{"expiresInSeconds":600}"#
            )
            #expect(push.status == 200)
            #expect(push.body.contains(#""status":200"#))
            let token = try #require(gateways[0].deliveries.last?.systemToken)
            #expect(!push.body.contains(token))
            #expect(abs(try tokenExpiry(token) - Int(Date().timeIntervalSince1970) - 600) <= 1)

            let stats = try await get(emulator.baseURL + "/admin/stats")
            #expect(stats.status == 200)
            #expect(stats.body.contains(#""totalTriggerCalls":1"#))

            let upgraded = try await post(emulator.baseURL + "/admin/installations/\(installation.uuid)/upgrade")
            #expect(upgraded.status == 200)
            #expect(upgraded.body.contains(#""status":"installed""#))
            #expect(gateways[0].events.suffix(1) == ["upgraded"])
            #expect(gateways[0].registeredURLs.count == 2)
            #expect(try await post(emulator.baseURL + "/admin/installations/nope/upgrade").status == 404)

            let encodedId = id.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? id
            let uninstalled = try await post(emulator.baseURL + "/admin/installations/\(encodedId)/uninstall")
            #expect(uninstalled.status == 200)
            #expect(uninstalled.body.contains(#""status":"uninstalled""#))
            #expect(try await post(emulator.baseURL + "/admin/installations/nope/push").status == 404)
        }
    }
}
