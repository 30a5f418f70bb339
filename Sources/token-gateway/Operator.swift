import ArgumentParser
import AsyncHTTPClient
import FlowEngine
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization
import TokenGateway

/// Exit codes of the operator commands: 0 success, 1 the gateway or a dependency failed,
/// 2 bad settings or arguments, 3 not found / refused.
enum OperatorExit {
    static let failure = ExitCode(1)
    static let usage = ExitCode(2)
    static let refused = ExitCode(3)
}

/// Where a running gateway is and which caller to act as. The caller secret is read from the
/// environment (`TOKEN_GATEWAY_CALLER_SECRET`), never from the command line, so it does not end
/// up in shell history or `ps`.
struct CallerOptions: ParsableArguments {
    @Option(help: "Base URL of the running gateway, http or https [TOKEN_GATEWAY_URL]")
    var gatewayUrl: String = Self.environmentURL ?? "http://127.0.0.1:8080"

    /// `TOKEN_GATEWAY_URL`, unless unset or empty (an empty setting is an unset one, as for `serve`).
    static var environmentURL: String? {
        guard let value = ProcessInfo.processInfo.environment["TOKEN_GATEWAY_URL"], !value.isEmpty else { return nil }
        return value
    }

    /// An `http` or `https` URL with a host, and nothing the command would drop or send along
    /// unasked: no credentials (the caller secret comes from `TOKEN_GATEWAY_CALLER_SECRET`), no
    /// query, no fragment. Refused: exit 2, naming the setting (never echoing the value, which
    /// could hold a password).
    func validate() throws {
        guard let url = URLComponents(string: self.gatewayUrl), let scheme = url.scheme?.lowercased(),
            scheme == "http" || scheme == "https", let host = url.host, !host.isEmpty,
            url.user == nil, url.password == nil, url.query == nil, url.fragment == nil
        else {
            throw ValidationError(
                "--gateway-url / TOKEN_GATEWAY_URL must be an http or https URL with a host, without credentials, query or fragment (for example http://127.0.0.1:8080)"
            )
        }
    }

    func secret() throws -> String {
        guard let s = ProcessInfo.processInfo.environment["TOKEN_GATEWAY_CALLER_SECRET"], !s.isEmpty else {
            FileHandle.standardError.write(
                Data("token-gateway: set TOKEN_GATEWAY_CALLER_SECRET to the caller secret to act as\n".utf8))
            throw OperatorExit.usage
        }
        return s
    }

    /// One GET/POST as the caller; returns status and parsed JSON body.
    func call(_ method: NIOHTTP1Method, _ path: String) async throws -> (Int, Any?) {
        let secret = try self.secret()
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .seconds(3), read: .seconds(35))
        configuration.connectionPool = .init(idleTimeout: .seconds(1))
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        defer { client.shutdown { _ in } }
        var request = HTTPClientRequest(url: self.gatewayUrl.trimmingSuffix("/") + path)
        request.method = method.value
        request.headers.add(name: "authorization", value: "Bearer \(secret)")
        do {
            let response = try await client.execute(request, deadline: .now() + .seconds(35))
            let body = try await response.body.collect(upTo: 8 << 20)
            let json = try? JSONSerialization.jsonObject(with: Data(buffer: body))
            return (Int(response.status.code), json)
        } catch {
            FileHandle.standardError.write(Data("token-gateway: cannot reach \(self.gatewayUrl): \(error)\n".utf8))
            throw OperatorExit.failure
        }
    }
}

enum NIOHTTP1Method {
    case get, post
    var value: HTTPMethod { self == .get ? .GET : .POST }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String {
        self.hasSuffix(suffix) ? String(self.dropLast(suffix.count)) : self
    }
}

