import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

/// Outages made with real processes and files: a SoftHSM2 token directory moved away and back,
/// and a p11-kit server killed and restarted. Serialised together: the p11-kit server is a
/// SoftHSM2 of its own reading the fixture's token directory, and must not start while a token
/// directory is away.
@Suite(
    "Token outages made by real processes", .serialized,
    .enabled(
        if: TestPKCS11Implementation.isSoftHSM2,
        "SoftHSM2 only: moves a SoftHSM2 token directory and serves SoftHSM2 through p11-kit"))
struct TokenOutageTests {}

extension TokenOutageTests {
    /// A SoftHSM2 token whose directory is moved away and back, under a pool over
    /// `OwnedSoftHSM` (a SoftHSM2 instance the pool owns, so it may re-initialise it). Nothing
    /// the token answers says "device removed": a key handle becomes `CKR_OBJECT_HANDLE_INVALID`
    /// and `C_GetTokenInfo` `CKR_GENERAL_ERROR`; and SoftHSM2, once it found the directory gone,
    /// sees it again only after `C_Finalize` and `C_Initialize`.
    @Suite("Session pool: a SoftHSM2 token directory moved away and back")
    struct TokenDirectory {
        let owned: OwnedSoftHSM
        let token: OwnedSoftHSMToken
        let keyID: [UInt8] = [0x0d, 0x17]

        init() throws {
            owned = try OwnedSoftHSM.shared()
            token = try #require(owned.tokens[OwnedSoftHSM.tokenLabels[0]])
            // A test that failed half-way must not leave the next one without its token.
            if !token.isInPlace {
                try token.moveBack()
                try owned.module.reinitialize()
            }
        }

        /// A pool of `sessions` on the token, with the default retry interval (500 ms).
        func pool(sessions: Int) async throws -> SessionPool {
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = sessions
            configuration.acquireTimeout = .seconds(5)
            let pool = try await SessionPool(
                module: owned.module, tokenLabel: token.label, pin: token.pin, configuration: configuration)
            try await pool.withSession { [keyID] session in
                if try session.findMasterKey(id: keyID) == nil {
                    _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "owned", id: keyID)
                }
            }
            return pool
        }

        /// What the load does, as the gateway's token adapter does it: the master key's handle is
        /// found once per pool epoch and kept (handles do not survive a reset), then used to seal.
        static func work(pool: SessionPool, keyID: [UInt8], cache: KeyHandleCache)
            -> @Sendable (borrowing Session) throws -> Void
        {
            { session in
                let epoch = pool.epoch
                let key: ObjectHandle
                if let cached = cache.handle(epoch: epoch) {
                    key = cached
                } else {
                    guard let found = try session.findMasterKey(id: keyID) else {
                        // Not found may mean not there, or a token that is gone: ask it.
                        try session.confirmTokenReachable()
                        throw KeyMissing()
                    }
                    cache.store(found, epoch: epoch)
                    key = found
                }
                _ = try [UInt8](repeating: 7, count: 32).withUnsafeBytes {
                    try session.sealAESGCM(key: key, aad: [1], plaintext: $0)
                }
            }
        }

        struct KeyMissing: Error {}

