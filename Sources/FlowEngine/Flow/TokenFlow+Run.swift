import Logging
import ServiceLifecycle

extension TokenFlow {
    // MARK: - The run loop

    /// Runs every piece of work the machines ask for as a child task, and reads the notifications
    /// of every replica (tokens stored, holds, uninstalls), until graceful shutdown or
    /// cancellation; then answers waiting callers with `shutting_down`, releases this process's
    /// leases, and returns once every child task has ended.
    public func run() async throws {
        await withDiscardingTaskGroup { group in
            group.addTask {
                await withGracefulShutdownHandler {
                    await cancelWhenGracefulShutdown {
                        for await notification in self.store.notifications() {
                            await self.handleNotification(notification)
                            self.notificationHandled()
                        }
                    }
                } onGracefulShutdown: {
                    self.logger.info("token flow draining")
                }
                await self.shutdown()
            }
            for await job in self.jobs.stream {
                group.addTask { await job() }
            }
            // Shutting down: work still running (a trigger call, a timer) is cancelled and awaited.
            group.cancelAll()
        }
    }

    /// Hands `job` to ``run()``, which runs it as a child task. After shutdown it is dropped
    /// (returns false).
    @discardableResult
    func submit(_ job: @escaping Job) -> Bool {
        if case .terminated = self.jobs.continuation.yield(job) { return false }
        return true
    }

    /// Gives back the lease `requestID` holds for `id`, as a child task of ``run()``, or here once
    /// ``run()`` takes no more work: a lease taken by a read that ends after shutdown is not left to
    /// run out (other replicas' callers would wait for it).
    /// `known`: the lease was taken (else a take whose answer was lost may have set it: a failed
    /// release of it is not owed).
    func giveBackLease(_ id: InstallationID, requestID: String, known: Bool = true) async {
        let release: Job = { await self.releaseLease(id, requestID: requestID, owingOnFailure: known) }
        if !self.submit(release) { await release() }
    }

    /// Fails every caller still waiting, releases the leases this process holds, ends the timers
    /// and stops taking work: ``run()`` returns once the work still running has ended.
    public func shutdown() async {
        let now = self.now()
        let (ids, held, ahead) = self.state.withLock {
            s -> ([InstallationID], [InstallationID: String], [InstallationID: SnapshotLease]) in
            s.shuttingDown = true
            let held = s.leasesHeld
            let ahead = s.leaseAhead
            s.leasesHeld.removeAll()
            s.leaseTakes.removeAll()
            s.leaseMaterial.removeAll()
            s.leaseAhead.removeAll()
            return (Array(s.machines.keys), held, ahead)
        }
        for id in ids { self.handle(id) { $0.shutdownRequested(now: now) } }
        for (id, requestID) in held {
            self.metrics.leasesHeld.decrement()
            try? await self.store.releaseLease(id, requestID: requestID)
        }
        for (id, lease) in ahead { try? await self.store.releaseLease(id, requestID: lease.requestID) }
        self.timers.cancelAll()
        self.followerTimers.cancelAll()
        self.jobs.continuation.finish()
        // Callers whose answer waited on work that will no longer run (a hold being placed).
        let left = self.state.withLock { s -> [Waiter] in
            let left = Array(s.waiters.values)
            s.waiters.removeAll()
            s.waitersPerInstallation.removeAll()
            return left
        }
        for waiter in left { waiter.continuation.resume(throwing: FlowError.shuttingDown) }
    }

    // MARK: - Notifications

