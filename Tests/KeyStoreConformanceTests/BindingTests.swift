import Foundation
import KeyHierarchy
import Testing

/// Security invariant 2: a wrapped data key is bound to its tenant, id, version and context.
/// Rows are tampered with straight in the database, as an attacker with write access would.
@Suite("Binding of wrapped keys to their context")
struct BindingTests {
    @Test(arguments: StoreKind.allCases)
    func wrongContextIsRefused(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "bind-ctx")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("bind")
        _ = try await service.createTenant(tenant, request: admin)
        let context: EncryptionContext = ["user": "alice", "table": "cards"]
        let key = try await service.generateDataKey(tenant, context: context, request: app)

        let variants: [EncryptionContext] = [
            .empty,
            ["user": "alice"],
            ["user": "bob", "table": "cards"],
            ["user": "alice", "table": "cards", "extra": ""],
            ["User": "alice", "table": "cards"],
        ]
        for variant in variants {
            let error = await serviceError {
                try await service.decryptDataKey(tenant, id: key.id, context: variant, request: app)
            }
            #expect(error?.code == .decryptionFailed)
            let rewrap = await serviceError {
                try await service.rewrapDataKey(tenant, id: key.id, context: variant, request: app)
            }
            #expect(rewrap?.code == .decryptionFailed)
        }
        // The failures are audited, without the context values.
        let records = try await harness.auditRecords()
        let failures = records.filter { $0.event.outcome == .failure("decryption failed") }
        #expect(failures.count >= variants.count)
        for record in records {
            #expect(!record.event.detail.contains("alice"))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func blobMovedToAnotherRow(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "bind-row")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("rows")
        _ = try await service.createTenant(tenant, request: admin)
        let a = try await service.generateDataKey(tenant, request: app)
        let b = try await service.generateDataKey(tenant, request: app)

        // B's whole blob copied into A's row: the header names B, refused before the token.
        try await harness.sql(
            "UPDATE data_keys SET wrapped = (SELECT wrapped FROM data_keys WHERE id = '\(b.id)') WHERE id = '\(a.id)'"
        )
        let moved = await serviceError { try await service.decryptDataKey(tenant, id: a.id, request: app) }
        #expect(moved?.code == .decryptionFailed)

        // B's ciphertext under a header rewritten to name A: the token's AAD check refuses it.
        var forged = try #require(WrappedDataKey(encoded: b.wrapped))
        forged.dataKeyID = a.id
        try await harness.sql(
            "UPDATE data_keys SET wrapped = \(blobLiteral(kind, forged.encoded)) WHERE id = '\(a.id)'")
        let forgedError = await serviceError { try await service.decryptDataKey(tenant, id: a.id, request: app) }
        #expect(forgedError?.code == .decryptionFailed)

        // A blob claiming another version of the same tenant fails too.
        _ = try await service.rotateMasterKey(tenant, request: admin)
        var otherVersion = try #require(WrappedDataKey(encoded: a.wrapped))
        otherVersion.version = 2
        try await harness.sql(
            "UPDATE data_keys SET wrapped = \(blobLiteral(kind, otherVersion.encoded)), version = 2 WHERE id = '\(a.id)'"
        )
        let versionError = await serviceError { try await service.decryptDataKey(tenant, id: a.id, request: app) }
        #expect(versionError?.code == .decryptionFailed)

        // B itself is untouched.
        #expect(
            try await service.decryptDataKey(tenant, id: b.id, request: app).plaintext.copyBytes()
                == b.plaintext?.copyBytes())
    }

    @Test(arguments: StoreKind.allCases)
    func rowsSwappedBetweenTenants(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "bind-tenant")
        defer { Task { await harness.close() } }
        let service = harness.service
        let first = tenantID("first")
        let second = tenantID("second")
        _ = try await service.createTenant(first, request: admin)
        _ = try await service.createTenant(second, request: admin)
        let key = try await service.generateDataKey(first, request: app)
        let payload = try await service.encrypt(first, dataKey: key.id, plaintext: Array("secret".utf8), request: app)

        try await harness.sql("UPDATE data_keys SET tenant_id = 'second' WHERE id = '\(key.id)'")
        let asSecond = await serviceError { try await service.decryptDataKey(second, id: key.id, request: app) }
        #expect(asSecond?.code == .decryptionFailed)
        let asFirst = await serviceError { try await service.decryptDataKey(first, id: key.id, request: app) }
        #expect(asFirst?.code == .notFound)
        let payloadAsSecond = await serviceError {
            try await service.decrypt(second, ciphertext: payload, request: app)
        }
        #expect(payloadAsSecond?.code == .decryptionFailed)

        // Back where it belongs, it works again: nothing else was damaged.
        try await harness.sql("UPDATE data_keys SET tenant_id = 'first' WHERE id = '\(key.id)'")
        #expect(try await service.decrypt(first, ciphertext: payload, request: app) == Array("secret".utf8))
    }
}

/// A byte-string literal in the store's SQL dialect.
func blobLiteral(_ kind: StoreKind, _ bytes: [UInt8]) -> String {
    let hex = bytes.map { String(format: "%02x", $0) }.joined()
    switch kind {
    case .postgres: return "'\\x\(hex)'::bytea"
    case .sqlite: return "X'\(hex)'"
    }
}
