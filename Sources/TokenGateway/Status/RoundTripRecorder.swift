import FlowEngine
import Logging
import Synchronization

/// The round trips of one replica's token flow as its actions show them: pure, so the order in
/// which batches of actions reach it can be tested. Rounds are told apart by their request id,
/// because a round's first `startAttempt` can reach the log after the batch that ended it (the
/// trigger call is a child task started before the observer hears of the batch that started it).
struct RoundTripLog {
    private struct OpenRound {
        var requestID: String
        var startedAt: FlowTime
        var attempts: Int
        var lastOutcome: String?
    }

    private var open: [InstallationID: OpenRound] = [:]
    /// The last round of each installation that ended in the last ``endedMemory``: a
    /// `startAttempt` of it arriving late opens nothing. Forgotten oldest first.
    private var ended: [InstallationID: String] = [:]
    private var endedOrder: [(id: InstallationID, requestID: String, at: FlowTime)] = []
    private var endedHead = 0
    /// How long an ended round is remembered: far longer than a batch of actions can be late.
    static let endedMemory: Duration = .seconds(120)
    let replicaID: String

    init(replicaID: String) {
        self.replicaID = replicaID
    }

    /// Takes one batch of actions of `installation`'s machine; returns the record of a round trip
    /// that ended with a verdict in it.
    mutating func observe(_ actions: [FlowAction], for installation: InstallationID, at now: FlowTime)
        -> RoundTripRecord?
    {
        var finished: RoundTripRecord?
        // The round a batch ends is named by its lease's release (or the hold placed with it).
        let ending = actions.lazy.compactMap { action -> String? in
            switch action {
            case .releaseLease(let requestID), .placeHold(let requestID, _, _, _): return requestID
            default: return nil
            }
        }.first
        for action in actions {
            switch action {
            case .startAttempt(let requestID, let attempt, _, _):
                if var round = self.open[installation], round.requestID == requestID {
                    round.attempts = max(round.attempts, attempt)
                    round.startedAt = min(round.startedAt, now)
                    self.open[installation] = round
                } else if self.ended[installation] != requestID {
                    self.open[installation] = OpenRound(requestID: requestID, startedAt: now, attempts: attempt)
                }
            case .recordAttempt(let outcome):
                self.open[installation]?.lastOutcome = outcome
            case .roundFinished(let succeeded):
                guard let round = self.open[installation], ending == nil || ending == round.requestID else { break }
                self.open[installation] = nil
                self.markEnded(installation, round.requestID, at: now)
                finished = RoundTripRecord(
                    startedAt: round.startedAt.unixMilliseconds,
                    durationMs: max(0, (now - round.startedAt).milliseconds),
                    outcome: succeeded
                        ? "success" : (round.lastOutcome.flatMap { $0 == "success" ? nil : $0 } ?? "failed"),
                    attempts: max(round.attempts, 1), replica: self.replicaID)
            case .releaseLease(let requestID), .placeHold(let requestID, _, _, _):
                // The round ended (with or without a verdict): nothing of it stays open.
                if self.open[installation]?.requestID == requestID { self.open[installation] = nil }
                self.markEnded(installation, requestID, at: now)
            default:
                break
            }
        }
        return finished
    }

    /// Remembers that `requestID` ended, and forgets the rounds that ended before the memory.
    private mutating func markEnded(_ installation: InstallationID, _ requestID: String, at now: FlowTime) {
        self.ended[installation] = requestID
        self.endedOrder.append((installation, requestID, now))
        while self.endedHead < self.endedOrder.count, now - self.endedOrder[self.endedHead].at > Self.endedMemory {
            let old = self.endedOrder[self.endedHead]
            if self.ended[old.id] == old.requestID { self.ended[old.id] = nil }
            self.endedHead += 1
        }
        if self.endedHead > 256, self.endedHead * 2 > self.endedOrder.count {
            self.endedOrder.removeFirst(self.endedHead)
            self.endedHead = 0
        }
    }

    /// The installations with an ended round still remembered (for tests).
    var rememberedEnds: Int { self.ended.count }
}

/// Keeps the round trips this replica leads in the store's per-installation history: watches the
/// token flow's actions (first trigger attempt sent, attempt verdicts, round finished) and writes
/// one ``RoundTripRecord`` when a round trip ends with a verdict. Writes nothing secret.
final class RoundTripRecorder: TokenFlowObserver {
    private let store: GatewayStore
    private let logger: Logger
    private let log: Mutex<RoundTripLog>

    init(store: GatewayStore, replicaID: String, logger: Logger) {
        self.store = store
        self.logger = logger
        self.log = Mutex(RoundTripLog(replicaID: replicaID))
    }

    func tokenFlow(performs actions: [FlowAction], for installation: InstallationID, at now: FlowTime)
        -> (@Sendable () async -> Void)?
    {
        guard let finished = self.log.withLock({ $0.observe(actions, for: installation, at: now) }) else { return nil }
        return {
            do {
                try await self.store.recordRoundTrip(installation, finished, now: now)
            } catch {
                self.logger.notice(
                    "could not record round-trip history", metadata: ["installation.id": "\(installation)"])
            }
        }
    }
}
