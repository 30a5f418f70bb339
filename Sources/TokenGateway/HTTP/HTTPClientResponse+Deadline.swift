import AsyncHTTPClient
import NIOCore

extension HTTPClientResponse.Body {
    /// The whole body, up to `maxBytes`, read before `deadline`. AsyncHTTPClient's own deadline
    /// ends once the answer's head has arrived; a body still coming at `deadline` (a server that
    /// sends its head and then trickles or holds the rest) ends the read with
    /// `HTTPClientError.deadlineExceeded`, and the request is cancelled (its connection closed).
    ///
    /// - Throws: `HTTPClientError.deadlineExceeded`, `NIOTooManyBytesError` over `maxBytes`, or the
    ///   read's own error.
    func collect(upTo maxBytes: Int, before deadline: ContinuousClock.Instant) async throws -> ByteBuffer {
        try await withThrowingTaskGroup(of: ByteBuffer?.self) { group in
            group.addTask { try await self.collect(upTo: maxBytes) }
            group.addTask {
                try await Task.sleep(until: deadline, clock: .continuous)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let buffer = first else {
                throw HTTPClientError.deadlineExceeded
            }
            return buffer
        }
    }
}
