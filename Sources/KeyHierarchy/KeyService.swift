import Crypto
import Logging
import SecretMemory
import Synchronization

/// The key hierarchy: tenants, master-key versions in the token, data keys wrapped under them,
/// Encrypt/Decrypt, rotation, the rewrap job and the audit log. In-process API; the wire layer
/// authenticates and authorises callers before it calls in.
///
/// Every key use and every state change appends an audit record in the same transaction as the
/// change (through `GroupCommitter`); a call whose record cannot be written fails. Failed calls
/// are audited too, in a transaction of their own.
public final class KeyService: Sendable {
    public let configuration: KeyServiceConfiguration
    let token: any MasterKeyToken
    let repository: any KeyRepository
    let committer: GroupCommitter
    /// Anchors the audit chain in the HSM (every batch of the committer).
    let anchoring: AuditAnchoring
    let logger: Logger
    /// Each tenant's primary version and the token object of each version, as last seen.
    public let cache = TenantKeyCache()
    /// Automatic rotations running, by the version that reached its limit: callers share one.
    let automaticRotations = Mutex<[VersionRef: Task<Void, any Error>]>([:])
    /// Token operations of concurrent calls, performed together in one session lease per round.
    let tokenRounds: Coalescer<[TokenOperation], [TokenResult]>
    /// The reads of concurrent decrypts, made together in one statement per tenant per round.
    let useReads: Coalescer<UseRead, DataKeysForUse?>

    /// Rounds of coalesced token operations or reads running at once: the SQLite store's reader
    /// count, and half the token's default session pool (8), which leaves sessions for the audit
    /// anchor's MACs and for calls outside the rounds. Each round carries everything that queued,
    /// so more rounds would mostly add hops on a machine of few cores. (Chosen, not tuned: no
    /// other value was measured.)
    static let roundsInFlight = 4

    /// The most token operations one coalesced round carries (a call with more runs alone). A
    /// round answers all its callers when its last operation is done, so a call that joins one
    /// waits for the others' operations too: 32 operations (about a millisecond on SoftHSM2)
    /// already spare 31 hops of 32, and keep another tenant's call from riding in a round of
    /// hundreds of a busy tenant's.
    static let operationsPerTokenRound = 32

    /// What one decrypt reads: the keys `ids` of `tenant`, with the tenant and their versions.
    struct UseRead: Sendable {
        let tenant: TenantID
        let ids: [DataKeyID]
    }

    typealias VersionRef = TenantKeyCache.VersionRef

    public init(
        token: any MasterKeyToken,
        repository: any KeyRepository,
        configuration: KeyServiceConfiguration = KeyServiceConfiguration(),
        logger: Logger = Logger(label: "hsm-gateway.keys"),
        commitObserver: GroupCommitter.Observer? = nil
    ) throws(KeyServiceError) {
        try configuration.validate()
        self.token = token
        self.repository = repository
        self.configuration = configuration
        self.logger = logger
        self.anchoring = AuditAnchoring(token: token, checkpointInterval: configuration.auditCheckpointInterval)
        self.tokenRounds = Coalescer(
            maximumRounds: Self.roundsInFlight,
            maximumWeight: Self.operationsPerTokenRound,
            weight: { $0.count },
            // The first key's label names its tenant (and version): fair enough a lane.
            lane: { $0.first?.keyReferences.first?.label ?? "" },
            run: { [token] requests in
                let results = try await token.perform(requests.flatMap { $0 })
                var offset = 0
                return requests.map { operations in
                    defer { offset += operations.count }
                    return .success(Array(results[offset..<offset + operations.count]))
                }
            }
        )
        self.useReads = Coalescer(
            maximumRounds: Self.roundsInFlight,
            maximumWeight: KeyServiceConfiguration.maximumBatchSize,
            weight: { max(1, $0.ids.count) },
            lane: { $0.tenant.rawValue },
            run: { [repository] requests in try await Self.readForUse(requests, repository) }
        )
        self.committer = GroupCommitter(
            repository: repository,
            maximumBatch: configuration.groupCommitMaximumBatch,
            anchoring: anchoring,
            observer: commitObserver
        )
    }

    // MARK: - Tenants