    func handleNotification(_ notification: TokenStoreNotification) async {
        switch notification {
        case .subscribed:
            // Announcements may have been lost while not subscribed (an uninstall, a new
            // `apiBaseUrl`, a hold, a newer token): what this process remembered until now is
            // marked unverified, so each installation's next caller reads the store before it is
            // served (the token is kept for a store outage), and every round in flight re-reads
            // the store now.
            let (marked, active, waiters) = self.state.withLock { s in
                s.subscriptions += 1
                s.announcementsDown = false
                let active = s.machines.compactMap { entry in entry.value.currentRequestID.map { (entry.key, $0) } }
                let waiters = s.subscriptionWaiters.filter { $0.times <= s.subscriptions }.map(\.continuation)
                s.subscriptionWaiters.removeAll { $0.times <= s.subscriptions }
                let marked = Self.markMemoryUnverified(&s)
                s.triggerChecked.removeAll()
                return (marked, active, waiters)
            }
            // The gauge first: whoever waits for the subscription may read it at once.
            self.metrics.announcementsHeard.set(1)
            for waiter in waiters { waiter.resume() }
            if marked > 0 {
                self.logger.info(
                    "store announcements subscribed: remembered tokens are read from the store again before they are served",
                    metadata: ["installations": "\(marked)"])
            }
            // The store answers again: the leases rounds could not give back meanwhile go back
            // first (compared with their owner: one that ran out and was taken by another round
            // stays), so the re-reads below that take a lease do not find them.
            let owed = self.state.withLock { s in
                // Not one a round of this process holds again by now (it stays owed).
                s.releasesOwed.take { id, requestID in s.leasesHeld[id] != requestID }
            }
            // One that fails again stays owed, for the next subscription.
            let given = await OwedReleases.giveBack(owed) { await self.releaseLease($0, requestID: $1) }
            if given > 0 {
                self.logger.info(
                    "gave back the round-trip leases this replica could not release while the store was unreachable",
                    metadata: ["leases": "\(given)"])
            }
            for (id, requestID) in active { await self.readStore(id, requestID: requestID) }
        case .unsubscribed:
            // Until the subscription is back, another replica's uninstall or newer token would go
            // unheard: every caller reads the store (a token is still served from memory while
            // the store itself cannot be reached).
            let marked = self.state.withLock { s in
                s.announcementsDown = true
                return Self.markMemoryUnverified(&s)
            }
            self.metrics.announcementsHeard.set(0)
            self.logger.warning(
                "store announcements not heard: every token is read from the store before it is served until they are",
                metadata: ["installations": "\(marked)"])
        case .tokenStored(let id, let requestID, let same, let origin):
            // A push this process stored was handed to it by the route that stored it.
            if requestID == nil, !same, origin == self.replicaID { return }
            if !same, self.alreadyHandled(id, requestID: requestID) { return }
            await self.reread(id, solicitedBy: requestID, sameToken: same)
        case .holdPlaced(let id):
            if self.takeOwnAnnouncement(OwnAnnouncement(installation: id, tag: "hold")) { return }
            await self.reread(id, solicitedBy: nil, sameToken: false)
        case .apiBaseURLChanged(let id):
            await self.reread(id, solicitedBy: nil, sameToken: false)
        case .uninstalled(let id):
            self.installationUninstalled(id)
        }
    }

    /// Marks every remembered token unverified (read from the store before it is served again);
    /// returns how many installations memory holds.
    static func markMemoryUnverified(_ s: inout State) -> Int {
        let marked = s.memory.count
        if marked > 0 {
            s.memory = s.memory.mapValues { entry in
                var entry = entry
                entry.unverified = true
                return entry
            }
            s.memoryGeneration &+= 1
        }
        return marked
    }

    /// True when the announced token is one this process already handled: the token of round
    /// trip `requestID` is the one it holds, or it stored that token itself. (A push, without a
    /// request id, is always re-read.)
    private func alreadyHandled(_ id: InstallationID, requestID: String?) -> Bool {
        guard let requestID else { return false }
        let own = self.takeOwnAnnouncement(OwnAnnouncement(installation: id, tag: "token " + requestID))
        return own || self.state.withLock { $0.memory[id]?.token?.requestID == requestID }
    }

    /// Re-reads an installation's token, `apiBaseUrl` and hold after another replica announced a
    /// change, and feeds what it found to the machine. `solicitedBy`: the round trip the
    /// announcement answered; `sameToken`: that delivery did not replace the stored token.
    private func reread(_ id: InstallationID, solicitedBy: String?, sameToken: Bool) async {
        let interested = self.state.withLock { $0.machines[id] != nil || $0.memory[id] != nil }
        guard interested else { return }
        let generation = self.memoryGenerationNow()
        let entry: TokenStoreProbe
        do {
            entry = try await self.store.roundProbe(id, requestID: nil)
        } catch {
            // The re-read timer of a round in flight picks it up.
            return
        }
        guard !entry.uninstalled else {
            // Its notice may have been lost: the read says as much.
            self.installationUninstalled(id)
            return
        }
        self.remember(id, entry.token, apiBaseUrl: entry.apiBaseUrl, readAt: generation)
        let now = self.now()
        let hold = entry.holdRemaining.map { RoundTripHold(until: now + $0, newest: entry.token) }
        self.handle(id, creating: hold != nil) { m in
            var actions: [FlowAction] = []
            if sameToken, let solicitedBy {
                actions += m.roundTripBroughtNoNewerToken(requestID: solicitedBy, newest: entry.token, now: now)
            }
            if let token = entry.token, m.isActive {
                actions += m.valueObserved(token, solicitedBy: sameToken ? nil : solicitedBy, now: now)
            }
            if let hold { actions += m.holdObserved(hold, now: now) }
            return actions
        }
    }

