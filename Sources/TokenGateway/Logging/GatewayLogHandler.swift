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
    var sink: LogSink

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

    /// Writes one record whose fields are already sorted by key, without a metadata dictionary:
    /// the line ``log(event:)`` writes for the same fields as metadata. Only for a handler with
    /// no metadata of its own (``writesSortedFieldsAsIs``).
    func log(level: Logger.Level, message: String, sortedFields fields: [(key: String, value: String)]) {
        guard level >= self.logLevel else { return }
        var line = Self.format(
            format: self.format, timestamp: Date(), level: level, label: self.label, message: message,
            sortedFields: fields)
        line.append("\n")
        self.sink.write(line)
    }

    /// Writes one record whose fields were formatted by this handler's format already
    /// (``formattedFields(format:sortedFields:)``): the line ``log(level:message:sortedFields:)``
    /// writes for the same fields.
    func log(level: Logger.Level, message: String, formattedFields fields: FormattedFields) {
        guard level >= self.logLevel else { return }
        var line = Self.format(
            format: self.format, timestamp: Date(), level: level, label: self.label, message: message, fields: fields)
        line.append("\n")
        self.sink.write(line)
    }

    /// Whether ``log(level:message:sortedFields:)`` writes what ``log(event:)`` would: nothing to
    /// merge into a record's own fields.
    var writesSortedFieldsAsIs: Bool { self.metadata.isEmpty && self.metadataProvider == nil }

    /// One formatted line (no trailing newline).
    public static func format(
        format: LogFormat, timestamp: Date, level: Logger.Level, label: String, message: String,
        metadata: Logger.Metadata
    ) -> String {
        let fields = metadata.keys.sorted().map { (key: $0, value: "\(metadata[$0]!)") }
        return Self.format(
            format: format, timestamp: timestamp, level: level, label: label, message: message, sortedFields: fields)
    }

    /// One formatted line (no trailing newline) from fields already sorted by key: the same line
    /// ``format(format:timestamp:level:label:message:metadata:)`` writes for them as metadata.
    /// Records written per request (the audit trail) come here directly, without a metadata
    /// dictionary.
    static func format(
        format: LogFormat, timestamp: Date, level: Logger.Level, label: String, message: String,
        sortedFields fields: [(key: String, value: String)]
    ) -> String {
        Self.format(
            format: format, timestamp: timestamp, level: level, label: label, message: message,
            fields: Self.formattedFields(format: format, sortedFields: fields))
    }

    /// A record's fields, formatted once (``formattedFields(format:sortedFields:)``) and written
    /// with any number of records (``log(level:message:formattedFields:)``).
    struct FormattedFields: Sendable {
        let format: LogFormat
        /// What follows the message: ` key=value…` (logfmt) or `,"key":"value"…` (JSON).
        let text: String
    }

    /// The fields part of a line, from fields sorted by key.
    static func formattedFields(format: LogFormat, sortedFields fields: [(key: String, value: String)])
        -> FormattedFields
    {
        var out = ""
        out.reserveCapacity(192)
        for field in fields {
            switch format {
            case .logfmt:
                out += " "
                out += field.key
                out += "="
                out += Self.logfmtValue(field.value)
            case .json:
                out += ","
                Self.jsonString(field.key, into: &out)
                out += ":"
                Self.jsonString(field.value, into: &out)
            }
        }
        return FormattedFields(format: format, text: out)
    }

    /// One formatted line (no trailing newline) with fields formatted already.
    static func format(
        format: LogFormat, timestamp: Date, level: Logger.Level, label: String, message: String,
        fields: FormattedFields
    ) -> String {
        let ts = Self.timestamp(timestamp)
        var out = ""
        out.reserveCapacity(64 + message.utf8.count + fields.text.utf8.count)
        switch format {
        case .logfmt:
            out += "ts="
            out += ts
            out += " level="
            out += level.rawValue
            out += " logger="
            out += Self.logfmtValue(label)
            out += " msg="
            out += Self.logfmtValue(message)
            out += fields.text
        case .json:
            out += "{\"ts\":\""
            out += ts
            out += "\",\"level\":\""
            out += level.rawValue
            out += "\",\"logger\":"
            Self.jsonString(label, into: &out)
            out += ",\"msg\":"
            Self.jsonString(message, into: &out)
            out += fields.text
            out += "}"
        }
        return out
    }

    static func logfmtValue(_ s: String) -> String {
        // Plain ASCII without space, `=`, `"`, `\` or control characters is written as it is; the
        // byte scan is much cheaper than walking characters (audit records are written per request).
        if !s.isEmpty,
            s.utf8.allSatisfy({
                $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "=") && $0 != UInt8(ascii: "\"")
                    && $0 != UInt8(ascii: "\\")
            })
        {
            return s
        }
        let needsQuotes =
            s.isEmpty
            || s.unicodeScalars.contains(where: {
                $0 == " " || $0 == "=" || $0 == "\"" || $0 == "\\" || Self.mustEscape($0)
            })
        guard needsQuotes else { return s }
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let c where Self.mustEscape(c): Self.appendUnicodeEscape(c, to: &out)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Whether a log line writes `scalar` as an escape rather than as it is: every control
    /// character (C0, DEL, C1 — `U+0085` NEL among them), the line and paragraph separators
    /// `U+2028`/`U+2029`, and the invisible format characters that reorder or hide text on a
    /// terminal or in a viewer (bidirectional overrides and isolates, zero-width characters, the
    /// byte order mark). Attacker-chosen text (an upstream error message, an event type) then
    /// cannot start a new line, move the cursor, recolour a terminal or disguise what it says.
    static func mustEscape(_ scalar: Unicode.Scalar) -> Bool {
        let v = scalar.value
        if v < 0x20 || (0x7F...0x9F).contains(v) { return true }
        if v < 0xA0 { return false }
        switch scalar.properties.generalCategory {
        case .control, .format, .lineSeparator, .paragraphSeparator, .surrogate, .privateUse, .unassigned: return true
        default: return false
        }
    }

    /// Appends `\uXXXX` (or `\u{XXXXX}` beyond the basic plane) for `scalar`.
    static func appendUnicodeEscape(_ scalar: Unicode.Scalar, to out: inout String) {
        let hex = String(scalar.value, radix: 16)
        if scalar.value > 0xFFFF {
            out += "\\u{" + hex + "}"
        } else {
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        }
    }

    /// A JSON string literal for a log line: JSON's own escapes plus a `\uXXXX` escape for every
    /// character ``mustEscape(_:)`` names (DEL, C1, `U+2028`/`U+2029`, format characters), so a
    /// JSON log line reads the same in a terminal, in `grep` and in a JavaScript-based viewer.
    static func jsonString(_ s: String, into out: inout String) {
        out += "\""
        // Printable ASCII other than `"` and `\` is appended whole (the common case, per request).
        if s.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") }) {
            out += s
            out += "\""
            return
        }
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case let c where Self.mustEscape(c):
                if c.value > 0xFFFF {
                    // JSON writes characters beyond the basic plane as a UTF-16 surrogate pair.
                    for unit in String(c).utf16 {
                        let hex = String(unit, radix: 16)
                        out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                    }
                } else {
                    Self.appendUnicodeEscape(c, to: &out)
                }
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
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
    enum Target {
        case standardError, standardOutput, memory
        /// Lines go to an ``AuditBuffer``, which a background service writes to its own sink.
        case buffered(AuditBuffer)
    }
    let target: Target
    let lines = Mutex<[String]>([])
    let lock = Mutex(())

    init(_ target: Target) { self.target = target }

    public static let standardError = LogSink(.standardError)
    public static let standardOutput = LogSink(.standardOutput)
    /// A sink that keeps every line in memory.
    public static func memory() -> LogSink { LogSink(.memory) }

    /// A sink that hands lines to `buffer` (written by ``AuditFlushService``), so a request never
    /// waits on `write(2)`.
    public static func buffered(_ buffer: AuditBuffer) -> LogSink { LogSink(.buffered(buffer)) }

    /// Whether lines go to a standard stream (a system call per write).
    var isStream: Bool {
        switch self.target {
        case .standardError, .standardOutput: return true
        case .memory, .buffered: return false
        }
    }

    /// Every line written to a memory sink.
    public var captured: [String] { self.lines.withLock { $0 } }

    func write(_ line: String) {
        switch self.target {
        case .memory: self.lines.withLock { $0.append(line) }
        case .standardError: self.lock.withLock { _ in Self.writeAll(line, to: STDERR_FILENO) }
        case .standardOutput: self.lock.withLock { _ in Self.writeAll(line, to: STDOUT_FILENO) }
        case .buffered(let buffer): buffer.append(line)
        }
    }

    /// Writes several lines at once: one `write(2)` for a stream.
    func write(batch lines: [String]) {
        guard !lines.isEmpty else { return }
        switch self.target {
        case .memory: self.lines.withLock { $0.append(contentsOf: lines) }
        case .standardError, .standardOutput:
            var joined = ""
            joined.reserveCapacity(lines.reduce(0) { $0 + $1.utf8.count })
            for line in lines { joined += line }
            self.write(joined)
        case .buffered(let buffer): for line in lines { buffer.append(line) }
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