        @Test("lookup by label passes over a token that no longer answers, and finds it after re-initialisation")
        func lookupPassesOverUnreadableToken() throws {
            let bystander = OwnedSoftHSM.tokenLabels[1]
            let module = owned.module
            let slot = try module.slot(tokenLabel: token.label)
            try token.moveAway()
            defer { if !token.isInPlace { try? token.moveBack() } }
            // What SoftHSM2 answers for a token whose directory is gone.
            let info = #expect(throws: PKCS11Error.self) { try module.tokenInfo(slot) }
            #expect(info?.returnValue == .generalError)
            let missing = #expect(throws: PKCS11Error.self) { try module.slot(tokenLabel: token.label) }
            #expect(missing?.code == .tokenNotFound)
            #expect(
                missing?.detail?.contains("1 present token(s) did not answer") == true, "\(String(describing: missing))"
            )
            _ = try module.slot(tokenLabel: bystander)
            try token.moveBack()
            // Back in place, but this instance of SoftHSM2 does not see it again by itself.
            #expect(throws: PKCS11Error.self) { try module.tokenInfo(slot) }
            let epoch = module.epoch
            try module.reinitialize()
            #expect(module.epoch == epoch + 1)
            #expect(try module.slot(tokenLabel: token.label) == slot)
            #expect(try module.tokenInfo(slot).label == token.label)
        }

        @Test("moved away under load for 1.5 s: fast tokenUnreachable, the module re-initialised, recovery once back")
        func movedAwayUnderLoad() async throws {
            let pool = try await pool(sessions: 4)
            let slot = try owned.module.slot(tokenLabel: token.label)
            let cache = KeyHandleCache()
            let recorder = CallRecorder()
            let work = Self.work(pool: pool, keyID: keyID, cache: cache)
            let load = (0..<4).map { _ in recorder.start(pool, every: .milliseconds(20), work) }
            #expect(await recorder.wait(upTo: .seconds(5)) { $0.filter(\.succeeded).count >= 20 })
            let poolEpoch = pool.epoch
            let moduleEpoch = owned.module.epoch

            let movedAt = ContinuousClock.now
            try token.moveAway()
            defer { if !token.isInPlace { try? token.moveBack() } }
            var flaggedAfter: Duration?
            for _ in 0..<200 where flaggedAfter == nil {
                if pool.statistics.tokenUnreachable { flaggedAfter = ContinuousClock.now - movedAt }
                try await Task.sleep(for: .milliseconds(5))
            }
            let flagged = try #require(flaggedAfter, "the pool never reported the token unreachable")
            try await Task.sleep(until: movedAt + .milliseconds(1500))
            #expect(pool.statistics.tokenUnreachable)
            // The pool re-initialised SoftHSM2 while the directory was away (to no avail yet).
            #expect(owned.module.epoch > moduleEpoch)

            let backAt = ContinuousClock.now
            try token.moveBack()
            let recovered = await recorder.wait(upTo: .seconds(5)) { calls in
                calls.contains { $0.started > backAt && $0.succeeded }
            }
            try await Task.sleep(for: .milliseconds(200))
            recorder.stop()
            for task in load { await task.value }

            #expect(recovered, "service resumes without a new pool")
            let firstError = try #require(recorder.firstFailure(after: movedAt))
            let firstSuccess = try #require(recorder.firstSuccess(startedAfter: backAt))
            let away = recorder.calls(within: (movedAt + .milliseconds(100))..<backAt)
            #expect(away.count > 20)
            #expect(away.allSatisfy { $0.pkcs11Error?.code == .tokenUnreachable }, "\(away.map(\.error))")
            #expect(away.allSatisfy { $0.latency < .milliseconds(500) }, "\(away.map(\.latency).max()!)")
            #expect(firstError.pkcs11Error?.code == .tokenUnreachable, "\(String(describing: firstError.error))")
            #expect(firstError.ended - movedAt < .milliseconds(500))
            #expect(firstSuccess.ended - backAt < .seconds(2))
            #expect(recorder.all.filter { $0.started > firstSuccess.ended }.allSatisfy { $0.succeeded })
            #expect(!pool.statistics.tokenUnreachable)
            #expect(pool.epoch > poolEpoch)
            // The same pool, logged in again, and the key found again under the new epoch.
            #expect(try await pool.withSession { session in try session.state().isUserLoggedIn })
            #expect(cache.epoch == pool.epoch)
            await expectNoSessionLeaked(pool, slot: slot)
            print(
                """
                MEASURE softhsm2 directory moved away under load: first tokenUnreachable \
                \(milliseconds(firstError.ended - movedAt)) ms after the move, pool flagged unreachable after \
                \(milliseconds(flagged)) ms; \(away.count) calls failed fast (max \
                \(milliseconds(away.map(\.latency).max() ?? .zero)) ms); first success \
                \(milliseconds(firstSuccess.ended - backAt)) ms after the move back; module epoch \(moduleEpoch) -> \
                \(owned.module.epoch), pool epoch \(poolEpoch) -> \(pool.epoch)
                """)
            await shutDownLeavingNoSession(pool, slot: slot)
        }

        @Test("single requests while idle: moved away and back unseen is no fault; seen, it fails fast, then recovers")
        func movedAwayWhileIdle() async throws {
            let pool = try await pool(sessions: 2)
            let slot = try owned.module.slot(tokenLabel: token.label)
            let cache = KeyHandleCache()
            let work = Self.work(pool: pool, keyID: keyID, cache: cache)
            try await pool.withSession(work)
            let poolEpoch = pool.epoch
            let moduleEpoch = owned.module.epoch

            // SoftHSM2 looks for the directory only when asked: away and back with no request in
            // between goes unnoticed, and must not reset anything.
            try token.moveAway()
            try token.moveBack()
            try await pool.withSession(work)
            #expect(pool.epoch == poolEpoch)

            // Away, and asked: the kept key handle is unknown and C_GetTokenInfo fails, so the
            // request fails at once with tokenUnreachable; the reset's attempt re-initialises
            // SoftHSM2 and still finds no token.
            try token.moveAway()
            defer { if !token.isInPlace { try? token.moveBack() } }
            var started = ContinuousClock.now
            let error = await #expect(throws: PKCS11Error.self) { try await pool.withSession(work) }
            let failedAfter = ContinuousClock.now - started
            #expect(error?.code == .tokenUnreachable)
            #expect(error?.returnValue == .objectHandleInvalid, "the answer that raised the doubt is kept")
            #expect(failedAfter < .milliseconds(500))
            // The reset's attempt runs on the pool's threads: let it fail before the token is back.
            func attemptFailed() -> Bool {
                let statistics = pool.statistics
                return statistics.epoch == poolEpoch + 1 && statistics.tokenUnreachable
                    && statistics.opening + statistics.closing == 0
            }
            for _ in 0..<400 where !attemptFailed() {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(attemptFailed(), "\(pool.statistics)")
            // Back; once the retry interval has passed, the next request starts an attempt, waits
            // for it (SoftHSM2, which looked for the directory and did not find it, sees it again
            // only after another C_Initialize) and is served.
            try token.moveBack()
            try await Task.sleep(for: .milliseconds(600))
            started = ContinuousClock.now
            try await pool.withSession(work)
            let servedAfter = ContinuousClock.now - started
            #expect(servedAfter < .seconds(1))
            #expect(pool.epoch == poolEpoch + 2, "the reset's attempt, and the one that succeeded")
            #expect(owned.module.epoch > moduleEpoch)
            #expect(!pool.statistics.tokenUnreachable)
            await expectNoSessionLeaked(pool, slot: slot)
            print(
                """
                MEASURE softhsm2 directory moved away while idle: the request failed after \
                \(milliseconds(failedAfter)) ms; back, the first request after the retry interval was served after \
                \(milliseconds(servedAfter)) ms (its reset attempt included)
                """)
            await shutDownLeavingNoSession(pool, slot: slot)
        }

        @Test("a reset re-initialises the module only once no other session is open through it")
        func reinitialisationWaitsForOtherSessions() async throws {
            let pool = try await pool(sessions: 1)
            let slot = try owned.module.slot(tokenLabel: token.label)
            let cache = KeyHandleCache()
            let work = Self.work(pool: pool, keyID: keyID, cache: cache)
            try await pool.withSession(work)
            // Another component of the process holds a session of the same module (on another
            // token), on a thread of its own, until released.
            let bystanderSlot = try owned.module.slot(tokenLabel: OwnedSoftHSM.tokenLabels[1])
            let release = Flag()
            let closed = Flag()
            Thread.detachNewThread { [module = owned.module] in
                _ = try? module.withSession(slot: bystanderSlot) { _ in release.wait(upTo: .seconds(30)) }
                closed.set()
            }
            while owned.module.openSessionCount(slot: bystanderSlot) == 0 {
                try await Task.sleep(for: .milliseconds(5))
            }
            let moduleEpoch = owned.module.epoch
            try token.moveAway()
            defer { if !token.isInPlace { try? token.moveBack() } }
            let first = await #expect(throws: PKCS11Error.self) { try await pool.withSession(work) }
            #expect(first?.code == .tokenUnreachable)
            try token.moveBack()
            // The reset cannot re-initialise a module another session still uses, and without
            // that SoftHSM2 does not see the token again: requests fail fast meanwhile (this one
            // after an attempt that was refused), and the pool gets there once that session closed.
            try await Task.sleep(for: .milliseconds(600))
            let second = await #expect(throws: PKCS11Error.self) { try await pool.withSession(work) }
            #expect(second?.code == .tokenUnreachable)
            #expect(owned.module.epoch == moduleEpoch)
            release.set()
            while !closed.isSet { try await Task.sleep(for: .milliseconds(5)) }
            var served = false
            let end = ContinuousClock.now + .seconds(5)
            while !served, ContinuousClock.now < end {
                served = (try? await pool.withSession(work)) != nil
                if !served { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(served)
            #expect(owned.module.epoch == moduleEpoch + 1)
            await expectNoSessionLeaked(pool, slot: slot)
            await shutDownLeavingNoSession(pool, slot: slot)
        }
    }
}

/// A key handle kept for one pool epoch, as a token adapter keeps it.
final class KeyHandleCache: Sendable {
    private let entry = Mutex<(epoch: Int, handle: ObjectHandle)?>(nil)

    func handle(epoch: Int) -> ObjectHandle? {
        entry.withLock { $0.flatMap { $0.epoch == epoch ? $0.handle : nil } }
    }

    func store(_ handle: ObjectHandle, epoch: Int) {
        entry.withLock { $0 = (epoch, handle) }
    }

    /// The epoch of the handle kept, if any.
    var epoch: Int? { entry.withLock { $0?.epoch } }
}
