import NIOCore
import NIOPosix
import Testing

@testable import TokenGateway

/// `TOKEN_GATEWAY_EVENT_LOOP_AFFINITY=pinned`: each loop of a group keeps to one CPU of those the
/// process may use, in turn.
@Suite struct EventLoopPinningTests {
    @Test func eachLoopKeepsToOneAllowedCPUInTurn() async throws {
        let allowed = try EventLoopPinning.allowedCPUs()
        #expect(!allowed.isEmpty)
        #expect(allowed == allowed.sorted())
        // More loops than CPUs: the CPUs are used round robin.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: allowed.count + 1)
        let placed = try await EventLoopPinning.pin(group)
        #expect(placed == (0...allowed.count).map { allowed[$0 % allowed.count] })
        for (loop, cpu) in zip(group.makeIterator(), placed) {
            let cpus = try await loop.submit { try EventLoopPinning.currentThreadCPUs() }.get()
            #expect(cpus == [cpu])
        }
        try await group.shutdownGracefully()
    }

    @Test func aThreadNotPinnedMayRunOnEveryAllowedCPU() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let cpus = try await group.next().submit { try EventLoopPinning.currentThreadCPUs() }.get()
        #expect(cpus == (try EventLoopPinning.allowedCPUs()))
        try await group.shutdownGracefully()
    }

    @Test func aPinningErrorNamesTheLoopTheCPUAndTheReason() {
        let error = EventLoopPinning.PinningError(loop: 1, cpu: 3, code: EINVAL)
        #expect(error.description == "cannot pin event loop 1 to CPU 3: Invalid argument")
    }
}
