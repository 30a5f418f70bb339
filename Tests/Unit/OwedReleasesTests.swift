import Testing

@testable import FlowEngine

@Suite("OwedReleases")
struct OwedReleasesTests {
    @Test("owed leases are taken when due, the others stay owed; a few per key at most")
    func takesWhatIsDue() {
        var owed = OwedReleases<String>()
        #expect(owed.isEmpty)
        for owner in ["rq_1", "rq_2", "rq_3", "rq_4", "rq_5"] { owed.owe("a", owner: owner) }
        owed.owe("b", owner: "rq_b")
        #expect(owed.owners(of: "a") == ["rq_1", "rq_2", "rq_3", "rq_4"])
        // rq_2 is held again by a round: it stays owed.
        let taken = owed.take { _, owner in owner != "rq_2" }
        #expect(Set(taken.map { "\($0.0) \($0.1)" }) == ["a rq_1", "a rq_3", "a rq_4", "b rq_b"])
        #expect(owed.owners(of: "a") == ["rq_2"])
        #expect(owed.owners(of: "b").isEmpty)
        #expect(owed.take { _, _ in true }.map(\.1) == ["rq_2"])
        #expect(owed.isEmpty)
    }
}
