import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Synchronization
import Testing

@testable import TokenGateway

/// What `oauth_client.py` (authlib's stock `OAuth2Session`) reported.
struct StockClientAnswer: Sendable, CustomStringConvertible {
    let status: Int?
    let headers: [String: String]
    let tokenJSON: String?
    let error: String?
    let errorDescription: String?
    let metadataJSON: String?
    let library: String

    var token: [String: Any] { Self.object(self.tokenJSON) }
    var metadata: [String: Any] { Self.object(self.metadataJSON) }
    var accessToken: String? { self.token["access_token"] as? String }

    private static func object(_ json: String?) -> [String: Any] {
        guard let json else { return [:] }
        return ((try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any]) ?? [:]
    }

    var description: String {
        let status = self.status.map(String.init) ?? "-"
        return "StockClientAnswer(status: \(status), error: \(self.error ?? "-"): \(self.errorDescription ?? "-"))"
    }
}

/// Everything a child process writes to one pipe, read on a dedicated thread with blocking reads
/// until end of file (FileHandle's readabilityHandler can crash libdispatch on Linux).
final class PipeCollector: Sendable {
    private let buffer = Mutex<Data>(Data())
    private let eof = AsyncStream<Void>.makeStream()

    init(_ pipe: Pipe) {
        let handle = pipe.fileHandleForReading
        Thread { [self] in
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                self.buffer.withLock { $0.append(chunk) }
            }
            self.eof.continuation.finish()
        }.start()
    }

    /// Returns once the writer closed the pipe.
    func finished() async {
        for await _ in self.eof.stream {}
    }

    var data: Data { self.buffer.withLock { $0 } }
}

/// Runs the stock OAuth client as a child process, bounded by a deadline.
enum StockOAuthClient {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("oauth_client.py").path

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// - Parameters:
    ///   - mode: `client_credentials`, `token_exchange`, `grant` or `discovery`.
    ///   - secret: passed in the environment (`OAUTH_CLIENT_SECRET`), never on the command line.
    ///   - subjectToken: the Connect JWT for token exchange (`OAUTH_SUBJECT_TOKEN`).
    static func run(
        gateway: String, mode: String, clientID: String, secret: String, auth: String = "basic",
        resource: String? = nil, grantType: String? = nil, subjectToken: String? = nil,
        connectMethod: String? = nil, connectURL: String? = nil, deadline: Duration = .seconds(60)
    ) async throws -> StockClientAnswer {
        var arguments = [Self.script, "--gateway", gateway, "--mode", mode, "--client-id", clientID, "--auth", auth]
        if let resource { arguments += ["--resource", resource] }
        if let grantType { arguments += ["--grant-type", grantType] }
        if let connectMethod { arguments += ["--connect-method", connectMethod] }
        if let connectURL { arguments += ["--connect-url", connectURL] }
        var environment = ProcessInfo.processInfo.environment
        environment["OAUTH_CLIENT_SECRET"] = secret
        if let subjectToken { environment["OAUTH_SUBJECT_TOKEN"] = subjectToken }
        environment["PYTHONDONTWRITEBYTECODE"] = "1"
        for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
            environment.removeValue(forKey: proxy)
        }

        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3"] + arguments
        process.environment = environment
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        process.standardInput = FileHandle.nullDevice

