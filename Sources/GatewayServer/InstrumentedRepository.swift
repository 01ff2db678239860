import KeyHierarchy
import Prometheus
import Synchronization

/// The key repository with its use counted: each transaction or read holds one database
/// connection (a PostgreSQL pool connection, or SQLite's writer or one of its readers) for its
/// whole length, so the operations in flight are the connections in use. Feeds the
/// `hsmgw_store_connections_in_use` gauge (the stores' own pools expose no statistics).
final class InstrumentedRepository: KeyRepository {
    let base: any KeyRepository
    private let inFlight = Atomic<Int>(0)
    private let inUse: Gauge

    /// - Parameters:
    ///   - connections: the store's connection limit, published as `hsmgw_store_connections_max`.
    init(_ base: any KeyRepository, connections: Int, registry: PrometheusCollectorRegistry) {
        self.base = base
        inUse = registry.gauge(
            "hsmgw_store_connections_in_use", "Store transactions and reads running now (each holds a connection).")
        registry.gauge("hsmgw_store_connections_max", "Connections the store may open.").set(Int64(connections))
    }

    func transaction<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        enter()
        defer { leave() }
        return try await base.transaction(body)
    }

    func read<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        enter()
        defer { leave() }
        return try await base.read(body)
    }

    func close() async { await base.close() }

    var concurrentWriteTransactions: Bool { base.concurrentWriteTransactions }

    var statementsRun: Int? { base.statementsRun }

    private func enter() {
        inUse.set(Int64(inFlight.add(1, ordering: .relaxed).newValue))
    }

    private func leave() {
        inUse.set(Int64(inFlight.subtract(1, ordering: .relaxed).newValue))
    }
}
