import Logging
import Metrics
import Prometheus
import Synchronization
import Testing

@testable import FlowEngine
@testable import TokenGateway

/// ``UserTokenExchanger`` without Redis: an in-memory store on a manual clock, a stub system-token
/// source and a scripted GraphQL exchange.
@Suite("User-token exchanger: coalescing, following, retries and holds, without Redis")
struct UserTokenExchangerTests {
    static let installation = InstallationID("ari:cloud:ecosystem::installation/8f4c7a1e-0000-4000-8000-0000000000a1")!
    static let cloud = "0f5b7c1e-2d3a-4b5c-8d9e-0a1b2c3d4e5f"
    static let account = UserAccountID("557058:user-a")!

    struct Harness {
        let clock = ManualFlowClock()
        let store: InMemoryUserTokenStore
        let systemTokens: StubSystemTokens
        let client: ScriptedExchangeCall
        let exchanger: UserTokenExchanger

        init(
            _ answers: [OfflineUserAuthTokenClient.Outcome],
            metrics: any MetricsFactory = NOOPMetricsHandler.instance,
            configure: (inout UserTokenExchanger.Configuration) -> Void = { _ in }
        ) {
            self.store = InMemoryUserTokenStore(clock: self.clock)
            self.store.install(
                UserTokenExchangerTests.installation,
                .init(
                    apiBaseUrl: "https://api.atlassian.com/ex/jira/\(UserTokenExchangerTests.cloud)",
                    cloudId: UserTokenExchangerTests.cloud))
            self.systemTokens = StubSystemTokens(clock: self.clock)
            self.client = ScriptedExchangeCall(answers)
            var configuration = UserTokenExchanger.Configuration()
            configure(&configuration)
            self.exchanger = UserTokenExchanger(
                configuration: configuration, store: self.store, systemTokens: self.systemTokens, client: self.client,
                metrics: UserExchangeMetrics(factory: metrics),
                audit: AuditLog(logger: Logger(label: "test.audit")), logger: Logger(label: "test"),
                clock: self.clock, jitter: { 0.5 })
        }

