import Logging
import Metrics
import Prometheus
import Synchronization
import Testing

@testable import FlowEngine

/// A trigger that records every call (as a stream the test awaits) and answers as told.
private final class RecordingTrigger: TriggerSender {
    struct Call: Sendable {
        var installation: InstallationID
        var requestID: String
        var attempt: Int
        /// What the store read for the call along with the round's lease.
        var material: TriggerMaterialRead?
    }

    let calls: AsyncStream<Call>
    private let continuation: AsyncStream<Call>.Continuation
    private let answer = Mutex<TriggerAttemptResult>(.accepted)
    private let count = Mutex(0)
    private let hook = Mutex<(@Sendable (Call) -> Void)?>(nil)
    /// Calls wait here, once recorded, before they are answered (while held).
    let gate = TestGate()

    init() {
        (self.calls, self.continuation) = AsyncStream.makeStream(of: Call.self)
    }

    var callCount: Int { self.count.withLock { $0 } }

    func answer(with result: TriggerAttemptResult) { self.answer.withLock { $0 = result } }

    /// Runs `body` with each call before it is answered (what happens on Forge's side meanwhile).
    func whenCalled(_ body: (@Sendable (Call) -> Void)?) { self.hook.withLock { $0 = body } }

    func triggerMaterialQuery(for installation: InstallationID) -> TriggerMaterialQuery? {
        TriggerMaterialQuery(heldKeyID: "key-held")
    }

    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult {
        await self.sendTrigger(
            installation: installation, requestID: requestID, attempt: attempt, issuedAt: issuedAt,
            expiresAt: expiresAt, timeout: timeout, material: nil)
    }

    func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration, material: TriggerMaterialRead?
    ) async -> TriggerAttemptResult {
        self.count.withLock { $0 += 1 }
        let call = Call(installation: installation, requestID: requestID, attempt: attempt, material: material)
        self.hook.withLock { $0 }?(call)
        self.continuation.yield(call)
        await self.gate.pass()
        return self.answer.withLock { $0 }
    }
}

/// An observer whose work waits until ``open()`` and then records whether it was cancelled.
private final class GatedObserver: TokenFlowObserver {
    private let state = Mutex((open: false, waiting: [CheckedContinuation<Void, Never>](), finished: [Bool]()))

    var finished: [Bool] { self.state.withLock { $0.finished } }

    func open() {
        let waiting = self.state.withLock { state in
            state.open = true
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }

    func tokenFlow(performs actions: [FlowAction], for installation: InstallationID, at now: FlowTime)
        -> (@Sendable () async -> Void)?
    {
        return {
            await withCheckedContinuation { continuation in
                let ready = self.state.withLock { state in
                    if !state.open { state.waiting.append(continuation) }
                    return state.open
                }
                if ready { continuation.resume() }
            }
            let cancelled = Task.isCancelled
            self.state.withLock { $0.finished.append(cancelled) }
        }
    }
}

private struct Harness {
    let flow: TokenFlow
    let store: InMemoryTokenStore
    let clock: ManualFlowClock
    let trigger: RecordingTrigger
    let id = InstallationID("ari:cloud:ecosystem::installation/3f6c2a10-7c1e-4c55-9a57-0d8f1c7b2e41")!

    /// The next trigger call.
    func nextCall() async -> RecordingTrigger.Call? {
        var iterator = self.trigger.calls.makeAsyncIterator()
        return await iterator.next()
    }

    /// Delivers a token as a Forge route of this process does: stores it, then hands it to the flow.
    func deliver(_ value: String, expiresIn: Int64, requestID: String?) {
        let expiresAt = self.clock.now().unixSeconds + expiresIn
        if let requestID { self.flow.deliveryArriving(self.id, requestID: requestID) }
        let (stored, solicited) = self.store.deliver(self.id, token: value, expiresAt: expiresAt, requestID: requestID)
        guard stored else { return }
        let rid = solicited ? requestID : nil
        self.flow.tokenDelivered(
            self.id,
            token: AccessToken(
                value: value, expiresAt: expiresAt, requestID: rid, receivedAt: self.clock.now().unixSeconds),
            solicitedBy: rid)
    }

    /// Another replica stores `value` (valid for an hour); its announcement, and every one after
    /// it until the test lets them through again, is lost.
    func storeElsewhereUnannounced(_ value: String) {
        self.store.dropsNotifications = true
        self.store.deliver(self.id, token: value, expiresAt: self.clock.now().unixSeconds + 3600, requestID: nil)
    }

    /// Another replica takes the installation's lease: its round trip is in flight.
    func otherReplicaLeads() async throws {
        _ = try await self.store.takeLease(
            self.id, requestID: "rq_other", replicaID: "replica-b", ttl: .seconds(30), respectingHold: false)
    }

    /// Fires the follower's re-read timer (the re-read finds nothing) and holds the lease take
    /// that follows it in flight, until ``InMemoryTokenStore/release(_:)``.
    func holdTheTakeAfterAnEmptyReread() async {
        self.store.hold(.takeLease)
        self.clock.advance(by: .milliseconds(50))
        while self.store.held(.takeLease) < 1 { await Task.yield() }
    }

    /// A token with 100 s left in memory, and a caller that wants 300 s: this process leads the
    /// round, and the store stops answering during its trigger call (Forge's delivery cannot be
    /// stored: the trigger answers 502). Returns the caller's answer.
    func leadIntoStoreOutage() async throws -> TokenAnswer {
        self.deliver("tok-short", expiresIn: 100, requestID: nil)
        self.trigger.answer(with: .failed(.httpError))
        let store = self.store
        self.trigger.whenCalled { _ in store.isUnavailable = true }
        return try await self.request(.init(minValidity: 300)).get()
    }

    func request(_ options: TokenFlow.Request = .init()) async -> Result<TokenAnswer, FlowError> {
        do {
            return .success(try await self.flow.token(for: self.id, request: options))
        } catch {
            return .failure(error)
        }
    }
}

extension Harness {
    /// A flow on an in-memory store and a manual clock, with the installation in the store; the
    /// test runs it (`run()`) and shuts it down itself.
    static func make(observer: (any TokenFlowObserver)? = nil) -> Harness {
        let clock = ManualFlowClock()
        let store = InMemoryTokenStore(now: { clock.now() })
        let trigger = RecordingTrigger()
        let flow = TokenFlow(
            configuration: TokenFlowConfiguration(), store: store, trigger: trigger,
            metrics: FlowMetrics(factory: NOOPMetricsHandler.instance),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), replicaID: "replica-a",
            observer: observer, clock: clock)
        let h = Harness(flow: flow, store: store, clock: clock, trigger: trigger)
        store.install(h.id)
        return h
    }
}

private func withFlow(
    _ configure: (inout TokenFlowConfiguration) -> Void = { _ in },
    metrics: FlowMetrics = FlowMetrics(factory: NOOPMetricsHandler.instance), _ body: (Harness) async throws -> Void
) async throws {
    let clock = ManualFlowClock()
    let store = InMemoryTokenStore(now: { clock.now() })
    let trigger = RecordingTrigger()
    var configuration = TokenFlowConfiguration()
    configure(&configuration)
    let flow = TokenFlow(
        configuration: configuration, store: store, trigger: trigger, metrics: metrics,
        logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), replicaID: "replica-a",
        clock: clock)
    let harness = Harness(flow: flow, store: store, clock: clock, trigger: trigger)
    store.install(harness.id)
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await flow.run() }
        // run() listens to the store's announcements before the test publishes any (and has
        // handled its subscription's start, which drops what it remembers).
        while flow.subscriptionsHandled == 0 { await Task.yield() }
        do {
            try await body(harness)
        } catch {
            await flow.shutdown()
            throw error
        }
        await flow.shutdown()
        try await group.waitForAll()
    }
}

@Suite("TokenFlow executor (in-memory store, manual clock)", .timeLimit(.minutes(1)))
struct TokenFlowExecutorTests {
    @Test("concurrent callers share one round trip: one lease, one trigger call, one token for all")
    func coalescing() async throws {
        try await withFlow { h in
            try await withThrowingTaskGroup(of: Result<TokenAnswer, FlowError>.self) { group in
                for _ in 0..<5 { group.addTask { await h.request() } }
                let call = try #require(await h.nextCall())
                #expect(h.store.pendingOwner(h.id, requestID: call.requestID) == "replica-a")
                #expect(h.store.leaseOwner(h.id) == call.requestID)
                // Every caller waits (its deadline timer armed, with the round's grace and re-read
                // timers) before the token arrives.
                await h.clock.waitForSleepers(7)
                h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
                for try await result in group {
                    let answer = try result.get()
                    #expect(answer.token.value == "tok-1")
                    #expect(answer.source == .trigger)
                }
            }
            #expect(h.trigger.callCount == 1)
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            #expect(h.store.calls("takeLease") == 0)
            // The lease is released once the round trip ended, in the same step as its verdict.
            while h.store.leaseOwner(h.id) != nil { await Task.yield() }
            #expect(h.store.calls("recordRoundOutcomeReleasingLease") == 1)
            #expect(h.store.calls("releaseLease") == 0)
            #expect(h.store.calls("recordRoundOutcome") == 0)
        }
    }

