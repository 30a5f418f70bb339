import Foundation

/// Runs `redis-cli` with `arguments` (bounded by a 10 s timeout) and returns its output, trimmed.
@discardableResult
func redisCLI(_ arguments: [String]) throws -> String {
    try runTool("/usr/bin/redis-cli", arguments)
}

/// Runs a command-line tool to completion within 20 s; throws when it fails.
@discardableResult
func runTool(_ executable: String, _ arguments: [String], directory: String? = nil) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let deadline = Date().addingTimeInterval(20)
    // The output is small; reading it to the end also waits for the tool to exit.
    let data = output.fileHandleForReading.readDataToEndOfFile()
    while process.isRunning, Date() < deadline { usleep(1000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    guard process.terminationStatus == 0 else {
        throw RedisServerProcess.StartError(description: "\(executable) \(arguments.first ?? "") failed: \(text)")
    }
    return text
}

/// A CA, a server certificate for `localhost` (a DNS name only, so a client reaching it by IP address must be
/// told the name) and a client certificate signed by it, and a
/// second CA that signed neither, made with the `openssl` command-line tool in a temporary directory.
struct RedisTLSFiles: Sendable {
    let directory: String
    var ca: String { self.directory + "/ca.crt" }
    var otherCA: String { self.directory + "/other-ca.crt" }
    var serverCertificate: String { self.directory + "/server.crt" }
    var serverKey: String { self.directory + "/server.key" }
    var clientCertificate: String { self.directory + "/client.crt" }
    var clientKey: String { self.directory + "/client.key" }

    static let shared: Result<RedisTLSFiles, any Error> = Result { try RedisTLSFiles.make() }

    private static func make() throws -> RedisTLSFiles {
        let directory = try RedisServerProcess.makeTemporaryDirectory()
        let openssl = "/usr/bin/openssl"
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for ca in ["ca", "other-ca"] {
            try runTool(
                openssl,
                ["req", "-x509"] + ec + [
                    "-keyout", "\(ca).key", "-out", "\(ca).crt", "-days", "2", "-subj", "/CN=tg-test-\(ca)",
                ],
                directory: directory)
        }
        for (name, extensions) in [
            ("server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            try extensions.write(toFile: "\(directory)/\(name).ext", atomically: true, encoding: .utf8)
            try runTool(
                openssl,
                ["req"] + ec + [
                    "-keyout", "\(name).key", "-out", "\(name).csr", "-subj",
                    "/CN=\(name == "server" ? "localhost" : "tg-gateway")",
                ],
                directory: directory)
            try runTool(
                openssl,
                [
                    "x509", "-req", "-in", "\(name).csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out",
                    "\(name).crt", "-days", "2", "-extfile", "\(name).ext",
                ],
                directory: directory)
        }
        return RedisTLSFiles(directory: directory)
    }
}

/// A Redis Cluster of six `redis-server` processes on loopback: three primaries with one replica each, made with
/// `redis-cli --cluster create … --cluster-replicas 1`, failure detection after 1 s.
final class RedisClusterProcesses: Sendable {
    let nodes: [RedisServerProcess]

    private init(nodes: [RedisServerProcess]) {
        self.nodes = nodes
    }

    /// `redis-cluster://127.0.0.1:<p1>,127.0.0.1:<p2>` (two seeds are enough).
    var url: String {
        "redis-cluster://" + self.nodes.prefix(2).map { "127.0.0.1:\($0.port)" }.joined(separator: ",")
    }

    static func start() async throws -> RedisClusterProcesses {
        var nodes: [RedisServerProcess] = []
        for _ in 0..<6 {
            nodes.append(
                try await RedisServerProcess.start(extraArguments: [
                    // The bus port explicitly: the default (port + 10000) may not exist for a high free port.
                    "--cluster-enabled", "yes", "--cluster-port", "\(try RedisServerProcess.freeLoopbackPort())",
                    "--cluster-node-timeout", "1000",
                    // A replica may take over however long ago it last heard from its primary (in a loaded test
                    // machine the first sync can be slow).
                    "--cluster-replica-validity-factor", "0",
                ]))
        }
        try redisCLI(
            ["--cluster", "create"] + nodes.map { "127.0.0.1:\($0.port)" } + [
                "--cluster-replicas", "1", "--cluster-yes",
            ])
        let cluster = RedisClusterProcesses(nodes: nodes)
        try await cluster.waitUntilHealthy()
        return cluster
    }

    /// Waits (up to 30 s) until every running node says `cluster_state:ok` and every replica is in sync with its
    /// primary.
    func waitUntilHealthy(except stopped: Set<Int> = []) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            let healthy = self.nodes.indices.filter { !stopped.contains($0) }.allSatisfy { index in
                let port = "\(self.nodes[index].port)"
                guard let info = try? redisCLI(["-p", port, "CLUSTER", "INFO"]), info.contains("cluster_state:ok"),
                    let replication = try? redisCLI(["-p", port, "INFO", "replication"])
                else { return false }
                return !replication.contains("role:slave") || replication.contains("master_link_status:up")
            }
            if healthy { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw RedisServerProcess.StartError(description: "the Redis Cluster did not become healthy within 30 s")
    }

    /// The index of the node whose port is `port`.
    func index(ofPort port: Int) -> Int? {
        self.nodes.firstIndex { $0.port == port }
    }

    /// Ports of the current primaries (with slots), as node 0 (or the first answering node) sees them.
    func primaryPorts() throws -> [Int] {
        for node in self.nodes {
            guard let text = try? redisCLI(["-p", "\(node.port)", "CLUSTER", "NODES"]) else { continue }
            return text.split(separator: "\n").compactMap { line in
                let fields = line.split(separator: " ")
                guard fields.count >= 9, fields[2].contains("master"), !fields[2].contains("fail") else { return nil }
                let address = fields[1].split(separator: "@")[0]
                return address.split(separator: ":").last.flatMap { Int($0) }
            }
        }
        throw RedisServerProcess.StartError(description: "no cluster node answered")
    }
}
