import FlowEngine
import Logging

/// The work the round machines' actions ask for: each runs as a child task of
/// ``UserTokenExchanger/run()`` and feeds its result back to the machine as an event.
extension UserTokenExchanger {
    /// What the store says of a user while a round runs.
    enum Finding {
        /// A token other than the one the round started to replace (another process exchanged
        /// it): it answers the callers that accept it (``LeasedRoundStateMachine/valueObserved(_:solicitedBy:now:)``).
        /// The exchange lease has `leaseRemaining` left (nil: nobody holds it).
        case value(UserToken, leaseRemaining: Duration?)
        /// An answer that ends the round: a remembered refusal, the installation gone.
        case failure(UserTokenError)
        /// Nothing yet; the exchange lease has this long left (nil: nobody holds it).
        case nothing(leaseRemaining: Duration?)
    }

    func finding(_ snapshot: UserTokenSnapshot, job: Job, now: FlowTime) -> Finding {
        guard snapshot.exists else { return .failure(.flow(.installationNotFound)) }
        guard snapshot.status == .active else { return .failure(.flow(.installationUninstalled)) }
        if let token = snapshot.token, token.value != job.ignoring?.value, token.expiresAt > now.unixSeconds {
            return .value(
                UserToken(token: token, apiBaseUrl: snapshot.apiBaseUrl ?? job.apiBaseUrl, roundID: nil),
                leaseRemaining: snapshot.leaseRemaining)
        }
        if snapshot.deniedFor != nil { return .failure(.denied) }
        return .nothing(leaseRemaining: snapshot.leaseRemaining)
    }

    /// The event a finding is for round `requestID`, which does not lead: a value answers the
    /// callers that accept it (a forced refresh does not accept the token it was sent to replace,
    /// even when the round started for another one), a failure ends the round. With callers left,
    /// a round whose lease was refused (`leaseRefused`) follows until the other process's lease
    /// ends; a follower waits for that again, or takes the lease when it is gone. A finding that no
    /// longer fits the round's phase (it moved on meanwhile) changes nothing more.
    func event(for finding: Finding, requestID: String, leaseRefused: Bool, now: FlowTime)
        -> (inout UserRoundMachine) -> [UserRoundMachine.Action]
    {
        { m in
            var actions: [UserRoundMachine.Action] = []
            let remaining: Duration?
            switch finding {
            case .value(let value, let leaseRemaining):
                actions = m.valueObserved(value, solicitedBy: nil, now: now)
                remaining = leaseRemaining
            case .failure(let error):
                return m.roundEnded(requestID: requestID, failing: error, now: now)
            case .nothing(let leaseRemaining):
                remaining = leaseRemaining
            }
            let phase: UserRoundMachine.StateName = leaseRefused ? .acquiringLease : .following
            guard m.currentRequestID == requestID, m.stateName(at: now) == phase else { return actions }
            guard let remaining else {
                if leaseRefused {
                    return actions + m.leaseDenied(requestID: requestID, leaseRemaining: .zero, now: now)
                }
                return actions + m.storeReadEmpty(requestID: requestID, now: now)
            }
            return actions + m.leaseDenied(requestID: requestID, leaseRemaining: remaining, now: now)
        }
    }

    func acquireLease(_ job: Job, requestID: String, ttl: Duration) async {
        let key = job.key
        let won: Bool
        do {
            won = try await self.store.acquireLease(
                key.installation, accountId: key.accountId, owner: requestID, ttl: ttl)
        } catch {
            self.logger(for: job).warning(
                "store unavailable while taking the exchange lease", metadata: ["error": "\(error)"])
            self.handle(key) { $0.storeFailed(requestID: requestID, now: self.clock.now()) }
            // The take may have happened with its answer lost (a timeout): a lease no round of this
            // process goes on with is given back (the release compares the owner), so the user's
            // next exchange, on any replica, does not wait for it to expire.
            let goesOn = self.state.withLock { $0.flights[key]?.machine.currentRequestID == requestID }
            if !goesOn {
                _ = try? await self.store.releaseLease(key.installation, accountId: key.accountId, owner: requestID)
            }
            return
        }
        guard won else {
            await self.readStore(job, requestID: requestID, leaseRefused: true)
            return
        }
        let kept = self.state.withLock { s -> Bool in
            guard !s.shuttingDown else { return false }
            s.leasesHeld[key] = requestID
            s.nextLeaseTake += 1
            s.leaseTakes[key] = s.nextLeaseTake
            s.recheckDue[key] = s.nextLeaseTake
            return true
        }
        guard kept else {
            await self.giveBack(key, owner: requestID)
            return
        }
        var led = false
        self.handle(key) { m in
            let actions = m.leaseAcquired(requestID: requestID, now: self.clock.now())
            led = !actions.isEmpty
            return actions
        }
        // The round ended while the lease was being taken (its callers answered or gone): nobody
        // leads with it, so it goes back instead of keeping the user's next exchange waiting.
        let unused =
            !led
            && self.state.withLock { s in s.forgetLease(key, owner: requestID) }
        if unused { await self.giveBack(key, owner: requestID) }
    }

