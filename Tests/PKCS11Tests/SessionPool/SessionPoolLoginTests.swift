import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

// PIN refusals are final: the pool runs through the fault-injecting module so the tests count
// every real C_Login call in its trace. SoftHSM2 2.6.1 keeps no failed-login counter and never
// locks a PIN (it only sets CKF_USER_PIN_COUNT_LOW after a failure), so its token flags cannot
// count attempts.
extension FaultInjectionTests {
    @Suite("Session pool: a refused PIN stops every login until an operator acts")
    struct LoginRefusal {
        let setup: Setup
        init() throws { setup = try Setup("fault-login") }

        var fault: FaultInjectingModule { setup.fault }
        var token: TestToken { setup.token }

        /// `count` leases at once; the errors they fail with (every one must fail).
        func failingLeases(_ pool: SessionPool, count: Int) async -> [any Error] {
            await withTaskGroup(of: (any Error)?.self) { group in
                for _ in 0..<count {
                    group.addTask {
                        do {
                            try await pool.withSession { session in _ = try session.state() }
                            return nil
                        } catch {
                            return error
                        }
                    }
                }
                var errors: [any Error] = []
                for await error in group {
                    if let error { errors.append(error) }
                }
                return errors
            }
        }

        /// Warms `pool` up to `sessions` open sessions.
        func warm(_ pool: SessionPool, sessions: Int) async throws {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<sessions {
                    group.addTask { try await pool.withSession { (_: borrowing Session) -> Void in usleep(20_000) } }
                }
                try await group.waitForAll()
            }
        }

