import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import KeyHierarchy
import PostgresTestSupport
import Testing

/// docs/protocol.md §7.1, §9.3 and §16.4 over the wire, against a running gateway on PostgreSQL:
/// what DecryptDataKey(s) and RewrapDataKey return, the audit records' fields as hashed, and a
/// refused Hello whose audit record cannot be written.
@Suite("The protocol as documented, end to end", .serialized)
struct DocumentedContractTests {
    @Test func dataKeysAuditAndRefusedHellos() async throws {
        let cluster = try PostgresTestCluster.shared()
        let database = try await cluster.createDatabase("documentedcontract")
        let useDatabase: (inout GatewayConfiguration) -> Void = { configuration in
            if case .postgres(var settings) = configuration.store {
                settings.database = database
                configuration.store = .postgres(settings)
            }
        }
        try await withGateway(.postgres, "documentedcontract", configure: useDatabase) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let context = ["purpose": "contract"]

            // §9.3: DecryptDataKey(s) return the current wrapped copy.
            let keys = try await admin.generateDataKeys(tenant: "acme", count: 2, context: context)
            let single = try await admin.decryptDataKey(tenant: "acme", id: keys[0].id, context: context)
            #expect(single.wrapped == keys[0].wrapped)
            #expect(single.wrapped.count == 83)
            let batch = try await admin.decryptDataKeys(
                tenant: "acme", keys: keys.map { DataKeyReference(id: $0.id, context: context) })
            #expect(try batch.map { try $0.get().wrapped } == keys.map(\.wrapped))

            // §9.3: RewrapDataKey of a key under the primary leaves it as it is.
            let before = try await admin.getDataKey(tenant: "acme", id: keys[0].id)
            try await Task.sleep(for: .milliseconds(5))
            let rewrapped = try await admin.rewrapDataKey(tenant: "acme", id: keys[0].id, context: context)
            #expect(rewrapped == before)
            #expect(
                try await admin.decryptDataKey(tenant: "acme", id: keys[0].id, context: context).wrapped
                    == keys[0].wrapped)
            await expectStatus(.invalidArgument, reason: StatusReason.decryptionFailed) {
                try await admin.rewrapDataKey(tenant: "acme", id: keys[0].id, context: ["purpose": "other"])
            }

            // §16.4: the listed fields are the hashed ones (outcome as stored), so the chain
            // recomputes from the listing alone.
            let records = try await admin.listAuditRecords(after: 0, limit: 1000)
            #expect(records.count >= 5)
            var previous = [UInt8](repeating: 0, count: 32)
            for record in records {
                let event = AuditEvent(
                    time: Timestamp(millisecondsSinceEpoch: record.timeMs),
                    principal: Principal(record.principal),
                    tenant: record.tenant.isEmpty ? nil : TenantID(trusted: record.tenant),
                    operation: try #require(AuditOperation(rawValue: record.operation)),
                    keyIDs: record.keyIds,
                    outcome: AuditOutcome(stored: record.outcome),
                    requestID: record.requestID,
                    detail: record.detail
                )
                #expect(record.outcome == "ok" || record.outcome.hasPrefix("error:"), "\(record.outcome)")
                #expect(Array(record.previousHash) == previous)
                #expect(
                    AuditChain.hash(sequence: record.sequence, event: event, previousHash: previous)
                        == Array(record.hash))
                previous = Array(record.hash)
            }
            #expect(records.contains { $0.operation == "data-key.rewrap" && $0.outcome == "error:decryption failed" })
            #expect(
                records.contains {
                    $0.operation == "data-key.rewrap" && $0.detail == "to-version=1 moved=0 unchanged=1"
                })

            // §7.1: a refused Hello's answer never depends on its audit record: with every audit
            // insert refused (a statement error, then the SQLSTATE of a server going away), the
            // Hello is UNAUTHENTICATED, never INTERNAL or UNAVAILABLE.
            let forged = "hsmgw_" + String(repeating: "C", count: 43)
            for sqlState in ["P0001", "57P01"] {
                _ = try await cluster.psql(
                    database,
                    """
                    CREATE OR REPLACE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN RAISE EXCEPTION 'audit refused for the test' USING ERRCODE = '\(sqlState)'; END $$;
                    CREATE OR REPLACE TRIGGER refuse_audit BEFORE INSERT ON audit_log
                    FOR EACH ROW EXECUTE FUNCTION refuse_audit();
                    """
                )
                let stranger = try gateway.client(token: forged)
                await expectStatus(.unauthenticated) { try await stranger.serverInfo() }
                await stranger.shutdown()
                // The record's write has been tried (and refused) before the trigger changes.
                await gateway.app.handler.flushRefusedHelloAudit()
            }
            _ = try await cluster.psql(database, "DROP TRIGGER refuse_audit ON audit_log")
            // The two records that could not be written were counted, and the next refused Hello's
            // transaction reports them.
            let stranger = try gateway.client(token: forged)
            await expectStatus(.unauthenticated) { try await stranger.serverInfo() }
            await stranger.shutdown()
            await gateway.app.handler.flushRefusedHelloAudit()
            let later = try await admin.listAuditRecords(after: records.last?.sequence ?? 0, limit: 1000)
            let drops = later.filter { $0.detail.hasPrefix("method=Hello reason=audit-queue-full ") }
            #expect(drops.map(\.detail) == ["method=Hello reason=audit-queue-full dropped=2 malformed-token=2"])
        }
    }
}
