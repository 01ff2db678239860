import Foundation
import KeyHierarchy
import PostgresTestSupport
import Testing

@testable import PostgresKeyStore

/// What only the PostgreSQL store has to show: migrations under concurrent start-up, index use,
/// SQLSTATE mapping, the append-only triggers, connection failures and transaction visibility
/// across connections. Runs against the process's throwaway cluster.
@Suite("PostgresStore")
struct PostgresStoreTests {
    let cluster: PostgresTestCluster

    init() throws {
        cluster = try PostgresTestCluster.shared()
    }

    private func configuration(_ database: String) -> PostgresKeyStoreConfiguration {
        PostgresKeyStoreConfiguration(
            port: cluster.port,
            username: cluster.username,
            password: cluster.password,
            database: database
        )
    }

    private func open(_ database: String) async throws -> PostgresKeyStore {
        try await PostgresKeyStore.open(configuration(database))
    }

    // MARK: Migrations

    @Test func migrationsAreAppliedAndRecordedOnce() async throws {
        let database = try await cluster.createDatabase("migrations_once")
        let first = try await open(database)
        #expect(try await first.schemaVersion() == Migrations.latestVersion)
        await first.close()
        let second = try await open(database)
        #expect(try await second.schemaVersion() == Migrations.latestVersion)
        await second.close()

        let recorded = try await cluster.psql(database, "SELECT version, name FROM schema_migrations ORDER BY version")
        let expected = Migrations.all.map { "\($0.version)|\($0.name)" }.joined(separator: "\n")
        #expect(recorded.trimmingCharacters(in: .whitespacesAndNewlines) == expected)
        let heads = try await cluster.psql(database, "SELECT count(*) FROM audit_head")
        #expect(heads.trimmingCharacters(in: .whitespacesAndNewlines) == "1")
    }