    /// Reads what the store says of the user and feeds it to the round `requestID`, which does
    /// not lead (its lease was refused, or it follows).
    func readStore(_ job: Job, requestID: String, leaseRefused: Bool = false) async {
        do {
            let snapshot = try await self.store.snapshot(job.installation, accountId: job.accountId.value, timeout: nil)
            let now = self.clock.now()
            let finding = self.finding(snapshot, job: job, now: now)
            self.handle(job.key, self.event(for: finding, requestID: requestID, leaseRefused: leaseRefused, now: now))
        } catch {
            let now = self.clock.now()
            self.handle(job.key) { m in
                let follows: Set<UserRoundMachine.StateName> = [.acquiringLease, .following]
                guard follows.contains(m.stateName(at: now)) else { return [] }
                return m.roundEnded(requestID: requestID, failing: .storeUnavailable, now: now)
            }
        }
    }

    // MARK: - One attempt

    /// How one attempt ended, as the machine hears it.
    enum AttemptEnd {
        case value(UserToken)
        case failure(UserTokenError)
        case retryable(TriggerFailure)
        /// The exchange refused the system token (401).
        case systemTokenRefused
    }

    /// Attempt `attempt` of the round `requestID`, which this process leads: with `recheck` (the
    /// first attempt under a take of the lease) the store once more (another process may have just
    /// finished; after a lease lost and taken again, it likely has), then one exchange call, and one more with a
    /// fresh system token when the first was answered 401. Outcomes are recorded in the store
    /// (the token cached, a refusal or a rate limit remembered) before the machine hears of them.
    func attempt(
        _ job: Job, requestID: String, attempt: Int, deadline: FlowTime, timeout: Duration, recheck: Bool
    ) async {
        var end: AttemptEnd
        switch recheck ? await self.recheck(job, requestID: requestID) : .exchange {
        case .answered:
            return
        case .settled(let settled):
            end = settled
        case .exchange:
            end = await self.exchange(job, requestID: requestID, attempt: attempt, deadline: deadline)
            if case .systemTokenRefused = end {
                end = await self.exchange(
                    job, requestID: requestID, attempt: attempt, deadline: deadline, renewing: true)
            }
        }
        let now = self.clock.now()
        self.handle(job.key) { m in
            switch end {
            case .value(let value):
                return m.valueObserved(value, solicitedBy: requestID, now: now)
            case .failure(let error):
                // Not once the round moved on (its lease was lost meanwhile): nobody waits for it.
                guard m.isAttempting(requestID, attempt: attempt) else { return [] }
                return m.roundEnded(requestID: requestID, failing: error, now: now)
            case .systemTokenRefused:
                guard m.isAttempting(requestID, attempt: attempt) else { return [] }
                return m.roundEnded(
                    requestID: requestID, failing: .exchangeFailed("the system token was refused"), now: now)
            case .retryable(let failure):
                return m.attemptFailed(
                    requestID: requestID, attempt: attempt, failure: failure, now: now, jitter: self.jitter())
            }
        }
    }

    /// What the leader's re-read before its first call decided.
    enum Recheck {
        /// Nothing to answer with: the exchange call goes ahead.
        case exchange
        /// The attempt ends without a call (a remembered refusal, the installation gone).
        case settled(AttemptEnd)
        /// A token another process left answered every caller; the round is over.
        case answered
    }

    /// The store read again by the leader before its first call: an answer another process left.
    /// A token goes to the callers that accept it; the exchange goes ahead for those left (a
    /// forced refresh of that very token).
    private func recheck(_ job: Job, requestID: String) async -> Recheck {
        let finding: Finding
        do {
            let snapshot = try await self.store.snapshot(job.installation, accountId: job.accountId.value, timeout: nil)
            finding = self.finding(snapshot, job: job, now: self.clock.now())
        } catch {
            return .settled(.failure(.storeUnavailable))
        }
        switch finding {
        case .failure(let error):
            return .settled(.failure(error))
        case .nothing:
            return .exchange
        case .value(let value, _):
            let now = self.clock.now()
            var left = false
            self.handle(job.key) { m in
                let actions = m.valueObserved(value, solicitedBy: nil, now: now)
                left = m.currentRequestID == requestID && m.stateName(at: now) == .attempting
                return actions
            }
            return left ? .exchange : .answered
        }
    }

