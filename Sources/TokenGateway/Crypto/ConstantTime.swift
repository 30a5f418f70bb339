/// Comparison of secrets (digests, MACs, `qsh` values) whose time does not depend on where they
/// first differ.
enum ConstantTime {
    /// Whether `lhs` and `rhs` hold the same bytes. Only the lengths leak (they are public: digest
    /// and MAC sizes, or the length of a value the caller sent).
    static func equal(_ lhs: [UInt8], _ rhs: [UInt8]) -> Bool {
        guard lhs.count == rhs.count else { return false }
        var difference: UInt8 = 0
        for index in lhs.indices { difference |= lhs[index] ^ rhs[index] }
        return difference == 0
    }
}
