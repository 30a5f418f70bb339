import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A `redis-server` (or `redis-sentinel`) child process on a free loopback port, for integration tests.
///
/// `start` returns once the server answers `PING` (polled until a deadline). The process is killed when the
/// value is released or the test process exits, so a failing test does not leak servers.
final class RedisServerProcess: Sendable {
    struct StartError: Error, CustomStringConvertible {
        let description: String
    }

    /// The loopback port the server listens on (kept across ``restart()``).
    let port: Int
    /// The server's working directory (RDB/AOF files, `redis.log`, `sentinel.conf`).
    let directory: String
    private let executable: String
    private let arguments: [String]
    private let process: Mutex<ChildProcess?>
    /// Whether `directory` was created here (and is removed when the value is released).
    private let ownsDirectory: Bool

    /// `redis://127.0.0.1:<port>/0`.
    var url: String {
        "redis://127.0.0.1:\(self.port)/0"
    }

    private init(
        port: Int,
        directory: String,
        ownsDirectory: Bool,
        executable: String,
        arguments: [String],
        process: ChildProcess
    ) {
        self.port = port
        self.directory = directory
        self.ownsDirectory = ownsDirectory
        self.executable = executable
        self.arguments = arguments
        self.process = Mutex(process)
    }

    deinit {
        if let process = self.process.withLock({ $0 }), process.isRunning {
            process.signal(SIGKILL)
        }
        if self.ownsDirectory {
            try? FileManager.default.removeItem(atPath: self.directory)
        }
    }

    // MARK: Starting

    /// Starts `redis-server --port N --bind 127.0.0.1 --save "" --appendonly no` plus `extraArguments`
    /// (later arguments win, so `["--appendonly", "yes"]` turns AOF on).
    ///
    /// - Parameter directory: the working directory; a new temporary one by default.
    static func start(extraArguments: [String] = [], directory: String? = nil) async throws -> RedisServerProcess {
        let ownsDirectory = directory == nil
        let directory = try directory ?? Self.makeTemporaryDirectory()
        return try await self.launchOnFreePort(
            executable: "/usr/bin/redis-server",
            directory: directory,
            ownsDirectory: ownsDirectory
        ) { port in
            Self.serverArguments(port: port, directory: directory) + extraArguments
        } prepare: { _ in
        }
    }

    private static func serverArguments(port: Int, directory: String) -> [String] {
        [
            "--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", directory, "--logfile", "\(directory)/redis.log", "--daemonize", "no",
        ]
    }

    /// Starts `redis-sentinel` monitoring the primary at `127.0.0.1:primaryPort` as `masterName` (quorum 1).
    static func startSentinel(
        monitoringPrimaryPort primaryPort: Int,
        masterName: String = "tg-primary",
        downAfterMilliseconds: Int = 1000,
        failoverTimeoutMilliseconds: Int = 5000,
        extraConfiguration: String = ""
    ) async throws -> RedisServerProcess {
        let directory = try Self.makeTemporaryDirectory()
        let configPath = "\(directory)/sentinel.conf"
        return try await self.launchOnFreePort(
            executable: "/usr/bin/redis-sentinel",
            directory: directory,
            ownsDirectory: true
        ) { port in
            [configPath, "--port", "\(port)", "--daemonize", "no"]
        } prepare: { port in
            let config = """
                port \(port)
                bind 127.0.0.1
                dir \(directory)
                logfile \(directory)/sentinel.log
                sentinel monitor \(masterName) 127.0.0.1 \(primaryPort) 1
                sentinel down-after-milliseconds \(masterName) \(downAfterMilliseconds)
                sentinel failover-timeout \(masterName) \(failoverTimeoutMilliseconds)
                sentinel parallel-syncs \(masterName) 1
                \(extraConfiguration)

                """
            try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        }
    }

    /// The URL of a Redis shared by the whole test process: `TOKEN_GATEWAY_TEST_REDIS_URL` if set, otherwise a
    /// server started on first use (and killed when the process exits). Use unique key prefixes per test.
    static func sharedURL() -> String {
        Self.shared
    }

