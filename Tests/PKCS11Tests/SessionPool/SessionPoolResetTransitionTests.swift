import Testing

@testable import PKCS11

/// The pool's logic when the token cannot be reached, as transcripts: the drain, the reset
/// attempt, failing fast between attempts, retrying on demand, and shutdown or a refused PIN in
/// the middle of it.
extension SessionPoolStateMachineTests {
    @Suite("Session pool state machine: an unreachable token")
    struct Reset {
        /// Two sessions open, 0 leased to waiter 1 and 1 idle.
        func servingMachine(maximumSessions: Int = 3) -> Machine {
            var machine = Machine(maximumSessions: maximumSessions, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            _ = machine.sessionOpened(0)
            _ = machine.sessionOpened(1)
            _ = machine.sessionReleased(1, reusable: true)
            return machine
        }

        @Test("a leased session that finds the token unreachable: idle closed, waiters wait, reset once drained")
        func leasedSessionStartsReset() {
            var machine = servingMachine()
            #expect(machine.statistics.idle == 1)
            #expect(machine.epoch == 0)
            #expect(machine.tokenUnreachable(releasing: 0) == Machine.Action(session: .close([0, 1])))
            #expect(machine.mode == .resetting(attempt: nil))
            #expect(machine.statistics.tokenUnreachable)
            #expect(machine.statistics.discarded == 2)
            // Requests wait for the reset's outcome; nothing is leased or opened meanwhile.
            #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3)))
            #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4)))
            #expect(machine.sessionClosed(1) == .none)
            // The last close begins the attempt, alone, in a new epoch.
            #expect(machine.sessionClosed(0) == Machine.Action(session: .reset(2)))
            #expect(machine.mode == .resetting(attempt: 2))
            #expect(machine.epoch == 1)
            #expect(machine.statistics.epoch == 1)
            #expect(machine.leaseRequested(5) == Machine.Action(waiter: .enqueued(5)))
            // The token answers: the first waiter gets the session, and another opens for the rest.
            #expect(machine.sessionOpened(2) == Machine.Action(waiter: .lease(2, to: 3), session: .open(3)))
            #expect(machine.mode == .serving)
            #expect(!machine.statistics.tokenUnreachable)
            #expect(machine.sessionOpened(3) == Machine.Action(waiter: .lease(3, to: 4), session: .open(4)))
            #expect(machine.sessionOpened(4) == Machine.Action(waiter: .lease(4, to: 5)))
            #expect(machine.epoch == 1)
        }

        @Test("leased sessions of a lost token close as they come back; the attempt waits for the last one")
        func drainWaitsForLeasedSessions() {
            var machine = Machine(maximumSessions: 3, maximumWaiters: 10)
            for waiter in 1...3 { _ = machine.leaseRequested(waiter) }
            for session in 0..<3 { _ = machine.sessionOpened(session) }
            #expect(machine.tokenUnreachable(releasing: 1) == Machine.Action(session: .close([1])))
            // Another lease fails the same way, one comes back as if nothing happened.
            #expect(machine.tokenUnreachable(releasing: 0) == Machine.Action(session: .close([0])))
            #expect(machine.sessionClosed(1) == .none)
            #expect(machine.sessionClosed(0) == .none)
            #expect(machine.sessionReleased(2, reusable: true) == Machine.Action(session: .close([2])))
            #expect(machine.statistics.discarded == 2)
            #expect(machine.sessionClosed(2) == Machine.Action(session: .reset(3)))
        }

        @Test("an open that finds the token unreachable starts a reset; sessions opening meanwhile are closed")
        func openFailureStartsReset() {
            var machine = Machine(maximumSessions: 3, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            #expect(machine.sessionOpenFailed(0, tokenUnreachable: true) == .none)
            #expect(machine.mode == .resetting(attempt: nil))
            #expect(machine.statistics.waiting == 2, "waiters wait for the reset instead of failing on the first error")
            // Session 1 was on its way before the fault was known: it is closed, not leased.
            #expect(machine.sessionOpened(1) == Machine.Action(session: .close([1])))
            #expect(machine.sessionClosed(1) == Machine.Action(session: .reset(2)))
            #expect(machine.sessionOpened(2) == Machine.Action(waiter: .lease(2, to: 1), session: .open(3)))
        }

        @Test("an unreachable open with no other session begins the attempt at once")
        func openFailureAloneResetsAtOnce() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            #expect(machine.sessionOpenFailed(0, tokenUnreachable: true) == Machine.Action(session: .reset(1)))
            #expect(machine.statistics.openFailures == 1)
            #expect(machine.epoch == 1)
        }

        @Test("a serving-era open that fails during the drain counts toward it")
        func openFailureDuringDrain() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpened(0)
            _ = machine.leaseRequested(2)  // opens session 1
            #expect(machine.tokenUnreachable(releasing: 0) == Machine.Action(session: .close([0])))
            #expect(machine.sessionClosed(0) == .none)
            #expect(machine.sessionOpenFailed(1) == Machine.Action(session: .reset(2)))
        }

