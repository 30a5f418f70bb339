import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import TokenGateway

/// Helpers for the security tests.
enum Security {
    /// Waits until `condition` holds, checking every 10 ms, for at most `deadline`.
    static func eventually(
        within deadline: Duration = .seconds(10), _ condition: @Sendable () async throws -> Bool
    ) async throws -> Bool {
        let end = ContinuousClock.now + deadline
        while ContinuousClock.now < end {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        return try await condition()
    }

    /// Every key of an installation in the store (SCAN on its hash tag, never KEYS).
    static func keys(of installation: EmulatedInstallation, in redis: RedisClient, prefix: String = "tg") async throws
        -> [String]
    {
        try await self.scan(pattern: "\(prefix):{\(installation.id)}*", in: redis)
    }

    /// Every key matching `pattern`, with SCAN.
    static func scan(pattern: String, in redis: RedisClient) async throws -> [String] {
        var cursor = "0"
        var out: Set<String> = []
        repeat {
            let reply = try await redis.send(["SCAN", cursor, "MATCH", pattern, "COUNT", "1000"])
            guard let parts = reply.array, parts.count == 2, let next = parts[0].string else { break }
            for name in parts[1].array ?? [] { if let s = name.string { out.insert(s) } }
            cursor = next
        } while cursor != "0"
        return out.sorted()
    }

    /// Every value held under `key` as text (strings, hash fields and values, set, sorted-set and
    /// list members), whatever its type.
    static func values(of key: String, in redis: RedisClient) async throws -> [String] {
        let type = try await redis.send(["TYPE", key]).string ?? "none"
        let reply: RedisValue
        switch type {
        case "string": reply = try await redis.send(["GET", key])
        case "hash": reply = try await redis.send(["HGETALL", key])
        case "set": reply = try await redis.send(["SMEMBERS", key])
        case "zset": reply = try await redis.send(["ZRANGE", key, "0", "-1"])
        case "list": reply = try await redis.send(["LRANGE", key, "0", "-1"])
        default: return []
        }
        if let items = reply.array { return items.map { $0.string ?? String(decoding: $0.bytes, as: UTF8.self) } }
        return [reply.string ?? String(decoding: reply.bytes, as: UTF8.self)]
    }

    /// The installation's state in the store, for "nothing changed" assertions: every key with its
    /// values (sorted), excluding the lease and pending keys of round trips in flight.
    /// The installation's keys once no round trip is in flight: a caller is answered as soon as its
    /// token is stored, and the round trip's lease and pending request are let go just after.
    static func settledSnapshot(of installation: EmulatedInstallation, in redis: RedisClient) async throws
        -> [String: [String]]
    {
        let settled = try await self.eventually {
            try await self.keys(of: installation, in: redis).allSatisfy {
                !$0.hasSuffix(":lease") && !$0.contains(":pending:")
            }
        }
        #expect(settled, "a round trip of \(installation.id) is still in flight")
        return try await self.snapshot(of: installation, in: redis)
    }

    static func snapshot(of installation: EmulatedInstallation, in redis: RedisClient) async throws -> [String:
        [String]]
    {
        var out: [String: [String]] = [:]
        for key in try await self.keys(of: installation, in: redis) {
            out[key] = try await self.values(of: key, in: redis).sorted()
        }
        // Its place in the installations index (what the listing and the status page read).
        let indexed = try await redis.send(["ZSCORE", "tg:installations", installation.id])
        if let score = indexed.string { out["tg:installations"] = [score] }
        return out
    }

    /// Lowercase hex.
    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { String(format: "%02x", $0) }.joined()
    }

    /// Percent-encodes everything but unreserved characters.
    static func encoded(_ s: String) -> String {
        s.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~")))!
    }
}

extension RedisValue {
    fileprivate var bytes: [UInt8] {
        if case .bulk(let b) = self { return b }
        return []
    }
}

/// A TCP listener on a loopback port that counts the connections it accepts and either closes each
/// at once (proof that something did or did not contact it) or holds each open, never answering,
/// until it is stopped (an upstream whose call can only end by the caller's own timeout).
final class LoopbackListener: Sendable {
    let channel: any Channel
    private let accepted: Accepted

    final class Accepted: Sendable {
        let count = Atomic<Int>(0)
        let held = Mutex<[any Channel]>([])
        /// Told of every connection accepted.
        let signal = ChangeSignal()

        func accept() {
            self.count.add(1, ordering: .relaxed)
            self.signal.changed()
        }
    }

    var port: Int { self.channel.localAddress?.port ?? 0 }
    /// Connections accepted so far.
    var connections: Int { self.accepted.count.load(ordering: .relaxed) }

    /// Waits (woken by each connection accepted) until at least `count` were; false when `timeout`
    /// passes first.
    func waitForConnections(_ count: Int, within timeout: Duration = .seconds(30)) async -> Bool {
        await self.accepted.signal.wait(within: timeout) { self.connections >= count }
    }
    /// `http://127.0.0.1:<port>`.
    var baseURL: String { "http://127.0.0.1:\(self.port)" }

    private init(channel: any Channel, accepted: Accepted) {
        self.channel = channel
        self.accepted = accepted
    }

