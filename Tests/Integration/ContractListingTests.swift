import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import Testing

@testable import TokenGateway

/// Contract §2 `GET /v1/installations`: pages ordered by installation id, each installation
/// exactly once, `limit` default 100 and range 1–1000, the caller's set only, never `KEYS`. Runs
/// on a Redis of its own, so that the installations listed are exactly the ones this test created.
@Suite("Contract: listing installations")
struct ContractListingTests {
    struct Page {
        let ids: [String]
        let nextCursor: String?
    }

    static func page(_ h: GatewayHarness, _ query: String, secret: String = GatewayHarness.callerSecret) async throws
        -> Page
    {
        let answer = try await h.call(.GET, "/v1/installations" + (query.isEmpty ? "" : "?" + query), secret: secret)
        #expect(answer.status == 200, "\(query): \(answer.body.prefix(300))")
        let items = answer.json["installations"] as? [[String: Any]] ?? []
        return Page(
            ids: items.compactMap { $0["installationId"] as? String }, nextCursor: answer.json["nextCursor"] as? String)
    }

    static func encoded(_ cursor: String) -> String {
        cursor.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~")))!
    }

    @Test("pages are ordered by id, hold each installation exactly once, default to 100, and accept 1–1000 only")
    func paging() async throws {
        // KEYS renamed away: listing must work without it (never backed by KEYS).
        let redis = try await RedisServerProcess.start(extraArguments: [
            "--rename-command", "KEYS", "keys-is-off-\(UUID().uuidString)",
        ])
        do {
            try await GatewayHarness.run(redisURL: redis.url) { h in
                var created: Set<String> = []
                for _ in 0..<105 {
                    let installation = h.emulator.makeInstallation()
                    #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
                    created.insert(installation.id)
                }
                // Default limit: 100, then a cursor.
                let first = try await Self.page(h, "")
                #expect(first.ids.count == 100)
                #expect(first.nextCursor != nil)

                // Walking every page of 7: each installation exactly once, in id order.
                var seen: [String] = []
                var cursor: String? = nil
                var pages = 0
                repeat {
                    let page = try await Self.page(h, "limit=7" + (cursor.map { "&cursor=" + Self.encoded($0) } ?? ""))
                    #expect(page.ids.count <= 7)
                    seen += page.ids
                    cursor = page.nextCursor
                    pages += 1
                } while cursor != nil && pages < 100
                #expect(seen.count == created.count)
                #expect(Set(seen) == created)
                #expect(seen == seen.sorted())
                #expect(pages >= 15 && pages <= 16)

                // The largest page holds everything, in order, with no next cursor.
                let all = try await Self.page(h, "limit=1000")
                #expect(all.ids == seen)
                #expect(all.nextCursor == nil)
                let one = try await Self.page(h, "limit=1")
                #expect(one.ids == [seen[0]])

                for query in ["limit=1001", "limit=0", "limit=-1", "limit=x"] {
                    let refused = try await h.call(.GET, "/v1/installations?" + query)
                    #expect(refused.status == 400, "\(query)")
                    #expect(refused.errorCode == "invalid_parameter", "\(query)")
                }
            }
        } catch {
            await redis.stop()
            throw error
        }
        await redis.stop()
    }

    @Test("a scoped caller's pages hold its installations only")
    func scopedCaller() async throws {
        let redis = try await RedisServerProcess.start()
        let mine = (0..<3).map { _ in "ari:cloud:ecosystem::installation/" + UUID().uuidString.lowercased() }
        do {
            try await GatewayHarness.run(redisURL: redis.url, scopedInstallations: mine) { h in
                for id in mine {
                    let installation = EmulatedInstallation(
                        id: id, cloudId: UUID().uuidString.lowercased(), product: "jira",
                        apiBaseUrl: "https://api.atlassian.com/ex/jira/x", siteARI: "ari:cloud:jira::site/x",
                        triggerPath: "/x1/" + UUID().uuidString.lowercased())
                    #expect(try await h.emulator.sendLifecycleEvent(.installed, for: installation).status == 200)
                }
                for _ in 0..<4 {
                    #expect(
                        try await h.emulator.sendLifecycleEvent(.installed, for: h.emulator.makeInstallation()).status
                            == 200)
                }
                var seen: [String] = []
                var cursor: String? = nil
                var pages = 0
                repeat {
                    let page = try await Self.page(
                        h, "limit=2" + (cursor.map { "&cursor=" + Self.encoded($0) } ?? ""),
                        secret: GatewayHarness.scopedSecret)
                    seen += page.ids
                    cursor = page.nextCursor
                    pages += 1
                } while cursor != nil && pages < 20
                #expect(seen == mine.sorted())
                #expect(try await Self.page(h, "").ids.count == 7)
            }
        } catch {
            await redis.stop()
            throw error
        }
        await redis.stop()
    }
}