    @Test(
        "a lease a snapshot took ahead is not given back while the round named for it is about to take it over (a caller ending meanwhile on another thread)"
    )
    func leaseAheadKeptForTheRoundNamedForIt() {
        let id = InstallationID("ari:cloud:ecosystem::installation/3f6c2a10-7c1e-4c55-9a57-0d8f1c7b2e41")!
        let now = FlowTime(unixSeconds: 1_763_906_400)
        var s = TokenFlow.State()
        let lease = SnapshotLease(requestID: "rq_ahead", material: nil, expires: now + .seconds(12))
        s.leaseAhead[id] = lease
        var machine = TokenFlowStateMachine(configuration: TokenFlowConfiguration(), firstTimerID: 1)
        let started = machine.tokenWasRequested(
            waiter: WaiterID(1), minValidity: 300, knownExpiry: 0, forced: false, deadline: now + .seconds(10),
            requestID: "rq_ahead", now: now)
        #expect(started.contains { if case .acquireLease(requestID: "rq_ahead", _, _) = $0 { true } else { false } })
        s.machines[id] = machine
        // The round started by one caller is named for the lease; a second caller, which joined it
        // and ends its request before the round's start is performed, leaves the lease alone.
        #expect(s.takeUnusedLeaseAhead(id, named: "rq_ahead") == nil)
        #expect(s.leaseAhead[id] == lease)
        // A lease of another name, or with no round named for it, is given back.
        #expect(s.takeUnusedLeaseAhead(id, named: "rq_other") == nil)
        s.machines[id] = nil
        #expect(s.takeUnusedLeaseAhead(id, named: "rq_ahead") == lease)
        #expect(s.leaseAhead[id] == nil)
    }

