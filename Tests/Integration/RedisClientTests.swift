import Crypto
import FlowEngine
import Foundation
import Logging
import NIOCore
import NIOPosix
import Prometheus
import Synchronization
import Testing
import TokenGateway

/// Against a real redis-server: the shared one for ordinary commands (unique key prefixes per test), dedicated
/// ones for tests that stop, pause or reconfigure the server.
@Suite struct RedisClientTests {
    static let logger: Logger = {
        if ProcessInfo.processInfo.environment["REDIS_TEST_LOG"] != nil {
            var logger = Logger(label: "redis-test")
            logger.logLevel = .debug
            return logger
        }
        return Logger(label: "redis-test", factory: { _ in SwiftLogNoOpLogHandler() })
    }()

    /// A unique key prefix (with a hash tag, like the gateway's keys).
    static func prefix(_ test: String = #function) -> String {
        "test:redis:{\(test.prefix(while: { $0 != "(" }))-\(UUID().uuidString.prefix(8))}:"
    }

    /// Runs `body` with a client that runs as a service, and shuts it down afterwards.
    @discardableResult
    static func withClient<T: Sendable>(
        url: String,
        _ body: (RedisClient) async throws -> T
    ) async throws -> T {
        try await self.withClient(configuration: RedisConfiguration(url: url), body)
    }

    /// Runs `body` with a client for `configuration` that runs as a service, and shuts it down afterwards.
    @discardableResult
    static func withClient<T: Sendable>(
        configuration: RedisConfiguration,
        logger: Logger = Self.logger,
        _ body: (RedisClient) async throws -> T
    ) async throws -> T {
        let client = RedisClient(configuration: configuration, logger: logger)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            do {
                let result = try await body(client)
                await client.shutdown()
                try await group.waitForAll()
                return result
            } catch {
                await client.shutdown()
                try? await group.waitForAll()
                throw error
            }
        }
    }

    /// Polls `condition` until it holds or `timeout` passes (waiting for an event, with a deadline).
    static func eventually(
        within timeout: Duration = .seconds(10),
        _ condition: () async -> Bool
    ) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if await condition() {
                return true
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return await condition()
    }

    // MARK: Commands

