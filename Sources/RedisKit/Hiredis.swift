import CHiredis
import NIOCore

// The only file that touches hiredis's C API. Pointer lifetimes:
// - `RedisReplyParser.reader` is created in `init` and freed in `deinit`; the parser is a non-Sendable class
//   owned by exactly one channel handler, so it is only ever used on that channel's event loop.
// - A `redisReply *` handed out by `redisReaderGetReply` is converted to a `RedisValue` and freed before
//   `next()` returns; no pointer into it escapes.
// - A command buffer from `redisFormatCommandArgv` is copied into a `ByteBuffer` and freed before `encode` returns.

/// Incremental RESP2 parser backed by hiredis's `redisReader`: feed bytes in arbitrary pieces, take complete
/// replies out.
final class RedisReplyParser {
    private let reader: UnsafeMutablePointer<redisReader>

    init() {
        guard let reader = redisReaderCreate() else {
            fatalError("hiredis could not allocate a reply reader (out of memory)")
        }
        self.reader = reader
    }

    deinit {
        redisReaderFree(self.reader)
    }

    /// Appends received bytes; hiredis copies them into its own buffer.
    func feed(_ bytes: UnsafeRawBufferPointer) throws(RedisError) {
        guard let base = bytes.baseAddress, bytes.count > 0 else {
            return
        }
        guard redisReaderFeed(self.reader, base.assumingMemoryBound(to: CChar.self), bytes.count) == REDIS_OK else {
            throw .protocolError
        }
    }

    /// Appends the readable bytes of `buffer` without consuming them.
    func feed(_ buffer: ByteBuffer) throws(RedisError) {
        let result = buffer.withUnsafeReadableBytes { bytes in
            Result { () throws(RedisError) in try self.feed(bytes) }
        }
        try result.get()
    }

    /// Appends bytes from an array.
    func feed(_ bytes: [UInt8]) throws(RedisError) {
        let result = bytes.withUnsafeBytes { bytes in
            Result { () throws(RedisError) in try self.feed(bytes) }
        }
        try result.get()
    }

    /// The next complete reply, or `nil` when more bytes are needed.
    ///
    /// - Throws: ``RedisError/protocolError`` when the bytes are not valid RESP; the parser is unusable afterwards.
    func next() throws(RedisError) -> RedisValue? {
        var replyPointer: UnsafeMutableRawPointer?
        guard redisReaderGetReply(self.reader, &replyPointer) == REDIS_OK else {
            throw .protocolError
        }
        guard let replyPointer else {
            return nil
        }
        defer { freeReplyObject(replyPointer) }
        return Self.value(of: replyPointer.assumingMemoryBound(to: redisReply.self))
    }

    /// Converts a hiredis reply tree (nesting is bounded by hiredis's reader) into a Swift value.
    private static func value(of reply: UnsafePointer<redisReply>) -> RedisValue {
        let reply = reply.pointee
        switch reply.type {
        case REDIS_REPLY_STRING:
            return .bulk(Self.bytes(reply.str, reply.len))
        case REDIS_REPLY_STATUS:
            return .status(String(decoding: Self.bytes(reply.str, reply.len), as: UTF8.self))
        case REDIS_REPLY_ERROR:
            return .error(String(decoding: Self.bytes(reply.str, reply.len), as: UTF8.self))
        case REDIS_REPLY_INTEGER:
            return .integer(Int64(reply.integer))
        case REDIS_REPLY_ARRAY:
            guard let elements = reply.element else {
                return .array([])
            }
            return .array(
                (0..<reply.elements).map { index in
                    guard let element = elements[index] else {
                        return .null
                    }
                    return Self.value(of: element)
                })
        default:
            // REDIS_REPLY_NIL: a null bulk string or a null array.
            return .null
        }
    }

    private static func bytes(_ pointer: UnsafeMutablePointer<CChar>?, _ count: Int) -> [UInt8] {
        guard let pointer, count > 0 else {
            return []
        }
        return Array(UnsafeRawBufferPointer(start: pointer, count: count))
    }
}

/// Formats commands as RESP multi-bulk requests with hiredis's `redisFormatCommandArgv` (binary-safe).
enum RedisCommandEncoder {
    /// Appends `command` (non-empty) to `buffer`.
    static func encode(_ command: [String], into buffer: inout ByteBuffer) {
        precondition(!command.isEmpty, "a Redis command needs at least its name")
        // All arguments in one contiguous array, plus a trailing zero so the storage is never empty.
        var storage: [UInt8] = []
        var offsets: [Int] = []
        var lengths: [Int] = []
        offsets.reserveCapacity(command.count)
        lengths.reserveCapacity(command.count)
        for argument in command {
            offsets.append(storage.count)
            storage.append(contentsOf: argument.utf8)
            lengths.append(storage.count - offsets[offsets.count - 1])
        }
        storage.append(0)

        storage.withUnsafeBufferPointer { storage in
            let base = UnsafeRawPointer(storage.baseAddress!).assumingMemoryBound(to: CChar.self)
            var argv: [UnsafePointer<CChar>?] = offsets.map { base + $0 }
            var formatted: UnsafeMutablePointer<CChar>?
            let length = redisFormatCommandArgv(&formatted, Int32(command.count), &argv, lengths)
            guard length >= 0, let formatted else {
                fatalError("hiredis could not format a command (out of memory)")
            }
            defer { redisFreeCommand(formatted) }
            buffer.writeBytes(UnsafeRawBufferPointer(start: formatted, count: Int(length)))
        }
    }
}
