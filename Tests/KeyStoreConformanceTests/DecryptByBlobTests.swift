import Foundation
import KeyHierarchy
import Testing

/// DecryptDataKey(s) with the wrapped copy the caller kept, for the day the gateway's row is gone
/// (protocol §9.3): the row is deleted straight in the database, as a lost or restored database
/// leaves it.
@Suite("Decrypt by the caller's wrapped copy")
struct DecryptByBlobTests {
    @Test(arguments: StoreKind.allCases)
    func decryptsAfterTheRowIsGone(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "blob-ok")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("blob")
        _ = try await service.createTenant(tenant, request: admin)
        let context: EncryptionContext = ["table": "cards"]
        let key = try await service.generateDataKey(tenant, context: context, request: app)
        let blob = try #require(WrappedDataKey(encoded: key.wrapped))

        try await harness.sql("DELETE FROM data_keys WHERE id = '\(key.id)'")
        // Without the blob the key is gone.
        let missing = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, context: context, request: app)
        }
        #expect(missing?.code == .notFound)

        let decrypted = try await service.decryptDataKey(
            tenant, id: key.id, context: context, wrapped: blob, request: app)
        #expect(decrypted.plaintext.copyBytes() == key.plaintext?.copyBytes())
        #expect(decrypted.version == key.version)
        #expect(decrypted.wrapped == key.wrapped)

        // In a batch too, next to a key that still has its row.
        let other = try await service.generateDataKey(tenant, context: context, request: app)
        let results = try await service.decryptDataKeys(
            tenant,
            [
                DataKeyRequest(id: key.id, context: context, wrapped: blob),
                DataKeyRequest(id: other.id, context: context),
            ],
            request: app
        )
        #expect(try results[0].get().id == key.id)
        #expect(try results[1].get().id == other.id)

        // Audited as a decrypt, saying the caller's copy was used.
        let records = try await harness.auditRecords()
        let byBlob = records.filter {
            $0.event.operation == .decryptDataKey && $0.event.detail.contains("by-caller-blob=1")
                && $0.event.keyIDs.contains(key.id.description)
        }
        #expect(byBlob.count == 2)
    }

    @Test(arguments: StoreKind.allCases)
    func refusalsAreTheUsualOnes(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "blob-refused")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("blob-a")
        let otherTenant = tenantID("blob-b")
        _ = try await service.createTenant(tenant, request: admin)
        _ = try await service.createTenant(otherTenant, request: admin)
        let context: EncryptionContext = ["table": "cards"]
        let key = try await service.generateDataKey(tenant, context: context, request: app)
        let blob = try #require(WrappedDataKey(encoded: key.wrapped))
        let foreign = try await service.generateDataKey(otherTenant, context: context, request: app)
        let foreignBlob = try #require(WrappedDataKey(encoded: foreign.wrapped))
        try await harness.sql("DELETE FROM data_keys")

        func code(_ id: DataKeyID, _ context: EncryptionContext, _ blob: WrappedDataKey) async
            -> KeyServiceError.Code?
        {
            await serviceError {
                try await service.decryptDataKey(tenant, id: id, context: context, wrapped: blob, request: app)
            }?.code
        }
        // Wrong context.
        #expect(await code(key.id, ["table": "users"], blob) == .decryptionFailed)
        #expect(await code(key.id, .empty, blob) == .decryptionFailed)
        // Another tenant's blob, under its own id (version 1 exists here too): the AAD refuses it.
        #expect(await code(foreign.id, context, foreignBlob) == .decryptionFailed)
        // A blob that names another key than the one asked for.
        #expect(await code(foreign.id, context, blob) == .decryptionFailed)
        // Any byte of the IV or the ciphertext and tag changed.
        for position in [0, 5, 30, 47] {
            var tampered = blob
            if position < tampered.iv.count {
                tampered.iv[position] ^= 0x01
            } else {
                tampered.ciphertextAndTag[position - tampered.iv.count] ^= 0x01
            }
            #expect(await code(key.id, context, tampered) == .decryptionFailed)
        }
        // A header rewritten to another id: the AAD names the other id.
        var renamed = blob
        renamed.dataKeyID = foreign.id
        #expect(await code(foreign.id, context, renamed) == .decryptionFailed)
        // A version this tenant does not have.
        var unknownVersion = blob
        unknownVersion.version = 9
        #expect(await code(key.id, context, unknownVersion) == .failedPrecondition)
        // The intact blob still works: nothing above was a false refusal.
        #expect(await code(key.id, context, blob) == nil)
    }

    @Test(arguments: StoreKind.allCases)
    func tenantAndVersionStatesStillApply(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "blob-states")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("blob-s")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)
        let blob = try #require(WrappedDataKey(encoded: key.wrapped))
        try await harness.sql("DELETE FROM data_keys WHERE id = '\(key.id)'")

        _ = try await service.disableTenant(tenant, request: admin)
        let disabled = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, wrapped: blob, request: app)
        }
        #expect(disabled?.code == .failedPrecondition)
        _ = try await service.enableTenant(tenant, request: admin)
        _ = try await service.decryptDataKey(tenant, id: key.id, wrapped: blob, request: app)

        // A compromised version refuses, as it does for a stored row.
        _ = try await service.rotateMasterKey(tenant, request: admin)
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .compromised, request: admin)
        let compromised = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, wrapped: blob, request: app)
        }
        #expect(compromised?.code == .failedPrecondition)
    }

    @Test(arguments: StoreKind.allCases)
    func anExistingRowRules(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "blob-row")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("blob-r")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)
        let blob = try #require(WrappedDataKey(encoded: key.wrapped))

        // A disabled key stays refused, and a destroyed one stays gone, whatever copy is sent.
        _ = try await service.disableDataKey(tenant, id: key.id, request: admin)
        let disabled = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, wrapped: blob, request: app)
        }
        #expect(disabled?.code == .failedPrecondition)
        _ = try await service.destroyDataKey(tenant, id: key.id, request: admin)
        let destroyed = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, wrapped: blob, request: app)
        }
        #expect(destroyed?.code == .failedPrecondition)
    }
}
