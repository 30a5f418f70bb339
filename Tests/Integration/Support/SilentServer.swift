import NIOCore
import NIOPosix
import Synchronization

/// A TCP server on loopback that accepts connections and never answers (a hung Redis node), counting
/// the connections it accepted.
final class SilentServer: Sendable {
    let port: Int
    private let server: any Channel
    private let counter: AcceptCounter

    private init(port: Int, server: any Channel, counter: AcceptCounter) {
        self.port = port
        self.server = server
        self.counter = counter
    }

    /// Connections accepted so far.
    var accepted: Int {
        self.counter.accepted.load(ordering: .relaxed)
    }

    /// Starts a silent server on a free loopback port.
    static func start() async throws -> SilentServer {
        let counter = AcceptCounter()
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                counter.accepted.wrappingAdd(1, ordering: .relaxed)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return SilentServer(port: server.localAddress?.port ?? 0, server: server, counter: counter)
    }

    /// Stops listening (the accepted connections are closed by their peers).
    func stop() async {
        try? await self.server.close()
    }

    private final class AcceptCounter: Sendable {
        let accepted = Atomic<Int>(0)
    }
}
