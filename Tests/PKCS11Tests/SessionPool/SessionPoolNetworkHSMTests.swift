import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

extension TokenOutageTests {
    /// A network HSM that goes away and comes back: SoftHSM2 served by `p11-kit server` in a process
    /// group of its own, this process loading p11-kit's client module (which nothing else here
    /// loads, so the pool owns its initialisation). Without a new `C_Initialize` the client answers
    /// `CKR_DEVICE_ERROR` for ever once its server died; the pool must re-initialise it.
    @Suite("Session pool over a network HSM (p11-kit server killed -9 and restarted)")
    struct NetworkHSM {
        let fixture: SoftHSMFixture
        let client: P11KitClient
        let token: TestToken
        let server: P11KitServer
        let keyID: [UInt8] = [0x9e, 0x70]

        init() async throws {
            fixture = try SoftHSMFixture.shared()
            client = try P11KitClient.shared()
            token = try fixture.makeToken("p11kit")
            server = client.server(tokenLabel: token.label)
            try await server.start()
            // The client is shared by the suite's tests and the last one killed its server: start
            // from a fresh connection (no session is open through it between tests).
            try client.module.reinitialize()
        }

        /// A pool on the served token; `retry` between reset attempts.
        func pool(sessions: Int = 2, retry: Duration = .milliseconds(500)) async throws -> SessionPool {
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = sessions
            configuration.acquireTimeout = .seconds(5)
            configuration.retryInterval = retry
            return try await SessionPool(
                module: client.module, tokenLabel: token.label, pin: token.pin, configuration: configuration)
        }

        /// A master key on the token, generated through the network HSM (key generation passes
        /// p11-kit; GCM does not).
        func generateKey(_ pool: SessionPool) async throws {
            try await pool.withSession { [keyID] session in
                _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "p11kit", id: keyID)
            }
        }

        @Test("reinitialize: C_Finalize and C_Initialize with no session open; refused while one is")
        func reinitializeDirectly() async throws {
            #expect(client.module.ownsInitialization)
            #expect(client.module.openSessionCount == 0)
            let epoch = client.module.epoch
            try client.module.reinitialize()
            #expect(client.module.epoch == epoch + 1)
            let slot = try client.module.slot(tokenLabel: token.label)
            try client.module.withSession(slot: slot) { session in
                let open = #expect(throws: PKCS11Error.self) { try client.module.reinitialize() }
                #expect(open?.code == .sessionsStillOpen)
                _ = try session.generateRandom(count: 4)
            }
            #expect(client.module.epoch == epoch + 1)
            server.kill()
        }

        @Test("killed under load: fast tokenUnreachable, the module re-initialised, recovery within 5 s of the restart")
        func killedUnderLoad() async throws {
            let pool = try await pool()
            try await generateKey(pool)
            let keyID = keyID
            let poolEpoch = pool.epoch
            let moduleEpoch = client.module.epoch
            let recorder = CallRecorder()
            let load = (0..<2).map { _ in
                recorder.start(pool, every: .milliseconds(20)) { session in _ = try session.generateRandom(count: 16) }
            }
            #expect(await recorder.wait(upTo: .seconds(5)) { $0.filter(\.succeeded).count >= 10 })

            let killedAt = ContinuousClock.now
            server.kill()
            var flaggedAfter: Duration?
            for _ in 0..<300 where flaggedAfter == nil {
                if pool.statistics.tokenUnreachable { flaggedAfter = ContinuousClock.now - killedAt }
                try await Task.sleep(for: .milliseconds(5))
            }
            let flagged = try #require(flaggedAfter, "the pool never reported the token unreachable")
            #expect(flagged < .seconds(1))
            try await Task.sleep(until: killedAt + .seconds(2))
            #expect(pool.statistics.tokenUnreachable)

            let restartedAt = ContinuousClock.now
            try await server.start()
            let recovered = await recorder.wait(upTo: .seconds(8)) { calls in
                calls.contains { $0.started > restartedAt && $0.succeeded }
            }
            try await Task.sleep(for: .milliseconds(200))
            recorder.stop()
            for task in load { await task.value }

            #expect(recovered)
            let firstError = try #require(recorder.firstFailure(after: killedAt))
            let firstSuccess = try #require(recorder.firstSuccess(startedAfter: restartedAt))
            let down = recorder.calls(within: (killedAt + .milliseconds(200))..<restartedAt)
            #expect(down.count > 10)
            #expect(down.allSatisfy { $0.pkcs11Error?.code == .tokenUnreachable }, "\(down.map(\.error))")
            #expect(down.allSatisfy { $0.latency < .seconds(1) })
            #expect(firstError.pkcs11Error?.code == .tokenUnreachable)
            #expect(firstError.ended - killedAt < .seconds(1))
            #expect(firstSuccess.ended - restartedAt < .seconds(5))
            #expect(recorder.all.filter { $0.started > firstSuccess.ended }.allSatisfy { $0.succeeded })
            // The module was re-initialised, the pool's epoch moved on, and the new sessions are
            // logged in and find the key generated before the outage.
            #expect(client.module.epoch > moduleEpoch)
            #expect(pool.epoch > poolEpoch)
            #expect(!pool.statistics.tokenUnreachable)
            let loggedInAndFound = try await pool.withSession { session in
                try session.state().isUserLoggedIn && session.findMasterKey(id: keyID) != nil
            }
            #expect(loggedInAndFound)
            let slot = try client.module.slot(tokenLabel: token.label)
            await expectNoSessionLeaked(pool, slot: slot)
            print(
                """
                MEASURE p11-kit killed under load: first tokenUnreachable \(milliseconds(firstError.ended - killedAt)) ms \
                after the kill, pool flagged unreachable after \(milliseconds(flagged)) ms; \(down.count) calls failed fast \
                (max \(milliseconds(down.map(\.latency).max() ?? .zero)) ms); first success \
                \(milliseconds(firstSuccess.ended - restartedAt)) ms after the restart; module epoch \(moduleEpoch) -> \
                \(client.module.epoch), pool epoch \(poolEpoch) -> \(pool.epoch)
                """)
            await shutDownLeavingNoSession(pool, slot: slot)
            server.kill()
        }

