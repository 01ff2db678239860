import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

@testable import GatewayServer

/// The readiness probe's rules: a dependency that fails or hangs is not ready, results are
/// cached and shared, and the token check on a real SoftHSM2 pool.
@Suite("Readiness probe")
struct ReadinessProbeTests {
    /// Counts the checks it runs; each succeeds or throws (`answer`) after `delay`, or hangs
    /// (until cancelled) when `delay` is nil.
    final class FakeCheck: Sendable {
        struct Refused: Error {}
        private let state = Mutex<(answer: Bool, delay: Duration?, runs: Int)>((true, .zero, 0))

        var runs: Int { state.withLock { $0.runs } }

        func set(answer: Bool, delay: Duration? = .zero) {
            state.withLock {
                $0.answer = answer
                $0.delay = delay
            }
        }

        var check: @Sendable () async throws -> Void {
            {
                let (answer, delay) = self.state.withLock { state -> (Bool, Duration?) in
                    state.runs += 1
                    return (state.answer, state.delay)
                }
                try await Task.sleep(for: delay ?? .seconds(3600))
                guard answer else { throw Refused() }
            }
        }
    }

    @Test("a failing token or store makes the gateway not ready, naming which")
    func failingDependency() async throws {
        let token = FakeCheck()
        let store = FakeCheck()
        store.set(answer: false)
        let probe = ReadinessProbe(checkToken: token.check, checkStore: store.check)
        let result = await probe.check()
        #expect(result == .init(tokenReachable: true, storeReachable: false))
        #expect(!result.ready)
    }

    @Test("a pool whose login the token refused is not ready, whatever the checks say, and the detail says why")
    func loginRefused() async throws {
        let token = FakeCheck()
        let store = FakeCheck()
        let probe = ReadinessProbe(
            checkToken: token.check, tokenBusy: { true }, loginRefused: { true }, checkStore: store.check)
        let result = await probe.check()
        #expect(result.tokenLoginRefused)
        #expect(!result.tokenReachable)
        #expect(!result.tokenReady)
        #expect(!result.ready)
        #expect(result.tokenDetail?.contains("refused the login PIN") == true)
        let healthy = await ReadinessProbe(checkToken: token.check, checkStore: store.check).check()
        #expect(healthy.ready && healthy.tokenDetail == nil)
    }

    @Test("a token that hangs counts as unreachable after the probe's check timeout, not after the hang")
    func hungToken() async throws {
        let token = FakeCheck()
        token.set(answer: true, delay: nil)
        let store = FakeCheck()
        let probe = ReadinessProbe(checkToken: token.check, checkStore: store.check)
        let started = ContinuousClock.now
        let result = await probe.check()
        let took = ContinuousClock.now - started
        #expect(result == .init(tokenReachable: false, storeReachable: true))
        // Bounded by the timeout (2 s) plus scheduling; an hour would mean no timeout at all.
        #expect(took >= ReadinessProbe.checkTimeout && took < .seconds(60), "\(took)")
    }

    @Test("a hung token whose sessions are all busy is reachable: the probe does not queue behind work")
    func busyToken() async {
        let token = FakeCheck()
        token.set(answer: true, delay: nil)
        let busy = ReadinessProbe(checkToken: token.check, tokenBusy: { true }, checkStore: FakeCheck().check)
        #expect(await busy.check().ready)
        let idle = ReadinessProbe(checkToken: token.check, tokenBusy: { false }, checkStore: FakeCheck().check)
        #expect(!(await idle.check().tokenReachable))
    }

    @Test("results are reused within the cache lifetime and shared by concurrent askers, then refreshed")
    func caching() async throws {
        let token = FakeCheck()
        let store = FakeCheck()
        token.set(answer: true, delay: .milliseconds(200))
        let clock = Mutex(ContinuousClock.now)
        let probe = ReadinessProbe(checkToken: token.check, checkStore: store.check, now: { clock.withLock { $0 } })
        let results = await withTaskGroup(of: ReadinessProbe.Result.self) { group in
            for _ in 0..<50 { group.addTask { await probe.check() } }
            return await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.count == 50 && results.allSatisfy(\.ready))
        #expect(token.runs == 1 && store.runs == 1)

        // Within the lifetime a token that just failed is not seen yet.
        token.set(answer: false)
        clock.withLock { $0 += ReadinessProbe.cacheLifetime - .milliseconds(1) }
        let again = await probe.check()
        #expect(again.ready)
        #expect(token.runs == 1)

        // After the lifetime the next asker runs a new check and sees the failure.
        clock.withLock { $0 += .milliseconds(1) }
        let refreshed = await probe.check()
        #expect(!refreshed.tokenReachable)
        #expect(token.runs == 2)
    }

    @Test("on a real SoftHSM2 pool: reachable when idle, reachable when every session is busy, not after shutdown")
    func tokenCheckOnRealPool() async throws {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken("readiness")
        var configuration = SessionPoolConfiguration()
        configuration.maximumSessions = 1
        configuration.acquireTimeout = .seconds(30)
        let pool = try await SessionPool(
            module: fixture.module, tokenLabel: testToken.label, pin: testToken.pin, configuration: configuration)
        // A new probe per look: each one's first check is not cached.
        func probe() -> ReadinessProbe { ReadinessProbe(pool: pool, checkStore: {}) }
        #expect(await probe().check().ready)

        // The only session held by a long operation: a working pool is not an unreachable token.
        let release = Mutex(false)
        let holder = Task {
            try await pool.withSession { _ in
                while !release.withLock({ $0 }) { usleep(10_000) }
            }
        }
        while pool.statistics.leased == 0 { try await Task.sleep(for: .milliseconds(10)) }
        let started = ContinuousClock.now
        #expect(await probe().check().tokenReachable)
        #expect(ContinuousClock.now - started < .seconds(20))
        release.withLock { $0 = true }
        try await holder.value

        await pool.shutdown()
        #expect(!(await probe().check().tokenReachable))
    }
}
