/// How many scheduling turns each call of an in-memory store takes before it acts: a round trip
/// to a store elsewhere, during which other work runs. Each call draws its own number, from 0 up
/// to ``limit``, from a fixed sequence (the same for every run), so a seeded test replays.
public struct CallTurns: Sendable {
    /// At most this many turns a call (0, the default: none).
    public var limit = 0
    private var drawn: UInt64 = 0

    public init() {}

    /// The next call's number of turns.
    public mutating func next() -> Int {
        guard self.limit > 0 else { return 0 }
        self.drawn = self.drawn &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Int((self.drawn >> 33) % UInt64(self.limit + 1))
    }
}