        @Test("a wrong PIN at creation: exactly one C_Login, loginRefused, no PIN in the message")
        func wrongPINAtCreation() async throws {
            let wrong = "wrong-pin-\(UInt32.random(in: 0...UInt32.max))"
            let mark = fault.traceMark()
            let error = await #expect(throws: PKCS11Error.self) {
                _ = try await setup.pool(sessions: 4, pin: SecretBytes(utf8: wrong))
            }
            #expect(error?.code == .loginRefused)
            #expect(error?.function == .login)
            #expect(error?.returnValue == .pinIncorrect)
            #expect(error?.description.contains(wrong) == false)
            #expect(error?.description.contains(token.userPIN) == false)
            let logins = fault.calls(of: "C_Login", since: mark)
            #expect(logins == [.init(returnValue: .pinIncorrect, injected: false)])
            // SoftHSM2's only record of the failure: the "count low" flag (it never locks).
            #expect(try setup.fixture.module.tokenInfo(token.slot).userPINCountLow)
        }

        @Test("a refused pool: one failed C_Login, then 500 leases fail at once with loginRefused and no C call")
        func refusedPoolFailsFast() async throws {
            let pool = try await setup.pool(sessions: 4, timeout: .seconds(30))
            try await warm(pool, sessions: 4)
            // The wrong PIN replaces the right one; the token still holds the login, so nothing fails yet.
            try await pool.resumeLogin(pin: SecretBytes(utf8: "not-the-pin"))
            #expect(!pool.statistics.loginRefused)
            // The login is lost (every session of the process on the token closes).
            try setup.fixture.module.closeAllSessions(slot: token.slot)
            let mark = fault.traceMark()
            let first = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.state() }
            }
            #expect(first?.code == .loginRefused)
            #expect(first?.returnValue == .pinIncorrect)
            #expect(fault.calls(of: "C_Login", since: mark) == [.init(returnValue: .pinIncorrect, injected: false)])
            #expect(pool.statistics.loginRefused)
            #expect(pool.loginRefusal?.returnValue == .pinIncorrect)

            // The sessions purged with the first failure close on the pool's threads: let them finish.
            for _ in 0..<200 where pool.statistics.closing + pool.statistics.opening > 0 {
                try await Task.sleep(for: .milliseconds(10))
            }
            let quiet = fault.traceMark()
            let started = ContinuousClock.now
            let errors = await failingLeases(pool, count: 500)
            let elapsed = ContinuousClock.now - started
            #expect(errors.count == 500)
            #expect(errors.allSatisfy { ($0 as? PKCS11Error)?.code == .loginRefused })
            #expect(elapsed < .seconds(5), "refused leases must not wait for the 30 s acquire timeout")
            #expect(fault.callCount(since: quiet) == 0, "a refused pool makes no PKCS#11 call at all")
            #expect(fault.calls(of: "C_Login", since: mark).count == 1)
            #expect(pool.statistics.waiting == 0)
            await pool.shutdown()
        }

        @Test("a PIN changed under a running pool: at most one failed C_Login, then refused; resumeLogin(new) recovers")
        func pinChangedUnderRunningPool() async throws {
            let pool = try await setup.pool(sessions: 4, timeout: .seconds(30))
            try await warm(pool, sessions: 4)
            // The PIN changes on the token, through a second session of this process. (Changed by
            // another process, e.g. `pkcs11-tool --change-pin`, SoftHSM2 2.6.1 would not notice: it
            // reads the PIN blob once per process and keeps accepting the old PIN. A real HSM
            // checks the PIN it holds, which is what a second session here reproduces.)
            let newPIN = "new-pin-\(UInt32.random(in: 0...UInt32.max))"
            try setup.fixture.module.withSession(slot: token.slot) { [token] session in
                try session.login(.user, pin: token.pin)  // already logged in: tolerated
                try session.setPIN(old: token.pin, new: SecretBytes(utf8: newPIN))
            }
            // This process loses its login; the pool's sessions are gone underneath it.
            try setup.fixture.module.closeAllSessions(slot: token.slot)
            let mark = fault.traceMark()
            let errors = await failingLeases(pool, count: 16)
            #expect(errors.count == 16)
            #expect(errors.allSatisfy { ($0 as? PKCS11Error)?.code == .loginRefused }, "\(errors)")
            #expect(fault.calls(of: "C_Login", since: mark) == [.init(returnValue: .pinIncorrect, injected: false)])
            #expect(pool.statistics.loginRefused)

            // Resuming with a PIN that is still wrong: one more attempt, refused again.
            let wrongAgain = fault.traceMark()
            let stillWrong = await #expect(throws: PKCS11Error.self) {
                try await pool.resumeLogin(pin: token.pin)
            }
            #expect(stillWrong?.code == .loginRefused)
            #expect(fault.calls(of: "C_Login", since: wrongAgain).count == 1)
            #expect(pool.statistics.loginRefused)

            // The operator supplies the new PIN: one login, and service resumes.
            let resumed = fault.traceMark()
            try await pool.resumeLogin(pin: SecretBytes(utf8: newPIN))
            #expect(fault.calls(of: "C_Login", since: resumed) == [.init(returnValue: .ok, injected: false)])
            #expect(!pool.statistics.loginRefused)
            #expect(pool.loginRefusal == nil)
            let box = try await setup.seal([6, 6], in: pool)
            #expect(try await setup.open(box, in: pool) == [6, 6])
            await pool.shutdown()
        }

        @Test(
            "every final C_Login answer refuses; a device error instead resets the pool, which logs in again",
            arguments: [
                ("CKR_PIN_INCORRECT", PKCS11ReturnValue.pinIncorrect, true),
                ("CKR_PIN_LOCKED", .pinLocked, true),
                ("CKR_PIN_EXPIRED", .pinExpired, true),
                ("CKR_PIN_INVALID", .pinInvalid, true),
                ("CKR_PIN_LEN_RANGE", .pinLenRange, true),
                ("CKR_DEVICE_ERROR", .deviceError, false),
            ]
        )
        func finalAnswers(name: String, returnValue: PKCS11ReturnValue, final: Bool) async throws {
            let pool = try await setup.pool(sessions: 1)
            try setup.fixture.module.closeAllSessions(slot: token.slot)
            try fault.setRules("C_Login rv=\(name) count=1")
            let mark = fault.traceMark()
            let epoch = pool.epoch
            if final {
                let error = await #expect(throws: PKCS11Error.self) {
                    try await pool.withSession { session in _ = try session.state() }
                }
                #expect(error?.returnValue == returnValue)
                #expect(error?.code == .loginRefused)
                #expect(pool.statistics.loginRefused)
                #expect(fault.calls(of: "C_Login", since: mark).map(\.returnValue) == [returnValue])
                try await pool.resumeLogin(pin: token.pin)
            } else {
                // The device failing at login is the token failing: the pool resets (one attempt,
                // a new epoch) and that attempt's login, the token being back, serves the request.
                #expect(try await pool.withSession { session in try session.state().isUserLoggedIn })
                #expect(!pool.statistics.loginRefused)
                #expect(fault.calls(of: "C_Login", since: mark).map(\.returnValue) == [returnValue, .ok])
                #expect(pool.epoch == epoch + 1)
            }
            // The injected answer is spent: the next request logs in with the right PIN.
            #expect(try await pool.withSession { session in try session.state().isUserLoggedIn })
            await pool.shutdown()
        }
    }
}
