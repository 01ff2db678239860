import KeyHierarchy
import Logging
import PKCS11
import Prometheus
import ServiceLifecycle
import Synchronization

/// The server's own periodic work, as one service: samples the gauges the transport does not
/// own (HSM session pool, readiness, rewrap jobs), carries out scheduled master-key destructions
/// when due, and marks the server as draining when a graceful shutdown begins (so `/readyz`
/// turns false at once). It also keeps the background lease (`BackgroundLease`): rewrap jobs and
/// scheduled destruction run only while this instance holds it, start when it is taken and stop
/// when it is lost; at shutdown the jobs stop first and the lease is then given up.
final class MaintenanceService: Service, Sendable {
    /// How often gauges are refreshed: Prometheus scrapes every 15 s or more, so one second is
    /// fresh enough and costs nothing.
    static let samplingInterval: Duration = .seconds(1)
    /// How often due master-key destructions are looked for: waiting periods are days long, so
    /// a few minutes late is nothing, and each look is one indexed query.
    static let destructionInterval: Duration = .seconds(300)

    let service: KeyService
    let pool: SessionPool
    let readiness: ReadinessProbe
    let rewrapJobs: RewrapJobRunner
    let lease: BackgroundLease
    let admissionLimit: @Sendable () -> Int
    let logger: Logger
    let draining: Atomic<Bool>
    private let gauges: Gauges

    /// The gauges this service sets, registered once.
    struct Gauges: Sendable {
        let sessionsMaximum: Gauge
        let sessionsLeased: Gauge
        let sessionsIdle: Gauge
        let sessionsOpening: Gauge
        let sessionWaiters: Gauge
        let sessionsDiscarded: Gauge
        let sessionOpenFailures: Gauge
        let tokenReachable: Gauge
        let loginRefused: Gauge
        let sealed: Gauge
        let storeReachable: Gauge
        let auditIntegrity: Gauge
        let ready: Gauge
        let rewrapJobsRunning: Gauge
        let admissionLimit: Gauge
        let leaseHeld: Gauge

        init(registry: PrometheusCollectorRegistry) {
            sessionsMaximum = registry.gauge("hsmgw_hsm_sessions_max", "Size of the PKCS#11 session pool.")
            sessionsLeased = registry.gauge("hsmgw_hsm_sessions_in_use", "PKCS#11 sessions leased to a request now.")
            sessionsIdle = registry.gauge("hsmgw_hsm_sessions_idle", "Open PKCS#11 sessions not in use.")
            sessionsOpening = registry.gauge(
                "hsmgw_hsm_sessions_opening", "PKCS#11 sessions being opened and logged in.")
            sessionWaiters = registry.gauge("hsmgw_hsm_session_waiters", "Requests waiting for a free PKCS#11 session.")
            sessionsDiscarded = registry.gauge(
                "hsmgw_hsm_sessions_discarded", "PKCS#11 sessions discarded after failing, since start.")
            sessionOpenFailures = registry.gauge(
                "hsmgw_hsm_session_open_failures", "Failed PKCS#11 session opens or logins, since start.")
            tokenReachable = registry.gauge("hsmgw_hsm_token_reachable", "1 when the HSM token answers, else 0.")
            loginRefused = registry.gauge(
                "hsmgw_hsm_login_refused",
                "1 when the HSM refused the user PIN and no login is attempted until an operator acts, else 0.")
            sealed = registry.gauge(
                "hsmgw_hsm_sealed",
                "1 while the gateway is sealed (hsm.unseal: shamir, no PIN until operators unseal it), else 0.")
            storeReachable = registry.gauge("hsmgw_store_reachable", "1 when the key store answers, else 0.")
            auditIntegrity = registry.gauge(
                "hsmgw_audit_integrity_ok",
                "1 while the audit log's head verifies against its checkpoint in the HSM, 0 once it failed.")
            ready = registry.gauge("hsmgw_ready", "1 when the gateway is ready to serve, else 0.")
            rewrapJobsRunning = registry.gauge("hsmgw_rewrap_jobs_running", "Rewrap jobs this instance runs now.")
            admissionLimit = registry.gauge(
                "hsmgw_admission_limit", "Tenant-scoped requests the fair queue lets run at once now (learnt).")
            leaseHeld = registry.gauge(
                "hsmgw_background_lease_held",
                "1 while this instance holds the background lease (it runs rewrap jobs and scheduled destruction).")
        }
    }

    init(
        service: KeyService,
        pool: SessionPool,
        readiness: ReadinessProbe,
        rewrapJobs: RewrapJobRunner,
        lease: BackgroundLease,
        admissionLimit: @escaping @Sendable () -> Int,
        registry: PrometheusCollectorRegistry,
        logger: Logger
    ) {
        self.admissionLimit = admissionLimit
        self.service = service
        self.pool = pool
        self.readiness = readiness
        self.rewrapJobs = rewrapJobs
        self.lease = lease
        self.logger = logger
        self.draining = Atomic(false)
        self.gauges = Gauges(registry: registry)
    }

