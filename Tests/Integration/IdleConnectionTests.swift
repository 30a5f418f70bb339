import FlowEngine
import ForgeEmulator
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import TokenGateway

/// `TOKEN_GATEWAY_HTTP_IDLE_TIMEOUT_MS`: a client connection that sends nothing while no answer is
/// due to it is closed; one waiting for its answer is not.
@Suite("HTTP: idle client connections")
struct IdleConnectionTests {
    static let closed = "token_gateway_http_idle_connections_closed_total"

    @Test(
        "a connection silent mid-head, mid-body or between requests is closed; a caller waiting for its token is not")
    func idleClientsAreClosed() async throws {
        try await GatewayHarness.run(configure: { $0.httpIdleTimeout = .seconds(1) }) { h in
            let port = try FastAnswerTests.port(h.gatewayURL)
            // Half a head, then nothing: closed by the gateway (the client would give up after 30 s).
            let head = try await RawHTTP.exchange(
                Array("GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n".utf8), port: port, timeout: .seconds(30))
            #expect(head.closedByServer && head.received.isEmpty)
            // A body that stops after 10 of its 100 bytes: closed, and nothing was answered.
            let body = try await RawHTTP.exchange(
                Array(
                    ("POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                        + "Content-Length: 100\r\n\r\ngrant_type").utf8), port: port, timeout: .seconds(30))
            #expect(body.closedByServer && body.received.isEmpty)
            // A kept-alive connection after its answer (a fast one): closed.
            let kept = try await RawHTTP.exchange(
                Array(FastAnswerTests.get("/health/live", keepAlive: true).utf8), port: port, timeout: .seconds(30))
            #expect(kept.closedByServer)
            #expect(kept.received.hasPrefix("HTTP/1.1 200"), "\(kept.received.prefix(200))")
            // Counted (the test's own HTTP client, idle between calls, may add to it).
            #expect(try await SameTokenRoundTripTests.sample(h, Self.closed) >= 3)
            let logged = h.allLogs.split(separator: "\n").filter {
                $0.contains("sent nothing for the idle timeout") && $0.contains("http.request_incomplete=true")
            }
            #expect(logged.count == 1, "the stalled body (the half head had no request yet)")

            // A caller whose token takes longer than the idle timeout (the delivery comes 2 s
            // after the trigger call) gets it: its connection is not closed while it waits.
            let installation = try await h.installed()
            h.emulator.setFault(.deliverLate(.seconds(2)), for: installation)
            let waited = try await RawHTTP.exchange(
                Array(FastAnswerTests.get(GatewayHarness.path(installation) + "/token", close: true).utf8), port: port,
                timeout: .seconds(30))
            #expect(waited.received.hasPrefix("HTTP/1.1 200"), "\(waited.received.prefix(300))")
            #expect(waited.received.contains(#""source":"trigger""#))
        }
    }

    @Test("a client that sends requests and never reads the answers is closed once they have waited the idle timeout")
    func clientNotReadingIsClosed() async throws {
        try await GatewayHarness.run(configure: { $0.httpIdleTimeout = .seconds(1) }) { h in
            let before = try await SameTokenRoundTripTests.sample(h, Self.closed)
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(ChannelOptions.autoRead, value: false)
                .channelOption(ChannelOptions.socketOption(.so_rcvbuf), value: 4096)
                .connect(host: "127.0.0.1", port: try FastAnswerTests.port(h.gatewayURL)).get()
            // Far more pipelined requests for large answers (the metrics page) than the gateway
            // can answer before its answers back up: it stops reading, and this side's writes wait.
            let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            channel.writeAndFlush(ByteBuffer(string: String(repeating: request, count: 20000)), promise: nil)
            // The deadline only: the wait ends when the gateway closes the connection (or, past
            // the deadline, when this side does).
            let timedOut = Mutex(false)
            let deadline = channel.eventLoop.scheduleTask(in: .seconds(30)) {
                timedOut.withLock { $0 = true }
                channel.close(promise: nil)
            }
            try? await channel.closeFuture.get()
            deadline.cancel()
            #expect(!timedOut.withLock { $0 }, "the gateway closed the connection")
            #expect(try await SameTokenRoundTripTests.sample(h, Self.closed) >= before + 1)
            #expect(h.allLogs.contains("read no answer for the idle timeout"))
        }
    }

    @Test(
        "a listener holds at most TOKEN_GATEWAY_MAX_CONNECTIONS connections; the next one is served once one closes",
        .timeLimit(.minutes(1)))
    func connectionCap() async throws {
        try await GatewayHarness.run(configure: { $0.maxConnections = 2 }) { h in
            let port = try FastAnswerTests.port(h.gatewayURL)
            let first = try await KeptConnection.open(port: port)
            let second = try await KeptConnection.open(port: port)
            #expect(try await first.ask("/health/live").hasPrefix("HTTP/1.1 200"))
            #expect(try await second.ask("/health/live").hasPrefix("HTTP/1.1 200"))
            // A third connects (into the listen backlog) and asks: not accepted while both stay open,
            // which are still served meanwhile.
            let third = try await KeptConnection.open(port: port)
            third.send("/health/live")
            #expect(try await first.ask("/health/live").hasPrefix("HTTP/1.1 200"))
            #expect(try await second.ask("/health/live").hasPrefix("HTTP/1.1 200"))
            #expect(third.receivedSoFar.isEmpty)
            try await first.close()
            #expect(try await third.answer().hasPrefix("HTTP/1.1 200"))
            try await second.close()
            try await third.close()
        }
    }

    @Test("the idle time counts from the end of an answer: a request sent right after a long answer is answered")
    func idleCountsFromTheAnswer() async throws {
        try await GatewayHarness.run(configure: { $0.httpIdleTimeout = .seconds(1) }) { h in
            let installation = try await h.installed()
            // The token takes 2 s, twice the idle timeout; the client asks again on the same
            // connection the moment it has the answer.
            h.emulator.setFault(.deliverLate(.seconds(2)), for: installation)
            let first = FastAnswerTests.get(GatewayHarness.path(installation) + "/token", keepAlive: true)
            let received = try await Self.askAgainOnAnswer(
                first, then: FastAnswerTests.get("/health/live", close: true),
                port: try FastAnswerTests.port(h.gatewayURL))
            let answers = received.components(separatedBy: "HTTP/1.1 ").filter { !$0.isEmpty }
            #expect(answers.count == 2, "\(received.prefix(600))")
            #expect(answers.first?.hasPrefix("200") == true)
            #expect(answers.last?.hasPrefix("200") == true)
        }
    }

    @Test("a body trickled a byte at a time is cut off once the idle timeout has passed since its head")
    func trickledBodyIsCutOff() async throws {
        try await GatewayHarness.run(configure: { $0.httpIdleTimeout = .seconds(1) }) { h in
            let head =
                "POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                + "Content-Length: 100\r\n\r\n"
            // One byte every 200 ms: each comes well within the idle timeout of the one before.
            let trickle = try await Self.trickle(
                head: head, body: Array(repeating: UInt8(ascii: "a"), count: 100), every: .milliseconds(200),
                port: try FastAnswerTests.port(h.gatewayURL))
            #expect(trickle.closedByServer)
            #expect(trickle.bodyBytesSent < 100, "\(trickle.bodyBytesSent)")
            #expect(trickle.received.isEmpty, "\(String(decoding: trickle.received, as: UTF8.self))")
            let logged = h.allLogs.split(separator: "\n").filter {
                $0.contains("sent nothing for the idle timeout") && $0.contains("http.request_incomplete=true")
            }
            #expect(logged.count == 1)
        }
    }

    /// Sends `head` at once, then `body` one byte every `every` until it is all sent or the server
    /// closes the connection (a bounded loop: one byte per step).
    static func trickle(head: String, body: [UInt8], every: Duration, port: Int) async throws
        -> (closedByServer: Bool, bodyBytesSent: Int, received: [UInt8])
    {
        final class Watcher: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            let received = Mutex<[UInt8]>([])
            let closed = Atomic(false)
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                let bytes = Array(self.unwrapInboundIn(data).readableBytesView)
                self.received.withLock { $0.append(contentsOf: bytes) }
            }
            func channelInactive(context: ChannelHandlerContext) {
                self.closed.store(true, ordering: .sequentiallyConsistent)
            }
        }
        let watcher = Watcher()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(watcher) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        try await channel.writeAndFlush(ByteBuffer(string: head))
        var sent = 0
        for byte in body {
            try await Task.sleep(for: every)
            if watcher.closed.load(ordering: .sequentiallyConsistent) { break }
            try? await channel.writeAndFlush(ByteBuffer(bytes: [byte]))
            sent += 1
        }
        let closedByServer = watcher.closed.load(ordering: .sequentiallyConsistent)
        try? await channel.close()
        return (closedByServer, sent, watcher.received.withLock { $0 })
    }

    /// Writes `first`, and `second` on the same connection as soon as the answer to `first` is in
    /// (its head and `Content-Length` bytes of body); returns everything received once the server
    /// closed the connection (or 30 s passed).
    static func askAgainOnAnswer(_ first: String, then second: String, port: Int) async throws -> String {
        final class Asker: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            typealias OutboundOut = ByteBuffer
            let second: String
            let received = Mutex<[UInt8]>([])
            let sent = Mutex(false)
            let closed: EventLoopPromise<Void>
            init(second: String, closed: EventLoopPromise<Void>) {
                self.second = second
                self.closed = closed
            }
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                let bytes = Array(self.unwrapInboundIn(data).readableBytesView)
                let text = self.received.withLock { all -> String in
                    all.append(contentsOf: bytes)
                    return String(decoding: all, as: UTF8.self)
                }
                guard !self.sent.withLock({ $0 }), let end = text.range(of: "\r\n\r\n") else { return }
                let length =
                    text[..<end.lowerBound].split(separator: "\r\n")
                    .first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
                guard text[end.upperBound...].utf8.count >= length else { return }
                self.sent.withLock { $0 = true }
                context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: self.second)), promise: nil)
            }
            func channelInactive(context: ChannelHandlerContext) {
                self.closed.succeed(())
            }
        }
        let group = MultiThreadedEventLoopGroup.singleton
        let closed = group.next().makePromise(of: Void.self)
        let asker = Asker(second: second, closed: closed)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(asker) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        try await channel.writeAndFlush(ByteBuffer(string: first))
        let timer = channel.eventLoop.scheduleTask(in: .seconds(30)) { channel.close(promise: nil) }
        try await closed.futureResult.get()
        timer.cancel()
        return String(decoding: asker.received.withLock { $0 }, as: UTF8.self)
    }
}

