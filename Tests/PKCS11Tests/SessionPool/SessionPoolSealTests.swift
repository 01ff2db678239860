import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

// Sealing: the pool forgets the PIN and keeps no login, and makes no PKCS#11 call until it is
// given the PIN again. Through the fault-injecting module so every real call is counted.
extension FaultInjectionTests {
    @Suite("Session pool: sealed start, seal and unseal")
    struct Sealing {
        let setup: Setup
        init() throws { setup = try Setup("fault-seal") }

        var fault: FaultInjectingModule { setup.fault }
        var token: TestToken { setup.token }

        func configuration(sessions: Int) -> SessionPoolConfiguration {
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = sessions
            configuration.acquireTimeout = .seconds(30)
            return configuration
        }

        /// Whether this process holds a user login on the token (asked on a session of its own).
        func tokenHoldsLogin() throws -> Bool {
            try setup.fixture.module.withSession(slot: token.slot) { session in
                try session.state().isUserLoggedIn
            }
        }

        func expectSealedRefusal(_ pool: SessionPool) async {
            let error = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.state() }
            }
            #expect(error?.code == .loginRefused)
            #expect(error?.description.contains("sealed") == true)
        }

        @Test("a sealed start opens no session and logs in nowhere; requests fail at once; resumeLogin unseals")
        func sealedStart() async throws {
            let mark = fault.traceMark()
            let pool = try await SessionPool.sealed(
                module: fault.module, tokenLabel: token.label, configuration: configuration(sessions: 2))
            #expect(pool.isRefusingLogin && pool.isSealed)
            // Sealed is not a refused PIN (metrics and readiness tell them apart).
            #expect(pool.statistics.sealed && !pool.statistics.loginRefused)
            let started = ContinuousClock.now
            for _ in 0..<50 { await expectSealedRefusal(pool) }
            #expect(ContinuousClock.now - started < .seconds(5), "sealed leases must not wait for the timeout")
            #expect(fault.calls(of: "C_OpenSession", since: mark).isEmpty)
            #expect(fault.calls(of: "C_Login", since: mark).isEmpty)

            try await pool.resumeLogin(pin: token.pin)
            #expect(!pool.isRefusingLogin && !pool.isSealed && !pool.statistics.sealed)
            let box = try await setup.seal([1, 2, 3], in: pool)
            #expect(try await setup.open(box, in: pool) == [1, 2, 3])
            #expect(fault.calls(of: "C_Login", since: mark).count == 1)
            await pool.shutdown()
        }

        @Test("seal: the call in flight finishes, new calls fail at once, every session closes, no login is left")
        func sealRunningPool() async throws {
            let pool = try await SessionPool(
                module: fault.module, tokenLabel: token.label, pin: token.pin,
                configuration: configuration(sessions: 3))
            // Warm an idle session too.
            _ = try await setup.seal([9], in: pool)
            #expect(try tokenHoldsLogin())

            // One call in flight, held until the test lets it go.
            let (started, startedContinuation) = AsyncStream<Void>.makeStream()
            let release = DispatchSemaphore(value: 0)
            let inFlight = Task { [keyID = setup.keyID] in
                try await pool.withSession { session in
                    startedContinuation.yield()
                    release.wait()
                    let key = try #require(try session.findMasterKey(id: keyID))
                    return try [UInt8](repeating: 7, count: 16).withUnsafeBytes {
                        try session.sealAESGCM(key: key, aad: [1], plaintext: $0)
                    }
                }
            }
            var iterator = started.makeAsyncIterator()
            _ = await iterator.next()

            let sealing = Task { await pool.seal() }
            while !pool.isRefusingLogin { await Task.yield() }
            let mark = fault.traceMark()
            await expectSealedRefusal(pool)
            #expect(fault.callCount(since: mark) == 0, "a sealed pool makes no PKCS#11 call for a request")

            release.signal()
            let box = try await inFlight.value
            await sealing.value
            let statistics = pool.statistics
            #expect(statistics.idle + statistics.leased + statistics.opening + statistics.closing == 0)
            #expect(try !tokenHoldsLogin())

            // Unsealed again with the PIN: the work sealed before opens.
            try await pool.resumeLogin(pin: token.pin)
            #expect(try await setup.open(box, in: pool) == [UInt8](repeating: 7, count: 16))
            await pool.shutdown()
        }

        @Test("seal twice, and seal a sealed start: both return at once")
        func sealIdempotent() async throws {
            let pool = try await SessionPool.sealed(
                module: fault.module, tokenLabel: token.label, configuration: configuration(sessions: 1))
            await pool.seal()
            await pool.seal()
            await expectSealedRefusal(pool)
            await pool.shutdown()
        }
    }
}
