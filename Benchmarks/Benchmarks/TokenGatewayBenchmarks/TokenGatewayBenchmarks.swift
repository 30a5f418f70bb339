import Benchmark
import Crypto
import FlowEngine
import ForgeEmulator
import Foundation
import Logging
import Metrics
import TokenGateway

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// Micro-benchmarks of the gateway's hot and cold paths. Each measured closure runs
// `scalingFactor` operations per iteration, so the reported times are per 1 000 (`.kilo`) or per
// one (`.one`) operation as the name says. Run from the repository root:
//
//   swift package --package-path Benchmarks --scratch-path .build-bench benchmark
//
// The cache hit is measured through `TokenFlow.token(for:request:)` with the token in the flow's
// memory and a store whose "Redis" is a listening socket nobody accepts on: after the run the
// socket's accept queue is checked, and the benchmark fails if the hit path ever connected.

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        timeUnits: .nanoseconds,
        warmupIterations: 10,
        maxDuration: .seconds(2),
        maxIterations: 10_000,
        // Tolerances of `swift package benchmark baseline check` (scripts/bench-micro.sh): the
        // baseline comes from a shared 2-core machine where runs differ by up to 1.5×, so time and
        // throughput may move by half; allocations are deterministic and may not grow at all.
        thresholds: [
            .wallClock: .init(relative: [.p50: 50.0]),
            .throughput: .init(relative: [.p50: 50.0]),
            .mallocCountTotal: .init(absolute: [.p50: 0]),
        ]
    )

    let fixtures: Fixtures
    do {
        fixtures = try Fixtures()
    } catch {
        fatalError("benchmark fixtures could not be made: \(error)")
    }
    let hotPath: HotPathFixtures
    do {
        hotPath = try HotPathFixtures(tokenValue: fixtures.tokenValue, fakeRedisPort: fixtures.fakeRedis.port)
    } catch {
        fatalError("hot-path fixtures could not be made: \(error)")
    }
    hotPathBenchmarks(fixtures: hotPath)
    fastAnswerBenchmarks(fixtures: hotPath)

    // MARK: State machine

    Benchmark(
        "TokenFlowStateMachine cold round (request, lease, trigger, token) x1000",
        configuration: .init(scalingFactor: .kilo)
    ) { benchmark in
        let now = FlowTime(unixSeconds: 1_800_000_000)
        let deadline = now + .seconds(10)
        let token = AccessToken(value: fixtures.tokenValue, expiresAt: now.unixSeconds + 3600, requestID: "rq_bench")
        var configuration = TokenFlowConfiguration()
        configuration.refreshAheadFraction = 0.25
        for i in benchmark.scaledIterations {
            var machine = TokenFlowStateMachine(configuration: configuration)
            blackHole(
                machine.tokenWasRequested(
                    waiter: WaiterID(UInt64(i)), minValidity: 300, knownExpiry: 0, forced: false, deadline: deadline,
                    requestID: "rq_bench", now: now))
            blackHole(machine.leaseAcquired(requestID: "rq_bench", now: now))
            blackHole(machine.attemptSucceeded(requestID: "rq_bench", attempt: 1, now: now))
            blackHole(machine.valueObserved(token, solicitedBy: "rq_bench", now: now))
            precondition(!machine.isActive, "the round did not finish")
        }
    }

    // MARK: Cache hit

    Benchmark(
        "TokenFlow.token cache hit x1000",
        configuration: .init(
            scalingFactor: .kilo,
            teardown: {
                // A hit must never reach Redis: the fake Redis's accept queue must still be empty.
                precondition(!fixtures.fakeRedis.wasConnected(), "a cache hit connected to Redis")
            })
    ) { benchmark in
        let request = TokenFlow.Request(minValidity: 300)
        for _ in benchmark.scaledIterations {
            let answer = try await fixtures.flow.token(for: fixtures.installation, request: request)
            precondition(answer.source == .cache)
            blackHole(answer)
        }
    }

    // MARK: AES-GCM

    Benchmark("EncryptionKeyRing.seal 1 KiB token x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try fixtures.keyRing.seal(fixtures.plaintext, context: fixtures.context))
        }
    }

    Benchmark("EncryptionKeyRing.open 1 KiB token x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try fixtures.keyRing.open(fixtures.sealed, context: fixtures.context))
        }
    }

    // MARK: FIT verification

    Benchmark("InvocationTokenVerifier.verify RS256 FIT x1", configuration: .init(scalingFactor: .one)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try await fixtures.verifier.verify(fixtures.fit, now: fixtures.fitMintedAt))
        }
    }

    // MARK: Connect

    Benchmark("CanonicalRequest.qsh x1000", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(
                CanonicalRequest.qsh(
                    method: "get", url: "/wiki/rest/api/content/12345?expand=body.storage,version&limit=25&jwt=x",
                    basePath: "/wiki"))
        }
    }
}

