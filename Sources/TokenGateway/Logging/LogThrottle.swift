import Logging
import Synchronization

/// Keeps the log lines of refused requests (which anyone can cause, as fast as they can send
/// them) to a few per message and window: a flood of bad tokens costs a bounded number of
/// synchronous log writes. The next line let through after a window with lines held back says
/// how many (`log.suppressed`); the metrics count every refusal anyway.
final class LogThrottle: Sendable {
    private struct Window {
        var start: ContinuousClock.Instant
        var written = 0
        var suppressed = 0
    }

    private let windows = Mutex<[String: Window]>([:])
    /// Lines per message and window.
    let linesPerWindow: Int
    let window: Duration

    init(linesPerWindow: Int = 20, window: Duration = .seconds(10)) {
        self.linesPerWindow = linesPerWindow
        self.window = window
    }

    /// Logs `message` at `level` through `logger` unless this window's lines for it are spent;
    /// then counts it as held back.
    func log(
        _ logger: Logger, _ level: Logger.Level, _ message: Logger.Message, metadata: Logger.Metadata = [:],
        now: ContinuousClock.Instant = .now
    ) {
        guard logger.logLevel <= level else { return }
        let key = message.description
        let suppressed = self.windows.withLock { windows -> Int? in
            var window = windows[key] ?? Window(start: now)
            if now - window.start >= self.window {
                // A new window: the lines held back in the last one are reported with this one.
                window = Window(start: now, suppressed: window.suppressed)
            }
            guard window.written < self.linesPerWindow else {
                window.suppressed += 1
                windows[key] = window
                return nil
            }
            window.written += 1
            let held = window.suppressed
            window.suppressed = 0
            windows[key] = window
            return held
        }
        guard let suppressed else { return }
        var metadata = metadata
        if suppressed > 0 { metadata["log.suppressed"] = "\(suppressed)" }
        logger.log(level: level, message, metadata: metadata)
    }
}
