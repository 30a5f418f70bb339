import Foundation
import Logging
import Synchronization

/// Writes one structured line per log record, as logfmt (default) or JSON.
///
/// `ts=2026-11-23T14:00:00.123Z level=info logger=token-gateway msg="token handed out" installation.id=…`
///
/// Keys are the logger label, the level, the message and the metadata (dotted keys). The
/// handler adds nothing of its own beyond that; callers never put secrets into metadata.
public struct GatewayLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level
    public var metadataProvider: Logger.MetadataProvider?
    var label: String
    let format: LogFormat
    let sink: LogSink

    public init(label: String, format: LogFormat, level: Logger.Level, sink: LogSink = .standardError) {
        self.label = label
        self.format = format
        self.logLevel = level
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = self.metadata
        if let provided = self.metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let line = Self.format(
            format: self.format, timestamp: Date(), level: event.level, label: self.label, message: "\(event.message)",
            metadata: merged)
        self.sink.write(line + "\n")
    }

    /// One formatted line (no trailing newline).
    public static func format(
        format: LogFormat, timestamp: Date, level: Logger.Level, label: String, message: String,
        metadata: Logger.Metadata
    ) -> String {
        let ts = Self.timestamp(timestamp)
        let keys = metadata.keys.sorted()
        switch format {
        case .logfmt:
            var out = "ts=\(ts) level=\(level.rawValue) logger=\(Self.logfmtValue(label)) msg=\(Self.logfmtValue(message))"
            for k in keys { out += " \(k)=\(Self.logfmtValue("\(metadata[k]!)"))" }
            return out
        case .json:
            var fields: [(String, JSONValue)] = [
                ("ts", .string(ts)), ("level", .string(level.rawValue)), ("logger", .string(label)),
                ("msg", .string(message)),
            ]
            for k in keys { fields.append((k, .string("\(metadata[k]!)"))) }
            return JSONValue.object(fields).serialized()
        }
    }

    static func logfmtValue(_ s: String) -> String {
        let needsQuotes = s.isEmpty || s.contains(where: { $0 == " " || $0 == "=" || $0 == "\"" || $0 == "\\" || $0.isNewline })
        guard needsQuotes else { return s }
        var out = "\""
        for c in s {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            default: out.append(c)
            }
        }
        return out + "\""
    }

    static func timestamp(_ date: Date) -> String {
        let ms = Int64((date.timeIntervalSince1970 * 1000).rounded(.down))
        let base = RFC3339.string(unixSeconds: ms / 1000)
        return base.dropLast() + String(format: ".%03dZ", Int(ms % 1000))
    }
}

/// Where log lines go: a standard stream, or memory (for tests that inspect what was logged).
public final class LogSink: Sendable {
    enum Target { case standardError, standardOutput, memory }
    let target: Target
    let lines = Mutex<[String]>([])
    let lock = Mutex(())

    init(_ target: Target) { self.target = target }

    public static let standardError = LogSink(.standardError)
    public static let standardOutput = LogSink(.standardOutput)
    /// A sink that keeps every line in memory.
    public static func memory() -> LogSink { LogSink(.memory) }

    /// Every line written to a memory sink.
    public var captured: [String] { self.lines.withLock { $0 } }

    func write(_ line: String) {
        switch self.target {
        case .memory: self.lines.withLock { $0.append(line) }
        case .standardError: self.lock.withLock { _ in FileHandle.standardError.write(Data(line.utf8)) }
        case .standardOutput: self.lock.withLock { _ in FileHandle.standardOutput.write(Data(line.utf8)) }
        }
    }
}
