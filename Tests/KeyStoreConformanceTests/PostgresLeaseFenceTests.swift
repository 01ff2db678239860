import KeyHierarchy
import PostgresKeyStore
import PostgresTestSupport
import Testing

/// The background lease and the rewrap-job fence of migration 5, on two stores that share one
/// database as two gateways do (each with its holder id as `application_name`).
@Suite("PostgreSQL background lease and rewrap-job fence")
struct PostgresLeaseFenceTests {
    let cluster: PostgresTestCluster

    init() throws {
        cluster = try PostgresTestCluster.shared()
    }

    func open(_ database: String, as holder: String) async throws -> PostgresKeyStore {
        var configuration = PostgresKeyStoreConfiguration(
            port: cluster.port, username: cluster.username, password: cluster.password, database: database)
        configuration.applicationName = holder
        return try await PostgresKeyStore.open(configuration)
    }

    /// Writes progress to the running job of tenant `t`; the error when refused, else nil.
    func writeProgress(_ store: PostgresKeyStore, _ moved: Int) async -> StorageError? {
        do {
            try await store.executeUnsafeSQL("UPDATE rewrap_jobs SET moved = \(moved) WHERE tenant_id = 't'")
            return nil
        } catch let error as StorageError {
            return error
        } catch {
            Issue.record("unexpected \(error)")
            return nil
        }
    }

    @Test func onlyTheLiveHolderWritesARunningJobsProgress() async throws {
        let database = try await cluster.createDatabase("lease_fence")
        let a = try await open(database, as: "gw-a/1")
        let b = try await open(database, as: "gw-b/2")
        defer {
            Task {
                await a.close()
                await b.close()
            }
        }
        try await a.executeUnsafeSQL(
            "INSERT INTO tenants (id, state, primary_version, created_at, updated_at) VALUES ('t', 'enabled', 1, 0, 0)")
        try await a.executeUnsafeSQL(
            """
            INSERT INTO rewrap_jobs (tenant_id, target_version, state, cursor, moved, total, started_at, updated_at)
            VALUES ('t', 1, 'running', NULL, 0, 10, 0, 0)
            """)
        // No lease yet (tools, tests): anyone may write.
        #expect(await writeProgress(b, 1) == nil)

        // A takes the lease: B's writes are refused, A's go through; B cannot take it meanwhile.
        let first = try #require(try await a.acquireLease("background-work", holder: "gw-a/1", duration: .seconds(30)))
        #expect(try await b.acquireLease("background-work", holder: "gw-b/2", duration: .seconds(30)) == nil)
        let refused = try #require(await writeProgress(b, 2))
        #expect(refused.detail.contains("background lease is held by another gateway"), "\(refused.detail)")
        #expect(await writeProgress(a, 3) == nil)
        // Renewing keeps the fencing token.
        #expect(try await a.acquireLease("background-work", holder: "gw-a/1", duration: .milliseconds(1)) == first)

        // A's lease lapses: B takes it (a new token), and now A is the one refused.
        try await Task.sleep(for: .milliseconds(20))
        let second = try #require(try await b.acquireLease("background-work", holder: "gw-b/2", duration: .seconds(30)))
        #expect(second == first + 1)
        #expect(await writeProgress(a, 4) != nil)
        #expect(await writeProgress(b, 5) == nil)

        // A completed or restarted job is not fenced (StartRewrapJob may run on any instance).
        try await b.executeUnsafeSQL("UPDATE rewrap_jobs SET state = 'completed' WHERE tenant_id = 't'")
        try await a.executeUnsafeSQL("UPDATE rewrap_jobs SET state = 'running', moved = 0 WHERE tenant_id = 't'")

        // Released: nobody holds it, anyone may write again.
        try await b.releaseLease("background-work", holder: "gw-b/2")
        #expect(await writeProgress(a, 6) == nil)
    }
}
