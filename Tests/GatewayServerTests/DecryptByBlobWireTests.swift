import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import PostgresTestSupport
import Testing

/// docs/protocol.md §9.3, "Decrypting by the wrapped copy", on the wire: a client that kept
/// `DataKey.wrapped` recovers its key when the gateway's row is gone (deleted here with psql, as
/// a restore from an older backup leaves it), and gets the usual answers for everything else.
@Suite("DecryptDataKey(s) with the client's wrapped copy", .serialized)
struct DecryptByBlobWireTests {
    @Test
    func recoversAKeyWhoseRowIsGone() async throws {
        let cluster = try PostgresTestCluster.shared()
        let database = try await cluster.createDatabase("byblob")
        let useDatabase: (inout GatewayConfiguration) -> Void = { configuration in
            if case .postgres(var settings) = configuration.store {
                settings.database = database
                configuration.store = .postgres(settings)
            }
        }
        try await withGateway(.postgres, "byblob", configure: useDatabase) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            _ = try await admin.createTenant("globex")
            let context = ["record": "42"]
            let key = try await admin.generateDataKey(tenant: "acme", context: context)
            let other = try await admin.generateDataKey(tenant: "acme", context: context)
            let foreign = try await admin.generateDataKey(tenant: "globex", context: context)
            // An envelope sealed with a key whose wrapped copy the application kept.
            let envelopeKey = try await admin.generateDataKey(tenant: "acme", context: context)
            let envelope = try EnvelopeEncryptor.encrypt(
                Array("a document".utf8),
                with: EnvelopeDataKey(id: envelopeKey.id, plaintext: try #require(envelopeKey.plaintext)),
                tenant: "acme", context: context)
            _ = try await cluster.psql(
                database, "DELETE FROM data_keys WHERE id IN ('\(key.id)', '\(foreign.id)', '\(envelopeKey.id)')")

            await expectStatus(.notFound) {
                try await admin.decryptDataKey(tenant: "acme", id: key.id, context: context)
            }
            // With the copy (and no id: the copy names its key).
            let recovered = try await admin.decryptDataKey(
                tenant: "acme", id: "", context: context, wrapped: key.wrapped)
            #expect(recovered.id == key.id)
            #expect(recovered.wrapped == key.wrapped)
            #expect(recovered.plaintext?.copyBytes() == key.plaintext?.copyBytes())

            let failed = StatusReason.decryptionFailed
            // Wrong context, another tenant's copy, a changed byte, an id that is not the copy's.
            await expectStatus(.invalidArgument, reason: failed) {
                try await admin.decryptDataKey(tenant: "acme", id: "", context: ["record": "43"], wrapped: key.wrapped)
            }
            await expectStatus(.invalidArgument, reason: failed) {
                try await admin.decryptDataKey(tenant: "acme", id: "", context: context, wrapped: foreign.wrapped)
            }
            var tampered = key.wrapped
            tampered[tampered.count - 1] ^= 0x80
            await expectStatus(.invalidArgument, reason: failed) {
                try await admin.decryptDataKey(tenant: "acme", id: "", context: context, wrapped: tampered)
            }
            await expectStatus(.invalidArgument, reason: failed) {
                try await admin.decryptDataKey(tenant: "acme", id: other.id, context: context, wrapped: key.wrapped)
            }
            // Not a wrapped key at all.
            await expectStatus(.invalidArgument) {
                try await admin.decryptDataKey(
                    tenant: "acme", id: "", context: context, wrapped: Array(key.wrapped.dropLast()))
            }

            // In a batch, next to a key that has its row; each entry answers alone.
            let results = try await admin.decryptDataKeys(
                tenant: "acme",
                keys: [
                    DataKeyReference(id: "", context: context, wrapped: key.wrapped),
                    DataKeyReference(id: other.id, context: context),
                    DataKeyReference(id: "", context: ["record": "43"], wrapped: key.wrapped),
                ]
            )
            #expect(try results[0].get().id == key.id)
            #expect(try results[1].get().id == other.id)
            #expect((try? results[2].get()) == nil)

            // The envelope opens with the kept copy, and only with it.
            let decryptor = EnvelopeDecryptor(provider: admin)
            await expectStatus(.notFound) { try await decryptor.decrypt(envelope) }
            let opened = try await decryptor.decrypt(envelope, wrappedDataKey: envelopeKey.wrapped)
            #expect(opened.plaintext == Array("a document".utf8))

            // Audited as decrypts, saying the copy was used.
            let records = try await cluster.psql(
                database,
                "SELECT count(*) FROM audit_log WHERE operation = 'data-key.decrypt' AND detail LIKE '%by-caller-blob=%'"
            ).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect((Int(records) ?? 0) >= 6)
        }
    }
}