/// A kept-alive raw connection that asks for one answer at a time (small fast answers).
final class KeptConnection: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer

    private struct State {
        var bytes: [UInt8] = []
        var closed = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())
    private let channel = Mutex<(any Channel)?>(nil)

    static func open(port: Int) async throws -> KeptConnection {
        let connection = KeptConnection()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(connection) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        connection.channel.withLock { $0 = channel }
        return connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = Array(self.unwrapInboundIn(data).readableBytesView)
        self.wake { $0.bytes += bytes }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.wake { $0.closed = true }
    }

    private func wake(_ change: (inout State) -> Void) {
        let waiter = self.state.withLock { state in
            change(&state)
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    func send(_ path: String) {
        let request = ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.channel.withLock { $0 }?.writeAndFlush(request, promise: nil)
    }

    /// Bytes received and not yet taken by ``answer()`` (what has arrived by now, without waiting).
    var receivedSoFar: [UInt8] { self.state.withLock { $0.bytes } }

    /// The next answer: the bytes up to the end of a `{…}` body (fast answers hold no `}` inside);
    /// what is left if the connection closes first.
    func answer() async throws -> String {
        while true {
            let taken = self.state.withLock { state -> String? in
                if let end = state.bytes.firstIndex(of: UInt8(ascii: "}")) {
                    defer { state.bytes.removeFirst(end + 1) }
                    return String(decoding: state.bytes[...end], as: UTF8.self)
                }
                return state.closed ? String(decoding: state.bytes, as: UTF8.self) : nil
            }
            if let taken { return taken }
            await withCheckedContinuation { continuation in
                let ready = self.state.withLock { state -> Bool in
                    if state.closed || state.bytes.contains(UInt8(ascii: "}")) { return true }
                    state.waiter = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
        }
    }

    func ask(_ path: String) async throws -> String {
        self.send(path)
        return try await self.answer()
    }

    func close() async throws { try await self.channel.withLock { $0 }?.close() }
}
