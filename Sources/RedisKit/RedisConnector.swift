import Logging
import NIOCore
import Synchronization

/// Establishes ready connections: finds the primary (through the sentinels when configured), connects (with TLS
/// when configured), and runs the handshake (`AUTH`, `SELECT`, and `ROLE` to make sure a sentinel-announced
/// address really is the primary).
struct RedisConnector: Sendable {
    let configuration: RedisConfiguration
    let logger: Logger
    /// Remembers which lasting problems (refused credentials, failed TLS handshakes) were already logged, so an
    /// outage is reported once rather than on every reconnect.
    let problems = RedisProblemLog()

    /// A connection ready for commands (or for `SUBSCRIBE`, when `pushHandler` is set), within `connectTimeout`.
    ///
    /// - Throws: ``RedisError/unavailable`` (the reason is logged), or `CancellationError`.
    func connect(
        on eventLoop: any EventLoop,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil
    ) async throws -> RedisConnection {
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        switch self.configuration.endpoint {
        case .direct(let host, let port):
            return try await self.connect(
                to: RedisNodeAddress(host: host, port: port), on: eventLoop, deadline: deadline,
                checkRole: false, pushHandler: pushHandler)
        case .sentinel(let sentinels, let masterName):
            // The address most sentinels name first; when it is no primary (a stale sentinel, a failover
            // under way), the next one named, within the same deadline.
            let named = await self.primaryCandidates(
                sentinels: sentinels, masterName: masterName, eventLoop: eventLoop, deadline: deadline)
            guard !named.isEmpty else {
                self.logger.warning("No Redis sentinel named the primary")
                throw RedisError.unavailable(
                    .noPrimaryNamed, address: sentinels.map(\.description).joined(separator: ","))
            }
            var failure: any Error = RedisError.unavailable
            for primary in named {
                try Task.checkCancellation()
                do {
                    return try await self.connect(
                        to: primary, on: eventLoop, deadline: deadline, checkRole: true, pushHandler: pushHandler)
                } catch let error as RedisError {
                    failure = error
                }
            }
            throw failure
        case .cluster(let seeds):
            // Without a node named (subscriptions, which may use any node): the first seed that answers,
            // each with a connect timeout of its own (one that drops packets does not use up the others').
            var failure: any Error = RedisError.unavailable
            for seed in seeds {
                try Task.checkCancellation()
                do {
                    return try await self.connect(
                        to: seed, on: eventLoop, deadline: nil, checkRole: false, pushHandler: pushHandler)
                } catch let error as RedisError {
                    failure = error
                }
            }
            throw failure
        }
    }

    /// A connection to one data node (a cluster node, or a known primary): TLS, `AUTH`, `SELECT`, and with
    /// `checkRole` a check that the node is a primary.
    ///
    /// - Throws: ``RedisError/unavailable`` (the reason is logged), or `CancellationError`.
    func connect(
        to node: RedisNodeAddress,
        on eventLoop: any EventLoop,
        deadline: NIODeadline? = nil,
        checkRole: Bool = false,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil
    ) async throws -> RedisConnection {
        let deadline = deadline ?? NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        let connection = try await self.open(node, on: eventLoop, deadline: deadline, pushHandler: pushHandler)
        do {
            try await self.handshake(connection, checkRole: checkRole, deadline: deadline)
            self.problems.cleared()
            return connection
        } catch {
            connection.close()
            throw error
        }
    }