    private static let shared: String = {
        if let url = ProcessInfo.processInfo.environment["TOKEN_GATEWAY_TEST_REDIS_URL"], !url.isEmpty {
            return url
        }
        do {
            let directory = try makeTemporaryDirectory()
            var lastError: (any Error)?
            for _ in 0..<5 {
                let port = try freeLoopbackPort()
                let process = try launch(
                    executable: "/usr/bin/redis-server",
                    arguments: serverArguments(port: port, directory: directory),
                    directory: directory
                )
                let deadline = ContinuousClock.now + .seconds(10)
                while ContinuousClock.now < deadline, process.isRunning, !pingSucceeds(port: port) {
                    usleep(10_000)
                }
                if pingSucceeds(port: port) {
                    return "redis://127.0.0.1:\(port)/0"
                }
                process.signal(SIGKILL)
                lastError = StartError(description: "redis-server on port \(port) did not answer PING")
            }
            throw lastError ?? StartError(description: "redis-server did not start")
        } catch {
            fatalError("could not start the shared test Redis: \(error)")
        }
    }()

    /// Starts `redis-server` with TLS only (`--port 0 --tls-port N`), its certificate signed by `files.ca`;
    /// with `mutual`, clients must present a certificate signed by that CA (`--tls-auth-clients yes`).
    static func startTLS(_ files: RedisTLSFiles, mutual: Bool) async throws -> RedisServerProcess {
        let directory = try Self.makeTemporaryDirectory()
        return try await self.launchOnFreePort(
            executable: "/usr/bin/redis-server",
            directory: directory,
            ownsDirectory: true,
            arguments: { port in
                Self.serverArguments(port: 0, directory: directory) + [
                    "--tls-port", "\(port)", "--tls-cert-file", files.serverCertificate, "--tls-key-file",
                    files.serverKey, "--tls-ca-cert-file", files.ca, "--tls-auth-clients", mutual ? "yes" : "no",
                ]
            },
            prepare: { _ in },
            ready: { port in
                (try? redisCLI([
                    "--tls", "--cacert", files.ca, "--cert", files.clientCertificate, "--key",
                    files.clientKey, "-p", "\(port)", "PING",
                ])) == "PONG"
            }
        )
    }

    private static func launchOnFreePort(
        executable: String,
        directory: String,
        ownsDirectory: Bool,
        arguments: (Int) -> [String],
        prepare: (Int) throws -> Void,
        ready: @escaping @Sendable (Int) -> Bool = { RedisServerProcess.pingSucceeds(port: $0) }
    ) async throws -> RedisServerProcess {
        var lastError: (any Error)?
        // The free port is found by binding port 0 and closing the socket; another process may take it before
        // the server binds it, so try a few ports.
        for _ in 0..<5 {
            let port = try Self.freeLoopbackPort()
            try prepare(port)
            let args = arguments(port)
            let process = try Self.launch(executable: executable, arguments: args, directory: directory)
            do {
                try await Self.waitUntilReady(
                    process, port: port, executable: executable, directory: directory, ready: ready)
                return RedisServerProcess(
                    port: port,
                    directory: directory,
                    ownsDirectory: ownsDirectory,
                    executable: executable,
                    arguments: args,
                    process: process
                )
            } catch {
                lastError = error
                await Self.terminate(process, signal: SIGKILL)
            }
        }
        throw lastError ?? StartError(description: "\(executable) did not start")
    }

    private static func launch(executable: String, arguments: [String], directory: String) throws -> ChildProcess {
        try ChildProcess(executable: executable, arguments: arguments, directory: directory)
    }

    private static func waitUntilReady(
        _ process: ChildProcess,
        port: Int,
        executable: String,
        directory: String,
        ready: @Sendable (Int) -> Bool = { RedisServerProcess.pingSucceeds(port: $0) }
    ) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            guard process.isRunning else {
                throw StartError(description: "\(executable) on port \(port) exited (see \(directory))")
            }
            if ready(port) {
                return
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw StartError(description: "\(executable) on port \(port) did not answer PING within 10 s")
    }

    // MARK: Stopping and restarting

    /// Stops the server with SIGTERM (SIGKILL after 5 s) and waits until it has exited.
    func stop() async {
        await self.terminate(signal: SIGTERM)
    }

    /// Kills the server with SIGKILL (no shutdown work, sockets reset) and waits until it has exited.
    func kill() async {
        await self.terminate(signal: SIGKILL)
    }

    /// Stops the process with SIGSTOP, as a hung host: the kernel still accepts connections into its
    /// listen backlog, but nothing is answered. ``resume()`` (or ``kill()``) ends it.
    func pause() {
        self.process.withLock { $0 }?.signal(SIGSTOP)
    }

    /// Continues a process stopped with ``pause()``.
    func resume() {
        self.process.withLock { $0 }?.signal(SIGCONT)
    }

