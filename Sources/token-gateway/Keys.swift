import ArgumentParser
import FlowEngine
import Foundation
import Logging
import TokenGateway

/// `token-gateway keys …`: operator commands for the keys at rest.
struct Keys: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Operate on the encryption keys of the store.",
        subcommands: [KeysRewrap.self])
}

/// `token-gateway keys rewrap`: re-encrypts every secret in Redis under the ring's first key.
struct KeysRewrap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrap",
        abstract: "Re-encrypt every secret in the store under the current (first) encryption key.",
        discussion: """
            Walks the store with SCAN in batches and seals every value that is not yet under the \
            first key of TOKEN_GATEWAY_ENCRYPTION_KEYS again under it. Prints the cursor after every \
            batch; after an interruption, run it again with --cursor <last printed cursor> (running \
            it from the start again is harmless too). Exits 0 when everything opened and was written, \
            1 when some sealed values opened with no key of the ring (they are listed in the log and \
            left as they are) or changed on every attempt to write them (busy: run it again), 2 on \
            a bad setting.

            Rotation (two roll-outs, so that during a rolling restart every replica can open what \
            the others seal): 1. add the new key last in TOKEN_GATEWAY_ENCRYPTION_KEYS on every \
            replica; 2. move it first on every replica; 3. run this command with that ring; \
            4. remove the old key. Docs/operations.md "Key rotation" has the details.
            """)

    @OptionGroup var redis: RedisOptions
    @Option(
        help: "Key ring, new key first; better @path of a file with it [TOKEN_GATEWAY_ENCRYPTION_KEYS]")
    var encryptionKeys: String?
    @Option(help: "SCAN cursor to resume from (as printed by an interrupted run)") var cursor = "0"
    @Option(help: "Keys per SCAN batch (a hint to Redis)") var batchSize = 500
    @Option(help: "Log level trace…critical (default: info) [TOKEN_GATEWAY_LOG_LEVEL]") var logLevel: String?

    /// The log level: the flag, else `TOKEN_GATEWAY_LOG_LEVEL` unless empty, else `info`.
    var level: String {
        if let flag = self.logLevel { return flag.trimmingCharacters(in: .whitespacesAndNewlines).lowercased() }
        let environment = (ProcessInfo.processInfo.environment["TOKEN_GATEWAY_LOG_LEVEL"] ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return environment.isEmpty ? "info" : environment.lowercased()
    }

    func validate() throws {
        // A decimal SCAN cursor, or `<slot>:<cursor>:<primary host:port>` with Redis Cluster.
        let parts = self.cursor.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        let decimal = { (part: Substring) in !part.isEmpty && part.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) }
        guard
            parts.count == 1
                ? decimal(parts[0]) : parts.count == 3 && decimal(parts[0]) && decimal(parts[1]) && !parts[2].isEmpty
        else {
            throw ValidationError(
                "--cursor must be a SCAN cursor as a run printed it (a decimal number, or slot:number:host:port for a cluster)"
            )
        }
        guard (1...100_000).contains(self.batchSize) else {
            throw ValidationError("--batch-size must be in 1…100000")
        }
        guard Logger.Level(rawValue: self.level) != nil else {
            throw ValidationError(
                "--log-level / TOKEN_GATEWAY_LOG_LEVEL must be trace, debug, info, notice, warning, error or critical")
        }
    }

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        let redisText: String
        let keysSetting: String?
        do {
            // Secrets inline on the command line are used, with a warning (the process list shows them).
            for (setting, flag) in [
                (GatewaySetting.redisURL, self.redis.redisUrl), (.encryptionKeys, self.encryptionKeys),
            ] {
                if let flag, GatewayConfiguration.isInlineSecret(setting, flagValue: flag) {
                    FileHandle.standardError.write(
                        Data("warning: \(GatewayConfiguration.commandLineSecretWarning(setting.environment))\n".utf8))
                }
            }
            redisText =
                try GatewayConfiguration.secretSetting(.redisURL, flag: self.redis.redisUrl, environment: environment)
                ?? "redis://127.0.0.1:6379/0"
            keysSetting = try GatewayConfiguration.secretSetting(
                .encryptionKeys, flag: self.encryptionKeys, environment: environment)
        } catch {
            throw Self.configurationError("\(error)")
        }
        let redisConfiguration: RedisConfiguration
        let ring: EncryptionKeyRing
        do {
            redisConfiguration = try GatewayConfiguration.redisConfiguration { setting in
                setting == .redisURL ? redisText : self.redis.tlsSetting(setting, environment: environment)
            }
        } catch {
            throw Self.configurationError("\(error)")
        }
        guard let keysText = keysSetting, !keysText.isEmpty
        else {
            throw Self.configurationError("configuration error: TOKEN_GATEWAY_ENCRYPTION_KEYS: is required but not set")
        }
        do {
            ring = try EncryptionKeyRing(parsing: keysText)
        } catch {
            throw Self.configurationError("configuration error: \(error)")
        }
        let logger = makeLogger(
            label: "token-gateway", format: .logfmt, level: Logger.Level(rawValue: self.level) ?? .info)
        let redis = RedisClient(configuration: redisConfiguration, logger: logger)
        let rewrap = KeyRewrap(redis: redis, keys: ring, batchSize: self.batchSize, logger: logger)
        print("rewrap start cursor=\(self.cursor) current_key=\(ring.currentKeyId)")
        let totals: KeyRewrap.Counts
        do {
            totals = try await rewrap.run(from: self.cursor) { batch in
                print("rewrap progress cursor=\(batch.nextCursor) \(batch.counts)")
            }
        } catch {
            await redis.shutdown()
            // Slots moved between shards: no cursor of this walk leads on; only a new walk does.
            let advice =
                (error as? RedisError) == .topologyChanged
                ? "run it again without --cursor" : "resume with --cursor <last printed cursor>"
            FileHandle.standardError.write(Data("token-gateway: rewrap stopped: \(error); \(advice)\n".utf8))
            throw ExitCode(1)
        }
        await redis.shutdown()
        print("rewrap done \(totals)")
        if totals.busy > 0 {
            FileHandle.standardError.write(
                Data("token-gateway: \(totals.busy) values changed while being rewrapped; run it again\n".utf8))
        }
        if !totals.allCurrent { throw ExitCode(1) }
    }

    private static func configurationError(_ line: String) -> ExitCode {
        FileHandle.standardError.write(Data("token-gateway: \(line)\n".utf8))
        return ExitCode(2)
    }
}
