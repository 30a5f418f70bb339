import FlowEngine
import Testing

@testable import TokenGateway

/// The status page's round-trip history, from the token flow's actions in whatever order their
/// batches reach the observer.
@Suite("Round-trip history from the flow's actions")
struct RoundTripLogTests {
    static let installation = InstallationID("ari:cloud:ecosystem::installation/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")!
    let start = FlowTime(unixSeconds: 1_763_906_400)

    static func attempt(_ requestID: String, _ n: Int) -> FlowAction {
        .startAttempt(requestID: requestID, attempt: n, expiresAt: FlowTime(unixSeconds: 0), timeout: .seconds(5))
    }

    @Test("a round trip is recorded from its first attempt to its verdict, with its attempts and last failure")
    func roundInOrder() {
        var log = RoundTripLog(replicaID: "r1")
        #expect(log.observe([Self.attempt("rq_1", 1)], for: Self.installation, at: self.start) == nil)
        _ = log.observe([.recordAttempt(outcome: "timeout")], for: Self.installation, at: self.start + .seconds(1))
        _ = log.observe([Self.attempt("rq_1", 2)], for: Self.installation, at: self.start + .seconds(2))
        let record = log.observe(
            [
                .recordAttempt(outcome: "http_error"), .roundFinished(succeeded: false),
                .releaseLease(requestID: "rq_1"),
            ],
            for: Self.installation, at: self.start + .seconds(3))
        #expect(
            record
                == RoundTripRecord(
                    startedAt: self.start.unixMilliseconds, durationMs: 3000, outcome: "http_error", attempts: 2,
                    replica: "r1"))
    }

    @Test(
        "a round's first attempt reaching the log after its end opens nothing: the next round is timed from its own start"
    )
    func lateStartOfAnEndedRound() {
        var log = RoundTripLog(replicaID: "r1")
        // The round rq_1 ended before the batch that started it reached the log.
        #expect(
            log.observe(
                [
                    .recordAttempt(outcome: "success"), .roundFinished(succeeded: true),
                    .releaseLease(requestID: "rq_1"),
                ],
                for: Self.installation, at: self.start) == nil)
        #expect(log.observe([Self.attempt("rq_1", 1)], for: Self.installation, at: self.start) == nil)
        // The next round, 60 s later, takes 5 s.
        let next = self.start + .seconds(60)
        _ = log.observe([Self.attempt("rq_2", 1)], for: Self.installation, at: next)
        let record = log.observe(
            [.recordAttempt(outcome: "success"), .roundFinished(succeeded: true), .releaseLease(requestID: "rq_2")],
            for: Self.installation, at: next + .seconds(5))
        #expect(record?.startedAt == next.unixMilliseconds)
        #expect(record?.durationMs == 5000)
        #expect(record?.outcome == "success")
        #expect(record?.attempts == 1)
    }
}

extension RoundTripLogTests {
    @Test("an ended round is remembered for a while, then forgotten: the log does not grow with every installation")
    func endedRoundsAreForgotten() {
        var log = RoundTripLog(replicaID: "r1")
        for n in 0..<300 {
            let id = InstallationID(
                "ari:cloud:ecosystem::installation/00000000-0000-4000-8000-\(String(format: "%012d", n))")!
            let at = self.start + .seconds(Int64(n))
            _ = log.observe([Self.attempt("rq_\(n)", 1)], for: id, at: at)
            _ = log.observe([.roundFinished(succeeded: true), .releaseLease(requestID: "rq_\(n)")], for: id, at: at)
        }
        // The last two minutes' worth: 121 of 300.
        #expect(log.rememberedEnds == 121)
    }

    @Test("a round ending with a hold placed is recorded, and a later attempt seen first does not move its start")
    func holdAndAttemptsOutOfOrder() {
        var log = RoundTripLog(replicaID: "r1")
        _ = log.observe([Self.attempt("rq_1", 2)], for: Self.installation, at: self.start + .seconds(1))
        _ = log.observe([Self.attempt("rq_1", 1)], for: Self.installation, at: self.start + .seconds(2))
        let record = log.observe(
            [
                .roundFinished(succeeded: true),
                .placeHold(requestID: "rq_1", duration: .seconds(60), releasingLease: true, answerBy: nil),
            ], for: Self.installation, at: self.start + .seconds(4))
        #expect(record?.startedAt == (self.start + .seconds(1)).unixMilliseconds)
        #expect(record?.durationMs == 3000)
        #expect(record?.attempts == 2)
    }
}
