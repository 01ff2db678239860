import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import Synchronization

/// Whether the token and the store answer, checked cheaply and at most once per `cacheLifetime`
/// however often `/readyz`, `ServerInfo` and the metrics ask; concurrent askers share one check.
final class ReadinessProbe: Sendable {
    /// How long one result is reused: a load balancer polling every 100 ms costs one check a second.
    static let cacheLifetime: Duration = .seconds(1)
    /// How long one check may take before the dependency counts as unreachable. Below the usual
    /// 5 s probe timeout of orchestrators, so a hung token shows as "not ready", not as a timeout.
    static let checkTimeout: Duration = .seconds(2)

    /// One check's result.
    struct Result: Sendable, Hashable {
        var tokenReachable: Bool
        var storeReachable: Bool
        /// The token refused the user PIN and the pool makes no login attempt until an operator
        /// acts (`SessionPool.resumeLogin(pin:)` or a restart with the right PIN).
        var tokenLoginRefused = false
        /// Why the audit log failed its integrity check against the HSM (every key operation is
        /// refused until it is restored), or nil while it holds.
        var auditIntegrityFailure: String? = nil
        /// The token can serve requests.
        var tokenReady: Bool { tokenReachable && !tokenLoginRefused }
        var ready: Bool { tokenReady && storeReachable && auditIntegrityFailure == nil }
        /// Why the token is not ready, for `/readyz` (no secret, no CK_RV); nil when it is.
        var tokenDetail: String? {
            if tokenLoginRefused {
                return "the HSM refused the login PIN; no login is attempted until the PIN is corrected (hsm.pin) "
                    + "and the gateway restarted"
            }
            return tokenReachable ? nil : "the token does not answer"
        }
    }

    private let checkToken: @Sendable () async throws -> Void
    private let tokenBusy: @Sendable () -> Bool
    private let loginRefused: @Sendable () -> Bool
    private let checkStore: @Sendable () async throws -> Void
    private let auditIntegrityFailure: @Sendable () -> String?
    private struct Cached {
        var checkedAt: ContinuousClock.Instant
        var task: Task<Result, Never>
    }
    private let cached = Mutex<Cached?>(nil)
    /// The time the cache rule reads (the continuous clock; tests pass a clock they move).
    private let now: @Sendable () -> ContinuousClock.Instant

    /// A probe over two checks, each reachable when it returns within `checkTimeout` without
    /// throwing. When the token's check does not, `tokenBusy` decides: a token whose sessions are
    /// all at work is reachable, and a probe must not queue behind real requests to learn it.
    /// `loginRefused` says the token refused the PIN (not ready, whatever the checks say).
    init(
        checkToken: @escaping @Sendable () async throws -> Void,
        tokenBusy: @escaping @Sendable () -> Bool = { false },
        loginRefused: @escaping @Sendable () -> Bool = { false },
        checkStore: @escaping @Sendable () async throws -> Void,
        auditIntegrityFailure: @escaping @Sendable () -> String? = { nil },
        now: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now }
    ) {
        self.now = now
        self.checkToken = checkToken
        self.tokenBusy = tokenBusy
        self.loginRefused = loginRefused
        self.checkStore = checkStore
        self.auditIntegrityFailure = auditIntegrityFailure
    }

    /// The probe for a session pool: `C_GetSessionInfo` on a pooled session, or every session
    /// leased (busy, so working); the pool's login-refused state; and `checkStore`. A refusing
    /// pool answers the token check at once without calling the token.
    convenience init(
        pool: SessionPool,
        checkStore: @escaping @Sendable () async throws -> Void,
        auditIntegrityFailure: @escaping @Sendable () -> String? = { nil }
    ) {
        self.init(
            checkToken: { _ = try await pool.withSession { session in try session.state() } },
            tokenBusy: {
                let statistics = pool.statistics
                return statistics.leased > 0 && statistics.leased + statistics.opening >= statistics.maximumSessions
            },
            loginRefused: { pool.statistics.loginRefused },
            checkStore: checkStore,
            auditIntegrityFailure: auditIntegrityFailure
        )
    }

    /// The probe for a session pool and a repository, which reads its audit head, and for the
    /// audit log's integrity as the key service last found it.
    convenience init(pool: SessionPool, repository: any KeyRepository, service: KeyService? = nil) {
        self.init(
            pool: pool,
            checkStore: { _ = try await repository.read { try await $0.auditHead() } },
            auditIntegrityFailure: { service?.auditIntegrityFailure }
        )
    }

    /// The gateway's probe: the token must do an AES-GCM round trip under its probe key, as real
    /// calls do (`PKCS11KeyToken.checkHealth`: a session on a token whose objects are gone, or one
    /// that cannot do AES-GCM, is not ready), besides the store and the audit log's integrity.
    convenience init(pool: SessionPool, token: PKCS11KeyToken, repository: any KeyRepository, service: KeyService) {
        self.init(
            checkToken: { try await token.checkHealth() },
            tokenBusy: {
                let statistics = pool.statistics
                return statistics.leased > 0 && statistics.leased + statistics.opening >= statistics.maximumSessions
            },
            loginRefused: { pool.statistics.loginRefused },
            checkStore: { _ = try await repository.read { try await $0.auditHead() } },
            auditIntegrityFailure: { service.auditIntegrityFailure }
        )
    }

    /// Forgets the cached result, so the next check asks again (after an unseal or a seal, whose
    /// effect must show at once, not up to `cacheLifetime` later).
    func invalidate() {
        cached.withLock { $0 = nil }
    }

    /// The current result (at most `cacheLifetime` old).
    func check() async -> Result {
        let now = self.now()
        let task = cached.withLock { cached -> Task<Result, Never> in
            if let cached, now - cached.checkedAt < Self.cacheLifetime { return cached.task }
            let task = Task { [checkToken, tokenBusy, loginRefused, checkStore, auditIntegrityFailure] in
                async let token = Self.withTimeout(checkToken)
                async let store = Self.withTimeout(checkStore)
                let tokenAnswered = await token
                let refused = loginRefused()
                return Result(
                    tokenReachable: (tokenAnswered || tokenBusy()) && !refused, storeReachable: await store,
                    tokenLoginRefused: refused, auditIntegrityFailure: auditIntegrityFailure())
            }
            cached = Cached(checkedAt: now, task: task)
            return task
        }
        return await task.value
    }

    /// Runs `body`; true when it returns within `checkTimeout` without throwing.
    static func withTimeout(_ body: @escaping @Sendable () async throws -> Void) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                do {
                    try await body()
                    return true
                } catch {
                    return false
                }
            }
            group.addTask {
                try? await Task.sleep(for: checkTimeout)
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
    }
}