    var isDraining: Bool { draining.load(ordering: .relaxed) }

    func run() async throws {
        await withGracefulShutdownHandler {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { [self] in
                    await lease.run(
                        acquired: { [self] in
                            await rewrapJobs.resumeRunningJobs()
                            await destroyDueMasterKeys()
                        },
                        lost: { [self] in await rewrapJobs.stopAll() })
                }
                var sinceDestruction = Self.destructionInterval
                while !Task.isCancelled && !isDraining {
                    await sample()
                    if sinceDestruction >= Self.destructionInterval {
                        sinceDestruction = .zero
                        await destroyDueMasterKeys()
                    }
                    do {
                        try await Task.sleep(for: Self.samplingInterval)
                    } catch {
                        break
                    }
                    sinceDestruction += Self.samplingInterval
                }
                // Draining: jobs stop before the lease is given up, so nobody takes it while they run.
                await rewrapJobs.shutdown()
                group.cancelAll()
            }
        } onGracefulShutdown: { [self] in
            draining.store(true, ordering: .relaxed)
            gauges.ready.set(Int64(0))
        }
        await rewrapJobs.shutdown()
        await lease.release()
    }

    func sample() async {
        let statistics = pool.statistics
        gauges.sessionsMaximum.set(Int64(statistics.maximumSessions))
        gauges.sessionsLeased.set(Int64(statistics.leased))
        gauges.sessionsIdle.set(Int64(statistics.idle))
        gauges.sessionsOpening.set(Int64(statistics.opening))
        gauges.sessionWaiters.set(Int64(statistics.waiting))
        gauges.sessionsDiscarded.set(Int64(statistics.discarded))
        gauges.sessionOpenFailures.set(Int64(statistics.openFailures))
        gauges.loginRefused.set(Int64(statistics.loginRefused ? 1 : 0))
        gauges.sealed.set(Int64(statistics.sealed ? 1 : 0))
        let result = await readiness.check()
        gauges.tokenReachable.set(Int64(result.tokenReachable ? 1 : 0))
        gauges.storeReachable.set(Int64(result.storeReachable ? 1 : 0))
        gauges.auditIntegrity.set(Int64(result.auditIntegrityFailure == nil ? 1 : 0))
        gauges.ready.set(Int64(result.ready && !isDraining ? 1 : 0))
        gauges.rewrapJobsRunning.set(Int64(rewrapJobs.runningCount))
        gauges.admissionLimit.set(Int64(admissionLimit()))
        gauges.leaseHeld.set(Int64(lease.isHeld ? 1 : 0))
    }

    /// Carries out due destructions when this instance holds the background lease (one instance
    /// at a time looks; each destruction is a conditional state change anyway).
    func destroyDueMasterKeys() async {
        guard lease.isHeld else { return }
        do {
            let destroyed = try await service.destroyDueMasterKeys(request: .system("scheduled-destruction"))
            for version in destroyed {
                logger.notice(
                    "master key version destroyed as scheduled",
                    metadata: ["tenant": "\(version.tenant)", "version": "\(version.version)"]
                )
            }
        } catch {
            logger.warning("scheduled master-key destruction failed", metadata: ["error": "\(error.logDescription)"])
        }
    }
}

extension PrometheusCollectorRegistry {
    /// A gauge under its full name, e.g. `hsmgw_hsm_sessions_in_use`.
    func gauge(_ name: String, _ help: String) -> Gauge {
        makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help))
    }
}

/// Why the gateway could not start. `exitCode` follows sysexits(3).
public struct GatewayStartupError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure; an open set.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case configuration
            case token
            case login
            case store
            case bootstrap
            case transport
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// A setting is invalid or a file it names is unusable (EX_CONFIG, 78).
        public static let configuration = Code(.configuration)
        /// The PKCS#11 module or token cannot be used (EX_UNAVAILABLE, 69).
        public static let token = Code(.token)
        /// The token refused the user PIN (EX_NOPERM, 77). One login was attempted; starting again
        /// with the same PIN only spends the token's failed-login allowance, so a supervisor should
        /// not restart on this code (systemd: `RestartPreventExitStatus=77`).
        public static let login = Code(.login)
        /// The key store cannot be opened (EX_UNAVAILABLE, 69).
        public static let store = Code(.store)
        /// The first admin could not be created or its token not written (EX_SOFTWARE, 70).
        public static let bootstrap = Code(.bootstrap)
        /// A listener could not start (EX_UNAVAILABLE, 69).
        public static let transport = Code(.transport)

        /// The code's name.
        public var description: String { value.rawValue }
    }

    /// What kind of failure.
    public let code: Code
    /// What failed and why, naming the setting; never a PIN, password or token.
    public let message: String

    /// An error with a code and a message.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The process exit status for this failure.
    public var exitCode: Int32 {
        switch code {
        case .configuration: return 78
        case .bootstrap: return 70
        case .login: return 77
        default: return 69
        }
    }

    /// The code and the message.
    public var description: String { "\(code): \(message)" }
}
