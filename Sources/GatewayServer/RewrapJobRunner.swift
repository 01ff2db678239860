import KeyHierarchy
import Logging
import Synchronization

/// Runs tenants' rewrap jobs in the background, one task per tenant, owned by the server: started
/// by `StartRewrapJob` (and resumed at start-up), cancelled at shutdown. A cancelled job loses
/// nothing: the key service resumes it from its stored cursor.
///
/// Only the holder of the background lease runs jobs (with several instances on PostgreSQL, one
/// of them; on SQLite, this one): elsewhere `run` does nothing, and the holder hears of the job
/// through the change notifications (or its periodic look). A job runs one batch at a time and
/// checks the lease before each, so a holder that lost its lease stops after the batch in
/// flight; `stopAll` cancels the tasks when the lease is lost.
final class RewrapJobRunner: Sendable {
    let service: KeyService
    let throttle: RewrapThrottle
    let lease: BackgroundLease
    let logger: Logger
    private struct State {
        var tasks: [TenantID: Task<Void, Never>] = [:]
        var stopped = false
    }
    private let state = Mutex(State())

    init(service: KeyService, settings: RewrapSettings, lease: BackgroundLease, logger: Logger) {
        self.service = service
        self.lease = lease
        self.throttle = RewrapThrottle(batchSize: settings.batchSize, keysPerSecond: settings.keysPerSecond)
        self.logger = logger
    }

    /// Starts running the tenant's job unless a task already runs it or this instance does not
    /// hold the background lease.
    func run(_ tenant: TenantID) {
        guard lease.isHeld else { return }
        state.withLock { state in
            guard !state.stopped, state.tasks[tenant] == nil else { return }
            state.tasks[tenant] = Task { [self] in
                await self.runToCompletion(tenant)
                self.state.withLock { _ = $0.tasks.removeValue(forKey: tenant) }
            }
        }
    }

    private func runToCompletion(_ tenant: TenantID) async {
        logger.info("rewrap job running", metadata: ["tenant": "\(tenant)", "lease-token": "\(lease.token ?? 0)"])
        do {
            // One batch per call, so the lease is checked between batches.
            while true {
                guard lease.isHeld else {
                    logger.notice(
                        "rewrap job paused here: the background lease moved", metadata: ["tenant": "\(tenant)"])
                    return
                }
                let job = try await service.runRewrapJob(
                    tenant, throttle: throttle, maximumBatches: 1, request: .system("rewrap-job-\(tenant)"))
                guard job.state == .running else {
                    logger.info(
                        "rewrap job finished",
                        metadata: ["tenant": "\(tenant)", "state": "\(job.state.rawValue)", "moved": "\(job.moved)"]
                    )
                    return
                }
            }
        } catch {
            if Task.isCancelled {
                logger.info(
                    "rewrap job paused (shutdown); it resumes at the next start", metadata: ["tenant": "\(tenant)"])
            } else {
                logger.error(
                    "rewrap job failed", metadata: ["tenant": "\(tenant)", "error": "\(error.logDescription)"])
            }
        }
    }

    /// Resumes every job left running by an earlier process (or another instance that stopped),
    /// when this instance holds the background lease.
    func resumeRunningJobs() async {
        guard lease.isHeld else { return }
        var after: String?
        do {
            repeat {
                let page = try await service.listTenants(PageRequest(after: after, limit: PageRequest.maximumPageSize))
                for tenant in page.items where tenant.state != .shredded {
                    if let job = try await service.rewrapJob(tenant.id), job.state == .running { run(tenant.id) }
                }
                after = page.nextPage
            } while after != nil && !Task.isCancelled
        } catch {
            logger.warning("could not look for rewrap jobs to resume", metadata: ["error": "\(error.logDescription)"])
        }
    }

    /// Jobs running now.
    var runningCount: Int { state.withLock { $0.tasks.count } }

    /// Stops the tenant's task (before a shred) and waits for it.
    func stop(_ tenant: TenantID) async {
        let task = state.withLock { $0.tasks.removeValue(forKey: tenant) }
        task?.cancel()
        await task?.value
    }

    /// Cancels every task and waits for them (the background lease was lost); jobs start again
    /// when it is held again.
    func stopAll() async {
        let tasks = state.withLock { state in
            defer { state.tasks.removeAll() }
            return Array(state.tasks.values)
        }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
    }

    /// Cancels every task and waits for them; no job starts afterwards.
    func shutdown() async {
        let tasks = state.withLock { state in
            state.stopped = true
            defer { state.tasks.removeAll() }
            return Array(state.tasks.values)
        }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
    }
}
