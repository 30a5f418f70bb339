import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

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
        var merged: Logger.Metadata
        if self.metadata.isEmpty, self.metadataProvider == nil {
            // The common case (audit records, per-request lines): nothing to merge.
            merged = event.metadata ?? [:]
        } else {
            merged = self.metadata
            if let provided = self.metadataProvider?.get() { merged.merge(provided) { $1 } }
            if let extra = event.metadata { merged.merge(extra) { $1 } }
        }
        var line = Self.format(
            format: self.format, timestamp: Date(), level: event.level, label: self.label, message: "\(event.message)",
            metadata: merged)
        line.append("\n")
        self.sink.write(line)
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
            var out = ""
            out.reserveCapacity(256)
            out += "ts=\(ts) level=\(level.rawValue) logger=\(Self.logfmtValue(label)) msg=\(Self.logfmtValue(message))"
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
        // Plain ASCII without space, `=`, `"`, `\` or control characters is written as it is; the
        // byte scan is much cheaper than walking characters (audit records are written per request).
        if !s.isEmpty,
            s.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "=") && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") })
        {
            return s
        }
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
        let millis = Int(ms % 1000)
        guard millis >= 0 else { return base.dropLast() + String(format: ".%03dZ", millis) }
        let fraction = String(
            unsafeUninitializedCapacity: 5,
            initializingUTF8With: { out in
                out[0] = UInt8(ascii: ".")
                out[1] = UInt8(ascii: "0") + UInt8(millis / 100)
                out[2] = UInt8(ascii: "0") + UInt8(millis / 10 % 10)
                out[3] = UInt8(ascii: "0") + UInt8(millis % 10)
                out[4] = UInt8(ascii: "Z")
                return 5
            })
        return base.dropLast() + fraction
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
        case .standardError: self.lock.withLock { _ in Self.writeAll(line, to: STDERR_FILENO) }
        case .standardOutput: self.lock.withLock { _ in Self.writeAll(line, to: STDOUT_FILENO) }
        }
    }

    /// Writes the whole line with `write(2)` (no `Data` copy; retried on a short write or
    /// `EINTR`). A line that cannot be written is dropped: logging never stops the gateway.
    private static func writeAll(_ line: String, to descriptor: Int32) {
        var line = line
        line.withUTF8 { bytes in
            guard var next = bytes.baseAddress else { return }
            var left = bytes.count
            while left > 0 {
                #if canImport(Glibc)
                let written = Glibc.write(descriptor, next, left)
                #elseif canImport(Musl)
                let written = Musl.write(descriptor, next, left)
                #else
                let written = Darwin.write(descriptor, next, left)
                #endif
                if written < 0 {
                    if errno == EINTR { continue }
                    return
                }
                next += written
                left -= written
            }
        }
    }
}
