import Testing

@testable import RedisKit

@Suite struct RedisScriptTests {
    @Test(arguments: [
        ("", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        ("abc", "a9993e364706816aba3e25717850c26c9cd0d89d"),
        ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "84983e441c3bd26ebaae4aa1f95129e5e54670f1"),
        ("The quick brown fox jumps over the lazy dog", "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12"),
        ("return 1", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"),
    ])
    func sha1MatchesKnownDigests(input: String, digest: String) {
        #expect(RedisScript(input).sha1 == digest)
    }

    @Test func sha1HandlesMessagesAroundTheBlockBoundary() {
        // 55, 56 and 64 bytes exercise the padding branches; the digests were computed with sha1sum.
        #expect(RedisScript(String(repeating: "a", count: 55)).sha1 == "c1c8bbdc22796e28c0e15163d20899b65621d65a")
        #expect(RedisScript(String(repeating: "a", count: 56)).sha1 == "c2db330f6083854c99d4b5bfb6e8f29f201be699")
        #expect(RedisScript(String(repeating: "a", count: 64)).sha1 == "0098ba824b5c16427bd7a1122a5a442a25ec644d")
    }

    @Test func keepsTheSource() {
        let script = RedisScript("return redis.call('GET', KEYS[1])")
        #expect(script.source == "return redis.call('GET', KEYS[1])")
        #expect(script.sha1.count == 40)
    }
}