    @Test func setsAndGetsValues() async throws {
        let prefix = Self.prefix()
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            #expect(try await client.send(["SET", prefix + "a", "héllo"]) == .status("OK"))
            #expect(try await client.send(["GET", prefix + "a"]).string == "héllo")
            #expect(try await client.send(["GET", prefix + "missing"]).isNull)
            #expect(try await client.send(["INCRBY", prefix + "n", "41"]) == .integer(41))
            #expect(try await client.send(["INCR", prefix + "n"]).int == 42)
            #expect(try await client.send(["DEL", prefix + "a", prefix + "n"]) == .integer(2))
            try await client.ping()
            #expect(client.isAvailable)
        }
    }

    @Test func errorRepliesThrowServerErrors() async throws {
        let prefix = Self.prefix()
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            _ = try await client.send(["SET", prefix + "s", "text"])
            do {
                _ = try await client.send(["INCR", prefix + "s"])
                Issue.record("INCR on a string succeeded")
            } catch let error as RedisError {
                #expect(error.isServerError)
                #expect(error.serverMessage?.hasPrefix("ERR") == true)
            }
            await #expect(throws: RedisError.invalidCommand) { try await client.send([]) }
            // The connection stays usable after an error reply.
            #expect(try await client.send(["GET", prefix + "s"]).string == "text")
        }
    }

    @Test(
        "commands that would change a shared connection's state are refused unsent; other callers' replies stay theirs"
    )
    func connectionStateCommandsAreRefused() async throws {
        let prefix = Self.prefix()
        var configuration = try RedisConfiguration(url: RedisServerProcess.sharedURL())
        configuration.poolSize = 1
        try await Self.withClient(configuration: configuration) { client in
            for key in ["a", "b", "c"] { _ = try await client.send(["SET", prefix + key, key]) }
            for command in [
                ["CLIENT", "REPLY", "SKIP"], ["client", "reply", "off"], ["MULTI"], ["multi"], ["EXEC"],
                ["WATCH", prefix + "a"],
                ["SELECT", "1"], ["SUBSCRIBE", "x", "y"], ["PSUBSCRIBE", "x*"], ["MONITOR"], ["AUTH", "nobody"],
                ["HELLO", "3"], ["RESET"], ["READONLY"], ["CLIENT", "TRACKING", "on"],
            ] {
                await #expect(throws: RedisError.invalidCommand, "\(command[0])") { try await client.send(command) }
                await #expect(throws: RedisError.invalidCommand, "\(command[0])") {
                    try await client.pipeline([["GET", prefix + "a"], command])
                }
            }
            // Nothing of them reached the connection: every caller still gets its own reply, from
            // database 0, outside any transaction.
            async let a = client.send(["GET", prefix + "a"])
            async let b = client.send(["GET", prefix + "b"])
            async let c = client.send(["GET", prefix + "c"])
            #expect(try await [a, b, c].map(\.string) == ["a", "b", "c"])
            // Read-only CLIENT subcommands are fine.
            #expect(try await client.send(["CLIENT", "ID"]).int != nil)
        }
    }

    @Test func roundTripsA200KilobyteValue() async throws {
        let prefix = Self.prefix()
        let value = String((0..<200 * 1024).map { index in Character(UnicodeScalar(UInt8(97 + index % 26))) })
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            _ = try await client.send(["SET", prefix + "big", value])
            #expect(try await client.send(["GET", prefix + "big"]).string == value)
            #expect(try await client.send(["STRLEN", prefix + "big"]) == .integer(Int64(value.utf8.count)))
        }
    }

    @Test func pipelineRepliesComeBackInOrderWithErrorsInline() async throws {
        let prefix = Self.prefix()
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            var commands: [[String]] = [["SET", prefix + "s", "x"]]
            for index in 1...100 {
                commands.append(["INCR", prefix + "counter"])
                commands.append(["SET", prefix + "k\(index)", "v\(index)"])
                commands.append(["GET", prefix + "k\(index)"])
            }
            commands.append(["INCR", prefix + "s"])
            commands.append(["GET", prefix + "missing"])
            let replies = try await client.pipeline(commands)
            #expect(replies.count == commands.count)
            #expect(replies[0] == .status("OK"))
            for index in 1...100 {
                let base = 1 + (index - 1) * 3
                #expect(replies[base] == .integer(Int64(index)))
                #expect(replies[base + 1] == .status("OK"))
                #expect(replies[base + 2].string == "v\(index)")
            }
            guard case .error(let message) = replies[replies.count - 2] else {
                Issue.record("expected an error reply, got \(replies[replies.count - 2])")
                return
            }
            #expect(message.hasPrefix("ERR"))
            #expect(replies[replies.count - 1] == .null)
            #expect(try await client.pipeline([]) == [])
        }
    }

    @Test func twoHundredConcurrentSendsAllGetTheirOwnReplies() async throws {
        let prefix = Self.prefix()
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<200 {
                    group.addTask {
                        let key = prefix + "c\(index)"
                        _ = try await client.send(["SET", key, "value-\(index)"])
                        let reply = try await client.send(["GET", key])
                        #expect(reply.string == "value-\(index)")
                        let pipelined = try await client.pipeline([["INCR", key + ":n"], ["GET", key]])
                        #expect(pipelined == [.integer(1), .bulk(Array("value-\(index)".utf8))])
                    }
                }
                try await group.waitForAll()
            }
        }
    }

    // MARK: Scripts

    @Test func evalFallsBackToEvalWhenTheScriptIsNotCached() async throws {
        let prefix = Self.prefix()
        let script = RedisScript(
            """
            -- \(prefix)
            redis.call('SET', KEYS[1], ARGV[1])
            return redis.call('GET', KEYS[1])
            """
        )
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client in
            #expect(try await client.send(["SCRIPT", "EXISTS", script.sha1]) == .array([.integer(0)]))
            #expect(try await client.eval(script, keys: [prefix + "k"], arguments: ["first"]).string == "first")
            #expect(try await client.send(["SCRIPT", "EXISTS", script.sha1]) == .array([.integer(1)]))
            // The locally computed SHA-1 is the one Redis uses.
            #expect(try await client.send(["SCRIPT", "LOAD", script.source]).string == script.sha1)

            _ = try await client.send(["SCRIPT", "FLUSH"])
            #expect(try await client.eval(script, keys: [prefix + "k"], arguments: ["second"]).string == "second")
            #expect(try await client.eval(script, keys: [prefix + "k"], arguments: ["third"]).string == "third")

            let failing = RedisScript("return redis.error_reply('NOPE \(prefix)')")
            await #expect(throws: RedisError.server("NOPE \(prefix)")) {
                try await client.eval(failing, keys: [], arguments: [])
            }
        }
    }

    // MARK: Pub/Sub

    @Test func subscribersReceivePublishedMessages() async throws {
        let channel = Self.prefix() + "channel"
        try await Self.withClient(url: RedisServerProcess.sharedURL()) { client async throws in
            let events = RedisPubSubRecorder(client.subscribe(channels: [channel, channel + ":other"]))
            #expect(await events.wait { $0.contains(.subscribed) })
            #expect(try await client.send(["PUBLISH", channel, "hello"]) == .integer(1))
            #expect(try await client.send(["PUBLISH", channel + ":other", "world"]) == .integer(1))
            #expect(
                await events.wait {
                    $0.contains(.message(channel: channel, payload: "hello"))
                        && $0.contains(.message(channel: channel + ":other", payload: "world"))
                }
            )
            #expect(events.events.first == .subscribed)
        }
    }

    @Test(
        "a consumer that falls behind its buffer loses the oldest messages and gets the subscription made again",
        .timeLimit(.minutes(1)))
    func aConsumerThatFallsBehindIsResubscribed() async throws {
        let channel = Self.prefix() + "channel"
        let logs = RedisTestLogs()
        var configuration = try RedisConfiguration(url: RedisServerProcess.sharedURL())
        // The subscription is made again no sooner than 0.5 s after the overflow: every message below
        // is published by then, so only the fifth finds the buffer full.
        configuration.reconnectBackoffBase = .seconds(1)
        configuration.reconnectBackoffCap = .seconds(1)
        try await Self.withClient(configuration: configuration, logger: logs.logger) { client async throws in
            let stream = client.subscribe(channels: [channel], bufferSize: 4)
            var iterator = stream.makeAsyncIterator()
            #expect(await iterator.next() == .subscribed)
            // Ten messages while nobody reads: the fifth finds the buffer full, and the subscription is made
            // again (messages published meanwhile reach nobody, as after any reconnect).
            for index in 0..<10 {
                _ = try await client.send(["PUBLISH", channel, "m\(index)"])
            }
            #expect(
                await logs.wait(for: "Redis subscription consumer fell behind: messages dropped; subscribing again"))
            // What is left of the messages, then the new subscription's event: the cue to re-read state.
            var messages: [RedisPubSubEvent] = []
            while let event = await iterator.next(), event != .subscribed { messages.append(event) }
            #expect(messages.count < 10 && !messages.contains(.message(channel: channel, payload: "m0")))
            #expect(
                logs.messages.filter {
                    $0 == "Redis subscription consumer fell behind: messages dropped; subscribing again"
                }
                .count == 1)
            // The subscription works again, on one connection: the one given up is closed (the server
            // may read its close after the new subscription's, so that is waited for).
            #expect(
                await Self.eventually {
                    (try? await client.send(["PUBSUB", "NUMSUB", channel]))?.array?.last == .integer(1)
                })
            #expect(try await client.send(["PUBLISH", channel, "again"]) == .integer(1))
            #expect(await iterator.next() == .message(channel: channel, payload: "again"))
        }
    }

    @Test func subscriptionStreamsEndOnShutdown() async throws {
        let channel = Self.prefix() + "channel"
        var configuration = try RedisConfiguration(url: RedisServerProcess.sharedURL())
        configuration.poolSize = 1
        let client = RedisClient(configuration: configuration, logger: Self.logger)
        let runner = Task { try await client.run() }
        let events = RedisPubSubRecorder(client.subscribe(channels: [channel]))
        #expect(await events.wait { $0.contains(.subscribed) })
        await client.shutdown()
        #expect(await events.waitUntilFinished())
        try await runner.value
        await #expect(throws: RedisError.unavailable) { try await client.send(["PING"]) }
        let late = RedisPubSubRecorder(client.subscribe(channels: [channel]))
        #expect(await late.waitUntilFinished())
    }

    // MARK: Failures

    @Test("a command whose connection is lost after it was written fails with connectionLost (it may have run)")
    func aCommandLostInFlightMayHaveRun() async throws {
        let server = try await RedisServerProcess.start()
        let prefix = Self.prefix()
        var configuration = try RedisConfiguration(url: server.url)
        configuration.poolSize = 1
        try await Self.withClient(configuration: configuration) { client in
            // Redis closes a client whose reply outgrows its output buffer limit: the script below
            // runs (its SET stays), then its 64 KiB answer costs the connection.
            _ = try await client.send(["CONFIG", "SET", "client-output-buffer-limit", "normal 4096 0 0"])
            let script = "redis.call('SET', KEYS[1], 'ran'); return string.rep('x', 65536)"
            let error = await #expect(throws: RedisError.self) {
                try await client.send(["EVAL", script, "1", prefix + "lease"])
            }
            #expect(error == .connectionLost)
            #expect(error?.isConnectionFailure == true)
            let ring = try EncryptionKeyRing(keys: [(id: "k1", key: SymmetricKey(size: .bits256))])
            let store = RedisTokenStore(store: GatewayStore(redis: client, box: ring, prefix: prefix))
            #expect(store.mayHaveRun(failingWith: try #require(error)))
            #expect(!store.mayHaveRun(failingWith: RedisError.unavailable))
            // It ran (read once the client has connected again).
            #expect(await Self.eventually { (try? await client.send(["GET", prefix + "lease"]))?.string == "ran" })
        }
        await server.stop()
    }

    @Test(
        "a direct endpoint whose server is demoted (READONLY) is connected to again, so a name that now names the new primary is followed"
    )
    func aDemotedDirectEndpointIsConnectedToAgain() async throws {
        let (a, b) = (try await RedisServerProcess.start(), try await RedisServerProcess.start())
        // The proxy stands for a DNS name: after the failover it names the new primary, while the
        // connections made before stay with the old one (Redis keeps them through a demotion).
        let proxy = try await TCPProxy.start(forwardingTo: a.port)
        let key = Self.prefix() + "k"
        var configuration = try RedisConfiguration(url: "redis://127.0.0.1:\(proxy.port)/0")
        configuration.poolSize = 2
        try await Self.withClient(configuration: configuration) { client in
            #expect(try await client.send(["SET", key, "a"]) == .status("OK"))
            _ = try redisCLI(["-p", "\(b.port)", "SET", key, "b0"])
            _ = try redisCLI(["-p", "\(a.port)", "REPLICAOF", "127.0.0.1", "\(b.port)"])
            proxy.retarget(to: b.port)
            let demoted = await #expect(throws: RedisError.self) { try await client.send(["SET", key, "x"]) }
            #expect(demoted?.serverErrorPrefix == "READONLY")
            #expect(
                await Self.eventually { (try? await client.send(["SET", key, "b1"])) == .status("OK") })
            #expect(try redisCLI(["-p", "\(b.port)", "GET", key]).contains("b1"))
        }
        await proxy.stop()
        await a.stop()
        await b.stop()
    }

    @Test("a direct endpoint that answers READONLY and keeps the connection is connected to again")
    func aReadOnlyServerThatKeepsTheConnectionIsReconnectedTo() async throws {
        // A stand-in for a demoted primary (or a proxy before one) that keeps its clients: it
        // answers PING, and READONLY to everything else, on every connection.
        let connections = Atomic<Int>(0)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                connections.add(1, ordering: .relaxed)
                return channel.pipeline.addHandler(ReadOnlyReplica())
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(server.localAddress?.port)
        var configuration = try RedisConfiguration(url: "redis://127.0.0.1:\(port)/0")
        configuration.poolSize = 1
        try await Self.withClient(configuration: configuration) { client in
            let refused = await #expect(throws: RedisError.self) { try await client.send(["SET", "k", "v"]) }
            #expect(refused?.serverErrorPrefix == "READONLY")
            #expect(connections.load(ordering: .relaxed) == 1)
            // The connection is given up, and the next command connects again.
            #expect(
                await Self.eventually {
                    _ = try? await client.send(["SET", "k", "v"])
                    return connections.load(ordering: .relaxed) >= 2
                })
        }
        try await server.close()
    }

    @Test func failsFastWhenNothingListensAndRecoversWhenTheServerComesBack() async throws {
        let server = try await RedisServerProcess.start()
        let prefix = Self.prefix()
        let channel = prefix + "events"
        var configuration = try RedisConfiguration(url: server.url)
        configuration.reconnectBackoffCap = .milliseconds(300)
        try await Self.withClient(configuration: configuration) { client in
            let events = RedisPubSubRecorder(client.subscribe(channels: [channel]))
            #expect(await events.wait { $0.count(where: { $0 == .subscribed }) == 1 })
            _ = try await client.send(["SET", prefix + "k", "before"])
            #expect(client.isAvailable)

            await server.kill()

            // Every send fails with `unavailable`, not by running out its (long) timeout: refused
            // connects, then backoff. A send that waited for its timeout would throw `timeout`.
            // (The first may have been written to the connection before its loss was read: that one
            // fails with `connectionLost`, as it may have run.)
            for _ in 0..<20 {
                let error = await #expect(throws: RedisError.self) {
                    try await client.send(["GET", prefix + "k"], timeout: .seconds(60))
                }
                #expect(error?.isConnectionFailure == true)
            }
            #expect(!client.isAvailable)

            try await server.restart()

            // The same client reconnects by itself once its backoff allows.
            #expect(
                await Self.eventually {
                    (try? await client.send(["SET", prefix + "k", "after"])) == .status("OK")
                }
            )
            #expect(try await client.send(["GET", prefix + "k"]).string == "after")
            #expect(client.isAvailable)

            // The subscription came back too: a second `subscribed`, then messages again.
            #expect(await events.wait { $0.count(where: { $0 == .subscribed }) == 2 })
            #expect(try await client.send(["PUBLISH", channel, "again"]) == .integer(1))
            #expect(await events.wait { $0.last == .message(channel: channel, payload: "again") })
            // Its loss was told once, between the two (however many reconnects failed meanwhile).
            #expect(
                events.events.filter { $0 != .message(channel: channel, payload: "again") }
                    == [.subscribed, .unsubscribed, .subscribed])
        }
        await server.stop()
    }

    @Test func unreachableServerFailsFastWithUnavailable() async throws {
        let port = try RedisServerProcess.freeLoopbackPort()
        try await Self.withClient(url: "redis://127.0.0.1:\(port)/0") { client in
            // `unavailable` (refused), never `timeout`: nothing waits for a server that is not there.
            for _ in 0..<10 {
                await #expect(throws: RedisError.unavailable) { try await client.send(["PING"], timeout: .seconds(60)) }
            }
            #expect(!client.isAvailable)
        }
    }

    @Test(
        "error replies that mean the store cannot serve (OOM, NOPERM) count as store errors, in commands, pipelines and scripts; an ordinary error reply does not"
    )
    func refusalsCountAsStoreErrors() async throws {
        let server = try await RedisServerProcess.start()
        let prefix = Self.prefix()
        try await Self.withClient(url: server.url) { admin in
            _ = try await admin.send(["ACL", "SETUSER", "no-set", "on", ">no-set-password-1", "~*", "+@all", "-set"])
        }
        let registry = PrometheusCollectorRegistry()
        @Sendable func errors() -> Double? {
            var text: [UInt8] = []
            registry.emit(into: &text)
            return sample(String(decoding: text, as: UTF8.self), "store_errors_total")
        }
        let url = "redis://no-set:no-set-password-1@127.0.0.1:\(server.port)/0"
        let client = RedisClient(
            configuration: try RedisConfiguration(url: url), logger: Self.logger,
            metricsFactory: PrometheusMetricsFactory(registry: registry),
            metricNames: RedisMetricNames(errors: "store_errors_total"))
        // An ordinary error reply (a wrong argument count) is an answer, not a store error.
        await #expect(throws: RedisError.self) { try await client.send(["GET", prefix + "a", "b"]) }
        #expect(errors() == 0)
        // An ACL user without SET: NOPERM.
        let refused = await #expect(throws: RedisError.self) { try await client.send(["SET", prefix + "k", "v"]) }
        #expect(refused?.serverErrorPrefix == "NOPERM")
        #expect(errors() == 1)
        // Out of memory (noeviction): a write command, a pipeline holding one, and a script are refused.
        _ = try await client.send(["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        _ = try await client.send(["CONFIG", "SET", "maxmemory", "1"])
        let oom = await #expect(throws: RedisError.self) { try await client.send(["INCR", prefix + "n"]) }
        #expect(oom?.serverErrorPrefix == "OOM")
        #expect(errors() == 2)
        // A pipeline with a refused command fails as a whole (read as data, the refusal would pass
        // for a missing key); an ordinary error reply in one is an answer.
        let pipelined = await #expect(throws: RedisError.self) {
            try await client.pipeline([["GET", prefix + "n"], ["LPUSH", prefix + "l", "x"]])
        }
        #expect(pipelined?.serverErrorPrefix == "OOM")
        #expect(errors() == 3)
        let answered = try await client.pipeline([["GET", prefix + "n"], ["GET", prefix + "n", "extra"]])
        #expect(answered.first == .null)
        if case .error(let message) = answered.last {
            #expect(message.hasPrefix("ERR"))
        } else {
            Issue.record("the wrong argument count was not an error reply: \(answered)")
        }
        #expect(errors() == 3)
        await #expect(throws: RedisError.self) {
            try await client.eval(
                RedisScript("return redis.call('INCR', KEYS[1])"), keys: [prefix + "n"], arguments: [])
        }
        #expect(errors() == 4)
        // Reads still answer, and count nothing.
        #expect(try await client.send(["GET", prefix + "n"]) == .null)
        #expect(errors() == 4)
        await client.shutdown()
        await server.stop()
    }

    @Test("a connect that fails is logged at info level with its cause and the address, never the password")
    func aFailedConnectIsLoggedWithItsCauseAndAddress() async throws {
        let port = try RedisServerProcess.freeLoopbackPort()
        let logs = LogSink.memory()
        let logger = Logger(label: "test") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: logs) }
        let configuration = try RedisConfiguration(url: "redis://:connect-password-1@127.0.0.1:\(port)/0")
        try await Self.withClient(configuration: configuration, logger: logger) { client in
            await #expect(throws: RedisError.unavailable) { try await client.send(["PING"]) }
        }
        let warnings = logs.captured.filter { $0.contains("Redis connect failed") }
        #expect(warnings.count == 1, "\(logs.captured)")
        let warning = warnings.first ?? ""
        #expect(warning.contains("level=warning"), "\(warning)")
        #expect(warning.contains("redis.cause=refused"), "\(warning)")
        #expect(warning.contains("redis.address=127.0.0.1:\(port)"), "\(warning)")
        #expect(!logs.captured.joined().contains("connect-password-1"))
    }

    @Test(
        "a server that accepts and then refuses every client (maxclients reached): sends fail with unavailable, never with its error as their reply, and each pool slot backs off instead of reconnecting per send"
    )
    func aServerRefusingEveryClientIsBackedOff() async throws {
        for password in [nil, "maxclients-test-password"] {
            let server = try await RedisServerProcess.start(
                extraArguments: ["--maxclients", "1"] + (password.map { ["--requirepass", $0] } ?? []))
            let url = password.map { "redis://:\($0)@127.0.0.1:\(server.port)/0" } ?? server.url
            var admin = try RedisConfiguration(url: url)
            admin.poolSize = 1
            var configuration = try RedisConfiguration(url: url)
            configuration.poolSize = 2
            // A first retry no sooner than 30 s: the loop below ends long before any slot may try again.
            configuration.reconnectBackoffBase = .seconds(60)
            configuration.reconnectBackoffCap = .seconds(60)
            let logs = RedisTestLogs()
            try await Self.withClient(configuration: admin) { admin in
                try await admin.ping()  // the one client the server takes
                _ = try await admin.send(["CONFIG", "RESETSTAT"])
                try await Self.withClient(configuration: configuration, logger: logs.logger) { client in
                    for _ in 0..<50 {
                        await #expect(throws: RedisError.unavailable) { try await client.send(["PING"]) }
                    }
                    #expect(!client.isAvailable)
                }
                let stats = try await admin.send(["INFO", "stats"]).string ?? ""
                let rejected = stats.split(separator: "\r\n").first { $0.hasPrefix("rejected_connections:") }
                // One refused connection per slot, not one per send.
                #expect(rejected.flatMap { Int($0.split(separator: ":")[1]) } ?? -1 <= 2, "\(rejected ?? "none")")
            }
            // Reported as what it is, also when the refusal comes as the answer to AUTH.
            // (The server's error arrives before or after the handshake's first command is written.)
            #expect(
                logs.messages.contains("Redis refused the connection")
                    || logs.messages.contains("Redis rejected the connection handshake"), "\(logs.messages)")
            #expect(!logs.messages.contains { $0.contains("credentials") }, "\(logs.messages)")
            await server.stop()
        }
    }

    @Test(
        "a SUBSCRIBE the server refuses (an ACL user without the channel) backs off like a failed connect: the delays between attempts double instead of staying at the base"
    )
    func aRefusedSubscriptionBacksOff() async throws {
        let server = try await RedisServerProcess.start()
        try await Self.withClient(url: server.url) { admin in
            _ = try await admin.send([
                "ACL", "SETUSER", "limited", "on", ">limited-password-1", "~*", "+@all", "resetchannels",
            ])
        }
        var configuration = try RedisConfiguration(url: "redis://limited:limited-password-1@127.0.0.1:\(server.port)/0")
        configuration.reconnectBackoffBase = .milliseconds(200)
        configuration.reconnectBackoffCap = .seconds(60)
        let logs = LogSink.memory()
        let logger = Logger(label: "test") { GatewayLogHandler(label: $0, format: .logfmt, level: .debug, sink: logs) }
        @Sendable func refusals() -> [String] { logs.captured.filter { $0.contains("Redis subscription failed") } }
        try await Self.withClient(configuration: configuration, logger: logger) { client in
            // Two channels: the refusal is read as such, not waited out as a missing second reply.
            let events = RedisPubSubRecorder(client.subscribe(channels: ["refused-channel", "refused-channel-2"]))
            let pong = try await client.send(["PING"])
            #expect(pong == .status("PONG"))
            #expect(await Self.eventually(within: .seconds(30)) { refusals().count >= 4 })
            // Each refusal counts, and the wait after it doubles (with jitter, within [d/2, d]):
            // after the fourth, at least 0.8 s; at the base delay every wait would be 0.1–0.2 s.
            let lines = refusals().prefix(4)
            for (index, line) in lines.enumerated() {
                #expect(line.contains("redis.subscription.failures=\(index + 1)"), "\(line)")
            }
            let lastWait = lines.last.flatMap { line in
                line.split(separator: " ").first { $0.hasPrefix("redis.retry_in_ms=") }
                    .flatMap { Int($0.split(separator: "=")[1]) }
            }
            #expect((lastWait ?? 0) >= 800, "\(lines.last ?? "")")
            #expect(!events.events.contains(.subscribed))
            // The consumer is told once that it is not subscribed (and hears nothing meanwhile).
            #expect(events.events == [.unsubscribed])
            #expect(logs.captured.contains { $0.contains("NOPERM") })
            #expect(!logs.captured.joined().contains("limited-password-1"))
        }
        await server.stop()
    }

    @Test func aLateReplyAfterATimeoutIsNotDeliveredToTheNextCaller() async throws {
        let server = try await RedisServerProcess.start()
        let prefix = Self.prefix()
        var configuration = try RedisConfiguration(url: server.url)
        configuration.poolSize = 1
        try await Self.withClient(configuration: configuration) { client in
            try await Self.withClient(url: server.url) { admin in
                try await client.ping()
                // The pause outlasts the SET's timeout by far: the SET times out (the event), its
                // reply comes after the pause.
                _ = try await admin.send(["CLIENT", "PAUSE", "5000", "ALL"])
                await #expect(throws: RedisError.timeout) {
                    try await client.send(["SET", prefix + "k", "late"], timeout: .milliseconds(150))
                }
                // Same connection (pool of one): the SET's late `OK` must not be taken for this GET's reply.
                #expect(try await client.send(["GET", prefix + "k"], timeout: .seconds(60)).string == "late")
                #expect(try await client.send(["PING"]) == .status("PONG"))
            }
        }
        await server.stop()
    }

    @Test func authenticatesAndSelectsTheDatabase() async throws {
        let server = try await RedisServerProcess.start(extraArguments: ["--requirepass", "s3cret-pw"])
        let prefix = Self.prefix()
        let url = "redis://:s3cret-pw@127.0.0.1:\(server.port)/2"
        try await Self.withClient(url: url) { client in
            _ = try await client.send(["SET", prefix + "k", "in-db-2"])
            #expect(try await client.send(["GET", prefix + "k"]).string == "in-db-2")
        }
        try await Self.withClient(url: "redis://:s3cret-pw@127.0.0.1:\(server.port)/0") { client async throws in
            #expect(try await client.send(["GET", prefix + "k"]).isNull)
        }
        try await Self.withClient(url: "redis://:wrong@127.0.0.1:\(server.port)/0") { client in
            await #expect(throws: RedisError.unavailable) { try await client.send(["PING"]) }
        }
        await server.stop()
    }

    // MARK: Sentinel

    /// A primary and a replica of it, in sync: a sentinel started after this discovers the replica at once.
    static func primaryAndReplica(
        primaryArguments: [String] = []
    ) async throws -> (primary: RedisServerProcess, replica: RedisServerProcess) {
        let primary = try await RedisServerProcess.start(extraArguments: primaryArguments)
        let replica = try await RedisServerProcess.start(
            extraArguments: ["--replicaof", "127.0.0.1", "\(primary.port)"]
        )
        try await Self.withClient(url: replica.url) { replicaAdmin in
            #expect(
                await Self.eventually {
                    let role = try? await replicaAdmin.send(["ROLE"]).array
                    return role?.first?.string == "slave" && role?[3].string == "connected"
                }
            )
        }
        return (primary, replica)
    }

    /// Asks the sentinel to fail `masterName` over (retried until it accepts: it needs the replica's
    /// INFO first) and waits until it names the node at `port` as the primary; whether it did
    /// within 30 s each.
    static func sentinelFailover(_ sentinelAdmin: RedisClient, _ masterName: String, to port: Int) async -> Bool {
        let accepted = await Self.eventually(within: .seconds(30)) {
            (try? await sentinelAdmin.send(["SENTINEL", "FAILOVER", masterName])) == .status("OK")
        }
        guard accepted else { return false }
        return await Self.eventually(within: .seconds(30)) {
            let address = try? await sentinelAdmin.send(["SENTINEL", "get-master-addr-by-name", masterName])
            return address?.array?.last?.int == Int64(port)
        }
    }

    /// Whether every one of eight commands (one per pooled connection and more) lands on `port`.
    static func everyCommandLands(on port: Int, _ client: RedisClient) async -> Bool {
        for _ in 0..<8 {
            let info = try? await client.send(["INFO", "server"])
            guard info?.string?.contains("tcp_port:\(port)") == true else {
                return false
            }
        }
        return true
    }

    @Test(.timeLimit(.minutes(1))) func followsTheNewPrimaryAfterASentinelFailover() async throws {
        let masterName = "tg-primary"
        let prefix = Self.prefix()
        let (primary, replica) = try await Self.primaryAndReplica()
        let sentinel = try await RedisServerProcess.startSentinel(
            monitoringPrimaryPort: primary.port,
            masterName: masterName
        )
        let deadSentinelPort = try RedisServerProcess.freeLoopbackPort()
        // A sentinel that accepts connections and never answers (a hung process, a full backlog).
        let silentSentinel = try await HoldingServer.start()
        let url =
            "redis-sentinel://127.0.0.1:\(deadSentinelPort),127.0.0.1:\(silentSentinel.port),127.0.0.1:\(sentinel.port)"
            + "/\(masterName)/0"

        let logs = RedisTestLogs()
        let configuration = try RedisConfiguration(url: url)
        try await Self.withClient(url: sentinel.url) { sentinelAdmin in
            try await Self.withClient(configuration: configuration, logger: logs.logger) { client async throws in
                // The first sentinel listed is down and the second never answers: the client asks them
                // all at once, and the third's answer is enough.
                #expect(try await client.send(["SET", prefix + "k", "before"]) == .status("OK"))
                #expect(try await client.send(["ROLE"]).array?.first?.string == "master")

                #expect(await Self.sentinelFailover(sentinelAdmin, masterName, to: replica.port))

                // The client hears `+switch-master` from the sentinel and reconnects every pooled connection to
                // the new primary: soon every command (one per pooled connection and more) lands there.
                #expect(
                    await Self.eventually(within: .seconds(30)) {
                        await Self.everyCommandLands(on: replica.port, client)
                    })
                #expect(try await client.send(["SET", prefix + "k", "after"]) == .status("OK"))
                // The client heard the sentinel's `+switch-master` announcement.
                #expect(await logs.wait(within: .seconds(20), for: "Redis sentinel announced a new primary"))
            }
        }
        try await Self.withClient(url: replica.url) { newPrimary async throws in
            #expect(try await newPrimary.send(["ROLE"]).array?.first?.string == "master")
            #expect(try await newPrimary.send(["GET", prefix + "k"]).string == "after")
        }
        await silentSentinel.stop()
        await sentinel.stop()
        await replica.stop()
        await primary.stop()
    }

    @Test(
        "a sentinel that names a replica as the primary (it missed a failover) does not keep the client from the primary",
        .timeLimit(.minutes(1)))
    func aStaleSentinelIsNotFollowed() async throws {
        let masterName = "tg-primary"
        let (primary, replica) = try await Self.primaryAndReplica()
        let sentinel = try await RedisServerProcess.startSentinel(
            monitoringPrimaryPort: primary.port, masterName: masterName)
        // Answers every request with the replica's address, as a sentinel that has not seen a failover does.
        let port = "\(replica.port)"
        let stale = try await LoopbackListener.start(
            answering: "*2\r\n$9\r\n127.0.0.1\r\n$\(port.utf8.count)\r\n\(port)\r\n")
        let url = "redis-sentinel://127.0.0.1:\(stale.port),127.0.0.1:\(sentinel.port)/\(masterName)/0"
        try await Self.withClient(configuration: try RedisConfiguration(url: url)) { client async throws in
            #expect(await Self.everyCommandLands(on: primary.port, client))
            #expect(try await client.send(["SET", Self.prefix() + "k", "v"]) == .status("OK"))
            // The stale sentinel was asked; whichever answer came first, a replica is never used as the primary.
            #expect(stale.connections > 0)
        }
        await stale.stop()
        await sentinel.stop()
        await replica.stop()
        await primary.stop()
    }
}

