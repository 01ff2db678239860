import Foundation
import GatewayTransport
import KeyHierarchy
import Logging
import NIOCore
import PKCS11
import PKCS11KeyToken
import PostgresKeyStore
import Prometheus
import ServiceLifecycle
import Synchronization

/// The transport, set once after the handler that reports its connection count is built.
private final class TransportReference: Sendable {
    private let value = Mutex<GatewayTransportServer?>(nil)
    var server: GatewayTransportServer? {
        get { value.withLock { $0 } }
        set { value.withLock { $0 = newValue } }
    }
}

/// The assembled gateway: the HSM session pool, the key store and the key service behind the
/// request handler, the transport's listeners, the health and metrics endpoint, and the
/// server's own maintenance, run as one ServiceLifecycle group.
///
/// ```swift
/// let app = try await GatewayServerApp.open(launch, logger: logger)
/// try await app.run()          // until SIGTERM/SIGINT (or `shutdown()`), then drains and closes
/// ```
///
/// `run` drains gracefully on SIGTERM or SIGINT: listeners stop, open connections get a goaway,
/// requests already received are answered within `limits.drain_timeout_seconds`; then the
/// rewrap jobs stop, and the store and the session pool close.
public final class GatewayServerApp: Sendable {
    /// The configuration the server runs with.
    public let configuration: GatewayConfiguration
    /// The key service, for in-process use (tests, tools).
    public let service: KeyService
    /// The request handler the transport calls.
    public let handler: GatewayHandler
    /// Where every metric of this server goes; `/metrics` serves it.
    public let metricsRegistry: PrometheusCollectorRegistry
    /// The first admin's API token when this start created it (empty database), else nil.
    /// Development mode also writes it to `<data-dir>/admin.token`; production to
    /// `auth.bootstrap_token_file`. Never logged.
    public let bootstrapAdminToken: String?

    let launch: GatewayLaunch
    let module: PKCS11Module
    let ownsModule: Bool
    let pool: SessionPool
    let store: any KeyRepository
    /// Sealed or not, and the unseal's progress (always unsealed in `auto` mode).
    let seal: SealController
    let readiness: ReadinessProbe
    let rewrapJobs: RewrapJobRunner
    let transport: GatewayTransportServer
    let maintenance: MaintenanceService
    let health: HealthAndMetricsServer?
    let serviceGroup: ServiceGroup
    let logger: Logger
    private let closed = Atomic(false)

