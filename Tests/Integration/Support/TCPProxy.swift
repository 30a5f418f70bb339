import NIOCore
import NIOPosix
import Synchronization

/// A TCP proxy on loopback for tests: every connection it accepts is forwarded to `127.0.0.1:target`.
/// ``hold()`` closes the connections it carries and refuses new ones (accepted, then closed at once)
/// until ``release()``: a server that goes out of reach and comes back, while the server itself runs on.
final class TCPProxy: Sendable {
    let port: Int
    private let server: any Channel
    private let box: ProxyState
    private let state: Mutex<(held: Bool, open: [ObjectIdentifier: any Channel])>

    private init(port: Int, server: any Channel, box: ProxyState) {
        self.port = port
        self.server = server
        self.box = box
        self.state = Mutex((false, [:]))
    }

    /// Starts a proxy on a free loopback port, forwarding to `target`.
    static func start(forwardingTo target: Int) async throws -> TCPProxy {
        let box = ProxyState(target: target)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { inbound in
                if box.accept(inbound) == false { return inbound.close() }
                return ClientBootstrap(group: inbound.eventLoop)
                    .channelInitializer { outbound in
                        outbound.pipeline.addHandler(ProxyForward(to: inbound))
                    }
                    .connect(host: "127.0.0.1", port: box.target.withLock { $0 })
                    .flatMap { outbound in
                        box.track(outbound)
                        return inbound.pipeline.addHandler(ProxyForward(to: outbound)).flatMap {
                            inbound.setOption(.autoRead, value: true)
                        }
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = server.localAddress?.port ?? 0
        let proxy = TCPProxy(port: port, server: server, box: box)
        box.proxy.withLock { $0 = proxy }
        return proxy
    }

    /// Closes every connection through the proxy and refuses new ones until ``release()``.
    func hold() {
        let open = self.state.withLock { state in
            state.held = true
            defer { state.open.removeAll() }
            return Array(state.open.values)
        }
        for channel in open { channel.close(promise: nil) }
    }

    /// Forwards new connections to `target` from now on; the open ones stay where they are (a
    /// DNS name that now names another server).
    func retarget(to target: Int) {
        self.box.target.withLock { $0 = target }
    }

    /// Forwards new connections again.
    func release() {
        self.state.withLock { $0.held = false }
    }

    /// Stops listening and closes every connection.
    func stop() async {
        self.hold()
        try? await self.server.close()
    }

    /// Records a connection unless held; `false` when it must be refused.
    fileprivate func accept(_ channel: any Channel) -> Bool {
        self.track(channel)
    }

    fileprivate func track(_ channel: any Channel) -> Bool {
        let kept = self.state.withLock { state -> Bool in
            guard !state.held else { return false }
            state.open[ObjectIdentifier(channel)] = channel
            return true
        }
        if kept {
            channel.closeFuture.whenComplete { _ in
                _ = self.state.withLock { $0.open.removeValue(forKey: ObjectIdentifier(channel)) }
            }
        }
        return kept
    }
}

/// The proxy as its connection initializer sees it (set once the server is bound).
private final class ProxyState: Sendable {
    let proxy = Mutex<TCPProxy?>(nil)
    /// The port new connections are forwarded to.
    let target: Mutex<Int>

    init(target: Int) {
        self.target = Mutex(target)
    }

    func accept(_ channel: any Channel) -> Bool {
        self.proxy.withLock { $0 }?.accept(channel) ?? false
    }

    func track(_ channel: any Channel) {
        if self.proxy.withLock({ $0 })?.track(channel) == false { channel.close(promise: nil) }
    }
}

/// Writes what one side reads to the other, and closes the other side when this one closes.
private final class ProxyForward: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer

    let partner: any Channel

    init(to partner: any Channel) {
        self.partner = partner
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.partner.writeAndFlush(self.unwrapInboundIn(data), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.partner.close(promise: nil)
        context.fireChannelInactive()
    }
}