    // MARK: - Running actions

    /// Feeds one event to the installation's machine (if it exists, or `creating` one) and runs
    /// the resulting actions. A machine that no longer knows anything is dropped.
    func handle(
        _ id: InstallationID, creating: Bool = false, _ event: (inout TokenFlowStateMachine) -> [FlowAction]
    ) {
        self.step(id, creating: creating) { machine, _ in event(&machine) }
    }

    /// As ``handle(_:creating:_:)``, the event also given the token this process holds for the
    /// installation in memory (verified or not), read in the same step.
    func handle(
        _ id: InstallationID, remembering event: (inout TokenFlowStateMachine, AccessToken?) -> [FlowAction]
    ) {
        self.step(id, creating: false) { machine, s in event(&machine, s.memory[id]?.token) }
    }

    private func step(
        _ id: InstallationID, creating: Bool, _ event: (inout TokenFlowStateMachine, inout State) -> [FlowAction]
    ) {
        let now = self.now()
        let actions = self.state.withLock { s -> [FlowAction] in
            guard var machine = s.machines[id] ?? (creating ? self.makeMachine(&s) : nil) else { return [] }
            let actions = event(&machine, &s)
            s.machines[id] = machine.isRetained(at: now) ? machine : nil
            return actions
        }
        self.perform(actions, for: id)
    }

    /// Runs the actions of one installation's machine, in order: answers and metrics at once,
    /// store calls, trigger calls and timers as child tasks of ``run()``.
    func perform(_ actions: [FlowAction], for id: InstallationID) {
        guard !actions.isEmpty else { return }
        // The actions first (callers' answers among them), then the observer: what it records
        // comes after what the callers wait for.
        let now = self.now()
        self.execute(actions[...], for: id)
        if let job = self.observer?.tokenFlow(performs: actions, for: id, at: now) {
            // Not cancelled when shutdown cancels the flow's work (its child task awaits it): the
            // record of a round that shutdown abandoned is written whole, within the store's
            // command timeout.
            self.submit { await Task { await job() }.value }
        }
    }

    /// The round named by a lease a snapshot took ahead has it: the machine leads. The lease runs
    /// out for the deadline of the caller whose read took it; the round's may be later (the machine
    /// extends it then). When that round ended meanwhile (a token from elsewhere answered its
    /// callers, or the installation went, between the take-over and this step), nobody leads with
    /// the lease, so it goes back, as after a take of ``acquireLease(_:requestID:ttl:respectingHold:unlessNewerThan:)``.
    private func lead(_ id: InstallationID, withLeaseAhead lease: SnapshotLease) {
        let leaseDeadline = lease.expires - self.configuration.leaseGrace
        var led = false
        self.handle(id) { m in
            let actions = m.leaseAcquired(requestID: lease.requestID, leaseDeadline: leaseDeadline, now: self.now())
            led = !actions.isEmpty
            return actions
        }
        if !led, self.dropLease(id, requestID: lease.requestID) {
            self.submit { await self.releaseLease(id, requestID: lease.requestID) }
        }
    }

