import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import TokenGateway

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

extension Events {
    /// Waits, without polling, until `condition` holds: checked now and after each event of
    /// `events` (a stream made before the check, so no event is missed); false when `deadline`
    /// passes first.
    static func wait(
        within deadline: Duration = .seconds(30), on events: AsyncStream<Void>,
        until condition: @escaping @Sendable () async throws -> Bool
    ) async throws -> Bool {
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                if try await condition() { return true }
                for await _ in events where try await condition() { return true }
                return try await condition()
            }
            // The deadline only: the wait itself ends on an event.
            group.addTask {
                try? await Task.sleep(for: deadline)
                return false
            }
            let first = try await group.next() ?? false
            group.cancelAll()
            return first
        }
    }
}
