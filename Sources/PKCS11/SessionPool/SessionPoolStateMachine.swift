import DequeModule

/// The session pool's logic, free of I/O: events go in, actions come out, and `SessionPool`
/// performs them (opens and closes sessions on its threads, resumes waiting tasks, runs timers).
///
/// Invariants:
/// - at most `maximumSessions` sessions exist at once, counting those being opened and closed
///   (a token counts a session until `C_CloseSession` returns);
/// - a session is leased to at most one waiter at a time;
/// - waiters are served first come, first served; at most `maximumWaiters` wait;
/// - a session is opened only for a waiter that no session being opened already covers;
/// - after `shutdown()`, nothing is leased and every session is closed once it comes back.
struct SessionPoolStateMachine: Sendable {
    typealias SessionID = Int
    typealias WaiterID = Int

    enum SessionState: Hashable, Sendable {
        case opening
        case idle
        case leased
        case closing
    }

    /// Why a waiter is failed.
    enum Failure: Hashable, Sendable {
        /// Its acquire timeout passed first.
        case timeout
        /// The queue was at `maximumWaiters` when it asked.
        case queueFull
        /// The pool is shutting down.
        case shutDown
        /// Opening a session failed and no other session can serve it.
        case openFailed
        /// The waiting task was cancelled.
        case cancelled
    }

    struct Action: Hashable, Sendable {
        enum WaiterAction: Hashable, Sendable {
            case none
            /// Hand `session` to `waiter`.
            case lease(SessionID, to: WaiterID)
            /// `waiter` now waits: start its acquire timer.
            case enqueued(WaiterID)
            /// Fail these waiters (their timers, if any, are cancelled too).
            case fail([WaiterID], Failure)
        }

        enum SessionAction: Hashable, Sendable {
            case none
            /// Open (and log in) a new session under this id; report `sessionOpened` or `sessionOpenFailed`.
            case open(SessionID)
            /// Close these sessions; report `sessionClosed` for each.
            case close([SessionID])
        }

        var waiter: WaiterAction = .none
        var session: SessionAction = .none
        /// Shutdown finished: every session is closed.
        var shutdownCompleted = false

        static let none = Action()
    }

    /// Counters for metrics and tests.
    struct Statistics: Hashable, Sendable {
        var opening = 0
        var idle = 0
        var leased = 0
        var closing = 0
        var waiting = 0
        /// Sessions discarded because they failed (and replaced on demand).
        var discarded = 0
        /// Failed attempts to open a session.
        var openFailures = 0
    }

    let maximumSessions: Int
    let maximumWaiters: Int

    private(set) var sessions: [SessionID: SessionState] = [:]
    /// Idle sessions, most recently returned last: reuse the warmest one first.
    private var idle: [SessionID] = []
    private var waiters: Deque<WaiterID> = []
    private var nextSessionID: SessionID = 0
    private(set) var isShuttingDown = false
    private var discarded = 0
    private var openFailures = 0

    init(maximumSessions: Int, maximumWaiters: Int) {
        precondition(maximumSessions >= 1, "a pool needs at least one session")
        precondition(maximumWaiters >= 0, "negative queue limit")
        self.maximumSessions = maximumSessions
        self.maximumWaiters = maximumWaiters
    }

    var statistics: Statistics {
        var statistics = Statistics(waiting: waiters.count, discarded: discarded, openFailures: openFailures)
        for state in sessions.values {
            switch state {
            case .opening: statistics.opening += 1
            case .idle: statistics.idle += 1
            case .leased: statistics.leased += 1
            case .closing: statistics.closing += 1
            }
        }
        return statistics
    }

    // MARK: Events

    /// A task asks for a session.
    mutating func leaseRequested(_ waiter: WaiterID) -> Action {
        if isShuttingDown {
            return Action(waiter: .fail([waiter], .shutDown))
        }
        if let session = idle.popLast() {
            sessions[session] = .leased
            return Action(waiter: .lease(session, to: waiter))
        }
        guard waiters.count < maximumWaiters else {
            return Action(waiter: .fail([waiter], .queueFull))
        }
        waiters.append(waiter)
        return Action(waiter: .enqueued(waiter), session: openIfNeeded())
    }

