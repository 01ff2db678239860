import KeyHierarchy
import Logging
import PostgresKeyStore
import Prometheus
import ServiceLifecycle

/// Keeps this instance's caches true to changes other gateway instances make on the same
/// PostgreSQL database: a tenant created or disabled, a master key rotated or its state changed,
/// a principal or its roles changed, an API token revoked.
///
/// Writes notify `hsmgw_changes` in their own transaction (migration 4's triggers); this service
/// listens on a connection of its own (`PostgresKeyStore.followChanges`) and drops the named
/// entries: the tenant's key cache entries, or the access cache entries of the principal or
/// token. When notifications may have been missed (the listening connection just opened, was
/// lost, or the server is down) it drops everything, and it drops everything every
/// `fullRecheckInterval` as a backstop against anything the triggers do not cover. A rewrap job
/// started on any instance is handed to the local `RewrapJobRunner`, which runs it only while
/// this instance holds the background lease. SQLite is a single node: nothing runs there.
final class ChangePropagationService: Service, Sendable {
    /// How often every cache is dropped whatever was notified: the bound on how long an entry can
    /// outlive a change the notifications somehow missed. Each drop costs one read per tenant and
    /// per connected principal afterwards, which is nothing at this interval.
    static let fullRecheckInterval: Duration = .seconds(30)

    let store: PostgresKeyStore
    let keys: TenantKeyCache
    let access: AccessCache
    let rewrapJobs: RewrapJobRunner
    let logger: Logger
    private let received: [String: Counter]

    init(
        store: PostgresKeyStore,
        keys: TenantKeyCache,
        access: AccessCache,
        rewrapJobs: RewrapJobRunner,
        registry: PrometheusCollectorRegistry,
        logger: Logger
    ) {
        self.store = store
        self.keys = keys
        self.access = access
        self.rewrapJobs = rewrapJobs
        self.logger = logger
        let kinds = ["tenant", "principal", "token", "job", "everything"]
        self.received = Dictionary(
            uniqueKeysWithValues: kinds.map { kind in
                (
                    kind,
                    registry.makeCounter(
                        descriptor: MetricNameDescriptor(
                            metricName: "hsmgw_cache_invalidations_total", unitName: "",
                            helpText:
                                "Cache invalidations applied, by what they named: a tenant, principal or token changed "
                                + "(notified by any instance), a rewrap job started, or everything (listener "
                                + "reconnected, periodic re-check)."
                        ),
                        labels: [("kind", kind)])
                )
            })
    }

    func run() async throws {
        // Listed before the transport, so it stops after the transport has drained: requests
        // still being answered keep seeing other instances' changes.
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { [self] in
                    await store.followChanges { [self] change in apply(change) }
                }
                group.addTask { [self] in
                    while (try? await Task.sleep(for: Self.fullRecheckInterval)) != nil {
                        apply(.everything)
                        // A job start the lease holder did not hear of is found here.
                        await rewrapJobs.resumeRunningJobs()
                    }
                }
                await group.next()
                group.cancelAll()
            }
        }
    }

    /// Drops what `change` names.
    func apply(_ change: StoreChange) {
        switch change {
        case .tenant(let tenant):
            keys.invalidate(tenant)
        case .principal(let name):
            access.invalidate(principal: name)
        case .apiToken(let id):
            access.invalidate(tokenID: id)
        case .rewrapJob(let tenant):
            // Runs it when this instance holds the background lease; a no-op elsewhere.
            rewrapJobs.run(tenant)
        case .everything:
            keys.invalidateAll()
            access.invalidateAll()
        }
        received[change.kind]?.increment()
    }
}
