import Foundation
import KeyHierarchy
import PostgresKeyStore
import PostgresTestSupport
import ProcessTestSupport
import Synchronization
import Testing

/// The PostgreSQL store over TLS, against a throwaway cluster of its own that serves TLS with a
/// certificate for `localhost` only (no IP address) from the test CA and refuses TCP logins
/// without TLS (`hostssl`).
@Suite("PostgresStore over TLS")
struct PostgresTLSTests {
    /// One TLS cluster for the suite, stopped at process exit (or by its watcher).
    private static let sharedCluster: Result<PostgresTestCluster, any Error> = Result {
        let cluster = try PostgresTestCluster.startOwn(tls: try TestCertificates.shared().dnsOnlyServer())
        running.withLock { $0 = cluster }
        atexit { PostgresTLSTests.running.withLock { $0 }?.stop() }
        return cluster
    }
    private static let running = Mutex<PostgresTestCluster?>(nil)

    let cluster: PostgresTestCluster
    let pki: TestCertificates

    init() throws {
        pki = try TestCertificates.shared()
        cluster = try Self.sharedCluster.get()
    }

    func configuration(host: String = "localhost", tls: PostgresKeyStoreConfiguration.TLS)
        -> PostgresKeyStoreConfiguration
    {
        PostgresKeyStoreConfiguration(
            host: host, port: cluster.port, username: cluster.username, password: cluster.password,
            database: "postgres", maximumConnections: 2, tls: tls)
    }

    @Test("verify-full with the CA: the store opens, and the server sees every connection as TLS")
    func verifiedConnection() async throws {
        let store = try await PostgresKeyStore.open(
            configuration(tls: .verifyFull(caFile: pki.caCertificate, serverName: nil)))
        // Work through the pool (the idle connection stays open), then ask the server how its
        // clients are connected.
        _ = try await store.read { try await $0.auditHead() }
        let connections = try await cluster.psql(
            "postgres",
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a "
                + "USING (pid) WHERE a.usename = '\(cluster.username)' AND a.application_name <> 'psql'"
        ).trimmingCharacters(in: .whitespacesAndNewlines)
        let counts = connections.split(separator: "|").compactMap { Int($0) }
        #expect(counts.count == 2 && counts[0] == counts[1] && counts[0] >= 1, "\(connections)")
        await store.close()
    }

    @Test("without TLS the server refuses the login: unavailable")
    func plainTCPIsRefused() async throws {
        let error = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(self.configuration(tls: .disable))
        }
        #expect(error?.kind == .unavailable)
    }

    @Test("the server's name is verified: an IP address it does not name fails, --server-name fixes it")
    func serverNameIsVerified() async throws {
        let byAddress = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(
                self.configuration(host: "127.0.0.1", tls: .verifyFull(caFile: self.pki.caCertificate, serverName: nil))
            )
        }
        #expect(byAddress?.kind == .unavailable)

        let wrongName = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(
                self.configuration(tls: .verifyFull(caFile: self.pki.caCertificate, serverName: "db.example")))
        }
        #expect(wrongName?.kind == .unavailable)

        let named = try await PostgresKeyStore.open(
            configuration(host: "127.0.0.1", tls: .verifyFull(caFile: pki.caCertificate, serverName: "localhost")))
        await named.close()
    }

    @Test("a server certificate from a CA not trusted (the system roots) fails: unavailable")
    func untrustedServer() async throws {
        let error = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(self.configuration(tls: .verifyFull(caFile: nil, serverName: nil)))
        }
        #expect(error?.kind == .unavailable)
    }

    @Test("an unreadable CA file and TLS over a Unix socket are configuration errors, named as such")
    func configurationErrors() async throws {
        let missing = await #expect(throws: StorageError.self) {
            try await PostgresKeyStore.open(
                self.configuration(tls: .verifyFull(caFile: "/nonexistent/ca.pem", serverName: nil)))
        }
        #expect(missing?.kind == .other)
        #expect(missing?.detail.contains("/nonexistent/ca.pem") == true, "\(missing?.detail ?? "")")

        var socket = configuration(tls: .verifyFull(caFile: pki.caCertificate, serverName: nil))
        socket.unixSocketPath = cluster.unixSocketPath
        let overSocket = await #expect(throws: StorageError.self) { try await PostgresKeyStore.open(socket) }
        #expect(overSocket?.kind == .other)
        #expect(overSocket?.detail.contains("Unix socket") == true)
    }
}