        let exited = AsyncStream<Int32>.makeStream()
        process.terminationHandler = { finished in
            exited.continuation.yield(finished.terminationStatus)
            exited.continuation.finish()
        }
        // Collect both pipes as data arrives (no blocking read on a cooperative thread), so a large
        // output cannot block the child either.
        let stdout = PipeCollector(output)
        let stderr = PipeCollector(errors)
        try process.run()
        let pid = process.processIdentifier
        let status: Int32? = try await withThrowingTaskGroup(of: Int32?.self) { group in
            group.addTask {
                await stdout.finished()
                await stderr.finished()
                for await status in exited.stream { return status }
                return nil
            }
            group.addTask {
                try await Task.sleep(for: deadline)
                return nil
            }
            let first = try await group.next() ?? nil
            group.cancelAll()
            return first
        }
        guard let status else {
            kill(pid, SIGKILL)
            throw Failure(description: "oauth_client.py did not finish within \(deadline)")
        }
        let out = stdout.data
        let err = String(decoding: stderr.data, as: UTF8.self)
        guard status == 0 else {
            throw Failure(description: "oauth_client.py exited \(status): \(err.suffix(2000))")
        }
        guard let line = String(decoding: out, as: UTF8.self).split(separator: "\n").last,
            let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
        else {
            throw Failure(description: "oauth_client.py printed no JSON object: \(err.suffix(2000))")
        }
        func json(_ key: String) -> String? {
            guard let value = object[key], !(value is NSNull),
                let data = try? JSONSerialization.data(withJSONObject: value)
            else { return nil }
            return String(decoding: data, as: UTF8.self)
        }
        return StockClientAnswer(
            status: object["status"] as? Int, headers: object["headers"] as? [String: String] ?? [:],
            tokenJSON: json("token"), error: object["error"] as? String,
            errorDescription: object["error_description"] as? String, metadataJSON: json("metadata"),
            library: object["library"] as? String ?? "")
    }
}

extension GatewayHarness {
    /// The stock client against this gateway.
    func stockClient(
        _ mode: String = "client_credentials", clientID: String = "full", secret: String = GatewayHarness.callerSecret,
        auth: String = "basic", resource: String? = nil, grantType: String? = nil, subjectToken: String? = nil,
        connectMethod: String? = nil, connectURL: String? = nil
    ) async throws -> StockClientAnswer {
        try await StockOAuthClient.run(
            gateway: self.gatewayURL, mode: mode, clientID: clientID, secret: secret, auth: auth, resource: resource,
            grantType: grantType, subjectToken: subjectToken, connectMethod: connectMethod, connectURL: connectURL)
    }

    /// The installation's token as `GET /v1/installations/{id}/token` answers it (from the cache
    /// once a token was fetched), to compare the OAuth answers with.
    func apiToken(_ installation: EmulatedInstallation) async throws -> String? {
        try await self.token(installation).json["accessToken"] as? String
    }

    /// A hand-built `POST /oauth/token` with `body` as it is.
    func oauthPost(
        _ body: String, contentType: String? = "application/x-www-form-urlencoded",
        headers: [String: String] = [:]
    ) async throws -> Answer {
        var all = headers
        if let contentType { all["content-type"] = contentType }
        return try await self.call(.POST, "/oauth/token", secret: nil, headers: all, body: body)
    }

    /// `Authorization: Basic` for `id` and `secret` as given (encode them first for RFC 6749 §2.3.1).
    static func basic(_ id: String, _ secret: String) -> String {
        "Basic " + Data("\(id):\(secret)".utf8).base64EncodedString()
    }
}

/// Form-encodes a value the way RFC 6749 Appendix B says (space as `+`).
func formEncoded(_ value: String) -> String {
    var allowed = CharacterSet.alphanumerics
    allowed.insert(charactersIn: "-._~")
    return value.addingPercentEncoding(withAllowedCharacters: allowed)!.replacingOccurrences(of: "%20", with: "+")
}

extension GatewayHarness.Answer {
    var oauthError: String? { self.json["error"] as? String }
    var oauthDescription: String? { self.json["error_description"] as? String }
}

/// Every RFC 6749 error answer carries these.
func expectOAuthErrorHeaders(_ headers: [String: String], sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(headers["cache-control"] == "no-store", sourceLocation: sourceLocation)
    #expect(headers["content-type"]?.hasPrefix("application/json") == true, sourceLocation: sourceLocation)
}

let tokenExchangeGrant = "urn:ietf:params:oauth:grant-type:token-exchange"

