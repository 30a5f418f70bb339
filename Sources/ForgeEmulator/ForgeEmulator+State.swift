import AsyncHTTPClient
import Crypto
import Foundation

/// Where an installation stands from the emulator's point of view.
public enum EmulatedInstallationStatus: String, Sendable, Hashable, Codable {
    /// Made, never installed (or the installed event failed).
    case created
    /// The installed event reached the gateway.
    case installed
    /// The uninstalled event reached the gateway.
    case uninstalled
}

/// The Ed25519 key the gateway handed out at registration.
struct RegisteredTriggerKey: Sendable {
    let keyId: String
    let publicKey: Curve25519.Signing.PublicKey
}

/// Everything the emulator keeps about one installation.
struct EmulatedInstallationRecord: Sendable {
    var installation: EmulatedInstallation
    let sequence: Int
    /// The path of its web trigger now: the installation's own until it is rotated.
    var triggerPath: String
    var status: EmulatedInstallationStatus = .created
    /// The current key of the last registration's answer.
    var triggerKey: RegisteredTriggerKey?
    /// The next key that answer announced (a rotation in progress), kept beside the current one as
    /// the companion keeps both (`Docs/forge-companion.md`, "Trigger-key rotation").
    var nextTriggerKey: RegisteredTriggerKey?
    var fault: TriggerFault = .none
    /// Answers left for `.failWith`.
    var remainingFailures: Int = 0
    var triggerRecords: [TriggerRecord] = []
    var lastDeliveredToken: String?

    /// Whether `signature` is valid for `body` under one of the registered keys (the one its key id
    /// names), as the companion's web-trigger function checks it.
    func verifies(_ signature: TriggerSignature?, body: Data) -> Bool {
        guard let signature,
            let key = [self.triggerKey, self.nextTriggerKey].compactMap({ $0 }).first(where: {
                $0.keyId == signature.keyId
            })
        else { return false }
        return signature.isValid(for: body, publicKey: key.publicKey)
    }
}

/// The emulator's mutable state, kept in a `Mutex`. No I/O happens under the lock: the methods
/// return what the caller must resume or send afterwards.
struct EmulatorState: Sendable {
    enum Lifecycle: Sendable {
        case idle
        case starting(client: HTTPClient, jobs: AsyncStream<DeferredJob>.Continuation)
        case ready(client: HTTPClient, jobs: AsyncStream<DeferredJob>.Continuation, port: Int)
        case stopped
    }

    enum ReadyAnswer {
        case wait
        case ready(Int)
        case fail(any Error)
    }

    typealias ReadyWaiter = CheckedContinuation<Int, any Error>

    private(set) var lifecycle: Lifecycle = .idle
    private var readyWaiters: [UUID: ReadyWaiter] = [:]
    private var records: [String: EmulatedInstallationRecord] = [:]
    /// Trigger id (the last path segment) → installation id.
    private var triggers: [String: String] = [:]
    private var nextSequence = 0
    private(set) var totalTriggerCalls = 0
    /// Installations with a scheduled push in flight (its retries included): later rounds skip them.
    var retryingPushes: Set<String> = []
    /// The gateway base URL outbound calls go to by default.
    var gatewayURL: String

    init(gatewayURL: String) {
        self.gatewayURL = gatewayURL
    }

    // MARK: Lifecycle

    var client: HTTPClient? {
        switch self.lifecycle {
        case .starting(let client, _), .ready(let client, _, _): client
        case .idle, .stopped: nil
        }
    }

    var jobs: AsyncStream<DeferredJob>.Continuation? {
        switch self.lifecycle {
        case .starting(_, let jobs), .ready(_, let jobs, _): jobs
        case .idle, .stopped: nil
        }
    }

    var boundPort: Int? {
        if case .ready(_, _, let port) = self.lifecycle { return port }
        return nil
    }

