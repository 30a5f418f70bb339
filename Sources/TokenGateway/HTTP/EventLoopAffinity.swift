import CThreadAffinity
import Foundation
import NIOCore

/// Where the threads of the event loops run (`TOKEN_GATEWAY_EVENT_LOOP_AFFINITY`).
public enum EventLoopAffinity: String, Sendable, Hashable, CaseIterable {
    /// The operating system's scheduler places the threads (the default).
    case shared
    /// Each event loop's thread is kept on one CPU of those the process may use (`taskset`, a
    /// container's cpuset), in turn: loop 0 on the first, loop 1 on the second, and so on.
    case pinned
}

/// Pins the threads of an event-loop group to CPUs.
public enum EventLoopPinning {
    /// A loop that could not be pinned. Names the loop, the CPU and the system's reason.
    public struct PinningError: Error, Sendable, CustomStringConvertible {
        public let loop: Int?
        public let cpu: Int?
        public let code: Int32

        public var description: String {
            let reason = String(cString: strerror(self.code))
            guard let loop = self.loop, let cpu = self.cpu else {
                return "cannot read the CPUs this process may use: \(reason)"
            }
            return "cannot pin event loop \(loop) to CPU \(cpu): \(reason)"
        }
    }

    /// The CPUs this process may run on, in increasing order.
    public static func allowedCPUs() throws(PinningError) -> [Int] {
        try self.cpus { token_gateway_allowed_cpus($0, $1) }
    }

    /// The CPUs the calling thread may run on, in increasing order.
    public static func currentThreadCPUs() throws(PinningError) -> [Int] {
        try self.cpus { token_gateway_thread_cpus($0, $1) }
    }

    /// Pins loop `i` of `group` to the `i`-th allowed CPU (round robin when there are more loops
    /// than CPUs). Returns the CPU of each loop, in the group's order.
    public static func pin(_ group: any EventLoopGroup) async throws(PinningError) -> [Int] {
        let allowed = try self.allowedCPUs()
        var placed: [Int] = []
        for (index, loop) in group.makeIterator().enumerated() {
            let cpu = allowed[index % allowed.count]
            let status: Int32
            do {
                status = try await loop.submit { token_gateway_pin_thread(Int32(cpu)) }.get()
            } catch {
                throw PinningError(loop: index, cpu: cpu, code: ESHUTDOWN)
            }
            guard status == 0 else { throw PinningError(loop: index, cpu: cpu, code: status) }
            placed.append(cpu)
        }
        return placed
    }

    private static func cpus(
        _ read: (UnsafeMutablePointer<Int32>, Int32) -> Int32
    ) throws(PinningError) -> [Int] {
        let capacity = 1024
        var buffer = [Int32](repeating: 0, count: capacity)
        let count = buffer.withUnsafeMutableBufferPointer { read($0.baseAddress!, Int32(capacity)) }
        guard count > 0 else { throw PinningError(loop: nil, cpu: nil, code: count < 0 ? errno : ENOENT) }
        return buffer.prefix(Int(count)).map(Int.init)
    }
}