@Suite("OAuth 2.0 token endpoint, driven by a stock client (authlib)")
struct OAuthIntegrationTests {
    @Test("client credentials: the stock client gets the installation's token with Basic and form credentials")
    func clientCredentials() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let basic = try await h.stockClient(auth: "basic", resource: installation.id)
            #expect(basic.status == 200, "\(basic)")
            #expect(basic.library.hasPrefix("authlib "))
            let token = try #require(basic.accessToken)
            let viaAPI = try await h.apiToken(installation)
            #expect(token == viaAPI)
            #expect((basic.token["token_type"] as? String)?.lowercased() == "bearer")
            let expiresIn = try #require(basic.token["expires_in"] as? Int)
            #expect(expiresIn > 300 && expiresIn <= 7200)
            // The installation's apiBaseUrl comes along (an extra member the library keeps).
            #expect(basic.token["apiBaseUrl"] as? String == installation.apiBaseUrl)
            #expect(basic.headers["cache-control"] == "no-store")
            #expect(basic.headers["content-type"]?.hasPrefix("application/json") == true)
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // client_secret_post, and the bare installation id as resource: the same token, from the cache.
            let post = try await h.stockClient(
                auth: "post", resource: String(installation.installationID.shortID))
            #expect(post.status == 200, "\(post)")
            #expect(post.accessToken == token)
            #expect(h.emulator.triggerCalls(for: installation) == 1)