    mutating func start(client: HTTPClient, jobs: AsyncStream<DeferredJob>.Continuation) throws {
        switch self.lifecycle {
        case .idle, .stopped:
            self.lifecycle = .starting(client: client, jobs: jobs)
        case .starting, .ready:
            throw ForgeEmulatorError.alreadyRunning
        }
    }

    /// The server is listening: returns the waiters to resume with `port`.
    mutating func serverDidStart(port: Int) -> [ReadyWaiter] {
        guard case .starting(let client, let jobs) = self.lifecycle else { return [] }
        self.lifecycle = .ready(client: client, jobs: jobs, port: port)
        defer { self.readyWaiters = [:] }
        return Array(self.readyWaiters.values)
    }

    /// `run()` ended: returns the waiters to fail.
    mutating func stop() -> [ReadyWaiter] {
        self.lifecycle = .stopped
        defer { self.readyWaiters = [:] }
        return Array(self.readyWaiters.values)
    }

    mutating func addReadyWaiter(id: UUID, _ waiter: ReadyWaiter) -> ReadyAnswer {
        switch self.lifecycle {
        case .ready(_, _, let port):
            return .ready(port)
        case .stopped:
            return .fail(ForgeEmulatorError.stopped)
        case .idle, .starting:
            if Task.isCancelled { return .fail(CancellationError()) }
            self.readyWaiters[id] = waiter
            return .wait
        }
    }

    mutating func removeReadyWaiter(id: UUID) -> ReadyWaiter? {
        self.readyWaiters.removeValue(forKey: id)
    }

    // MARK: Installations

    /// Remembers an installation (keeping what is known about it when it is already known; the
    /// given value's mutable fields replace the stored ones).
    mutating func remember(_ installation: EmulatedInstallation) {
        if var record = self.records[installation.id] {
            if installation.triggerPath != record.installation.triggerPath {
                // A value made with another path: the trigger answers there from now on.
                record.triggerPath = installation.triggerPath
                self.triggers[Self.triggerId(of: installation.triggerPath)] = installation.id
            }
            record.installation = installation
            self.records[installation.id] = record
        } else {
            self.records[installation.id] = EmulatedInstallationRecord(
                installation: installation, sequence: self.nextSequence, triggerPath: installation.triggerPath)
            self.nextSequence += 1
            self.triggers[Self.triggerId(of: installation.triggerPath)] = installation.id
        }
    }

    /// Moves the installation's web trigger to `path`: the old path answers 404 from now on.
    mutating func rotateTrigger(of installation: EmulatedInstallation, to path: String) {
        self.remember(installation)
        guard var record = self.records[installation.id] else { return }
        self.triggers[Self.triggerId(of: record.triggerPath)] = nil
        record.triggerPath = path
        self.records[installation.id] = record
        self.triggers[Self.triggerId(of: path)] = installation.id
    }

    var orderedRecords: [EmulatedInstallationRecord] {
        self.records.values.sorted { $0.sequence < $1.sequence }
    }

    func record(for installation: EmulatedInstallation) -> EmulatedInstallationRecord? {
        self.records[installation.id]
    }

    /// The record named by a full installation ARI or by its UUID.
    func record(matching id: String) -> EmulatedInstallationRecord? {
        if let record = self.records[id] { return record }
        return self.records["ari:cloud:ecosystem::installation/" + id]
    }

    func recordForTrigger(id triggerId: String) -> EmulatedInstallationRecord? {
        self.triggers[triggerId].flatMap { self.records[$0] }
    }

    mutating func update(_ installation: EmulatedInstallation, _ body: (inout EmulatedInstallationRecord) -> Void) {
        self.remember(installation)
        body(&self.records[installation.id]!)
    }

    mutating func updateRecord(id: String, _ body: (inout EmulatedInstallationRecord) -> Void) {
        guard var record = self.records[id] else { return }
        body(&record)
        self.records[id] = record
    }

    mutating func countTriggerCall() {
        self.totalTriggerCalls += 1
    }

    static func triggerId(of triggerPath: String) -> String {
        triggerPath.split(separator: "/").last.map(String.init) ?? triggerPath
    }
}
