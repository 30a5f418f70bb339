/// Errors thrown by ``ForgeEmulator``. Compare with `==` against the static members; an error that
/// reports an HTTP answer carries its ``status``. Descriptions never contain a token or a key.
public struct ForgeEmulatorError: Error, Hashable, Sendable, CustomStringConvertible {
    private enum Code: Hashable, Sendable {
        case notRunning
        case alreadyRunning
        case unexpectedStatus(operation: String)
        case invalidRegistrationResponse
        case invalidGatewayURL
        case stopped
    }

    private let code: Code
    /// The HTTP status the gateway answered, for ``unexpectedStatus(_:operation:)``.
    public let status: Int?

    private init(_ code: Code, status: Int? = nil) {
        self.code = code
        self.status = status
    }

    /// The emulator's outbound calls need `run()` to be running (it owns the HTTP client).
    public static let notRunning = Self(.notRunning)
    /// `run()` was called while the emulator was already running.
    public static let alreadyRunning = Self(.alreadyRunning)
    /// `run()` ended before the server became ready (or after it stopped).
    public static let stopped = Self(.stopped)
    /// `/forge/register` answered 2xx without a usable `triggerKeyId` and 32-byte `triggerPublicKey`.
    public static let invalidRegistrationResponse = Self(.invalidRegistrationResponse)
    /// The installation has no trigger key from `/forge/register` yet.
    /// A gateway URL that is not an absolute `http` or `https` URL.
    public static let invalidGatewayURL = Self(.invalidGatewayURL)

    /// The gateway answered a non-2xx status to `operation` (`lifecycle`, `register`, …).
    public static func unexpectedStatus(_ status: Int, operation: String) -> Self {
        Self(.unexpectedStatus(operation: operation), status: status)
    }

    public var description: String {
        switch self.code {
        case .notRunning: "ForgeEmulatorError.notRunning: the emulator is not running"
        case .alreadyRunning: "ForgeEmulatorError.alreadyRunning: run() is already running"
        case .stopped: "ForgeEmulatorError.stopped: the emulator stopped before it became ready"
        case .invalidRegistrationResponse:
            "ForgeEmulatorError.invalidRegistrationResponse: /forge/register answered without a usable trigger key"
        case .invalidGatewayURL: "ForgeEmulatorError.invalidGatewayURL: not an absolute http(s) URL"
        case .unexpectedStatus(let operation):
            "ForgeEmulatorError.unexpectedStatus: \(operation) answered HTTP \(self.status ?? 0)"
        }
    }
}