            // The audit log records both hand-outs with the fingerprint, never the token.
            let audit = h.allLogs.split(separator: "\n").filter {
                $0.contains("token_handed_out") && $0.contains("audit.via=oauth")
            }
            #expect(audit.count == 2)
            #expect(audit.allSatisfy { $0.contains(AuditLog.fingerprint(token)) && $0.contains("caller=full") })
            #expect(!h.allLogs.contains(token))
            #expect(!h.allLogs.contains(GatewayHarness.callerSecret))
        }
    }

    @Test("each error reaches the stock client as an RFC 6749 §5.2 answer")
    func stockClientErrors() async throws {
        try await GatewayHarness.run { h in
            let installation = try await h.installed()
            let gone = try await h.installed()
            try await h.emulator.uninstall(gone)

            for auth in ["basic", "post"] {
                let wrongSecret = try await h.stockClient(
                    secret: "not-the-secret", auth: auth, resource: installation.id)
                let unknownClient = try await h.stockClient(clientID: "nobody", auth: auth, resource: installation.id)
                for answer in [wrongSecret, unknownClient] {
                    #expect(answer.status == 401, "\(answer)")
                    #expect(answer.error == "invalid_client")
                    #expect(answer.headers["www-authenticate"] == "Basic realm=\"token-gateway\"")
                    expectOAuthErrorHeaders(answer.headers)
                }
                #expect(wrongSecret.errorDescription == unknownClient.errorDescription)
            }

            let noResource = try await h.stockClient()
            #expect(noResource.status == 400)
            #expect(noResource.error == "invalid_request")
            #expect(noResource.errorDescription?.contains("resource") == true)
            expectOAuthErrorHeaders(noResource.headers)

            let password = try await h.stockClient("grant", resource: installation.id, grantType: "password")
            #expect(password.status == 400)
            #expect(password.error == "unsupported_grant_type")
            expectOAuthErrorHeaders(password.headers)

            // Unknown, uninstalled and outside the caller's scope: one answer.
            let unknown = try await h.stockClient(resource: h.emulator.makeInstallation().id)
            let uninstalled = try await h.stockClient(resource: gone.id)
            let outside = try await h.stockClient(
                clientID: "scoped", secret: GatewayHarness.scopedSecret, resource: installation.id)
            let malformed = try await h.stockClient(resource: "https://example.test/not-an-installation")
            for answer in [unknown, uninstalled, outside, malformed] {
                #expect(answer.status == 400, "\(answer)")
                #expect(answer.error == "invalid_target")
                #expect(answer.errorDescription == unknown.errorDescription)
                expectOAuthErrorHeaders(answer.headers)
            }
            #expect(h.emulator.triggerCalls(for: installation) == 0)
        }
    }

    @Test("upstream trouble is 503 temporarily_unavailable with Retry-After")
    func upstreamTrouble() async throws {
        try await GatewayHarness.run(configure: { $0.flow.maxAttempts = 1 }) { h in
            let failing = try await h.installed()
            h.emulator.setFault(.failWith(status: 500, times: 100), for: failing)
            let answer = try await h.stockClient(auth: "post", resource: failing.id)
            #expect(answer.status == 503, "\(answer)")
            #expect(answer.error == "temporarily_unavailable")
            #expect(Int(answer.headers["retry-after"] ?? "") ?? 0 >= 1)
            expectOAuthErrorHeaders(answer.headers)

            // no_trigger_url: installed, never registered an auth trigger.
            let unregistered = h.emulator.makeInstallation()
            try #require(try await h.emulator.sendLifecycleEvent(.installed, for: unregistered).isSuccess)
            let noTrigger = try await h.oauthPost(
                "grant_type=client_credentials&resource=\(formEncoded(unregistered.id))",
                headers: ["authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret)])
            #expect(noTrigger.status == 503)
            #expect(noTrigger.oauthError == "temporarily_unavailable")
            #expect(noTrigger.headers["retry-after"] == "30")
            expectOAuthErrorHeaders(noTrigger.headers)
        }
    }

    @Test("token exchange: a Connect JWT becomes the linked installation's access token; refusals per RFC 8693")
    func tokenExchange() async throws {
        try await GatewayHarness.runConnect { h in
            let (installation, tenant, url, jwt) = try await Self.linkedTenant(h)

            let exchanged = try await h.stockClient(
                "token_exchange", auth: "post", subjectToken: jwt, connectMethod: "POST", connectURL: url)
            #expect(exchanged.status == 200, "\(exchanged)")
            let viaAPI = try await h.apiToken(installation)
            #expect(exchanged.accessToken == viaAPI)
            #expect(exchanged.token["issued_token_type"] as? String == "urn:ietf:params:oauth:token-type:access_token")
            #expect(exchanged.token["apiBaseUrl"] as? String == installation.apiBaseUrl)
            #expect((exchanged.token["token_type"] as? String)?.lowercased() == "bearer")
            #expect((exchanged.token["expires_in"] as? Int ?? 0) > 300)
            #expect(exchanged.headers["cache-control"] == "no-store")

            // The same with HTTP Basic and a resource that names the linked installation.
            let basic = try await h.stockClient(
                "token_exchange", resource: installation.id, subjectToken: jwt, connectMethod: "POST", connectURL: url)
            #expect(basic.status == 200, "\(basic)")
            #expect(basic.accessToken == exchanged.accessToken)
            #expect(h.emulator.triggerCalls(for: installation) == 1)
            #expect(h.allLogs.contains("audit.via=oauth"))
            #expect(!h.allLogs.contains(jwt))

            // A subject token that fails verification: invalid_request naming the check.
            var wrongSecret = ConnectJWTOptions()
            wrongSecret.secret = "not-the-shared-secret"
            let forged = try await h.stockClient(
                "token_exchange",
                subjectToken: h.emulator.mintConnectJWT(for: tenant, method: "POST", url: url, options: wrongSecret),
                connectMethod: "POST", connectURL: url)
            #expect(forged.status == 400)
            #expect(forged.error == "invalid_request")
            #expect(forged.errorDescription?.contains("signature") == true)
            let qsh = try await h.stockClient(
                "token_exchange", subjectToken: jwt, connectMethod: "GET", connectURL: url)
            #expect(qsh.error == "invalid_request")
            #expect(qsh.errorDescription?.contains("qsh") == true)
            let stranger = try await h.stockClient(
                "token_exchange",
                subjectToken: h.emulator.mintConnectJWT(for: h.emulator.makeConnectTenant(), url: "/x"),
                connectMethod: "GET", connectURL: "/x")
            #expect(stranger.error == "invalid_request")
            #expect(stranger.errorDescription?.contains("unknown tenant") == true)
            for answer in [forged, qsh, stranger] {
                expectOAuthErrorHeaders(answer.headers)
                #expect(answer.errorDescription?.contains(tenant.sharedSecret) == false)
            }

            // A tenant without a linked installation, a caller without the tenant in its clientKeys,
            // and a resource other than the linked installation: invalid_target, one description.
            let unlinked = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(unlinked).status == 204)
            let noLink = try await h.stockClient(
                "token_exchange", subjectToken: h.emulator.mintConnectJWT(for: unlinked, url: "/x"),
                connectMethod: "GET", connectURL: "/x")
            let notMine = try await h.stockClient(
                "token_exchange", clientID: "scoped", secret: GatewayHarness.scopedSecret, subjectToken: jwt,
                connectMethod: "POST", connectURL: url)
            let otherResource = try await h.stockClient(
                "token_exchange", resource: h.emulator.makeInstallation().id, subjectToken: jwt, connectMethod: "POST",
                connectURL: url)
            for answer in [noLink, notMine, otherResource] {
                #expect(answer.status == 400, "\(answer)")
                #expect(answer.error == "invalid_target")
                #expect(answer.errorDescription == noLink.errorDescription)
            }
        }
    }

    @Test(
        "token exchange: a context-qsh JWT is exchanged for any method and URL; an uninstalled link is invalid_target")
    func tokenExchangeContextAndUninstalled() async throws {
        try await GatewayHarness.runConnect { h in
            let (installation, tenant, url, jwt) = try await Self.linkedTenant(h)
            let exchanged = try await h.stockClient(
                "token_exchange", subjectToken: jwt, connectMethod: "POST", connectURL: url)
            #expect(exchanged.status == 200, "\(exchanged)")
            let unlinked = h.emulator.makeConnectTenant()
            #expect(try await h.emulator.connectInstall(unlinked).status == 204)
            let noLink = try await h.stockClient(
                "token_exchange", subjectToken: h.emulator.mintConnectJWT(for: unlinked, url: "/x"),
                connectMethod: "GET", connectURL: "/x")
            #expect(noLink.error == "invalid_target")
            // A context JWT (qsh `context-qsh`) is exchanged whatever method and URL it came with.
            var contextOptions = ConnectJWTOptions()
            contextOptions.qsh = .context
            let contextJWT = h.emulator.mintConnectJWT(for: tenant, options: contextOptions)
            let viaContext = try await h.stockClient(
                "token_exchange", subjectToken: contextJWT, connectMethod: "DELETE", connectURL: "/anything?x=1")
            #expect(viaContext.status == 200, "\(viaContext)")
            #expect(viaContext.accessToken == exchanged.accessToken)

            // Once the linked installation is uninstalled: invalid_target, the same description.
            try await h.emulator.uninstall(installation)
            let gone = try await h.stockClient(
                "token_exchange", subjectToken: jwt, connectMethod: "POST", connectURL: url)
            #expect(gone.status == 400, "\(gone)")
            #expect(gone.error == "invalid_target")
            #expect(gone.errorDescription == noLink.errorDescription)
            #expect(gone.accessToken == nil)
        }
    }

    /// An installed installation, a Connect tenant linked to it, a request URL and the tenant's
    /// JWT for `POST` to it.
    static func linkedTenant(_ h: GatewayHarness) async throws -> (
        EmulatedInstallation, EmulatedConnectTenant, String, String
    ) {
        let installation = try await h.installed()
        let tenant = h.emulator.makeConnectTenant(linkedTo: installation)
        #expect(try await h.emulator.connectInstall(tenant).status == 204)
        let url = "/gateway/issue-glance?issueKey=ABC-1"
        return (installation, tenant, url, h.emulator.mintConnectJWT(for: tenant, method: "POST", url: url))
    }

    @Test("token exchange is not offered without Connect")
    func tokenExchangeWithoutConnect() async throws {
        try await GatewayHarness.run { h in
            let answer = try await h.oauthPost(
                "grant_type=\(formEncoded(tokenExchangeGrant))&subject_token=a.b.c"
                    + "&subject_token_type=\(formEncoded("urn:ietf:params:oauth:token-type:jwt"))"
                    + "&connect_method=GET&connect_url=%2Fx",
                headers: ["authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret)])
            #expect(answer.status == 400)
            #expect(answer.oauthError == "unsupported_grant_type")
            let discovery = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
            #expect(discovery.json["grant_types_supported"] as? [String] == ["client_credentials"])
        }
    }

    @Test("discovery: the stock client validates the RFC 8414 document and fetches a token from the endpoint it names")
    func discovery() async throws {
        let port = try RedisServerProcess.freeLoopbackPort()
        try await GatewayHarness.run(
            connectBaseURL: connectTestAppBaseURL,
            configure: { $0.port = port }
        ) { h in
            let installation = try await h.installed()
            for auth in ["basic", "post"] {
                let answer = try await h.stockClient("discovery", auth: auth, resource: installation.id)
                #expect(answer.status == 200, "\(answer)")
                #expect(answer.metadata["issuer"] as? String == "http://127.0.0.1:\(port)")
                #expect(answer.metadata["token_endpoint"] as? String == "http://127.0.0.1:\(port)/oauth/token")
                #expect(
                    answer.metadata["grant_types_supported"] as? [String] == ["client_credentials", tokenExchangeGrant])
                #expect(
                    answer.metadata["token_endpoint_auth_methods_supported"] as? [String]
                        == ["client_secret_basic", "client_secret_post"])
                #expect(answer.metadata["response_types_supported"] as? [String] == [])
                let viaAPI = try await h.apiToken(installation)
                #expect(answer.accessToken == viaAPI)
            }
            let raw = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
            #expect(raw.status == 200)
            #expect(raw.headers["content-type"] == "application/json")
        }
    }

    @Test("with port 0 (any free port) and no public URL, discovery names the port the listener got")
    func discoveryBoundPort() async throws {
        try await GatewayHarness.run { h in
            #expect(h.gateway.configuration.port == 0)
            #expect(h.gateway.configuration.publicURL == nil)
            let answer = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
            #expect(answer.status == 200)
            #expect(answer.json["issuer"] as? String == h.gatewayURL)
            #expect(answer.json["token_endpoint"] as? String == h.gatewayURL + "/oauth/token")
        }
    }

    @Test("a configured public URL is the issuer and the base of the token endpoint")
    func discoveryPublicURL() async throws {
        try await GatewayHarness.run(configure: { $0.publicURL = "https://tokens.example.test/gw/" }) { h in
            let answer = try await h.call(.GET, "/.well-known/oauth-authorization-server", secret: nil)
            #expect(answer.status == 200)
            #expect(answer.json["issuer"] as? String == "https://tokens.example.test/gw")
            #expect(answer.json["token_endpoint"] as? String == "https://tokens.example.test/gw/oauth/token")
            // RFC 8414 §3.1's location for an issuer with a path: the same document.
            let suffixed = try await h.call(.GET, "/.well-known/oauth-authorization-server/gw", secret: nil)
            #expect(suffixed.status == 200)
            #expect(suffixed.body == answer.body)
            #expect(try await h.call(.GET, "/.well-known/oauth-authorization-server/other", secret: nil).status == 404)
        }
    }

    @Test("apiBaseUrl is null on /oauth/token as on GET …/token while no FIT carried one the gateway keeps")
    func oauthAPIBaseURLNullWhileUnknown() async throws {
        // The emulator's FITs name https://api.atlassian.com/ex/…, outside these prefixes: never kept.
        try await GatewayHarness.run(configure: { $0.apiBaseURLPrefixes = ["https://api.stg.atlassian.com/ex/"] }) {
            h in
            let installation = try await h.installed()
            let viaAPI = try await h.token(installation)
            #expect(viaAPI.status == 200)
            #expect(viaAPI.json["apiBaseUrl"] is NSNull)
            let oauth = try await h.oauthPost(
                "grant_type=client_credentials&resource=\(formEncoded(installation.id))",
                headers: ["authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret)])
            #expect(oauth.status == 200, "\(oauth.body)")
            #expect(Set(oauth.json.keys) == ["access_token", "token_type", "expires_in", "apiBaseUrl"])
            #expect(oauth.json["apiBaseUrl"] is NSNull)
            #expect(oauth.json["access_token"] as? String == viaAPI.json["accessToken"] as? String)
        }
    }

    @Test("the token endpoint reads forms strictly: encodings, repeats, two client methods, content type, method")
    func handBuiltRequests() async throws {
        let oddSecret = "odd secret+with%reserved:chars&=é"
        try await GatewayHarness.run(configure: { config in
            config.callers = try! CallerRegistry(
                json: """
                    [{"name":"full","secret":"\(GatewayHarness.callerSecret)","installations":["*"],"clientKeys":["*"]},
                     {"name":"odd client","secret":"\(oddSecret)","installations":["*"]}]
                    """)
        }) { h in
            let installation = try await h.installed()
            let resource = formEncoded(installation.id)
            let basic = ["authorization": GatewayHarness.basic("full", GatewayHarness.callerSecret)]

            // Percent-encoding and `+` in the body, with client_secret_post; a charset parameter is fine.
            let post = try await h.oauthPost(
                "grant_type=client_credentials&client_id=full&client_secret=\(formEncoded(GatewayHarness.callerSecret))"
                    + "&resource=\(resource)&scope=read+write",
                contentType: "application/x-www-form-urlencoded; charset=UTF-8")
            #expect(post.status == 200, "\(post.body)")
            #expect(post.json["token_type"] as? String == "Bearer")
            let viaAPI = try await h.apiToken(installation)
            #expect(post.json["access_token"] as? String == viaAPI)
            #expect(post.headers["cache-control"] == "no-store")
            #expect(Set(post.json.keys) == ["access_token", "token_type", "expires_in", "apiBaseUrl"])
            #expect(post.json["apiBaseUrl"] as? String == installation.apiBaseUrl)

            // RFC 6749 §2.3.1: Basic credentials form-encoded before base64; also accepted as sent.
            let encodedBasic = GatewayHarness.basic(formEncoded("odd client"), formEncoded(oddSecret))
            let rawBasic = GatewayHarness.basic("odd client", oddSecret)
            for header in [encodedBasic, rawBasic] {
                let answer = try await h.oauthPost(
                    "grant_type=client_credentials&resource=\(resource)", headers: ["authorization": header])
                #expect(answer.status == 200, "\(answer.body)")
            }
            let formOdd = try await h.oauthPost(
                "grant_type=client_credentials&client_id=\(formEncoded("odd client"))"
                    + "&client_secret=\(formEncoded(oddSecret))&resource=\(resource)")
            #expect(formOdd.status == 200, "\(formOdd.body)")
            // ISO-8859-1 (Apache HttpClient's form label; Python requests' Basic encoding of a str).
            let latin1 = { (text: String) in text.unicodeScalars.map { UInt8($0.value) } }
            let latin1Encoded = latin1(oddSecret).map { byte in
                byte.isASCIIAlphanumeric ? String(UnicodeScalar(byte)) : "%" + String(format: "%02X", byte)
            }.joined()
            let latin1Form = try await h.oauthPost(
                "grant_type=client_credentials&client_id=odd+client&client_secret=\(latin1Encoded)&resource=\(resource)",
                contentType: "application/x-www-form-urlencoded; charset=ISO-8859-1")
            #expect(latin1Form.status == 200, "\(latin1Form.body)")
            let latin1Basic = "Basic " + Data(latin1("odd client:" + oddSecret)).base64EncodedString()
            let viaLatin1Basic = try await h.oauthPost(
                "grant_type=client_credentials&resource=\(resource)", headers: ["authorization": latin1Basic])
            #expect(viaLatin1Basic.status == 200, "\(viaLatin1Basic.body)")
            // Basic plus the same client_id in the body is allowed (RFC 6749 §3.2.1).
            let sameID = try await h.oauthPost(
                "grant_type=client_credentials&client_id=full&resource=\(resource)", headers: basic)
            #expect(sameID.status == 200)

            try await Self.expectRefusedForms(h, resource: resource, basic: basic)

            // Any other method on the token endpoint: 405 with an RFC 6749 body.
            for method: HTTPMethod in [.GET, .HEAD, .PUT, .DELETE, .PATCH, .OPTIONS, .TRACE, .RAW(value: "PURGE")] {
                let other = try await h.call(method, "/oauth/token", secret: nil)
                #expect(other.status == 405, "\(method)")
                #expect(other.headers["allow"] == "POST", "\(method)")
                if method != .HEAD { #expect(other.oauthError == "invalid_request", "\(method): \(other.body)") }
                expectOAuthErrorHeaders(other.headers)
            }
            // The path as the router reads it (a trailing slash aside): the same answer.
            let slashed = try await h.call(.GET, "/oauth/token/", secret: nil)
            #expect(slashed.status == 405)
            #expect(slashed.oauthError == "invalid_request", "\(slashed.body)")

            // Metrics see the route template, never an installation id.
            let metrics = try await h.call(.GET, "/metrics", secret: nil)
            #expect(metrics.body.contains("route=\"/oauth/token\""))
            #expect(!metrics.body.contains(installation.id))
        }
    }

    /// invalid_request (a repeated parameter, both client methods, another client_id, no
    /// grant_type, a bad encoding, JSON) and invalid_client (none given, a Bearer credential, a
    /// malformed Basic value, a secret without id), each with the RFC 6749 error headers.
    static func expectRefusedForms(_ h: GatewayHarness, resource: String, basic: [String: String]) async throws {
        // invalid_request: repeated parameter, both methods, another client_id, missing grant_type, bad encoding.
        let badRequests = [
            ("grant_type=client_credentials&resource=\(resource)&resource=\(resource)", basic),
            (
                "grant_type=client_credentials&client_id=full"
                    + "&client_secret=\(formEncoded(GatewayHarness.callerSecret))&resource=\(resource)", basic
            ),
            ("grant_type=client_credentials&client_id=other&resource=\(resource)", basic),
            ("resource=\(resource)", basic),
            ("grant_type=client_credentials&resource=%ZZ", basic),
        ]
        for (body, headers) in badRequests {
            let answer = try await h.oauthPost(body, headers: headers)
            #expect(answer.status == 400, "\(body)")
            #expect(answer.oauthError == "invalid_request", "\(body)")
            expectOAuthErrorHeaders(answer.headers)
        }
        let json = try await h.oauthPost(
            #"{"grant_type":"client_credentials"}"#, contentType: "application/json", headers: basic)
        #expect(json.status == 400)
        #expect(json.oauthError == "invalid_request")

        // invalid_client: none given, a Bearer credential, a malformed Basic value, a secret without id.
        let badClients: [(String, [String: String])] = [
            ("grant_type=client_credentials&resource=\(resource)", [:]),
            (
                "grant_type=client_credentials&resource=\(resource)",
                ["authorization": "Bearer \(GatewayHarness.callerSecret)"]
            ),
            ("grant_type=client_credentials&resource=\(resource)", ["authorization": "Basic !!!"]),
            ("grant_type=client_credentials&client_secret=x&resource=\(resource)", [:]),
        ]
        for (body, headers) in badClients {
            let answer = try await h.oauthPost(body, headers: headers)
            #expect(answer.status == 401)
            #expect(answer.oauthError == "invalid_client")
            #expect(answer.headers["www-authenticate"] == "Basic realm=\"token-gateway\"")
            expectOAuthErrorHeaders(answer.headers)
        }
    }

}

extension UInt8 {
    fileprivate var isASCIIAlphanumeric: Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(self) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(self)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(self)
    }
}
