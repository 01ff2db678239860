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
///   until `loginResumed()`; sessions are closed as they come back;
/// - once the token is found unreachable (an open or a leased session's call says so), nothing is
///   leased or opened until every session is closed; then one reset attempt opens a session
///   (re-initialising the module when the pool's runner owns it); only one attempt runs at a time,
///   and after a failed one the next starts only when the retry timer has fired and a request
///   asks for a session;
/// - `epoch` grows with every reset attempt, which begins with no session open: a session never
///   outlives the epoch it was opened in, so object handles found on it are known to be fresh.
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
        /// The token cannot be reached: the last reset attempt failed.
        case tokenUnreachable
    }

    /// What the pool does with lease requests.
    enum Mode: Hashable, Sendable {
        /// Leasing, opening and logging in as needed.
        case serving
        /// The token refused the PIN: every request fails at once, no session is opened.
        case loginRefused
        /// The token was found unreachable. Requests wait (within their acquire timeouts) while
        /// every session is closed (`attempt` nil), then while one reset attempt opens a session
        /// under `attempt`; that session ends the reset when it opens, and a failure fails every
        /// waiter with `.tokenUnreachable`.
        case resetting(attempt: SessionID?)
        /// A reset attempt failed and no session exists: requests fail at once with
        /// `.tokenUnreachable`, except that once the retry timer fired (`retryDue`) the next one
        /// starts a new attempt and waits for it.
        case unreachable(retryDue: Bool)
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
            /// No session is open: find the token again (its slot by label; re-initialising the
            /// module first when that fails and the module is the runner's own), then open and
            /// log in a session under this id; report `sessionOpened` or `sessionOpenFailed`.
            case reset(SessionID)
        }

        var waiter: WaiterAction = .none
        var session: SessionAction = .none
        /// A reset attempt failed: report `retryTimerFired()` after the retry interval.
        var startRetryTimer = false
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
        /// The token was found unreachable and the pool has not reached it again yet.
        var tokenUnreachable = false
        /// Reset attempts begun (each one with every session closed).
        var epoch = 0
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
    /// Sessions that were being opened when an operator resumed logins (`loginResumed()`): their
    /// login may still fail with the PIN that was refused, which says nothing about the new one.
    private var openingBeforeResume: Set<SessionID> = []
    /// Reset attempts begun; see the invariants.
    private(set) var epoch = 0

    init(maximumSessions: Int, maximumWaiters: Int) {
        precondition(maximumSessions >= 1, "a pool needs at least one session")
        precondition(maximumWaiters >= 0, "negative queue limit")
        self.maximumSessions = maximumSessions
        self.maximumWaiters = maximumWaiters
    }

    var statistics: Statistics {
        var statistics = Statistics(
            waiting: waiters.count, discarded: discarded, openFailures: openFailures,
            loginRefused: mode == .loginRefused, tokenUnreachable: isTokenUnreachable, epoch: epoch)
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

    var isShuttingDown: Bool { mode == .shuttingDown }

    /// True from the moment the token is found unreachable until a reset attempt succeeds.
    var isTokenUnreachable: Bool {
        switch mode {
        case .resetting, .unreachable: true
        case .serving, .loginRefused, .shuttingDown: false
        }
    }

    /// A task asks for a session.
    mutating func leaseRequested(_ waiter: WaiterID) -> Action {
        switch mode {
        case .shuttingDown: return Action(waiter: .fail([waiter], .shutDown))
        case .loginRefused: return Action(waiter: .fail([waiter], .loginRefused))
        case .unreachable(retryDue: false): return Action(waiter: .fail([waiter], .tokenUnreachable))
        case .unreachable(retryDue: true):
            // This request is the demand that starts the next attempt; it waits for the outcome.
            guard waiters.count < maximumWaiters else {
                return Action(waiter: .fail([waiter], .tokenUnreachable), session: beginResetAttempt())
            }
            waiters.append(waiter)
            return Action(waiter: .enqueued(waiter), session: beginResetAttempt())
        case .resetting:
            guard waiters.count < maximumWaiters else {
                return Action(waiter: .fail([waiter], .queueFull))
            }
            waiters.append(waiter)
            return Action(waiter: .enqueued(waiter))
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

    /// A session asked for with `.open` or `.reset` is open and logged in.
    mutating func sessionOpened(_ session: SessionID) -> Action {
        precondition(sessions[session] == .opening, "session \(session) was not being opened")
        openingBeforeResume.remove(session)
        if mode == .resetting(attempt: session) {
            // The token answers again: serve, and open more sessions for those still waiting.
            mode = .serving
        }
        if mode != .serving {
            sessions[session] = .closing
            return Action(session: .close([session]))
        }
        var action = handOver(session)
        action.session = openIfNeeded()
        return action
    }

    /// Opening a session failed; it never existed. `tokenUnreachable` when the failure says the
    /// token as a whole cannot be reached (`PKCS11Error.isTokenUnreachable`, or its label is gone
    /// from the slot list): the pool stops leasing and resets.
    mutating func sessionOpenFailed(_ session: SessionID, tokenUnreachable: Bool = false) -> Action {
        precondition(sessions[session] == .opening, "session \(session) was not being opened")
        sessions[session] = nil
        openFailures += 1
        if openingBeforeResume.remove(session) != nil, mode == .serving {
            // Begun before the operator's new PIN: its failure is no reason to fail the waiters
            // that came since. Open another for them, with the new PIN.
            return Action(session: openIfNeeded())
        }
        switch mode {
        case .shuttingDown: return Action(shutdownCompleted: sessions.isEmpty)
        case .loginRefused, .unreachable: return .none
        case .resetting(let attempt) where attempt == session:
            // The attempt failed, whatever the reason: the token stays unreachable.
            mode = .unreachable(retryDue: false)
            let failed = Array(waiters)
            waiters.removeAll()
            return Action(
                waiter: failed.isEmpty ? .none : .fail(failed, .tokenUnreachable), startRetryTimer: true)
        case .resetting:
            return Action(session: resetIfDrained())
        case .serving where tokenUnreachable:
            return startReset(closing: [])
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

    /// A leased session comes back after one of its calls said the token cannot be reached
    /// (`PKCS11Error.isTokenUnreachable`): stop leasing, close it and the idle sessions now and
    /// the leased ones as they come back (their calls fail fast on a token that is gone), then
    /// reset. Waiters stay queued for the reset's outcome.
    mutating func tokenUnreachable(releasing session: SessionID) -> Action {
        precondition(sessions[session] == .leased, "session \(session) was not leased")
        discarded += 1
        sessions[session] = .closing
        guard mode == .serving else { return Action(session: .close([session])) }
        return startReset(closing: [session])
    }

    /// A session asked for with `.close` is closed (successfully or not: its handle is gone).
    mutating func sessionClosed(_ session: SessionID) -> Action {
        precondition(sessions[session] == .closing, "session \(session) was not being closed")
        sessions[session] = nil
        switch mode {
        case .shuttingDown: return Action(shutdownCompleted: sessions.isEmpty)
        case .loginRefused, .unreachable: return .none
        case .resetting: return Action(session: resetIfDrained())
        case .serving: return Action(session: openIfNeeded())
        }
    }

    /// The retry timer started after a failed reset attempt fired: the next request may start
    /// another attempt.
    mutating func retryTimerFired() -> Action {
        if mode == .unreachable(retryDue: false) {
            mode = .unreachable(retryDue: true)
        }
        return .none
    }

    /// The token refused the PIN while a session was being logged in (report that session's
    /// `sessionOpenFailed` as well). Stop asking it: every waiter fails with `.loginRefused`,
    /// idle sessions close, leased ones close as they come back, and until `loginResumed()` every
    /// request fails at once and nothing is opened, so no further `C_Login` is tried.
    mutating func loginRefused() -> Action {
        switch mode {
        case .serving, .resetting: break
        case .loginRefused, .unreachable, .shuttingDown: return .none
        }
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

    /// The gateway seals (or starts sealed): like a refused login, from any mode but shutdown
    /// (also while the token is unreachable, so a reset that succeeds later does not serve with
    /// sessions nobody logged in). Waiters fail, idle sessions close, leased ones close as they
    /// come back; when none is left the token holds no login of this process.
    mutating func sealed() -> Action {
        switch mode {
        case .loginRefused, .shuttingDown: return .none
        case .serving, .resetting, .unreachable: break
        }
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
        openingBeforeResume = Set(sessions.filter { $0.value == .opening }.keys)
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

    /// Enters `.resetting`: closes `closing` (already marked) and the idle sessions; the attempt
    /// begins once every session is closed.
    private mutating func startReset(closing: [SessionID]) -> Action {
        mode = .resetting(attempt: nil)
        discarded += idle.count
        let closing = closing + idle
        for id in idle {
            sessions[id] = .closing
        }
        idle.removeAll()
        if !closing.isEmpty {
            return Action(session: .close(closing))
        }
        return Action(session: resetIfDrained())
    }

    /// Begins the reset attempt once no session is left (open, opening, leased or closing).
    private mutating func resetIfDrained() -> Action.SessionAction {
        guard mode == .resetting(attempt: nil), sessions.isEmpty else { return .none }
        return beginResetAttempt()
    }

    /// Starts one reset attempt; no session may exist.
    private mutating func beginResetAttempt() -> Action.SessionAction {
        precondition(sessions.isEmpty, "a reset attempt begins with every session closed")
        let session = nextSessionID
        nextSessionID += 1
        sessions[session] = .opening
        epoch += 1
        mode = .resetting(attempt: session)
        return .reset(session)
    }

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