    /// - Parameter holding: hold every connection open (true) or close each at once (false).
    static func start(holding: Bool) async throws -> LoopbackListener {
        let accepted = Accepted()
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { child in
                accepted.accept()
                guard holding else { return child.close() }
                accepted.held.withLock { $0.append(child) }
                return child.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return LoopbackListener(channel: channel, accepted: accepted)
    }

    /// Closes every held connection (their callers see the connection end) and the listener.
    func stop() async {
        for child in self.accepted.held.withLock({ $0 }) { try? await child.close() }
        try? await self.channel.close()
    }
}

extension LoopbackListener {
    /// Writes `answer` once the first bytes of a request arrived, then closes (or, with `hold`,
    /// keeps the connection open without another byte).
    final class FixedAnswer: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let answer: String
        let hold: Bool
        let answered = Atomic<Bool>(false)
        init(_ answer: String, hold: Bool = false) {
            self.answer = answer
            self.hold = hold
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard !self.answered.exchange(true, ordering: .relaxed) else { return }
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            let hold = self.hold
            context.writeAndFlush(NIOAny(ByteBuffer(string: self.answer))).whenComplete { _ in
                if !hold { loopBound.value.close(promise: nil) }
            }
        }
    }

    /// A listener that answers every request with `answer` (a whole HTTP/1.1 answer) and closes;
    /// with `hold`, `answer` is the start of an answer (a head promising more body than it sends)
    /// and the connection stays open, sending nothing more, until the listener is stopped.
    static func start(answering answer: String, hold: Bool = false) async throws -> LoopbackListener {
        let accepted = Accepted()
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { child in
                accepted.accept()
                if hold { accepted.held.withLock { $0.append(child) } }
                return child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.addHandler(FixedAnswer(answer, hold: hold))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return LoopbackListener(channel: channel, accepted: accepted)
    }
}

/// A listener that closes every connection at once and counts them.
enum ConnectionRecorder {
    static func start() async throws -> LoopbackListener { try await LoopbackListener.start(holding: false) }
}

/// A listener that holds every connection open, never answering, until it is stopped.
enum HoldingServer {
    static func start() async throws -> LoopbackListener { try await LoopbackListener.start(holding: true) }
}

/// Sends raw bytes to a loopback port and collects everything the server answers until it closes
/// the connection (or `timeout` passes): for requests no HTTP client would send.
enum RawHTTP {
    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received = Mutex<[UInt8]>([])
        let closed: EventLoopPromise<Void>

        init(closed: EventLoopPromise<Void>) { self.closed = closed }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = self.unwrapInboundIn(data)
            self.received.withLock { $0.append(contentsOf: buffer.readableBytesView) }
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.closed.succeed(())
            context.fireChannelInactive()
        }
    }

    static func send(_ bytes: [UInt8], port: Int, timeout: Duration = .seconds(10)) async throws -> String {
        try await self.exchange(bytes, port: port, timeout: timeout).received
    }

    /// ``send(_:port:timeout:)``, also telling whether the server closed the connection (false
    /// when `timeout` passed first and this side closed it).
    static func exchange(_ bytes: [UInt8], port: Int, timeout: Duration = .seconds(10)) async throws -> (
        received: String, closedByServer: Bool
    ) {
        let group = MultiThreadedEventLoopGroup.singleton
        let closed = group.next().makePromise(of: Void.self)
        let collector = Collector(closed: closed)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        // The server may answer and stop reading before everything is written (an oversized
        // head): its answer still counts.
        try? await channel.writeAndFlush(ByteBuffer(bytes: bytes))
        let timedOut = Mutex(false)
        let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
            timedOut.withLock { $0 = true }
            channel.close(promise: nil)
        }
        try await closed.futureResult.get()
        timer.cancel()
        return (
            String(decoding: collector.received.withLock { $0 }, as: UTF8.self), !timedOut.withLock { $0 }
        )
    }
}

extension RawHTTP {
    /// A parsed raw answer.
    struct Answer: Sendable {
        let raw: String
        var status: Int {
            let line = self.raw.split(separator: "\r\n", maxSplits: 1).first ?? ""
            let parts = line.split(separator: " ")
            return parts.count >= 2 ? Int(parts[1]) ?? 0 : 0
        }
        var body: String {
            guard let range = self.raw.range(of: "\r\n\r\n") else { return "" }
            return String(self.raw[range.upperBound...])
        }
        var errorCode: String? {
            let json = (try? JSONSerialization.jsonObject(with: Data(self.body.utf8))) as? [String: Any]
            return (json?["error"] as? [String: Any])?["code"] as? String
        }
    }

    /// One request written by hand (`Connection: close`), its answer read to the end.
    static func request(
        _ method: String, _ target: String, headers: [(String, String)] = [], body: [UInt8] = [], port: Int
    ) async throws -> Answer {
        var head = "\(method) \(target) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        if !body.isEmpty { head += "Content-Length: \(body.count)\r\n" }
        head += "\r\n"
        return Answer(raw: try await self.send(Array(head.utf8) + body, port: port))
    }
}
