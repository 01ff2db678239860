import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

// A token that stops answering, through the fault-injecting module: every call answers a device
// error for a while, then the rules are cleared. SoftHSM2 underneath was initialised by the
// in-process fixture, so the pool does everything but re-initialise the module (the p11-kit
// tests cover that).
extension FaultInjectionTests {
    @Suite("Session pool: a token that stops answering, and comes back")
    struct TokenUnreachable {
        let setup: Setup
        init() throws { setup = try Setup("fault-reset") }

        var fault: FaultInjectingModule { setup.fault }

        /// A pool of `sessions` with `timeout`; `retry` between reset attempts.
        func pool(sessions: Int, timeout: Duration = .seconds(5), retry: Duration = .milliseconds(500)) async throws
            -> SessionPool
        {
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = sessions
            configuration.acquireTimeout = timeout
            configuration.retryInterval = retry
            return try await SessionPool(
                module: fault.module, tokenLabel: setup.token.label, pin: setup.token.pin,
                configuration: configuration)
        }

        /// What the recorded load does: a random draw and a search for the master key.
        static func work(keyID: [UInt8]) -> @Sendable (borrowing Session) throws -> Void {
            { session in
                _ = try session.generateRandom(count: 16)
                guard try session.findMasterKey(id: keyID) != nil else { throw KeyMissing() }
            }
        }

        struct KeyMissing: Error {}

        @Test(
            "every call failing with a device-class error for 1.5 s: fast tokenUnreachable, then recovery on its own",
            arguments: ["CKR_DEVICE_ERROR", "CKR_TOKEN_NOT_PRESENT", "CKR_DEVICE_REMOVED"])
        func outageAndRecovery(code: String) async throws {
            let created = fault.traceMark()
            let pool = try await pool(sessions: 4)
            let keyID = setup.keyID
            let recorder = CallRecorder()
            // Four callers at once, so sessions are leased, idle and opening when the fault comes.
            let load = (0..<4).map { _ in recorder.start(pool, every: .milliseconds(20), Self.work(keyID: keyID)) }
            #expect(await recorder.wait(upTo: .seconds(5)) { $0.filter(\.succeeded).count >= 20 })
            let epoch = pool.epoch
            let moduleEpoch = fault.module.epoch
            let mark = fault.traceMark()

            let faultAt = ContinuousClock.now
            try fault.setRules("* rv=\(code)")
            var sawUnreachable = false
            for _ in 0..<100 where !sawUnreachable {
                sawUnreachable = pool.statistics.tokenUnreachable
                try await Task.sleep(for: .milliseconds(10))
            }
            let flaggedAfter = ContinuousClock.now - faultAt
            #expect(sawUnreachable, "the pool reports the token unreachable")
            try await Task.sleep(until: faultAt + .milliseconds(1500))
            #expect(pool.statistics.tokenUnreachable)
            let clearedAt = ContinuousClock.now
            try fault.clearRules()
            let recovered = await recorder.wait(upTo: .seconds(5)) { calls in
                calls.contains { $0.started > clearedAt && $0.succeeded }
            }
            // Some calls after recovery, then stop.
            try await Task.sleep(for: .milliseconds(200))
            recorder.stop()
            for task in load { await task.value }

            #expect(recovered, "service resumes without a restart")
            let firstError = try #require(recorder.firstFailure(after: faultAt))
            let firstSuccess = try #require(recorder.firstSuccess(startedAfter: clearedAt))
            // While the fault lasts, every call fails at once with tokenUnreachable.
            let during = recorder.calls(within: (faultAt + .milliseconds(100))..<clearedAt)
            #expect(during.count > 20)
            #expect(during.allSatisfy { $0.pkcs11Error?.code == .tokenUnreachable }, "\(during.map(\.error))")
            #expect(during.allSatisfy { $0.latency < .milliseconds(500) }, "\(during.map(\.latency).max()!)")
            #expect(firstError.pkcs11Error?.code == .tokenUnreachable)
            #expect(firstError.ended - faultAt < .milliseconds(500))
            #expect(firstSuccess.ended - clearedAt < .seconds(2))
            #expect(!pool.statistics.tokenUnreachable)
            // Everything after recovery succeeds.
            #expect(recorder.all.filter { $0.started > firstSuccess.ended }.allSatisfy { $0.succeeded })
            // Reset without re-initialisation: the module is the fixture's.
            #expect(pool.epoch > epoch)
            #expect(fault.module.epoch == moduleEpoch)
            #expect(fault.calls(of: "C_Finalize", since: mark).isEmpty)
            #expect(fault.calls(of: "C_Initialize", since: mark).isEmpty)
            // Attempts came at most every retry interval, not with every request.
            let attempts = fault.calls(of: "C_GetSlotList", since: mark).filter(\.injected).count
            #expect(attempts <= 2 * (1 + 1500 / 500) + 2, "\(attempts) slot-list calls in 1.5 s")
            // The sessions are logged in again and the key is found again.
            let loggedInAndFound = try await pool.withSession { [keyID] session in
                try session.state().isUserLoggedIn && session.findMasterKey(id: keyID) != nil
            }
            #expect(loggedInAndFound)
            // No session leaked: the pool's counts and the module's agree, and the sessions whose
            // close was answered with the fault (never forwarded, so still open in SoftHSM2) were
            // closed for real once the token answered again.
            let unconfirmedDuringOutage = fault.calls(of: "C_CloseSession", since: mark).filter(\.injected).count
            await expectNoSessionLeaked(pool, slot: setup.token.slot)
            #expect(fault.realSessionBalance(since: created) == pool.statistics.idle)
            print(
                """
                MEASURE fault-module \(code): first tokenUnreachable after \(milliseconds(firstError.ended - faultAt)) ms, \
                pool flagged unreachable within \(milliseconds(flaggedAfter)) ms, recovered \
                \(milliseconds(firstSuccess.ended - clearedAt)) ms after clearing; \(during.count) calls failed fast \
                (max \(milliseconds(during.map(\.latency).max() ?? .zero)) ms); epoch \(epoch) -> \(pool.epoch); \
                \(unconfirmedDuringOutage) closes answered with the fault, closed again after
                """)
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
            #expect(fault.realSessionBalance(since: created) == 0, "every session SoftHSM2 opened was closed")
        }

