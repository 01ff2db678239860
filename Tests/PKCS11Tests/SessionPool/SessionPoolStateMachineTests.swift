import Testing

@testable import PKCS11

/// The pool's logic without a token: each test is a transcript of events and the actions they
/// must produce. Every event and every branch of the state machine appears at least once.
@Suite("Session pool state machine")
struct SessionPoolStateMachineTests {
    typealias Machine = SessionPoolStateMachine

    @Test("a first lease request waits and opens a session; the opened session goes to it")
    func firstLeaseOpensSession() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        #expect(machine.leaseRequested(1) == Machine.Action(waiter: .enqueued(1), session: .open(0)))
        #expect(machine.statistics.opening == 1)
        #expect(machine.statistics.waiting == 1)
        #expect(machine.sessionOpened(0) == Machine.Action(waiter: .lease(0, to: 1)))
        #expect(machine.statistics.leased == 1)
        #expect(machine.statistics.waiting == 0)
    }

    @Test("a released session with nobody waiting becomes idle and is leased again without opening")
    func idleSessionIsReused() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        #expect(machine.sessionReleased(0, reusable: true) == .none)
        #expect(machine.statistics.idle == 1)
        #expect(machine.leaseRequested(2) == Machine.Action(waiter: .lease(0, to: 2)))
        #expect(machine.statistics.idle == 0)
        #expect(machine.statistics.leased == 1)
    }

    @Test("the most recently returned idle session is leased first")
    func warmestIdleSessionFirst() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.sessionOpened(0)
        _ = machine.sessionOpened(1)
        _ = machine.sessionReleased(1, reusable: true)
        _ = machine.sessionReleased(0, reusable: true)
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .lease(0, to: 3)))
    }

    @Test("never more sessions than the maximum; extra waiters queue and are served in order")
    func capacityAndFIFO() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        #expect(machine.leaseRequested(1).session == .open(0))
        #expect(machine.leaseRequested(2).session == .open(1))
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3), session: .none))
        #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4), session: .none))
        #expect(machine.sessions.count == 2)
        #expect(machine.sessionOpened(1) == Machine.Action(waiter: .lease(1, to: 1)))
        #expect(machine.sessionOpened(0) == Machine.Action(waiter: .lease(0, to: 2)))
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(waiter: .lease(0, to: 3)))
        #expect(machine.sessionReleased(1, reusable: true) == Machine.Action(waiter: .lease(1, to: 4)))
        #expect(machine.statistics.waiting == 0)
    }

    @Test("a waiter already covered by a session being opened does not open another")
    func noOpenWhenCovered() {
        var machine = Machine(maximumSessions: 4, maximumWaiters: 10)
        #expect(machine.leaseRequested(1).session == .open(0))
        _ = machine.sessionOpened(0)
        // Session 0 is leased to waiter 1; waiter 2 needs a session of its own.
        #expect(machine.leaseRequested(2).session == .open(1))
        // The pool is not over-eager: one waiter, one opening session.
        #expect(machine.statistics.opening == 1)
    }

    @Test("over the queue limit a request fails at once with queueFull")
    func queueFull() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 2)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .fail([3], .queueFull)))
        #expect(machine.statistics.waiting == 2)
    }

    @Test("a queue limit of zero: requests succeed only when a session is idle")
    func zeroQueue() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 0)
        #expect(machine.leaseRequested(1) == Machine.Action(waiter: .fail([1], .queueFull)))
    }

    @Test("a waiter that times out leaves the queue; a second timeout or a late one is ignored")
    func waiterTimeout() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        _ = machine.leaseRequested(2)
        _ = machine.leaseRequested(3)
        #expect(machine.waiterTimedOut(2) == Machine.Action(waiter: .fail([2], .timeout)))
        #expect(machine.waiterTimedOut(2) == .none)
        // Waiter 1 holds a lease, it is not waiting: its timer firing late changes nothing.
        #expect(machine.waiterTimedOut(1) == .none)
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(waiter: .lease(0, to: 3)))
    }

    @Test("a cancelled waiter leaves the queue with .cancelled")
    func waiterCancelled() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        #expect(machine.waiterCancelled(1) == Machine.Action(waiter: .fail([1], .cancelled)))
        #expect(machine.waiterCancelled(1) == .none)
        // The session opened for it parks as idle.
        #expect(machine.sessionOpened(0) == .none)
        #expect(machine.statistics.idle == 1)
    }

    @Test("a session that failed is closed, counted as discarded, and replaced once closed")
    func brokenSessionIsReplaced() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        _ = machine.leaseRequested(2)
        #expect(machine.sessionReleased(0, reusable: false) == Machine.Action(session: .close([0])))
        #expect(machine.statistics.discarded == 1)
        #expect(machine.statistics.closing == 1)
        // Capacity counts the closing session: nothing opens before it is gone.
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3), session: .none))
        #expect(machine.sessionClosed(0) == Machine.Action(session: .open(1)))
        #expect(machine.sessionOpened(1) == Machine.Action(waiter: .lease(1, to: 2)))
    }

    @Test("a failed session takes the idle sessions with it: they share its token and login state")
    func brokenSessionPurgesIdle() {
        var machine = Machine(maximumSessions: 3, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.leaseRequested(3)
        _ = machine.sessionOpened(0)
        _ = machine.sessionOpened(1)
        _ = machine.sessionOpened(2)
        _ = machine.sessionReleased(1, reusable: true)
        _ = machine.sessionReleased(2, reusable: true)
        #expect(machine.statistics.idle == 2)
        #expect(machine.sessionReleased(0, reusable: false) == Machine.Action(session: .close([0, 1, 2])))
        #expect(machine.statistics.discarded == 3)
        // The next request does not get a stale session: it waits for a new one.
        #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4)))
        #expect(machine.sessionClosed(1) == Machine.Action(session: .open(3)))
        #expect(machine.sessionClosed(0) == .none)
        #expect(machine.sessionOpened(3) == Machine.Action(waiter: .lease(3, to: 4)))
    }

    @Test("a failed session with nobody waiting is closed and not replaced")
    func brokenSessionNoWaiters() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        #expect(machine.sessionReleased(0, reusable: false) == Machine.Action(session: .close([0])))
        #expect(machine.sessionClosed(0) == .none)
        #expect(machine.sessions.isEmpty)
    }

    @Test("when the only session fails to open, every waiter fails with openFailed")
    func openFailureFailsWaiters() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        #expect(machine.sessionOpenFailed(0) == Machine.Action(waiter: .fail([1, 2], .openFailed)))
        #expect(machine.statistics.openFailures == 1)
        #expect(machine.sessions.isEmpty)
        // The next request tries again.
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3), session: .open(1)))
    }

    @Test("an open failure leaves waiters queued while another session can still serve them")
    func openFailureWithOtherSessions() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        _ = machine.leaseRequested(2)
        #expect(machine.sessionOpenFailed(1) == .none)
        #expect(machine.statistics.waiting == 1)
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(waiter: .lease(0, to: 2)))
    }

    @Test("an open failure with no waiter left changes nothing else")
    func openFailureNoWaiters() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.waiterTimedOut(1)
        #expect(machine.sessionOpenFailed(0) == .none)
    }

    @Test("shutdown fails waiters, closes idle sessions, and completes when the last one closes")
    func shutdownWithLeasesAndWaiters() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.sessionOpened(0)
        _ = machine.sessionOpened(1)
        _ = machine.sessionReleased(1, reusable: true)  // 1 idle, 0 leased to waiter 1
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .lease(1, to: 3)))
        #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4)))  // the pool is full
        #expect(
            machine.shutdown()
                == Machine.Action(waiter: .fail([4], .shutDown), session: .none, shutdownCompleted: false)
        )
        #expect(machine.shutdown() == .none)
        #expect(machine.leaseRequested(5) == Machine.Action(waiter: .fail([5], .shutDown)))
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(session: .close([0])))
        #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: false))
        #expect(machine.sessionReleased(1, reusable: false) == Machine.Action(session: .close([1])))
        #expect(machine.sessionClosed(1) == Machine.Action(shutdownCompleted: true))
    }

    @Test("shutdown of an idle pool closes everything at once")
    func shutdownIdle() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        _ = machine.sessionReleased(0, reusable: true)
        #expect(machine.shutdown() == Machine.Action(session: .close([0])))
        #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: true))
    }

    @Test("shutdown of an empty pool completes at once")
    func shutdownEmpty() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        #expect(machine.shutdown() == Machine.Action(shutdownCompleted: true))
    }

    @Test("a session that finishes opening during shutdown is closed; a failed open completes shutdown")
    func shutdownWhileOpening() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        #expect(machine.shutdown() == Machine.Action(waiter: .fail([1, 2], .shutDown)))
        #expect(machine.sessionOpened(0) == Machine.Action(session: .close([0])))
        #expect(machine.sessionOpenFailed(1) == Machine.Action(shutdownCompleted: false))
        #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: true))
    }

    @Test("a session discarded on its own account is closed alone; idle sessions stay and are reused")
    func discardOneSession() {
        var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.sessionOpened(0)
        _ = machine.sessionOpened(1)
        _ = machine.sessionReleased(1, reusable: true)
        #expect(machine.sessionDiscarded(0) == Machine.Action(session: .close([0])))
        #expect(machine.statistics.discarded == 1)
        #expect(machine.statistics.idle == 1)
        // The idle session serves the next request at once; no purge, no open.
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .lease(1, to: 3)))
        // A waiter beyond it gets a replacement once the discarded session is closed.
        #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4)))
        #expect(machine.sessionClosed(0) == Machine.Action(session: .open(2)))
        #expect(machine.sessionOpened(2) == Machine.Action(waiter: .lease(2, to: 4)))
    }

    @Test("a session discarded during shutdown is closed and completes the shutdown")
    func discardDuringShutdown() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        #expect(machine.shutdown() == Machine.Action(shutdownCompleted: false))
        #expect(machine.sessionDiscarded(0) == Machine.Action(session: .close([0])))
        #expect(machine.statistics.discarded == 1)
        #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: true))
    }

    @Test("a refused login fails every waiter, closes idle sessions, and refuses later requests at once")
    func loginRefusedStopsEverything() {
        var machine = Machine(maximumSessions: 3, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.sessionOpened(0)  // leased to 1
        _ = machine.sessionOpened(1)  // leased to 2
        _ = machine.sessionReleased(1, reusable: true)  // idle
        _ = machine.leaseRequested(3)  // takes idle session 1
        _ = machine.leaseRequested(4)  // waits, opens session 2
        _ = machine.leaseRequested(5)  // waits, nothing more to open
        // Session 2's login is refused.
        #expect(
            machine.loginRefused()
                == Machine.Action(waiter: .fail([4, 5], .loginRefused))
        )
        #expect(machine.statistics.loginRefused)
        #expect(machine.loginRefused() == .none)
        #expect(machine.sessionOpenFailed(2) == .none)
        // Every later request fails at once, with no session opened (so no login tried).
        for waiter in 6..<106 {
            #expect(machine.leaseRequested(waiter) == Machine.Action(waiter: .fail([waiter], .loginRefused)))
        }
        // Leased sessions close as they come back, whatever their state, and nothing reopens.
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(session: .close([0])))
        #expect(machine.sessionDiscarded(1) == Machine.Action(session: .close([1])))
        #expect(machine.sessionClosed(0) == .none)
        #expect(machine.sessionClosed(1) == .none)
        #expect(machine.sessions.isEmpty)
        // The operator supplies a PIN: the next request opens a session (and logs in) again.
        #expect(machine.loginResumed() == .none)
        #expect(!machine.statistics.loginRefused)
        #expect(machine.loginResumed() == .none)
        #expect(machine.leaseRequested(200) == Machine.Action(waiter: .enqueued(200), session: .open(3)))
        #expect(machine.sessionOpened(3) == Machine.Action(waiter: .lease(3, to: 200)))
    }

    @Test("a refused login closes idle sessions; a session that opens meanwhile is closed too")
    func loginRefusedClosesIdleAndLateOpens() {
        var machine = Machine(maximumSessions: 3, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.leaseRequested(2)
        _ = machine.sessionOpened(0)  // leased to 1
        _ = machine.waiterCancelled(2)  // session 1 goes on opening for nobody
        _ = machine.sessionReleased(0, reusable: true)  // idle
        #expect(machine.statistics.opening == 1)
        #expect(machine.statistics.idle == 1)
        #expect(machine.loginRefused() == Machine.Action(session: .close([0])))
        // Session 1 had logged in before the refusal was known: it is closed, not leased.
        #expect(machine.sessionOpened(1) == Machine.Action(session: .close([1])))
    }

    @Test("shutdown while refusing completes once the last session closes; resuming after it does nothing")
    func shutdownWhileRefused() {
        var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
        _ = machine.leaseRequested(1)
        _ = machine.sessionOpened(0)
        _ = machine.loginRefused()
        #expect(machine.shutdown() == Machine.Action(shutdownCompleted: false))
        #expect(machine.leaseRequested(2) == Machine.Action(waiter: .fail([2], .shutDown)))
        #expect(machine.sessionReleased(0, reusable: true) == Machine.Action(session: .close([0])))
        #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: true))
        #expect(machine.loginResumed() == .none)
        #expect(machine.leaseRequested(3) == Machine.Action(waiter: .fail([3], .shutDown)))
    }

    @Test("a long random schedule never exceeds capacity nor leases one session twice")
    func randomScheduleKeepsInvariants() {
        var generator = SplitMix64(seed: 0x5eed)
        var machine = Machine(maximumSessions: 3, maximumWaiters: 5)
        var opening: Set<Int> = []
        var leased: [Int: Int] = [:]  // session → waiter
        var closing: Set<Int> = []
        var waiting: Set<Int> = []
        var nextWaiter = 0
        var retryTimerRunning = false
        var epoch = 0

        func apply(_ action: Machine.Action) {
            switch action.waiter {
            case .none: break
            case .lease(let session, let waiter):
                #expect(leased[session] == nil, "session \(session) leased twice")
                #expect(waiting.remove(waiter) != nil || waiter == nextWaiter - 1)
                leased[session] = waiter
            case .enqueued(let waiter): waiting.insert(waiter)
            case .fail(let failed, _):
                for waiter in failed { waiting.remove(waiter) }
            }
            switch action.session {
            case .none: break
            case .open(let session): opening.insert(session)
            case .reset(let session):
                #expect(opening.isEmpty && leased.isEmpty && closing.isEmpty, "a reset begins with no session")
                opening.insert(session)
            case .close(let sessions): closing.formUnion(sessions)
            }
            if action.startRetryTimer {
                #expect(!retryTimerRunning, "one retry timer at a time")
                retryTimerRunning = true
            }
        }

        for _ in 0..<20_000 {
            switch generator.next() % 12 {
            case 0:
                nextWaiter += 1
                apply(machine.leaseRequested(nextWaiter - 1))
            case 1:
                if let session = opening.randomElement(using: &generator) {
                    opening.remove(session)
                    switch generator.next() % 10 {
                    case 0, 1: apply(machine.sessionOpenFailed(session))
                    case 2: apply(machine.sessionOpenFailed(session, tokenUnreachable: true))
                    default: apply(machine.sessionOpened(session))
                    }
                }
            case 2:
                if let session = leased.keys.randomElement(using: &generator) {
                    leased[session] = nil
                    apply(machine.sessionReleased(session, reusable: generator.next() % 4 != 0))
                }
            case 3:
                if let session = closing.randomElement(using: &generator) {
                    closing.remove(session)
                    apply(machine.sessionClosed(session))
                }
            case 4:
                if let waiter = waiting.randomElement(using: &generator) {
                    apply(machine.waiterTimedOut(waiter))
                }
            case 5:
                if let session = leased.keys.randomElement(using: &generator) {
                    leased[session] = nil
                    apply(machine.sessionDiscarded(session))
                }
            case 6:
                // Refusals are rare and an operator resumes soon after.
                if generator.next() % 50 == 0 {
                    apply(machine.loginRefused())
                    #expect(waiting.isEmpty, "a refused login leaves nobody waiting")
                }
            case 7:
                if generator.next() % 5 == 0 {
                    apply(machine.loginResumed())
                }
            case 8:
                // The token is lost now and then; the sessions of a lost token come back failing.
                if generator.next() % 10 == 0, let session = leased.keys.randomElement(using: &generator) {
                    leased[session] = nil
                    apply(machine.tokenUnreachable(releasing: session))
                }
            case 9:
                if retryTimerRunning, generator.next() % 3 == 0 {
                    retryTimerRunning = false
                    apply(machine.retryTimerFired())
                }
            default:
                if let waiter = waiting.randomElement(using: &generator) {
                    apply(machine.waiterCancelled(waiter))
                }
            }
            #expect(machine.sessions.count <= 3)
            if machine.statistics.loginRefused {
                #expect(machine.statistics.idle == 0 && machine.statistics.waiting == 0)
            }
            switch machine.mode {
            case .resetting(let attempt?):
                #expect(Set(machine.sessions.keys) == [attempt], "a reset attempt runs alone")
            case .resetting(nil):
                #expect(
                    machine.statistics.idle == 0
                        && machine.statistics.opening + machine.statistics.leased
                            + machine.statistics.closing == machine.sessions.count
                )
            case .unreachable:
                #expect(machine.sessions.isEmpty && machine.statistics.waiting == 0)
            default:
                break
            }
            // Nobody waits for nothing: a waiter is resolved by an event still to come (a session
            // coming back, opening or closing), not only by its timeout.
            let statistics = machine.statistics
            if statistics.waiting > 0 {
                #expect(statistics.idle == 0, "a waiter next to an idle session")
                #expect(
                    statistics.opening + statistics.leased + statistics.closing > 0, "waiters stranded: \(statistics)")
            }
            if case .resetting(nil) = machine.mode {
                #expect(!machine.sessions.isEmpty, "a drained reset that did not begin its attempt")
            }
            #expect(machine.epoch >= epoch)
            epoch = machine.epoch
            #expect(machine.statistics.leased == leased.count)
            #expect(machine.statistics.waiting == waiting.count)
            #expect(waiting.count <= 5)
        }

        // Shutdown from wherever the schedule ended: every waiter fails, every session closes
        // once it comes back, and shutdown completes exactly once, with the last one.
        var completions = 0
        func applyShutdownAction(_ action: Machine.Action) {
            apply(action)
            if action.shutdownCompleted { completions += 1 }
            #expect(!action.startRetryTimer && action.session.isOpenOrReset == false, "nothing starts after shutdown")
        }
        applyShutdownAction(machine.shutdown())
        #expect(waiting.isEmpty)
        while !(opening.isEmpty && leased.isEmpty && closing.isEmpty) {
            if let session = opening.popFirst() {
                applyShutdownAction(
                    generator.next() % 2 == 0 ? machine.sessionOpened(session) : machine.sessionOpenFailed(session))
            } else if let session = leased.keys.first {
                leased[session] = nil
                applyShutdownAction(
                    generator.next() % 2 == 0
                        ? machine.sessionReleased(session, reusable: true)
                        : machine.tokenUnreachable(releasing: session))
            } else if let session = closing.popFirst() {
                applyShutdownAction(machine.sessionClosed(session))
            }
        }
        applyShutdownAction(machine.retryTimerFired())
        #expect(completions == 1)
        #expect(machine.sessions.isEmpty)
    }
}

extension SessionPoolStateMachine.Action.SessionAction {
    /// True for an action that opens a session (`.open` or `.reset`).
    var isOpenOrReset: Bool {
        switch self {
        case .open, .reset: true
        case .none, .close: false
        }
    }
}

/// A small seeded generator so the random schedule is the same on every run.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
