import FlowEngine

/// Running the round machines: events in under the lock, their actions out as answers at once and
/// as store calls, exchange attempts and timers in child tasks of ``UserTokenExchanger/run()``.
extension UserTokenExchanger {
    /// Hands `work` to ``run()``, which runs it as a child task; false once it no longer takes any.
    @discardableResult
    func submit(_ work: @escaping Work) -> Bool {
        if case .terminated = self.work.continuation.yield(work) { return false }
        return true
    }

    /// Feeds one event to the user's machine (if it exists) and runs the resulting actions. A
    /// machine that no longer knows anything is dropped.
    func handle(_ key: FlightKey, _ event: (inout UserRoundMachine) -> [UserRoundMachine.Action]) {
        let now = self.clock.now()
        let result = self.state.withLock { s -> (Job, [UserRoundMachine.Action])? in
            guard var flight = s.flights[key] else { return nil }
            let actions = event(&flight.machine)
            s.flights[key] = flight.machine.isRetained(at: now) ? flight : nil
            return (flight.job, actions)
        }
        if let (job, actions) = result { self.perform(job, actions) }
    }

    /// Runs the actions of the round of `job`. A lease to give up goes first: the callers are
    /// answered once it is released, so one that asks again at once finds the user free, or at
    /// the earliest of their deadlines if the release is still out then (a slow store). Timers
    /// are armed at once all the same: a caller's deadline (that of a forced refresh starting a
    /// round as the last one ends, in the same step) holds however long the release takes.
    func perform(_ job: Job, _ actions: [UserRoundMachine.Action]) {
        guard !actions.isEmpty else { return }
        let key = job.key
        var rest = actions
        for case .releaseLease(let requestID) in actions {
            rest.removeAll { $0 == .releaseLease(requestID: requestID) }
            guard self.state.withLock({ $0.leasesHeld[key] == requestID }) else { continue }
            let timers = rest.filter { if case .scheduleTimer = $0 { true } else { false } }
            self.execute(job, timers)
            let later = rest.filter { if case .scheduleTimer = $0 { false } else { true } }
            let answerBy = self.earliestDeadline(of: later)
            let submitted = self.submit {
                await self.release(key, owner: requestID, answerBy: answerBy) { self.execute(job, later) }
            }
            // Shutting down: ``run()`` releases the lease once its work has ended.
            if !submitted { self.execute(job, later) }
            return
        }
        self.execute(job, rest)
    }

    /// Releases the lease `owner` holds and then runs `then`, or at `answerBy` if the release is
    /// still out then (it goes on to its end).
    private func release(
        _ key: FlightKey, owner: String, answerBy: FlowTime?, then: @escaping @Sendable () -> Void
    ) async {
        let release: Work = {
            await self.giveBack(key, owner: owner)
            self.state.withLock { s in _ = s.forgetLease(key, owner: owner) }
        }
        await self.clock.run(release, thenBy: answerBy, then)
    }

    /// The earliest deadline of the callers these actions answer, if any.
    private func earliestDeadline(of actions: [UserRoundMachine.Action]) -> FlowTime? {
        let waiters = actions.flatMap { action -> [WaiterID] in
            switch action {
            case .succeed(let waiters, _, _), .fail(let waiters, _): return waiters
            default: return []
            }
        }
        guard !waiters.isEmpty else { return nil }
        return self.state.withLock { s in waiters.compactMap { s.slots[$0.raw]?.deadline }.min() }
    }

    private func execute(_ job: Job, _ actions: [UserRoundMachine.Action]) {
        let key = job.key
        for action in actions {
            switch action {
            case .acquireLease(let requestID, let ttl, _), .acquireLeaseIgnoringHold(let requestID, let ttl, _):
                // The first attempt re-reads the user's token once the lease is won: a token another
                // process stored meanwhile is the answer, without an exchange.
                self.submit { await self.acquireLease(job, requestID: requestID, ttl: ttl) }
            case .extendLease(let requestID, let ttl):
                let take = self.state.withLock { s in s.leasesHeld[key] == requestID ? s.leaseTakes[key] : nil }
                guard let take else { continue }
                self.submit {
                    guard
                        let ours = try? await self.store.extendLease(
                            key.installation, accountId: key.accountId, owner: requestID, ttl: ttl), !ours
                    else { return }
                    // Not this round's any more (another owner, or none): it stops leading.
                    // Not when the lease was taken again since (an answer about an older take).
                    let held = self.state.withLock { s in s.forgetLease(key, owner: requestID, take: take) }
                    guard held else { return }
                    var led = false
                    self.handle(key) { m in
                        led = m.currentRequestID == requestID && m.isLeading
                        return m.leaseLost(requestID: requestID, now: self.clock.now())
                    }
                    guard led else { return }
                    self.logger.warning(
                        "user-token exchange lost its lease; following instead of leading",
                        metadata: ["installation.id": "\(key.installation)"])
                }
            case .startAttempt(let requestID, let attempt, let expiresAt, let timeout):
                // The first attempt under a take of the lease reads the store once more; decided
                // here, in the step that starts it, so a late task of an older attempt cannot take it.
                let recheck = self.state.withLock { s -> Bool in
                    guard s.leasesHeld[key] == requestID, let take = s.leaseTakes[key], s.recheckDue[key] == take
                    else { return false }
                    s.recheckDue[key] = nil
                    return true
                }
                self.submit {
                    await self.attempt(
                        job, requestID: requestID, attempt: attempt, deadline: expiresAt, timeout: timeout,
                        recheck: recheck)
                }
            case .readStore(let requestID):
                self.submit { await self.readStore(job, requestID: requestID) }
            case .scheduleTimer(let timer, let deadline):
                self.schedule(TimerKey(flight: key, timer: timer), at: deadline)
            case .cancelTimer(let timer):
                self.timers.cancel(TimerKey(flight: key, timer: timer))
            case .succeed(let waiters, let value, _):
                self.answer(
                    waiters, .success(Answer(token: value.token, source: .exchange, apiBaseUrl: value.apiBaseUrl)))
            case .fail(let waiters, let error):
                self.answer(waiters, .failure(error))
            case .releaseLease, .placeHold, .recordAttempt, .recordRetry, .roundFinished, .recordHold:
                // User rounds place no holds and open no circuit; each exchange call is counted
                // by the attempt that made it.
                continue
            }
        }
    }

    // MARK: - Timers

    /// Starts timer `key`: a child task of ``run()`` that waits for `deadline` (or for the timer
    /// to be cancelled) and then feeds `timerFired` to the machine.
    private func schedule(_ key: TimerKey, at deadline: FlowTime) {
        self.timers.arm(key)
        self.submit {
            guard await self.timers.wait(key, until: deadline) else { return }
            self.handle(key.flight) { $0.timerFired(key.timer, now: self.clock.now(), jitter: self.jitter()) }
        }
    }
}