extension RedisClientTests {
    @Test(
        "a failover the sentinel watch missed (its connection was down meanwhile): once resubscribed, the client asks the sentinels and moves to the new primary",
        .timeLimit(.minutes(2))
    )
    func followsAFailoverMissedWhileTheSentinelWatchWasDown() async throws {
        let masterName = "tg-primary"
        // The old primary cannot be turned into a replica (as when the sentinels cannot reach it): it
        // keeps its clients and goes on answering as a primary, so only the sentinels can tell the
        // client where the primary is now.
        let (primary, replica) = try await Self.primaryAndReplica(primaryArguments: [
            "--rename-command", "REPLICAOF", "replicaof-renamed-by-test", "--rename-command", "SLAVEOF",
            "slaveof-renamed-by-test",
        ])
        let sentinel = try await RedisServerProcess.startSentinel(
            monitoringPrimaryPort: primary.port, masterName: masterName)
        // The client reaches the sentinel through a proxy the test can hold shut: the watch is down
        // for the whole failover, however long it takes.
        let proxy = try await TCPProxy.start(forwardingTo: sentinel.port)
        let logs = RedisTestLogs()
        var configuration = try RedisConfiguration(url: "redis-sentinel://127.0.0.1:\(proxy.port)/\(masterName)/0")
        configuration.reconnectBackoffCap = .milliseconds(500)
        // One pooled connection, made before the watch goes down: a slot connecting later would ask the
        // sentinels itself and move the pool before the watch does.
        configuration.poolSize = 1
        try await Self.withClient(url: sentinel.url) { sentinelAdmin in
            try await Self.withClient(configuration: configuration, logger: logs.logger) { client async throws in
                #expect(await Self.everyCommandLands(on: primary.port, client))
                #expect(await logs.wait(for: "Redis subscription up"))
                proxy.hold()
                #expect(await logs.wait(for: "Redis subscription connection down"))
                #expect(await Self.sentinelFailover(sentinelAdmin, masterName, to: replica.port))
                // The failover is over (`+switch-master` announced while the watch was down): the sentinel's
                // own record of the primary moves only then, after it already names the promoted replica.
                #expect(
                    await Self.eventually(within: .seconds(30)) {
                        let fields = (try? await sentinelAdmin.send(["SENTINEL", "MASTER", masterName]))?.array ?? []
                        let pairs = stride(from: 0, to: fields.count - 1, by: 2).map {
                            (fields[$0].string ?? "", fields[$0 + 1].string ?? "")
                        }
                        let record = Dictionary(pairs, uniquingKeysWith: { a, _ in a })
                        return record["port"] == "\(replica.port)" && record["flags"] == "master"
                    })
                // The old primary still answers as one, and nothing told the client.
                #expect(await Self.everyCommandLands(on: primary.port, client))
                #expect(logs.messages.filter { $0 == "Redis subscription up" }.count == 1)
                // The sentinel is in reach again: the resubscribed watch asks it, and the pool moves.
                proxy.release()
                #expect(
                    await Self.eventually(within: .seconds(30)) {
                        await Self.everyCommandLands(on: replica.port, client)
                    })
                #expect(logs.messages.filter { $0 == "Redis subscription up" }.count >= 2)
                #expect(
                    logs.messages.contains(
                        "Redis sentinels name another primary than the pool's connections: reconnecting"))
                #expect(!logs.messages.contains("Redis sentinel announced a new primary"))
            }
        }
        await proxy.stop()
        await sentinel.stop()
        await replica.stop()
        await primary.stop()
    }
}

