import Foundation
import KeyHierarchy
import Testing

/// Destruction that cannot hit a key in use: activation refuses a scheduled destruction, due
/// destruction re-checks "not primary, no data key references it" in the locked transaction that
/// marks the version `destroying`, an interrupted destruction or shred is finished by the next
/// run, and no data key acknowledged to a caller ever becomes undecryptable, even with
/// destruction racing generation.
@Suite("Master-key destruction")
struct DestructionTests {
    @Test(arguments: StoreKind.allCases)
    func scheduledVersionCannotBeActivated(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "noactivate")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("noactivate")
        _ = try await service.createTenant(tenant, request: admin)
        let pending = try await service.rotateMasterKey(tenant, activate: false, request: admin)
        #expect(pending.state == .preActive)
        _ = try await service.scheduleMasterKeyDestruction(tenant, version: pending.version, request: admin)

        let activate = await serviceError {
            try await service.activateMasterKey(tenant, version: pending.version, request: admin)
        }
        #expect(activate?.code == .failedPrecondition)
        #expect(activate?.message.contains("scheduled for destruction") == true)
        // Nor by a state change: a scheduled version only moves between states that may be destroyed.
        let toActive = await serviceError {
            try await service.setMasterKeyState(tenant, version: pending.version, to: .active, request: admin)
        }
        #expect(toActive?.code == .failedPrecondition)
        _ = try await service.setMasterKeyState(tenant, version: pending.version, to: .compromised, request: admin)
        #expect(try await service.tenant(tenant).primaryVersion == 1)

