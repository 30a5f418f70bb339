import NIOCore
import Testing

@testable import RedisKit

@Suite struct RedisValueTests {
    /// Feeds `bytes` split into the given pieces and returns every complete reply.
    static func parse(_ pieces: [ArraySlice<UInt8>]) throws -> [RedisValue] {
        let parser = RedisReplyParser()
        var replies: [RedisValue] = []
        for piece in pieces {
            try parser.feed(Array(piece))
            while let reply = try parser.next() {
                replies.append(reply)
            }
        }
        return replies
    }

    static func parse(_ text: String) throws -> [RedisValue] {
        try self.parse([Array(text.utf8)[...]])
    }

    static let mixedReplies =
        "+OK\r\n-ERR wrong type\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n"
        + "*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n*1\r\n*1\r\n+deep\r\n"
    static let mixedValues: [RedisValue] = [
        .status("OK"),
        .error("ERR wrong type"),
        .integer(-42),
        .bulk(Array("hello".utf8)),
        .null,
        .null,
        .array([]),
        .bulk([]),
        .array([.integer(1), .array([.bulk([97]), .null]), .array([.array([.status("deep")])])]),
    ]

    @Test func parsesEveryReplyType() throws {
        #expect(try Self.parse(Self.mixedReplies) == Self.mixedValues)
    }

    @Test func parsesRepliesSplitAtEveryByte() throws {
        let bytes = Array(Self.mixedReplies.utf8)
        for split in 0...bytes.count {
            #expect(try Self.parse([bytes[..<split], bytes[split...]]) == Self.mixedValues, "split at \(split)")
        }
        #expect(try Self.parse(bytes.map { [$0][...] }) == Self.mixedValues)
    }

    @Test func parsesA200KilobyteBulkFedInUnevenPieces() throws {
        let payload = (0..<200 * 1024).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let bytes = Array("$\(payload.count)\r\n".utf8) + payload + Array("\r\n:7\r\n".utf8)
        var pieces: [ArraySlice<UInt8>] = []
        var start = 0
        var size = 1
        while start < bytes.count {
            let end = min(start + size, bytes.count)
            pieces.append(bytes[start..<end])
            start = end
            size = size * 3 % 9001 + 1
        }
        #expect(pieces.count > 20)
        #expect(try Self.parse(pieces) == [.bulk(payload), .integer(7)])
    }

    @Test func keepsBinaryBulkBytes() throws {
        let bytes: [UInt8] = Array("$4\r\n".utf8) + [0x00, 0xFF, 0x0D, 0x0A] + Array("\r\n".utf8)
        let replies = try Self.parse([bytes[...]])
        #expect(replies == [.bulk([0x00, 0xFF, 0x0D, 0x0A])])
        #expect(replies.first?.string == nil)
    }

    @Test func reportsIncompleteInputAsNoReplyYet() throws {
        let parser = RedisReplyParser()
        try parser.feed(Array("*2\r\n$3\r\nfoo\r\n".utf8))
        #expect(try parser.next() == nil)
        try parser.feed(Array(":1\r\n".utf8))
        #expect(try parser.next() == .array([.bulk(Array("foo".utf8)), .integer(1)]))
        #expect(try parser.next() == nil)
    }

    @Test func rejectsInvalidProtocol() throws {
        let parser = RedisReplyParser()
        try parser.feed(Array("?what\r\n".utf8))
        #expect(throws: RedisError.protocolError) { try parser.next() }
    }

    @Test func feedsFromAByteBuffer() throws {
        let parser = RedisReplyParser()
        var buffer = ByteBuffer(string: "xx+PONG\r\n")
        buffer.moveReaderIndex(forwardBy: 2)
        try parser.feed(buffer)
        #expect(try parser.next() == .status("PONG"))
    }

    @Test func accessorsConvertTheUsualShapes() {
        #expect(RedisValue.bulk(Array("héllo".utf8)).string == "héllo")
        #expect(RedisValue.status("OK").string == "OK")
        #expect(RedisValue.integer(3).string == nil)
        #expect(RedisValue.error("ERR").string == nil)
        #expect(RedisValue.bulk([0xFF]).string == nil)

        #expect(RedisValue.integer(-5).int == -5)
        #expect(RedisValue.bulk(Array("123".utf8)).int == 123)
        #expect(RedisValue.status("9").int == 9)
        #expect(RedisValue.bulk(Array("12a".utf8)).int == nil)
        #expect(RedisValue.null.int == nil)

        #expect(RedisValue.array([.null]).array == [.null])
        #expect(RedisValue.null.array == nil)
        #expect(RedisValue.bulk([]).array == nil)

        #expect(RedisValue.null.isNull)
        #expect(!RedisValue.bulk([]).isNull)
        #expect(!RedisValue.array([]).isNull)
    }

    @Test func encodesCommandsAsBinarySafeMultiBulk() {
        var buffer = ByteBuffer()
        RedisCommandEncoder.encode(["SET", "k€y", ""], into: &buffer)
        RedisCommandEncoder.encode(["PING"], into: &buffer)
        #expect(
            String(buffer: buffer) == "*3\r\n$3\r\nSET\r\n$5\r\nk€y\r\n$0\r\n\r\n*1\r\n$4\r\nPING\r\n"
        )
    }

    @Test func encodedCommandsParseBackToTheArguments() throws {
        let arguments = ["EVAL", "return {KEYS[1], ARGV[1]}", "1", "tg:{a}:x", String(repeating: "v", count: 70_000)]
        var buffer = ByteBuffer()
        RedisCommandEncoder.encode(arguments, into: &buffer)
        let parser = RedisReplyParser()
        try parser.feed(buffer)
        #expect(try parser.next() == .array(arguments.map { .bulk(Array($0.utf8)) }))
    }

    @Test func errorsCompareByKindAndServerMessage() {
        #expect(RedisError.unavailable == .unavailable)
        #expect(RedisError.unavailable != .timeout)
        #expect(RedisError.server("ERR a") == .server("ERR a"))
        #expect(RedisError.server("ERR a") != .server("ERR b"))
        #expect(RedisError.server("NOSCRIPT No matching script.").isServerError)
        #expect(RedisError.server("NOSCRIPT No matching script.").serverErrorPrefix == "NOSCRIPT")
        #expect(!RedisError.timeout.isServerError)
        #expect(RedisError.timeout.serverMessage == nil)
        let echoed = RedisError.server("ERR unknown command 'foo', with args beginning with: 'secret-token' ")
        #expect(!echoed.description.contains("secret-token"))
        #expect(echoed.serverMessage?.contains("secret-token") == true)
    }
}

@Suite struct RedisReadOnlyReplyTests {
    @Test("a replica's refusal is recognised as such, also raised inside a script (Redis 6)")
    func readOnly() {
        let refusals = [
            "READONLY You can't write against a read only replica.",
            "ERR Error running script (call to f_0123456789abcdef0123456789abcdef01234567): @user_script:3: "
                + "@user_script: 3: -READONLY You can't write against a read only replica.",
        ]
        for message in refusals { #expect(RedisError.isReadOnlyReply(.error(message)), "\(message)") }
        let others: [RedisValue] = [
            .error("ERR unknown command"), .error("ERR Error running script (call to f_x): @user_script:1: boom"),
            .error("WRONGTYPE READONLY-looking value"), .status("READONLY"), .bulk(Array("READONLY".utf8)),
        ]
        for reply in others { #expect(!RedisError.isReadOnlyReply(reply), "\(reply)") }
    }
}
