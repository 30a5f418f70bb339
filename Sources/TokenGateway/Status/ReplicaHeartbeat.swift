import FlowEngine
import Logging
import ServiceLifecycle

/// Writes this replica's heartbeat (id, version, start time) to the store every `interval`, with a
/// time to live of `ttl`, so the status page lists the replicas alive now; removes it on graceful
/// shutdown. A failed write is logged and retried at the next tick.
public struct ReplicaHeartbeat: Service {
    /// Time between heartbeats. Default 5 s.
    public var interval: Duration = .seconds(5)
    /// How long a heartbeat counts without a newer one. Default 15 s.
    public var ttl: Duration = .seconds(15)
    let store: GatewayStore
    let replicaID: String
    let version: String
    let startedAt: FlowTime
    let logger: Logger
    /// Runs at every tick too (the replica's periodic gauges).
    let onTick: @Sendable () -> Void

    public init(
        store: GatewayStore, replicaID: String, version: String, startedAt: FlowTime, logger: Logger,
        onTick: @escaping @Sendable () -> Void = {}
    ) {
        self.store = store
        self.replicaID = replicaID
        self.version = version
        self.startedAt = startedAt
        self.logger = logger
        self.onTick = onTick
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            var failing = false
            while !Task.isCancelled {
                self.onTick()
                do {
                    try await self.store.writeHeartbeat(
                        ReplicaHeartbeatRecord(
                            replicaID: self.replicaID, version: self.version,
                            startedAt: self.startedAt.unixMilliseconds, lastSeenAt: FlowTime.now().unixMilliseconds),
                        ttl: self.ttl)
                    failing = false
                } catch {
                    if !failing {
                        // The error's description holds no secret (a refusal's text without arguments).
                        self.logger.notice(
                            "could not write the replica heartbeat",
                            metadata: ["replica.id": "\(self.replicaID)", "store.error": "\(error)"])
                    }
                    failing = true
                }
                do { try await Task.sleep(for: self.interval) } catch { break }
            }
        }
        do {
            // Shutdown must not wait long for a Redis that is down: the heartbeat expires anyway.
            try await self.store.removeHeartbeat(replicaID: self.replicaID, timeout: .milliseconds(500))
        } catch {
            self.logger.debug("could not remove the replica heartbeat", metadata: ["replica.id": "\(self.replicaID)"])
        }
    }
}