        // Cancelled, a pre-active version can be activated as usual.
        let fresh = try await service.rotateMasterKey(tenant, activate: false, request: admin)
        _ = try await service.scheduleMasterKeyDestruction(tenant, version: fresh.version, request: admin)
        _ = try await service.cancelMasterKeyDestruction(tenant, version: fresh.version, request: admin)
        let activated = try await service.activateMasterKey(tenant, version: fresh.version, request: admin)
        #expect(activated.state == .active)
        #expect(activated.destroyAfter == nil)
        #expect(try await service.tenant(tenant).primaryVersion == fresh.version)
    }

    /// The due run re-reads the version and the tenant under the tenant's lock: a version that
    /// became the primary, or that data keys reference again (both only by editing the database),
    /// is not destroyed, and its token object stays.
    @Test(arguments: StoreKind.allCases)
    func dueDestructionRechecksInItsTransaction(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "recheck")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("recheck")
        _ = try await service.createTenant(tenant, request: admin)
        _ = try await service.rotateMasterKey(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
        let scheduled = try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin)
        let due = try #require(scheduled.destroyAfter)

        // A data key row pointed back at v1.
        try await harness.sql("UPDATE data_keys SET version = 1 WHERE id = '\(key.id)'")
        #expect(try await service.destroyDueMasterKeys(now: due).isEmpty)
        var v1 = try await service.masterKeyVersions(tenant)[0]
        #expect(v1.state == .deactivated)
        #expect(v1.destroyAfter == due)
        #expect(try await harness.masterKeyLabels().contains("hsmgw:mk:recheck:v1"))
        try await harness.sql("UPDATE data_keys SET version = 2 WHERE id = '\(key.id)'")

        // v1 made the primary again.
        try await harness.sql("UPDATE tenants SET primary_version = 1 WHERE id = 'recheck'")
        #expect(try await service.destroyDueMasterKeys(now: due).isEmpty)
        v1 = try await service.masterKeyVersions(tenant)[0]
        #expect(v1.state == .deactivated)
        #expect(try await harness.masterKeyLabels().contains("hsmgw:mk:recheck:v1"))
        try await harness.sql("UPDATE tenants SET primary_version = 2 WHERE id = 'recheck'")

        // Put right, it is destroyed; the key under v2 was never touched.
        #expect(try await service.destroyDueMasterKeys(now: due).map(\.version) == [1])
        #expect(try await harness.masterKeyLabels() == ["hsmgw:mk:recheck:v2"])
        #expect(
            try await service.decryptDataKey(tenant, id: key.id, request: app).plaintext.copyBytes()
                == key.plaintext?.copyBytes())
        let phases = try await harness.auditRecords().filter { $0.event.operation == .destroyMasterKey }.map(
            \.event.detail)
        #expect(phases == ["phase=destroying from=deactivated", "phase=destroyed token-object=destroyed"])
    }

    /// A run interrupted after marking the version `destroying`, before or after the token step:
    /// the next run finishes it.
    @Test(arguments: StoreKind.allCases, [false, true])
    func interruptedDestructionIsFinished(kind: StoreKind, tokenObjectAlreadyGone: Bool) async throws {
        let harness = try await ServiceHarness.make(kind, "finish")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("finish")
        _ = try await service.createTenant(tenant, request: admin)
        _ = try await service.rotateMasterKey(tenant, request: admin)
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
        let scheduled = try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin)
        try await harness.sql("UPDATE master_key_versions SET state = 'destroying' WHERE version = 1")
        if tokenObjectAlreadyGone {
            #expect(try await harness.token.destroyMasterKey(id: scheduled.tokenKeyID))
        }
        // Nothing may use a destroying version, and its destruction cannot be cancelled any more.
        #expect(
            await serviceError { try await service.cancelMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition)
        #expect(!MasterKeyState.destroying.allowsDecrypt && !MasterKeyState.destroying.allowsRewrapFrom)

        let destroyed = try await service.destroyDueMasterKeys(now: scheduled.destroyAfter!)
        #expect(destroyed.map(\.version) == [1])
        #expect(destroyed.first?.state == .destroyed)
        #expect(try await harness.masterKeyLabels() == ["hsmgw:mk:finish:v2"])
        let last = try await harness.auditRecords().last
        #expect(last?.event.detail == "phase=destroyed token-object=\(tokenObjectAlreadyGone ? "absent" : "destroyed")")
        #expect(try await service.destroyDueMasterKeys(now: scheduled.destroyAfter!.adding(days: 1)).isEmpty)
    }

    /// Destruction racing generation, a cancellation and an activation, round after round in
    /// varying order: whichever wins, every data key acknowledged to a caller decrypts to the
    /// plaintext it was given, and a destroyed version wraps none of them.
    @Test(arguments: StoreKind.allCases)
    func destructionRacingGenerationLosesNoAcknowledgedKey(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "race")
        defer { Task { await harness.close() } }
        let service = harness.service
        var outcomes: [String: Int] = [:]
        for round in 0..<6 {
            let tenant = tenantID("race\(round)")
            _ = try await service.createTenant(tenant, request: admin)
            let pending = try await service.rotateMasterKey(tenant, activate: false, request: admin)
            let scheduled = try await service.scheduleMasterKeyDestruction(
                tenant, version: pending.version, request: admin)
            let due = try #require(scheduled.destroyAfter)
            let acknowledged = try await withThrowingTaskGroup(of: [GeneratedDataKey].self) { group in
                for _ in 0..<6 {
                    group.addTask {
                        var keys: [GeneratedDataKey] = []
                        for _ in 0..<15 {
                            keys.append(try await service.generateDataKey(tenant, request: app))
                        }
                        return keys
                    }
                }
                group.addTask {
                    // Cancel and activate, while the destruction runs.
                    if round % 2 == 1 { try await Task.sleep(for: .milliseconds(round * 3)) }
                    _ = try? await service.cancelMasterKeyDestruction(tenant, version: pending.version, request: admin)
                    _ = try? await service.activateMasterKey(tenant, version: pending.version, request: admin)
                    return []
                }
                group.addTask {
                    if round % 2 == 0 { try await Task.sleep(for: .milliseconds(round * 3)) }
                    _ = try await service.destroyDueMasterKeys(now: due)
                    return []
                }
                return try await group.reduce(into: []) { $0 += $1 }
            }
            #expect(acknowledged.count == 90)
            let versions = try await service.masterKeyVersions(tenant)
            let v2 = try #require(versions.first { $0.version == pending.version })
            outcomes[v2.state.rawValue, default: 0] += 1
            #expect(v2.state == .destroyed || v2.state == .active, "v2 is \(v2.state)")
            if v2.state == .destroyed {
                #expect(acknowledged.allSatisfy { $0.version == 1 })
            }
            for key in acknowledged {
                let decrypted = try await service.decryptDataKey(tenant, id: key.id, request: app)
                #expect(decrypted.plaintext.copyBytes() == key.plaintext?.copyBytes())
            }
        }
        print("destruction race outcomes for v2 over 6 rounds (\(kind)): \(outcomes)")
        #expect(try await service.verifyAuditLog().isVerified)
    }

    /// A shred interrupted after its first transaction (tenant shredded, keys deleted, versions
    /// destroying, token objects still there) is finished by calling it again, and by the
    /// destruction run.
    @Test(arguments: StoreKind.allCases, [false, true])
    func interruptedShredIsFinished(kind: StoreKind, byDestructionRun: Bool) async throws {
        let harness = try await ServiceHarness.make(kind, "shredfinish")
        defer { Task { await harness.close() } }
        let tenant = tenantID("gone")
        _ = try await harness.service.createTenant(tenant, request: admin)
        _ = try await harness.service.rotateMasterKey(tenant, request: admin)
        _ = try await harness.service.generateDataKeys(tenant, count: 5, request: app)
        let now = Timestamp.now().millisecondsSinceEpoch
        try await harness.sql("UPDATE tenants SET state = 'shredded' WHERE id = 'gone'")
        try await harness.sql(
            "UPDATE master_key_versions SET state = 'destroying', destroy_after = \(now) WHERE tenant_id = 'gone'")
        try await harness.sql("DELETE FROM data_keys WHERE tenant_id = 'gone'")
        #expect(try await harness.masterKeyLabels().count == 2)
        // The interruption was a crash: what follows runs in a restarted gateway.
        let service = try harness.restarted()

        if byDestructionRun {
            let destroyed = try await service.destroyDueMasterKeys(now: Timestamp(millisecondsSinceEpoch: now))
            #expect(destroyed.map(\.version).sorted() == [1, 2])
        } else {
            let again = await serviceError { try await service.shredTenant(tenant, request: admin) }
            #expect(again?.code == .failedPrecondition)
        }
        #expect(try await harness.masterKeyLabels().isEmpty)
        #expect(try await service.masterKeyVersions(tenant).allSatisfy { $0.state == .destroyed })
        #expect(
            await serviceError { try await service.generateDataKey(tenant, request: app) }?.code == .failedPrecondition)
    }
}