    @Test("callers arriving while this process's round trip is in flight join it: no store read, no lease extension")
    func joinersSkipTheStore() async throws {
        try await withFlow { h in
            try await withThrowingTaskGroup(of: Result<TokenAnswer, FlowError>.self) { group in
                group.addTask { await h.request() }
                let call = try #require(await h.nextCall())
                // The first caller's deadline timer and the round's grace and re-read timers.
                await h.clock.waitForSleepers(3)
                #expect(h.store.calls("snapshot") == 1)
                for _ in 0..<4 { group.addTask { await h.request() } }
                await h.clock.waitForSleepers(7)
                #expect(h.store.calls("snapshot") == 1)
                #expect(h.store.calls("extendLease") == 0)
                h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
                var answers = 0
                for try await result in group {
                    let answer = try result.get()
                    #expect(answer.token.value == "tok-1")
                    #expect(answer.source == .trigger)
                    answers += 1
                }
                #expect(answers == 5)
            }
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("the trigger material read with the round's lease goes to its first trigger call only; a retry reads anew")
    func leaseMaterialServesTheFirstAttempt() async throws {
        try await withFlow({ $0.maxAttempts = 2 }) { h in
            let read = TriggerMaterialRead(
                status: "active", sealedURL: "sealed-url", keyID: "key-2", nextActivatesAt: nil, sealedKey: "sealed-key"
            )
            h.store.setTriggerMaterial(read, for: h.id)
            h.trigger.answer(with: .failed(.httpError))
            async let answer = h.request()
            var calls = h.trigger.calls.makeAsyncIterator()
            let first = try #require(await calls.next())
            #expect(first.attempt == 1)
            #expect(first.material == read)
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            #expect(h.store.calls("takeLease") == 0)
            // The first call failed: the retry waits out its backoff (at most 100 ms for the first
            // retry), then reads its own material.
            h.trigger.answer(with: .accepted)
            // The caller's deadline timer and the backoff timer.
            await h.clock.waitForSleepers(2)
            h.clock.advance(by: .milliseconds(100))
            let second = await calls.next()
            #expect(second?.attempt == 2)
            #expect(second?.material == nil)
            h.deliver("tok-1", expiresIn: 3600, requestID: first.requestID)
            #expect(try await answer.get().token.value == "tok-1")
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            #expect(h.store.calls("takeLease") == 0)
        }
    }

    @Test("the store leaves out the sealed key the trigger sender says it holds")
    func leaseMaterialSparesTheHeldKey() async throws {
        try await withFlow { h in
            let read = TriggerMaterialRead(
                status: "active", sealedURL: "sealed-url", keyID: "key-held", nextActivatesAt: nil,
                sealedKey: "sealed-key")
            h.store.setTriggerMaterial(read, for: h.id)
            async let answer = h.request()
            let call = try #require(await h.nextCall())
            var expected = read
            expected.sealedKey = nil
            #expect(call.material == expected)
            await h.clock.waitForSleepers(3)
            h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
            #expect(try await answer.get().token.value == "tok-1")
        }
    }

    @Test("callers arriving while a store read for their installation is in flight share it: one snapshot")
    func callersShareASnapshotInFlight() async throws {
        try await withFlow { h in
            h.store.holdSnapshots()
            try await withThrowingTaskGroup(of: Result<TokenAnswer, FlowError>.self) { group in
                group.addTask { await h.request() }
                while h.store.snapshotsHeld < 1 { await Task.yield() }
                for _ in 0..<4 { group.addTask { await h.request() } }
                // The four wait for the read in flight: no snapshot of their own, no round yet.
                while h.flow.snapshotFollowers(h.id) + h.store.snapshotsHeld < 5 { await Task.yield() }
                #expect(h.flow.snapshotFollowers(h.id) == 4)
                #expect(h.store.snapshotsHeld == 1)
                #expect(!h.flow.isRoundActive(h.id))
                h.store.releaseSnapshots()
                let call = try #require(await h.nextCall())
                // Every caller's deadline timer and the round's grace and re-read timers.
                await h.clock.waitForSleepers(7)
                h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
                var answers = 0
                for try await result in group {
                    #expect(try result.get().token.value == "tok-1")
                    answers += 1
                }
                #expect(answers == 5)
            }
            #expect(h.store.calls("snapshot") == 1)
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            #expect(h.store.calls("takeLease") == 0)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test(
        "a forced refresh arriving while a store read is on its way back reads for itself: the token it replaces may be newer than that read"
    )
    func forcedRefreshDoesNotShareAnEarlierRead() async throws {
        try await withFlow { h in
            h.store.deliver(h.id, token: "tok-0", expiresAt: h.clock.now().unixSeconds + 3600, requestID: nil)
            h.store.hold(.snapshotAnswer)
            async let first = h.request()
            while h.store.held(.snapshotAnswer) < 1 { await Task.yield() }
            // Meanwhile another replica stores tok-1 (its announcement lost), and a caller that got
            // tok-1 there forces a refresh here.
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-1", expiresAt: h.clock.now().unixSeconds + 3601, requestID: nil)
            async let forced = h.request(.init(forceRefresh: true))
            while h.flow.snapshotFollowers(h.id) + h.store.held(.snapshotAnswer) < 2 { await Task.yield() }
            #expect(h.flow.snapshotFollowers(h.id) == 0)
            h.store.release(.snapshotAnswer)
            #expect(try await first.get().token.value == "tok-0")
            let call = try #require(await h.nextCall())
            h.deliver("tok-2", expiresIn: 3602, requestID: call.requestID)
            let refreshed = try await forced.get()
            #expect(refreshed.token.value == "tok-2")
            #expect(refreshed.source == .trigger)
            #expect(h.trigger.callCount == 1)
            #expect(h.store.calls("snapshot") == 2)
        }
    }

    @Test("a lease whose take ran but whose answer was lost (a timeout) is given back, not left to run out")
    func lostLeaseAnswerIsGivenBack() async throws {
        try await withFlow { h in
            h.store.loseAnswer(of: "snapshot")
            await #expect(throws: FlowError.storeUnavailable) { try await h.request().get() }
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            var turns = 0
            while h.store.leaseOwner(h.id) != nil, turns < 100_000 {
                await Task.yield()
                turns += 1
            }
            #expect(h.store.leaseOwner(h.id) == nil)
            // The next caller leads a round at once (no lease of nobody's to wait out).
            async let answer = h.request()
            let call = try #require(await h.nextCall())
            h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
            #expect(try await answer.get().token.value == "tok-1")
        }
    }

    @Test(
        "a caller cancelled before it is admitted is answered cancelled; the trigger call its round made is seen through, then the round ends"
    )
    func cancelledBeforeAdmission() async throws {
        try await withFlow { h in
            let result = await Task { () -> Result<TokenAnswer, FlowError> in
                withUnsafeCurrentTask { $0?.cancel() }
                return await h.request()
            }.value
            #expect(throws: FlowError.cancelled) { try result.get() }
            // The round's trigger call had gone out: it answered 2xx, so the round waits out the
            // delivery grace, with nobody waiting, then ends without trying again.
            let call = try #require(await h.nextCall())
            await h.clock.waitForSleepers(2)
            #expect(h.flow.isRoundActive(h.id))
            #expect(h.store.leaseOwner(h.id) == call.requestID)
            h.clock.advance(by: TokenFlowConfiguration().deliveryGrace)
            var turns = 0
            while h.flow.isRoundActive(h.id) || h.store.leaseOwner(h.id) != nil, turns < 100_000 {
                await Task.yield()
                turns += 1
            }
            #expect(!h.flow.isRoundActive(h.id))
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("a pushed token in its refresh-ahead window: one store read learns of the trigger, however many are served")
    func oneTriggerCheckPerInstallation() async throws {
        try await withFlow { h in
            let now = h.clock.now().unixSeconds
            // Pushed (no store read yet), in the last quarter of its lifetime.
            let pushed = AccessToken(value: "tok-pushed", expiresAt: now + 600, requestID: nil, receivedAt: now - 3000)
            h.flow.tokenDelivered(h.id, token: pushed, solicitedBy: nil)
            h.store.holdSnapshots()
            for _ in 0..<20 {
                let answer = try await h.request(.init(minValidity: 60)).get()
                #expect(answer.token.value == "tok-pushed")
            }
            while h.store.snapshotsHeld < 1 { await Task.yield() }
            // Time for any other read to reach the store (none should).
            for _ in 0..<1000 { await Task.yield() }
            #expect(h.store.snapshotsHeld == 1)
            h.store.releaseSnapshots()
        }
    }

    @Test("a token stored just before an uninstall that this process handled first is not remembered")
    func deliveryOvertakenByUninstall() async throws {
        try await withFlow { h in
            let expiresAt = h.clock.now().unixSeconds + 3600
            let token = AccessToken(value: "tok-late", expiresAt: expiresAt, requestID: nil)
            // The delivery's route took the generation, then the store took the token; meanwhile
            // the uninstall was handled here.
            let generation = h.flow.deliveryGeneration()
            h.flow.installationUninstalled(h.id)
            h.flow.tokenDelivered(h.id, token: token, solicitedBy: nil, storedAt: generation)
            #expect(h.flow.rememberedToken(h.id) == nil)
            #expect(h.flow.remembered(h.id).token == nil)
            // Without an uninstall in between it is remembered as before.
            h.flow.tokenDelivered(h.id, token: token, solicitedBy: nil, storedAt: h.flow.deliveryGeneration())
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-late")
        }
    }

    @Test("a lease the snapshot took ahead that no round takes over is given back")
    func leaseTakenAheadIsGivenBack() async throws {
        try await withFlow { h in
            h.store.holdSnapshots()
            async let answer = h.request()
            while h.store.snapshotsHeld < 1 { await Task.yield() }
            // While the store is read (it holds no token), this process learns of one.
            let expiresAt = h.clock.now().unixSeconds + 3600
            h.flow.tokenDelivered(
                h.id, token: AccessToken(value: "tok-pushed", expiresAt: expiresAt, requestID: nil), solicitedBy: nil)
            h.store.releaseSnapshots()
            let got = try await answer.get()
            #expect(got.token.value == "tok-pushed")
            // The snapshot took the lease for a round no caller needed any more: given back.
            #expect(h.store.calls("leaseWithSnapshot") == 1)
            while h.store.leaseOwner(h.id) != nil { await Task.yield() }
            #expect(h.store.calls("releaseLease") == 1)
            #expect(h.trigger.callCount == 0)
            #expect(!h.flow.isRoundActive(h.id))
        }
    }

    @Test("a store read that fails fails the callers that shared it; the next caller reads again")
    func sharedSnapshotFailure() async throws {
        try await withFlow { h in
            h.store.holdSnapshots()
            async let first = h.request()
            while h.store.snapshotsHeld < 1 { await Task.yield() }
            async let second = h.request()
            while h.flow.snapshotFollowers(h.id) + h.store.snapshotsHeld < 2 { await Task.yield() }
            #expect(h.flow.snapshotFollowers(h.id) == 1)
            h.store.isUnavailable = true
            h.store.releaseSnapshots()
            let (a, b) = await (first, second)
            #expect(throws: FlowError.storeUnavailable) { try a.get() }
            #expect(throws: FlowError.storeUnavailable) { try b.get() }
            #expect(h.store.calls("snapshot") == 1)
            h.store.isUnavailable = false
            h.store.deliver(h.id, token: "tok-1", expiresAt: h.clock.now().unixSeconds + 3600, requestID: nil)
            let third = try await h.request().get()
            #expect(third.token.value == "tok-1")
            #expect(h.store.calls("snapshot") == 2)
        }
    }

    @Test("a caller sharing a slow store read gives up when its own read would have timed out; the reader goes on")
    func sharedSnapshotFollowerDeadline() async throws {
        try await withFlow { h in
            h.store.holdSnapshots()
            async let first = h.request()
            while h.store.snapshotsHeld < 1 { await Task.yield() }
            // A caller with the shortest timeout joins the read in flight (the reader's runs 2 s).
            async let second = h.request(.init(timeout: .milliseconds(100)))
            while h.flow.snapshotFollowers(h.id) < 1 { await Task.yield() }
            await h.clock.waitForSleepers(1)
            h.clock.advance(by: .milliseconds(100))
            // Answered at its deadline while the read is still held: as a read of its own that
            // timed out would be (nothing valid in memory).
            let late = await second
            #expect(throws: FlowError.storeUnavailable) { try late.get() }
            #expect(h.flow.snapshotFollowers(h.id) == 0)
            #expect(h.store.snapshotsHeld == 1)
            // The reader's read goes on, and answers it.
            h.store.deliver(h.id, token: "tok-1", expiresAt: h.clock.now().unixSeconds + 3600, requestID: nil)
            h.store.releaseSnapshots()
            let read = try await first.get()
            #expect(read.token.value == "tok-1")
            #expect(h.store.calls("snapshot") == 1)
        }
    }

    @Test(
        "a shared store read that timed out by its reader's shorter deadline: a caller with time left reads for itself")
    func sharedSnapshotReaderTimedOutFirst() async throws {
        try await withFlow { h in
            h.store.deliver(h.id, token: "tok-1", expiresAt: h.clock.now().unixSeconds + 3600, requestID: nil)
            h.store.holdSnapshots()
            // The reader asks with the shortest timeout; its read will time out (its answer lost).
            async let first = h.request(.init(timeout: .milliseconds(100)))
            while h.store.snapshotsHeld < 1 { await Task.yield() }
            async let second = h.request()
            while h.flow.snapshotFollowers(h.id) < 1 { await Task.yield() }
            h.store.loseAnswer(of: "snapshot")
            h.store.releaseSnapshots()
            let (a, b) = await (first, second)
            #expect(throws: FlowError.storeUnavailable) { try a.get() }
            // The second caller's own read had 2 s: it read again, and got the token.
            let got = try b.get()
            #expect(got.token.value == "tok-1")
            #expect(h.store.calls("snapshot") == 2)
        }
    }

    @Test("following another replica's round trip: its announced token answers the caller, no trigger call")
    func followByNotification() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            async let answer = h.request()
            // The caller's deadline and the follower's re-read timer.
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            h.store.deliver(h.id, token: "tok-b", expiresAt: h.clock.now().unixSeconds + 3600, requestID: "rq_other")
            let result = try await answer.get()
            #expect(result.token.value == "tok-b")
            #expect(result.source == .trigger)
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test(
        "following a round another replica ends by opening the circuit: the followers get circuit_open, no trigger call"
    )
    func followedRoundOpensTheCircuit() async throws {
        try await withFlow({ $0.breakerThreshold = 1 }) { h in
            try await h.otherReplicaLeads()
            async let answer = h.request(.init(timeout: .seconds(20)))
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            // The other replica's round fails: its verdict opens the circuit and releases its lease
            // in one step. (Circuits are not announced: the follower finds out by its re-read.)
            let openUntil = try await h.store.recordRoundOutcome(
                h.id, succeeded: false, threshold: 1, openBase: .seconds(30), openCap: .seconds(300),
                now: h.clock.now(), releasingLease: "rq_other")
            #expect(openUntil != nil)
            // The re-read finds no token; the lease is free, but the circuit is open.
            h.clock.advance(by: .milliseconds(50))
            let followed = await answer
            #expect(throws: FlowError.circuitOpen(retryAfter: .zero)) { try followed.get() }
            if case .failure(let error) = followed { #expect(error.retryAfter == .seconds(30) - .milliseconds(50)) }
            #expect(h.trigger.callCount == 0)
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(h.flow.roundState(h.id) == .circuitOpen)
            // Callers arriving now are failed fast the same way, still without a call.
            let next = await h.request()
            #expect(throws: FlowError.circuitOpen(retryAfter: .zero)) { try next.get() }
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test(
        "a forced refresh's snapshot that reads the token of the round a replica follows answers the followers at once"
    )
    func snapshotAnswersFollowers() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            let first = Task { await h.request() }
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            // The other replica's token is stored; its announcement comes late.
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-b", expiresAt: h.clock.now().unixSeconds + 3600, requestID: "rq_other")
            // A forced refresh on this replica reads the store (it does not join the round): it
            // reads that token, and keeps it in memory.
            let reads = h.store.calls("snapshot")
            let forced = Task { await h.request(.init(forceRefresh: true)) }
            await TokenFlowExecutorTests.yield { h.store.calls("snapshot") > reads }
            // The follower's caller is answered without its re-read timer (the clock stays put).
            await TokenFlowExecutorTests.yield { h.flow.roundState(h.id) != .following }
            try #require(h.flow.roundState(h.id) != .following)
            #expect(try await first.value.get().token.value == "tok-b")
            // The announcement, late: already handled, it answers nobody twice.
            h.store.dropsNotifications = false
            h.store.publish(.tokenStored(h.id, requestID: "rq_other", sameToken: false))
            #expect(h.trigger.callCount == 0)
            // (The forced refresh follows the other replica's lease; shutdown answers it.)
            forced.cancel()
            _ = await forced.value
        }
    }

    @Test("a lease take finds a later token before an open circuit: the round's callers take the token")
    func laterTokenBeatsAnOpenCircuit() async throws {
        try await withFlow { h in
            _ = try await h.store.recordRoundOutcome(
                h.id, succeeded: false, threshold: 1, openBase: .seconds(30), openCap: .seconds(300),
                now: h.clock.now())
            let now = h.clock.now().unixSeconds
            #expect(
                try await h.store.takeLease(
                    h.id, requestID: "rq_x", replicaID: "replica-b", ttl: .seconds(5), respectingHold: true,
                    unlessNewerThan: now) == .circuitOpen(until: h.clock.now() + .seconds(30)))
            h.store.deliver(h.id, token: "tok-later", expiresAt: now + 3600, requestID: nil)
            #expect(
                try await h.store.takeLease(
                    h.id, requestID: "rq_x", replicaID: "replica-b", ttl: .seconds(5), respectingHold: true,
                    unlessNewerThan: now) == .newerStored)
            #expect(h.store.leaseOwner(h.id) == nil)
        }
    }

    @Test("a lost announcement: the follower's re-read timer finds the token")
    func lostNotificationTimerReread() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            async let answer = h.request()
            await h.clock.waitForSleepers(2)
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-b", expiresAt: h.clock.now().unixSeconds + 3600, requestID: "rq_other")
            let reads = h.store.calls("roundProbe")
            h.clock.advance(by: .milliseconds(50))
            let result = try await answer.get()
            #expect(result.token.value == "tok-b")
            #expect(h.store.calls("roundProbe") == reads + 1)
        }
    }

    @Test(
        "a round another replica ends between the follower's re-read and its lease take starts no second round trip"
    )
    func followerTakeAfterTheOtherRoundEnded() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            async let answer = h.request()
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            // The re-read finds nothing yet; the lease take that follows it is in flight …
            await h.holdTheTakeAfterAnEmptyReread()
            // … when the other replica's round ends: its token stored (the announcement still on
            // its way) and its lease released.
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-b", expiresAt: h.clock.now().unixSeconds + 3600, requestID: "rq_other")
            try await h.store.releaseLease(h.id, requestID: "rq_other")
            h.store.release(.takeLease)
            let result = try await answer.get()
            #expect(result.token.value == "tok-b")
            #expect(result.source == .trigger)
            #expect(h.trigger.callCount == 0)
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(!h.flow.isRoundActive(h.id))
        }
    }

