import FlowEngine
import Hummingbird
import NIOCore

extension Gateway {
    func addOperationsRoutes(to router: Router<BasicRequestContext>) {
        router.get("/health/live") { _, _ in
            Self.json(.object([("status", "ok")]))
        }
        router.get("/health/ready") { _, _ in
            // Shutting down: out of the load balancer while the requests in flight drain.
            guard !self.draining.load(ordering: .relaxed) else { throw GatewayError(FlowError.shuttingDown) }
            // Starting: on a separate operations port this answers before the main listener is up,
            // and the replica must not be sent callers and Forge's calls yet.
            guard self.boundPort.load(ordering: .relaxed) != 0 else {
                throw GatewayError(
                    status: .serviceUnavailable, code: "store_unavailable",
                    message: "the gateway is starting: its listener is not up yet", retryAfter: 1)
            }
            // One store check for every probe asking at once, reused for a second: however many
            // ask (the route needs no credential), Redis sees one PING at a time.
            let ready = await self.storeReadiness.isReady {
                (try? await self.redis.ping(timeout: .milliseconds(500))) != nil
            }
            guard ready else { throw GatewayError.storeUnavailable }
            return Self.json(.object([("status", "ok"), ("store", "ok")]))
        }
        router.get("/metrics") { _, _ in
            var out: [UInt8] = []
            self.registry.emit(into: &out)
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                body: .init(byteBuffer: ByteBuffer(bytes: out)))
        }
    }
}
