import KeyHierarchy
import Testing

/// Master-key version states (NIST SP 800-57): every allowed and every refused transition, what
/// each state lets a version do, and scheduled destruction with cancel.
@Suite("Master-key lifecycle")
struct LifecycleTests {
    @Test(arguments: StoreKind.allCases)
    func everyTransition(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "transitions")
        defer { Task { await harness.close() } }
        let service = harness.service
        var index = 0
        for from in MasterKeyState.allCases {
            for to in MasterKeyState.allCases {
                index += 1
                let tenant = tenantID("t\(index)")
                let subject = try await Self.version(in: from, tenant: tenant, harness: harness)
                let error = await serviceError {
                    try await service.setMasterKeyState(tenant, version: subject, to: to, request: admin)
                }
                // Destruction goes through scheduling; nothing returns to pre-active.
                let allowed =
                    from.canTransition(to: to) && to != .destroyed && to != .destroying && to != .preActive
                if allowed {
                    #expect(error == nil, "\(from) → \(to) should be allowed: \(String(describing: error))")
                    #expect(try await service.masterKeyVersions(tenant)[subject - 1].state == to)
                } else {
                    #expect(error?.code == .failedPrecondition, "\(from) → \(to) should be refused")
                    #expect(try await service.masterKeyVersions(tenant)[subject - 1].state == from)
                }
            }
        }
        // Refusals are audited as failures; the log still verifies.
        let failures = try await harness.auditRecords().filter {
            $0.event.operation == .changeMasterKeyState && $0.event.outcome != .success
        }
        #expect(!failures.isEmpty)
        #expect(try await service.verifyAuditLog().isVerified)
    }

    /// Creates `tenant` and brings a non-primary version into `state`; returns its number.
    static func version(in state: MasterKeyState, tenant: TenantID, harness: ServiceHarness) async throws
        -> MasterKeyVersionNumber
    {
        let service = harness.service
        _ = try await service.createTenant(tenant, request: admin)
        if state == .preActive {
            return try await service.rotateMasterKey(tenant, activate: false, request: admin).version
        }
        _ = try await service.rotateMasterKey(tenant, request: admin)
        switch state {
        case .active:
            break
        case .suspended, .deactivated, .compromised:
            _ = try await service.setMasterKeyState(tenant, version: 1, to: state, request: admin)
        case .destroyed:
            _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
            let scheduled = try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin)
            _ = try await service.destroyDueMasterKeys(now: scheduled.destroyAfter!)
        case .destroying:
            // What a destruction interrupted between its checked transaction and the token leaves.
            _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
            _ = try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin)
            try await harness.sql(
                "UPDATE master_key_versions SET state = 'destroying' WHERE tenant_id = '\(tenant)' AND version = 1")
        case .preActive:
            preconditionFailure()
        }
        return 1
    }

    @Test(arguments: StoreKind.allCases)
    func whatEachStateAllows(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "stateuse")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("use")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)

        // Suspending the primary stops new keys; existing keys still decrypt.
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .suspended, request: admin)
        #expect(
            await serviceError { try await service.generateDataKey(tenant, request: app) }?.code == .failedPrecondition)
        #expect(try await service.decryptDataKey(tenant, id: key.id, request: app).plaintext.count == 32)
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .active, request: admin)
        _ = try await service.generateDataKey(tenant, request: app)

        // The primary cannot be deactivated or scheduled for destruction.
        #expect(
            await serviceError {
                try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
            }?
            .code == .failedPrecondition
        )
        #expect(
            await serviceError { try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition
        )

        // Deactivated: decrypts, cannot wrap.
        _ = try await service.rotateMasterKey(tenant, request: admin)
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
        #expect(try await service.decryptDataKey(tenant, id: key.id, request: app).version == 1)

        // Compromised: no decrypt for callers, but rewrap moves the key off it.
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .compromised, request: admin)
        #expect(
            await serviceError { try await service.decryptDataKey(tenant, id: key.id, request: app) }?.code
                == .failedPrecondition)
        #expect(
            await serviceError { try await service.encrypt(tenant, dataKey: key.id, plaintext: [1], request: app) }?
                .code
                == .failedPrecondition
        )
        let moved = try await service.rewrapDataKey(tenant, id: key.id, request: app)
        #expect(moved.version == 2)
        #expect(
            try await service.decryptDataKey(tenant, id: key.id, request: app).plaintext.copyBytes()
                == key.plaintext?.copyBytes())
        #expect(
            await serviceError { try await service.activateMasterKey(tenant, version: 1, request: admin) }?.code
                == .failedPrecondition)
        #expect(
            await serviceError {
                try await service.setMasterKeyState(tenant, version: 9, to: .suspended, request: admin)
            }?.code == .notFound)
    }

    @Test(arguments: StoreKind.allCases)
    func scheduledDestructionAndCancel(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "schedule")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("sched")
        _ = try await service.createTenant(tenant, request: admin)
        _ = try await service.rotateMasterKey(tenant, request: admin)

        // Active (non-primary) must be deactivated first.
        #expect(
            await serviceError { try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition
        )
        _ = try await service.setMasterKeyState(tenant, version: 1, to: .deactivated, request: admin)
        for days in [0, 6, 366] {
            let error = await serviceError {
                try await service.scheduleMasterKeyDestruction(
                    tenant, version: 1, waitingPeriodDays: days, request: admin)
            }
            #expect(error?.code == .invalidArgument)
        }
        let scheduled = try await service.scheduleMasterKeyDestruction(
            tenant,
            version: 1,
            waitingPeriodDays: 7,
            request: admin
        )
        let due = try #require(scheduled.destroyAfter)
        #expect(
            await serviceError { try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition
        )
        let cancelled = try await service.cancelMasterKeyDestruction(tenant, version: 1, request: admin)
        #expect(cancelled.destroyAfter == nil)
        #expect(cancelled.state == .deactivated)
        #expect(
            await serviceError { try await service.cancelMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition
        )
        // Cancelled: nothing is destroyed even long after the old due date.
        #expect(try await service.destroyDueMasterKeys(now: due.adding(days: 30)).isEmpty)
        #expect(try await harness.masterKeyLabels().count == 2)

        let again = try await service.scheduleMasterKeyDestruction(tenant, version: 1, request: admin)
        #expect(try await service.destroyDueMasterKeys(now: again.destroyAfter!.adding(days: -1)).isEmpty)
        #expect(try await service.destroyDueMasterKeys(now: again.destroyAfter!).map(\.version) == [1])
        #expect(try await harness.masterKeyLabels() == ["hsmgw:mk:sched:v2"])
        #expect(
            await serviceError { try await service.cancelMasterKeyDestruction(tenant, version: 1, request: admin) }?
                .code == .failedPrecondition
        )
    }
}
