import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A real `token-gateway serve` process (the binary the test command builds), for tests that
/// need several replicas, signals or process exits.
final class GatewayProcess: Sendable {
    struct StartError: Error, CustomStringConvertible {
        let description: String
    }

    let process: Process
    let port: Int
    private let output: LineBox
    private let exit: ExitSignal

    var url: String { "http://127.0.0.1:\(self.port)" }

    /// Every line the process wrote to stderr so far.
    var lines: [String] { self.output.lines.withLock { $0 } }

    final class LineBox: Sendable {
        let lines = Mutex<[String]>([])
        let signal = ChangeSignal()
    }

    /// Waits until a line the process wrote satisfies `condition`, for at most `timeout`.
    func waitForLine(
        within timeout: Duration = .seconds(30), where condition: @escaping @Sendable (String) -> Bool
    ) async -> Bool {
        await self.output.signal.wait(within: timeout) { self.lines.contains(where: condition) }
    }

    /// The process's exit as an event (its termination handler fires it), for any number of waiters.
    final class ExitSignal: Sendable {
        private let state = Mutex<(exited: Bool, waiting: [AsyncStream<Void>.Continuation])>((false, []))

        func fire() {
            let waiting = self.state.withLock { state in
                state.exited = true
                defer { state.waiting = [] }
                return state.waiting
            }
            for continuation in waiting { continuation.finish() }
        }

        /// Returns once the process exited, or when the task is cancelled.
        func wait() async {
            let (stream, continuation) = AsyncStream<Void>.makeStream()
            let exited = self.state.withLock { state in
                if !state.exited { state.waiting.append(continuation) }
                return state.exited
            }
            if exited { return }
            for await _ in stream {}
        }

        /// Whether the process exited within `timeout`.
        func wait(within timeout: Duration) async -> Bool {
            await withTaskGroup(of: Bool.self) { group in
                group.addTask {
                    await self.wait()
                    return !Task.isCancelled
                }
                group.addTask {
                    try? await Task.sleep(for: timeout)
                    return false
                }
                let first = await group.next() ?? false
                group.cancelAll()
                return first
            }
        }
    }

    /// The gateway binary: `TOKEN_GATEWAY_TEST_BINARY`, else `.build/debug/token-gateway` of this checkout.
    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["TOKEN_GATEWAY_TEST_BINARY"], !path.isEmpty { return path }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/token-gateway").path
    }

    private init(process: Process, port: Int, output: LineBox, exit: ExitSignal) {
        self.process = process
        self.port = port
        self.output = output
        self.exit = exit
    }

    deinit {
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
    }

    /// The start of the warning a replica logs when it listens but the store does not answer.
    static let notReadyMessage = "msg=\"listening but not ready"

    /// Starts `token-gateway serve` (plus `arguments`) on an ephemeral port with `settings` as its
    /// environment and returns once it logged that it is ready, or that it listens but the store
    /// does not answer (deadline 30 s).
    static func start(settings: [String: String], arguments: [String] = []) async throws -> GatewayProcess {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = ["serve"] + arguments
        var environment = ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
        for (k, v) in settings { environment[k] = v }
        environment["TOKEN_GATEWAY_PORT"] = "0"
        process.environment = environment
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = FileHandle.nullDevice
        let (lines, continuation) = AsyncStream<String>.makeStream(bufferingPolicy: .bufferingNewest(256))
        let collected = LineBox()
        // Read stderr on a dedicated thread with blocking reads until EOF (FileHandle's
        // readabilityHandler can crash libdispatch's event loop on Linux).
        let handle = pipe.fileHandleForReading
        let reader = Thread {
            var buffer = Data()
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                buffer.append(data)
                while let nl = buffer.firstIndex(of: 0x0A) {
                    let line = String(decoding: buffer[buffer.startIndex..<nl], as: UTF8.self)
                    buffer.removeSubrange(buffer.startIndex...nl)
                    collected.lines.withLock { $0.append(line) }
                    collected.signal.changed()
                    continuation.yield(line)
                }
            }
            continuation.finish()
        }
        reader.start()
        let exit = ExitSignal()
        process.terminationHandler = { _ in exit.fire() }
        try process.run()
        let port = try await withThrowingTaskGroup(of: Int?.self) { group in
            group.addTask {
                // `ready`, or the warning that it listens while the store does not answer.
                for await line in lines where line.contains("msg=ready") || line.contains(Self.notReadyMessage) {
                    if let range = line.range(of: "listen.port=") {
                        return Int(line[range.upperBound...].prefix { $0.isNumber })
                    }
                }
                return nil
            }
            group.addTask {
                try await Task.sleep(for: .seconds(30))
                return nil
            }
            let first = try await group.next() ?? nil
            group.cancelAll()
            return first
        }
        guard let port else {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            let log = collected.lines.withLock { $0.suffix(20).joined(separator: "\n") }
            throw StartError(description: "token-gateway did not become ready:\n\(log)")
        }
        return GatewayProcess(process: process, port: port, output: collected, exit: exit)
    }

    /// Sends a signal.
    func signal(_ signal: Int32) {
        kill(self.process.processIdentifier, signal)
    }

    /// Waits for the process to exit (deadline `timeout`, then SIGKILL) and returns its exit status.
    func waitForExit(timeout: Duration = .seconds(30)) async -> Int32 {
        if await !self.exit.wait(within: timeout) {
            kill(self.process.processIdentifier, SIGKILL)
            await self.exit.wait()
        }
        return self.process.terminationStatus
    }

    /// Stops the process with SIGTERM and waits for it.
    func stop() async {
        guard self.process.isRunning else { return }
        self.signal(SIGTERM)
        _ = await self.waitForExit()
    }
}
