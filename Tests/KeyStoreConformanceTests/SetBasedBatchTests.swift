import KeyHierarchy
import Synchronization
import Testing

/// A batch of concurrent GenerateDataKey calls costs a fixed number of statements, however many
/// calls it carries (issue 13): the tenant lock, the version read, the invocation count and the
/// insert are folded through `BatchScope`.
@Suite("Set-based batches")
struct SetBasedBatchTests {
    /// The statements of one batch of GenerateDataKey calls of one tenant: BEGIN, the tenant lock,
    /// the version read, the invocation count, the multi-row insert, the audit head lock, the
    /// audit append (records and head in one statement on PostgreSQL, two or three on SQLite),
    /// COMMIT. Before folding, a batch of N calls took 4N + 5.
    static let statementsPerBatch = 10

    struct Batch: Sendable {
        var units: Int
        var statements: Int
    }

    @Test(arguments: StoreKind.allCases)
    func generateBatchCostsAFixedNumberOfStatements(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "setbased")
        defer { Task { await harness.close() } }
        let tenant = tenantID("setbased")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let store = harness.store
        let counted = try #require(store.statementsRun)
        let last = Mutex(counted)
        let batches = Mutex<[Batch]>([])
        // The observer runs after each transaction of the committer, before the next begins (one
        // write batch at a time); GenerateDataKey reads nothing outside it once its caches are warm.
        let service = try KeyService(token: harness.token, repository: store) { observation in
            let now = store.statementsRun ?? 0
            let statements = last.withLock { last in
                defer { last = now }
                return now - last
            }
            batches.withLock { $0.append(Batch(units: observation.units, statements: statements)) }
        }
        // Warm the caches (the primary version, the master key's reference).
        _ = try await service.generateDataKey(tenant, includePlaintext: false, request: app)
        batches.withLock { $0 = [] }
        last.withLock { $0 = store.statementsRun ?? 0 }

        let callers = 64
        let ids = try await withThrowingTaskGroup(of: DataKeyID.self) { group in
            for _ in 0..<callers {
                group.addTask { try await service.generateDataKey(tenant, includePlaintext: false, request: app).id }
            }
            return try await group.reduce(into: [DataKeyID]()) { $0.append($1) }
        }
        #expect(Set(ids).count == callers)

        let seen = batches.withLock { $0 }
        #expect(seen.map(\.units).reduce(0, +) == callers)
        // Concurrent callers do share batches (otherwise this test would show nothing).
        let largest = try #require(seen.max { $0.units < $1.units })
        #expect(largest.units >= 4, "batches: \(seen.map(\.units))")
        for batch in seen {
            #expect(
                batch.statements <= Self.statementsPerBatch,
                "a batch of \(batch.units) calls took \(batch.statements) statements"
            )
        }
        // Every key stored, every wrap counted, every call audited.
        let stored = try await store.read { try await $0.dataKeys(tenant, ids: ids) }
        #expect(stored.count == callers)
        let version = try #require(try await store.read { try await $0.masterKeyVersion(tenant, 1) })
        #expect(version.invocationsReserved == Int64(callers + 1))
        let audited = try await harness.auditRecords().filter { $0.event.operation == .generateDataKey }
        #expect(audited.count == callers + 1)
    }
}
