import Logging
import NIOCore

/// Establishes ready connections: finds the primary (through the sentinels when configured), connects, and runs
/// the handshake (`AUTH`, `SELECT`, and `ROLE` to make sure a sentinel-announced address really is the primary).
struct RedisConnector: Sendable {
    let configuration: RedisConfiguration
    let logger: Logger

    /// A connection ready for commands (or for `SUBSCRIBE`, when `pushHandler` is set), within `connectTimeout`.
    ///
    /// - Throws: ``RedisError/unavailable`` (the reason is logged), or `CancellationError`.
    func connect(
        on eventLoop: any EventLoop,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)? = nil
    ) async throws -> RedisConnection {
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        let host: String
        let port: Int
        let checkRole: Bool
        switch self.configuration.endpoint {
        case .direct(let directHost, let directPort):
            (host, port, checkRole) = (directHost, directPort, false)
        case .sentinel(let sentinels, let masterName):
            (host, port) = try await self.resolvePrimary(
                sentinels: sentinels,
                masterName: masterName,
                eventLoop: eventLoop,
                deadline: deadline
            )
            checkRole = true
        }

        let connection = try await RedisConnection.connect(
            host: host,
            port: port,
            eventLoop: eventLoop,
            deadline: deadline,
            stallTimeout: TimeAmount(self.configuration.commandTimeout),
            logger: self.logger,
            pushHandler: pushHandler
        )
        do {
            try await self.handshake(connection, checkRole: checkRole, deadline: deadline)
            return connection
        } catch {
            connection.close()
            throw error
        }
    }

    private func handshake(_ connection: RedisConnection, checkRole: Bool, deadline: NIODeadline) async throws {
        var commands: [[String]] = []
        if let password = self.configuration.password {
            commands.append(["AUTH", password])
        }
        if self.configuration.database != 0 {
            commands.append(["SELECT", String(self.configuration.database)])
        }
        if checkRole {
            commands.append(["ROLE"])
        }
        guard !commands.isEmpty else {
            return
        }
        let replies: [RedisValue]
        do {
            replies = try await connection.send(commands, deadline: deadline)
        } catch let error as RedisError {
            self.logger.debug(
                "Redis connection handshake failed",
                metadata: ["redis.address": "\(connection.address)", "redis.error": "\(error)"]
            )
            throw RedisError.unavailable
        }
        for reply in replies {
            if case .error(let message) = reply {
                // Only the reply's description (no command arguments, so never the password) is logged.
                self.logger.error(
                    "Redis rejected the connection handshake",
                    metadata: [
                        "redis.address": "\(connection.address)", "redis.error": "\(RedisError.server(message))",
                    ]
                )
                throw RedisError.unavailable
            }
        }
        if checkRole {
            let role = replies.last?.array?.first?.string
            guard role == "master" else {
                self.logger.notice(
                    "Redis node announced as primary is not a primary (failover in progress?)",
                    metadata: ["redis.address": "\(connection.address)", "redis.role": "\(role ?? "unknown")"]
                )
                throw RedisError.unavailable
            }
        }
    }

    /// A plain connection to the first sentinel (in order) that accepts one, for watching its failover
    /// announcements (`+promoted-slave`, `+switch-master`).
    ///
    /// - Throws: ``RedisError/unavailable`` when no sentinel can be reached (or the endpoint is direct).
    func connectToSentinel(
        on eventLoop: any EventLoop,
        pushHandler: (@Sendable (RedisPubSubEvent) -> Void)?
    ) async throws -> RedisConnection {
        guard case .sentinel(let sentinels, _) = self.configuration.endpoint else {
            throw RedisError.unavailable
        }
        let deadline = NIODeadline.now() + TimeAmount(self.configuration.connectTimeout)
        for sentinel in sentinels {
            try Task.checkCancellation()
            if let connection = try? await RedisConnection.connect(
                host: sentinel.host,
                port: sentinel.port,
                eventLoop: eventLoop,
                deadline: deadline,
                stallTimeout: TimeAmount(self.configuration.commandTimeout),
                logger: self.logger,
                pushHandler: pushHandler
            ) {
                return connection
            }
        }
        throw RedisError.unavailable
    }

    /// Asks each sentinel in order for the primary's address; the first answer wins.
    private func resolvePrimary(
        sentinels: [RedisSentinelAddress],
        masterName: String,
        eventLoop: any EventLoop,
        deadline: NIODeadline
    ) async throws -> (host: String, port: Int) {
        for sentinel in sentinels {
            try Task.checkCancellation()
            guard NIODeadline.now() < deadline else {
                break
            }
            do {
                let connection = try await RedisConnection.connect(
                    host: sentinel.host,
                    port: sentinel.port,
                    eventLoop: eventLoop,
                    deadline: deadline,
                    stallTimeout: TimeAmount(self.configuration.commandTimeout),
                    logger: self.logger
                )
                defer { connection.close() }
                let replies = try await connection.send(
                    [["SENTINEL", "get-master-addr-by-name", masterName]],
                    deadline: deadline
                )
                if let address = replies.first?.array, address.count == 2, let host = address[0].string,
                    let port = address[1].int.flatMap({ Int(exactly: $0) })
                {
                    self.logger.debug(
                        "Redis sentinel named the primary",
                        metadata: ["redis.sentinel": "\(sentinel)", "redis.address": "\(host):\(port)"]
                    )
                    return (host, port)
                }
                self.logger.notice(
                    "Redis sentinel does not know the primary",
                    metadata: [
                        "redis.sentinel": "\(sentinel)", "redis.reply": "\(replies.first.map(Self.kind) ?? "none")",
                    ]
                )
            } catch let error as RedisError {
                self.logger.debug(
                    "Redis sentinel did not answer",
                    metadata: ["redis.sentinel": "\(sentinel)", "redis.error": "\(error)"]
                )
            }
        }
        self.logger.warning("No Redis sentinel named the primary")
        throw RedisError.unavailable
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
