import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import TokenGateway

/// A TCP listener on a loopback port that accepts connections and never answers them until it is
/// stopped: a trigger (or any upstream) whose call can only end by the caller's own timeout.
final class HoldingServer: Sendable {
    let channel: any Channel
    private let held: Held

    final class Held: Sendable {
        let count = Atomic<Int>(0)
        let channels = Mutex<[any Channel]>([])
    }

    var port: Int { self.channel.localAddress?.port ?? 0 }
    /// `http://127.0.0.1:<port>`.
    var baseURL: String { "http://127.0.0.1:\(self.port)" }
    /// Connections accepted so far.
    var connections: Int { self.held.count.load(ordering: .relaxed) }

    private init(channel: any Channel, held: Held) {
        self.channel = channel
        self.held = held
    }

    static func start() async throws -> HoldingServer {
        let held = Held()
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { child in
                held.count.add(1, ordering: .relaxed)
                held.channels.withLock { $0.append(child) }
                return child.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return HoldingServer(channel: channel, held: held)
    }

    /// Closes every held connection (their callers see the connection end) and the listener.
    func stop() async {
        for child in self.held.channels.withLock({ $0 }) { try? await child.close() }
        try? await self.channel.close()
    }
}

/// Waits for events with a deadline (never a fixed sleep standing in for an event).
enum Events {
    /// Checks `condition` every 10 ms until it holds or `deadline` passes; returns whether it held.
    static func wait(
        within deadline: Duration = .seconds(30), _ condition: @Sendable () async throws -> Bool
    ) async throws -> Bool {
        let end = ContinuousClock.now + deadline
        while ContinuousClock.now < end {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        return try await condition()
    }
}

extension GatewayHarness {
    /// The gateway's `/metrics` text.
    func metricsText() async throws -> String {
        try await self.call(.GET, "/metrics", secret: nil).body
    }

    /// One metric sample (see ``sample(_:_:_:)``), 0 when the series has not appeared yet.
    func metric(_ name: String, _ labels: [String: String] = [:]) async throws -> Double {
        sample(try await self.metricsText(), name, labels) ?? 0
    }

    /// The allow-list this harness was configured with plus one more entry (`http://host:port`).
    static func allowing(_ base: String, in config: inout GatewayConfiguration) {
        config.triggerHosts = try! TriggerHostAllowList(parsing: config.triggerHosts.description + "," + base)
    }
}
