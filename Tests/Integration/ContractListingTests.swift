import FlowEngine
import ForgeEmulator
import Foundation
import NIOHTTP1
import RedisKit
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

    @Test(
        "an installation whose first write was stored but not indexed (the index key refused) is indexed by its next write"
    )
    func indexRepairedByTheNextWrite() async throws {
        let server = try await RedisServerProcess.start()
        let prefix = "tgidx"
        let admin = try SecurityKeyTests.redis(server.url)
        // A user that may write the installations' own keys but not the listing index.
        _ = try await admin.send([
            "ACL", "SETUSER", "writer", "on", ">writer-password-1", "~\(prefix):{*", "&*", "+@all",
        ])
        let redis = try SecurityKeyTests.redis("redis://writer:writer-password-1@127.0.0.1:\(server.port)/0")
        let store = GatewayStore(
            redis: redis, box: try SecurityKeyTests.ring([("k1", SecurityKeyTests.randomKey())]), prefix: prefix)
        let now = FlowTime.now()
        let (pushed, installed) = (SecurityKeyTests.installation(), SecurityKeyTests.installation())
        let token = AccessToken(value: "token-\(UUID())", expiresAt: now.unixSeconds + 3600)
        // The scripts run (the token and the record are stored); the index write is refused.
        await #expect(throws: RedisError.self) {
            try await store.storeDeliveredToken(pushed, token: token, requestID: nil, metadata: .init(), now: now)
        }
        await #expect(throws: RedisError.self) {
            try await store.upsertInstallation(installed, metadata: .init(), now: now)
        }
        #expect(try await store.systemToken(pushed)?.value == token.value)
        #expect(try await store.installation(installed) != nil)
        #expect(try await admin.send(["ZCARD", "\(prefix):installations"]).int == 0)

        // Once the index can be written, the next write of each (not a creation any more) indexes it.
        _ = try await admin.send(["ACL", "SETUSER", "writer", "~*"])
        let again = try await store.storeDeliveredToken(
            pushed, token: token, requestID: nil, metadata: .init(), now: now)
        #expect(again.outcome == .notNewer)
        #expect(try await store.upsertInstallation(installed, metadata: .init(), now: now))
        let indexed = try await admin.send(["ZRANGE", "\(prefix):installations", "0", "-1"]).array?.compactMap(\.string)
        #expect(Set(indexed ?? []) == [pushed.ari, installed.ari])
        // Marked: later writes do not write the index again.
        _ = try await admin.send(["ACL", "SETUSER", "writer", "resetkeys", "~\(prefix):{*"])
        _ = try await store.storeDeliveredToken(pushed, token: token, requestID: nil, metadata: .init(), now: now)
        #expect(try await store.upsertInstallation(installed, metadata: .init(), now: now))
        await server.stop()
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