    /// Creates a tenant and its master key v1 (generated in the token, active, primary).
    public func createTenant(
        _ id: TenantID,
        idempotencyKey: String? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> TenantRecord {
        try await audited(.createTenant, tenant: id, request: request) { () async throws -> TenantRecord in
            let fingerprint = Self.fingerprint(AuditOperation.createTenant.rawValue, id.rawValue)
            if let key = idempotencyKey,
                let replay = try await self.replay(scope: "", key: key, .createTenant, fingerprint)
            {
                guard replay == id.rawValue,
                    let tenant = try await self.repository.read({ try await $0.tenant(id, forUpdate: false) })
                else { throw KeyServiceError(.dataLoss, "idempotent result no longer exists") }
                return tenant
            }
            let tokenKeyID = TokenKeyID.random()
            try await self.token.generateMasterKey(id: tokenKeyID, label: MasterKeyLabel.label(tenant: id, version: 1))
            do {
                let committed = try await self.committer.commit { transaction in
                    let now = Timestamp.now()
                    let tenant = TenantRecord(
                        id: id, state: .enabled, primaryVersion: 1, createdAt: now, updatedAt: now)
                    do {
                        try await transaction.insertTenant(tenant)
                    } catch let error as StorageError where error.kind == .uniqueViolation {
                        throw KeyServiceError(.alreadyExists, "tenant \(id) exists")
                    }
                    try await transaction.insertMasterKeyVersion(
                        MasterKeyVersionRecord(
                            tenant: id,
                            version: 1,
                            state: .active,
                            tokenKeyID: tokenKeyID,
                            createdAt: now,
                            updatedAt: now
                        )
                    )
                    if let key = idempotencyKey {
                        try await self.rememberIdempotent(
                            transaction,
                            scope: "",
                            key: key,
                            .createTenant,
                            fingerprint,
                            result: id.rawValue
                        )
                    }
                    return UnitOutcome(
                        tenant,
                        audit: [
                            AuditEvent(
                                principal: request.principal,
                                tenant: id,
                                operation: .createTenant,
                                keyIDs: ["v1"],
                                requestID: request.requestID
                            )
                        ]
                    )
                }
                cache.setTokenKey(
                    VersionRef(tenant: id, version: 1), TokenKeyReference(id: tokenKeyID, tenant: id, version: 1))
                cache.setPrimary(id, 1)
                return committed.value
            } catch {
                // The row was not written: the new token object would be an orphan.
                _ = try? await self.token.destroyMasterKey(id: tokenKeyID)
                if let key = idempotencyKey, let error = error as? KeyServiceError, error.code == .alreadyExists,
                    (try? await self.replay(scope: "", key: key, .createTenant, fingerprint)) != nil
                {
                    // A concurrent retry with the same idempotency key won the race.
                    guard let tenant = try await self.repository.read({ try await $0.tenant(id, forUpdate: false) })
                    else { throw error }
                    return tenant
                }
                throw error
            }
        }
    }

    /// One tenant.
    public func tenant(_ id: TenantID) async throws(KeyServiceError) -> TenantRecord {
        try await mapErrors {
            guard let tenant = try await self.repository.read({ try await $0.tenant(id, forUpdate: false) }) else {
                throw KeyServiceError(.notFound, "tenant \(id) not found")
            }
            return tenant
        }
    }

    /// Tenants ordered by id, a page at a time.
    public func listTenants(_ page: PageRequest = PageRequest()) async throws(KeyServiceError) -> Page<TenantRecord> {
        try await mapErrors {
            let limit = try Self.checkedLimit(page.limit)
            let after = try page.after.map { (value: String) throws(KeyServiceError) in try TenantID(value) }
            let items = try await self.repository.read { try await $0.tenants(after: after, limit: limit + 1) }
            let pageItems = Array(items.prefix(limit))
            return Page(items: pageItems, nextPage: items.count > limit ? pageItems.last?.id.rawValue : nil)
        }
    }

    /// Refuses every key use of the tenant until `enableTenant`.
    public func disableTenant(_ id: TenantID, request: RequestContext) async throws(KeyServiceError) -> TenantRecord {
        try await setTenantState(id, to: .disabled, operation: .disableTenant, request: request)
    }

    /// Allows key use again after `disableTenant`.
    public func enableTenant(_ id: TenantID, request: RequestContext) async throws(KeyServiceError) -> TenantRecord {
        try await setTenantState(id, to: .enabled, operation: .enableTenant, request: request)
    }

    private func setTenantState(
        _ id: TenantID,
        to state: TenantState,
        operation: AuditOperation,
        request: RequestContext
    ) async throws(KeyServiceError) -> TenantRecord {
        try await audited(operation, tenant: id, request: request) { () async throws -> TenantRecord in
            try await self.committer.commit { transaction in
                guard var tenant = try await transaction.tenant(id, forUpdate: true) else {
                    throw KeyServiceError(.notFound, "tenant \(id) not found")
                }
                guard tenant.state != .shredded else {
                    throw KeyServiceError(.failedPrecondition, "tenant \(id) is shredded")
                }
                tenant.state = state
                tenant.updatedAt = .now()
                try await transaction.updateTenant(tenant)
                return UnitOutcome(
                    tenant,
                    audit: [
                        AuditEvent(
                            principal: request.principal,
                            tenant: id,
                            operation: operation,
                            requestID: request.requestID,
                            detail: "state=\(state.rawValue)"
                        )
                    ]
                )
            }.value
        }
    }

    /// Crypto-shreds a tenant and returns a receipt naming the audit record:
    ///
    /// 1. In one transaction that locks the tenant row: the tenant becomes `shredded` (nothing can
    ///    use its keys from then on, and no data key can be added), its data key rows are deleted
    ///    and every version not yet destroyed becomes `destroying`.
    /// 2. Every master-key object labelled for the tenant is destroyed in the token, including
    ///    objects a crash or a database restore left behind.
    /// 3. The `destroying` versions become `destroyed`.
    ///
    /// Once step 1 has committed the shred cannot be undone; if the call is interrupted after it,
    /// calling it again (or the next scheduled-destruction run) finishes steps 2 and 3.
    public func shredTenant(_ id: TenantID, request: RequestContext) async throws(KeyServiceError) -> ShredReceipt {
        try await audited(.shredTenant, tenant: id, request: request) { () async throws -> ShredReceipt in
            guard let existing = try await self.repository.read({ try await $0.tenant(id, forUpdate: false) }) else {
                throw KeyServiceError(.notFound, "tenant \(id) not found")
            }
            guard existing.state != .shredded else {
                // Finish a shred whose token or final step was interrupted, then refuse.
                _ = try await self.finishShred(id, request: request)
                throw KeyServiceError(.failedPrecondition, "tenant \(id) is already shredded")
            }
            let started = try await self.committer.commit { transaction in
                guard var tenant = try await transaction.tenant(id, forUpdate: true) else {
                    throw KeyServiceError(.notFound, "tenant \(id) not found")
                }
                guard tenant.state != .shredded else {
                    throw KeyServiceError(.failedPrecondition, "tenant \(id) is already shredded")
                }
                let now = Timestamp.now()
                var versions: [MasterKeyVersionNumber] = []
                for var version in try await transaction.masterKeyVersions(id) where version.state != .destroyed {
                    version.state = .destroying
                    version.destroyAfter = now
                    version.updatedAt = now
                    try await transaction.updateMasterKeyVersion(version)
                    versions.append(version.version)
                }
                let deleted = try await transaction.deleteDataKeys(id)
                tenant.state = .shredded
                tenant.updatedAt = now
                try await transaction.updateTenant(tenant)
                return UnitOutcome(
                    (versions, deleted),
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: id,
                            operation: .shredTenant,
                            keyIDs: versions.map { "v\($0)" },
                            requestID: request.requestID,
                            detail: "phase=started data-keys-deleted=\(deleted)"
                        )
                    ]
                )
            }.value
            self.forget(tenant: id)
            let finished = try await self.finishShred(id, request: request)
            return ShredReceipt(
                tenant: id,
                destroyedVersions: started.0,
                dataKeysDeleted: started.1,
                tokenObjectsDestroyed: finished.objects,
                time: finished.record.event.time,
                auditSequence: finished.record.sequence,
                auditHash: finished.record.hash
            )
        }
    }

    /// Steps 2 and 3 of `shredTenant`: destroys the tenant's objects in the token, then marks its
    /// `destroying` versions destroyed, audited.
    private func finishShred(_ id: TenantID, request: RequestContext) async throws -> (
        objects: Int, record: AuditRecord
    ) {
        let objects = try await token.destroyMasterKeys(labelPrefix: MasterKeyLabel.labelPrefix(for: id))
        let committed = try await committer.commit { transaction in
            let now = Timestamp.now()
            var versions: [MasterKeyVersionNumber] = []
            for var version in try await transaction.masterKeyVersions(id) where version.state == .destroying {
                version.state = .destroyed
                version.destroyedAt = now
                version.destroyAfter = nil
                version.updatedAt = now
                try await transaction.updateMasterKeyVersion(version)
                versions.append(version.version)
            }
            return UnitOutcome(
                (),
                audit: [
                    AuditEvent(
                        time: now,
                        principal: request.principal,
                        tenant: id,
                        operation: .shredTenant,
                        keyIDs: versions.map { "v\($0)" },
                        requestID: request.requestID,
                        detail: "phase=completed token-objects-destroyed=\(objects)"
                    )
                ]
            )
        }
        return (objects, committed.records[0])
    }

    // MARK: - Audit

    /// Checks the audit log's head against the HSM, generating the audit key on a first start and
    /// anchoring a log that predates anchoring (audited). Throws `dataLoss` when the log fails its
    /// integrity check: until it is restored every call that writes an audit record fails.
    public func checkAuditAnchor(request: RequestContext = .system("audit-anchor-check")) async throws(KeyServiceError)
        -> GroupCommitter.AnchorState
    {
        try await mapErrors {
            try await self.committer.checkAnchor(principal: request.principal, requestID: request.requestID)
        }
    }

    /// Why the audit log last failed its integrity check (for readiness and metrics), or nil.
    public var auditIntegrityFailure: String? { anchoring.integrityFailure }

    /// Verifies the whole audit log, a page at a time: the hash chain against the stored head,
    /// every kept checkpoint against the record it names and against the audit key in the HSM,
    /// and the head's own checkpoint. Reports the first place where it breaks: for a rewritten
    /// log, the first checkpoint it breaks.
    ///
    /// It checks the log as of the head it reads first: records and checkpoints appended while
    /// it pages through (a busy gateway's) are left for the next verification, not taken for a
    /// head mismatch or for removed records.
    public func verifyAuditLog(pageSize: Int = 1000) async throws(KeyServiceError) -> AuditLogVerification {
        try await mapErrors {
            let anchored = try await self.repository.read { try await $0.auditHead() }
            let end = anchored.head.sequence
            // The key that made the head's checkpoint (or, with none, the first kept one); the
            // token checks it is the audit key, and a checkpoint made by any other does not verify.
            let firstCheckpoint = try await self.repository.read { try await $0.auditCheckpoints(after: 0, limit: 1) }
            let key = TokenKeyReference(
                id: anchored.anchor?.keyID ?? firstCheckpoint.first?.keyID
                    ?? TokenKeyID(bytes: [UInt8](repeating: 0, count: TokenKeyID.byteCount))!,
                label: AuditAnchoring.keyLabel
            )
            var verifier = AuditVerifier()
            var after: Int64 = 0
            var checkpoints: [AuditCheckpoint] = []
            var checkpointsAfter: Int64 = 0
            var checkpointsChecked = 0
            var lastGood: AuditCheckpoint?
            func report(_ problem: AuditProblem) -> AuditLogVerification {
                AuditLogVerification(
                    result: .broken(problem), checkpointsChecked: checkpointsChecked, anchoredThrough: nil)
            }
            while true {
                let page = try await self.repository.read { try await $0.auditRecords(after: after, limit: pageSize) }
                var due: [AuditCheckpoint] = []
                for record in page where record.sequence <= end {
                    if case .broken(let problem) = verifier.check(record) { return report(problem) }
                    while true {
                        if checkpoints.isEmpty {
                            checkpoints = try await self.repository.read {
                                try await $0.auditCheckpoints(after: checkpointsAfter, limit: pageSize)
                            }
                            checkpointsAfter = checkpoints.last?.sequence ?? checkpointsAfter
                            if checkpoints.isEmpty { break }
                        }
                        guard let checkpoint = checkpoints.first, checkpoint.sequence <= record.sequence else { break }
                        checkpoints.removeFirst()
                        guard checkpoint.sequence == record.sequence, checkpoint.hash == record.hash else {
                            return report(Self.brokenCheckpoint(checkpoint, lastGood: lastGood))
                        }
                        due.append(checkpoint)
                        lastGood = checkpoint
                    }
                }
                if !due.isEmpty {
                    let valid = try await self.anchoring.macs(due, key: key)
                    if let index = valid.firstIndex(of: false) {
                        return report(Self.forgedCheckpoint(due[index]))
                    }
                    checkpointsChecked += due.count
                }
                guard let last = page.last, page.count == pageSize, last.sequence < end else { break }
                after = last.sequence
            }
            let chain = verifier.finish(head: anchored.head)
            guard case .verified = chain else { return report(Self.problem(of: chain)) }
            // A checkpoint past the head read at the start is evidence of removed records only
            // if the head has not reached it since.
            if let beyond = checkpoints.first,
                try await self.repository.read({ try await $0.auditHead() }).head.sequence < beyond.sequence
            {
                return report(
                    AuditProblem(
                        sequence: beyond.sequence,
                        kind: .missing,
                        explanation:
                            "a checkpoint names record \(beyond.sequence), after the end of the log at record \(anchored.head.sequence): records were removed"
                    )
                )
            }
            guard let anchor = anchored.anchor else {
                if anchored.head.sequence == 0 {
                    return AuditLogVerification(
                        result: chain, checkpointsChecked: checkpointsChecked, anchoredThrough: nil)
                }
                return report(
                    AuditProblem(
                        sequence: anchored.head.sequence,
                        kind: .unanchored,
                        explanation:
                            "the head (record \(anchored.head.sequence)) carries no checkpoint from the HSM"
                            + (lastGood.map { "; the last checkpoint that holds is at record \($0.sequence)" } ?? "")
                    )
                )
            }
            guard anchor.covers(anchored.head) else {
                return report(
                    AuditProblem(
                        sequence: anchored.head.sequence,
                        kind: .anchorMismatch,
                        explanation:
                            "the head (record \(anchored.head.sequence)) does not match its checkpoint (record \(anchor.sequence)): the log was rewritten after "
                            + (lastGood.map { "the checkpoint at record \($0.sequence)" } ?? "its start")
                    )
                )
            }
            guard try await self.anchoring.macs([anchor], key: key)[0] else {
                return report(
                    AuditProblem(
                        sequence: anchored.head.sequence,
                        kind: .anchorMismatch,
                        explanation:
                            "the head (record \(anchored.head.sequence)) does not verify against its checkpoint from the HSM: the log was rewritten after "
                            + (lastGood.map { "the checkpoint at record \($0.sequence)" } ?? "its start")
                            + ", or the head's checkpoint forged"
                    )
                )
            }
            return AuditLogVerification(
                result: chain, checkpointsChecked: checkpointsChecked + 1, anchoredThrough: anchor.sequence)
        }
    }

    private static func problem(of verification: AuditVerification) -> AuditProblem {
        if case .broken(let problem) = verification { return problem }
        return AuditProblem(sequence: 0, kind: .edited, explanation: "unknown")
    }

    private static func brokenCheckpoint(_ checkpoint: AuditCheckpoint, lastGood: AuditCheckpoint?) -> AuditProblem {
        AuditProblem(
            sequence: checkpoint.sequence,
            kind: .anchorMismatch,
            explanation:
                "the checkpoint at record \(checkpoint.sequence) (made \(checkpoint.time)) does not match the record: "
                + "the log was rewritten after "
                + (lastGood.map { "the checkpoint at record \($0.sequence)" } ?? "its start")
                + " and at or before record \(checkpoint.sequence)"
        )
    }

    private static func forgedCheckpoint(_ checkpoint: AuditCheckpoint) -> AuditProblem {
        AuditProblem(
            sequence: checkpoint.sequence,
            kind: .anchorForged,
            explanation:
                "the checkpoint at record \(checkpoint.sequence) does not verify with the audit key in the HSM: it was not made by this gateway"
        )
    }

    /// Audit records after `after`, in order.
    public func auditRecords(after: Int64 = 0, limit: Int = 100) async throws(KeyServiceError) -> [AuditRecord] {
        try await mapErrors {
            let limit = try Self.checkedLimit(limit)
            return try await self.repository.read { try await $0.auditRecords(after: after, limit: limit) }
        }
    }

    // MARK: - Shared machinery

    /// Runs `body`; on failure, appends an audit record with the error code (in its own
    /// transaction) and rethrows the error as a `KeyServiceError`.
    func audited<T: Sendable>(
        _ operation: AuditOperation,
        tenant: TenantID?,
        keyIDs: [String] = [],
        request: RequestContext,
        _ body: () async throws -> T
    ) async throws(KeyServiceError) -> T {
        do {
            return try await mapErrors(body)
        } catch {
            let event = AuditEvent(
                principal: request.principal,
                tenant: tenant,
                operation: operation,
                keyIDs: keyIDs,
                outcome: .failure(error.code.description),
                requestID: request.requestID
            )
            do {
                // In a task of its own: a call cancelled by its caller (a deadline) is still
                // audited, and the group committer does not withdraw this unit with it.
                let committer = self.committer
                _ = try await Task { try await committer.commit { _ in UnitOutcome((), audit: [event]) } }.value
            } catch {
                logger.error(
                    "could not audit a failed call",
                    metadata: ["operation": "\(operation.rawValue)", "error": "\(Self.map(error).logDescription)"]
                )
            }
            throw error
        }
    }

    func mapErrors<T>(_ body: () async throws -> T) async throws(KeyServiceError) -> T {
        do {
            return try await body()
        } catch {
            let mapped = Self.map(error)
            if mapped.code == .decryptionFailed {
                // Routine for callers with the wrong context or a damaged ciphertext, and what an
                // attacker probing ciphertexts produces: kept, but not as an error.
                logger.info("decryption failed", metadata: ["error": "\(mapped.logDescription)"])
            } else if mapped.underlying != nil || mapped.code == .internalError || mapped.code == .dataLoss {
                logger.error("key service call failed", metadata: ["error": "\(mapped.logDescription)"])
            }
            throw mapped
        }
    }

    /// Maps adapter errors to client-safe errors; the cause stays in `underlying` for the log.
    static func map(_ error: any Error) -> KeyServiceError {
        switch error {
        case let error as KeyServiceError:
            return error
        case let error as StorageError:
            switch error.kind {
            case .uniqueViolation:
                return KeyServiceError(.alreadyExists, "already exists", underlying: error.description)
            case .foreignKeyViolation:
                return KeyServiceError(
                    .failedPrecondition, "refers to something missing", underlying: error.description)
            case .conflict:
                return KeyServiceError(.aborted, "a concurrent change won; retry", underlying: error.description)
            case .unavailable:
                return KeyServiceError(.unavailable, "storage is unavailable", underlying: error.description)
            case .corrupt: return KeyServiceError(.dataLoss, "stored data is damaged", underlying: error.description)
            case .other: return KeyServiceError(.internalError, "storage failed", underlying: error.description)
            }
        case let error as TokenError:
            switch error.kind {
            case .authenticationFailed:
                return KeyServiceError(.decryptionFailed, "decryption failed", underlying: error.description)
            case .keyNotFound:
                return KeyServiceError(
                    .dataLoss, "a master key is missing from the token", underlying: error.description)
            case .policyViolation:
                return KeyServiceError(
                    .failedPrecondition,
                    "a master key is weaker than the policy",
                    underlying: error.description
                )
            case .unavailable:
                return KeyServiceError(.unavailable, "the HSM is unavailable", underlying: error.description)
            case .bindingViolation:
                return KeyServiceError(
                    .dataLoss,
                    "a master key failed its binding check; the key store refers to the wrong token object",
                    underlying: error.description
                )
            case .cancelled:
                return KeyServiceError(.aborted, "cancelled")
            case .other:
                return KeyServiceError(.internalError, "the HSM operation failed", underlying: error.description)
            }
        case is CancellationError:
            return KeyServiceError(.aborted, "cancelled")
        default:
            return KeyServiceError(
                .internalError, "unexpected failure", underlying: String(describing: type(of: error)))
        }
    }

    static func checkedLimit(_ limit: Int) throws(KeyServiceError) -> Int {
        guard limit >= 1, limit <= PageRequest.maximumPageSize else {
            throw KeyServiceError(.invalidArgument, "page size must be 1 to \(PageRequest.maximumPageSize)")
        }
        return limit
    }

    func forget(tenant: TenantID) {
        cache.invalidate(tenant)
    }

    // MARK: Idempotency

    static func fingerprint(_ parts: String...) -> [UInt8] {
        var writer = CanonicalWriter()
        for part in parts { writer.append(part) }
        return Array(SHA256.hash(data: writer.bytes))
    }

    static func checkIdempotencyKey(_ key: String) throws(KeyServiceError) {
        guard !key.isEmpty, key.utf8.count <= KeyServiceConfiguration.maximumIdempotencyKeyLength else {
            throw KeyServiceError(
                .invalidArgument,
                "idempotency key must be 1 to \(KeyServiceConfiguration.maximumIdempotencyKeyLength) bytes"
            )
        }
    }

    /// The stored result for an idempotency key, if the same call was made before within the
    /// retention; throws when the key was used for a different call.
    func replay(
        scope: String,
        key: String,
        _ operation: AuditOperation,
        _ fingerprint: [UInt8]
    ) async throws -> String? {
        try Self.checkIdempotencyKey(key)
        guard let record = try await repository.read({ try await $0.idempotencyRecord(scope: scope, key: key) }) else {
            return nil
        }
        let cutoff =
            Timestamp.now().millisecondsSinceEpoch
            - Int64(configuration.idempotencyRetentionHours) * 3_600_000
        guard record.createdAt.millisecondsSinceEpoch >= cutoff else { return nil }
        guard record.operation == operation.rawValue, record.fingerprint == fingerprint else {
            throw KeyServiceError(.alreadyExists, "idempotency key was already used for a different request")
        }
        return record.result
    }

    func rememberIdempotent(
        _ transaction: any KeyRepositoryTransaction,
        scope: String,
        key: String,
        _ operation: AuditOperation,
        _ fingerprint: [UInt8],
        result: String
    ) async throws {
        let now = Timestamp.now()
        if let old = try await transaction.idempotencyRecord(scope: scope, key: key) {
            let cutoff = now.millisecondsSinceEpoch - Int64(configuration.idempotencyRetentionHours) * 3_600_000
            guard old.createdAt.millisecondsSinceEpoch < cutoff else {
                // A concurrent call with the same key committed first.
                throw KeyServiceError(.alreadyExists, "idempotency key is in use")
            }
            _ = try await transaction.deleteIdempotencyRecords(before: Timestamp(millisecondsSinceEpoch: cutoff))
        }
        do {
            try await transaction.insertIdempotencyRecord(
                IdempotencyRecord(
                    scope: scope,
                    key: key,
                    operation: operation.rawValue,
                    fingerprint: fingerprint,
                    result: result,
                    createdAt: now
                )
            )
        } catch let error as StorageError where error.kind == .uniqueViolation {
            // Another instance's call with the same key committed first.
            throw KeyServiceError(.alreadyExists, "idempotency key is in use", underlying: error.description)
        }
    }
}

/// What `KeyService.verifyAuditLog` found.
public struct AuditLogVerification: Sendable, Hashable {
    /// The chain and its anchors: verified, or the first place where they break.
    public var result: AuditVerification
    /// Checkpoints (kept ones and the head's) whose MAC verified in the HSM.
    public var checkpointsChecked: Int
    /// The record the head's checkpoint anchors, when the whole log verified and is anchored.
    public var anchoredThrough: Int64?

    public init(result: AuditVerification, checkpointsChecked: Int, anchoredThrough: Int64?) {
        self.result = result
        self.checkpointsChecked = checkpointsChecked
        self.anchoredThrough = anchoredThrough
    }
}

/// What crypto-shredding a tenant did.
public struct ShredReceipt: Sendable, Hashable {
    public var tenant: TenantID
    public var destroyedVersions: [MasterKeyVersionNumber]
    public var dataKeysDeleted: Int64
    /// Master-key objects destroyed in the token (normally one per version).
    public var tokenObjectsDestroyed: Int
    public var time: Timestamp
    /// The audit record of the shred.
    public var auditSequence: Int64
    public var auditHash: [UInt8]
}