        /// Runs the exchanger while `body` runs.
        func running<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.exchanger.run() }
                defer { group.cancelAll() }
                await self.store.waitForWatcher()
                return try await body()
            }
        }

        /// Runs the exchanger while `body` runs, with the calls through `gates` held from the
        /// start; they are let go when `body` ends, however it ends (the exchanger's run ends only
        /// once the calls held are let go).
        func running<T: Sendable>(holding gates: [TestGate], _ body: @Sendable () async throws -> T) async throws -> T {
            for gate in gates { gate.hold() }
            return try await self.running {
                defer { for gate in gates { gate.release() } }
                return try await body()
            }
        }

        /// Another process stores the user's token `value`, valid for `seconds` (cached 10 s less);
        /// with `notice` false, the store's notice of it is lost.
        func storeElsewhere(_ value: String, validFor seconds: Int64, notice: Bool = true) async throws {
            let now = self.clock.now()
            let token = AccessToken(value: value, expiresAt: now.unixSeconds + seconds)
            let (id, account) = (UserTokenExchangerTests.installation, UserTokenExchangerTests.account.value)
            guard notice else {
                self.store.storeWithoutNotice(id, accountId: account, token: token, cacheUntil: token.expiresAt - 10)
                return
            }
            _ = try await self.store.store(
                id, accountId: account, token: token, cacheUntil: token.expiresAt - 10, now: now)
        }

        func token(
            timeout: Duration = .seconds(10), forceRefresh: Bool = false,
            installation: InstallationID = UserTokenExchangerTests.installation,
            account: UserAccountID = UserTokenExchangerTests.account,
            admit: @Sendable () async throws(UserTokenError) -> Void = {}
        ) async -> Result<UserTokenExchanger.Answer, UserTokenError> {
            do {
                return .success(
                    try await self.exchanger.token(
                        for: installation, accountId: account,
                        request: .init(timeout: timeout, forceRefresh: forceRefresh), admit: admit))
            } catch {
                return .failure(error)
            }
        }
    }

    static let issued = OfflineUserAuthTokenClient.Outcome.token(value: "user-token-1", ttl: 3600)

    @Test("a token said to live more than 24 h (a ttl in milliseconds) is refused, not cached past its death")
    func aTokenLivingTooLongIsRefused() async throws {
        let h = Harness([.token(value: "opaque-user-token", ttl: 3_600_000)])
        try await h.running { () async throws -> Void in
            guard case .failure(let error) = await h.token() else {
                Issue.record("the token was answered")
                return
            }
            #expect("\(error)".contains("malformed answer"), "\(error)")
            #expect(h.store.storedToken(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test("concurrent callers share one exchange; the next caller is served from the cache")
    func coalescing() async throws {
        let h = Harness([Self.issued])
        h.client.hold()
        try await h.running { () async throws -> Void in
            try await withThrowingTaskGroup(of: Result<UserTokenExchanger.Answer, UserTokenError>.self) { group in
                for _ in 0..<5 { group.addTask { await h.token() } }
                await h.client.waitForCalls(1)
                h.client.release()
                for try await answer in group {
                    let answer = try answer.get()
                    #expect(answer.token.value == "user-token-1")
                    #expect(answer.source == .exchange)
                }
            }
            #expect(h.client.calls == ["sys-1"])
            let cached = try await h.token().get()
            #expect(cached.source == .cache)
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test("only the caller that starts an exchange is admitted (charged); callers joining it are not")
    func onlyTheStarterIsAdmitted() async throws {
        let h = Harness([Self.issued, .token(value: "user-token-2", ttl: 3600)])
        let admitted = Mutex(0)
        let admit: @Sendable () async throws(UserTokenError) -> Void = { admitted.withLock { $0 += 1 } }
        h.client.hold()
        try await h.running { () async throws -> Void in
            let first = Task { await h.token(admit: admit) }
            await h.client.waitForCalls(1)
            let joiners = (0..<4).map { _ in Task { await h.token(admit: admit) } }
            while h.exchanger.waiting(Self.installation) < 5 { await Task.yield() }
            #expect(admitted.withLock { $0 } == 1)
            h.client.release()
            #expect(try await first.value.get().token.value == "user-token-1")
            for joiner in joiners { #expect(try await joiner.value.get().token.value == "user-token-1") }
            // A forced refresh starts an exchange of its own: admitted.
            #expect(try await h.token(forceRefresh: true, admit: admit).get().token.value == "user-token-2")
            #expect(admitted.withLock { $0 } == 2)
            #expect(h.client.calls.count == 2)
        }
    }

    @Test("while another process holds the lease, the caller follows it and takes its token when announced")
    func followsAnotherProcess() async throws {
        let h = Harness([Self.issued])
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(5))
        try await h.running { () async throws -> Void in
            async let answer = h.token()
            // The caller's own deadline and the follower's wake-up at the lease's end.
            await h.clock.waitForSleepers(2)
            _ = try await h.store.store(
                Self.installation, accountId: Self.account.value,
                token: AccessToken(value: "from-other", expiresAt: h.clock.now().unixSeconds + 3600),
                cacheUntil: h.clock.now().unixSeconds + 3000, now: h.clock.now())
            let got = try await answer.get()
            #expect(got.token.value == "from-other")
            #expect(got.source == .exchange)
            #expect(h.client.calls.isEmpty)
        }
    }

    @Test("when the other process's lease runs out without an answer, the follower takes it and exchanges")
    func takesOverAnExpiredLease() async throws {
        let h = Harness([Self.issued])
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(3))
        try await h.running { () async throws -> Void in
            async let answer = h.token()
            await h.clock.waitForSleepers(2)
            h.clock.advance(by: .seconds(3))
            let got = try await answer.get()
            #expect(got.token.value == "user-token-1")
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseAttempts == 2)
        }
    }

    @Test("the lease won after another process just finished: its token is the answer, no call, the lease goes back")
    func wonAfterAnotherFinished() async throws {
        let h = Harness([Self.issued])
        h.store.finishElsewhereBeforeNextLease(
            AccessToken(value: "from-other", expiresAt: h.clock.now().unixSeconds + 3600))
        try await h.running { () async throws -> Void in
            let got = try await h.token().get()
            #expect(got.token.value == "from-other")
            #expect(got.source == .exchange)
            #expect(h.client.calls.isEmpty)
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test("a lease won after its round ended (the only caller went away meanwhile) goes straight back")
    func leaseWonForAnEndedRoundGoesBack() async throws {
        let h = Harness([Self.issued])
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(5))
        try await h.running { () async throws -> Void in
            let caller = Task { await h.token() }
            await h.clock.waitForSleepers(2)
            // The other process lets its lease go: the follower's take is in flight …
            h.store.holdLeaseTakes()
            try await h.store.releaseLease(Self.installation, accountId: Self.account.value, owner: "other")
            while h.store.leaseTakesHeld < 1 { await Task.yield() }
            // … when its only caller goes away.
            caller.cancel()
            if case .success = await caller.value { Issue.record("a cancelled caller was answered") }
            h.store.releaseLeaseTakes()
            // The take succeeds for a round that no longer runs: the lease goes back at once.
            while h.store.leaseAttempts < 2 { await Task.yield() }
            var spins = 0
            while h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil, spins < 100_000 {
                await Task.yield()
                spins += 1
            }
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
            #expect(h.client.calls.isEmpty)
        }
    }

    @Test(
        "a lease take whose answer is lost fails its caller and gives the lease back: the next caller exchanges at once"
    )
    func leaseTakeWithItsAnswerLost() async throws {
        let h = Harness([Self.issued])
        try await h.running { () async throws -> Void in
            h.store.loseNextLeaseAnswer()
            let first = await h.token()
            #expect(throws: UserTokenError.storeUnavailable) { try first.get() }
            // The take happened; the lease does not stay behind for the rest of its time.
            var spins = 0
            while h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil, spins < 100_000 {
                await Task.yield()
                spins += 1
            }
            // (Required: with the lease left, the next caller would follow it until it expires.)
            try #require(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
            // The next caller takes the lease and exchanges, without the clock moving.
            let second = try await h.token().get()
            #expect(second.token.value == "user-token-1")
            #expect(h.client.calls.count == 1)
        }
    }

    @Test("when the other process lets its lease go without an answer, the follower takes it at once and exchanges")
    func takesOverAReleasedLease() async throws {
        let h = Harness([Self.issued])
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(5))
        try await h.running { () async throws -> Void in
            async let answer = h.token()
            await h.clock.waitForSleepers(2)
            try await h.store.releaseLease(Self.installation, accountId: Self.account.value, owner: "other")
            let got = try await answer.get()
            #expect(got.token.value == "user-token-1")
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseAttempts == 2)
        }
    }

    @Test("a follower ends on the refusal the other process recorded, without a call")
    func followerEndsOnARefusal() async throws {
        let h = Harness([Self.issued])
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(5))
        try await h.running { () async throws -> Void in
            async let answer = h.token()
            await h.clock.waitForSleepers(2)
            try await h.store.rememberDenial(Self.installation, accountId: Self.account.value, for: .seconds(60))
            #expect(await answer.failure == .denied)
            #expect(h.client.calls.isEmpty)
        }
    }

    // MARK: A forced refresh in a round started for another token
    //
    // The user's cached token, "short-lived" (100 s), is too short for the first caller's default
    // `minValidity` (300 s): its round starts to replace it. Another process then stores
    // "from-other", and a caller that already has that one forces a refresh and joins the round.

    @Test(
        "the leader's re-read finds another process's token: it answers the caller that started the round, and a forced refresh of that token waits for the exchange"
    )
    func leaderRecheckKeepsAForcedRefresh() async throws {
        let h = Harness([Self.issued])
        try await h.storeElsewhere("short-lived", validFor: 100)
        try await h.running { () async throws -> Void in
            h.store.holdLeaseTakes()
            async let first = h.token()
            while h.store.leaseTakesHeld < 1 { await Task.yield() }
            // While the round's lease take is in flight, another process stores its token, and a
            // caller that already has that token forces a refresh: it joins the round.
            try await h.storeElsewhere("from-other", validFor: 3600)
            async let forced = h.token(forceRefresh: true)
            await h.clock.waitForSleepers(2)
            h.store.releaseLeaseTakes()
            #expect(try await first.get().token.value == "from-other")
            let refreshed = try await forced.get()
            #expect(refreshed.token.value == "user-token-1")
            #expect(refreshed.source == .exchange)
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    typealias FirstCaller = Task<Result<UserTokenExchanger.Answer, UserTokenError>, Never>

    /// Runs `body` while a first caller's round (its exchange brings `user-token-1`, the next one
    /// `user-token-2`) has written its token to the store and not heard back from the write: with
    /// the running harness, that caller, and whether it has been answered yet.
    static func whileTheFirstRoundStoresItsToken(
        _ body: @Sendable (Harness, FirstCaller, _ answered: @Sendable () -> Bool) async throws -> Void
    ) async throws {
        let h = Harness([Self.issued, .token(value: "user-token-2", ttl: 3601)])
        h.store.storeAnswers.hold()
        try await h.running { () async throws -> Void in
            let answered = Mutex(false)
            let first = Task {
                defer { answered.withLock { $0 = true } }
                return await h.token()
            }
            while h.store.storeAnswers.heldCount < 1 { await Task.yield() }
            try await body(h, first) { answered.withLock { $0 } }
        }
    }

    @Test(
        "a forced refresh that reads the token this process's round stored, before the round heard of it, gets a newer one from an exchange of its own"
    )
    func forcedRefreshOfTheRoundsOwnToken() async throws {
        try await Self.whileTheFirstRoundStoresItsToken { h, first, firstAnswered async throws in
            // A caller that already has that token (the first caller on another replica, say)
            // forces a refresh here: it joins (both wait) or the round ends with its token first.
            let forced = Task { await h.token(forceRefresh: true) }
            while h.exchanger.waiting(Self.installation) < 2, !firstAnswered() { await Task.yield() }
            h.store.storeAnswers.release()
            #expect(try await first.value.get().token.value == "user-token-1")
            let refreshed = try await forced.value.get()
            #expect(refreshed.token.value == "user-token-2")
            #expect(refreshed.source == .exchange)
            #expect(h.client.calls.count == 2)
            #expect(h.store.storedToken(Self.installation, accountId: Self.account.value)?.value == "user-token-2")
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test(
        "an exchange lease whose release failed while the store was unreachable goes back on the next resync, not when it runs out",
        .timeLimit(.minutes(1)))
    func owedReleaseGoesBackOnResync() async throws {
        let h = Harness([Self.issued])
        try await h.running(holding: [h.store.releases]) { () async throws -> Void in
            let caller = Task { await h.token() }
            // The round's release is on its way when the store stops answering.
            while h.store.releases.heldCount < 1, !Task.isCancelled { await Task.yield() }
            h.store.setUnreachable(true)
            h.store.releases.release()
            #expect(try await caller.value.get().token.value == "user-token-1")
            let key = UserTokenExchanger.FlightKey(installation: Self.installation, accountId: Self.account.value)
            let owed = { h.exchanger.state.withLock { $0.releasesOwed.owners(of: key) } }
            while owed().isEmpty, !Task.isCancelled { await Task.yield() }
            let owner = try #require(h.store.leaseOwner(Self.installation, accountId: Self.account.value))
            #expect(owed() == [owner])
            // The store answers again, and its notices are subscribed again: the lease goes back.
            h.store.setUnreachable(false)
            h.store.resubscribe()
            while h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil, !Task.isCancelled {
                await Task.yield()
            }
            #expect(owed().isEmpty)
        }
    }

    @Test(
        "a forced refresh that ends its round (the token it refuses was that round's) has its deadline held while the round's lease is released"
    )
    func forcedRefreshDeadlineDuringTheRelease() async throws {
        try await Self.whileTheFirstRoundStoresItsToken { h, first, _ async throws in
            // The round's lease is slow to go back (a slow store).
            h.store.releases.hold()
            let answered = Mutex(false)
            let forced = Task {
                defer { answered.withLock { $0 = true } }
                return await h.token(timeout: .seconds(1), forceRefresh: true)
            }
            while h.store.releases.heldCount < 1 { await Task.yield() }
            // Both callers' deadline timers are armed while the release is out, and the wait
            // for the deadline of the first round's caller (answered once the release ends, or then).
            for _ in 0..<100_000 where h.clock.sleeperCount < 3 { await Task.yield() }
            #expect(h.clock.sleeperCount == 3)
            h.clock.advance(by: .seconds(1))
            for _ in 0..<100_000 where !answered.withLock({ $0 }) { await Task.yield() }
            #expect(answered.withLock { $0 }, "the forced caller is answered at its deadline")
            h.store.releases.release()
            h.store.storeAnswers.release()
            #expect(await forced.value.failure == .timeout)
            #expect(try await first.value.get().token.value == "user-token-1")
            #expect(h.client.calls.count == 1)
            for _ in 0..<100_000 where h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil {
                await Task.yield()
            }
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test(
        "a follower's re-read finds a token a forced refresh in its round refuses: the others get it, the lease is taken and the forced caller gets a new one"
    )
    func followerRereadKeepsAForcedRefresh() async throws {
        let h = Harness([Self.issued])
        try await h.storeElsewhere("short-lived", validFor: 100)
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(3))
        try await h.running { () async throws -> Void in
            async let first = h.token()
            // The first caller's deadline and its wake-up at the other lease's end.
            await h.clock.waitForSleepers(2)
            try await h.storeElsewhere("from-other", validFor: 3600, notice: false)
            async let forced = h.token(forceRefresh: true)
            await h.clock.waitForSleepers(3)
            // The other process's lease runs out: the follower reads the store again.
            h.clock.advance(by: .seconds(3))
            #expect(try await first.get().token.value == "from-other")
            #expect(try await forced.get().token.value == "user-token-1")
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseAttempts == 2)
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test(
        "a refused lease take whose read finds a token a forced refresh refuses: the others get it, the forced caller follows to the next token"
    )
    func refusedTakeKeepsAForcedRefresh() async throws {
        let h = Harness([Self.issued])
        try await h.storeElsewhere("short-lived", validFor: 100)
        h.store.holdLease(Self.installation, accountId: Self.account.value, owner: "other", ttl: .seconds(5))
        try await h.running { () async throws -> Void in
            h.store.holdLeaseTakes()
            async let first = h.token()
            while h.store.leaseTakesHeld < 1 { await Task.yield() }
            try await h.storeElsewhere("from-other", validFor: 3600, notice: false)
            async let forced = h.token(forceRefresh: true)
            await h.clock.waitForSleepers(2)
            h.store.releaseLeaseTakes()
            #expect(try await first.get().token.value == "from-other")
            // The forced caller follows the other process's lease (its deadline and the wake-up
            // at the lease's end), and takes that process's next token.
            await h.clock.waitForSleepers(2)
            try await h.storeElsewhere("from-other-2", validFor: 3601)
            #expect(try await forced.get().token.value == "from-other-2")
            #expect(h.client.calls.isEmpty)
        }
    }

    @Test("a 401 fetches a fresh system token once and tries again; a second 401 fails the exchange")
    func systemTokenRetry() async throws {
        let h = Harness([.systemTokenRefused, Self.issued])
        try await h.running { () async throws -> Void in
            let got = try await h.token().get()
            #expect(got.token.value == "user-token-1")
            #expect(h.client.calls == ["sys-1", "sys-2"])
            #expect(h.systemTokens.forcedRefreshes == 1)
        }
        let twice = Harness([.systemTokenRefused])
        try await twice.running { () async throws -> Void in
            let result = await twice.token()
            #expect(result.failure == .exchangeFailed(""))
            #expect(twice.client.calls == ["sys-1", "sys-2"])
            #expect(twice.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
        }
    }

    @Test(
        "a system token Atlassian keeps refusing: one forced refresh a minute per installation, and no call with a token refused a moment ago"
    )
    func refusedSystemTokenIsNotRetriedPerUser() async throws {
        let h = Harness([.systemTokenRefused])
        try await h.running { () async throws -> Void in
            // The first user: sys-1 refused, a fresh sys-2 forced, refused too.
            #expect(await h.token().failure == .exchangeFailed(""))
            #expect(h.client.calls == ["sys-1", "sys-2"])
            #expect(h.systemTokens.forcedRefreshes == 1)
            // Other users within the minute: sys-2 was just refused and no fresh one is forced
            // again, so no call and no round trip.
            for n in 0..<3 {
                let other = try #require(UserAccountID("557058:other-\(n)"))
                #expect(await h.token(account: other).failure == .exchangeFailed(""))
            }
            #expect(h.client.calls == ["sys-1", "sys-2"])
            #expect(h.systemTokens.forcedRefreshes == 1)
            // A minute later: sys-2 is tried once more, then one more forced refresh.
            h.clock.advance(by: .seconds(61))
            let later = try #require(UserAccountID("557058:later"))
            #expect(await h.token(account: later).failure == .exchangeFailed(""))
            #expect(h.client.calls == ["sys-1", "sys-2", "sys-2", "sys-3"])
            #expect(h.systemTokens.forcedRefreshes == 2)
        }
        // A token another process renewed meanwhile is used at once, without a forced refresh.
        let renewed = Harness([.systemTokenRefused, .systemTokenRefused, Self.issued])
        try await renewed.running { () async throws -> Void in
            #expect(await renewed.token().failure == .exchangeFailed(""))
            #expect(renewed.systemTokens.forcedRefreshes == 1)
            renewed.systemTokens.renewElsewhere()
            let other = try #require(UserAccountID("557058:other"))
            #expect(try await renewed.token(account: other).get().token.value == "user-token-1")
            #expect(renewed.client.calls == ["sys-1", "sys-2", "sys-3"])
            #expect(renewed.systemTokens.forcedRefreshes == 1)
        }
    }

    @Test(
        "a user whose exchange is refused while a fresh system token is being fetched forces too, and gets a token",
        .timeLimit(.minutes(1)))
    func refusalDuringAForcedRefresh() async throws {
        let h = Harness([.systemTokenRefused, Self.issued])
        try await h.running { () async throws -> Void in
            h.systemTokens.holdForced()
            // The first user's call is refused; its fresh system token is on its way.
            async let first = h.token()
            while h.systemTokens.forcedHeld < 1 { await Task.yield() }
            // Another user's call with the same token is refused meanwhile: it forces too (in the
            // gateway it joins the same round trip) instead of failing.
            let other = try #require(UserAccountID("557058:other"))
            async let second = h.token(account: other)
            while h.systemTokens.forcedHeld < 2 { await Task.yield() }
            h.systemTokens.releaseForced()
            let (a, b) = await (first, second)
            #expect(try a.get().token.value == "user-token-1")
            #expect(try b.get().token.value == "user-token-1")
            // The second user made no call with the token just refused.
            #expect(h.client.calls.count == 3)
            #expect(h.client.calls.first == "sys-1")
            #expect(!h.client.calls.dropFirst().contains("sys-1"))
        }
    }

    @Test("a 429 holds every exchange back for Retry-After: the next request is refused without a call")
    func rateLimitHold() async throws {
        let h = Harness([.rateLimited(retryAfter: .seconds(30)), Self.issued])
        try await h.running { () async throws -> Void in
            let first = await h.token()
            #expect(first.failure == .rateLimited(retryAfter: .seconds(30)))
            #expect(first.failure?.retryAfter == .seconds(30))
            let systemTokensBefore = h.systemTokens.requests
            let second = await h.token()
            #expect(second.failure == .rateLimited(retryAfter: .zero))
            #expect(h.client.calls.count == 1)
            // Held back before the system token is fetched: no trigger round trip for nothing.
            #expect(h.systemTokens.requests == systemTokensBefore)
            h.clock.advance(by: .seconds(31))
            #expect(try await h.token().get().token.value == "user-token-1")
            #expect(h.client.calls.count == 2)
        }
    }

    @Test("no system token, no exchange: the shared budget is not charged")
    func failedSystemTokenChargesNothing() async throws {
        let h = Harness([Self.issued])
        h.systemTokens.fail(with: .noTriggerURL)
        try await h.running { () async throws -> Void in
            #expect(await h.token().failure != nil)
            let used = try await h.store.exchangesUsed(scope: "app", window: .seconds(60), now: h.clock.now())
            #expect(used == 0)
            #expect(h.client.calls.isEmpty)
        }
    }

    @Test("a system token that comes after the caller's deadline: no exchange, and the budget is not charged")
    func lateSystemTokenChargesNothing() async throws {
        let h = Harness([Self.issued])
        h.systemTokens.fetchTime.withLock { $0 = .seconds(2) }
        try await h.running { () async throws -> Void in
            #expect(await h.token(timeout: .seconds(1)).failure != nil)
            let used = try await h.store.exchangesUsed(scope: "app", window: .seconds(60), now: h.clock.now())
            #expect(used == 0)
            #expect(h.client.calls.isEmpty)
        }
    }

    @Test("a refusal is remembered: no call for that user until it is forgotten")
    func refusalMemory() async throws {
        let h = Harness([.denied(message: "no"), Self.issued]) { $0.denialMemory = .seconds(60) }
        try await h.running { () async throws -> Void in
            #expect(await h.token().failure == .denied)
            #expect(await h.token().failure == .denied)
            #expect(h.client.calls.count == 1)
            h.clock.advance(by: .seconds(61))
            #expect(try await h.token().get().token.value == "user-token-1")
            #expect(h.client.calls.count == 2)
        }
    }

    @Test("a refusal answered for an installation uninstalled meanwhile is 410, not 403, and nothing is remembered")
    func refusalAfterAnUnheardUninstall() async throws {
        let h = Harness([.denied(message: "no")])
        try await h.running { () async throws -> Void in
            h.client.hold()
            async let answer = h.token()
            await h.client.waitForCalls(1)
            h.store.uninstallUnannounced(Self.installation)
            h.client.release()
            #expect(await answer.failure == .flow(.installationUninstalled))
        }
    }

    @Test("retryable failures back off and try again; no attempt starts past the deadline")
    func retriesWithinTheDeadline() async throws {
        let h = Harness([.failed(.httpError(status: 503)), Self.issued])
        try await h.running { () async throws -> Void in
            async let answer = h.token()
            await h.client.waitForCalls(1)
            // The caller's deadline and the backoff timer.
            await h.clock.waitForSleepers(2)
            h.clock.advance(by: .seconds(1))
            #expect(try await answer.get().token.value == "user-token-1")
            #expect(h.client.calls.count == 2)
        }
        let late = Harness([.failed(.httpError(status: 503))]) {
            $0.backoffBase = .seconds(4)
            $0.backoffCap = .seconds(4)
        }
        try await late.running { () async throws -> Void in
            let result = await late.token(timeout: .seconds(2))
            #expect(result.failure == .exchangeFailed(""))
            #expect(late.client.calls.count == 1)
        }
    }

    @Test("a caller gives up at its deadline (504) while the exchange goes on for the others")
    func deadline() async throws {
        let h = Harness([Self.issued])
        h.client.hold()
        try await h.running { () async throws -> Void in
            async let short = h.token(timeout: .seconds(1))
            async let long = h.token(timeout: .seconds(10))
            await h.client.waitForCalls(1)
            await h.clock.waitForSleepers(2)
            h.clock.advance(by: .seconds(1))
            #expect(await short.failure == .timeout)
            h.client.release()
            #expect(try await long.get().token.value == "user-token-1")
        }
    }

    @Test("a caller that goes away is answered `cancelled`; the others still get the token")
    func cancellation() async throws {
        let h = Harness([Self.issued])
        h.client.hold()
        try await h.running { () async throws -> Void in
            let leaving = Task { await h.token() }
            async let staying = h.token()
            await h.client.waitForCalls(1)
            leaving.cancel()
            #expect(await leaving.value.failure == .flow(.cancelled))
            h.client.release()
            #expect(try await staying.get().token.value == "user-token-1")
        }
    }

    @Test("shutdown fails the waiting callers and releases the lease")
    func shutdown() async throws {
        let h = Harness([Self.issued])
        h.client.hold()
        let run = Task { try await h.exchanger.run() }
        async let waiting = h.token()
        await h.client.waitForCalls(1)
        #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil)
        run.cancel()
        #expect(await waiting.failure == .flow(.shuttingDown))
        h.client.release()
        _ = try? await run.value
        #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}

extension UserTokenExchangerTests {
    @Test(
        "an exchange round whose lease extension finds another owner stops leading: its callers get the token the new owner stores, with no second exchange",
        .timeLimit(.minutes(1))
    )
    func leaseLostToAnotherProcess() async throws {
        let h = Harness([Self.issued])
        let account = Self.account.value
        h.store.holdLeaseTakes()
        try await h.running(holding: [h.store.extensions, h.client.gate]) { () async throws -> Void in
            let (first, second) = try await Self.twoCallersLoseTheirLease(h, takenBy: "other")
            #expect(h.exchanger.roundState(Self.installation, accountId: account) == .following)
            // The other process stores its token: both callers get it.
            try await h.storeElsewhere("from-other", validFor: 3600)
            #expect(try await first.value.get().token.value == "from-other")
            #expect(try await second.value.get().token.value == "from-other")
            #expect(h.client.calls.count == 1)
            #expect(h.store.leaseOwner(Self.installation, accountId: account) == "other")
        }
    }
}

extension UserTokenExchangerTests {
    @Test(
        "a round's callers are answered once its lease is released, or at their deadline while a slow release is still out",
        .timeLimit(.minutes(1))
    )
    func releaseDoesNotKeepCallersPastTheirDeadline() async throws {
        let h = Harness([Self.issued])
        try await h.running(holding: [h.store.releases]) { () async throws -> Void in
            let caller = Task { await h.token(timeout: .seconds(1)) }
            // The exchange brought the token; the round's lease is slow to go back.
            while h.store.releases.heldCount < 1 { await Task.yield() }
            h.clock.advance(by: .seconds(1))
            // (Were the caller kept until the release ends, the time limit ends its wait.)
            let answer = try await withTaskCancellationHandler {
                try await caller.value.get()
            } onCancel: {
                h.store.releases.release()
            }
            #expect(answer.token.value == "user-token-1")
            #expect(answer.source == .exchange)
            #expect(h.store.releases.heldCount == 1)
            h.store.releases.release()
            while h.store.leaseOwner(Self.installation, accountId: Self.account.value) != nil, !Task.isCancelled {
                await Task.yield()
            }
            #expect(h.store.leaseOwner(Self.installation, accountId: Self.account.value) == nil)
            #expect(h.client.calls.count == 1)
        }
    }
}

extension UserTokenExchangerTests {
    /// Two callers (deadlines 1 s and 10 s) start a round whose lease, taken for the first one's
    /// deadline, is extended for the second's; the extension's answer is held while the lease is
    /// lost (and then held by `takenBy`, when given), so the round follows; attempt 1's exchange
    /// call is in flight. Lease takes, store extensions and exchange calls must be held when it is
    /// called.
    static func twoCallersLoseTheirLease(_ h: Harness, takenBy other: String?) async throws -> (
        first: Task<Result<UserTokenExchanger.Answer, UserTokenError>, Never>,
        second: Task<Result<UserTokenExchanger.Answer, UserTokenError>, Never>
    ) {
        let account = Self.account.value
        let first = Task { await h.token(timeout: .seconds(1)) }
        while h.store.leaseTakesHeld < 1, !Task.isCancelled { await Task.yield() }
        // A caller with a later deadline joins while the lease is taken for the first one's: once
        // taken, the lease is extended.
        let second = Task { await h.token(timeout: .seconds(10)) }
        while h.exchanger.waiting(Self.installation) < 2, !Task.isCancelled { await Task.yield() }
        h.store.releaseLeaseTakes()
        while h.store.extensions.heldCount < 1, !Task.isCancelled { await Task.yield() }
        await h.client.waitForCalls(1)
        // Meanwhile the lease was lost (and maybe another process took it), with no notice (as in
        // a failover): the round hears of it from the extension only.
        let ours = try #require(h.store.leaseOwner(Self.installation, accountId: account))
        h.store.dropsNotices = true
        try await h.store.releaseLease(Self.installation, accountId: account, owner: ours)
        h.store.dropsNotices = false
        if let other {
            #expect(
                try await h.store.acquireLease(Self.installation, accountId: account, owner: other, ttl: .seconds(30)))
        }
        h.store.extensions.release()
        while h.exchanger.roundState(Self.installation, accountId: account) != .following, !Task.isCancelled {
            await Task.yield()
        }
        return (first, second)
    }

    @Test(
        "a round that lost its lease and takes it again reads the store before its next exchange: a token stored meanwhile is the answer",
        .timeLimit(.minutes(1))
    )
    func leaseRetakenRereadsFirst() async throws {
        let h = Harness([Self.issued, .token(value: "user-token-2", ttl: 3600)])
        h.store.holdLeaseTakes()
        try await h.running(holding: [h.store.extensions, h.client.gate]) { () async throws -> Void in
            defer { h.store.releaseLeaseTakes() }
            let (first, second) = try await Self.twoCallersLoseTheirLease(h, takenBy: nil)
            // The re-read finds nothing and the lease is taken again; meanwhile another process
            // stores the user's token, its notice lost.
            h.store.holdLeaseTakes()
            h.clock.advance(by: .milliseconds(50))
            while h.store.leaseTakesHeld < 1, !Task.isCancelled { await Task.yield() }
            try await h.storeElsewhere("from-other", validFor: 3600, notice: false)
            h.store.releaseLeaseTakes()
            // Either the callers are answered, or a second exchange starts.
            while h.exchanger.waiting(Self.installation) > 0, h.client.calls.count < 2, !Task.isCancelled {
                await Task.yield()
            }
            #expect(h.client.calls.count == 1)
            h.client.release()
            #expect(try await first.value.get().token.value == "from-other")
            #expect(try await second.value.get().token.value == "from-other")
        }
    }
}

extension UserTokenExchangerTests {
    static let otherInstallation = InstallationID(
        "ari:cloud:ecosystem::installation/8f4c7a1e-0000-4000-8000-0000000000b2")!

    @Test(
        "the waiter caps count user-token callers from their store read on: past them (per installation, in all) a caller gets overloaded at once, counted",
        .timeLimit(.minutes(1))
    )
    func waiterCapsCountReaders() async throws {
        let registry = PrometheusCollectorRegistry()
        let h = Harness(
            [Self.issued, .token(value: "user-token-b", ttl: 3600)],
            metrics: PrometheusMetricsFactory(registry: registry)
        ) {
            $0.maxWaitersPerInstallation = 2
            $0.maxWaiters = 3
        }
        h.store.install(
            Self.otherInstallation,
            .init(apiBaseUrl: "https://api.atlassian.com/ex/jira/\(Self.cloud)", cloudId: Self.cloud))
        @Sendable func isOverloaded(_ answer: Result<UserTokenExchanger.Answer, UserTokenError>) -> Bool {
            if case .failure(.flow(.overloaded)) = answer { return true }
            return false
        }
        try await h.running(holding: [h.store.snapshots, h.client.gate]) { () async throws -> Void in
            // Two callers of one installation read the store (their reads held): a third is over
            // the installation's cap before it reads.
            let a = [Task { await h.token() }, Task { await h.token() }]
            while h.store.snapshots.heldCount < 2, !Task.isCancelled { await Task.yield() }
            #expect(isOverloaded(await h.token()))
            // One of another installation reads too: a fourth, of any installation, is over the total.
            let b = Task { await h.token(installation: Self.otherInstallation) }
            while h.store.snapshots.heldCount < 3, !Task.isCancelled { await Task.yield() }
            #expect(isOverloaded(await h.token(installation: Self.otherInstallation)))
            // The reads end; the callers wait for their exchanges (held), and count as waiters now.
            h.store.snapshots.release()
            while h.exchanger.waiting(Self.installation) < 2 || h.exchanger.waiting(Self.otherInstallation) < 1,
                !Task.isCancelled
            {
                await Task.yield()
            }
            #expect(isOverloaded(await h.token()))
            #expect(h.store.snapshots.heldCount == 0)
            h.client.release()
            // One exchange per installation (the two in either order): the first installation's
            // callers share theirs.
            let (a0, a1) = (try await a[0].value.get().token.value, try await a[1].value.get().token.value)
            let b0 = try await b.value.get().token.value
            #expect(a0 == a1)
            #expect(Set([a0, b0]) == ["user-token-1", "user-token-b"])
            #expect(h.client.calls.count == 2)
            // Once answered, there is room again.
            #expect(try await h.token().get().source == .cache)
            var bytes: [UInt8] = []
            registry.emit(into: &bytes)
            let line = String(decoding: bytes, as: UTF8.self).split(separator: "\n").first {
                $0.hasPrefix("token_gateway_overloaded_requests_total ")
            }
            #expect(line.flatMap { Double($0.split(separator: " ").last ?? "") } == 3)
        }
    }
}

extension UserTokenExchangerTests {
    @Test(
        "a lease is forgotten only for its owner, and only for the take named when one is: its re-read due goes with it"
    )
    func forgetLeaseConcernsItsTake() {
        let key = UserTokenExchanger.FlightKey(installation: Self.installation, accountId: Self.account.value)
        var s = UserTokenExchanger.State()
        s.leasesHeld[key] = "ux_1"
        s.nextLeaseTake = 2
        s.leaseTakes[key] = 2
        s.recheckDue[key] = 2
        let older = s.forgetLease(key, owner: "ux_1", take: 1)
        let another = s.forgetLease(key, owner: "ux_2")
        #expect(!older && !another)
        #expect(s.leasesHeld[key] == "ux_1" && s.leaseTakes[key] == 2 && s.recheckDue[key] == 2)
        let current = s.forgetLease(key, owner: "ux_1", take: 2)
        #expect(current)
        #expect(s.leasesHeld[key] == nil && s.leaseTakes[key] == nil && s.recheckDue[key] == nil)
        s.leasesHeld[key] = "ux_1"
        s.leaseTakes[key] = 3
        let any = s.forgetLease(key, owner: "ux_1")
        #expect(any && s.leasesHeld[key] == nil)
    }
}