    @Test("a forced refresh following a round that ends without a token newer than its own takes the lease then")
    func forcedFollowerTakesOverAfterTheRoundItFollowed() async throws {
        try await withFlow { h in
            let known = h.clock.now().unixSeconds + 3600
            h.store.deliver(h.id, token: "tok-known", expiresAt: known, requestID: nil)
            try await h.otherReplicaLeads()
            async let answer = h.request(.init(forceRefresh: true))
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            // The other replica's round ends without storing a newer token (its callers took the
            // stored one): the lease is free, and the re-read finds only the token this caller knew.
            try await h.store.releaseLease(h.id, requestID: "rq_other")
            h.clock.advance(by: .milliseconds(50))
            let call = try #require(await h.nextCall())
            h.deliver("tok-new", expiresIn: 7200, requestID: call.requestID)
            let result = try await answer.get()
            #expect(result.token.value == "tok-new")
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test(
        "a forced refresh that reads the token this process's round stored, before the round heard of it, gets a newer one from a round of its own"
    )
    func forcedRefreshOfTheRoundsOwnToken() async throws {
        try await withFlow { h in
            // The round's token is delivered to another replica, and its announcement is lost.
            h.store.dropsNotifications = true
            async let first = h.request()
            let call = try #require(await h.nextCall())
            // The first caller's deadline timer and the round's grace and re-read timers.
            await h.clock.waitForSleepers(3)
            h.store.deliver(
                h.id, token: "tok-1", expiresAt: h.clock.now().unixSeconds + 3600, requestID: call.requestID)
            // A caller that already has tok-1 (from the other replica) forces a refresh here: its
            // read of the store ends the round with tok-1 first, and it does not get tok-1 back.
            async let forced = h.request(.init(forceRefresh: true))
            #expect(try await first.get().token.value == "tok-1")
            let second = try #require(await h.nextCall())
            #expect(second.requestID != call.requestID)
            h.deliver("tok-2", expiresIn: 3601, requestID: second.requestID)
            let refreshed = try await forced.get()
            #expect(refreshed.token.value == "tok-2")
            #expect(refreshed.source == .trigger)
            #expect(h.trigger.callCount == 2)
        }
    }

    @Test("a follower that missed the uninstall notice learns of it by its re-read: 410, and no trigger call")
    func followerLearnsOfAnUninstallByItsReread() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            async let answer = h.request()
            await h.clock.waitForSleepers(2)
            #expect(h.flow.roundState(h.id) == .following)
            // The installation is uninstalled and the other replica's round ends; this process
            // hears of neither.
            h.store.dropsNotifications = true
            h.store.uninstall(h.id)
            try await h.store.releaseLease(h.id, requestID: "rq_other")
            h.clock.advance(by: .milliseconds(50))
            #expect(await answer.failure?.code == .installationUninstalled)
            #expect(h.trigger.callCount == 0)
            #expect(h.store.leaseOwner(h.id) == nil)
        }
    }

