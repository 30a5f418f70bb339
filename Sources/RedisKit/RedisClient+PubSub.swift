import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// An event on a subscription stream.
public enum RedisPubSubEvent: Sendable, Hashable {
    /// A message published to one of the subscribed channels.
    case message(channel: String, payload: String)
    /// The subscription is (again) in place: sent after the first `SUBSCRIBE` and after every reconnect. Messages
    /// published while the subscriber was disconnected are lost, so re-read any state they would have announced.
    case subscribed
    /// The subscription is not in place: its connection was lost, or subscribing failed (a refused connect, a
    /// `SUBSCRIBE` the server refused). Sent once per loss, before the next ``subscribed``; until then messages
    /// are missed.
    case unsubscribed
}

extension RedisClient {
    /// Subscribes to `channels` on a dedicated connection that ``run()`` keeps alive for the client's lifetime
    /// (with a cluster, to any one node: Redis Cluster delivers a `PUBLISH` on any node to subscribers on all):
    /// it is re-established with backoff after a loss, re-subscribes, and then yields
    /// ``RedisPubSubEvent/subscribed`` again.
    ///
    /// Events flow only while ``run()`` runs. The stream ends on shutdown (or immediately if the client is already
    /// shut down); ending its iteration closes the subscription. It buffers the newest `bufferSize` events: a
    /// consumer that falls further behind loses the oldest messages, and then, as a subscriber Redis disconnects
    /// for its output buffer would, gets the subscription made again and a ``RedisPubSubEvent/subscribed``
    /// after the messages still buffered, on which it re-reads what it may have missed.
    public func subscribe(channels: [String], bufferSize: Int = 10_000) -> AsyncStream<RedisPubSubEvent> {
        let (stream, continuation) = AsyncStream.makeStream(
            of: RedisPubSubEvent.self,
            bufferingPolicy: .bufferingNewest(max(bufferSize, 1))
        )
        guard !channels.isEmpty else {
            continuation.finish()
            return stream
        }
        let subscription = self.state.withLock { state -> RedisSubscription? in
            guard !state.isShutDown else {
                return nil
            }
            let subscription = RedisSubscription(
                id: state.nextSubscriptionID,
                label: "\(state.nextSubscriptionID)",
                channels: channels,
                continuation: continuation
            )
            state.nextSubscriptionID += 1
            state.subscriptions[subscription.id] = subscription
            return subscription
        }
        guard let subscription else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            subscription.terminate()
            self?.state.withLock { state in
                _ = state.subscriptions.removeValue(forKey: subscription.id)
            }
        }
        self.registrations.yield(subscription)
        return stream
    }

    /// Maintains the subscriptions until graceful shutdown or cancellation, then closes every connection
    /// (``shutdown()``). Call it once.
    public func run() async throws {
        let registrations = self.state.withLock { state in
            let stream = state.registrationStream
            state.registrationStream = nil
            return stream
        }
        guard let registrations else {
            preconditionFailure("RedisClient.run() must be called only once")
        }
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                if case .sentinel(_, let masterName) = self.configuration.endpoint {
                    group.addTask {
                        await self.followFailovers(masterName: masterName)
                    }
                }
                for await subscription in registrations {
                    group.addTask {
                        await self.maintain(subscription) { eventLoop, pushHandler in
                            if let cluster = self.cluster {
                                // Redis Cluster forwards every PUBLISH to every node: one node serves them all.
                                return try await cluster.connectSubscriber(on: eventLoop, pushHandler: pushHandler)
                            }
                            return try await self.connector.connect(on: eventLoop, pushHandler: pushHandler)
                        }
                    }
                }
                // Shutdown or cancellation: stop every subscription.
                group.cancelAll()
            }
        } onGracefulShutdown: {
            self.registrations.finish()
        }
        await self.shutdown()
    }

    /// Watches the sentinels' announcements that the primary moved: when it does, every pooled and subscriber
    /// connection is closed, so each reconnects to the new primary at once instead of writing to the demoted one
    /// until the sentinel reconfigures it (writes acknowledged there in the meantime would be lost).
    ///
    /// `+promoted-slave` comes from the sentinel leading the failover at the very moment it starts naming the
    /// promoted replica as the primary (`SENTINEL get-master-addr-by-name`); `+switch-master` comes from every
    /// sentinel, but only once the failover has ended, which can take until the failover timeout. Both are
    /// followed, so a reconnect asks the sentinels again as soon as they give out the new address.
    private func followFailovers(masterName: String) async {
        let (events, continuation) = AsyncStream.makeStream(
            of: RedisPubSubEvent.self,
            bufferingPolicy: .bufferingNewest(100)
        )
        let watch = RedisSubscription(
            id: -1,
            label: "sentinel",
            channels: ["+switch-master", "+promoted-slave"],
            continuation: continuation
        )
        await withDiscardingTaskGroup { group in
            group.addTask {
                await self.maintain(watch) { eventLoop, pushHandler in
                    try await self.connector.connectToSentinel(on: eventLoop, pushHandler: pushHandler)
                }
            }
            for await event in events {
                let newPrimary: String
                switch event {
                case .subscribed:
                    // Announcements made while the watch was down are lost for good: each time it is
                    // (re)subscribed, the sentinels are asked which node is the primary now.
                    guard let named = await self.connector.currentPrimary(on: self.eventLoopGroup.next()) else {
                        continue
                    }
                    newPrimary = named.description
                case .message(let channel, let announcement):
                    guard
                        let announced = Self.announcedPrimary(
                            channel: channel, announcement: announcement, masterName: masterName)
                    else {
                        continue
                    }
                    self.logger.notice(
                        "Redis sentinel announced a new primary",
                        metadata: ["redis.sentinel.event": "\(channel)", "redis.switch": "\(announcement)"]
                    )
                    newPrimary = announced
                case .unsubscribed:
                    continue  // asked again on the next `subscribed`
                }
                // Connections already on the new primary (a second announcement of the same failover, or a
                // reconnect that asked the sentinels after the first) stay: closing them would fail their commands.
                let closed = self.pool.closeConnections(notTo: newPrimary)
                if event == .subscribed, closed > 0 {
                    self.logger.notice(
                        "Redis sentinels name another primary than the pool's connections: reconnecting",
                        metadata: ["redis.address": "\(newPrimary)", "redis.connections": "\(closed)"])
                }
                let subscriptions = self.state.withLock { Array($0.subscriptions.values) }
                for subscription in subscriptions {
                    subscription.closeConnection(unlessTo: newPrimary)
                }
            }
            group.cancelAll()
        }
    }

    /// The new primary's `host:port` (as ``RedisConnection/address`` writes it) when a sentinel announcement says
    /// that `masterName` has one: `+switch-master` `<master> <old ip> <old port> <new ip> <new port>`, or
    /// `+promoted-slave` `slave <ip>:<port> <ip> <port> @ <master> <old ip> <old port>`; `nil` for anything else.
    static func announcedPrimary(channel: String, announcement: String, masterName: String) -> String? {
        let fields = announcement.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        let host: String
        let port: String
        switch channel {
        case "+switch-master" where fields.count == 5 && fields[0] == masterName:
            (host, port) = (fields[3], fields[4])
        case "+promoted-slave"
        where fields.count == 8 && fields[0] == "slave" && fields[4] == "@"
            && fields[5] == masterName:
            (host, port) = (fields[2], fields[3])
        default:
            return nil
        }
        guard let portNumber = Int(port) else {
            return nil
        }
        return hostPortDescription(host: host, port: portNumber)
    }

    /// Keeps one subscription connected until it is terminated or the task is cancelled.
    private func maintain(
        _ subscription: RedisSubscription,
        connect:
            @Sendable (any EventLoop, @escaping @Sendable (RedisPubSubEvent) -> Void) async throws
            -> RedisConnection
    ) async {
        defer { subscription.terminate() }
        var logger = self.logger
        logger[metadataKey: "redis.subscription"] = "\(subscription.label)"
        var failures = 0
        var announcedDown = false
        while !Task.isCancelled, !subscription.isTerminated {
            var failure: (any Error)?
            do {
                let connection = try await connect(self.eventLoopGroup.next()) { [logger] event in
                    if subscription.deliver(event) {
                        logger.warning(
                            "Redis subscription consumer fell behind: messages dropped; subscribing again",
                            metadata: ["redis.channels": "\(subscription.channels.count)"])
                    }
                }
                guard subscription.attach(connection) else {
                    connection.close()
                    return
                }
                defer { subscription.detach(connection) }
                // Failures count until the server confirms the subscription: a SUBSCRIBE it refuses
                // (an ACL user without the channel, `NOPERM`) backs off like a failed connect.
                try await self.subscribeAndWatch(connection, subscription: subscription, logger: logger) {
                    failures = 0
                    announcedDown = false
                }
                if !subscription.isTerminated, !Task.isCancelled {
                    logger.notice(
                        "Redis subscription connection down",
                        metadata: ["redis.address": "\(connection.address)"]
                    )
                }
            } catch is CancellationError {
                return
            } catch {
                failure = error
            }
            guard !Task.isCancelled, !subscription.isTerminated else {
                return
            }
            if !announcedDown {
                subscription.continuation.yield(.unsubscribed)
                announcedDown = true
            }
            if failure != nil { failures += 1 }
            let delay = Backoff.delay(
                attempt: max(failures, 1),
                base: self.configuration.reconnectBackoffBase,
                cap: self.configuration.reconnectBackoffCap,
                jitter: Double.random(in: 0...1)
            )
            if let error = failure {
                logger.log(
                    level: failures == 1 ? .warning : .debug, "Redis subscription failed",
                    metadata: [
                        "redis.error": "\(error)", "redis.subscription.failures": "\(failures)",
                        "redis.retry_in_ms":
                            "\(delay.components.seconds * 1000 + delay.components.attoseconds / 1_000_000_000_000_000)",
                    ])
            }
            do {
                try await Task.sleep(for: delay)
            } catch {
                return
            }
        }
    }

    /// Subscribes and then waits until the connection closes, checking it with `PING` now and then.
    private func subscribeAndWatch(
        _ connection: RedisConnection,
        subscription: RedisSubscription,
        logger: Logger,
        subscribed: () -> Void
    ) async throws {
        defer { connection.close() }
        // One SUBSCRIBE per channel: each gets exactly one reply, a confirmation or (refused, `NOPERM`) an
        // error, where a refused SUBSCRIBE of several channels would answer one error for all of them.
        var payload = connection.channel.allocator.buffer(capacity: 64 * subscription.channels.count)
        for channel in subscription.channels {
            RedisCommandEncoder.encode(["SUBSCRIBE", channel], into: &payload)
        }
        let confirmations = try await connection.send(
            payload,
            replyCount: subscription.channels.count,
            deadline: .now() + TimeAmount(self.configuration.commandTimeout),
            onSuccess: { replies in
                // On the event loop, before any message that follows the confirmations is pushed.
                if replies.allSatisfy(Self.isSubscribeConfirmation) {
                    subscription.continuation.yield(.subscribed)
                }
            }
        ).awaitRedisResult()
        if let rejection = confirmations.first(where: { !Self.isSubscribeConfirmation($0) }) {
            if case .error(let message) = rejection {
                throw RedisError.server(message)
            }
            throw RedisError.protocolError
        }
        subscribed()
        logger.info(
            "Redis subscription up",
            metadata: ["redis.address": "\(connection.address)", "redis.channels": "\(subscription.channels.count)"]
        )

        let commandTimeout = self.configuration.commandTimeout
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                await withTaskCancellationHandler {
                    try? await connection.closeFuture.get()
                } onCancel: {
                    connection.close()
                }
            }
            group.addTask {
                while true {
                    try await Task.sleep(for: Self.pubSubHealthCheckInterval)
                    _ = try await connection.send([["PING"]], deadline: .now() + TimeAmount(commandTimeout))
                }
            }
            // Whichever ends first (the connection closed, or a health check failed) ends both.
            defer { group.cancelAll() }
            try await group.next()
        }
    }

    private static func isSubscribeConfirmation(_ reply: RedisValue) -> Bool {
        reply.array?.first?.string == "subscribe"
    }
}

