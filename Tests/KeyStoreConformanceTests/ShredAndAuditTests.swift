import Foundation
import KeyHierarchy
import Testing

@Suite("Crypto-shred")
struct ShredTests {
    @Test(arguments: StoreKind.allCases)
    func shredDestroysTheTenantsKeysOnly(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "shred")
        defer { Task { await harness.close() } }
        let service = harness.service
        let victim = tenantID("shred")
        let neighbour = tenantID("shredder")  // shares a prefix: must survive
        _ = try await service.createTenant(victim, request: admin)
        _ = try await service.createTenant(neighbour, request: admin)
        let victimKeys = try await service.generateDataKeys(victim, count: 20, request: app)
        _ = try await service.rotateMasterKey(victim, request: admin)
        _ = try await service.generateDataKeys(victim, count: 10, request: app)
        let neighbourKey = try await service.generateDataKey(neighbour, request: app)
        #expect(try await harness.masterKeyLabels(MasterKeyLabel.labelPrefix(for: victim)).count == 2)

        let receipt = try await service.shredTenant(victim, request: admin)
        #expect(receipt.tenant == victim)
        #expect(receipt.destroyedVersions == [1, 2])
        #expect(receipt.dataKeysDeleted == 30)
        #expect(receipt.tokenObjectsDestroyed == 2)
        let records = try await harness.auditRecords()
        let record = try #require(records.first { $0.sequence == receipt.auditSequence })
        #expect(record.hash == receipt.auditHash)
        #expect(record.event.operation == .shredTenant)
        #expect(record.event.keyIDs == ["v1", "v2"])

        // The token no longer holds them (listed straight from the token), the rows are gone,
        // and nothing decrypts.
        #expect(try await harness.masterKeyLabels(MasterKeyLabel.labelPrefix(for: victim)).isEmpty)
        #expect(try await harness.masterKeyLabels() == ["hsmgw:mk:shredder:v1"])
        #expect(try await service.listDataKeys(victim).items.isEmpty)
        let decrypt = await serviceError {
            try await service.decryptDataKey(victim, id: victimKeys[0].id, request: app)
        }
        #expect(decrypt?.code == .failedPrecondition)
        #expect(
            await serviceError { try await service.generateDataKey(victim, request: app) }?.code == .failedPrecondition)
        #expect(try await service.tenant(victim).state == .shredded)
        #expect(try await service.masterKeyVersions(victim).allSatisfy { $0.state == .destroyed })
        #expect(
            await serviceError { try await service.shredTenant(victim, request: admin) }?.code == .failedPrecondition)
        #expect(
            await serviceError { try await service.enableTenant(victim, request: admin) }?.code == .failedPrecondition)

        #expect(try await service.decryptDataKey(neighbour, id: neighbourKey.id, request: app).plaintext.count == 32)
        #expect(try await service.verifyAuditLog().isVerified)
    }
}

@Suite("Audit log")
struct AuditTests {
    enum Tampering: String, CaseIterable, Sendable {
        case edit, delete, insert, reorder, truncate
    }

    static let cases: [(StoreKind, Tampering)] = StoreKind.allCases.flatMap { kind in
        Tampering.allCases.map { (kind, $0) }
    }

    @Test(arguments: cases)
    func verifyPinpointsTampering(kind: StoreKind, tampering: Tampering) async throws {
        let harness = try await ServiceHarness.make(kind, "audit-\(tampering.rawValue)")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("audited")
        _ = try await service.createTenant(tenant, request: admin)
        for _ in 0..<10 {
            _ = try await service.generateDataKey(tenant, request: app)
        }
        let clean = try await service.verifyAuditLog()
        guard case .verified(let count, _) = clean.result else {
            Issue.record("clean log does not verify: \(clean)")
            return
        }
        #expect(count == Int64(try await harness.auditRecords().count))
        #expect(count == 11)  // create, ten generations

        // The append-only guard refuses edits until an attacker with DDL rights removes it.
        await #expect(throws: (any Error).self) {
            try await harness.sql("UPDATE audit_log SET principal = 'mallory' WHERE seq = 5")
        }
        switch kind {
        case .postgres:
            try await harness.sql("ALTER TABLE audit_log DISABLE TRIGGER USER")
        case .sqlite:
            try await harness.sql("DROP TRIGGER audit_log_no_update")
            try await harness.sql("DROP TRIGGER audit_log_no_delete")
        }

