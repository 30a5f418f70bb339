import FlowEngine
import NIOCore

/// The hot path's internal layers for the micro-benchmarks (`Benchmarks/`, a package of its own
/// built in release, where `@testable import` is not available). Not part of the public API:
/// reachable only with `@_spi(Benchmarks) import TokenGateway`.
@_spi(Benchmarks) public enum BenchmarkAccess {
    /// ``TokenAnswerBodies``: the answer bytes kept per installation.
    public final class AnswerBodies: Sendable {
        let bodies = TokenAnswerBodies()

        public init() {}

        /// The body of `answer`: kept bytes for a repeated answer from the cache.
        public func body(installation: InstallationID, answer: TokenAnswer) -> ByteBuffer {
            self.bodies.prepared(installation: installation, answer: answer).body
        }
    }

    /// ``TokenAnswerBodies/encode(installation:answer:)``: an answer's body written anew.
    public static func encodeAnswer(installation: String, answer: TokenAnswer) -> ByteBuffer {
        TokenAnswerBodies.encode(installation: installation, answer: answer)
    }

    /// The audit record of a token handed out, its expiry and fingerprint made already (as the
    /// token route writes it).
    public static func tokenHandedOut(
        _ audit: AuditLog, caller: String, installation: InstallationID, source: String, expiresAt: String,
        fingerprint: String
    ) {
        audit.tokenHandedOut(
            caller: caller, installation: installation, source: source, expiresAt: expiresAt, fingerprint: fingerprint,
            accountId: nil, via: "api")
    }

    /// The lines an ``AuditBuffer`` holds, taken out (waiting for one if none is).
    public static func takeLines(_ buffer: AuditBuffer) async -> [String]? {
        await buffer.next()
    }

    /// The ``FastAnswerHandler`` of `gateway`'s main listener, for a connection's pipeline.
    public static func fastAnswerHandler(_ gateway: Gateway) -> any ChannelHandler {
        FastAnswerHandler(serverName: Gateway.serverName, logger: gateway.logger) {
            gateway.fastAnswer($0, health: true, token: true)
        }
    }
}
