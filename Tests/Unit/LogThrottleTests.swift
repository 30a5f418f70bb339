import Logging
import Synchronization
import Testing

@testable import TokenGateway

@Suite("Log lines of refused requests: a few per message and window")
struct LogThrottleTests {
    /// Keeps every line logged through it.
    final class Lines: LogHandler, @unchecked Sendable {
        let lines = Mutex<[(message: String, metadata: Logger.Metadata)]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            self.lines.withLock { $0.append((event.message.description, event.metadata ?? [:])) }
        }
    }

    @Test("past the window's lines a message is held back; the next window's first line says how many")
    func heldBackAndReported() {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in lines }
        let throttle = LogThrottle(linesPerWindow: 3, window: .seconds(10))
        let start = ContinuousClock.now
        for n in 0..<10 { throttle.log(logger, .notice, "refused", metadata: ["n": "\(n)"], now: start) }
        // Another message has lines of its own.
        throttle.log(logger, .notice, "other", now: start)
        #expect(lines.lines.withLock { $0.map(\.message) } == ["refused", "refused", "refused", "other"])
        throttle.log(logger, .notice, "refused", now: start + .seconds(10))
        let last = lines.lines.withLock { $0.last }
        #expect(last?.message == "refused")
        #expect(last?.metadata["log.suppressed"] == "7")
        throttle.log(logger, .notice, "refused", now: start + .seconds(11))
        #expect(lines.lines.withLock { $0.last?.metadata["log.suppressed"] } == nil)
    }

    @Test("a level the logger does not log costs nothing and counts nothing")
    func belowTheLevel() {
        let lines = Lines()
        let logger = Logger(label: "test") { _ in lines }
        let throttle = LogThrottle(linesPerWindow: 1)
        for _ in 0..<5 { throttle.log(logger, .debug, "refused") }
        throttle.log(logger, .notice, "refused")
        #expect(lines.lines.withLock { $0.count } == 1)
        #expect(lines.lines.withLock { $0.first?.metadata["log.suppressed"] } == nil)
    }
}
