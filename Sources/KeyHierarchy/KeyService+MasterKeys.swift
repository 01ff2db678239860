extension KeyService {
    /// How often a rotation that lost a race for its version number is tried again.
    static let rotationAttempts = 10

    /// A tenant's master-key versions, oldest first.
    public func masterKeyVersions(_ tenant: TenantID) async throws(KeyServiceError) -> [MasterKeyVersionRecord] {
        try await mapErrors {
            try await self.repository.read { transaction in
                guard try await transaction.tenant(tenant, forUpdate: false) != nil else {
                    throw KeyServiceError(.notFound, "tenant \(tenant) not found")
                }
                return try await transaction.masterKeyVersions(tenant)
            }
        }
    }

    /// Rotates: generates the next version in the token. With `activate` (the default) it is
    /// active and becomes the primary at once; otherwise it is pre-active until
    /// `activateMasterKey`. Earlier versions keep their state (they decrypt and rewrap).
    public func rotateMasterKey(
        _ tenant: TenantID,
        activate: Bool = true,
        idempotencyKey: String? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        try await audited(.rotateMasterKey, tenant: tenant, request: request) {
            () async throws -> MasterKeyVersionRecord in
            let fingerprint = Self.fingerprint(AuditOperation.rotateMasterKey.rawValue, tenant.rawValue, "\(activate)")
            if let key = idempotencyKey,
                let replay = try await self.replay(scope: tenant.rawValue, key: key, .rotateMasterKey, fingerprint)
            {
                guard let number = Int(replay),
                    let version = try await self.repository.read({ try await $0.masterKeyVersion(tenant, number) })
                else { throw KeyServiceError(.dataLoss, "idempotent result no longer exists") }
                return version
            }
            do {
                return try await self.rotate(
                    tenant,
                    activate: activate,
                    expectedPrimary: nil,
                    idempotency: idempotencyKey.map { ($0, fingerprint) },
                    request: request
                )
            } catch  where idempotencyKey != nil && Self.isDuplicate(error) {
                // A concurrent call with the same idempotency key committed first.
                guard let key = idempotencyKey,
                    let replay = try await self.replay(scope: tenant.rawValue, key: key, .rotateMasterKey, fingerprint),
                    let number = Int(replay),
                    let version = try await self.repository.read({ try await $0.masterKeyVersion(tenant, number) })
                else { throw error }
                return version
            }
        }
    }

    /// Generates version n+1 in the token and records it. With `expectedPrimary`, the rotation
    /// happens only if that version is still the primary (automatic rotation at the invocation
    /// limit: when several callers hit the limit at once, one rotation is enough).
    func rotate(
        _ tenant: TenantID,
        activate: Bool,
        expectedPrimary: MasterKeyVersionNumber?,
        idempotency: (key: String, fingerprint: [UInt8])? = nil,
        request: RequestContext
    ) async throws -> MasterKeyVersionRecord {
        // Concurrent rotations of one tenant pick the same next number; the loser tries the next.
        for _ in 0..<Self.rotationAttempts {
            let (tenantRecord, versions) = try await repository.read { transaction in
                (
                    try await transaction.tenant(tenant, forUpdate: false),
                    try await transaction.masterKeyVersions(tenant)
                )
            }
            guard let tenantRecord else { throw KeyServiceError(.notFound, "tenant \(tenant) not found") }
            guard tenantRecord.state != .shredded else {
                throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is shredded")
            }
            if let expectedPrimary, tenantRecord.primaryVersion != expectedPrimary,
                let current = versions.first(where: { $0.version == tenantRecord.primaryVersion })
            {
                return current
            }
            let number = (versions.map(\.version).max() ?? 0) + 1
            let tokenKeyID = TokenKeyID.random()
            try await token.generateMasterKey(
                id: tokenKeyID, label: MasterKeyLabel.label(tenant: tenant, version: number))
            do {
                let committed = try await committer.commit { transaction -> UnitOutcome<MasterKeyVersionRecord?> in
                    guard var current = try await transaction.tenant(tenant, forUpdate: true),
                        current.state != .shredded
                    else { throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is not available") }
                    if let expectedPrimary, current.primaryVersion != expectedPrimary {
                        return UnitOutcome(nil, audit: [])
                    }
                    let now = Timestamp.now()
                    let record = MasterKeyVersionRecord(
                        tenant: tenant,
                        version: number,
                        state: activate ? .active : .preActive,
                        tokenKeyID: tokenKeyID,
                        createdAt: now,
                        updatedAt: now
                    )
                    try await transaction.insertMasterKeyVersion(record)
                    if activate {
                        current.primaryVersion = number
                        current.updatedAt = now
                        try await transaction.updateTenant(current)
                    }
                    if let idempotency {
                        try await self.rememberIdempotent(
                            transaction,
                            scope: tenant.rawValue,
                            key: idempotency.key,
                            .rotateMasterKey,
                            idempotency.fingerprint,
                            result: "\(number)"
                        )
                    }
                    return UnitOutcome(
                        record,
                        audit: [
                            AuditEvent(
                                time: now,
                                principal: request.principal,
                                tenant: tenant,
                                operation: .rotateMasterKey,
                                keyIDs: ["v\(number)"],
                                requestID: request.requestID,
                                detail:
                                    "state=\(record.state.rawValue) primary=\(activate ? number : current.primaryVersion)"
                                    + (expectedPrimary != nil ? " reason=invocation-limit" : "")
                            )
                        ]
                    )
                }
                guard let record = committed.value else {
                    // Another caller rotated first: the new object is not needed.
                    _ = try? await token.destroyMasterKey(id: tokenKeyID)
                    continue
                }
                tokenKeyIDs.withLock { $0[VersionRef(tenant: tenant, version: number)] = tokenKeyID }
                if activate { primaryVersions.withLock { $0[tenant] = number } }
                logger.info(
                    "master key rotated",
                    metadata: ["tenant": "\(tenant)", "version": "\(number)", "request": "\(request.requestID)"]
                )
                return record
            } catch let error as StorageError where error.kind == .uniqueViolation || error.kind == .conflict {
                // A concurrent rotation took the same version number, or a lock race was lost:
                // nothing was stored; try again.
                _ = try? await token.destroyMasterKey(id: tokenKeyID)
                continue
            } catch {
                _ = try? await token.destroyMasterKey(id: tokenKeyID)
                throw error
            }
        }
        throw KeyServiceError(.aborted, "concurrent rotations; retry")
    }

    /// Makes a pre-active version active and the primary.
    public func activateMasterKey(
        _ tenant: TenantID,
        version: MasterKeyVersionNumber,
        request: RequestContext
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        try await changeVersion(tenant, version, operation: .activateMasterKey, request: request) {
            version, tenantRecord in
            guard version.state == .preActive else {
                throw KeyServiceError(.failedPrecondition, "only a pre-active version can be activated")
            }
            version.state = .active
            tenantRecord.primaryVersion = version.version
            return "state=active primary=\(version.version)"
        }
    }

    /// Moves a version to `state`: suspended, deactivated, compromised, or active again from
    /// suspended. Destruction goes through `scheduleMasterKeyDestruction`; the primary cannot
    /// leave the active state except to suspended or compromised (rotate first to retire it).
    public func setMasterKeyState(
        _ tenant: TenantID,
        version: MasterKeyVersionNumber,
        to state: MasterKeyState,
        request: RequestContext
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        try await changeVersion(tenant, version, operation: .changeMasterKeyState, request: request) {
            version,
            tenantRecord in
            guard state != .destroyed, state != .preActive else {
                throw KeyServiceError(
                    .failedPrecondition,
                    state == .destroyed
                        ? "destruction must be scheduled (scheduleMasterKeyDestruction)"
                        : "a version cannot return to pre-active"
                )
            }
            guard version.state.canTransition(to: state) else {
                throw KeyServiceError(
                    .failedPrecondition,
                    "a \(version.state.rawValue) version cannot become \(state.rawValue)"
                )
            }
            if version.version == tenantRecord.primaryVersion, state == .deactivated {
                throw KeyServiceError(
                    .failedPrecondition,
                    "the primary version cannot be deactivated; rotate first"
                )
            }
            let from = version.state
            version.state = state
            return "state=\(state.rawValue) from=\(from.rawValue)"
        }
    }

    /// Schedules destruction of a version after a waiting period (default from the
    /// configuration, at least 7 days). Refused for the primary, for states other than
    /// pre-active, deactivated and compromised, and while any data key is wrapped under it.
    public func scheduleMasterKeyDestruction(
        _ tenant: TenantID,
        version: MasterKeyVersionNumber,
        waitingPeriodDays: Int? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        let days = waitingPeriodDays ?? configuration.destructionWaitingPeriodDays
        return try await changeVersion(tenant, version, operation: .scheduleMasterKeyDestruction, request: request) {
            version,
            tenantRecord in
            guard
                (KeyServiceConfiguration
                    .minimumDestructionWaitingPeriodDays...KeyServiceConfiguration
                    .maximumDestructionWaitingPeriodDays).contains(days)
            else {
                throw KeyServiceError(
                    .invalidArgument,
                    "waiting period must be \(KeyServiceConfiguration.minimumDestructionWaitingPeriodDays) to \(KeyServiceConfiguration.maximumDestructionWaitingPeriodDays) days"
                )
            }
            guard version.version != tenantRecord.primaryVersion else {
                throw KeyServiceError(.failedPrecondition, "the primary version cannot be destroyed; rotate first")
            }
            guard version.state.canScheduleDestruction else {
                throw KeyServiceError(
                    .failedPrecondition,
                    "a \(version.state.rawValue) version cannot be scheduled for destruction; deactivate it first"
                )
            }
            guard version.destroyAfter == nil else {
                throw KeyServiceError(.failedPrecondition, "destruction is already scheduled")
            }
            version.destroyAfter = Timestamp.now().adding(days: days)
            return "destroy-after=\(version.destroyAfter!.millisecondsSinceEpoch) days=\(days)"
        } check: { transaction, version in
            let referencing = try await transaction.countLiveDataKeys(tenant, version: version.version)
            guard referencing == 0 else {
                throw KeyServiceError(
                    .failedPrecondition,
                    "\(referencing) data keys are still wrapped under version \(version.version); run the rewrap job first"
                )
            }
        }
    }

    /// Cancels a scheduled destruction; the version keeps its state.
    public func cancelMasterKeyDestruction(
        _ tenant: TenantID,
        version: MasterKeyVersionNumber,
        request: RequestContext
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        try await changeVersion(tenant, version, operation: .cancelMasterKeyDestruction, request: request) {
            version,
            _ in
            guard version.destroyAfter != nil, version.state != .destroyed else {
                throw KeyServiceError(.failedPrecondition, "no destruction is scheduled")
            }
            version.destroyAfter = nil
            return "cancelled"
        }
    }

    /// Carries out every scheduled destruction that is due at `now`: destroys the key object in
    /// the token, then marks the version destroyed. A version that data keys reference again
    /// (they cannot, but storage is shared) is skipped and stays scheduled. Returns the
    /// versions destroyed.
    public func destroyDueMasterKeys(
        now: Timestamp = .now(),
        request: RequestContext = .system()
    ) async throws(KeyServiceError) -> [MasterKeyVersionRecord] {
        try await mapErrors {
            let due = try await self.repository.read { try await $0.versionsDueForDestruction(now: now, limit: 100) }
            var destroyed: [MasterKeyVersionRecord] = []
            for candidate in due {
                let references = try await self.repository.read {
                    try await $0.countLiveDataKeys(candidate.tenant, version: candidate.version)
                }
                guard references == 0 else {
                    self.logger.warning(
                        "scheduled destruction skipped: data keys reference the version",
                        metadata: ["tenant": "\(candidate.tenant)", "version": "\(candidate.version)"]
                    )
                    continue
                }
                _ = try await self.token.destroyMasterKey(id: candidate.tokenKeyID)
                let record = try await self.committer.commit { transaction -> UnitOutcome<MasterKeyVersionRecord?> in
                    guard var version = try await transaction.masterKeyVersion(candidate.tenant, candidate.version),
                        version.state != .destroyed, version.destroyAfter != nil
                    else { return UnitOutcome(nil, audit: []) }
                    let time = Timestamp.now()
                    version.state = .destroyed
                    version.destroyedAt = time
                    version.destroyAfter = nil
                    version.updatedAt = time
                    try await transaction.updateMasterKeyVersion(version)
                    return UnitOutcome(
                        version,
                        audit: [
                            AuditEvent(
                                time: time,
                                principal: request.principal,
                                tenant: candidate.tenant,
                                operation: .destroyMasterKey,
                                keyIDs: ["v\(candidate.version)"],
                                requestID: request.requestID
                            )
                        ]
                    )
                }.value
                if let record {
                    self.counters.forget(VersionRef(tenant: candidate.tenant, version: candidate.version))
                    destroyed.append(record)
                }
            }
            return destroyed
        }
    }

    /// Loads version and tenant for update, lets `change` edit them (returning an audit detail),
    /// runs `check` in the same transaction, writes both, audits.
    private func changeVersion(
        _ tenant: TenantID,
        _ number: MasterKeyVersionNumber,
        operation: AuditOperation,
        request: RequestContext,
        _ change: @escaping @Sendable (inout MasterKeyVersionRecord, inout TenantRecord) throws -> String,
        check: (@Sendable (any KeyRepositoryTransaction, MasterKeyVersionRecord) async throws -> Void)? = nil
    ) async throws(KeyServiceError) -> MasterKeyVersionRecord {
        try await audited(operation, tenant: tenant, keyIDs: ["v\(number)"], request: request) {
            () async throws -> MasterKeyVersionRecord in
            let record = try await self.committer.commit { transaction in
                guard var tenantRecord = try await transaction.tenant(tenant, forUpdate: true) else {
                    throw KeyServiceError(.notFound, "tenant \(tenant) not found")
                }
                guard tenantRecord.state != .shredded else {
                    throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is shredded")
                }
                guard var version = try await transaction.masterKeyVersion(tenant, number) else {
                    throw KeyServiceError(.notFound, "version \(number) of tenant \(tenant) not found")
                }
                let primaryBefore = tenantRecord.primaryVersion
                let detail = try change(&version, &tenantRecord)
                try await check?(transaction, version)
                let now = Timestamp.now()
                version.updatedAt = now
                try await transaction.updateMasterKeyVersion(version)
                if tenantRecord.primaryVersion != primaryBefore {
                    tenantRecord.updatedAt = now
                    try await transaction.updateTenant(tenantRecord)
                }
                return UnitOutcome(
                    version,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: tenant,
                            operation: operation,
                            keyIDs: ["v\(number)"],
                            requestID: request.requestID,
                            detail: detail
                        )
                    ]
                )
            }.value
            self.primaryVersions.withLock { _ = $0.removeValue(forKey: tenant) }
            return record
        }
    }

    /// The `CKA_ID` of a version (cached; versions never change their key object).
    func tokenKeyID(_ version: VersionRef) async throws -> TokenKeyID {
        if let cached = tokenKeyIDs.withLock({ $0[version] }) { return cached }
        guard let record = try await repository.read({ try await $0.masterKeyVersion(version.tenant, version.version) })
        else {
            throw KeyServiceError(.notFound, "version \(version.version) of tenant \(version.tenant) not found")
        }
        tokenKeyIDs.withLock { $0[version] = record.tokenKeyID }
        return record.tokenKeyID
    }
}