/// One `subscribe(channels:)` call: its stream and the connection currently serving it.
final class RedisSubscription: Sendable {
    let id: Int
    /// For logs (`redis.subscription`).
    let label: String
    let channels: [String]
    let continuation: AsyncStream<RedisPubSubEvent>.Continuation
    private let state = Mutex<(isTerminated: Bool, connection: RedisConnection?, overflowed: Bool)>(
        (false, nil, false))

    init(id: Int, label: String, channels: [String], continuation: AsyncStream<RedisPubSubEvent>.Continuation) {
        self.id = id
        self.label = label
        self.channels = channels
        self.continuation = continuation
    }

    var isTerminated: Bool {
        self.state.withLock { $0.isTerminated }
    }

    /// Records the serving connection; `false` if the subscription ended meanwhile.
    func attach(_ connection: RedisConnection) -> Bool {
        self.state.withLock { state in
            guard !state.isTerminated else {
                return false
            }
            state.connection = connection
            state.overflowed = false
            return true
        }
    }

    /// Hands one event to the stream. When its buffer was full (the consumer fell behind), the oldest
    /// event was dropped, and the serving connection is closed: the subscription is made again and ends
    /// with ``RedisPubSubEvent/subscribed``, as after any reconnect. `true` for the first drop on the
    /// serving connection (to be logged once).
    func deliver(_ event: RedisPubSubEvent) -> Bool {
        guard case .dropped = self.continuation.yield(event) else {
            return false
        }
        let (connection, first) = self.state.withLock { state in
            defer { state.overflowed = true }
            return (state.connection, !state.overflowed)
        }
        connection?.close()
        return first
    }

    func detach(_ connection: RedisConnection) {
        self.state.withLock { state in
            if state.connection === connection {
                state.connection = nil
            }
        }
    }

    /// Closes the serving connection (if any) unless it is to `address` (`host:port`); the subscription then
    /// reconnects and subscribes again.
    func closeConnection(unlessTo address: String) {
        guard let connection = self.state.withLock({ $0.connection }), connection.address != address else {
            return
        }
        connection.close()
    }

    /// Ends the subscription: closes its connection and finishes its stream. Idempotent.
    func terminate() {
        let connection = self.state.withLock { state -> RedisConnection? in
            state.isTerminated = true
            defer { state.connection = nil }
            return state.connection
        }
        connection?.close()
        self.continuation.finish()
    }
}