        @Test("no traffic but a check each second (as the readiness sampler does): recovery goes on by itself")
        func recoversWithReadinessChecksOnly() async throws {
            let pool = try await pool()
            try await generateKey(pool)
            let recorder = CallRecorder()
            let checks = recorder.start(pool, every: .seconds(1)) { session in _ = try session.state() }
            #expect(await recorder.wait(upTo: .seconds(3)) { $0.contains(where: \.succeeded) })
            let killedAt = ContinuousClock.now
            server.kill()
            #expect(await recorder.wait(upTo: .seconds(3)) { $0.contains { $0.ended > killedAt && !$0.succeeded } })
            #expect(pool.statistics.tokenUnreachable)
            try await Task.sleep(until: killedAt + .seconds(3))
            let restartedAt = ContinuousClock.now
            try await server.start()
            let recovered = await recorder.wait(upTo: .seconds(6)) { calls in
                calls.contains { $0.started > restartedAt && $0.succeeded }
            }
            recorder.stop()
            await checks.value
            #expect(recovered)
            let firstSuccess = try #require(recorder.firstSuccess(startedAfter: restartedAt))
            #expect(firstSuccess.ended - restartedAt < .seconds(5))
            #expect(!pool.statistics.tokenUnreachable)
            let slot = try client.module.slot(tokenLabel: token.label)
            await expectNoSessionLeaked(pool, slot: slot)
            print(
                "MEASURE p11-kit killed, checks every second only: first success "
                    + "\(milliseconds(firstSuccess.ended - restartedAt)) ms after the restart")
            await shutDownLeavingNoSession(pool, slot: slot)
            server.kill()
        }

        @Test("shutdown while the token is unreachable completes at once")
        func shutdownWhileUnreachable() async throws {
            let pool = try await pool()
            server.kill()
            let error = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in _ = try session.generateRandom(count: 4) }
            }
            #expect(error?.code == .tokenUnreachable)
            #expect(pool.statistics.tokenUnreachable)
            // The reset's attempt (which re-initialises the client) fails, with no session left.
            for _ in 0..<400 where pool.statistics.epoch == 0 || pool.statistics.opening + pool.statistics.closing > 0 {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(pool.statistics.tokenUnreachable)
            #expect(pool.statistics.epoch == 1)
            // The session's close was answered with a device error, but C_Finalize closed it for good.
            #expect(pool.statistics.unconfirmedCloses == 0)
            let started = ContinuousClock.now
            await pool.shutdown()
            #expect(ContinuousClock.now - started < .milliseconds(500))
            #expect(client.module.openSessionCount == 0)
            #expect(pool.statistics.unconfirmedCloses == 0)
        }
    }
}
