import FlowEngine
import HTTPTypes
import NIOCore

extension Gateway {
    /// The routes answered on the event loop by ``FastAnswerHandler`` (when their answer is at
    /// hand), and the metric labels they count under, as the router names them.
    enum FastRoute {
        static let healthLive = "/health/live"
        static let token = "/v1/installations/{id}/token"
    }

    /// Whether fast answers are used: not when requests are traced (a span per request is the
    /// router's tracing middleware's).
    var fastAnswersEnabled: Bool { !Self.tracingBootstrapped }

    /// The answer to `request` when it can be given at once, exactly as the router would give it:
    /// `GET /health/live` (when `health`), and `GET /v1/installations/{id}/token` (when `token`)
    /// from an authenticated caller for a token this process holds. Nil for everything else, which
    /// the router answers (errors included).
    func fastAnswer(_ request: FastRequest, health: Bool, token: Bool) -> FastAnswer? {
        let answer: FastAnswer
        if health, request.target == FastRoute.healthLive {
            answer = FastAnswer(fields: Self.healthFields, body: Self.healthBody, route: FastRoute.healthLive)
        } else if token, let (segment, query) = Self.tokenTarget(request.target),
            let tokenAnswer = self.fastTokenAnswer(request, segment: segment, query: query)
        {
            answer = tokenAnswer
        } else {
            return nil
        }
        self.metrics.countRequest(route: answer.route, status: 200)
        self.fastAnswerCount.add(1, ordering: .relaxed)
        return answer
    }

    private func fastTokenAnswer(_ request: FastRequest, segment: Substring, query: Substring?) -> FastAnswer? {
        guard let minValidity = Self.fastMinValidity(query),
            let caller = self.configuration.callers.authenticate(authorization: request.authorization),
            let id = InstallationID(pathSegment: String(segment)), caller.installations.contains(id.ari),
            let answer = self.flow.tokenFromMemory(for: id, minValidity: minValidity)
        else { return nil }
        let body = self.handOut(answer, caller: caller, installation: id)
        return FastAnswer(fields: Self.tokenFields, body: body, route: FastRoute.token)
    }

    /// The body of a token answer, its audit record written: the one way a token leaves through
    /// `GET …/token` (the route and the fast answer).
    func handOut(_ answer: TokenAnswer, caller: Caller, installation id: InstallationID) -> ByteBuffer {
        // The body bytes and the token's fingerprint of a repeated answer from the cache are
        // made once and reused.
        let prepared = self.answerBodies.prepared(installation: id, answer: answer)
        let source = answer.source.rawValue
        // An answer from the cache repeats its audit record's fields for each caller: formatted once.
        if answer.source == .cache,
            let fields = prepared.auditFields.fields(
                for: caller.name,
                make: {
                    self.audit.handedOutFields(
                        caller: caller.name, installation: id, source: source, expiresAt: prepared.expiresAt,
                        fingerprint: prepared.fingerprint, via: "api")
                })
        {
            self.audit.tokenHandedOut(fields)
        } else {
            self.audit.tokenHandedOut(
                caller: caller.name, installation: id, source: source, expiresAt: prepared.expiresAt,
                fingerprint: prepared.fingerprint, accountId: nil, via: "api")
        }
        return prepared.body
    }

    static let healthBody = ByteBuffer(string: JSONValue.object([("status", "ok")]).serialized())
    /// The header fields of the router's answers, as it writes them (``json(_:status:noStore:)``,
    /// ``TokenAnswerBodies/headers``).
    static let healthFields = Gateway.jsonFields.map { ($0.name.rawName, $0.value) }
    static let tokenFields = TokenAnswerBodies.headers.map { ($0.name.rawName, $0.value) }

    /// The `{id}` segment (as sent: the router's parameter is the same text, percent escapes
    /// included) and the query of `/v1/installations/{id}/token[?query]`. Read byte by byte: this
    /// runs for every request on the listener.
    static func tokenTarget(_ target: String) -> (segment: Substring, query: Substring?)? {
        let bytes = target.utf8
        let question = bytes.firstIndex(of: UInt8(ascii: "?"))
        let path = bytes[..<(question ?? bytes.endIndex)]
        let prefix = "/v1/installations/".utf8
        let suffix = "/token".utf8
        guard path.count > prefix.count + suffix.count, path.starts(with: prefix),
            path.reversed().starts(with: suffix.reversed())
        else { return nil }
        let segment = path.dropFirst(prefix.count).dropLast(suffix.count)
        guard !segment.contains(UInt8(ascii: "/")) else { return nil }
        let query = question.map { Substring(bytes[bytes.index(after: $0)...]) }
        return (Substring(segment), query)
    }

    /// `minValidity` from a query the fast answer understands: none, or only `minValidity` and
    /// `timeout`, each once, as plain digits within their ranges (the timeout does not matter to
    /// an answer from memory). Nil for any other query: the route answers it (a 400, an `asUser`).
    static func fastMinValidity(_ query: Substring?) -> Int64? {
        guard let query, !query.isEmpty else { return TokenRequestDefaults.minValidity }
        var minValidity: Int64?
        var timeout: Int64?
        for pair in query.utf8.split(separator: UInt8(ascii: "&"), omittingEmptySubsequences: false) {
            guard let equals = pair.firstIndex(of: UInt8(ascii: "=")) else { return nil }
            let digits = pair[pair.index(after: equals)...]
            guard (1...6).contains(digits.count) else { return nil }
            var value: Int64 = 0
            for byte in digits {
                guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
                value = value * 10 + Int64(byte - UInt8(ascii: "0"))
            }
            let key = pair[..<equals]
            if key.elementsEqual("minValidity".utf8), minValidity == nil,
                TokenRequestDefaults.minValidityRange.contains(value)
            {
                minValidity = value
            } else if key.elementsEqual("timeout".utf8), timeout == nil,
                TokenRequestDefaults.timeoutMillisecondsRange.contains(value)
            {
                timeout = value
            } else {
                return nil
            }
        }
        return minValidity ?? TokenRequestDefaults.minValidity
    }
}
