import Logging

/// The work the machines' actions ask for: each runs as a child task of ``TokenFlow/run()`` and
/// feeds its result back to the machine as an event.
extension TokenFlow {
    func acquireLease(
        _ id: InstallationID, requestID: String, ttl: Duration, respectingHold: Bool, unlessNewerThan: Int64
    ) async {
        do {
            let (outcome, material) = try await self.store.takeLease(
                id, requestID: requestID, replicaID: self.replicaID, ttl: ttl, respectingHold: respectingHold,
                unlessNewerThan: unlessNewerThan, material: self.trigger.triggerMaterialQuery(for: id))
            switch outcome {
            case .taken:
                let kept = self.state.withLock { s -> Bool in
                    guard !s.shuttingDown else { return false }
                    s.leasesHeld[id] = requestID
                    s.nextLeaseTake += 1
                    s.leaseTakes[id] = s.nextLeaseTake
                    s.leaseMaterial[id] = material.map { LeaseMaterial(requestID: requestID, read: $0) }
                    return true
                }
                guard kept else {
                    await self.releaseLease(id, requestID: requestID)
                    return
                }
                self.metrics.leasesHeld.increment()
                var led = false
                self.handle(id) { m in
                    let actions = m.leaseAcquired(requestID: requestID, now: self.now())
                    led = !actions.isEmpty
                    return actions
                }
                // The round ended while the lease was being taken (its callers were answered by
                // another round's token, or went away): nobody leads with it, so it goes back.
                if !led, self.dropLease(id, requestID: requestID) {
                    await self.releaseLease(id, requestID: requestID)
                }
            case .busy:
                self.handle(id) { $0.leaseDenied(requestID: requestID, now: self.now()) }
            case .newerStored:
                // Another round stored a token after this process last read: the callers follow
                // it, and the re-read hands it to them.
                self.handle(id) { $0.leaseDenied(requestID: requestID, now: self.now()) }
                await self.readStore(id, requestID: requestID)
            case .circuitOpen(let until):
                self.handle(id) {
                    $0.leaseRefusedByOpenCircuit(requestID: requestID, openUntil: until, now: self.now())
                }
            case .held(let remaining):
                // Another round trip just brought no newer token: answer with the newest one.
                let now = self.now()
                let generation = self.memoryGenerationNow()
                let entry = try await self.store.roundProbe(id, requestID: nil)
                guard !entry.uninstalled else {
                    self.installationUninstalled(id)
                    return
                }
                self.remember(id, entry.token, apiBaseUrl: entry.apiBaseUrl, readAt: generation)
                let hold = RoundTripHold(until: now + remaining, newest: entry.token)
                self.handle(id) { $0.leaseHeld(requestID: requestID, hold: hold, now: self.now()) }
            }
        } catch {
            self.logger.warning(
                "store unavailable while taking the lease", metadata: ["installation.id": "\(id)", "error": "\(error)"])
            self.storeFailed(id, requestID: requestID, unlessTakingLease: false)
            // The take may have happened with its answer lost (a timeout): a lease no round of this
            // process goes on with is given back (the release script compares the owner).
            let goesOn = self.state.withLock { $0.machines[id]?.currentRequestID == requestID }
            if !goesOn, self.store.mayHaveRun(failingWith: error) {
                await self.releaseLease(id, requestID: requestID, owingOnFailure: false)
            }
        }
    }

    func sendTrigger(
        _ id: InstallationID, requestID: String, attempt: Int, expiresAt: FlowTime, timeout: Duration,
        material: TriggerMaterialRead?
    ) async {
        let started = self.now()
        self.logger.debug(
            "sending auth trigger",
            metadata: ["installation.id": "\(id)", "request.id": "\(requestID)", "trigger.attempt": "\(attempt)"])
        let result = await self.trigger.sendTrigger(
            installation: id, requestID: requestID, attempt: attempt, issuedAt: started, expiresAt: expiresAt,
            timeout: timeout, material: material)
        let now = self.now()
        switch result {
        case .accepted:
            self.metrics.roundTrip.recordNanoseconds((now - started).nanoseconds)
            self.handle(id) { $0.attemptSucceeded(requestID: requestID, attempt: attempt, now: now) }
        case .failed(let failure):
            self.attemptFailed(id, requestID: requestID, attempt: attempt, failure: failure)
        case .notSent:
            // Uninstalled, and this process missed the notice (as a re-read finds it): 410 for the
            // callers, no retries, no failure counted against the installation's circuit.
            if let probe = try? await self.store.roundProbe(id, requestID: nil), probe.uninstalled {
                self.installationUninstalled(id)
                return
            }
            self.attemptFailed(id, requestID: requestID, attempt: attempt, failure: .transportError)
        }
    }

