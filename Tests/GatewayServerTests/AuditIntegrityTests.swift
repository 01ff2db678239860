import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import PostgresTestSupport
import Testing

/// A running gateway whose audit log is changed under it in the database: it stops every key
/// operation (fail closed) with DATA_LOSS, `/readyz` names the audit log, the metric drops to 0,
/// VerifyAuditLog reports the damage; and it serves again, without a restart, once the log is
/// restored.
@Suite("The audit log's integrity on a running gateway", .serialized)
struct AuditIntegrityTests {
    @Test
    func tamperedHeadStopsKeyOperationsUntilRestored() async throws {
        let cluster = try PostgresTestCluster.shared()
        let database = try await cluster.createDatabase("auditintegrity")
        let useDatabase: (inout GatewayConfiguration) -> Void = { configuration in
            if case .postgres(var settings) = configuration.store {
                settings.database = database
                configuration.store = .postgres(settings)
            }
        }
        try await withGateway(.postgres, "auditintegrity", configure: useDatabase) { gateway in
            let metricsPort = try #require(gateway.metricsPort)
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let key = try await admin.generateDataKey(tenant: "acme")
            let clean = try await admin.verifyAuditLog()
            #expect(clean.intact && clean.anchoredThrough == clean.headSequence && clean.checkpointsChecked >= 1)

            // Someone with write access moves the head (as a rewrite of the tail would).
            let genuine = try await cluster.psql(database, "SELECT encode(hash, 'hex') FROM audit_head")
                .trimmingCharacters(in: .whitespacesAndNewlines)
            _ = try await cluster.psql(database, "UPDATE audit_head SET hash = decode(repeat('ab', 32), 'hex')")

            await expectStatus(.dataLoss) { try await admin.generateDataKey(tenant: "acme") }
            await expectStatus(.dataLoss) { try await admin.decryptDataKey(tenant: "acme", id: key.id) }
            let broken = try await admin.verifyAuditLog()
            #expect(!broken.intact)
            #expect(broken.problemKind == "head-mismatch")
            var ready = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            for _ in 0..<40 where ready.status == 200 {
                try await Task.sleep(for: .milliseconds(250))
                ready = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            }
            #expect(ready.status == 503)
            #expect(ready.body.contains(#""audit":{"ready":false"#), "\(ready.body)")
            var metrics = ""
            for _ in 0..<40 where !metrics.contains("hsmgw_audit_integrity_ok 0") {
                try await Task.sleep(for: .milliseconds(250))
                metrics = try await HTTPProbe.get("127.0.0.1", metricsPort, "/metrics").body
            }
            #expect(metrics.contains("hsmgw_audit_integrity_ok 0"))

            // Restored: the next write checks the head again and passes; no restart needed.
            _ = try await cluster.psql(database, "UPDATE audit_head SET hash = decode('\(genuine)', 'hex')")
            #expect(try #require(try await admin.decryptDataKey(tenant: "acme", id: key.id).plaintext).count == 32)
            _ = try await admin.generateDataKey(tenant: "acme")
            for _ in 0..<40 where ready.status != 200 {
                try await Task.sleep(for: .milliseconds(250))
                ready = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            }
            #expect(ready.status == 200, "\(ready.body)")
            #expect(try await admin.verifyAuditLog().intact)
        }
    }
}