    private func execute(_ actions: ArraySlice<FlowAction>, for id: InstallationID) {
        // A round's verdict and its lease's release go to the store in one step.
        var releasedWithVerdict: String?
        // A lease the snapshot took ahead: the round has it once this step's actions are done.
        var takenAhead: SnapshotLease?
        defer { if let takenAhead { self.lead(id, withLeaseAhead: takenAhead) } }
        for (index, action) in zip(actions.indices, actions) {
            switch action {
            case .acquireLease(let requestID, let ttl, let newerThan),
                .acquireLeaseIgnoringHold(let requestID, let ttl, let newerThan):
                if let ahead = self.takeOverLeaseAhead(id, requestID: requestID) {
                    takenAhead = ahead
                    continue
                }
                let respectingHold = if case .acquireLease = action { true } else { false }
                self.submit {
                    await self.acquireLease(
                        id, requestID: requestID, ttl: ttl, respectingHold: respectingHold, unlessNewerThan: newerThan)
                }
            case .extendLease(let requestID, let ttl):
                let take = self.state.withLock { $0.leaseTakes[id] }
                self.submit { await self.extendLease(id, requestID: requestID, ttl: ttl, take: take) }
            case .releaseLease(let requestID):
                if requestID == releasedWithVerdict { continue }
                if self.dropLease(id, requestID: requestID) {
                    self.submit { await self.releaseLease(id, requestID: requestID) }
                }
            case .placeHold(let requestID, let duration, let releasingLease, let answerBy):
                // The hold first: the actions after it (the callers' answers) run once it is in
                // the store, so a caller that comes back the moment it is answered finds it; or
                // at the callers' deadline, if the write takes longer.
                let rest = actions[(index + 1)...]
                self.placeHold(
                    id, requestID: requestID, duration: duration, releasingLease: releasingLease, answerBy: answerBy
                ) {
                    self.execute(rest, for: id)
                }
                return
            case .recordHold(let event):
                self.metrics.countHold(event)
            case .startAttempt(let requestID, let attempt, let expiresAt, let timeout):
                let material = self.takeLeaseMaterial(id, requestID: requestID)
                self.submit {
                    await self.sendTrigger(
                        id, requestID: requestID, attempt: attempt, expiresAt: expiresAt, timeout: timeout,
                        material: material)
                }
            case .readStore(let requestID):
                self.submit { await self.readStore(id, requestID: requestID) }
            case .scheduleTimer(let timer, let deadline):
                self.schedule(TimerKey(installation: id, timer: timer), at: deadline)
            case .cancelTimer(let timer):
                self.timers.cancel(TimerKey(installation: id, timer: timer))
            case .succeed(let waiters, let token, let source):
                let current = self.state.withLock { $0.memory[id]?.apiBaseUrl }
                for waiter in self.takeWaiters(waiters) {
                    waiter.continuation.resume(
                        returning: TokenAnswer(token: token, source: source, apiBaseUrl: current ?? waiter.apiBaseUrl))
                }
            case .fail(let waiters, let error):
                for waiter in self.takeWaiters(waiters) { waiter.continuation.resume(throwing: error) }
            case .recordRetry:
                self.metrics.triggerRetries.increment()
            case .roundFinished(let succeeded):
                let release = actions[index...].lazy.compactMap { action -> String? in
                    if case .releaseLease(let requestID) = action { return requestID }
                    return nil
                }.first
                let releasing = release.flatMap { self.dropLease(id, requestID: $0) ? $0 : nil }
                releasedWithVerdict = release
                self.submit { await self.recordRound(id, succeeded: succeeded, releasingLease: releasing) }
            case .recordAttempt(let outcome):
                self.recordAttempt(id, outcome: outcome)
            }
        }
    }

    /// Gives the lease of the round `requestID` back; one whose release fails is owed
    /// (``State/releasesOwed``) and given back once the store's announcements are heard again,
    /// unless `owingOnFailure` is false (a lease a failed take may or may not have set).
    @discardableResult
    func releaseLease(_ id: InstallationID, requestID: String, owingOnFailure: Bool = true) async -> Bool {
        do {
            try await self.store.releaseLease(id, requestID: requestID)
            return true
        } catch {
            if owingOnFailure { self.oweRelease(id, requestID: requestID) }
            return false
        }
    }

    func oweRelease(_ id: InstallationID, requestID: String) {
        self.state.withLock { s in
            if !s.shuttingDown { s.releasesOwed.owe(id, owner: requestID) }
        }
    }

    private func recordAttempt(_ id: InstallationID, outcome: String) {
        self.metrics.countAttempt(outcome: outcome)
        if outcome != "success" {
            self.logger.notice(
                "trigger attempt failed", metadata: ["installation.id": "\(id)", "trigger.outcome": "\(outcome)"])
        }
    }