        @Test("four sessions finding the token unreachable at once: one reset, every caller told tokenUnreachable")
        func concurrentReportsResetOnce() async throws {
            let created = fault.traceMark()
            let pool = try await pool(sessions: 4)
            // Four sessions open and idle: four calls held at once make the pool open them.
            try fault.setRules("C_GenerateRandom delay_ms=150 count=4")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<4 {
                    group.addTask { try await pool.withSession { session in _ = try session.generateRandom(count: 4) } }
                }
                try await group.waitForAll()
            }
            #expect(pool.statistics.idle == 4)
            let epoch = pool.epoch
            let mark = fault.traceMark()
            // All four leased at once, and all four answered with a device error.
            try fault.setRules("C_GenerateRandom delay_ms=300 rv=CKR_DEVICE_ERROR count=4")
            let errors = await withTaskGroup(of: PKCS11Error?.self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        do {
                            try await pool.withSession { session in _ = try session.generateRandom(count: 4) }
                            return nil
                        } catch {
                            return error as? PKCS11Error
                        }
                    }
                }
                return await group.reduce(into: []) { $0.append($1) }
            }
            #expect(errors.count == 4)
            #expect(errors.allSatisfy { $0?.code == .tokenUnreachable && $0?.returnValue == .deviceError }, "\(errors)")
            #expect(fault.calls(of: "C_GenerateRandom", since: mark).filter(\.injected).count == 4)
            // The next request waits for the one reset and is served.
            #expect(try await pool.withSession { session in try session.generateRandom(count: 4).count } == 4)
            #expect(pool.epoch == epoch + 1, "four reports, one reset")
            #expect(!pool.statistics.tokenUnreachable)
            await expectNoSessionLeaked(pool, slot: setup.token.slot)
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
            #expect(fault.realSessionBalance(since: created) == 0)
        }

        @Test("a PIN refused during a reset is final: no retry timer, no further C_Login, until resumeLogin")
        func loginRefusedDuringResetIsFinal() async throws {
            let pool = try await pool(sessions: 2, retry: .milliseconds(200))
            let epoch = pool.epoch
            let mark = fault.traceMark()
            try fault.setRules(
                """
                C_GenerateRandom rv=CKR_DEVICE_ERROR count=1
                C_Login rv=CKR_PIN_INCORRECT
                """)
            let first = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.generateRandom(count: 4) }
            }
            #expect(first?.code == .tokenUnreachable)
            // The reset closed every session (SoftHSM2 forgets the login with the last one), so its
            // attempt logs in, and the token refuses the PIN.
            let second = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.state() }
            }
            #expect(second?.code == .loginRefused)
            #expect(second?.returnValue == .pinIncorrect)
            #expect(pool.epoch == epoch + 1)
            #expect(pool.statistics.loginRefused)
            #expect(!pool.statistics.tokenUnreachable, "a refused PIN is not an outage: no attempt will follow")
            // Several retry intervals later, nothing has been tried again.
            try await Task.sleep(for: .milliseconds(700))
            let quiet = fault.traceMark()
            let started = ContinuousClock.now
            for _ in 0..<50 {
                let error = await #expect(throws: PKCS11Error.self) {
                    try await pool.withSession { session in _ = try session.state() }
                }
                #expect(error?.code == .loginRefused)
            }
            #expect(ContinuousClock.now - started < .milliseconds(500))
            #expect(fault.callCount(since: quiet) == 0, "no PKCS#11 call at all while refused")
            #expect(fault.calls(of: "C_Login", since: mark).map(\.returnValue) == [.pinIncorrect])
            #expect(pool.epoch == epoch + 1)
            try fault.clearRules()
            try await pool.resumeLogin(pin: setup.token.pin)
            #expect(try await pool.withSession { session in try session.state().isUserLoggedIn })
            await expectNoSessionLeaked(pool, slot: setup.token.slot)
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
        }

        @Test(
            "shutdown during a reset attempt: waiters fail at once, shutdown completes with the attempt, nothing left")
        func shutdownDuringResetAttempt() async throws {
            let created = fault.traceMark()
            let pool = try await pool(sessions: 2)
            try fault.setRules(
                """
                C_GenerateRandom rv=CKR_DEVICE_ERROR count=1
                C_GetSlotList delay_ms=800 count=1
                """)
            let first = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.generateRandom(count: 4) }
            }
            #expect(first?.code == .tokenUnreachable)
            let waiters = (0..<3).map { _ in
                Task { try await pool.withSession { session in try session.generateRandom(count: 4).count } }
            }
            for _ in 0..<200 where pool.statistics.waiting < 3 || pool.statistics.opening == 0 {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(pool.statistics.waiting == 3)
            #expect(pool.statistics.opening == 1, "the attempt is under way")
            let started = ContinuousClock.now
            let shutdown = Task { await pool.shutdown() }
            for waiter in waiters {
                let error = await #expect(throws: PKCS11Error.self) { try await waiter.value }
                #expect(error?.code == .sessionPoolShutDown)
            }
            let waitersFailedAfter = ContinuousClock.now - started
            await shutdown.value
            let shutdownTook = ContinuousClock.now - started
            #expect(waitersFailedAfter < .milliseconds(300))
            #expect(shutdownTook < .seconds(3))
            #expect(pool.module.openSessionCount(slot: setup.token.slot) == 0)
            #expect(fault.realSessionBalance(since: created) == 0, "the session the attempt opened was closed")
            print(
                """
                MEASURE fault-module shutdown during a reset attempt: waiters failed after \
                \(milliseconds(waitersFailedAfter)) ms, shutdown completed after \(milliseconds(shutdownTook)) ms
                """)
        }

        @Test(
            "an answer in doubt is checked with C_GetTokenInfo: a token that answers is not reset, one that does not is"
        )
        func answerInDoubt() async throws {
            let pool = try await pool(sessions: 1)
            let box = try await setup.seal([1, 2], in: pool)
            let epoch = pool.epoch

            var mark = fault.traceMark()
            try fault.setRules("C_EncryptInit rv=CKR_OBJECT_HANDLE_INVALID count=1")
            let answered = await #expect(throws: PKCS11Error.self) { try await setup.seal([3], in: pool) }
            #expect(answered?.code == .functionFailed)
            #expect(answered?.returnValue == .objectHandleInvalid)
            #expect(fault.calls(of: "C_GetTokenInfo", since: mark).map(\.returnValue) == [.ok])
            #expect(pool.epoch == epoch)
            #expect(!pool.statistics.tokenUnreachable)

            mark = fault.traceMark()
            try fault.setRules(
                """
                C_EncryptInit rv=CKR_OBJECT_HANDLE_INVALID count=1
                C_GetTokenInfo rv=CKR_GENERAL_ERROR count=1
                """)
            let gone = await #expect(throws: PKCS11Error.self) { try await setup.seal([3], in: pool) }
            #expect(gone?.code == .tokenUnreachable)
            #expect(gone?.function == .encryptInit)
            #expect(gone?.returnValue == .objectHandleInvalid)
            #expect(try await setup.open(try await setup.seal([4], in: pool), in: pool) == [4])
            #expect(pool.epoch == epoch + 1)

            // A ciphertext that does not authenticate (SoftHSM2: CKR_GENERAL_ERROR from C_Decrypt)
            // says nothing about the token: no C_GetTokenInfo.
            try fault.clearRules()
            mark = fault.traceMark()
            var tampered = box.ciphertextAndTag
            tampered[0] ^= 1
            let refused = await #expect(throws: PKCS11Error.self) {
                try await setup.open(AESGCMSealedBox(iv: box.iv, ciphertextAndTag: tampered), in: pool)
            }
            #expect(refused?.isDecryptAuthenticationFailure == true)
            #expect(fault.calls(of: "C_GetTokenInfo", since: mark).isEmpty)
            #expect(pool.epoch == epoch + 1)
            await expectNoSessionLeaked(pool, slot: setup.token.slot)
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
        }

        @Test("CKR_GENERAL_ERROR from C_Login with the token answering: an ordinary open failure, no reset")
        func generalErrorAtLoginWithTokenAnswering() async throws {
            let pool = try await pool(sessions: 1)
            let epoch = pool.epoch
            // The pool's session and the login go; the next request opens and logs in again.
            try setup.fixture.module.closeAllSessions(slot: setup.token.slot)
            let mark = fault.traceMark()
            try fault.setRules("C_Login rv=CKR_GENERAL_ERROR count=1")
            let error = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.state() }
            }
            #expect(error?.code == .functionFailed)
            #expect(error?.returnValue == .generalError)
            #expect(fault.calls(of: "C_GetTokenInfo", since: mark).map(\.returnValue) == [.ok])
            #expect(pool.epoch == epoch)
            #expect(!pool.statistics.tokenUnreachable)
            #expect(try await pool.withSession { session in try session.state().isUserLoggedIn })
            await expectNoSessionLeaked(pool, slot: setup.token.slot)
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
        }

        @Test("a close the token does not confirm is counted, and closed for real at shutdown")
        func unconfirmedCloseRetriedAtShutdown() async throws {
            let created = fault.traceMark()
            let pool = try await pool(sessions: 1)
            let box = try await setup.seal([5], in: pool)
            // The session is retired (an operation may be left active) and its close fails.
            try fault.setRules(
                """
                C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1
                C_CloseSession rv=CKR_DEVICE_ERROR count=1
                """)
            _ = await #expect(throws: PKCS11Error.self) { try await setup.open(box, in: pool) }
            for _ in 0..<200 where pool.statistics.closing > 0 {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(pool.statistics.unconfirmedCloses == 1)
            #expect(fault.realSessionBalance(since: created) == 1, "SoftHSM2 still holds the session")
            #expect(pool.module.openSessionCount(slot: setup.token.slot) == 0, "the module's count has let it go")
            #expect(try await setup.open(box, in: pool) == [5])
            await shutDownLeavingNoSession(pool, slot: setup.token.slot)
            #expect(fault.realSessionBalance(since: created) == 0)
        }

        @Test("a body that catches the device error itself still resets the pool")
        func caughtDeviceErrorResets() async throws {
            let pool = try await pool(sessions: 2)
            let epoch = pool.epoch
            try fault.setRules("C_GenerateRandom rv=CKR_DEVICE_ERROR count=1")
            let caught = try await pool.withSession { session -> Bool in
                do {
                    _ = try session.generateRandom(count: 8)
                    return false
                } catch {
                    return true
                }
            }
            #expect(caught)
            // The reset runs on the pool's threads; the next request waits for it and is served.
            #expect(try await pool.withSession { session in try session.generateRandom(count: 8).count } == 8)
            #expect(pool.epoch == epoch + 1)
            #expect(!pool.statistics.tokenUnreachable)
            await pool.shutdown()
        }

        @Test("a burst of CKR_SESSION_HANDLE_INVALID replaces sessions without a reset")
        func sessionHandleInvalidBurst() async throws {
            let pool = try await pool(sessions: 4)
            let keyID = setup.keyID
            let recorder = CallRecorder()
            let load = (0..<4).map { _ in recorder.start(pool, every: .milliseconds(5), Self.work(keyID: keyID)) }
            #expect(await recorder.wait(upTo: .seconds(5)) { $0.count >= 20 })
            let epoch = pool.epoch
            let discarded = pool.statistics.discarded
            let burstAt = ContinuousClock.now
            let mark = fault.traceMark()
            try fault.setRules("C_GenerateRandom rv=CKR_SESSION_HANDLE_INVALID count=12")
            var everUnreachable = false
            for _ in 0..<50 {
                everUnreachable = everUnreachable || pool.statistics.tokenUnreachable
                try await Task.sleep(for: .milliseconds(10))
            }
            recorder.stop()
            for task in load { await task.value }
            let after = recorder.all.filter { $0.ended > burstAt }
            let failures = after.filter { !$0.succeeded }
            // Each call is tried twice (maximumAttempts): 12 injected answers fail at most 6 calls.
            #expect(failures.count <= 6)
            #expect(failures.allSatisfy { $0.pkcs11Error?.returnValue == .sessionHandleInvalid }, "\(failures)")
            #expect(!everUnreachable)
            #expect(pool.epoch == epoch)
            #expect(pool.statistics.discarded > discarded)
            #expect(fault.calls(of: "C_GenerateRandom", since: mark).filter(\.injected).count == 12)
            #expect(after.suffix(8).allSatisfy { $0.succeeded })
            await pool.shutdown()
        }

        @Test("a hung call holds its session only: other sessions serve, and a full pool times out instead of blocking")
        func hungCall() async throws {
            let pool = try await pool(sessions: 2, timeout: .seconds(1))
            try fault.setRules("C_GenerateRandom delay_ms=3000 count=1")
            let hung = Task { try await pool.withSession { session in try session.generateRandom(count: 4).count } }
            // Wait until the hung call holds its session.
            for _ in 0..<100 where pool.statistics.leased == 0 {
                try await Task.sleep(for: .milliseconds(10))
            }
            let started = ContinuousClock.now
            for _ in 0..<10 {
                #expect(try await pool.withSession { session in try session.generateRandom(count: 4).count } == 4)
            }
            #expect(ContinuousClock.now - started < .seconds(1), "the other session serves meanwhile")
            // Both sessions busy: a third caller waits its acquire timeout, not for the hang.
            try fault.setRules("C_GenerateRandom delay_ms=3000 count=1")
            let secondHung = Task {
                try await pool.withSession { session in try session.generateRandom(count: 4).count }
            }
            for _ in 0..<100 where pool.statistics.leased < 2 {
                try await Task.sleep(for: .milliseconds(10))
            }
            let waitStarted = ContinuousClock.now
            let error = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in try session.generateRandom(count: 4).count }
            }
            let waited = ContinuousClock.now - waitStarted
            #expect(error?.code == .sessionAcquireTimeout)
            #expect(waited >= .milliseconds(900) && waited < .seconds(2), "\(waited)")
            #expect(try await hung.value == 4)
            #expect(try await secondHung.value == 4)
            #expect(!pool.statistics.tokenUnreachable)
            #expect(try await pool.withSession { session in try session.generateRandom(count: 4).count } == 4)
            print(
                "MEASURE fault-module hang: a caller behind two hung sessions failed after \(milliseconds(waited)) ms")
            await pool.shutdown()
        }

        @Test("a token unreachable when the pool is created: creation fails with tokenUnreachable, promptly")
        func unreachableAtCreation() async throws {
            try fault.setRules("* rv=CKR_DEVICE_ERROR")
            defer { try? fault.clearRules() }
            let started = ContinuousClock.now
            let error = await #expect(throws: PKCS11Error.self) {
                _ = try await SessionPool(
                    module: fault.module, slot: setup.token.slot, tokenLabel: setup.token.label, pin: setup.token.pin)
            }
            #expect(
                error?.code == .tokenUnreachable || error?.returnValue == .deviceError, "\(String(describing: error))")
            #expect(ContinuousClock.now - started < .seconds(2))
        }
    }
}

extension FaultInjectionTests {
    @Suite("PKCS11Module.reinitialize on a module it does not own")
    struct ReinitializeNotOwned {
        @Test("the fault module over the fixture's SoftHSM2 refuses with initializationNotOwned")
        func notOwned() throws {
            let fault = try FaultInjectingModule.shared()
            #expect(!fault.module.ownsInitialization)
            let error = #expect(throws: PKCS11Error.self) { try fault.module.reinitialize() }
            #expect(error?.code == .initializationNotOwned)
            #expect(fault.module.epoch == 0)
        }
    }
}