func printJSON(_ value: Any?) {
    guard let value, JSONSerialization.isValidJSONObject(value),
        let data = try? JSONSerialization.data(
            withJSONObject: value, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
    else {
        print(value.map { "\($0)" } ?? "")
        return
    }
    print(String(decoding: data, as: UTF8.self))
}

func failOnError(_ status: Int, _ json: Any?) throws {
    guard !(200..<300).contains(status) else { return }
    let error = (json as? [String: Any])?["error"] as? [String: Any]
    let code = error?["code"] as? String ?? "http_\(status)"
    let message = error?["message"] as? String ?? ""
    FileHandle.standardError.write(Data("token-gateway: \(status) \(code): \(message)\n".utf8))
    if status == 400 { throw OperatorExit.usage }  // an argument the gateway refused (invalid_parameter)
    throw [401, 403, 404, 410].contains(status) ? OperatorExit.refused : OperatorExit.failure
}

func installationPath(_ id: String) throws -> String {
    guard let installation = InstallationID(id) else {
        FileHandle.standardError.write(Data("token-gateway: \(id) is not an installation ARI or id\n".utf8))
        throw OperatorExit.usage
    }
    return "/v1/installations/" + String(installation.shortID)
}

struct Installations: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List or show installations through a running gateway (as a caller).",
        subcommands: [List.self, Show.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List installations, page by page.")
        @OptionGroup var caller: CallerOptions
        @Option(help: "Page size (1–1000)") var limit = 100
        @Flag(help: "Print JSON instead of a table") var json = false

        func run() async throws {
            var cursor: String? = nil
            var all: [[String: Any]] = []
            repeat {
                var path = "/v1/installations?limit=\(self.limit)"
                if let cursor { path += "&cursor=\(cursor)" }
                let (status, body) = try await self.caller.call(.get, path)
                try failOnError(status, body)
                let object = body as? [String: Any] ?? [:]
                all += object["installations"] as? [[String: Any]] ?? []
                cursor = object["nextCursor"] as? String
                if !self.json, cursor != nil {
                    FileHandle.standardError.write(Data("… \(all.count) so far\n".utf8))
                }
            } while cursor != nil
            if self.json {
                printJSON(all)
                return
            }
            print(
                "INSTALLATION                                                          STATUS       TRIGGER  TOKEN EXPIRES"
            )
            for i in all {
                let id = i["installationId"] as? String ?? "?"
                let status = i["status"] as? String ?? "?"
                let trigger = (i["triggerRegistered"] as? Bool ?? false) ? "yes" : "no"
                let expires = i["tokenExpiresAt"] as? String ?? "-"
                print(
                    id.padding(toLength: 70, withPad: " ", startingAt: 0)
                        + status.padding(toLength: 13, withPad: " ", startingAt: 0)
                        + trigger.padding(toLength: 9, withPad: " ", startingAt: 0) + expires)
            }
            print("\(all.count) installation(s)")
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one installation's metadata.")
        @OptionGroup var caller: CallerOptions
        @Argument(help: "Installation ARI or id") var installation: String

        func run() async throws {
            let (status, body) = try await self.caller.call(.get, try installationPath(self.installation))
            try failOnError(status, body)
            printJSON(body)
        }
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fetch an installation's token through a running gateway, as a caller.",
        discussion: "Prints the JSON answer. The token itself is printed only with --show-token.")
    @OptionGroup var caller: CallerOptions
    @Argument(help: "Installation ARI or id") var installation: String
    @Option(help: "Seconds the token must still be valid for") var minValidity: Int?
    @Option(help: "Milliseconds to wait for a fresh token") var timeout: Int?
    @Flag(help: "Force a new round trip") var refresh = false
    @Flag(help: "Print the access token itself") var showToken = false

    func run() async throws {
        var path = try installationPath(self.installation) + (self.refresh ? "/token/refresh" : "/token")
        var query: [String] = []
        if let minValidity { query.append("minValidity=\(minValidity)") }
        if let timeout { query.append("timeout=\(timeout)") }
        if !query.isEmpty { path += "?" + query.joined(separator: "&") }
        FileHandle.standardError.write(Data("fetching token for \(self.installation)…\n".utf8))
        let (status, body) = try await self.caller.call(self.refresh ? .post : .get, path)
        try failOnError(status, body)
        guard var object = body as? [String: Any] else { throw OperatorExit.failure }
        if !self.showToken, let token = object["accessToken"] as? String {
            object["accessToken"] = "<\(token.count) characters; --show-token prints it>"
        }
        printJSON(object)
    }
}

struct CheckConfig: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config",
        abstract: "Validate the settings, reach Redis and the JWKS, and print what was found (never a secret).")
    @OptionGroup var settings: SettingsOptions

    func run() async throws {
        let config = try self.settings.load()
        for name in config.unknownEnvironmentNames {
            FileHandle.standardError.write(
                Data("warning: \(name) is no setting of the gateway and is ignored (misspelt?)\n".utf8))
        }
        for name in config.secretsFromCommandLine {
            FileHandle.standardError.write(
                Data("warning: \(GatewayConfiguration.commandLineSecretWarning(name))\n".utf8))
        }
        if let warning = config.publicURLWarning {
            FileHandle.standardError.write(Data("warning: \(warning)\n".utf8))
        }
        print("settings        ok")
        print("listen          \(config.host):\(config.port)")
        print("redis           \(config.redis)")
        print("forge app id    \(config.forgeAppID)")
        print("jwks            \(config.forgeJWKSURL)")
        print("trigger hosts   \(config.triggerHosts)")
        print(
            "module keys     \(config.forgeModuleKeys.map { $0.sorted().joined(separator: ", ") } ?? "any (core:endpoint only)")"
        )
        print("encryption keys \(config.encryptionKeys.keyIds.joined(separator: ", ")) (first encrypts)")
        print("callers         \(config.callers.callers.map(\.name).joined(separator: ", "))")
        print("connect         \(config.connectBaseURL ?? "off")")
        var failed = false
        // The Redis client's warnings say why it could not connect (credentials refused, a TLS
        // handshake that failed, …): the first is printed with the answer. They never hold a secret.
        let reasons = ReasonCollector()
        let logger = Logger(label: "check-config") { _ in reasons.handler() }
        let redis = RedisClient(configuration: config.redis, logger: logger)
        FileHandle.standardError.write(Data("reaching Redis…\n".utf8))
        do {
            try await redis.ping(timeout: .seconds(3))
            print("redis reachable yes")
        } catch {
            print("redis reachable NO (\(error)\(reasons.first.map { ": " + $0 } ?? ""))")
            failed = true
        }
        await redis.shutdown()
        FileHandle.standardError.write(Data("fetching the JWKS…\n".utf8))
        // The gateway's own client settings (no redirect followed), so "reachable" means what serve sees.
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: Gateway.outboundHTTPConfiguration())
        do {
            let response = try await client.execute(HTTPClientRequest(url: config.forgeJWKSURL), timeout: .seconds(5))
            let body = try await response.body.collect(upTo: 1 << 20)
            let json = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any]
            let keys = (json?["keys"] as? [[String: Any]])?.compactMap { $0["kid"] as? String } ?? []
            if response.status.code == 200 && !keys.isEmpty {
                print("jwks reachable  yes (\(keys.count) key(s): \(keys.joined(separator: ", ")))")
            } else {
                print("jwks reachable  NO (HTTP \(response.status.code), \(keys.count) keys)")
                failed = true
            }
        } catch {
            print("jwks reachable  NO (\(error))")
            failed = true
        }
        try? await client.shutdown()
        if failed { throw OperatorExit.failure }
    }
}

/// Keeps the first warning (or worse) logged through its handlers: what `check-config` prints as
/// the reason Redis could not be reached.
final class ReasonCollector: Sendable {
    private let reason = Mutex<String?>(nil)

    /// The first reason logged, with the `redis.error` it named.
    var first: String? { self.reason.withLock { $0 } }

    func handler() -> some LogHandler { Handler(collector: self) }

    struct Handler: LogHandler {
        let collector: ReasonCollector
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .warning

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            var reason = "\(event.message)"
            if let error = event.metadata?["redis.error"] { reason += " (\(error))" }
            self.collector.reason.withLock { if $0 == nil { $0 = reason } }
        }
    }
}
