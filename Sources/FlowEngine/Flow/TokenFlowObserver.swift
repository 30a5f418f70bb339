/// Sees the actions a ``TokenFlow`` is about to perform for an installation, in order, after its
/// state machine decided them. For observation only (round-trip history, status pages): it runs
/// on the flow's path, so it must return quickly, never block and never throw; the I/O it needs
/// it hands back as work, which the flow runs as a child task of its run loop (so shutdown awaits
/// it, as every other piece of the flow's work).
public protocol TokenFlowObserver: Sendable {
    /// `actions` are about to run for `installation`; `now` is the flow's clock.
    ///
    /// - Returns: work to run for what it saw (a store write), or nil.
    func tokenFlow(performs actions: [FlowAction], for installation: InstallationID, at now: FlowTime)
        -> (@Sendable () async -> Void)?
}