    /// The material read with the round's lease, for the first call made under it (attempt 1, or
    /// the next one after the lease was lost and taken again); taken in the step that starts the
    /// attempt, so a late task of an older attempt cannot take it. Later attempts read anew (nil).
    private func takeLeaseMaterial(_ id: InstallationID, requestID: String) -> TriggerMaterialRead? {
        self.state.withLock { s -> TriggerMaterialRead? in
            guard let kept = s.leaseMaterial[id], kept.requestID == requestID else { return nil }
            s.leaseMaterial[id] = nil
            return kept.read
        }
    }

    private func takeWaiters(_ ids: [WaiterID]) -> [Waiter] {
        self.state.withLock { s in
            ids.compactMap { id in
                guard let waiter = s.waiters.removeValue(forKey: id) else { return nil }
                let left = (s.waitersPerInstallation[waiter.installation] ?? 1) - 1
                s.waitersPerInstallation[waiter.installation] = left > 0 ? left : nil
                return waiter
            }
        }
    }

    /// Forgets the lease `requestID` holds (true when this process held it), only the take `take`
    /// of it when given.
    func dropLease(_ id: InstallationID, requestID: String, take: UInt64? = nil) -> Bool {
        let held = self.state.withLock { s -> Bool in
            guard s.leasesHeld[id] == requestID, take == nil || s.leaseTakes[id] == take else { return false }
            s.leasesHeld[id] = nil
            s.leaseTakes[id] = nil
            s.leaseMaterial[id] = nil
            return true
        }
        if held { self.metrics.leasesHeld.decrement() }
        return held
    }

    /// Extends the lease of the round `requestID`; when the store says it is not that round's
    /// (another owner, or none), the round stops leading (``LeasedRoundStateMachine/leaseLost(requestID:now:)``).
    /// A store error says nothing either way: the round goes on. `take`: the take of the lease the
    /// extension is for; an answer about an earlier take than the one held now is not this one's.
    private func extendLease(_ id: InstallationID, requestID: String, ttl: Duration, take: UInt64?) async {
        guard let ours = try? await self.store.extendLease(id, requestID: requestID, ttl: ttl), !ours else { return }
        guard self.dropLease(id, requestID: requestID, take: take ?? .max) else { return }
        self.logger.warning(
            "round trip lost its lease; following instead of leading",
            metadata: ["installation.id": "\(id)", "request.id": "\(requestID)"])
        self.handle(id) { $0.leaseLost(requestID: requestID, now: self.now()) }
    }

    /// Places the hold as a child task of ``run()`` and runs `then` once it is in the store (or the
    /// write failed), or at `answerBy` if the write is still out then: callers are not kept past
    /// their deadline by a slow store.
    private func placeHold(
        _ id: InstallationID, requestID: String, duration: Duration, releasingLease: Bool, answerBy: FlowTime?,
        then: @escaping @Sendable () -> Void
    ) {
        let released = releasingLease && self.dropLease(id, requestID: requestID)
        self.noteOwnAnnouncement(OwnAnnouncement(installation: id, tag: "hold"))
        self.logger.info(
            "round trip brought no newer token; round trips on hold",
            metadata: ["installation.id": "\(id)", "hold.ms": "\(duration.milliseconds)"])
        let write: Job = {
            do {
                try await self.store.placeHold(
                    id, requestID: requestID, duration: duration, releasingLease: released)
            } catch {
                self.logger.warning("could not place the round-trip hold", metadata: ["installation.id": "\(id)"])
                if released { await self.releaseLease(id, requestID: requestID) }
            }
        }
        self.submit { await self.clock.run(write, thenBy: answerBy, then) }
    }

    // MARK: - Timers

    /// Starts timer `key`: a child task of ``run()`` that waits for `deadline` (or for the timer
    /// to be cancelled) and then feeds `timerFired` to the machine.
    private func schedule(_ key: TimerKey, at deadline: FlowTime) {
        self.timers.arm(key)
        self.submit {
            guard await self.timers.wait(key, until: deadline) else { return }
            self.handle(key.installation) {
                $0.timerFired(key.timer, now: self.now(), jitter: Double.random(in: 0...1))
            }
        }
    }
}