        let problem: AuditProblem?
        switch tampering {
        case .edit:
            try await harness.sql("UPDATE audit_log SET principal = 'mallory' WHERE seq = 5")
            problem = try await service.verifyAuditLog().problem
            #expect(problem?.sequence == 5)
            #expect(problem?.kind == .edited)
        case .delete:
            try await harness.sql("DELETE FROM audit_log WHERE seq = 5")
            problem = try await service.verifyAuditLog().problem
            #expect(problem?.sequence == 6)
            #expect(problem?.kind == .missing)
        case .insert:
            // A forged record chained properly after record 4; later records shifted up by one.
            let records = try await harness.auditRecords()
            try await harness.sql("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 5")
            try await harness.sql("UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1005")
            let forged = AuditEvent(
                principal: Principal("admin@test"),
                tenant: tenant,
                operation: .disableTenant,
                requestID: "forged"
            )
            let hash = AuditChain.hash(sequence: 5, event: forged, previousHash: records[3].hash)
            try await harness.sql(
                """
                INSERT INTO audit_log (seq, time, principal, tenant_id, operation, key_ids, outcome, request_id, detail, prev_hash, hash)
                VALUES (5, \(forged.time.millisecondsSinceEpoch), 'admin@test', 'audited', 'tenant.disable', '', 'ok', 'forged', '',
                \(blobLiteral(kind, records[3].hash)), \(blobLiteral(kind, hash)))
                """
            )
            problem = try await service.verifyAuditLog().problem
            #expect(problem?.sequence == 6)
        case .reorder:
            try await harness.sql("UPDATE audit_log SET seq = -1 WHERE seq = 5")
            try await harness.sql("UPDATE audit_log SET seq = 5 WHERE seq = 6")
            try await harness.sql("UPDATE audit_log SET seq = 6 WHERE seq = -1")
            problem = try await service.verifyAuditLog().problem
            #expect(problem?.sequence == 5)
        case .truncate:
            try await harness.sql("DELETE FROM audit_log WHERE seq >= 10")
            problem = try await service.verifyAuditLog().problem
            #expect(problem?.sequence == 10)
            #expect(problem?.kind == .missing)
        }
        #expect(problem != nil)
    }

    @Test(arguments: StoreKind.allCases)
    func failingAuditWriteFailsTheOperationAndChangesNothing(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "auditfail")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("failclosed")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)
        let recordsBefore = try await harness.auditRecords().count
        let labelsBefore = try await harness.masterKeyLabels()

        switch kind {
        case .postgres:
            try await harness.sql(
                "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'audit store refused'; END $$"
            )
            try await harness.sql(
                "CREATE TRIGGER audit_log_fail BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
            )
        case .sqlite:
            try await harness.sql(
                "CREATE TRIGGER audit_log_fail BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit store refused'); END"
            )
        }

        let generate = await serviceError { try await service.generateDataKey(tenant, request: app) }
        #expect(generate != nil)
        #expect(try await service.listDataKeys(tenant).items.map(\.id) == [key.id])

        let create = await serviceError { try await service.createTenant(tenantID("never"), request: admin) }
        #expect(create != nil)
        #expect(await serviceError { try await service.tenant(tenantID("never")) }?.code == .notFound)

        let rotate = await serviceError { try await service.rotateMasterKey(tenant, request: admin) }
        #expect(rotate != nil)
        #expect(try await service.masterKeyVersions(tenant).count == 1)
        // The master keys generated for the refused calls were destroyed again.
        #expect(try await harness.masterKeyLabels() == labelsBefore)

        let disable = await serviceError { try await service.disableDataKey(tenant, id: key.id, request: admin) }
        #expect(disable != nil)
        #expect(try await service.dataKey(tenant, id: key.id).state == .enabled)

        // Decrypt is a key use: without its audit record it is refused too.
        let decrypt = await serviceError { try await service.decryptDataKey(tenant, id: key.id, request: app) }
        #expect(decrypt != nil)
        let encrypt = await serviceError {
            try await service.encrypt(tenant, dataKey: key.id, plaintext: [1], request: app)
        }
        #expect(encrypt != nil)
        #expect(try await service.dataKey(tenant, id: key.id).encryptions == 0)

        switch kind {
        case .postgres: try await harness.sql("DROP TRIGGER audit_log_fail ON audit_log")
        case .sqlite: try await harness.sql("DROP TRIGGER audit_log_fail")
        }
        #expect(try await harness.auditRecords().count == recordsBefore)
        _ = try await service.generateDataKey(tenant, request: app)
        #expect(try await service.verifyAuditLog().isVerified)
    }
}
