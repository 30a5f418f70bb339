import FlowEngine
import Logging
import Synchronization

/// Keeps the round trips this replica leads in the store's per-installation history: watches the
/// token flow's actions (first trigger attempt sent, attempt verdicts, round finished) and writes
/// one ``RoundTripRecord`` when a round trip ends with a verdict. Writes nothing secret.
final class RoundTripRecorder: TokenFlowObserver {
    private struct OpenRound {
        var startedAt: FlowTime
        var attempts: Int
        var lastOutcome: String?
    }

    private let store: GatewayStore
    private let replicaID: String
    private let logger: Logger
    private let rounds = Mutex<[InstallationID: OpenRound]>([:])

    init(store: GatewayStore, replicaID: String, logger: Logger) {
        self.store = store
        self.replicaID = replicaID
        self.logger = logger
    }

    func tokenFlow(performs actions: [FlowAction], for installation: InstallationID, at now: FlowTime) {
        let finished = self.rounds.withLock { rounds -> RoundTripRecord? in
            var finished: RoundTripRecord?
            for action in actions {
                switch action {
                case .startAttempt(_, let attempt, _, _):
                    var round = rounds[installation] ?? OpenRound(startedAt: now, attempts: 0)
                    round.attempts = max(round.attempts, attempt)
                    rounds[installation] = round
                case .recordAttempt(let outcome):
                    rounds[installation]?.lastOutcome = outcome
                case .roundFinished(let succeeded):
                    guard let round = rounds.removeValue(forKey: installation) else { break }
                    finished = RoundTripRecord(
                        startedAt: round.startedAt.unixMilliseconds,
                        durationMs: max(0, (now - round.startedAt).milliseconds),
                        outcome: succeeded
                            ? "success" : (round.lastOutcome.flatMap { $0 == "success" ? nil : $0 } ?? "failed"),
                        attempts: max(round.attempts, 1), replica: self.replicaID)
                case .releaseLease:
                    // The round ended (with or without a verdict): nothing of it stays open.
                    rounds[installation] = nil
                default:
                    break
                }
            }
            return finished
        }
        guard let finished else { return }
        Task {
            do {
                try await self.store.recordRoundTrip(installation, finished, now: now)
            } catch {
                self.logger.notice(
                    "could not record round-trip history", metadata: ["installation.id": "\(installation)"])
            }
        }
    }
}
