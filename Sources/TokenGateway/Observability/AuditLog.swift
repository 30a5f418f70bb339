import Crypto
import FlowEngine
import Logging

/// One structured record for every token handed to a caller and every token received, on its
/// own logger label (`token-gateway.audit`) so it can be shipped separately.
///
/// Records carry a short fingerprint of the token (the first 12 hex digits of its SHA-256),
/// never the token.
public struct AuditLog: Sendable {
    /// The logger label audit records are written under.
    public static let label = "token-gateway.audit"
    let logger: Logger
    /// The logger's handler when it is the gateway's own with nothing to merge: records handed
    /// out per request are then formatted from their fields directly (the same line, without a
    /// metadata dictionary).
    let direct: GatewayLogHandler?

    /// - Parameter logger: the gateway's logger; records go to a logger of the same handler
    ///   under ``label``.
    public init(logger: Logger) {
        var audit = logger
        audit[metadataKey: "audit"] = "true"
        self.init(auditLogger: audit)
    }

    public init(auditLogger: Logger) {
        self.logger = auditLogger
        if let handler = auditLogger.handler as? GatewayLogHandler, handler.writesSortedFieldsAsIs {
            self.direct = handler
        } else {
            self.direct = nil
        }
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    /// A short, non-reversible fingerprint of a token.
    public static func fingerprint(_ token: String) -> String {
        let digest = SHA256.hash(data: Array(token.utf8))
        // Lowercase hex of the first 6 bytes, written directly (this runs for every token handed out).
        return String(unsafeUninitializedCapacity: 12) { out in
            for (i, byte) in digest.prefix(6).enumerated() {
                out[2 * i] = Self.hexDigits[Int(byte >> 4)]
                out[2 * i + 1] = Self.hexDigits[Int(byte & 0x0F)]
            }
            return 12
        }
    }

    /// A token was handed to a caller.
    public func tokenHandedOut(
        caller: String, installation: InstallationID, source: String, expiresAt: Int64, token: String,
        accountId: String? = nil, via: String = "api"
    ) {
        self.tokenHandedOut(
            caller: caller, installation: installation, source: source,
            expiresAt: RFC3339.string(unixSeconds: expiresAt), fingerprint: Self.fingerprint(token),
            accountId: accountId, via: via)
    }

    /// A token was handed to a caller, with its expiry (RFC 3339) and ``fingerprint(_:)`` made
    /// already.
    func tokenHandedOut(
        caller: String, installation: InstallationID, source: String, expiresAt: String, fingerprint: String,
        accountId: String?, via: String
    ) {
        if let direct = self.direct {
            direct.log(
                level: .info, message: Self.handedOutMessage,
                sortedFields: Self.handedOutFields(
                    caller: caller, installation: installation, source: source, expiresAt: expiresAt,
                    fingerprint: fingerprint, accountId: accountId, via: via))
            return
        }
        var metadata: Logger.Metadata = [
            "audit.event": "token_handed_out", "caller": "\(caller)", "installation.id": "\(installation)",
            "token.source": "\(source)", "token.expires_at": "\(expiresAt)",
            "token.fingerprint": "\(fingerprint)", "audit.via": "\(via)",
        ]
        if let accountId { metadata["account.id"] = "\(accountId)" }
        self.logger.info("\(Self.handedOutMessage)", metadata: metadata)
    }

    static let handedOutMessage = "token handed out"

    /// The fields of a "token handed out" record, sorted by key as the handler writes metadata.
    static func handedOutFields(
        caller: String, installation: InstallationID, source: String, expiresAt: String, fingerprint: String,
        accountId: String?, via: String
    ) -> [(key: String, value: String)] {
        var fields: [(key: String, value: String)] = []
        fields.reserveCapacity(8)
        if let accountId { fields.append((key: "account.id", value: accountId)) }
        fields.append((key: "audit.event", value: "token_handed_out"))
        fields.append((key: "audit.via", value: via))
        fields.append((key: "caller", value: caller))
        fields.append((key: "installation.id", value: installation.ari))
        fields.append((key: "token.expires_at", value: expiresAt))
        fields.append((key: "token.fingerprint", value: fingerprint))
        fields.append((key: "token.source", value: source))
        return fields
    }

    /// The fields of a "token handed out" record formatted once, for a record repeated for every
    /// answer from the cache (``tokenHandedOut(_:)``); nil when records go through the logger's
    /// metadata (a handler other than the gateway's own).
    func handedOutFields(
        caller: String, installation: InstallationID, source: String, expiresAt: String, fingerprint: String,
        via: String
    ) -> GatewayLogHandler.FormattedFields? {
        guard let direct = self.direct else { return nil }
        return GatewayLogHandler.formattedFields(
            format: direct.format,
            sortedFields: Self.handedOutFields(
                caller: caller, installation: installation, source: source, expiresAt: expiresAt,
                fingerprint: fingerprint, accountId: nil, via: via))
    }

    /// A token was handed to a caller: the record whose fields ``handedOutFields(caller:installation:source:expiresAt:fingerprint:via:)``
    /// formatted. The same line as ``tokenHandedOut(caller:installation:source:expiresAt:token:accountId:via:)``.
    func tokenHandedOut(_ fields: GatewayLogHandler.FormattedFields) {
        self.direct?.log(level: .info, message: Self.handedOutMessage, formattedFields: fields)
    }

    /// A token was received from Forge (or exchanged for a user).
    public func tokenReceived(
        installation: InstallationID, kind: String, expiresAt: Int64, token: String, stored: Bool,
        requestID: String?, accountId: String? = nil, trace: ForgeTrace? = nil
    ) {
        var metadata: Logger.Metadata = [
            "audit.event": "token_received", "installation.id": "\(installation)", "token.kind": "\(kind)",
            "token.expires_at": "\(RFC3339.string(unixSeconds: expiresAt))",
            "token.fingerprint": "\(Self.fingerprint(token))", "token.stored": "\(stored)",
            "request.id": "\(requestID ?? "-")",
        ]
        if let accountId { metadata["account.id"] = "\(accountId)" }
        if let trace { metadata.merge(trace.metadata) { $1 } }
        self.logger.info("token received", metadata: metadata)
    }
}

/// The trace ids Forge sends with every remote invocation (`x-b3-traceid`, `x-b3-spanid`), carried
/// into the log records of the round trip.
public struct ForgeTrace: Sendable, Hashable {
    public var traceID: String?
    public var spanID: String?

    public init(traceID: String?, spanID: String?) {
        // Bounded and restricted to hex, so a header cannot inject into a log line.
        func clean(_ s: String?) -> String? {
            guard let s, !s.isEmpty, s.count <= 64, s.allSatisfy(\.isHexDigit) else { return nil }
            return s
        }
        self.traceID = clean(traceID)
        self.spanID = clean(spanID)
    }

    public var metadata: Logger.Metadata {
        var m: Logger.Metadata = [:]
        if let traceID { m["trace.id"] = "\(traceID)" }
        if let spanID { m["span.id"] = "\(spanID)" }
        return m
    }
}