    /// Starts the server again on the same port, with the same arguments and directory, after stopping it if it
    /// still runs; returns once it answers `PING`.
    func restart() async throws {
        await self.stop()
        var lastError: (any Error)?
        // Right after a stop the port can still be briefly in use; retry within the deadline.
        for _ in 0..<20 {
            let process = try Self.launch(
                executable: self.executable,
                arguments: self.arguments,
                directory: self.directory
            )
            self.process.withLock { $0 = process }
            do {
                try await Self.waitUntilReady(
                    process,
                    port: self.port,
                    executable: self.executable,
                    directory: self.directory
                )
                return
            } catch {
                lastError = error
                await self.stop()
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        throw lastError ?? StartError(description: "could not restart \(self.executable) on port \(self.port)")
    }

    private func terminate(signal: Int32) async {
        guard let process = self.process.withLock({ $0 }) else {
            return
        }
        await Self.terminate(process, signal: signal)
    }

    /// Sends `signal`, escalates to SIGKILL after 5 s, and waits until the process has exited.
    private static func terminate(_ process: ChildProcess, signal: Int32) async {
        process.signal(signal)
        let killDeadline = ContinuousClock.now + .seconds(5)
        var killed = signal == SIGKILL
        while process.isRunning {
            if !killed, ContinuousClock.now >= killDeadline {
                process.signal(SIGKILL)
                killed = true
            }
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    // MARK: Helpers

    static func makeTemporaryDirectory() throws -> String {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("tg-redis-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// A port that was free a moment ago: bind 127.0.0.1:0, read the port, close.
    static func freeLoopbackPort() throws -> Int {
        let socketFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard socketFD >= 0 else {
            throw StartError(description: "socket() failed: \(errno)")
        }
        defer { close(socketFD) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(socketFD, pointer, length) == 0 && getsockname(socketFD, pointer, &length) == 0
            }
        }
        guard bound else {
            throw StartError(description: "bind() failed: \(errno)")
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// One blocking `PING` over a fresh loopback connection (connect and read are bounded by 1 s timeouts); true
    /// when the server answers `PONG` (or `NOAUTH`, when it requires a password).
    static func pingSucceeds(port: Int) -> Bool {
        let socketFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard socketFD >= 0 else {
            return false
        }
        defer { close(socketFD) }
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(socketFD, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(socketFD, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socketFD, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        guard connected else {
            return false
        }
        let request = Array("PING\r\n".utf8)
        guard send(socketFD, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else {
            return false
        }
        var reply = [UInt8](repeating: 0, count: 64)
        let count = recv(socketFD, &reply, reply.count, 0)
        // A server with `requirepass` answers `-NOAUTH …`: it is up and serving.
        return count >= 5 && (reply[0..<5] == Array("+PONG".utf8)[...] || reply[0..<7] == Array("-NOAUTH".utf8)[...])
    }
}

/// A child process started with `posix_spawn`, with a clean signal mask: threads of the test process block most
/// signals, and a child started by `Foundation.Process` inherits that mask (so it would ignore SIGTERM).
private final class ChildProcess: Sendable {
    let pid: pid_t
    private let exited = Mutex(false)

    /// `directory` is passed to the server with `--dir`; the child keeps the test process's working directory.
    init(executable: String, arguments: [String], directory: String) throws {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var defaultSignals = sigset_t()
        sigemptyset(&defaultSignals)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD] {
            sigaddset(&defaultSignals, signal)
        }
        posix_spawnattr_setsigdefault(&attributes, &defaultSignals)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        posix_spawn_file_actions_addopen(&fileActions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 2, "/dev/null", O_WRONLY, 0)

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, executable, &fileActions, &attributes, argv, environ)
        guard result == 0 else {
            throw RedisServerProcess.StartError(description: "posix_spawn \(executable) failed: \(result)")
        }
        self.pid = pid
        liveProcesses.withLock { _ = $0.insert(pid) }
    }

    /// Whether the process still runs (reaps it once it has exited).
    var isRunning: Bool {
        self.exited.withLock { exited in
            if !exited {
                var status: Int32 = 0
                let result = waitpid(self.pid, &status, WNOHANG)
                if result == self.pid || (result == -1 && errno == ECHILD) {
                    exited = true
                    liveProcesses.withLock { _ = $0.remove(self.pid) }
                }
            }
            return !exited
        }
    }

    func signal(_ signal: Int32) {
        if self.isRunning {
            kill(self.pid, signal)
        }
    }
}

/// Every server process still running, killed when the test process exits.
private let liveProcesses: Mutex<Set<pid_t>> = {
    atexit {
        let pids = liveProcesses.withLock { $0 }
        for pid in pids {
            kill(pid, SIGKILL)
        }
    }
    return Mutex([])
}()
