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

/// Announces each change of something tests wait on to the streams made before it, so a wait
/// wakes on the change itself (``ChangeSignal/wait(within:until:)``), not on a poll.
final class ChangeSignal: Sendable {
    private let listeners = Mutex<(next: Int, streams: [Int: AsyncStream<Void>.Continuation])>((0, [:]))

    func changed() {
        for listener in self.listeners.withLock({ Array($0.streams.values) }) { listener.yield() }
    }

    /// Waits until `condition` holds: checked now and after each change; false when `timeout`
    /// passes first.
    func wait(within timeout: Duration, until condition: @escaping @Sendable () -> Bool) async -> Bool {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let key = self.listeners.withLock { l in
            defer { l.next += 1 }
            l.streams[l.next] = continuation
            return l.next
        }
        defer { self.listeners.withLock { _ = $0.streams.removeValue(forKey: key) } }
        return (try? await Events.wait(within: timeout, on: stream, until: condition)) ?? false
    }
}