    /// Opens the token and the store, builds every part, and creates the first admin when the
    /// database has no principal (see `bootstrapAdminToken`). Nothing listens until `run()`.
    ///
    /// - Parameters:
    ///   - module: an already loaded PKCS#11 module (C_Initialize is process-wide: a process that
    ///     runs several servers, like a test, loads it once); nil loads `hsm.module`.
    ///   - handleSignals: drain on SIGTERM and SIGINT (off for servers embedded in tests).
    public static func open(
        _ launch: GatewayLaunch,
        module givenModule: PKCS11Module? = nil,
        handleSignals: Bool = true,
        logger: Logger
    ) async throws(GatewayStartupError) -> GatewayServerApp {
        do {
            try launch.configuration.validate()
        } catch {
            throw GatewayStartupError(.configuration, error.description)
        }
        let opened = try await openDependencies(launch, module: givenModule, logger: logger)
        let registry = PrometheusCollectorRegistry()
        let service: KeyService
        do {
            let commits = registry.makeDurationHistogram(
                descriptor: MetricNameDescriptor(
                    metricName: "hsmgw_audit_commit_duration_seconds", unitName: "",
                    helpText: "Group-commit transactions that make audit records durable, from begin to commit."),
                buckets: GatewayServerApp.commitLatencyBuckets
            )
            let units = registry.makeCounter(
                descriptor: MetricNameDescriptor(
                    metricName: "hsmgw_audit_commit_units_total", unitName: "",
                    helpText: "Write units (each with its audit records) committed."))
            let failures = registry.makeCounter(
                descriptor: MetricNameDescriptor(
                    metricName: "hsmgw_audit_commit_rollbacks_total", unitName: "",
                    helpText: "Group-commit transactions rolled back."))
            service = try KeyService(
                token: opened.token,
                repository: InstrumentedRepository(
                    opened.store, connections: launch.configuration.store.connectionLimit, registry: registry),
                logger: logger.with(label: "hsm-gateway.keys"),
                commitObserver: { observation in
                    commits.record(observation.duration)
                    if observation.committed {
                        units.increment(by: Int64(observation.units))
                    } else {
                        failures.increment()
                    }
                }
            )
        } catch {
            await opened.store.close()
            await opened.pool.shutdown()
            throw GatewayStartupError(.configuration, "key service: \(error)")
        }
        let mode = launch.configuration.hsm.unseal
        logger.notice("HSM PIN: hsm.unseal is \(mode.name)", metadata: ["mode": "\(mode)"])
        let seal: SealController
        let token: String?
        do {
            seal = try SealController(
                mode: mode, pool: opened.pool, token: opened.token,
                logger: logger.with(label: "hsm-gateway.seal"),
                afterUnseal: { await checkAuditAnchor(service, logger: logger) })
            if case .shamir = mode {
                try await requirePrincipalWhileSealed(service)
                token = nil
                logger.notice(
                    "sealed: key operations are refused until enough operators run `hsm-admin operator unseal`",
                    metadata: ["threshold": "\(seal.progress.threshold)", "shares": "\(seal.progress.shareCount)"])
            } else {
                await checkAuditAnchor(service, logger: logger)
                token = try await bootstrap(launch, service: service, logger: logger)
            }
        } catch {
            await opened.store.close()
            await opened.pool.shutdown()
            throw error
        }
        return GatewayServerApp(
            launch: launch,
            module: opened.module,
            ownsModule: opened.ownsModule,
            pool: opened.pool,
            token: opened.token,
            store: opened.store,
            service: service,
            bootstrapAdminToken: token,
            seal: seal,
            registry: registry,
            handleSignals: handleSignals,
            logger: logger
        )
    }

    /// Checks the audit log's anchor in the HSM at start (generating the audit key on a first
    /// start). A log that fails the check does not stop the start: the gateway serves health,
    /// status and `hsm-admin audit verify` so an operator can find the damage, and refuses every
    /// call that writes an audit record until the log is restored.
    static func checkAuditAnchor(_ service: KeyService, logger: Logger) async {
        do {
            switch try await service.checkAuditAnchor() {
            case .empty:
                logger.info("audit log is empty; its first record will be anchored in the HSM")
            case .anchored(let through):
                logger.info("audit log anchored in the HSM", metadata: ["through": "\(through)"])
            case .adopted(let through):
                logger.notice(
                    "audit log predates anchoring: anchored in the HSM now (audit key generated)",
                    metadata: ["through": "\(through)"]
                )
            }
        } catch let error where error.code == .dataLoss {
            logger.critical(
                "audit log failed its integrity check; key operations are refused until it is restored",
                metadata: ["detail": "\(error.underlying ?? error.message)"]
            )
        } catch {
            // The HSM or the store is not answering: the first write checks again.
            logger.error("audit anchor could not be checked at start", metadata: ["error": "\(error.logDescription)"])
        }
    }

    /// A sealed gateway cannot create the first admin (nothing is written before the HSM is
    /// reachable), and without a principal nobody could unseal it.
    static func requirePrincipalWhileSealed(_ service: KeyService) async throws(GatewayStartupError) {
        let empty: Bool
        do {
            empty = try await service.listPrincipals(PageRequest(limit: 1)).items.isEmpty
        } catch {
            throw GatewayStartupError(.store, "cannot read principals: \(error)")
        }
        guard !empty else {
            throw GatewayStartupError(
                .bootstrap,
                "no principal exists, and a sealed gateway cannot create one (nobody could unseal it): start once "
                    + "with hsm.unseal: auto and auth.bootstrap_token_file, then run hsm-admin operator init")
        }
    }

