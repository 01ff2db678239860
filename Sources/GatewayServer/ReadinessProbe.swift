import KeyHierarchy
import Logging
import PKCS11
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
        var ready: Bool { tokenReachable && storeReachable }
    }

    private let checkToken: @Sendable () async -> Bool
    private let checkStore: @Sendable () async -> Bool
    private struct Cached {
        var checkedAt: ContinuousClock.Instant
        var task: Task<Result, Never>
    }
    private let cached = Mutex<Cached?>(nil)

    init(checkToken: @escaping @Sendable () async -> Bool, checkStore: @escaping @Sendable () async -> Bool) {
        self.checkToken = checkToken
        self.checkStore = checkStore
    }

    /// The probe for a session pool and a repository (see `tokenCheck` and `storeCheck`).
    convenience init(pool: SessionPool, repository: any KeyRepository, logger: Logger) {
        self.init(checkToken: Self.tokenCheck(pool: pool), checkStore: Self.storeCheck(repository: repository))
    }

    /// The token answers `C_GetSessionInfo` on a pooled session within `checkTimeout`. A busy pool
    /// whose sessions are all leased counts as reachable: it is working, and a probe must not
    /// queue behind real requests.
    static func tokenCheck(pool: SessionPool) -> @Sendable () async -> Bool {
        {
            let answered = await withTimeout {
                _ = try await pool.withSession { session in try session.state() }
            }
            if answered { return true }
            let statistics = pool.statistics
            return statistics.leased > 0 && statistics.leased + statistics.opening >= statistics.maximumSessions
        }
    }

    /// The store reads its audit head within `checkTimeout`.
    static func storeCheck(repository: any KeyRepository) -> @Sendable () async -> Bool {
        { await withTimeout { _ = try await repository.read { try await $0.auditHead() } } }
    }

    /// The current result (at most `cacheLifetime` old).
    func check() async -> Result {
        let now = ContinuousClock.now
        let task = cached.withLock { cached -> Task<Result, Never> in
            if let cached, now - cached.checkedAt < Self.cacheLifetime { return cached.task }
            let task = Task { [checkToken, checkStore] in
                async let token = checkToken()
                async let store = checkStore()
                return Result(tokenReachable: await token, storeReachable: await store)
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