    private func attemptFailed(_ id: InstallationID, requestID: String, attempt: Int, failure: TriggerFailure) {
        self.handle(id) {
            $0.attemptFailed(
                requestID: requestID, attempt: attempt, failure: failure, now: self.now(),
                jitter: Double.random(in: 0...1))
        }
    }

    /// Reads the token, the round trip's pending request and the hold, and feeds what it found to
    /// the machine: the token (solicited when this round stored it), a delivery that answered this
    /// round without replacing the token (its pending request marked answered), a hold, or nothing.
    func readStore(_ id: InstallationID, requestID: String) async {
        do {
            let generation = self.memoryGenerationNow()
            let probe = try await self.store.roundProbe(id, requestID: requestID)
            // Uninstalled, and this process missed the notice: its callers get 410 as they would
            // have on the notice, and no round trip is tried for an installation that is gone.
            guard !probe.uninstalled else {
                self.installationUninstalled(id)
                return
            }
            self.remember(id, probe.token, apiBaseUrl: probe.apiBaseUrl, readAt: generation)
            let now = self.now()
            let hold = probe.holdRemaining.map { RoundTripHold(until: now + $0, newest: probe.token) }
            self.handle(id) { m in
                var actions: [FlowAction] = []
                if let token = probe.token {
                    let solicited = token.requestID == requestID ? requestID : nil
                    actions += m.valueObserved(token, solicitedBy: solicited, now: now)
                }
                if probe.pendingAnswered, probe.token?.requestID != requestID, m.currentRequestID == requestID {
                    // Answered by a delivery that did not replace the token (ignored unless this
                    // process leads the round trip: only the leader records a pending request). A
                    // pending request that expired unanswered, with a lease whose extension failed,
                    // says nothing of a delivery: the round goes on.
                    actions += m.roundTripBroughtNoNewerToken(requestID: requestID, newest: probe.token, now: now)
                }
                if let hold, m.isActive { actions += m.holdObserved(hold, now: now) }
                // Callers still waiting (no token, or none they accept) while following: the round
                // followed may be over, so the lease is tried (busy while another round runs).
                if m.isActive { actions += m.storeReadEmpty(requestID: requestID, now: now) }
                return actions
            }
        } catch {
            // A re-read that fails once the round moved on to a lease take (in flight, started
            // meanwhile) leaves the round to that take.
            self.storeFailed(id, requestID: requestID, unlessTakingLease: true)
        }
    }

    /// The store could not be reached for the round `requestID`: the machine hears of it with the
    /// still-valid token this process holds in memory (verified or not, read in the same step),
    /// which its callers get (contract: `store_unavailable` only without one).
    private func storeFailed(_ id: InstallationID, requestID: String, unlessTakingLease: Bool) {
        let now = self.now()
        self.handle(
            id,
            remembering: { m, token in
                guard !unlessTakingLease || m.stateName(at: now) != .acquiringLease else { return [] }
                let fallback = token.flatMap { $0.expiresAt > now.unixSeconds ? $0 : nil }
                return m.storeFailed(requestID: requestID, fallback: fallback, now: now)
            })
    }

    /// Records the verdict of a round trip this process led (releasing its lease in the same step
    /// when `releasingLease` names it); the circuit as the store now has it goes to the machine.
    func recordRound(_ id: InstallationID, succeeded: Bool, releasingLease requestID: String? = nil) async {
        do {
            let now = self.now()
            let c = self.configuration
            let openUntil =
                if let requestID {
                    try await self.store.recordRoundOutcome(
                        id, succeeded: succeeded, threshold: c.breakerThreshold, openBase: c.breakerOpenBase,
                        openCap: c.breakerOpenCap, now: now, releasingLease: requestID)
                } else {
                    try await self.store.recordRoundOutcome(
                        id, succeeded: succeeded, threshold: c.breakerThreshold, openBase: c.breakerOpenBase,
                        openCap: c.breakerOpenCap, now: now)
                }
            self.updateOpenCircuits { circuits in
                if let openUntil { circuits[id] = openUntil } else if succeeded { circuits.removeValue(forKey: id) }
            }
            if let openUntil {
                self.logger.warning(
                    "circuit opened after consecutive failed round trips",
                    metadata: ["installation.id": "\(id)", "circuit.open_until_ms": "\(openUntil.unixMilliseconds)"])
            }
            self.handle(id, creating: openUntil != nil) { $0.circuitObserved(openUntil: openUntil, now: self.now()) }
        } catch {
            self.logger.warning("could not record round-trip outcome", metadata: ["installation.id": "\(id)"])
            if let requestID { self.oweRelease(id, requestID: requestID) }
        }
    }
}