/// Everything the benchmarks share, made once per benchmark process.
final class Fixtures: Sendable {
    let tokenValue: String
    let installation: InstallationID
    let fakeRedis: UnacceptedListener
    let flow: TokenFlow
    let keyRing: EncryptionKeyRing
    let plaintext: [UInt8]
    let context: String
    let sealed: String
    let verifier: InvocationTokenVerifier
    let fit: String
    let fitMintedAt: Date

    init() throws {
        let logger = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })
        // A realistic system token: about 1 KiB of base64url JWT.
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
        var generator = SystemRandomNumberGenerator()
        let body = String(decoding: (0..<1000).map { _ in alphabet[Int(generator.next() % 64)] }, as: UTF8.self)
        self.tokenValue = "eyJhbGciOiJIUzI1NiJ9." + body + ".c2lnbmF0dXJl"
        self.plaintext = Array(self.tokenValue.utf8)

        self.keyRing = try EncryptionKeyRing(keys: [(id: "bench", key: SymmetricKey(size: .bits256))])
        let installation = InstallationID("ari:cloud:ecosystem::installation/" + UUID().uuidString.lowercased())!
        self.installation = installation
        self.context = "tg:token:" + installation.ari
        self.sealed = try self.keyRing.seal(self.plaintext, context: self.context)

        self.fakeRedis = try UnacceptedListener()
        let redis = RedisClient(
            configuration: RedisConfiguration(endpoint: .direct(host: "127.0.0.1", port: self.fakeRedis.port)),
            logger: logger)
        let store = GatewayStore(redis: redis, box: self.keyRing)
        self.flow = TokenFlow(
            configuration: TokenFlowConfiguration(), store: RedisTokenStore(store: store), trigger: RefusingTrigger(),
            metrics: FlowMetrics(factory: NOOPMetricsHandler.instance), logger: logger, replicaID: "bench")
        let now = FlowTime.now()
        self.flow.tokenDelivered(
            installation,
            token: AccessToken(
                value: self.tokenValue, expiresAt: now.unixSeconds + 3600, requestID: nil, receivedAt: now.unixSeconds),
            solicitedBy: nil)

        let emulator = try ForgeEmulator(
            configuration: ForgeEmulatorConfiguration(gatewayURL: "http://127.0.0.1:9"), logger: logger)
        self.fitMintedAt = Date()
        self.fit = try emulator.mintFIT(for: emulator.makeInstallation())
        self.verifier = try InvocationTokenVerifier(
            configuration: .init(appId: ForgeEmulatorConfiguration.demoAppId), jwksJSON: emulator.jwksJSON,
            logger: logger)
    }
}

/// A trigger sender for a flow that must never send one.
struct RefusingTrigger: TriggerSender {
    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult {
        fatalError("a cache hit sent a trigger")
    }
}

/// A TCP socket listening on 127.0.0.1 that never accepts: a connection to it completes in the
/// kernel and waits in the accept queue, where ``wasConnected()`` finds it.
final class UnacceptedListener: Sendable {
    struct SocketError: Error, CustomStringConvertible {
        let call: String
        var description: String { "\(self.call) failed (errno \(errno))" }
    }

    let descriptor: Int32
    let port: Int

    init() throws {
        #if canImport(Glibc)
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
            let fd = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw SocketError(call: "socket") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            close(fd)
            throw SocketError(call: "bind/listen")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else {
            close(fd)
            throw SocketError(call: "getsockname")
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        self.descriptor = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    /// Whether anything connected since the socket was opened.
    func wasConnected() -> Bool {
        let accepted = accept(self.descriptor, nil, nil)
        guard accepted >= 0 else { return false }
        close(accepted)
        return true
    }

    deinit { close(self.descriptor) }
}
