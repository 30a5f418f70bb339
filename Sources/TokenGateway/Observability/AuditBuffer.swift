import Metrics
import ServiceLifecycle
import Synchronization

/// A bounded in-memory queue of formatted audit lines between the request path and the log
/// stream, so a request never waits on `write(2)`: ``AuditFlushService`` writes what has queued up
/// in one `write(2)` per batch.
///
/// Nothing is dropped silently: a line that arrives while the buffer holds ``capacity`` lines is
/// counted in `token_gateway_audit_records_dropped_total` (and ``dropped``). Once the buffer is
/// closed (graceful shutdown, after the HTTP servers have drained) lines are written directly.
public final class AuditBuffer: Sendable {
    /// Lines held at most before new ones are counted as dropped.
    public static let defaultCapacity = 65_536

    /// Lines held at most.
    public let capacity: Int
    /// Where the lines are written.
    let downstream: LogSink
    let droppedCounter: Counter

    private struct State {
        var lines: [String] = []
        var dropped = 0
        var closed = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())

    /// - Parameters:
    ///   - downstream: the sink lines are finally written to.
    ///   - capacity: lines held at most (at least 1).
    ///   - dropped: the counter of lines dropped because the buffer was full.
    public init(downstream: LogSink, capacity: Int = AuditBuffer.defaultCapacity, dropped: Counter) {
        self.downstream = downstream
        self.capacity = max(1, capacity)
        self.droppedCounter = dropped
    }

    /// Lines dropped so far because the buffer was full.
    public var dropped: Int { self.state.withLock { $0.dropped } }

    /// Lines waiting to be written.
    public var pending: Int { self.state.withLock { $0.lines.count } }

    /// Queues one line (written directly once the buffer is closed; counted when it is full).
    func append(_ line: String) {
        enum Outcome {
            case queued(CheckedContinuation<Void, Never>?)
            case dropped, closed
        }
        let outcome = self.state.withLock { state -> Outcome in
            if state.closed { return .closed }
            guard state.lines.count < self.capacity else {
                state.dropped += 1
                return .dropped
            }
            state.lines.append(line)
            let waiter = state.waiter
            state.waiter = nil
            return .queued(waiter)
        }
        switch outcome {
        case .queued(let waiter): waiter?.resume()
        case .dropped: self.droppedCounter.increment()
        case .closed: self.downstream.write(line)
        }
    }

    /// The lines queued so far, waiting for one if none is; nil once closed and empty.
    func next() async -> [String]? {
        while true {
            enum Take {
                case lines([String])
                case finished, wait
            }
            let take = self.state.withLock { state -> Take in
                if !state.lines.isEmpty {
                    var taken: [String] = []
                    taken.reserveCapacity(state.lines.count)
                    swap(&taken, &state.lines)
                    return .lines(taken)
                }
                return state.closed ? .finished : .wait
            }
            switch take {
            case .lines(let lines): return lines
            case .finished: return nil
            case .wait:
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = self.state.withLock { state -> Bool in
                        if !state.lines.isEmpty || state.closed { return true }
                        state.waiter = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
        }
    }

    /// Stops queueing: what is queued is still handed out by ``next()``, later lines are written
    /// directly.
    func close() {
        let waiter = self.state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.closed = true
            let waiter = state.waiter
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    /// Writes everything queued now, on the caller's thread.
    public func flush() {
        let lines = self.state.withLock { state -> [String] in
            var taken: [String] = []
            swap(&taken, &state.lines)
            return taken
        }
        self.downstream.write(batch: lines)
    }
}

/// Writes an ``AuditBuffer``'s lines in the background, one `write(2)` per batch, and everything
/// still queued on graceful shutdown or cancellation. Run it first in the service group so it
/// stops last, after the HTTP servers have answered their last request.
public struct AuditFlushService: Service {
    let buffer: AuditBuffer
    /// Pause after each batch so that, under load, lines gather into larger writes.
    let gatherInterval: Duration

    public init(buffer: AuditBuffer, gatherInterval: Duration = .milliseconds(2)) {
        self.buffer = buffer
        self.gatherInterval = gatherInterval
    }

    public func run() async {
        let buffer = self.buffer
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                while let lines = await buffer.next() {
                    buffer.downstream.write(batch: lines)
                    try? await Task.sleep(for: self.gatherInterval)
                }
            } onGracefulShutdown: {
                buffer.close()
            }
        } onCancel: {
            buffer.close()
        }
        buffer.flush()
    }
}
