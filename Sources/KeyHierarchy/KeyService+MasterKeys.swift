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

    /// The automatic rotation when `primary` reached its invocation limit. Every caller that hits
    /// the limit at once waits for one rotation in this process (instead of each generating a
    /// master key in the token that all but one then destroy); across instances the conditional
    /// commit (`expectedPrimary`) still lets only one rotation win. A transient token failure is
    /// tried again, so a caller under load is handed the new primary, not an internal error.
    func rotateAtInvocationLimit(
        _ tenant: TenantID,
        primary: MasterKeyVersionNumber,
        request: RequestContext
    ) async throws {
        let key = VersionRef(tenant: tenant, version: primary)
        let (task, leader) = automaticRotations.withLock { rotations -> (Task<Void, any Error>, Bool) in
            if let running = rotations[key] { return (running, false) }
            let task = Task {
                var lastError: (any Error)?
                for attempt in 1...Self.automaticRotationAttempts {
                    do {
                        _ = try await self.rotate(
                            tenant, activate: true, expectedPrimary: primary, request: .system(request.requestID))
                        return
                    } catch let error as TokenError where error.kind == .other || error.kind == .unavailable {
                        lastError = error
                        self.logger.warning(
                            "automatic rotation: the token failed; trying again",
                            metadata: ["tenant": "\(tenant)", "attempt": "\(attempt)", "error": "\(error)"]
                        )
                        try await Task.sleep(for: .milliseconds(50 * attempt))
                    }
                }
                throw lastError ?? KeyServiceError(.internalError, "automatic rotation failed")
            }
            rotations[key] = task
            return (task, true)
        }
        defer {
            if leader { automaticRotations.withLock { _ = $0.removeValue(forKey: key) } }
        }
        try await task.value
    }

    /// How often the automatic rotation tries a token operation that failed.
    static let automaticRotationAttempts = 3

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
                cache.setTokenKey(
                    VersionRef(tenant: tenant, version: number),
                    TokenKeyReference(id: tokenKeyID, tenant: tenant, version: number))
                if activate { cache.setPrimary(tenant, number) }
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
            // A version that becomes the primary wraps new data keys; one that is due to be
            // destroyed must never be that version.
            guard version.destroyAfter == nil else {
                throw KeyServiceError(
                    .failedPrecondition,
                    "version \(version.version) is scheduled for destruction; cancel the destruction first"
                )
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
            guard state != .destroyed, state != .destroying, state != .preActive else {
                throw KeyServiceError(
                    .failedPrecondition,
                    state == .preActive
                        ? "a version cannot return to pre-active"
                        : "destruction must be scheduled (scheduleMasterKeyDestruction)"
                )
            }
            if version.destroyAfter != nil, !state.canScheduleDestruction {
                throw KeyServiceError(
                    .failedPrecondition,
                    "version \(version.version) is scheduled for destruction; cancel the destruction first"
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
            guard version.state != .destroying else {
                throw KeyServiceError(.failedPrecondition, "destruction has begun and cannot be cancelled")
            }
            guard version.destroyAfter != nil, version.state != .destroyed else {
                throw KeyServiceError(.failedPrecondition, "no destruction is scheduled")
            }
            version.destroyAfter = nil
            return "cancelled"
        }
    }

    /// Carries out every scheduled destruction that is due at `now`, in three steps:
    ///
    /// 1. In one transaction that locks the tenant row (which every write of a data key under the
    ///    tenant also locks): the version is re-read and must still be due, in a state that may be
    ///    destroyed, not the primary, and referenced by no data key that is not destroyed; then it
    ///    becomes `destroying`, which nothing may use.
    /// 2. The object is destroyed in the token.
    /// 3. The version becomes `destroyed`.
    ///
    /// A run interrupted after step 1 leaves the version `destroying`; the next run finishes it
    /// (step 2 finding no object is fine). A version that fails a check in step 1 is skipped and
    /// stays scheduled. Returns the versions destroyed.
    public func destroyDueMasterKeys(
        now: Timestamp = .now(),
        request: RequestContext = .system()
    ) async throws(KeyServiceError) -> [MasterKeyVersionRecord] {
        try await mapErrors {
            let due = try await self.repository.read { try await $0.versionsDueForDestruction(now: now, limit: 100) }
            var destroyed: [MasterKeyVersionRecord] = []
            for candidate in due {
                if candidate.state != .destroying {
                    guard try await self.beginDestruction(candidate, now: now, request: request) else { continue }
                }
                self.cache.forgetTokenKey(VersionRef(tenant: candidate.tenant, version: candidate.version))
                if let record = try await self.finishDestruction(
                    candidate.tenant, candidate.version, tokenKeyID: candidate.tokenKeyID, request: request)
                {
                    destroyed.append(record)
                }
            }
            return destroyed
        }
    }

    /// Step 1 of `destroyDueMasterKeys`: checks and marks the version `destroying` under the tenant
    /// lock. False when the version must not be destroyed (now or at all): it is left as it is.
    private func beginDestruction(
        _ candidate: MasterKeyVersionRecord,
        now: Timestamp,
        request: RequestContext
    ) async throws -> Bool {
        let refusal = try await committer.commit { transaction -> UnitOutcome<String?> in
            guard let tenant = try await transaction.tenant(candidate.tenant, forUpdate: true) else {
                return UnitOutcome("the tenant is missing", audit: [])
            }
            guard var version = try await transaction.masterKeyVersion(candidate.tenant, candidate.version) else {
                return UnitOutcome("the version is missing", audit: [])
            }
            guard let after = version.destroyAfter, after <= now, version.state.canScheduleDestruction else {
                // Cancelled or changed since it was listed: not an error.
                return UnitOutcome("no longer due", audit: [])
            }
            guard version.version != tenant.primaryVersion else {
                return UnitOutcome("it is the tenant's primary version", audit: [])
            }
            let references = try await transaction.countLiveDataKeys(candidate.tenant, version: version.version)
            guard references == 0 else {
                return UnitOutcome("\(references) data keys are wrapped under it", audit: [])
            }
            let time = Timestamp.now()
            let from = version.state
            version.state = .destroying
            version.updatedAt = time
            try await transaction.updateMasterKeyVersion(version)
            return UnitOutcome(
                nil,
                audit: [
                    AuditEvent(
                        time: time,
                        principal: request.principal,
                        tenant: candidate.tenant,
                        operation: .destroyMasterKey,
                        keyIDs: ["v\(candidate.version)"],
                        requestID: request.requestID,
                        detail: "phase=destroying from=\(from.rawValue)"
                    )
                ]
            )
        }.value
        if let refusal, refusal != "no longer due" {
            logger.error(
                "scheduled master-key destruction refused",
                metadata: [
                    "tenant": "\(candidate.tenant)", "version": "\(candidate.version)", "reason": "\(refusal)",
                ]
            )
        }
        return refusal == nil
    }

    /// Steps 2 and 3: destroys the object in the token (absent is fine: an earlier run or a shred
    /// got there first), then marks the `destroying` version destroyed. Nil when the version is not
    /// `destroying` (another instance finished it).
    func finishDestruction(
        _ tenant: TenantID,
        _ number: MasterKeyVersionNumber,
        tokenKeyID: TokenKeyID,
        request: RequestContext
    ) async throws -> MasterKeyVersionRecord? {
        let existed = try await token.destroyMasterKey(id: tokenKeyID)
        return try await committer.commit { transaction -> UnitOutcome<MasterKeyVersionRecord?> in
            guard var version = try await transaction.masterKeyVersion(tenant, number), version.state == .destroying
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
                        tenant: tenant,
                        operation: .destroyMasterKey,
                        keyIDs: ["v\(number)"],
                        requestID: request.requestID,
                        detail: "phase=destroyed token-object=\(existed ? "destroyed" : "absent")"
                    )
                ]
            )
        }.value
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
            self.cache.forgetPrimary(tenant)
            return record
        }
    }

    /// The token object of a version: its stored `CKA_ID` and the label it must carry (cached;
    /// versions never change their key object).
    func masterKey(_ version: VersionRef) async throws -> TokenKeyReference {
        if let cached = cache.tokenKey(version) { return cached }
        guard let record = try await repository.read({ try await $0.masterKeyVersion(version.tenant, version.version) })
        else {
            throw KeyServiceError(.notFound, "version \(version.version) of tenant \(version.tenant) not found")
        }
        let reference = TokenKeyReference(id: record.tokenKeyID, tenant: version.tenant, version: version.version)
        cache.setTokenKey(version, reference)
        return reference
    }
}