    @Test func concurrentOpensApplyMigrationsOnce() async throws {
        let database = try await cluster.createDatabase("migrations_concurrent")
        let config = configuration(database)
        let versions = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<4 {
                group.addTask {
                    let store = try await PostgresKeyStore.open(config)
                    let version = try await store.schemaVersion()
                    await store.close()
                    return version
                }
            }
            var versions: [Int] = []
            for try await version in group { versions.append(version) }
            return versions
        }
        #expect(versions == Array(repeating: Migrations.latestVersion, count: 4))
        let count = try await cluster.psql(database, "SELECT count(*) FROM schema_migrations")
        #expect(count.trimmingCharacters(in: .whitespacesAndNewlines) == "\(Migrations.all.count)")
    }

    @Test func aDatabaseFromANewerGatewayIsRefused() async throws {
        let database = try await cluster.createDatabase("migrations_newer")
        let store = try await open(database)
        try await store.executeUnsafeSQL(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'future', 0)"
        )
        await store.close()
        await #expect(throws: StorageError.self) { try await open(database) }
    }

    @Test func aServerThatCanLoseCommitsIsRefused() async throws {
        let database = try await cluster.createDatabase("durability")
        _ = try await cluster.psql(database, "ALTER DATABASE \(database) SET synchronous_commit = off")
        let error = await #expect(throws: StorageError.self) { try await open(database) }
        #expect(error?.detail.contains("synchronous_commit=off") == true)
        _ = try await cluster.psql(database, "ALTER DATABASE \(database) SET synchronous_commit = local")
        let store = try await open(database)
        await store.close()
    }

    // MARK: Indexes

    @Test func everyDataKeyLookupUsesAnIndex() async throws {
        let database = try await cluster.createDatabase("explain")
        let store = try await open(database)
        defer { Task { await store.close() } }
        let tenants = (0..<4).map { TenantID(trusted: "tenant-\($0)") }
        try await store.transaction { transaction in
            for tenant in tenants {
                try await transaction.insertTenant(
                    TenantRecord(id: tenant, state: .enabled, primaryVersion: 2, createdAt: now, updatedAt: now)
                )
                for version in 1...2 {
                    try await transaction.insertMasterKeyVersion(
                        MasterKeyVersionRecord(
                            tenant: tenant,
                            version: version,
                            state: .active,
                            tokenKeyID: TokenKeyID.random(),
                            createdAt: now,
                            updatedAt: now
                        )
                    )
                }
            }
        }
        // 20,000 keys in batches of 1,000 through the port, spread over tenants, versions, states.
        var sampleID = DataKeyID.random()
        for batch in 0..<20 {
            let keys = (0..<1000).map { index -> DataKeyRecord in
                let state: DataKeyState = index % 10 == 0 ? .disabled : (index % 25 == 0 ? .destroyed : .enabled)
                return DataKeyRecord(
                    tenant: tenants[(batch + index) % tenants.count],
                    id: .random(),
                    version: index % 3 == 0 ? 1 : 2,
                    state: state,
                    wrapped: state == .destroyed ? nil : [UInt8](repeating: 7, count: 60),
                    contextHash: [UInt8](repeating: 1, count: 32),
                    createdAt: now,
                    updatedAt: now
                )
            }
            sampleID = keys[500].id
            try await store.transaction { try await $0.insertDataKeys(keys) }
        }
        _ = try await cluster.psql(database, "ANALYZE data_keys")
        #expect(try await cluster.psql(database, "SELECT count(*) FROM data_keys").hasPrefix("20000"))

        let tenant = tenants[1].rawValue
        let after = UUID(uuidString: "80000000-0000-4000-8000-000000000000")!
        let id = sampleID.uuid
        // Each statement exactly as the store sends it, with its binds written as SQL literals.
        let statements: [(name: String, sql: String, binds: String)] = [
            ("by id", SQL.dataKeyByID(tenant, id).sql, "'\(tenant)', '\(id)'"),
            ("by ids", SQL.dataKeysByIDs(tenant, [id, UUID()]).sql, "'\(tenant)', ARRAY['\(id)'::uuid]"),
            ("list by tenant", SQL.dataKeysByTenant(tenant, limit: 100).sql, "'\(tenant)', 100"),
            (
                "list by tenant after", SQL.dataKeysByTenant(tenant, after: after, limit: 100).sql,
                "'\(tenant)', '\(after)', 100"
            ),
            ("list by state", SQL.dataKeysByState(tenant, "disabled", limit: 100).sql, "'\(tenant)', 'disabled', 100"),
            (
                "list by state after", SQL.dataKeysByState(tenant, "disabled", after: after, limit: 100).sql,
                "'\(tenant)', 'disabled', '\(after)', 100"
            ),
            ("not under version", SQL.dataKeysNotUnderVersion(tenant, 2, limit: 100).sql, "'\(tenant)', 2, 100"),
            (
                "not under version after", SQL.dataKeysNotUnderVersion(tenant, 2, after: after, limit: 100).sql,
                "'\(tenant)', 2, '\(after)', 100"
            ),
            ("count by version", SQL.countLiveDataKeys(tenant, version: 1).sql, "'\(tenant)', 1"),
            ("count", SQL.countLiveDataKeys(tenant).sql, "'\(tenant)'"),
        ]
        for statement in statements {
            // The generic plan is the one a prepared statement with these binds can get.
            let plan = try await cluster.psql(
                database,
                """
                SET plan_cache_mode = force_generic_plan;
                PREPARE q AS \(statement.sql);
                EXPLAIN (COSTS OFF) EXECUTE q(\(statement.binds));
                """
            )
            #expect(!plan.contains("Seq Scan"), "\(statement.name) scans the table:\n\(plan)")
            #expect(plan.contains("Index"), "\(statement.name) uses no index:\n\(plan)")
        }
    }

    // MARK: Errors

    @Test func constraintViolationsMapToTheirKindsWithoutValues() async throws {
        let store = try await open(try await cluster.createDatabase("violations"))
        defer { Task { await store.close() } }
        let secretTenant = TenantID(trusted: "secret-tenant-name")
        let tenant = TenantRecord(id: secretTenant, state: .enabled, primaryVersion: 1, createdAt: now, updatedAt: now)
        try await store.transaction { try await $0.insertTenant(tenant) }

        let duplicate = await #expect(throws: StorageError.self) {
            try await store.transaction { try await $0.insertTenant(tenant) }
        }
        #expect(duplicate?.kind == .uniqueViolation)
        #expect(duplicate?.detail.contains("23505") == true)
        #expect(duplicate?.detail.contains("tenants_pkey") == true)
        #expect(duplicate?.detail.contains("secret-tenant-name") == false)

        let wrapped: [UInt8] = Array("WRAPPED-KEY-BYTES".utf8)
        let orphan = DataKeyRecord(
            tenant: secretTenant,
            id: .random(),
            version: 1,
            state: .enabled,
            wrapped: wrapped,
            contextHash: [UInt8](repeating: 0xAB, count: 32),
            createdAt: now,
            updatedAt: now
        )
        let missingVersion = await #expect(throws: StorageError.self) {
            try await store.transaction { try await $0.insertDataKeys([orphan]) }
        }
        #expect(missingVersion?.kind == .foreignKeyViolation)
        #expect(missingVersion?.detail.contains("23503") == true)
        for leaked in ["secret-tenant-name", orphan.id.description, "abab", "WRAPPED"] {
            #expect(missingVersion?.detail.contains(leaked) == false, "detail leaks \(leaked)")
            #expect(missingVersion?.description.contains(leaked) == false, "description leaks \(leaked)")
        }

        let checkViolation = await #expect(throws: StorageError.self) {
            try await store.executeUnsafeSQL("UPDATE tenants SET state = 'bogus'")
        }
        #expect(checkViolation?.kind == .other)
    }

    @Test func errorKindsForSQLStates() {
        #expect(PostgresErrorMapping.serverKind("23505") == .uniqueViolation)
        #expect(PostgresErrorMapping.serverKind("23503") == .foreignKeyViolation)
        #expect(PostgresErrorMapping.serverKind("40001") == .conflict)
        #expect(PostgresErrorMapping.serverKind("40P01") == .conflict)
        #expect(PostgresErrorMapping.serverKind("55P03") == .conflict)
        #expect(PostgresErrorMapping.serverKind("08006") == .unavailable)
        #expect(PostgresErrorMapping.serverKind("57P01") == .unavailable)
        #expect(PostgresErrorMapping.serverKind("XX001") == .corrupt)
        #expect(PostgresErrorMapping.serverKind("42P01") == .other)
    }

    @Test func aLockTimeoutIsAConflict() async throws {
        let database = try await cluster.createDatabase("lock_timeout")
        let store = try await open(database)
        defer { Task { await store.close() } }
        let tenant = TenantRecord(
            id: TenantID(trusted: "acme"),
            state: .enabled,
            primaryVersion: 1,
            createdAt: now,
            updatedAt: now
        )
        try await store.transaction { try await $0.insertTenant(tenant) }
        try await store.executeUnsafeSQL("ALTER DATABASE \(database) SET lock_timeout = '200ms'")
        let other = try await open(database)  // new connections pick up the setting
        defer { Task { await other.close() } }
        try await store.transaction { transaction in
            _ = try await transaction.tenant(tenant.id, forUpdate: true)
            let error = await #expect(throws: StorageError.self) {
                try await other.transaction { try await $0.tenant(tenant.id, forUpdate: true) }
            }
            #expect(error?.kind == .conflict)
        }
    }

    // MARK: Audit log

    @Test func theAuditLogIsAppendOnly() async throws {
        let database = try await cluster.createDatabase("append_only")
        let store = try await open(database)
        defer { Task { await store.close() } }
        try await store.transaction { transaction in
            let head = try await transaction.lockAuditHead().head
            let linked = AuditChain.link(
                [AuditEvent(principal: .system, tenant: nil, operation: .createTenant, requestID: "r")],
                after: head
            )
            try await transaction.appendAuditRecords(linked.records, head: linked.head)
        }
        let triggers = try await cluster.psql(
            database,
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_log'::regclass AND NOT tgisinternal ORDER BY tgname"
        )
        #expect(triggers.split(separator: "\n").contains("audit_log_no_update"))
        #expect(triggers.split(separator: "\n").contains("audit_log_no_delete"))

        for statement in [
            "UPDATE audit_log SET detail = 'forged'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ] {
            await #expect(throws: StorageError.self, "\(statement) was allowed") {
                try await store.executeUnsafeSQL(statement)
            }
        }
        #expect(try await store.read { try await $0.auditRecords(after: 0, limit: 10) }.first?.event.detail == "")

        // What attack tests do first: with the triggers off, an edit goes through (and the chain
        // is left to catch it).
        try await store.executeUnsafeSQL("ALTER TABLE audit_log DISABLE TRIGGER USER")
        try await store.executeUnsafeSQL("UPDATE audit_log SET detail = 'forged'")
        let records = try await store.read { try await $0.auditRecords(after: 0, limit: 10) }
        let head = try await store.read { try await $0.auditHead().head }
        #expect(records.first?.event.detail == "forged")
        guard case .broken(let problem) = AuditChain.verify(records, head: head) else {
            Issue.record("an edited record verified")
            return
        }
        #expect(problem.kind == .edited)
    }

    // MARK: Connections

    @Test func anUnreachableServerIsUnavailableQuickly() async throws {
        let clock = ContinuousClock()
        // "Quickly" means bounded by the connect timeout, not instant: with every suite running
        // in parallel on two cores a refused connection has been seen to take over 7 s to report.
        let bound = PostgresKeyStore.connectTimeout + .seconds(10)
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let refused = PostgresKeyStoreConfiguration(port: 1, username: "hsmgw", password: "x", database: "none")
        let started = clock.now
        let error = await #expect(throws: StorageError.self) { try await PostgresKeyStore.open(refused) }
        #expect(error?.kind == .unavailable)
        #expect(clock.now - started < bound)

        // A non-routable address: the connect timeout, not a hang.
        let blackHole = PostgresKeyStoreConfiguration(
            host: "10.255.255.1",
            username: "hsmgw",
            password: "x",
            database: "none"
        )
        let startedBlackHole = clock.now
        let timeout = await #expect(throws: StorageError.self) { try await PostgresKeyStore.open(blackHole) }
        #expect(timeout?.kind == .unavailable)
        #expect(clock.now - startedBlackHole < bound)
    }

    @Test func aWrongPasswordOrMissingDatabaseIsUnavailable() async throws {
        var wrongPassword = configuration("postgres")
        wrongPassword.password = "not-the-password"
        let denied = await #expect(throws: StorageError.self) { try await PostgresKeyStore.open(wrongPassword) }
        #expect(denied?.kind == .unavailable)
        #expect(denied?.detail.contains("not-the-password") == false)

        let missing = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(configuration("no_such_database"))
        }
        #expect(missing?.kind == .unavailable)
    }

    @Test func poolSizeOutsideItsLimitIsRefused() async throws {
        for size in [0, 257] {
            var config = configuration("postgres")
            config.maximumConnections = size
            await #expect(throws: StorageError.self) { try await PostgresKeyStore.open(config) }
        }
    }

    @Test func connectsOverTheUnixSocket() async throws {
        var config = configuration(try await cluster.createDatabase("unix_socket"))
        config.unixSocketPath = cluster.unixSocketPath
        config.host = "203.0.113.1"  // ignored when the socket is set
        let store = try await PostgresKeyStore.open(config)
        #expect(try await store.schemaVersion() == Migrations.latestVersion)
        await store.close()
    }

    // MARK: Transactions across connections

    @Test func commitsAreVisibleToOtherConnectionsAndRollbacksLeaveNothing() async throws {
        let database = try await cluster.createDatabase("visibility")
        let writer = try await open(database)
        let reader = try await open(database)
        defer {
            Task {
                await writer.close()
                await reader.close()
            }
        }
        func exists(_ id: String) async throws -> Bool {
            try await reader.read { try await $0.tenant(TenantID(trusted: id), forUpdate: false) } != nil
        }

        try await writer.transaction { transaction in
            try await transaction.insertTenant(tenant("committed"))
            // Not visible to another connection before the commit.
            #expect(try await exists("committed") == false)
        }
        #expect(try await exists("committed"))

        await #expect(throws: CancellationError.self) {
            try await writer.transaction { transaction in
                try await transaction.insertTenant(tenant("thrown"))
                throw CancellationError()  // the body's own error comes back unchanged
            }
        }
        #expect(try await exists("thrown") == false)

        try await writer.transaction { transaction in
            try await transaction.insertTenant(tenant("before-savepoint"))
            _ = try? await transaction.savepoint {
                try await transaction.insertTenant(tenant("in-failed-savepoint"))
                try await transaction.insertTenant(tenant("before-savepoint"))  // unique violation
            }
            try await transaction.insertTenant(tenant("after-savepoint"))
        }
        #expect(try await exists("before-savepoint"))
        #expect(try await exists("in-failed-savepoint") == false)
        #expect(try await exists("after-savepoint"))
    }

    @Test func aSwallowedStatementErrorDoesNotCommit() async throws {
        let store = try await open(try await cluster.createDatabase("swallowed"))
        defer { Task { await store.close() } }
        try await store.transaction { try await $0.insertTenant(tenant("acme")) }
        let error = await #expect(throws: StorageError.self) {
            try await store.transaction { transaction in
                try await transaction.insertTenant(tenant("would-be-lost"))
                _ = try? await transaction.insertTenant(tenant("acme"))  // fails, error dropped
            }
        }
        #expect(error?.kind == .other)
        #expect(
            try await store.read { try await $0.tenant(TenantID(trusted: "would-be-lost"), forUpdate: false) } == nil)
        try await store.transaction { try await $0.insertTenant(tenant("usable")) }
    }

    @Test func readRefusesWritesAndLocks() async throws {
        let store = try await open(try await cluster.createDatabase("read_only"))
        defer { Task { await store.close() } }
        await expectStorageError(.other) {
            try await store.read { try await $0.insertTenant(tenant("nope")) }
        }
        await expectStorageError(.other) {
            try await store.read { _ = try await $0.lockAuditHead() }
        }
        await expectStorageError(.other) {
            try await store.read { _ = try await $0.tenant(TenantID(trusted: "x"), forUpdate: true) }
        }
        #expect(try await store.read { try await $0.tenants(after: nil, limit: 10) } == [])
    }

    @Test func aTransactionObjectIsDeadAfterItsClosure() async throws {
        let store = try await open(try await cluster.createDatabase("escaped"))
        defer { Task { await store.close() } }
        let escaped = try await store.transaction { $0 }
        await expectStorageError(.other) { try await escaped.insertTenant(tenant("late")) }
        #expect(try await store.read { try await $0.tenants(after: nil, limit: 10) } == [])
    }
}

// MARK: - Fixtures

private let now = Timestamp(millisecondsSinceEpoch: 1_700_000_000_000)

private func tenant(_ id: String) -> TenantRecord {
    TenantRecord(id: TenantID(trusted: id), state: .enabled, primaryVersion: 1, createdAt: now, updatedAt: now)
}
