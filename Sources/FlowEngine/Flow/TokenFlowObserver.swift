/// Sees the actions a ``TokenFlow`` is about to perform for an installation, in order, after its
/// state machine decided them. For observation only (round-trip history, status pages): it runs
/// on the flow's path, so it must return quickly, never block and never throw; any I/O it needs
/// it starts on its own.
public protocol TokenFlowObserver: Sendable {
    /// `actions` are about to run for `installation`; `now` is the flow's clock.
    func tokenFlow(performs actions: [FlowAction], for installation: InstallationID, at now: FlowTime)
}
