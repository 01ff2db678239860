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
/// - after `shutdown()`, nothing is leased and every session is closed once it comes back;
/// - after `loginRefused()`, nothing is leased and nothing is opened (so no `C_Login` is tried)
///   until `loginResumed()`; sessions are closed as they come back.
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
        /// The token refused the PIN: no session can be logged in until an operator acts.
        case loginRefused
    }

    /// What the pool does with lease requests.
    enum Mode: Hashable, Sendable {
        /// Leasing, opening and logging in as needed.
        case serving
        /// The token refused the PIN: every request fails at once, no session is opened.
        case loginRefused
        /// Shutting down: every request fails, sessions close as they come back.
        case shuttingDown
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
        /// The pool refuses every request because the token refused the PIN.
        var loginRefused = false
    }

    let maximumSessions: Int
    let maximumWaiters: Int

    private(set) var sessions: [SessionID: SessionState] = [:]
    /// Idle sessions, most recently returned last: reuse the warmest one first.
    private var idle: [SessionID] = []
    private var waiters: Deque<WaiterID> = []
    private var nextSessionID: SessionID = 0
    private(set) var mode = Mode.serving
    private var discarded = 0
    private var openFailures = 0

    init(maximumSessions: Int, maximumWaiters: Int) {
        precondition(maximumSessions >= 1, "a pool needs at least one session")
        precondition(maximumWaiters >= 0, "negative queue limit")
        self.maximumSessions = maximumSessions
        self.maximumWaiters = maximumWaiters
    }

    var statistics: Statistics {
        var statistics = Statistics(
            waiting: waiters.count, discarded: discarded, openFailures: openFailures,
            loginRefused: mode == .loginRefused)
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
    var isShuttingDown: Bool { mode == .shuttingDown }

    mutating func leaseRequested(_ waiter: WaiterID) -> Action {
        switch mode {
        case .shuttingDown: return Action(waiter: .fail([waiter], .shutDown))
        case .loginRefused: return Action(waiter: .fail([waiter], .loginRefused))
        case .serving: break
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
        if mode != .serving {
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
        switch mode {
        case .shuttingDown: return Action(shutdownCompleted: sessions.isEmpty)
        case .loginRefused: return .none
        case .serving: break
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
        if mode != .serving {
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

    /// A leased session comes back unusable on its own account: an operation may still be active
    /// on it, or the module misbehaved on it. Only that session is closed (the others share no
    /// such state) and counted as discarded; a replacement is opened once the close completes if
    /// anyone is waiting.
    mutating func sessionDiscarded(_ session: SessionID) -> Action {
        precondition(sessions[session] == .leased, "session \(session) was not leased")
        discarded += 1
        sessions[session] = .closing
        return Action(session: .close([session]))
    }

    /// A session asked for with `.close` is closed (successfully or not: its handle is gone).
    mutating func sessionClosed(_ session: SessionID) -> Action {
        precondition(sessions[session] == .closing, "session \(session) was not being closed")
        sessions[session] = nil
        switch mode {
        case .shuttingDown: return Action(shutdownCompleted: sessions.isEmpty)
        case .loginRefused: return .none
        case .serving: return Action(session: openIfNeeded())
        }
    }

    /// The token refused the PIN while a session was being logged in (report that session's
    /// `sessionOpenFailed` as well). Stop asking it: every waiter fails with `.loginRefused`,
    /// idle sessions close, leased ones close as they come back, and until `loginResumed()` every
    /// request fails at once and nothing is opened, so no further `C_Login` is tried.
    mutating func loginRefused() -> Action {
        guard mode == .serving else { return .none }
        mode = .loginRefused
        let failed = Array(waiters)
        waiters.removeAll()
        let closing = idle
        idle.removeAll()
        for session in closing {
            sessions[session] = .closing
        }
        return Action(
            waiter: failed.isEmpty ? .none : .fail(failed, .loginRefused),
            session: closing.isEmpty ? .none : .close(closing)
        )
    }

    /// An operator supplied a PIN again: serve requests as before (the next one opens a session
    /// and logs in with the new PIN).
    mutating func loginResumed() -> Action {
        guard mode == .loginRefused else { return .none }
        mode = .serving
        return .none
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
        guard mode != .shuttingDown else { return .none }
        mode = .shuttingDown
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
