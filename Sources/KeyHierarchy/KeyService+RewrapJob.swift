/// How fast the rewrap job may go, so moving a large tenant does not starve live traffic.
public struct RewrapThrottle: Sendable, Hashable {
    /// Data keys per batch (one token lease and one transaction each), 1 to 1,000.
    public var batchSize: Int
    /// The most data keys moved per second; nil for no limit.
    public var keysPerSecond: Int?

    public init(batchSize: Int = 100, keysPerSecond: Int? = 1000) {
        self.batchSize = batchSize
        self.keysPerSecond = keysPerSecond
    }
}

extension KeyService {
    /// Starts (or restarts after completion) the tenant's rewrap job toward its primary version.
    /// A running job is returned as it is: `runRewrapJob` resumes it.
    public func startRewrapJob(_ tenant: TenantID, request: RequestContext) async throws(KeyServiceError)
        -> RewrapJobRecord
    {
        try await audited(.startRewrapJob, tenant: tenant, request: request) { () async throws -> RewrapJobRecord in
            try await self.committer.commit { transaction -> UnitOutcome<RewrapJobRecord> in
                guard let tenantRecord = try await transaction.tenant(tenant, forUpdate: true) else {
                    throw KeyServiceError(.notFound, "tenant \(tenant) not found")
                }
                guard tenantRecord.state != .shredded else {
                    throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is shredded")
                }
                if let existing = try await transaction.rewrapJob(tenant), existing.state == .running {
                    return UnitOutcome(existing, audit: [])
                }
                let all = try await transaction.countLiveDataKeys(tenant, version: nil)
                let current = try await transaction.countLiveDataKeys(tenant, version: tenantRecord.primaryVersion)
                let now = Timestamp.now()
                let job = RewrapJobRecord(
                    tenant: tenant,
                    targetVersion: tenantRecord.primaryVersion,
                    state: .running,
                    cursor: nil,
                    moved: 0,
                    total: all - current,
                    startedAt: now,
                    updatedAt: now
                )
                try await transaction.saveRewrapJob(job)
                return UnitOutcome(
                    job,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: tenant,
                            operation: .startRewrapJob,
                            requestID: request.requestID,
                            detail: "to-version=\(job.targetVersion) total=\(job.total)"
                        )
                    ]
                )
            }.value
        }
    }

    /// The tenant's rewrap job, if one was ever started.
    public func rewrapJob(_ tenant: TenantID) async throws(KeyServiceError) -> RewrapJobRecord? {
        try await mapErrors { try await self.repository.read { try await $0.rewrapJob(tenant) } }
    }

    /// Runs the tenant's job from its stored cursor until every data key is under the primary
    /// version, batch by batch, each batch committed with the job's progress. Safe to stop at any
    /// point (a crash, a cancelled task, `maximumBatches`): the next run resumes after the last
    /// committed batch. Keys that cannot be moved (damaged, or under a destroyed version) are
    /// left where they are and audited; the old version then stays referenced, so it cannot be
    /// destroyed by mistake.
    @discardableResult
    public func runRewrapJob(
        _ tenant: TenantID,
        throttle: RewrapThrottle = RewrapThrottle(),
        maximumBatches: Int? = nil,
        request: RequestContext = .system()
    ) async throws(KeyServiceError) -> RewrapJobRecord {
        try await mapErrors { () async throws -> RewrapJobRecord in
            guard throttle.batchSize >= 1, throttle.batchSize <= KeyServiceConfiguration.maximumBatchSize else {
                throw KeyServiceError(
                    .invalidArgument, "batch size must be 1 to \(KeyServiceConfiguration.maximumBatchSize)")
            }
            var batches = 0
            while true {
                try Task.checkCancellation()
                guard var job = try await self.repository.read({ try await $0.rewrapJob(tenant) }) else {
                    throw KeyServiceError(.failedPrecondition, "no rewrap job was started for tenant \(tenant)")
                }
                guard job.state == .running else { return job }
                if let maximumBatches, batches >= maximumBatches { return job }
                let primary = try await self.primaryVersionForMaintenance(tenant)
                if primary != job.targetVersion {
                    // Rotated since the job started (or at the invocation limit): keys already
                    // passed moved to the old target, so scan again from the start.
                    job.targetVersion = primary
                    job.cursor = nil
                }
                let started = ContinuousClock.now
                let jobSnapshot = job
                let rows = try await self.repository.read {
                    try await $0.dataKeysNotUnderVersion(
                        tenant,
                        jobSnapshot.targetVersion,
                        after: jobSnapshot.cursor,
                        limit: throttle.batchSize
                    )
                }
                if rows.isEmpty {
                    return try await self.completeRewrapJob(job, request: request)
                }
                let results = try await self.rewrap(
                    tenant,
                    rows,
                    contextHashes: rows.map(\.contextHash),
                    job: job,
                    request: request
                )
                let failures = zip(rows, results).compactMap { row, result -> (DataKeyRecord, KeyServiceError)? in
                    if case .failure(let error) = result { return (row, error) }
                    return nil
                }
                if !failures.isEmpty {
                    for (row, error) in failures {
                        self.logger.warning(
                            "rewrap job could not move a data key",
                            metadata: [
                                "tenant": "\(tenant)", "data-key": "\(row.id)", "error": "\(error.logDescription)",
                            ]
                        )
                    }
                    try await self.auditResults(
                        .rewrapJob,
                        tenant,
                        failures.map(\.0.id),
                        failures.map { Result<Void, KeyServiceError>.failure($0.1) },
                        request: request
                    )
                }
                batches += 1
                if let perSecond = throttle.keysPerSecond, perSecond > 0 {
                    let budget = Duration.seconds(Double(rows.count) / Double(perSecond))
                    let spent = ContinuousClock.now - started
                    if spent < budget { try await Task.sleep(for: budget - spent) }
                }
            }
        }
    }

    private func completeRewrapJob(_ job: RewrapJobRecord, request: RequestContext) async throws -> RewrapJobRecord {
        try await committer.commit { transaction -> UnitOutcome<RewrapJobRecord> in
            var done = job
            done.state = .completed
            done.updatedAt = .now()
            try await transaction.saveRewrapJob(done)
            return UnitOutcome(
                done,
                audit: [
                    AuditEvent(
                        time: done.updatedAt,
                        principal: request.principal,
                        tenant: job.tenant,
                        operation: .rewrapJob,
                        requestID: request.requestID,
                        detail: "completed to-version=\(done.targetVersion) moved=\(done.moved)"
                    )
                ]
            )
        }.value
    }

    /// The primary version, allowed for a disabled tenant (maintenance), refused for a shredded one.
    private func primaryVersionForMaintenance(_ tenant: TenantID) async throws -> MasterKeyVersionNumber {
        guard let record = try await repository.read({ try await $0.tenant(tenant, forUpdate: false) }) else {
            throw KeyServiceError(.notFound, "tenant \(tenant) not found")
        }
        guard record.state != .shredded else {
            throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is shredded")
        }
        return record.primaryVersion
    }
}