    /// A session asked for with `.open` is open and logged in.
    mutating func sessionOpened(_ session: SessionID) -> Action {
        precondition(sessions[session] == .opening, "session \(session) was not being opened")
        if isShuttingDown {
            sessions[session] = .closing
            return Action(session: .close([session]))
        }
        return handOver(session)
    }

    /// Opening a session failed; it never existed.
    mutating func sessionOpenFailed(_ session: SessionID) -> Action {
        precondition(sessions[session] == .opening, "session \(session) was not being opened")
        sessions[session] = nil
        openFailures += 1
        if isShuttingDown {
            return Action(shutdownCompleted: sessions.isEmpty)
        }
        // Only a session that exists or is on its way can serve the waiters; with none, they
        // would wait for nothing, so they fail now with the opening error.
        let servable = sessions.values.contains { $0 != .closing }
        guard !servable, !waiters.isEmpty else { return .none }
        let failed = Array(waiters)
        waiters.removeAll()
        return Action(waiter: .fail(failed, .openFailed))
    }

    /// A leased session comes back. `reusable` is false when it failed in a way that makes it
    /// unusable (closed underneath, token removed, login lost): it is closed, and a replacement is
    /// opened once the close completes if anyone is waiting. What breaks one session usually
    /// breaks them all (`C_CloseAllSessions`, a token removal, and the login state are per token,
    /// not per session), so the idle sessions are closed with it rather than handed to the next
    /// caller to fail on.
    mutating func sessionReleased(_ session: SessionID, reusable: Bool) -> Action {
        precondition(sessions[session] == .leased, "session \(session) was not leased")
        if isShuttingDown {
            if !reusable {
                discarded += 1
            }
            sessions[session] = .closing
            return Action(session: .close([session]))
        }
        guard reusable else {
            discarded += 1 + idle.count
            let closing = [session] + idle
            idle.removeAll()
            for id in closing {
                sessions[id] = .closing
            }
            return Action(session: .close(closing))
        }
        return handOver(session)
    }

    /// A session asked for with `.close` is closed (successfully or not: its handle is gone).
    mutating func sessionClosed(_ session: SessionID) -> Action {
        precondition(sessions[session] == .closing, "session \(session) was not being closed")
        sessions[session] = nil
        if isShuttingDown {
            return Action(shutdownCompleted: sessions.isEmpty)
        }
        return Action(session: openIfNeeded())
    }

    /// The acquire timer of `waiter` fired.
    mutating func waiterTimedOut(_ waiter: WaiterID) -> Action {
        removeWaiter(waiter, failure: .timeout)
    }

    /// The task behind `waiter` was cancelled.
    mutating func waiterCancelled(_ waiter: WaiterID) -> Action {
        removeWaiter(waiter, failure: .cancelled)
    }

    /// Stop leasing: fail every waiter, close idle sessions now and the others as they come back.
    mutating func shutdown() -> Action {
        guard !isShuttingDown else { return .none }
        isShuttingDown = true
        let failed = Array(waiters)
        waiters.removeAll()
        let closing = idle
        idle.removeAll()
        for session in closing {
            sessions[session] = .closing
        }
        return Action(
            waiter: failed.isEmpty ? .none : .fail(failed, .shutDown),
            session: closing.isEmpty ? .none : .close(closing),
            shutdownCompleted: sessions.isEmpty
        )
    }

    // MARK: Helpers

    /// Gives a usable session to the first waiter, or parks it as idle.
    private mutating func handOver(_ session: SessionID) -> Action {
        if let waiter = waiters.popFirst() {
            sessions[session] = .leased
            return Action(waiter: .lease(session, to: waiter))
        }
        sessions[session] = .idle
        idle.append(session)
        return .none
    }

    /// Opens a session when a waiter is not covered by one already opening and there is room.
    private mutating func openIfNeeded() -> Action.SessionAction {
        let opening = sessions.values.count(where: { $0 == .opening })
        guard waiters.count > opening, sessions.count < maximumSessions else { return .none }
        let session = nextSessionID
        nextSessionID += 1
        sessions[session] = .opening
        return .open(session)
    }

    private mutating func removeWaiter(_ waiter: WaiterID, failure: Failure) -> Action {
        guard let index = waiters.firstIndex(of: waiter) else { return .none }
        waiters.remove(at: index)
        return Action(waiter: .fail([waiter], failure))
    }
}
