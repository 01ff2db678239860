import Foundation
import KeyHierarchy
import Testing

/// docs/protocol.md §9.3 as the key service keeps it, on both stores: RewrapDataKey leaves a key
/// already under the primary as it is (an unwrap proves the context; nothing is wrapped or
/// written but the audit record), and DecryptDataKey(s) hand back the key's current wrapped copy.
@Suite("Rewrap in place and the wrapped copy of a decrypted key")
struct RewrapInPlaceTests {
    static let context: EncryptionContext = ["app": "billing", "purpose": "rewrap-in-place"]

    @Test(arguments: StoreKind.allCases)
    func rewrapUnderThePrimaryChangesNothing(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "rewrap-in-place")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("inplace")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, context: Self.context, request: app)
        let before = try await service.dataKey(tenant, id: key.id)
        let invocationsBefore = try await service.masterKeyVersions(tenant).map(\.invocationsReserved)
        // A later `updated_at` could not be told apart within the same millisecond.
        try await Task.sleep(for: .milliseconds(5))

        let returned = try await service.rewrapDataKey(tenant, id: key.id, context: Self.context, request: app)
        #expect(returned == before, "the returned metadata changed")
        let after = try await service.dataKey(tenant, id: key.id)
        #expect(after == before, "the stored row changed")
        #expect(after.wrapped == key.wrapped, "the key was wrapped again (a new IV)")
        #expect(after.updatedAt == before.updatedAt)
        #expect(try await service.masterKeyVersions(tenant).map(\.invocationsReserved) == invocationsBefore)

        // Audited as a rewrap of that key that moved nothing.
        let record = try #require(try await harness.auditRecords().last)
        #expect(record.event.operation == .rewrapDataKey)
        #expect(record.event.outcome == .success)
        #expect(record.event.keyIDs == [key.id.description])
        #expect(record.event.detail == "to-version=1 moved=0 unchanged=1")

        // The key still decrypts, to the same plaintext.
        let decrypted = try await service.decryptDataKey(tenant, id: key.id, context: Self.context, request: app)
        #expect(decrypted.plaintext.copyBytes() == key.plaintext?.copyBytes())
    }

    @Test(arguments: StoreKind.allCases)
    func rewrapUnderThePrimaryStillProvesTheContext(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "rewrap-in-place-context")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("inplacectx")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, context: Self.context, request: app)
        let before = try await service.dataKey(tenant, id: key.id)

        for wrong: EncryptionContext in [.empty, ["app": "billing"], ["app": "billing", "purpose": "other"]] {
            let error = await serviceError {
                try await service.rewrapDataKey(tenant, id: key.id, context: wrong, request: app)
            }
            #expect(error?.code == .decryptionFailed)
            #expect(error?.message == "decryption failed")
        }
        #expect(try await service.dataKey(tenant, id: key.id) == before)
        let failures = try await harness.auditRecords().filter {
            $0.event.operation == .rewrapDataKey && $0.event.outcome == .failure("decryption failed")
        }
        #expect(failures.count == 3)
    }

    @Test(arguments: StoreKind.allCases)
    func rewrapAfterRotationMovesTheKeyThenLeavesIt(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "rewrap-after-rotation")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("inplacerot")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, context: Self.context, request: app)
        _ = try await service.rotateMasterKey(tenant, request: admin)

        let moved = try await service.rewrapDataKey(tenant, id: key.id, context: Self.context, request: app)
        #expect(moved.version == 2)
        let blob = try #require(moved.wrapped.flatMap { WrappedDataKey(encoded: $0) })
        #expect(blob.version == 2)
        #expect(moved.wrapped != key.wrapped)
        #expect(try await harness.auditRecords().last?.event.detail == "to-version=2 moved=1")

        // Under the primary now: a second rewrap leaves it as the first one made it.
        let again = try await service.rewrapDataKey(tenant, id: key.id, context: Self.context, request: app)
        #expect(again == moved)
        #expect(try await service.dataKey(tenant, id: key.id) == moved)
    }

    @Test(arguments: StoreKind.allCases)
    func decryptReturnsTheCurrentWrappedCopy(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "decrypt-wrapped")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("decwrapped")
        _ = try await service.createTenant(tenant, request: admin)
        let keys = try await service.generateDataKeys(tenant, count: 3, context: Self.context, request: app)

        let single = try await service.decryptDataKey(tenant, id: keys[0].id, context: Self.context, request: app)
        #expect(single.wrapped == keys[0].wrapped)
        #expect(single.wrapped.count == WrappedDataKey.encodedByteCount)

        let batch = try await service.decryptDataKeys(
            tenant, keys.map { DataKeyRequest(id: $0.id, context: Self.context) }, request: app)
        for (generated, result) in zip(keys, batch) {
            #expect(try result.get().wrapped == generated.wrapped)
        }

        // After a rewrap to a new primary, the copy returned is the new one.
        _ = try await service.rotateMasterKey(tenant, request: admin)
        let moved = try await service.rewrapDataKey(tenant, id: keys[1].id, context: Self.context, request: app)
        let afterRewrap = try await service.decryptDataKey(
            tenant, id: keys[1].id, context: Self.context, request: app)
        #expect(afterRewrap.wrapped == moved.wrapped)
        #expect(WrappedDataKey(encoded: afterRewrap.wrapped)?.version == 2)
    }
}
