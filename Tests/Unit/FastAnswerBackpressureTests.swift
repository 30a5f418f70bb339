import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Counts the reads that pass it on their way to the channel.
private final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = NIOAny
    var reads = 0

    func read(context: ChannelHandlerContext) {
        self.reads += 1
        context.read()
    }
}

@Suite("Fast answers: backpressure")
struct FastAnswerBackpressureTests {
    static func handler() -> FastAnswerHandler {
        FastAnswerHandler(serverName: "token-gateway", logger: Logger(label: "test")) { _ in
            FastAnswer(
                fields: [("Content-Type", "application/json")], body: ByteBuffer(string: #"{"status":"ok"}"#),
                route: "/health/live")
        }
    }

    @Test("a connection whose answers wait unread reads no more requests until they drain")
    func readsWaitForWritability() throws {
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        let counter = ReadCounter()
        try channel.pipeline.syncOperations.addHandlers([counter, Self.handler()])
        channel.pipeline.read()
        #expect(counter.reads == 1)

        // A pipelined request is answered at once, whatever the client reads.
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/health/live")
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(try channel.readOutbound(as: HTTPServerResponsePart.self) != nil)
        while try channel.readOutbound(as: HTTPServerResponsePart.self) != nil {}

        // Its answers are past the high watermark: reads are held, however often asked for, and a
        // request already read goes on to the router (which writes only as the client reads).
        channel.isWritable = false
        channel.pipeline.read()
        channel.pipeline.read()
        #expect(counter.reads == 1)
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        #expect(try channel.readOutbound(as: HTTPServerResponsePart.self) == nil)
        guard case .head = try channel.readInbound(as: HTTPServerRequestPart.self) else {
            Issue.record("the request was not passed on")
            return
        }
        channel.pipeline.fireChannelWritabilityChanged()
        #expect(counter.reads == 1, "still not writable")

        // Drained: the held read goes out, once.
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        #expect(counter.reads == 2)
        channel.pipeline.fireChannelWritabilityChanged()
        #expect(counter.reads == 2)
        channel.pipeline.read()
        #expect(counter.reads == 3)
    }
}