    /// One exchange call: a look at the shared budget and Atlassian's hold (so that either costs no
    /// system token, which may take a trigger round trip), the system token (a fresh one when
    /// `forceRefresh`), one exchange counted against the budget, the call, and its outcome recorded
    /// in the store. Only a call about to be made is counted.
    /// `renewing`: the call after a refusal, with a fresh system token (maybe a trigger round trip)
    /// when ``SystemTokenRefusals`` allows one: at most once a window per installation (callers
    /// renewing while that fetch is under way force too, and join its round), so a token Atlassian
    /// keeps refusing costs one, not one per user. A system token the exchange refused within the
    /// last window is not used again: the attempt ends as refused without a call.
    private func exchange(
        _ job: Job, requestID: String, attempt: Int, deadline: FlowTime, renewing: Bool = false
    ) async -> AttemptEnd {
        let logger = self.logger(for: job)
        if let refused = await self.admit(job, recording: false) { return refused }
        let forceRefresh =
            renewing && self.state.withLock { $0.refusals.beginForcedRefresh(job.installation, now: self.clock.now()) }
        if forceRefresh { logger.notice("the exchange refused the system token; fetching a fresh one") }
        let systemToken: AccessToken
        do {
            defer { if forceRefresh { self.state.withLock { $0.refusals.forcedRefreshEnded(job.installation) } } }
            systemToken = try await self.systemTokens.systemToken(
                for: job.installation, minValidity: self.configuration.systemTokenMinValidity,
                timeout: max(deadline - self.clock.now(), .zero), forceRefresh: forceRefresh)
        } catch {
            logger.notice("no system token for the exchange", metadata: ["error.code": "\(error.code.rawValue)"])
            return .failure(.flow(error))
        }
        if self.state.withLock({
            $0.refusals.isRefused(systemToken.value, for: job.installation, now: self.clock.now())
        }) {
            logger.notice("the system token was refused by an exchange a moment ago; not calling with it again")
            return renewing ? .failure(.exchangeFailed("the system token was refused")) : .systemTokenRefused
        }
        // No time left after the system token: no call, so nothing is counted.
        guard deadline > self.clock.now() else { return .retryable(.timeout) }
        if let refused = await self.admit(job, recording: true) { return refused }
        let remaining = deadline - self.clock.now()
        guard remaining > .zero else { return .retryable(.timeout) }
        logger.debug("exchanging for a user token", metadata: ["exchange.attempt": "\(attempt)"])
        let outcome = await self.client.exchange(
            systemToken: systemToken.value, context: job.context, accountId: job.accountId,
            timeout: min(self.configuration.attemptTimeout, remaining))
        self.metrics.count(outcome: outcome.outcome)
        if case .systemTokenRefused = outcome {
            let now = self.clock.now()
            self.state.withLock { $0.refusals.refused(systemToken.value, for: job.installation, now: now) }
        }
        return await self.record(outcome, job: job, requestID: requestID, attempt: attempt, renewed: renewing)
    }

    /// Counts one exchange against the app-wide budget (only looks, without `recording`); the
    /// answer when it is spent or held (or unknown). A refusal counts in `budget_exhausted`; it is
    /// logged unless `logging` is false (a caller's request looked at before it is admitted: one
    /// line per refused request would flood the log while the budget is spent).
    func admit(_ job: Job, recording: Bool, logging: Bool = true) async -> AttemptEnd? {
        do {
            let c = self.configuration
            let admission =
                recording
                ? try await self.store.admitExchange(
                    scope: c.budgetScope, limit: c.exchangesPerMinute, window: c.budgetWindow, now: self.clock.now())
                : try await self.store.peekExchange(
                    scope: c.budgetScope, limit: c.exchangesPerMinute, window: c.budgetWindow, now: self.clock.now())
            guard case .refused(let retryAfter) = admission else { return nil }
            if logging {
                self.logger(for: job).notice(
                    "user-token exchange held back by the shared budget",
                    metadata: ["retry.after_ms": "\(retryAfter.milliseconds)"])
            }
            self.metrics.count(outcome: "budget_exhausted")
            return .failure(.rateLimited(retryAfter: retryAfter))
        } catch {
            return .failure(.storeUnavailable)
        }
    }

