import Foundation
import GatewayClient
import GatewayServer
import PostgresTestSupport
import ProcessTestSupport
import Testing

/// A gateway whose PostgreSQL accepts TCP logins over TLS only (`hostssl`), with a server
/// certificate for `localhost` from the test CA: `store.postgres.tls: verify-full` serves keys,
/// and a name the certificate does not carry stops the start with a store error.
@Suite("Gateway on PostgreSQL over TLS", .serialized)
struct PostgresTLSGatewayTests {
    func settings(_ cluster: PostgresTestCluster, host: String, serverName: String?) throws -> PostgresSettings {
        PostgresSettings(
            host: host, port: cluster.port, user: cluster.username, database: "postgres",
            passwordFile: cluster.directory + "/password", maximumConnections: 4,
            tls: .verifyFull(caFile: try TestCertificates.shared().caCertificate, serverName: serverName))
    }

    @Test("verify-full: data keys generated and decrypted through the client; a wrong name fails the start")
    func gatewayOverTLS() async throws {
        let cluster = try PostgresTestCluster.startOwn(tls: try TestCertificates.shared().dnsOnlyServer())
        defer { cluster.stop() }
        let store = try settings(cluster, host: "localhost", serverName: nil)
        let useTLSCluster: (inout GatewayConfiguration) -> Void = { $0.store = .postgres(store) }
        try await withGateway(.postgres, "pg-tls", configure: useTLSCluster) { gateway in
            let client = try gateway.client(token: gateway.adminToken)
            _ = try await client.createTenant("acme")
            let key = try await client.generateDataKey(tenant: "acme", context: ["db": "tls"])
            let decrypted = try await client.decryptDataKey(tenant: "acme", id: key.id, context: ["db": "tls"])
            #expect(decrypted.plaintext?.copyBytes() == key.plaintext?.copyBytes())
            await client.shutdown()
        }

        // By IP address, which the certificate does not name: the gateway refuses to start.
        var (wrongName, _) = try await GatewayHarness.makeConfiguration(.sqlite, "pg-tls-name")
        wrongName.store = .postgres(try settings(cluster, host: "127.0.0.1", serverName: nil))
        let error = await StartupTests.startupError(wrongName)
        #expect(error?.code == .store)
        #expect(error?.exitCode == 69)
        #expect(error?.message.contains("store.postgres 127.0.0.1:\(cluster.port)") == true, "\(error?.message ?? "")")
    }
}
