import FlowEngine
import HTTPTypes
import Hummingbird
import NIOCore
import Synchronization

/// The body of a token answer (contract §2, `GET …/token`), written directly as bytes, and the
/// bytes of answers from the cache kept per installation so a repeated hit reuses them.
///
/// The body is byte for byte what ``JSONValue`` writes for the same fields (``slowBody``); the
/// kept bytes are used only while the installation's token, expiry and `apiBaseUrl` are exactly
/// the ones they were written for, so a new token, a new base URL or a new source is written anew.
final class TokenAnswerBodies: Sendable {
    /// Installations whose answer bytes are kept at most; when full the kept bytes are dropped
    /// and gathered again (each costs about the token's size).
    static let defaultCapacity = 4096

    private struct Entry {
        let token: String
        let expiresAt: Int64
        let apiBaseUrl: String?
        let prepared: Prepared
    }

    /// What an answer needs besides the token: the body bytes and the audit record's fields.
    struct Prepared: Sendable {
        /// The JSON body.
        let body: ByteBuffer
        /// ``AuditLog/fingerprint(_:)`` of the token.
        let fingerprint: String
        /// The expiry as RFC 3339.
        let expiresAt: String
        /// The audit record's fields per caller, formatted once for repeated answers.
        let auditFields = AuditFieldsByCaller()

        init(installation: String, answer: TokenAnswer) {
            self.body = TokenAnswerBodies.encode(installation: installation, answer: answer)
            self.fingerprint = AuditLog.fingerprint(answer.token.value)
            self.expiresAt = RFC3339.string(unixSeconds: answer.token.expiresAt)
        }
    }

    /// The formatted fields of one kept answer's audit record, per caller name (at most
    /// ``capacity`` callers; when full they are formatted again).
    final class AuditFieldsByCaller: Sendable {
        static let capacity = 64
        private let fields = Mutex<[String: GatewayLogHandler.FormattedFields]>([:])

        /// The fields kept for `caller`, or those `make` formats (then kept); nil when `make` gives none.
        func fields(for caller: String, make: () -> GatewayLogHandler.FormattedFields?)
            -> GatewayLogHandler.FormattedFields?
        {
            if let kept = self.fields.withLock({ $0[caller] }) { return kept }
            guard let made = make() else { return nil }
            self.fields.withLock { fields in
                if fields.count >= Self.capacity { fields.removeAll() }
                fields[caller] = made
            }
            return made
        }
    }

    private let capacity: Int
    private let entries = Mutex<[String: Entry]>([:])

    init(capacity: Int = TokenAnswerBodies.defaultCapacity) {
        self.capacity = max(1, capacity)
    }

    /// Installations whose bytes are kept (for tests).
    var count: Int { self.entries.withLock { $0.count } }

    /// The answer's body and audit fields: kept ones for a repeated answer from the cache, else
    /// written now (and kept when the answer comes from the cache).
    func prepared(installation: InstallationID, answer: TokenAnswer) -> Prepared {
        guard answer.source == .cache else {
            return Prepared(installation: installation.ari, answer: answer)
        }
        let key = installation.ari
        let kept = self.entries.withLock { entries -> Prepared? in
            guard let entry = entries[key], entry.expiresAt == answer.token.expiresAt,
                entry.apiBaseUrl == answer.apiBaseUrl, entry.token == answer.token.value
            else { return nil }
            return entry.prepared
        }
        if let kept { return kept }
        let prepared = Prepared(installation: key, answer: answer)
        let entry = Entry(
            token: answer.token.value, expiresAt: answer.token.expiresAt, apiBaseUrl: answer.apiBaseUrl,
            prepared: prepared)
        self.entries.withLock { entries in
            if entries.count >= self.capacity, entries[key] == nil { entries.removeAll(keepingCapacity: true) }
            entries[key] = entry
        }
        return prepared
    }

    /// Forgets the kept bytes of an installation.
    func forget(_ installation: InstallationID) {
        _ = self.entries.withLock { $0.removeValue(forKey: installation.ari) }
    }

    /// The answer's JSON body, written field by field in the contract's order.
    static func encode(installation: String, answer: TokenAnswer) -> ByteBuffer {
        var out = ""
        out.reserveCapacity(
            answer.token.value.utf8.count + installation.utf8.count + (answer.apiBaseUrl?.utf8.count ?? 0) + 128)
        out += "{\"installationId\":"
        JSONValue.writeString(installation, into: &out)
        out += ",\"tokenType\":\"Bearer\",\"accessToken\":"
        JSONValue.writeString(answer.token.value, into: &out)
        out += ",\"expiresAt\":\""
        out += RFC3339.string(unixSeconds: answer.token.expiresAt)
        out += "\",\"apiBaseUrl\":"
        if let base = answer.apiBaseUrl { JSONValue.writeString(base, into: &out) } else { out += "null" }
        out += ",\"source\":"
        JSONValue.writeString(answer.source.rawValue, into: &out)
        out += "}"
        return ByteBuffer(string: out)
    }

    /// The same body through ``JSONValue`` (the general writer every other answer uses).
    static func slowBody(installation: String, answer: TokenAnswer) -> String {
        JSONValue.object([
            ("installationId", .string(installation)),
            ("tokenType", "Bearer"),
            ("accessToken", .string(answer.token.value)),
            ("expiresAt", .string(RFC3339.string(unixSeconds: answer.token.expiresAt))),
            ("apiBaseUrl", .optional(answer.apiBaseUrl)),
            ("source", .string(answer.source.rawValue)),
        ]).serialized()
    }

    /// The headers of every token answer.
    static let headers: HTTPFields = [.contentType: "application/json", .cacheControl: "no-store"]
}