        @Test("a failed attempt fails every waiter, starts the retry timer, and later requests fail at once")
        func failedAttemptFailsFast() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)
            #expect(machine.sessionOpenFailed(1, tokenUnreachable: true) == Machine.Action(session: .reset(2)))
            #expect(
                machine.sessionOpenFailed(2)
                    == Machine.Action(waiter: .fail([1, 2], .tokenUnreachable), startRetryTimer: true))
            #expect(machine.mode == .unreachable(retryDue: false))
            #expect(machine.statistics.tokenUnreachable)
            #expect(machine.sessions.isEmpty)
            for waiter in 3..<103 {
                #expect(machine.leaseRequested(waiter) == Machine.Action(waiter: .fail([waiter], .tokenUnreachable)))
            }
            #expect(machine.epoch == 1, "no attempt without the retry timer")
        }

        @Test("after the retry timer the next request starts one attempt and waits for it; a retry can fail again")
        func retryOnDemand() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)
            _ = machine.sessionOpenFailed(1)  // the first attempt fails
            #expect(machine.retryTimerFired() == .none)
            #expect(machine.mode == .unreachable(retryDue: true))
            // The timer alone starts nothing: only a request does.
            #expect(machine.sessions.isEmpty)
            #expect(machine.leaseRequested(2) == Machine.Action(waiter: .enqueued(2), session: .reset(2)))
            #expect(machine.epoch == 2)
            #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3)))
            // It fails again: both fail, the timer starts again.
            #expect(
                machine.sessionOpenFailed(2)
                    == Machine.Action(waiter: .fail([2, 3], .tokenUnreachable), startRetryTimer: true))
            #expect(machine.leaseRequested(4) == Machine.Action(waiter: .fail([4], .tokenUnreachable)))
            // A late or second timer event is harmless.
            _ = machine.retryTimerFired()
            #expect(machine.retryTimerFired() == .none)
            #expect(machine.leaseRequested(5) == Machine.Action(waiter: .enqueued(5), session: .reset(3)))
            #expect(machine.sessionOpened(3) == Machine.Action(waiter: .lease(3, to: 5)))
            #expect(machine.mode == .serving)
            #expect(machine.epoch == 3)
            #expect(machine.statistics.openFailures == 3)
        }

        @Test("a retry timer that fires while serving, refusing or shutting down changes nothing")
        func retryTimerOutOfPlace() {
            var machine = servingMachine()
            #expect(machine.retryTimerFired() == .none)
            #expect(machine.mode == .serving)
            _ = machine.loginRefused()
            #expect(machine.retryTimerFired() == .none)
            #expect(machine.mode == .loginRefused)
        }

        @Test("waiters of a reset still time out and can be cancelled")
        func waitersTimeOutDuringReset() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)  // attempt 1 starts
            #expect(machine.waiterTimedOut(1) == Machine.Action(waiter: .fail([1], .timeout)))
            #expect(machine.waiterCancelled(2) == Machine.Action(waiter: .fail([2], .cancelled)))
            // The attempt succeeds for nobody: the session parks as idle.
            #expect(machine.sessionOpened(1) == .none)
            #expect(machine.statistics.idle == 1)
            #expect(machine.leaseRequested(3) == Machine.Action(waiter: .lease(1, to: 3)))
        }

        @Test("the queue limit holds while resetting")
        func queueLimitDuringReset() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 1)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)
            #expect(machine.leaseRequested(2) == Machine.Action(waiter: .fail([2], .queueFull)))
            _ = machine.sessionOpenFailed(1)
            _ = machine.retryTimerFired()
            #expect(machine.leaseRequested(3) == Machine.Action(waiter: .enqueued(3), session: .reset(2)))
        }

        @Test("a session that finds the token unreachable while the pool resets or is unreachable is only closed")
        func lateUnreachableReports() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            _ = machine.sessionOpened(0)
            _ = machine.sessionOpened(1)
            _ = machine.tokenUnreachable(releasing: 0)
            #expect(machine.tokenUnreachable(releasing: 1) == Machine.Action(session: .close([1])))
            #expect(machine.epoch == 0)
            _ = machine.sessionClosed(0)
            #expect(machine.sessionClosed(1) == Machine.Action(session: .reset(2)))
            #expect(machine.epoch == 1)
        }

        @Test("a refused PIN during the attempt is final: waiters fail with loginRefused, no retry timer")
        func loginRefusedDuringReset() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)  // attempt 1 starts
            _ = machine.leaseRequested(2)
            #expect(machine.loginRefused() == Machine.Action(waiter: .fail([1, 2], .loginRefused)))
            #expect(machine.mode == .loginRefused)
            #expect(!machine.statistics.tokenUnreachable)
            #expect(machine.sessionOpenFailed(1) == .none)
            #expect(machine.leaseRequested(3) == Machine.Action(waiter: .fail([3], .loginRefused)))
            #expect(machine.loginResumed() == .none)
            #expect(machine.leaseRequested(4) == Machine.Action(waiter: .enqueued(4), session: .open(2)))
        }

        @Test("an open refused before the operator resumed fails nobody who came after: another session is opened")
        func refusedOpenCompletingAfterResume() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)  // opens session 0
            #expect(machine.loginRefused() == Machine.Action(waiter: .fail([1], .loginRefused)))
            #expect(machine.loginResumed() == .none)
            // The operator's request comes before session 0 reports its (refused) login.
            #expect(machine.leaseRequested(2) == Machine.Action(waiter: .enqueued(2)))
            #expect(machine.sessionOpenFailed(0) == Machine.Action(session: .open(1)))
            #expect(machine.statistics.waiting == 1)
            #expect(machine.sessionOpened(1) == Machine.Action(waiter: .lease(1, to: 2)))
            // Later failures are ordinary again.
            _ = machine.leaseRequested(3)
            #expect(machine.sessionOpenFailed(2) == .none, "session 1 exists and can serve waiter 3")
        }

        @Test("loginRefused reported while unreachable changes nothing")
        func loginRefusedWhileUnreachable() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)
            _ = machine.sessionOpenFailed(1)
            #expect(machine.loginRefused() == .none)
            #expect(machine.mode == .unreachable(retryDue: false))
        }

        @Test("shutdown during the drain: waiters fail, leased sessions close, shutdown completes with the last")
        func shutdownDuringDrain() {
            var machine = Machine(maximumSessions: 2, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.leaseRequested(2)
            _ = machine.sessionOpened(0)
            _ = machine.sessionOpened(1)
            _ = machine.tokenUnreachable(releasing: 0)
            _ = machine.leaseRequested(3)
            #expect(machine.shutdown() == Machine.Action(waiter: .fail([3], .shutDown)))
            #expect(!machine.statistics.tokenUnreachable)
            #expect(machine.sessionClosed(0) == Machine.Action(shutdownCompleted: false))
            #expect(machine.tokenUnreachable(releasing: 1) == Machine.Action(session: .close([1])))
            // No reset attempt after shutdown: the last close completes it.
            #expect(machine.sessionClosed(1) == Machine.Action(shutdownCompleted: true))
            #expect(machine.epoch == 0)
        }

        @Test("shutdown during an attempt: the session it opens is closed; a failed attempt completes shutdown")
        func shutdownDuringAttempt() {
            var opened = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = opened.leaseRequested(1)
            _ = opened.sessionOpenFailed(0, tokenUnreachable: true)
            #expect(opened.shutdown() == Machine.Action(waiter: .fail([1], .shutDown)))
            #expect(opened.sessionOpened(1) == Machine.Action(session: .close([1])))
            #expect(opened.sessionClosed(1) == Machine.Action(shutdownCompleted: true))

            var failed = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = failed.leaseRequested(1)
            _ = failed.sessionOpenFailed(0, tokenUnreachable: true)
            _ = failed.shutdown()
            #expect(failed.sessionOpenFailed(1) == Machine.Action(shutdownCompleted: true))
            #expect(failed.retryTimerFired() == .none)
            #expect(failed.leaseRequested(2) == Machine.Action(waiter: .fail([2], .shutDown)))
        }

        @Test("shutdown while unreachable completes at once: no session exists")
        func shutdownWhileUnreachable() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            _ = machine.sessionOpenFailed(0, tokenUnreachable: true)
            _ = machine.sessionOpenFailed(1)
            #expect(machine.shutdown() == Machine.Action(shutdownCompleted: true))
            #expect(machine.retryTimerFired() == .none)
        }

        @Test("an ordinary open failure while serving still fails the waiters it cannot serve, without a reset")
        func ordinaryOpenFailureNoReset() {
            var machine = Machine(maximumSessions: 1, maximumWaiters: 10)
            _ = machine.leaseRequested(1)
            #expect(machine.sessionOpenFailed(0) == Machine.Action(waiter: .fail([1], .openFailed)))
            #expect(machine.mode == .serving)
            #expect(machine.epoch == 0)
        }
    }
}