    @Test(
        "an uninstall announced while this process's subscription was down: once it is back, callers get 410, not the token remembered"
    )
    func uninstallMissedWhileUnsubscribed() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            let first = try await h.request().get()
            #expect(first.token.value == "tok-1")
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-1")
            // The subscription drops; the installation is uninstalled meanwhile; it comes back.
            h.store.dropsNotifications = true
            h.store.uninstall(h.id)
            h.store.dropsNotifications = false
            h.store.resubscribe()
            while h.flow.subscriptionsHandled < 2 { await Task.yield() }
            #expect(h.flow.rememberedToken(h.id) == nil)
            #expect(await h.request().failure?.code == .installationUninstalled)
            #expect(h.flow.unverifiedToken(h.id) == nil)
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test(
        "while the store's announcements are not heard (the subscription lost or refused), every caller reads the store, and an unannounced uninstall is seen at once"
    )
    func everyCallerReadsTheStoreWhileUnsubscribed() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            #expect(try await h.request().get().token.value == "tok-1")
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-1")
            h.store.unsubscribe()
            while h.flow.hearsAnnouncements { await Task.yield() }
            #expect(h.flow.rememberedToken(h.id) == nil)
            // Each caller reads the store; what it read is not taken as verified.
            let snapshots = h.store.calls("snapshot")
            for _ in 0..<2 {
                let answer = try await h.request().get()
                #expect(answer.token.value == "tok-1" && answer.source == .cache)
            }
            #expect(h.store.calls("snapshot") == snapshots + 2)
            #expect(h.flow.rememberedToken(h.id) == nil)
            // Those reads only verify a token in hand: they get a short time (then it is served, as
            // when the store cannot be reached), not the 2 s of a read that decides a round trip.
            #expect(h.store.snapshotTimeouts.suffix(2) == [.milliseconds(250), .milliseconds(250)])
            #expect(h.store.snapshotTimeouts.first == .seconds(2))
            // Back: one read verifies, then memory answers.
            h.store.resubscribe()
            while h.flow.subscriptionsHandled < 2 { await Task.yield() }
            #expect(try await h.request().get().token.value == "tok-1")
            #expect(try await h.request().get().token.value == "tok-1")
            #expect(h.store.calls("snapshot") == snapshots + 3)
            // Down again: an uninstall nobody announced reaches the next caller.
            h.store.unsubscribe()
            while h.flow.hearsAnnouncements { await Task.yield() }
            h.store.dropsNotifications = true
            h.store.uninstall(h.id)
            #expect(await h.request().failure?.code == .installationUninstalled)
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test("a token another replica stored while this process's subscription was down is served once it is back")
    func newerTokenMissedWhileUnsubscribed() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            let first = try await h.request().get()
            #expect(first.token.value == "tok-1")
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-2", expiresAt: h.clock.now().unixSeconds + 3601, requestID: nil)
            h.store.dropsNotifications = false
            h.store.resubscribe()
            while h.flow.subscriptionsHandled < 2 { await Task.yield() }
            let answer = try await h.request().get()
            #expect(answer.token.value == "tok-2")
            #expect(answer.source == .cache)
            #expect(h.store.calls("snapshot") == 2)
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test(
        "after a resubscription, a remembered token is still served while the store cannot be read, and verified once it can"
    )
    func unverifiedTokenServedInAnOutage() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            let first = try await h.request().get()
            #expect(first.token.value == "tok-1")
            h.store.dropsNotifications = false
            h.store.resubscribe()
            while h.flow.subscriptionsHandled < 2 { await Task.yield() }
            h.store.isUnavailable = true
            let during = try await h.request().get()
            #expect(during.token.value == "tok-1")
            #expect(during.source == .cache)
            #expect(h.flow.rememberedToken(h.id) == nil)
            h.store.isUnavailable = false
            let after = try await h.request().get()
            #expect(after.token.value == "tok-1")
            // That read verified it: memory answers again, without the store.
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-1")
            let snapshots = h.store.calls("snapshot")
            let cached = try await h.request().get()
            #expect(cached.token.value == "tok-1")
            #expect(h.store.calls("snapshot") == snapshots)
        }
    }

    @Test(
        "a store read that began before this process forgot the installation (uninstalled) does not put its token back")
    func readOlderThanAnUninstallIsNotRemembered() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            h.store.hold(.snapshotAnswer)
            async let first = h.request()
            while h.store.held(.snapshotAnswer) < 1 { await Task.yield() }
            // The uninstall reaches this process (its route, or the notice) while the read that
            // found tok-1 is on its way back.
            h.store.dropsNotifications = true
            h.store.uninstall(h.id)
            h.flow.installationUninstalled(h.id)
            h.store.release(.snapshotAnswer)
            let answered = try await first.get()
            #expect(answered.token.value == "tok-1")
            #expect(h.flow.rememberedToken(h.id) == nil)
            #expect(await h.request().failure?.code == .installationUninstalled)
        }
    }

    @Test(
        "a caller that shares a store read begun before this process forgot the installation does not put its token back"
    )
    func sharedReadOlderThanAnUninstallIsNotRemembered() async throws {
        try await withFlow { h in
            h.storeElsewhereUnannounced("tok-1")
            h.store.hold(.snapshotAnswer)
            async let first = h.request()
            while h.store.held(.snapshotAnswer) < 1 { await Task.yield() }
            // The uninstall reaches this process while that read is on its way back; a caller
            // arriving now shares the read, which began before.
            h.store.uninstall(h.id)
            h.flow.installationUninstalled(h.id)
            async let second = h.request()
            while h.flow.snapshotFollowers(h.id) < 1 { await Task.yield() }
            h.store.release(.snapshotAnswer)
            _ = await (first, second)
            #expect(h.flow.rememberedToken(h.id) == nil)
            #expect(await h.request().failure?.code == .installationUninstalled)
        }
    }

    @Test(
        "a trigger attempt that finds no trigger in force because the installation was uninstalled (notice lost): 410 at once, no retry, no failure counted"
    )
    func attemptFindsTheInstallationUninstalled() async throws {
        try await withFlow({ $0.breakerThreshold = 1 }) { h in
            h.trigger.answer(with: .notSent)
            // The installation is uninstalled while the caller's snapshot (which took the lease) is
            // on its way back; this process never hears of it.
            h.store.hold(.snapshotAnswer)
            async let answer = h.request()
            while h.store.held(.snapshotAnswer) < 1 { await Task.yield() }
            h.store.dropsNotifications = true
            h.store.uninstall(h.id)
            h.store.release(.snapshotAnswer)
            #expect(await answer.failure?.code == .installationUninstalled)
            #expect(h.trigger.callCount == 1)
            while h.store.leaseOwner(h.id) != nil { await Task.yield() }
            #expect(h.store.calls("recordRoundOutcomeReleasingLease") == 0)
            #expect(h.flow.roundState(h.id) != .circuitOpen)
        }
    }

    @Test("a trigger attempt not sent for an installation still active counts as a failed attempt")
    func attemptNotSentForAnActiveInstallation() async throws {
        try await withFlow({
            $0.maxAttempts = 1
            $0.breakerThreshold = 1
        }) { h in
            h.trigger.answer(with: .notSent)
            #expect(await h.request().failure?.code == .triggerFailed)
            while h.flow.roundState(h.id) != .circuitOpen { await Task.yield() }
            #expect(h.store.calls("roundProbe") == 1)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("a lease taken after its round ended (its only caller went away meanwhile) is given back, not kept")
    func leaseTakenForAnEndedRoundIsGivenBack() async throws {
        try await withFlow { h in
            try await h.otherReplicaLeads()
            let caller = Task { await h.request() }
            await h.clock.waitForSleepers(2)
            await h.holdTheTakeAfterAnEmptyReread()
            // The other replica's round ends without a token; this one's caller goes away.
            try await h.store.releaseLease(h.id, requestID: "rq_other")
            caller.cancel()
            let cancelled = await caller.value
            #expect(throws: FlowError.cancelled) { try cancelled.get() }
            #expect(!h.flow.isRoundActive(h.id))
            let releases = h.store.calls("releaseLease")
            h.store.release(.takeLease)
            // The take succeeds for a round that no longer runs: the lease goes straight back.
            while h.store.calls("releaseLease") == releases { await Task.yield() }
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test("a hold in the store answers at once with the newest token, without a round trip")
    func hold() async throws {
        try await withFlow { h in
            h.store.deliver(h.id, token: "tok-old", expiresAt: h.clock.now().unixSeconds + 600, requestID: nil)
            try await h.store.placeHold(h.id, requestID: "rq_other", duration: .seconds(60), releasingLease: false)
            let answer = try await h.request(.init(minValidity: 900)).get()
            #expect(answer.token.value == "tok-old")
            #expect(answer.source == .cache)
            #expect(h.trigger.callCount == 0)
            #expect(h.flow.roundState(h.id) == .held)
            // The hold ends: the next caller starts a round trip.
            h.clock.advance(by: .seconds(61))
            async let next = h.request(.init(minValidity: 900))
            let call = try #require(await h.nextCall())
            await h.clock.waitForSleepers(1)
            h.deliver("tok-new", expiresIn: 3600, requestID: call.requestID)
            #expect(try await next.get().token.value == "tok-new")
        }
    }

    @Test("failed round trips open the circuit: the next caller fails fast with the time left")
    func circuit() async throws {
        try await withFlow({
            $0.maxAttempts = 1
            $0.breakerThreshold = 1
            $0.breakerOpenBase = .seconds(30)
        }) { h in
            h.trigger.answer(with: .failed(.httpError))
            let first = await h.request()
            #expect(throws: FlowError.triggerFailed) { try first.get() }
            // The verdict is recorded by a child task of run(); the circuit is then open.
            while h.flow.roundState(h.id) != .circuitOpen { await Task.yield() }
            // The failed round's verdict and its lease's release were one step.
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(h.store.calls("recordRoundOutcomeReleasingLease") == 1)
            #expect(h.store.calls("releaseLease") == 0)
            let second = await h.request()
            #expect(throws: FlowError.circuitOpen(retryAfter: .zero)) { try second.get() }
            if case .failure(let error) = second { #expect(error.retryAfter == .seconds(30)) }
            #expect(h.trigger.callCount == 1)
        }
    }

    /// Yields until `condition` holds, at most 100 000 times (a bound, not a timing).
    static func yield(until condition: () -> Bool) async {
        var spins = 0
        while !condition(), spins < 100_000 {
            spins += 1
            await Task.yield()
        }
    }

    @Test("the open-circuits gauge counts a circuit until its window ends or its installation is uninstalled")
    func openCircuitsGauge() async throws {
        let registry = PrometheusCollectorRegistry()
        func gauge() -> Double? {
            var bytes: [UInt8] = []
            registry.emit(into: &bytes)
            let line = String(decoding: bytes, as: UTF8.self).split(separator: "\n").first {
                $0.hasPrefix("token_gateway_circuits_open ")
            }
            return line.flatMap { Double($0.split(separator: " ").last ?? "") }
        }
        try await withFlow(
            {
                $0.maxAttempts = 1
                $0.breakerThreshold = 1
                $0.breakerOpenBase = .seconds(30)
            }, metrics: FlowMetrics(factory: PrometheusMetricsFactory(registry: registry))
        ) { h in
            h.trigger.answer(with: .failed(.httpError))
            _ = await h.request()
            await Self.yield(until: { gauge() == 1 })
            #expect(gauge() == 1)
            // Nobody asks again: the window lapses, and the periodic refresh stops counting it.
            h.clock.advance(by: .seconds(29))
            h.flow.refreshOpenCircuits()
            #expect(gauge() == 1)
            h.clock.advance(by: .seconds(2))
            h.flow.refreshOpenCircuits()
            #expect(gauge() == 0)
            // Open again (a 60 s window now), then uninstalled: not counted any more.
            _ = await h.request()
            await Self.yield(until: { gauge() == 1 })
            #expect(gauge() == 1)
            h.flow.installationUninstalled(h.id)
            #expect(gauge() == 0)
        }
    }

    @Test("memory is swept of expired tokens: an installation nobody asks for again does not keep its token for good")
    func memorySweep() async throws {
        try await withFlow { h in
            var next = 0
            func deliver(_ count: Int, expiresIn: Int64) {
                for _ in 0..<count {
                    next += 1
                    let hex = String(next, radix: 16)
                    let suffix = String(repeating: "0", count: 12 - hex.count) + hex
                    let id = InstallationID("ari:cloud:ecosystem::installation/00000000-0000-4000-8000-\(suffix)")!
                    h.flow.tokenDelivered(
                        id, token: AccessToken(value: "t", expiresAt: h.clock.now().unixSeconds + expiresIn),
                        solicitedBy: nil)
                }
            }
            let interval = TokenFlow.memorySweepInterval
            deliver(interval + 76, expiresIn: 120)
            // One sweep ran (after interval - 1 entries): nothing had expired.
            #expect(h.flow.memoryCount == interval + 76)
            h.clock.advance(by: .seconds(200))
            deliver(interval + 76, expiresIn: 3600)
            // The next sweep (after as many new entries as memory held after the last one, at
            // least the interval) dropped every expired token; the fresh ones are all kept.
            #expect(h.flow.memoryCount == interval + 76)
        }
    }

    @Test("shutdown fails waiting callers, releases the lease and ends run() with its child tasks")
    func shutdown() async throws {
        let h = Harness.make()
        let (flow, store, clock) = (h.flow, h.store, h.clock)
        let run = Task { try await flow.run() }
        async let answer = h.request()
        let call = try #require(await h.nextCall())
        // Waiting: the caller's deadline, the delivery grace and the re-read timer are armed.
        await clock.waitForSleepers(3)
        #expect(store.leaseOwner(h.id) == call.requestID)
        await flow.shutdown()
        let failed = await answer
        #expect(throws: FlowError.shuttingDown) { try failed.get() }
        try await run.value
        #expect(store.leaseOwner(h.id) == nil)
        #expect(clock.sleeperCount == 0)
        // After shutdown a caller is refused at once.
        let refused = await h.request()
        #expect(throws: FlowError.shuttingDown) { try refused.get() }
    }

    @Test(
        "a lease a store read took ahead, whose answer comes once the flow has shut down, is given back, not left to run out"
    )
    func leaseAheadAnsweredAfterShutdown() async throws {
        let h = Harness.make()
        let (flow, store, trigger) = (h.flow, h.store, h.trigger)
        let run = Task { try await flow.run() }
        while flow.subscriptionsHandled == 0 { await Task.yield() }
        // A cold caller's read takes the lease for the round it would start; its answer is on its
        // way back while the flow shuts down.
        store.hold(.snapshotAnswer)
        async let answer = h.request()
        while store.held(.snapshotAnswer) < 1 { await Task.yield() }
        #expect(store.leaseOwner(h.id) != nil)
        await flow.shutdown()
        try await run.value
        store.release(.snapshotAnswer)
        let refused = await answer
        #expect(throws: FlowError.shuttingDown) { try refused.get() }
        // Given back before the caller was answered, although run() takes no more work.
        #expect(store.leaseOwner(h.id) == nil)
        #expect(trigger.callCount == 0)
    }

    @Test("the observer's work runs to its end at shutdown: not cancelled, and run() waits for it")
    func observerWorkAtShutdown() async throws {
        let observer = GatedObserver()
        let h = Harness.make(observer: observer)
        let (flow, clock) = (h.flow, h.clock)
        let run = Task { try await flow.run() }
        async let answer = h.request()
        _ = try #require(await h.nextCall())
        await clock.waitForSleepers(3)
        // Shutdown abandons the round; the observer's work for it (and for the round's start) waits.
        await flow.shutdown()
        _ = await answer
        observer.open()
        try await run.value
        let finished = observer.finished
        #expect(!finished.isEmpty)
        #expect(finished.allSatisfy { !$0 }, "no observer work was cancelled: \(finished)")
    }

    @Test(
        "a cancelled caller gets `cancelled`; the round trip it alone waited for goes on, holding the lease, and a caller arriving meanwhile joins it"
    )
    func cancellation() async throws {
        try await withFlow { h in
            let caller = Task { await h.request() }
            let call = try #require(await h.nextCall())
            // The caller's deadline timer and the round's grace and re-read timers.
            await h.clock.waitForSleepers(3)
            caller.cancel()
            let cancelled = await caller.value
            #expect(throws: FlowError.cancelled) { try cancelled.get() }
            // The trigger call answered 2xx: its token may still come, so the round keeps its lease
            // (no other replica starts a second call) and the next caller joins it.
            #expect(h.flow.isRoundActive(h.id))
            #expect(h.store.leaseOwner(h.id) == call.requestID)
            async let next = h.request()
            var turns = 0
            while h.flow.waiterCount(h.id) == 0, turns < 100_000 {
                await Task.yield()
                turns += 1
            }
            h.deliver("tok-1", expiresIn: 3600, requestID: call.requestID)
            let answer = try await next.get()
            #expect(answer.token.value == "tok-1")
            #expect(answer.source == .trigger)
            #expect(h.trigger.callCount == 1)
            turns = 0
            while h.store.leaseOwner(h.id) != nil, turns < 100_000 {
                await Task.yield()
                turns += 1
            }
            #expect(h.store.leaseOwner(h.id) == nil)
            #expect(!h.flow.isRoundActive(h.id))
        }
    }

    @Test(
        "a caller arriving while a round sees its trigger call through without callers reads the store first: a token stored meanwhile, its announcement lost, answers it"
    )
    func callerReadsTheStoreBeforeJoiningACallerlessRound() async throws {
        try await withFlow { h in
            let caller = Task { await h.request() }
            _ = try #require(await h.nextCall())
            await h.clock.waitForSleepers(3)
            caller.cancel()
            let cancelled = await caller.value
            #expect(throws: FlowError.cancelled) { try cancelled.get() }
            #expect(h.flow.isRoundActive(h.id))
            // A token pushed to another replica, whose announcement is lost.
            h.store.dropsNotifications = true
            let (stored, _) = h.store.deliver(
                h.id, token: "tok-pushed", expiresAt: h.clock.now().unixSeconds + 3600, requestID: nil)
            h.store.dropsNotifications = false
            #expect(stored)
            let answer = try await h.request().get()
            #expect(answer.token.value == "tok-pushed")
            #expect(answer.source == .cache)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("the echo of a delivery this process is storing is not read back, even when it overtakes the store's answer")
    func ownDeliveryEchoAheadOfTheStoresAnswer() async throws {
        try await withFlow { h in
            let other = InstallationID("ari:cloud:ecosystem::installation/0b7d9a35-0f5e-4a8e-9a43-71c7b0a6c2d9")!
            h.store.install(other)
            h.flow.apiBaseUrlSeen(other, "https://example.atlassian.net")
            let caller = Task { await h.request() }
            let call = try #require(await h.nextCall())
            // The caller's deadline timer and the round's grace and re-read timers.
            await h.clock.waitForSleepers(3)
            // The route: noted, then stored; the store's echo reaches the flow and is handled
            // before the route hands the token over.
            h.flow.deliveryArriving(h.id, requestID: call.requestID)
            let expiresAt = h.clock.now().unixSeconds + 3600
            h.store.dropsNotifications = true
            let (stored, solicited) = h.store.deliver(
                h.id, token: "tok-1", expiresAt: expiresAt, requestID: call.requestID)
            h.store.dropsNotifications = false
            #expect(stored && solicited)
            let probes = h.store.calls("roundProbe")
            h.store.publish(.tokenStored(h.id, requestID: call.requestID, sameToken: false, origin: h.flow.replicaID))
            h.store.publish(.apiBaseURLChanged(other))
            while h.store.calls("roundProbe") == probes { await Task.yield() }
            // Only the other installation's announcement was read back.
            #expect(h.store.calls("roundProbe") == probes + 1)
            #expect(h.flow.isRoundActive(h.id))
            h.flow.tokenDelivered(
                h.id,
                token: AccessToken(
                    value: "tok-1", expiresAt: expiresAt, requestID: call.requestID,
                    receivedAt: h.clock.now().unixSeconds),
                solicitedBy: call.requestID)
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-1")
            #expect(answer.source == .trigger)
            #expect(h.store.calls("roundProbe") == probes + 1)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("the echo of a round trip's token this process stored and handled is not handled again; a push's is")
    func ownAnnouncementNotHandledTwice() async throws {
        try await withFlow { h in
            let other = InstallationID("ari:cloud:ecosystem::installation/0b7d9a35-0f5e-4a8e-9a43-71c7b0a6c2d9")!
            h.store.install(other)
            h.flow.apiBaseUrlSeen(other, "https://example.atlassian.net")
            // A delivery that answered a round trip, stored and handed to the flow before its echo
            // arrives.
            h.store.dropsNotifications = true
            let now = h.clock.now().unixSeconds
            h.store.deliver(h.id, token: "tok-1", expiresAt: now + 3000, requestID: nil)
            h.flow.tokenDelivered(
                h.id, token: AccessToken(value: "tok-1", expiresAt: now + 3000, requestID: "rq_1"), solicitedBy: "rq_1")
            h.store.dropsNotifications = false
            let probes = h.store.calls("roundProbe")
            h.store.publish(.tokenStored(h.id, requestID: "rq_1", sameToken: false))
            // Announcements are handled in order: once the next one (for another installation) has
            // been handled, the echo has been seen and skipped.
            h.store.publish(.apiBaseURLChanged(other))
            while h.store.calls("roundProbe") == probes { await Task.yield() }
            #expect(h.store.calls("roundProbe") == probes + 1)
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-1")
            // Another replica's push carries no request id: it is re-read.
            h.deliver("tok-pushed", expiresIn: 3600, requestID: nil)
            h.store.publish(.apiBaseURLChanged(other))
            while h.store.calls("roundProbe") < probes + 3 { await Task.yield() }
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-pushed")
            // The echo of a push this process stored (named as its origin) is not re-read.
            let later = h.clock.now().unixSeconds + 7000
            h.store.dropsNotifications = true
            h.store.deliver(h.id, token: "tok-own-push", expiresAt: later, requestID: nil)
            h.flow.tokenDelivered(
                h.id, token: AccessToken(value: "tok-own-push", expiresAt: later, requestID: nil), solicitedBy: nil)
            h.store.dropsNotifications = false
            let before = h.store.calls("roundProbe")
            h.store.publish(.tokenStored(h.id, requestID: nil, sameToken: false, origin: h.flow.replicaID))
            h.store.publish(.apiBaseURLChanged(other))
            while h.store.calls("roundProbe") == before { await Task.yield() }
            #expect(h.store.calls("roundProbe") == before + 1)
            #expect(h.flow.rememberedToken(h.id)?.value == "tok-own-push")
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "a round trip that brings no newer token answers its callers once the hold is written, or at their deadline while the write is still out"
    )
    func holdWriteDoesNotKeepCallersPastTheirDeadline() async throws {
        try await withFlow { h in
            // The stored token has 15 minutes left: too short for the caller, long enough to serve
            // when Forge hands it out again.
            let expiresAt = h.clock.now().unixSeconds + 900
            h.store.deliver(h.id, token: "tok-0", expiresAt: expiresAt, requestID: nil)
            h.store.hold(.placeHold)
            defer { h.store.release(.placeHold) }
            let caller = Task { await h.request(.init(minValidity: 3600, timeout: .seconds(2))) }
            let call = try #require(await h.nextCall())
            // Forge answers with the token it handed out before: the store keeps the one it has.
            let (stored, solicited) = h.store.deliver(
                h.id, token: "tok-0", expiresAt: expiresAt, requestID: call.requestID)
            #expect(!stored && solicited)
            while h.store.held(.placeHold) == 0 { await Task.yield() }
            // The hold's write is out (a slow store); the caller's deadline comes.
            h.clock.advance(by: .seconds(2))
            // (Were the caller kept until the write ends, the time limit ends its wait.)
            let answer = try await withTaskCancellationHandler {
                try await caller.value.get()
            } onCancel: {
                caller.cancel()
                h.store.release(.placeHold)
            }
            #expect(answer.token.value == "tok-0")
            #expect(answer.token.expiresAt == expiresAt)
            #expect(answer.source == .trigger)
            #expect(h.store.held(.placeHold) == 1)
            #expect(!h.flow.isRoundActive(h.id))
            // A caller meanwhile is answered from the hold this process knows of: no round trip.
            let held = try await h.request(.init(minValidity: 3600, timeout: .seconds(2))).get()
            #expect(held.token.value == "tok-0")
            #expect(held.source == .cache)
            // The write ends: the hold is in the store for every replica.
            h.store.release(.placeHold)
            while try await h.store.roundProbe(h.id, requestID: nil).holdRemaining == nil { await Task.yield() }
            let lease = try await h.store.takeLease(
                h.id, requestID: "rq_b", replicaID: "replica-b", ttl: .seconds(5), respectingHold: true,
                unlessNewerThan: nil)
            guard case .held = lease else {
                Issue.record("another replica's lease take should find the hold, found \(lease)")
                return
            }
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test("a hold written before the callers' deadline answers them then, and the wait for their deadline ends with it")
    func holdWrittenBeforeTheDeadline() async throws {
        try await withFlow { h in
            let expiresAt = h.clock.now().unixSeconds + 900
            h.store.deliver(h.id, token: "tok-0", expiresAt: expiresAt, requestID: nil)
            let caller = Task { await h.request(.init(minValidity: 3600, timeout: .seconds(2))) }
            let call = try #require(await h.nextCall())
            h.store.deliver(h.id, token: "tok-0", expiresAt: expiresAt, requestID: call.requestID)
            // Answered without the clock moving, the hold in the store.
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-0" && answer.source == .trigger)
            #expect(try await h.store.roundProbe(h.id, requestID: nil).holdRemaining != nil)
            // No timer is left waiting.
            while h.clock.sleeperCount > 0, !Task.isCancelled { await Task.yield() }
            #expect(h.clock.sleeperCount == 0)
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "callers sharing a store read in flight count in the waiter caps: past them, per installation or in all, a caller is refused at once with overloaded"
    )
    func readersCountInTheWaiterCaps() async throws {
        try await withFlow({
            $0.maxWaitersPerInstallation = 2
            $0.maxWaiters = 3
        }) { h in
            let other = InstallationID("ari:cloud:ecosystem::installation/0b7d9a35-0f5e-4a8e-9a43-71c7b0a6c2d9")!
            h.store.install(other)
            let expiresAt = h.clock.now().unixSeconds + 3600
            h.store.deliver(h.id, token: "tok-a", expiresAt: expiresAt, requestID: nil)
            h.store.deliver(other, token: "tok-b", expiresAt: expiresAt, requestID: nil)
            h.store.holdSnapshots()
            let otherRequest = { @Sendable () async -> Result<TokenAnswer, FlowError> in
                do throws(FlowError) {
                    return .success(try await h.flow.token(for: other, request: .init()))
                } catch {
                    return .failure(error)
                }
            }
            // One caller reads the store, a second shares its read: the installation's cap.
            let reader = Task { await h.request() }
            while h.store.snapshotsHeld == 0 { await Task.yield() }
            let sharer = Task { await h.request() }
            while h.flow.snapshotFollowers(h.id) == 0 { await Task.yield() }
            // (Were a refused caller kept waiting on the read, the time limit ends its wait.)
            let release = { @Sendable in h.store.releaseSnapshots() }
            let refused = await withTaskCancellationHandler {
                await h.request()
            } onCancel: {
                release()
            }
            #expect(refused.failure?.code == .overloaded)
            // Another installation's reader: the cap in all.
            let otherReader = Task { await otherRequest() }
            while h.store.snapshotsHeld < 2, !Task.isCancelled { await Task.yield() }
            let refusedToo = await withTaskCancellationHandler {
                await otherRequest()
            } onCancel: {
                release()
            }
            #expect(refusedToo.failure?.code == .overloaded)
            h.store.releaseSnapshots()
            for (caller, token) in [(reader, "tok-a"), (sharer, "tok-a"), (otherReader, "tok-b")] {
                let answer = try await caller.value.get()
                #expect(answer.token.value == token)
                #expect(answer.source == .cache)
            }
            // The reads are over: the caps are free again (an installation not in memory reads
            // the store).
            let third = InstallationID("ari:cloud:ecosystem::installation/5d0c1f2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f")!
            h.store.install(third)
            h.store.deliver(third, token: "tok-c", expiresAt: expiresAt, requestID: nil)
            #expect(try await h.flow.token(for: third, request: .init()).token.value == "tok-c")
            #expect(h.trigger.callCount == 0)
        }
    }

    @Test(
        "past the caps, a caller whose token is in memory but unverified (announcements not heard) is served it, as when the store is slow"
    )
    func overloadedServesAnUnverifiedToken() async throws {
        try await withFlow({ $0.maxWaitersPerInstallation = 2 }) { h in
            h.storeElsewhereUnannounced("tok-1")
            #expect(try await h.request().get().token.value == "tok-1")
            h.store.unsubscribe()
            while h.flow.hearsAnnouncements { await Task.yield() }
            #expect(h.flow.unverifiedToken(h.id)?.value == "tok-1")
            // Two callers read the store (to verify the token): the installation's cap.
            h.store.holdSnapshots()
            let release = { @Sendable in h.store.releaseSnapshots() }
            let readers = [Task { await h.request() }, Task { await h.request() }]
            while h.store.snapshotsHeld + h.flow.snapshotFollowers(h.id) < 2 { await Task.yield() }
            let served = try await h.request().get()
            #expect(served.token.value == "tok-1" && served.source == .cache)
            // A forced refresh wants another token: refused.
            let forced = await withTaskCancellationHandler {
                await h.request(.init(forceRefresh: true))
            } onCancel: {
                release()
            }
            #expect(forced.failure?.code == .overloaded)
            release()
            for reader in readers { #expect(try await reader.value.get().token.value == "tok-1") }
            #expect(h.trigger.callCount == 0)
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "a round whose lease extension finds another owner stops leading: no verdict, no second trigger call, and its caller gets the other replica's token; its trigger call (answered 2xx) is counted"
    )
    func leaseLostToAnotherReplica() async throws {
        let registry = PrometheusCollectorRegistry()
        // Attempts outlast the caller's 10 s: the lease taken for the caller is extended.
        try await withFlow(
            { $0.attemptTimeout = .seconds(20) },
            metrics: FlowMetrics(factory: PrometheusMetricsFactory(registry: registry))
        ) { h in
            h.store.hold(.extendLease)
            defer { h.store.release(.extendLease) }
            let caller = Task { await h.request() }
            let call = try #require(await h.nextCall())
            while h.store.held(.extendLease) == 0 { await Task.yield() }
            // Meanwhile the lease was lost (a failover dropped it) and another replica took it.
            try await h.store.releaseLease(h.id, requestID: call.requestID)
            try await h.otherReplicaLeads()
            h.store.release(.extendLease)
            while h.flow.roundState(h.id) != .following, !Task.isCancelled { await Task.yield() }
            #expect(h.flow.roundState(h.id) == .following)
            // The other replica's round stores its token: the caller gets it.
            h.store.deliver(h.id, token: "tok-b", expiresAt: h.clock.now().unixSeconds + 3600, requestID: "rq_other")
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-b")
            #expect(h.trigger.callCount == 1)
            #expect(h.store.calls("recordRoundOutcome") == 0)
            #expect(h.store.leaseOwner(h.id) == "rq_other")
            var bytes: [UInt8] = []
            registry.emit(into: &bytes)
            let attempts = String(decoding: bytes, as: UTF8.self).split(separator: "\n").filter {
                $0.hasPrefix("token_gateway_trigger_attempts_total{") && !$0.hasSuffix(" 0")
            }
            #expect(attempts == [#"token_gateway_trigger_attempts_total{outcome="success"} 1"#], "\(attempts)")
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "a round that lost its lease and takes it again sends its next trigger call with the material read with the new lease"
    )
    func leaseRetakenServesItsMaterial() async throws {
        try await withFlow({ $0.attemptTimeout = .seconds(20) }) { h in
            let read = TriggerMaterialRead(
                status: "active", sealedURL: "sealed-url", keyID: "key-2", nextActivatesAt: nil, sealedKey: "sealed-key"
            )
            h.store.setTriggerMaterial(read, for: h.id)
            h.store.hold(.extendLease)
            defer { h.store.release(.extendLease) }
            let caller = Task { await h.request() }
            var calls = h.trigger.calls.makeAsyncIterator()
            let first = try #require(await calls.next())
            #expect(first.material == read)
            while h.store.held(.extendLease) == 0, !Task.isCancelled { await Task.yield() }
            // The lease was lost meanwhile (a failover dropped it), and nobody holds it now.
            try await h.store.releaseLease(h.id, requestID: first.requestID)
            h.store.release(.extendLease)
            // The round follows. A re-read finds nothing and takes the lease again, with the
            // material: the follower's timer, or the store read of the first call's 2xx when its
            // answer comes after the loss.
            while h.flow.roundState(h.id) != .following, h.trigger.callCount < 2, !Task.isCancelled {
                await Task.yield()
            }
            h.clock.advance(by: .milliseconds(50))
            let second = try #require(await calls.next())
            #expect(second.requestID == first.requestID)
            #expect(second.attempt == 2)
            #expect(second.material == read)
            h.deliver("tok-1", expiresIn: 3600, requestID: second.requestID)
            #expect(try await caller.value.get().token.value == "tok-1")
            #expect(h.store.calls("takeLease") == 1)
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "the store becoming unreachable while a caller follows another replica's round: a still-valid token in memory answers it, shorter than it asked for"
    )
    func storeDownWhileFollowingServesMemory() async throws {
        try await withFlow { h in
            // In memory: a token with 100 s left. The caller wants 300 s; another replica leads.
            h.deliver("tok-short", expiresIn: 100, requestID: nil)
            try await h.otherReplicaLeads()
            let caller = Task { await h.request(.init(minValidity: 300)) }
            while h.flow.roundState(h.id) != .following, !Task.isCancelled { await Task.yield() }
            // Redis goes down: the follower's re-read fails.
            h.store.isUnavailable = true
            h.clock.advance(by: .milliseconds(50))
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-short")
            #expect(answer.token.expiresAt == h.clock.now().unixSeconds + 100)
            #expect(answer.source == .cache)
            #expect(h.flow.roundState(h.id) == .idle)
            #expect(h.trigger.callCount == 0)
            #expect(h.store.leaseOwner(h.id) == "rq_other")
        }
    }

    @Test(
        "the store becoming unreachable while a round takes the lease: a still-valid token in memory answers the callers that do not force a refresh; a forced one gets store_unavailable"
    )
    func storeDownAtTheLeaseServesMemory() async throws {
        try await withFlow { h in
            h.deliver("tok-short", expiresIn: 100, requestID: nil)
            let expiresAt = h.clock.now().unixSeconds + 100
            try await h.otherReplicaLeads()
            let caller = Task { await h.request(.init(minValidity: 300)) }
            while h.flow.roundState(h.id) != .following, !Task.isCancelled { await Task.yield() }
            let forced = Task { await h.request(.init(forceRefresh: true)) }
            while h.flow.waiterCount(h.id) < 2, !Task.isCancelled { await Task.yield() }
            // The other replica's round ends without a token; the follower's re-read finds nothing
            // and takes the lease, and Redis stops answering then.
            try await h.store.releaseLease(h.id, requestID: "rq_other")
            await h.holdTheTakeAfterAnEmptyReread()
            h.store.isUnavailable = true
            h.store.release(.takeLease)
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-short")
            #expect(answer.token.expiresAt == expiresAt)
            #expect(answer.source == .cache)
            #expect(await forced.value.failure?.code == .storeUnavailable)
            #expect(h.flow.roundState(h.id) == .idle)
            #expect(h.trigger.callCount == 0)
            #expect(h.store.leaseOwner(h.id) == nil)
        }
    }
}

extension TokenFlowExecutorTests {
    @Test(
        "the store becoming unreachable while this process leads the round: its trigger call fails (the delivery cannot be stored), the re-read before the retry fails, a still-valid token in memory answers the caller that does not force a refresh; the forced one's round goes on and gets the token once the store is back"
    )
    func storeDownWhileLeadingServesMemory() async throws {
        try await withFlow { h in
            h.deliver("tok-short", expiresIn: 100, requestID: nil)
            let expiresAt = h.clock.now().unixSeconds + 100
            h.trigger.answer(with: .failed(.httpError))
            h.trigger.gate.hold()
            defer { h.trigger.gate.release() }
            let caller = Task { await h.request(.init(minValidity: 300)) }
            // The trigger call is in flight when a forced refresh joins the round.
            let first = try #require(await h.nextCall())
            let forced = Task { await h.request(.init(forceRefresh: true)) }
            while h.flow.waiterCount(h.id) < 2, !Task.isCancelled { await Task.yield() }
            // Forge's call of the gateway fails as Redis stops answering: the trigger answers 502.
            h.store.isUnavailable = true
            h.trigger.gate.release()
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-short")
            #expect(answer.token.expiresAt == expiresAt)
            #expect(answer.source == .cache)
            #expect(h.flow.roundState(h.id) == .backingOff)
            #expect(h.flow.waiterCount(h.id) == 1)
            // The store is back: the retry's trigger call delivers.
            h.trigger.answer(with: .accepted)
            h.store.isUnavailable = false
            h.clock.advance(by: .seconds(2))
            let second = try #require(await h.nextCall())
            #expect(second.requestID == first.requestID)
            #expect(second.attempt == 2)
            h.deliver("tok-new", expiresIn: 3600, requestID: second.requestID)
            let refreshed = try await forced.value.get()
            #expect(refreshed.token.value == "tok-new")
            #expect(refreshed.source == .trigger)
            #expect(h.trigger.callCount == 2)
        }
    }

    @Test(
        "the store becoming unreachable while this process leads the round for callers that do not force a refresh: all are answered from memory and no retry is made for nobody"
    )
    func storeDownWhileLeadingEndsTheRound() async throws {
        try await withFlow { h in
            let answer = try await h.leadIntoStoreOutage()
            #expect(answer.token.value == "tok-short")
            #expect(answer.source == .cache)
            // The round ended (its retry with it), giving its lease back and no verdict.
            #expect(h.flow.roundState(h.id) == .idle)
            while h.store.calls("releaseLease") < 1, !Task.isCancelled { await Task.yield() }
            #expect(h.store.calls("recordRoundOutcome") + h.store.calls("recordRoundOutcomeReleasingLease") == 0)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test(
        "a lease whose release failed while the store was down goes back once the store's announcements are heard again; one another round holds by then stays"
    )
    func owedReleaseGoesBack() async throws {
        try await withFlow { h in
            #expect(try await h.leadIntoStoreOutage().source == .cache)
            // The round ended; its lease could not be given back, and is owed.
            let owed = { h.flow.state.withLock { $0.releasesOwed.owners(of: h.id) } }
            while owed().isEmpty, !Task.isCancelled { await Task.yield() }
            let first = try #require(h.store.leaseOwner(h.id))
            #expect(owed() == [first])
            // The store is back, and so are its announcements: the lease goes back.
            h.store.isUnavailable = false
            h.store.unsubscribe()
            h.store.resubscribe()
            while h.store.leaseOwner(h.id) != nil, !Task.isCancelled { await Task.yield() }
            #expect(h.store.calls("releaseLease") == 2)
            #expect(owed().isEmpty)
            // A second outage owes the next round's lease; meanwhile it runs out and another
            // replica takes the lease: given back once the store is heard again, that one stays.
            #expect(try await h.request(.init(minValidity: 300)).get().source == .cache)
            while owed().isEmpty, !Task.isCancelled { await Task.yield() }
            h.store.isUnavailable = false
            try await h.store.releaseLease(h.id, requestID: try #require(h.store.leaseOwner(h.id)))
            try await h.otherReplicaLeads()
            h.store.resubscribe()
            while !owed().isEmpty || h.store.calls("releaseLease") < 5, !Task.isCancelled { await Task.yield() }
            #expect(h.store.leaseOwner(h.id) == "rq_other")
        }
    }

    @Test(
        "a failed attempt whose token was stored all the same (its announcement lost) ends the round at once: the re-read before the retry finds it"
    )
    func failedAttemptRereadFindsTheToken() async throws {
        try await withFlow { h in
            let expiresAt = h.clock.now().unixSeconds + 3600
            // The trigger's answer is lost (a timeout), yet the delivery landed and was stored.
            h.trigger.answer(with: .failed(.timeout))
            h.trigger.whenCalled { call in
                h.store.dropsNotifications = true
                h.store.deliver(h.id, token: "tok-late", expiresAt: expiresAt, requestID: call.requestID)
            }
            let answer = try await h.request().get()
            #expect(answer.token.value == "tok-late")
            #expect(answer.token.expiresAt == expiresAt)
            #expect(answer.source == .trigger)
            #expect(h.flow.roundState(h.id) == .idle)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test(
        "a pending request that expired unanswered (with its lease, whose extension failed) is no delivery: the re-reads place no hold, and the round goes on to its token"
    )
    func expiredPendingIsNoDelivery() async throws {
        try await withFlow { h in
            h.trigger.whenCalled { call in
                if call.attempt == 1 { h.store.expireLease(h.id, requestID: call.requestID) }
            }
            let caller = Task { await h.request() }
            let first = try #require(await h.nextCall())
            // The delivery grace runs out with nothing delivered; the retry is made.
            h.clock.advance(by: .seconds(3))
            while h.flow.roundState(h.id) != .backingOff, !Task.isCancelled { await Task.yield() }
            h.clock.advance(by: .seconds(1))
            let second = try #require(await h.nextCall())
            #expect(second.requestID == first.requestID && second.attempt == 2)
            h.deliver("tok-late", expiresIn: 3600, requestID: second.requestID)
            let answer = try await caller.value.get()
            #expect(answer.token.value == "tok-late")
            // Its pending request gone, the delivery is stored as a push.
            #expect(answer.source == .push)
            #expect(h.store.calls("placeHold") == 0)
            #expect(h.flow.holdUntil(h.id) == nil)
        }
    }

    @Test(
        "a pending request answered by a delivery that did not replace the token, its announcement lost: the re-read after the 2xx finds it answered, places the hold and answers with the newest token"
    )
    func answeredPendingFoundByReread() async throws {
        try await withFlow { h in
            h.deliver("tok-held", expiresIn: 1000, requestID: nil)
            let expiresAt = h.clock.now().unixSeconds + 1000
            // Forge hands out its cached token again; the announcement of it is lost.
            h.trigger.whenCalled { call in
                h.store.dropsNotifications = true
                h.store.deliver(h.id, token: "tok-held", expiresAt: expiresAt, requestID: call.requestID)
            }
            let answer = try await h.request(.init(minValidity: 3000)).get()
            #expect(answer.token.value == "tok-held")
            #expect(answer.token.expiresAt == expiresAt)
            #expect(answer.source == .trigger)
            #expect(h.flow.holdUntil(h.id) != nil)
            #expect(h.trigger.callCount == 1)
        }
    }

    @Test(
        "an extension's 'not ours' concerns the take of the lease it was sent for: an answer about an earlier take, or another round, drops nothing"
    )
    func leaseDropConcernsItsTake() async throws {
        try await withFlow { h in
            // The round rq_1 holds its second take of the lease (it lost the first and took it again).
            let held = h.flow.state.withLock { s -> UInt64 in
                s.leasesHeld[h.id] = "rq_1"
                s.nextLeaseTake += 2
                s.leaseTakes[h.id] = s.nextLeaseTake
                return s.nextLeaseTake
            }
            #expect(!h.flow.dropLease(h.id, requestID: "rq_1", take: held - 1))
            #expect(!h.flow.dropLease(h.id, requestID: "rq_2", take: held))
            #expect(h.flow.state.withLock { ($0.leasesHeld[h.id], $0.leaseTakes[h.id]) } == ("rq_1", held))
            #expect(h.flow.dropLease(h.id, requestID: "rq_1", take: held))
            #expect(h.flow.state.withLock { ($0.leasesHeld[h.id], $0.leaseTakes[h.id]) } == (nil, nil))
        }
    }
}