    /// Records what the exchange call answered (in the store and the log) and says how the
    /// attempt ended.
    private func record(
        _ outcome: OfflineUserAuthTokenClient.Outcome, job: Job, requestID: String, attempt: Int, renewed: Bool
    ) async -> AttemptEnd {
        let logger = self.logger(for: job)
        switch outcome {
        case .token(let value, let ttl):
            return await self.keep(job, value: value, ttl: ttl, requestID: requestID, logger: logger)
        case .systemTokenRefused:
            return renewed ? .failure(.exchangeFailed("the system token was refused")) : .systemTokenRefused
        case .denied(let message):
            logger.notice("Atlassian refused a user token", metadata: ["exchange.message": "\(message ?? "-")"])
            do {
                let remembered = try await self.store.rememberDenial(
                    job.installation, accountId: job.accountId.value, for: self.configuration.denialMemory)
                // Nothing is written for an installation uninstalled meanwhile: it answers 410.
                if !remembered { return .failure(.flow(.installationUninstalled)) }
            } catch {
                logger.warning("could not remember the refusal", metadata: ["error": "\(error)"])
            }
            return .failure(.denied)
        case .rateLimited(let retryAfter):
            let hold = max(retryAfter ?? self.configuration.defaultRetryAfter, .seconds(1))
            logger.warning(
                "Atlassian rate-limited user-token exchanges; holding every replica back",
                metadata: ["retry.after_ms": "\(retryAfter.map { String($0.milliseconds) } ?? "-")"])
            do {
                try await self.store.blockExchanges(scope: self.configuration.budgetScope, for: hold)
            } catch {
                logger.warning("could not record the rate limit", metadata: ["error": "\(error)"])
            }
            return .failure(.rateLimited(retryAfter: hold))
        case .failed(let failure):
            logger.notice(
                "user-token exchange attempt failed",
                metadata: ["exchange.attempt": "\(attempt)", "exchange.outcome": "\(failure.outcome)"])
            guard failure.isRetryable else { return .failure(.exchangeFailed(failure.detail)) }
            return .retryable(TriggerFailure(failure))
        }
    }

    /// Caches a freshly exchanged token (best effort) and records it in the audit log.
    private func keep(_ job: Job, value: String, ttl: Int64?, requestID: String, logger: Logger) async -> AttemptEnd {
        let now = self.clock.now()
        let expiresAt: Int64
        if let exp = TokenClaims.expiry(of: value) {
            expiresAt = exp
        } else if let ttl {
            expiresAt = now.unixSeconds + ttl
        } else {
            logger.warning("the exchange answered a token with neither exp nor ttl")
            return .failure(.exchangeFailed("malformed answer"))
        }
        guard expiresAt > now.unixSeconds else {
            logger.warning("the exchange answered an expired token")
            return .failure(.exchangeFailed("malformed answer"))
        }
        // Forge tokens live at most 4 h: one said to live more than 24 h (a `ttl` in milliseconds,
        // say) is refused, as a delivered system token would be, rather than cached past its death.
        guard expiresAt - now.unixSeconds <= Gateway.maximumDeliveredLifetime else {
            logger.warning("the exchange answered a token said to live more than 24 hours")
            return .failure(.exchangeFailed("malformed answer"))
        }
        let token = AccessToken(value: value, expiresAt: expiresAt)
        // Noted before the write: a forced refresh of this token, read from the store before the
        // machine hears of it, must not be answered with it (``endRoundWithItsStoredToken``).
        self.state.withLock { s in
            guard s.flights[job.key]?.machine.currentRequestID == requestID else { return }
            s.flights[job.key]?.storing = (requestID, value)
        }
        var stored = false
        do {
            let outcome = try await self.store.store(
                job.installation, accountId: job.accountId.value, token: token,
                cacheUntil: expiresAt - self.configuration.cacheMargin.nanoseconds / 1_000_000_000, now: now)
            switch outcome {
            case .stored: stored = true
            case .tooShortLived: stored = false
            case .uninstalled: return .failure(.flow(.installationUninstalled))
            }
        } catch {
            // The caller still gets its token; the next request exchanges again.
            logger.warning("could not cache the user token", metadata: ["error": "\(error)"])
        }
        self.audit.tokenReceived(
            installation: job.installation, kind: "user_exchange", expiresAt: expiresAt, token: value, stored: stored,
            requestID: nil, accountId: job.accountId.value)
        return .value(UserToken(token: token, apiBaseUrl: job.apiBaseUrl, roundID: requestID))
    }

    func logger(for job: Job) -> Logger {
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(job.installation)"
        logger[metadataKey: "account.id"] = "\(job.accountId.value)"
        return logger
    }
}
