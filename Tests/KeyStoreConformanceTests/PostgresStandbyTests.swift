import Foundation
import KeyHierarchy
import PostgresTestSupport
import Testing

@testable import PostgresKeyStore

/// A primary with a streaming standby (`throwaway-postgres.sh standby`): the store connects only
/// to the server that accepts writes, whatever the order it is given them in, moves to a promoted
/// standby by itself, and checks at start that acknowledged commits survive a failover.
@Suite("PostgreSQL primary and standby", .serialized)
struct PostgresStandbyTests {
    private static func configuration(
        _ first: PostgresTestCluster, then others: [PostgresTestCluster],
        durability: PostgresKeyStoreConfiguration.StandbyDurability = .warn
    ) -> PostgresKeyStoreConfiguration {
        PostgresKeyStoreConfiguration(
            port: first.port, username: first.username, password: first.password, database: "postgres",
            failoverServers: others.map { .init(host: "127.0.0.1", port: $0.port) },
            standbyDurability: durability)
    }

    @Test("the standby listed first is passed over; a promoted standby is found without a restart")
    func connectsOnlyToTheServerThatAcceptsWrites() async throws {
        let primary = try PostgresTestCluster.startOwn()
        defer { primary.stop() }
        let standby = try primary.startStandby(synchronous: true)
        defer { standby.stop() }

        // The standby first: it answers logins, but accepts no writes.
        let store = try await PostgresKeyStore.open(Self.configuration(standby, then: [primary]))
        #expect(store.currentServer == 1)
        try await store.executeUnsafeSQL("CREATE TABLE failover_probe (name text)")
        try await store.executeUnsafeSQL("INSERT INTO failover_probe VALUES ('before')")

        // Only the standby: it is not a primary, and the error says so.
        await #expect {
            _ = try await PostgresKeyStore.open(Self.configuration(standby, then: []))
        } throws: { error in
            guard let error = error as? StorageError else { return false }
            return error.kind == .unavailable && error.detail.contains("standby")
        }

        // The primary dies; until a standby is promoted, calls fail at once with UNAVAILABLE.
        try await primary.halt(mode: "immediate")
        let halted = ContinuousClock.now
        while store.isReachable, ContinuousClock.now - halted < .seconds(10) {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(!store.isReachable)
        let refused = ContinuousClock.now
        await #expect {
            try await store.executeUnsafeSQL("INSERT INTO failover_probe VALUES ('during')")
        } throws: { ($0 as? StorageError)?.kind == .unavailable }
        #expect(ContinuousClock.now - refused < .milliseconds(500))

        let promoted = ContinuousClock.now
        try await standby.promote()
        var resumed: Duration?
        while ContinuousClock.now - promoted < .seconds(30) {
            if (try? await store.executeUnsafeSQL("INSERT INTO failover_probe VALUES ('after')")) != nil {
                resumed = ContinuousClock.now - promoted
                break
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        print("store resumed on the promoted standby \(resumed.map { "\($0)" } ?? "never") after pg_ctl promote began")
        #expect(resumed != nil)
        #expect(store.currentServer == 0)
        // The commit acknowledged before the failover is on the new primary (synchronous standby).
        let rows = try await standby.psql("postgres", "SELECT string_agg(name, ',' ORDER BY name) FROM failover_probe")
        #expect(rows.trimmingCharacters(in: .whitespacesAndNewlines) == "after,before")
        await store.close()
    }

    @Test("start-up with an asynchronous standby: warned about, or refused by configuration")
    func durabilityAcrossFailoverIsChecked() async throws {
        let primary = try PostgresTestCluster.startOwn()
        defer { primary.stop() }
        let standby = try primary.startStandby(synchronous: false)
        defer { standby.stop() }

        await #expect {
            _ = try await PostgresKeyStore.open(Self.configuration(primary, then: [standby], durability: .refuse))
        } throws: { error in
            guard let error = error as? StorageError else { return false }
            return error.kind == .other && error.detail.contains("synchronous_standby_names")
        }
        let warned = try await PostgresKeyStore.open(Self.configuration(primary, then: [standby], durability: .warn))
        await warned.close()

        // Made synchronous, the same server passes the refusing check.
        _ = try await primary.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'hsmgw_standby'")
        _ = try await primary.psql("postgres", "SELECT pg_reload_conf()")
        let store = try await PostgresKeyStore.open(
            Self.configuration(primary, then: [standby], durability: .refuse))
        await store.close()
    }
}