    /// Opens a TCP (and TLS) connection; logs a failed TLS handshake once per outage, at error level.
    private func open(
        _ node: RedisNodeAddress,
        on eventLoop: any EventLoop,
        deadline: NIODeadline,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)?
    ) async throws -> RedisConnection {
        do throws(RedisConnectError) {
            return try await RedisConnection.connect(
                host: node.host,
                port: node.port,
                tls: self.configuration.tls,
                eventLoop: eventLoop,
                deadline: deadline,
                stallTimeout: TimeAmount(self.configuration.commandTimeout),
                logger: self.logger,
                pushHandler: pushHandler
            )
        } catch {
            let metadata: Logger.Metadata = ["redis.address": "\(node)", "redis.error": "\(error)"]
            if error.kind == .tls, self.problems.firstReport(of: .tlsHandshake) {
                self.logger.error("Redis TLS handshake failed; the server is not used", metadata: metadata)
            } else {
                self.logger.debug("Redis connect failed", metadata: metadata)
            }
            throw RedisError.unavailable(error.cause, address: "\(node)")
        }
    }

    /// `AUTH` (when the configuration has a password), `SELECT` (database other than 0), `ROLE` (with
    /// `checkRole`), pipelined; `PING` when none of them applies. A connection counts as up only once
    /// the server has answered: one that accepts and then refuses every client (`maxclients` reached,
    /// protected mode) fails here, and its slot backs off instead of reconnecting at once.
    private func handshake(_ connection: RedisConnection, checkRole: Bool, deadline: NIODeadline) async throws {
        var commands: [[String]] = []
        let authenticates = self.configuration.password != nil
        if let auth = self.authCommand {
            commands.append(auth)
        }
        if self.configuration.database != 0 {
            commands.append(["SELECT", String(self.configuration.database)])
        }
        if checkRole {
            commands.append(["ROLE"])
        }
        if commands.isEmpty {
            commands.append(["PING"])
        }
        let replies: [RedisValue]
        do {
            replies = try await connection.send(commands, deadline: deadline)
        } catch let error as RedisError {
            self.logger.debug(
                "Redis connection handshake failed",
                metadata: ["redis.address": "\(connection.address)", "redis.error": "\(error)"]
            )
            throw RedisError.unavailable(error == .timeout ? .timeout : .handshake, address: connection.address)
        }
        for (index, reply) in replies.enumerated() {
            guard case .error(let message) = reply else {
                continue
            }
            if authenticates, index == 0, Self.refusesCredentials(message) {
                self.reportRefusedCredentials(message, address: connection.address)
                throw RedisError.unavailable(.credentials, address: connection.address)
            } else {
                // Only the reply's description (no command arguments) is logged; once per outage at
                // error level (a server at `maxclients` refuses every reconnect the same way).
                let metadata: Logger.Metadata = [
                    "redis.address": "\(connection.address)", "redis.error": "\(RedisError.server(message))",
                ]
                if self.problems.firstReport(of: .handshakeRejected) {
                    self.logger.error("Redis rejected the connection handshake", metadata: metadata)
                } else {
                    self.logger.debug("Redis rejected the connection handshake again", metadata: metadata)
                }
            }
            throw RedisError.unavailable(.rejected, address: connection.address)
        }
        if checkRole {
            let role = replies.last?.array?.first?.string
            guard role == "master" else {
                self.logger.notice(
                    "Redis node announced as primary is not a primary (failover in progress?)",
                    metadata: ["redis.address": "\(connection.address)", "redis.role": "\(role ?? "unknown")"]
                )
                throw RedisError.unavailable(.notPrimary, address: connection.address)
            }
        }
    }

    /// Whether an error reply to `AUTH` is about the credentials (`WRONGPASS`, `NOPERM`, a password
    /// the server does not take) rather than the server itself (`maxclients` reached, protected
    /// mode, loading), which the handshake reports as such.
    static func refusesCredentials(_ message: String) -> Bool {
        let code = message.prefix(while: { $0 != " " })
        return code == "WRONGPASS" || code == "NOPERM" || code == "NOAUTH"
            || message.lowercased().contains("password")
    }

    /// `AUTH [user] password`, or `nil` without a password.
    private var authCommand: [String]? {
        guard let password = self.configuration.password else {
            return nil
        }
        if let username = self.configuration.username {
            return ["AUTH", username, password]
        }
        return ["AUTH", password]
    }

    /// Logs once per outage (until a connection succeeds) that the credentials were refused; never the password.
    private func reportRefusedCredentials(_ message: String, address: String) {
        let metadata: Logger.Metadata = [
            "redis.address": "\(address)",
            "redis.user": "\(self.configuration.username ?? "default")",
            "redis.error": "\(RedisError.server(message))",
        ]
        if self.problems.firstReport(of: .credentialsRefused) {
            self.logger.error(
                "Redis refused the credentials; check the user and password in the Redis URL", metadata: metadata)
        } else {
            self.logger.debug("Redis refused the credentials again", metadata: metadata)
        }
    }

    /// Authenticates a sentinel connection when the configuration carries credentials. A sentinel without a
    /// password of its own is then used without: it answers that none is configured (`AUTH password`), or
    /// refuses the unknown user (`AUTH user password`: `WRONGPASS`) and then answers a `PING` unauthenticated.
    private func authenticateSentinel(_ connection: RedisConnection, deadline: NIODeadline) async throws {
        guard let auth = self.authCommand else {
            return
        }
        let reply = try await connection.send([auth], deadline: deadline).first
        guard case .some(.error(let message)) = reply else {
            return
        }
        if message.contains("without any password configured") || message.contains("no password is set") {
            return
        }
        if self.configuration.username != nil,
            case .some(.status("PONG")) = try await connection.send([["PING"]], deadline: deadline).first
        {
            return  // the credentials are the data nodes'; this sentinel asks for none
        }
        self.reportRefusedCredentials(message, address: connection.address)
        throw RedisError.unavailable
    }

    /// A plain connection to a sentinel, for watching its failover announcements (`+promoted-slave`,
    /// `+switch-master`): every sentinel is tried at once and the first that answers a `PING` wins,
    /// so one that is down, drops packets or never answers does not keep the watch from the others.
    ///
    /// - Throws: ``RedisError/unavailable`` when no sentinel answers (or the endpoint is not Sentinel).
    func connectToSentinel(
        on eventLoop: any EventLoop,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)?
    ) async throws -> RedisConnection {
        guard case .sentinel(let sentinels, _) = self.configuration.endpoint else {
            throw RedisError.unavailable
        }
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        let winner = await Self.firstSuccess(
            of: sentinels,
            attempt: { sentinel in
                let connection = try await self.open(
                    sentinel, on: eventLoop, deadline: deadline, pushHandler: pushHandler)
                do {
                    try await self.authenticateSentinel(connection, deadline: deadline)
                    guard case .some(.status) = try await connection.send([["PING"]], deadline: deadline).first else {
                        throw RedisError.unavailable
                    }
                    return connection
                } catch {
                    connection.close()
                    throw error
                }
            },
            discard: { $0.close() })
        if Task.isCancelled {
            winner?.close()
            throw CancellationError()
        }
        guard let winner else { throw RedisError.unavailable }
        return winner
    }

    /// The primary the sentinels name now (see ``primaryCandidates``), checked with `ROLE`: the first named
    /// address that is a primary, so a sentinel that missed a failover cannot send the pool back to a
    /// replica. `nil` when none answers, none named is a primary, or the endpoint is not Sentinel.
    func currentPrimary(on eventLoop: any EventLoop) async -> RedisNodeAddress? {
        guard case .sentinel(let sentinels, let masterName) = self.configuration.endpoint else {
            return nil
        }
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        let named = await self.primaryCandidates(
            sentinels: sentinels, masterName: masterName, eventLoop: eventLoop, deadline: deadline)
        for address in named {
            guard
                let connection = try? await self.connect(
                    to: address, on: eventLoop, deadline: deadline, checkRole: true)
            else { continue }
            connection.close()
            return address
        }
        return nil
    }

    /// How long, after the first sentinel named the primary, the others' answers are waited for (they
    /// break a disagreement); a sentinel that is down or silent costs no more than this.
    static let sentinelGrace = TimeAmount.milliseconds(100)

    /// The primary's addresses as the sentinels name them, asked all at once: the address named most
    /// often first (a sentinel that has not seen a failover yet is outvoted), ties in the order the
    /// answers came. Waits for every sentinel, a majority naming one address, or ``sentinelGrace``
    /// after the first answer, whichever comes first; empty when none answered by `deadline`.
    func primaryCandidates(
        sentinels: [RedisSentinelAddress],
        masterName: String,
        eventLoop: any EventLoop,
        deadline: NIODeadline
    ) async -> [RedisNodeAddress] {
        enum Event: Sendable {
            case answer(RedisNodeAddress?)
            case graceOver
        }
        let answers = await withTaskGroup(of: Event.self) { group -> [RedisNodeAddress] in
            for sentinel in sentinels {
                group.addTask {
                    .answer(
                        await self.askSentinel(
                            sentinel, masterName: masterName, eventLoop: eventLoop, deadline: deadline))
                }
            }
            var answers: [RedisNodeAddress] = []
            var outstanding = sentinels.count
            while outstanding > 0, let event = await group.next() {
                guard case .answer(let answer) = event else { break }
                outstanding -= 1
                guard let answer else { continue }
                answers.append(answer)
                if answers.count(where: { $0 == answer }) * 2 > sentinels.count { break }
                if answers.count == 1, outstanding > 0 {
                    group.addTask {
                        try? await Task.sleep(for: .nanoseconds(Self.sentinelGrace.nanoseconds))
                        return .graceOver
                    }
                }
            }
            group.cancelAll()
            return answers
        }
        var votes: [RedisNodeAddress: Int] = [:]
        var order: [RedisNodeAddress] = []
        for answer in answers {
            if votes[answer] == nil { order.append(answer) }
            votes[answer, default: 0] += 1
        }
        // A stable sort: equal votes keep the order of the first answers.
        return order.enumerated().sorted { a, b in
            votes[a.element]! != votes[b.element]! ? votes[a.element]! > votes[b.element]! : a.offset < b.offset
        }.map(\.element)
    }

    /// One sentinel's answer to `SENTINEL get-master-addr-by-name`; nil when it does not answer (by
    /// `deadline`, or before the asking task is cancelled) or does not know the primary.
    private func askSentinel(
        _ sentinel: RedisSentinelAddress, masterName: String, eventLoop: any EventLoop, deadline: NIODeadline
    ) async -> RedisNodeAddress? {
        do {
            let connection = try await self.open(sentinel, on: eventLoop, deadline: deadline, pushHandler: nil)
            defer { connection.close() }
            try await self.authenticateSentinel(connection, deadline: deadline)
            let replies = try await connection.send(
                [["SENTINEL", "get-master-addr-by-name", masterName]], deadline: deadline)
            if let address = replies.first?.array, address.count == 2, let host = address[0].string,
                let port = address[1].int.flatMap({ Int(exactly: $0) })
            {
                self.logger.debug(
                    "Redis sentinel named the primary",
                    metadata: ["redis.sentinel": "\(sentinel)", "redis.address": "\(host):\(port)"])
                return RedisNodeAddress(host: host, port: port)
            }
            self.logger.notice(
                "Redis sentinel does not know the primary",
                metadata: [
                    "redis.sentinel": "\(sentinel)", "redis.reply": "\(replies.first.map(Self.kind) ?? "none")",
                ])
        } catch {
            self.logger.debug(
                "Redis sentinel did not answer", metadata: ["redis.sentinel": "\(sentinel)", "redis.error": "\(error)"])
        }
        return nil
    }

    /// Runs `attempt` for every candidate at once and returns the first success (nil when none
    /// succeeds); the other attempts are cancelled, and whatever they still produce is `discard`ed.
    static func firstSuccess<Candidate: Sendable, Result: Sendable>(
        of candidates: [Candidate],
        attempt: @escaping @Sendable (Candidate) async throws -> Result,
        discard: @escaping @Sendable (Result) -> Void
    ) async -> Result? {
        await withTaskGroup(of: Result?.self) { group in
            for candidate in candidates {
                group.addTask { try? await attempt(candidate) }
            }
            var winner: Result?
            for await result in group {
                guard let result else { continue }
                if winner == nil {
                    winner = result
                    group.cancelAll()
                } else {
                    discard(result)
                }
            }
            return winner
        }
    }

    private static func kind(_ reply: RedisValue) -> String {
        switch reply {
        case .null: "null"
        case .status: "status"
        case .error(let message): "\(RedisError.server(message))"
        case .integer: "integer"
        case .bulk: "bulk"
        case .array: "array"
        }
    }
}

/// Which lasting connection problems have been logged since the last successful connection.
final class RedisProblemLog: Sendable {
    enum Problem: Int {
        case credentialsRefused = 1
        case tlsHandshake = 2
        case handshakeRejected = 4
    }

    private let reported = Atomic<Int>(0)

    /// `true` the first time `problem` is reported since the last ``cleared()``.
    func firstReport(of problem: Problem) -> Bool {
        let (original, _) = self.reported.bitwiseOr(problem.rawValue, ordering: .relaxed)
        return original & problem.rawValue == 0
    }

    /// A connection succeeded: the next problem is news again.
    func cleared() {
        if self.reported.load(ordering: .relaxed) != 0 {
            self.reported.store(0, ordering: .relaxed)
        }
    }
}
