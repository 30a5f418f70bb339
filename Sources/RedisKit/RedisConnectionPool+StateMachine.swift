import NIOCore

/// The slots of a connection pool: which are connected, connecting, or waiting out a reconnect backoff.
///
/// Pure: no I/O, no clock and no randomness — `now` and `jitter` come in as values, and every decision comes
/// out as an action for the owner to perform.
struct RedisPoolStateMachine<Connection: AnyObject> {
    /// One connect attempt of one slot.
    struct ConnectAttempt: Hashable {
        var slot: Int
        var id: UInt64
    }

    /// What the owner must do to serve one command.
    enum LeaseAction {
        /// Send on `connection`. If `startConnecting` is set, also start that attempt in the background (the slot
        /// picked by round robin was not connected yet).
        case use(Connection, startConnecting: ConnectAttempt?)
        /// No connection is up: wait (within the command's deadline) for `attempt`, starting it first if
        /// `start` is `true`.
        case wait(for: ConnectAttempt, start: Bool)
        /// No slot is connected, connecting, or allowed to connect yet (or the pool is shut down): fail now.
        case failFast
    }

    private enum Slot {
        /// Not connected; may connect once `retryAfter` has passed (`nil`: right away).
        case idle(retryAfter: NIODeadline?)
        case connecting(attemptID: UInt64)
        case connected(Connection)
    }

    private var slots: [Slot]
    /// Consecutive failed connect attempts per slot; reset by a successful connect.
    private var failures: [Int]
    private var nextSlot = 0
    private var nextAttemptID: UInt64 = 0
    private let backoffBase: Duration
    private let backoffCap: Duration
    private(set) var isShutDown = false

    init(size: Int, backoffBase: Duration, backoffCap: Duration) {
        let size = max(size, 1)
        self.slots = Array(repeating: .idle(retryAfter: nil), count: size)
        self.failures = Array(repeating: 0, count: size)
        self.backoffBase = backoffBase
        self.backoffCap = backoffCap
    }

    /// A command needs a connection.
    ///
    /// Slots are picked round robin. A picked slot that is not connected starts connecting (if its backoff
    /// allows) while the command goes to another connected slot, if there is one; otherwise the command waits for
    /// a connect attempt, or fails fast when every slot is backing off.
    mutating func connectionRequested(now: NIODeadline) -> LeaseAction {
        guard !self.isShutDown else {
            return .failFast
        }
        let picked = self.nextSlot
        self.nextSlot = (self.nextSlot + 1) % self.slots.count

        var started: ConnectAttempt?
        switch self.slots[picked] {
        case .connected(let connection):
            return .use(connection, startConnecting: nil)
        case .idle(let retryAfter) where retryAfter.map { $0 <= now } ?? true:
            started = self.startAttempt(slot: picked)
        case .idle, .connecting:
            break
        }

        let order = (0..<self.slots.count).map { (picked + $0) % self.slots.count }
        for index in order {
            if case .connected(let connection) = self.slots[index] {
                return .use(connection, startConnecting: started)
            }
        }
        if let started {
            return .wait(for: started, start: true)
        }
        for index in order {
            if case .connecting(let attemptID) = self.slots[index] {
                return .wait(for: ConnectAttempt(slot: index, id: attemptID), start: false)
            }
        }
        for index in order {
            if case .idle(let retryAfter) = self.slots[index], retryAfter.map({ $0 <= now }) ?? true {
                return .wait(for: self.startAttempt(slot: index), start: true)
            }
        }
        return .failFast
    }

    private mutating func startAttempt(slot: Int) -> ConnectAttempt {
        let attempt = ConnectAttempt(slot: slot, id: self.nextAttemptID)
        self.nextAttemptID &+= 1
        self.slots[slot] = .connecting(attemptID: attempt.id)
        return attempt
    }

    /// A connect attempt produced a ready connection. Returns `false` when the owner must close it instead
    /// (the pool was shut down meanwhile).
    mutating func connectSucceeded(_ attempt: ConnectAttempt, connection: Connection) -> Bool {
        guard !self.isShutDown, case .connecting(let id) = self.slots[attempt.slot], id == attempt.id else {
            return false
        }
        self.slots[attempt.slot] = .connected(connection)
        self.failures[attempt.slot] = 0
        return true
    }

    /// A connect attempt failed: the slot backs off. Returns the number of consecutive failures and the
    /// instant before which the slot will not try again.
    ///
    /// - Parameter jitter: a random number in `0...1` for ``Backoff``.
    @discardableResult
    mutating func connectFailed(
        _ attempt: ConnectAttempt,
        now: NIODeadline,
        jitter: Double
    ) -> (failures: Int, retryAfter: NIODeadline)? {
        guard case .connecting(let id) = self.slots[attempt.slot], id == attempt.id else {
            return nil
        }
        self.failures[attempt.slot] += 1
        let failures = self.failures[attempt.slot]
        let delay = Backoff.delay(
            attempt: failures,
            base: self.backoffBase,
            cap: self.backoffCap,
            jitter: jitter
        )
        let retryAfter = now + TimeAmount(delay)
        self.slots[attempt.slot] = .idle(retryAfter: retryAfter)
        return (failures, retryAfter)
    }

    /// An established connection closed. The slot reconnects on its next use right away; only failed connect
    /// attempts back off. Returns `false` if the connection was not (or no longer) in the pool.
    mutating func connectionClosed(_ connection: Connection) -> Bool {
        for index in self.slots.indices {
            if case .connected(let current) = self.slots[index], current === connection {
                self.slots[index] = .idle(retryAfter: nil)
                return true
            }
        }
        return false
    }

    /// The pool shuts down: returns the connections to close; later requests fail fast and connect attempts that
    /// finish later must be closed.
    mutating func shutDown() -> [Connection] {
        self.isShutDown = true
        var connections: [Connection] = []
        for index in self.slots.indices {
            if case .connected(let connection) = self.slots[index] {
                connections.append(connection)
            }
            self.slots[index] = .idle(retryAfter: nil)
        }
        return connections
    }

    /// The connections currently up.
    var connectedConnections: [Connection] {
        self.slots.compactMap { slot in
            if case .connected(let connection) = slot { connection } else { nil }
        }
    }
}
