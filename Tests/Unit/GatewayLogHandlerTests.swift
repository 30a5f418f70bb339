import FlowEngine
import Foundation
import Logging
import Testing

@testable import TokenGateway

@Suite("Structured logs")
struct GatewayLogHandlerTests {
    let date = Date(timeIntervalSince1970: 1_763_906_400.123)

    @Test("logfmt lines carry level, logger, message and sorted dotted metadata, quoted when needed")
    func logfmt() {
        let line = GatewayLogHandler.format(
            format: .logfmt, timestamp: self.date, level: .info, label: "token-gateway", message: "token handed out",
            metadata: [
                "installation.id": "ari:cloud:ecosystem::installation/1", "caller": "billing", "note": "a \"b\" c",
            ])
        #expect(
            line
                == #"ts=2025-11-23T14:00:00.123Z level=info logger=token-gateway msg="token handed out" caller=billing installation.id=ari:cloud:ecosystem::installation/1 note="a \"b\" c""#
        )
    }

    @Test("JSON lines are one valid object per record")
    func json() throws {
        let line = GatewayLogHandler.format(
            format: .json, timestamp: self.date, level: .warning, label: "token-gateway.audit", message: "line\nbreak",
            metadata: ["trace.id": "abc"])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])
        #expect(object["level"] == "warning")
        #expect(object["logger"] == "token-gateway.audit")
        #expect(object["msg"] == "line\nbreak")
        #expect(object["trace.id"] == "abc")
        #expect(!line.contains("\n"))
    }

    @Test("a memory sink captures what a logger writes, at or above its level")
    func memorySink() {
        let sink = LogSink.memory()
        var logger = Logger(label: "t") { GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: sink) }
        logger.debug("hidden")
        logger.info("shown", metadata: ["k": "v"])
        logger[metadataKey: "request.id"] = "r1"
        logger.error("also")
        #expect(sink.captured.count == 2)
        #expect(sink.captured[0].contains("msg=shown k=v"))
        #expect(sink.captured[1].contains("request.id=r1"))
    }

    @Test("audit records carry a fingerprint, never the token")
    func audit() {
        let sink = LogSink.memory()
        let logger = Logger(label: AuditLog.label) {
            GatewayLogHandler(label: $0, format: .logfmt, level: .info, sink: sink)
        }
        let audit = AuditLog(auditLogger: logger)
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3NjM5MTAwMDB9.c2lnbmF0dXJl"
        audit.tokenHandedOut(
            caller: "billing", installation: .init("ari:cloud:ecosystem::installation/1")!, source: "cache",
            expiresAt: 1_763_910_000, token: token)
        let line = sink.captured.joined()
        #expect(line.contains("logger=token-gateway.audit"))
        #expect(line.contains("token.fingerprint=\(AuditLog.fingerprint(token))"))
        #expect(AuditLog.fingerprint(token).count == 12)
        #expect(!line.contains(token))
        #expect(!line.contains("c2lnbmF0dXJl"))
    }

    @Test("every control character, DEL, C1, U+2028/U+2029 and format character is escaped, in logfmt and JSON")
    func controlCharactersAreEscaped() throws {
        var hostile: [Unicode.Scalar] =
            (0x00...0x1F).map { Unicode.Scalar($0)! } + (0x7F...0x9F).map { Unicode.Scalar($0)! }
        hostile += [0x2028, 0x2029, 0x202E, 0x2066, 0x200B, 0xFEFF, 0xE000, 0xE0001].map { Unicode.Scalar($0)! }
        for scalar in hostile {
            let value = "a\(Character(scalar))b"
            for format in [LogFormat.logfmt, .json] {
                let line = GatewayLogHandler.format(
                    format: format, timestamp: self.date, level: .info, label: "t", message: value,
                    metadata: ["k": "\(value)"])
                #expect(
                    !line.unicodeScalars.contains {
                        $0.value < 0x20 || (0x7F...0x9F).contains($0.value) || $0 == scalar
                    },
                    "U+\(String(scalar.value, radix: 16)) in \(format)")
                if format == .json {
                    let object = try #require(
                        try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])
                    #expect(object["msg"] == value)
                    #expect(object["k"] == value)
                }
            }
        }
        // Printable text, accents and emoji stay as they are.
        #expect(GatewayLogHandler.logfmtValue("café☕") == "café☕")
        #expect(GatewayLogHandler.logfmtValue("a\tb") == #""a\tb""#)
        #expect(GatewayLogHandler.logfmtValue("a\u{1B}b") == #""a\u001bb""#)
    }
}