    /// Buckets of the audit-commit latency histogram: a durable commit takes about a millisecond
    /// on a local SSD and tens of milliseconds on a busy or remote database.
    static let commitLatencyBuckets: [Duration] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000].map {
        .milliseconds($0)
    }

    private init(
        launch: GatewayLaunch,
        module: PKCS11Module,
        ownsModule: Bool,
        pool: SessionPool,
        token: PKCS11KeyToken,
        store: any KeyRepository,
        service: KeyService,
        bootstrapAdminToken: String?,
        seal: SealController,
        registry: PrometheusCollectorRegistry,
        handleSignals: Bool,
        logger: Logger
    ) {
        let configuration = launch.configuration
        self.launch = launch
        self.configuration = configuration
        self.module = module
        self.ownsModule = ownsModule
        self.pool = pool
        self.store = store
        self.service = service
        self.bootstrapAdminToken = bootstrapAdminToken
        self.seal = seal
        self.logger = logger
        self.metricsRegistry = registry
        let readiness = ReadinessProbe(pool: pool, token: token, repository: store, service: service)
        self.readiness = readiness
        seal.observeChanges { readiness.invalidate() }
        let lease = BackgroundLease(
            store: store as? PostgresKeyStore, instanceID: configuration.instanceID,
            logger: logger.with(label: "hsm-gateway.lease"))
        let rewrapJobs = RewrapJobRunner(
            service: service, settings: configuration.rewrap, lease: lease,
            logger: logger.with(label: "hsm-gateway.rewrap"))
        self.rewrapJobs = rewrapJobs
        let scheduler = TenantFairScheduler(
            configuration: TenantFairScheduler.Configuration(
                limits: configuration.limits, concurrency: configuration.fairQueue.maximumConcurrent,
                // The loader keeps the minimum within the maximum; a configuration built in
                // code may lower only the maximum.
                minimumConcurrency: min(
                    configuration.fairQueue.minimumConcurrent, configuration.fairQueue.maximumConcurrent))
        )
        let maintenance = MaintenanceService(
            service: service,
            pool: pool,
            readiness: readiness,
            rewrapJobs: rewrapJobs,
            lease: lease,
            admissionLimit: { scheduler.currentLimit },
            registry: registry,
            logger: logger.with(label: "hsm-gateway.maintenance")
        )
        self.maintenance = maintenance
        let transportBox = TransportReference()
        let handler = GatewayHandler(
            service: service,
            options: GatewayHandler.Options(
                serverVersion: launch.serverVersion,
                instanceID: configuration.instanceID,
                storeKind: configuration.store.kind,
                limits: configuration.limits,
                accessCacheTTL: configuration.auth.accessCacheTTL,
                rewrap: configuration.rewrap,
                failedAuthentications: configuration.auth.failedAuthentications,
                wallClock: launch.wallClock
            ),
            rewrapJobs: rewrapJobs,
            admission: { tenant, work in await GatewayHandler.admit(tenant, work, scheduler: scheduler) },
            refusedHelloAudit: RefusedHelloAudit(
                service: service, registry: registry, logger: logger.with(label: "hsm-gateway.requests")),
            seal: seal,
            status: { [maintenance] in
                let result = await readiness.check()
                return ServerStatus(
                    ready: result.ready && !maintenance.isDraining && !seal.isSealed,
                    tokenReachable: result.tokenReachable,
                    storeReachable: result.storeReachable,
                    openConnections: transportBox.server?.openConnections ?? 0
                )
            },
            logger: logger.with(label: "hsm-gateway.requests")
        )
        self.handler = handler
        let transport = GatewayTransportServer(
            configuration: configuration.transportConfiguration,
            handler: handler,
            metricsFactory: PrometheusMetricsFactory(registry: registry),
            logger: logger.with(label: "hsm-gateway.transport")
        )
        self.transport = transport
        transportBox.server = transport
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        if case .tcp(let host, let port) = configuration.metricsListen {
            let health = HealthAndMetricsServer(
                host: host,
                port: port,
                registry: registry,
                logger: logger.with(label: "hsm-gateway.health")
            ) { [maintenance] in
                if seal.isSealed {
                    // The pool refuses every login on purpose: say so, not "the HSM refused the PIN".
                    let progress = seal.progress
                    return [
                        HealthAndMetricsServer.ReadinessCheck(
                            name: "seal", isReady: false,
                            detail: "sealed: \(progress.submitted) of \(progress.threshold) shares given; "
                                + "run hsm-admin operator unseal")
                    ]
                }
                let result = await readiness.check()
                var checks = [
                    HealthAndMetricsServer.ReadinessCheck(
                        name: "hsm", isReady: result.tokenReady, detail: result.tokenDetail),
                    HealthAndMetricsServer.ReadinessCheck(
                        name: "store", isReady: result.storeReachable,
                        detail: result.storeReachable ? nil : "the key store does not answer"),
                ]
                if result.auditIntegrityFailure != nil {
                    // The detail stays in the log: /readyz says what is wrong and what to run.
                    checks.append(
                        .init(
                            name: "audit", isReady: false,
                            detail:
                                "the audit log failed its integrity check against the HSM; run hsm-admin audit verify"
                        ))
                }
                if maintenance.isDraining {
                    checks.append(.init(name: "shutdown", isReady: false, detail: "draining"))
                }
                return checks
            }
            self.health = health
            // Listed first, so it stops last: /readyz says "draining" while connections drain.
            services.append(.init(service: health))
        } else {
            self.health = nil
        }
        if let postgres = store as? PostgresKeyStore {
            // Other instances' changes reach this one's caches (SQLite is a single node).
            services.append(
                .init(
                    service: ChangePropagationService(
                        store: postgres, keys: service.cache, access: handler.accessCache, rewrapJobs: rewrapJobs,
                        registry: registry,
                        logger: logger.with(label: "hsm-gateway.changes"))))
        }
        services.append(.init(service: maintenance))
        services.append(.init(service: transport))
        var groupConfiguration = ServiceGroupConfiguration(
            services: services,
            gracefulShutdownSignals: handleSignals ? [.sigterm, .sigint] : [],
            logger: logger.with(label: "hsm-gateway.lifecycle")
        )
        // The transport's own drain bound, plus time for the others to stop.
        groupConfiguration.maximumGracefulShutdownDuration = configuration.limits.drainTimeout + .seconds(15)
        self.serviceGroup = ServiceGroup(configuration: groupConfiguration)
    }

    /// Serves until SIGTERM/SIGINT (when `handleSignals`) or `shutdown()`, drains, then closes
    /// the rewrap jobs, the store and the session pool (and finalizes the module it loaded).
    public func run() async throws {
        do {
            try await serviceGroup.run()
        } catch {
            await close()
            throw error
        }
        await close()
    }

    /// Closes what `open` opened, for an app that will not `run` (run closes by itself).
    /// Idempotent.
    public func close() async {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        await rewrapJobs.shutdown()
        await handler.flushRefusedHelloAudit()
        await store.close()
        await pool.shutdown()
        if ownsModule { try? module.finalize() }
        logger.info("stopped")
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    public func shutdown() async {
        await serviceGroup.triggerGracefulShutdown()
    }

    /// The gateway's listening addresses once `run()` has bound them (port 0 resolved).
    public func listeningAddresses() async throws -> [SocketAddress] {
        try await transport.listeningAddresses()
    }

    /// The health and metrics endpoint's address once `run()` has bound it; nil when off.
    public func metricsAddress() async throws -> SocketAddress? {
        guard let health else { return nil }
        return try await health.listeningAddress()
    }
}