/// Collects the events of a subscription stream (one consumer task) so tests can wait for them.
final class RedisPubSubRecorder: Sendable {
    private let state = Mutex<(events: [RedisPubSubEvent], finished: Bool)>(([], false))
    private let consumer = Mutex<Task<Void, Never>?>(nil)
    private let signal = ChangeSignal()

    init(_ stream: AsyncStream<RedisPubSubEvent>) {
        let task = Task { [weak self] in
            for await event in stream {
                self?.state.withLock { $0.events.append(event) }
                self?.signal.changed()
            }
            self?.state.withLock { $0.finished = true }
            self?.signal.changed()
        }
        self.consumer.withLock { $0 = task }
    }

    deinit {
        self.consumer.withLock { $0?.cancel() }
    }

    /// The events received so far.
    var events: [RedisPubSubEvent] {
        self.state.withLock { $0.events }
    }

    /// Waits until the events received so far satisfy `condition`, for at most `timeout`.
    func wait(
        within timeout: Duration = .seconds(10), _ condition: @escaping @Sendable ([RedisPubSubEvent]) -> Bool
    ) async -> Bool {
        await self.signal.wait(within: timeout) { condition(self.events) }
    }

    /// Waits until the stream has ended, for at most `timeout`.
    func waitUntilFinished(within timeout: Duration = .seconds(10)) async -> Bool {
        await self.signal.wait(within: timeout) { self.state.withLock { $0.finished } }
    }
}

/// Log messages of one client, for asserting on what it logged.
final class RedisTestLogs: Sendable {
    private let recorded = Mutex<[String]>([])
    private let signal = ChangeSignal()

    var messages: [String] {
        self.recorded.withLock { $0 }
    }

    /// Waits until a message equal to `message` has been logged, for at most `timeout`.
    func wait(within timeout: Duration = .seconds(10), for message: String) async -> Bool {
        await self.signal.wait(within: timeout) { self.messages.contains(message) }
    }

    var logger: Logger {
        Logger(label: "redis-test") { _ in Handler(logs: self) }
    }

    private struct Handler: LogHandler {
        let logs: RedisTestLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            self.logs.recorded.withLock { $0.append("\(event.message)") }
            self.logs.signal.changed()
        }
    }
}

/// Answers `PING` with `PONG` and every other command with a `READONLY` error, keeping the
/// connection (one command per read: the client under test sends them one at a time).
private final class ReadOnlyReplica: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let text = String(buffer: self.unwrapInboundIn(data))
        let reply = text.contains("PING") ? "+PONG\r\n" : "-READONLY You can't write against a read only replica.\r\n"
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: reply)), promise: nil)
    }
}
