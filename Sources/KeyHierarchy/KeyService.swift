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
    let logger: Logger
    let counters: InvocationCounters
    /// `CKA_ID` of each version: fixed once a version exists, so it is cached for good.
    let tokenKeyIDs = Mutex<[VersionRef: TokenKeyID]>([:])
    /// Each tenant's primary version as last seen; every write re-checks it in its transaction,
    /// so a stale entry costs one retry, never a key under a non-primary version.
    let primaryVersions = Mutex<[TenantID: MasterKeyVersionNumber]>([:])

    struct VersionRef: Hashable, Sendable {
        let tenant: TenantID
        let version: MasterKeyVersionNumber
    }

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
        self.committer = GroupCommitter(
            repository: repository,
            maximumBatch: configuration.groupCommitMaximumBatch,
            observer: commitObserver
        )
        self.counters = InvocationCounters(blockSize: configuration.invocationBlockSize)
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
                tokenKeyIDs.withLock { $0[VersionRef(tenant: id, version: 1)] = tokenKeyID }
                primaryVersions.withLock { $0[id] = 1 }
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

    /// Crypto-shreds a tenant: destroys every master-key object of the tenant in the token
    /// (including any left by a crash), deletes its wrapped data keys, marks its versions
    /// destroyed and the tenant shredded, and returns a receipt naming the audit record.
    ///
    /// The token goes first: once a caller asks to shred, the keys must go even if the database
    /// then fails (a retry finishes the bookkeeping).
    public func shredTenant(_ id: TenantID, request: RequestContext) async throws(KeyServiceError) -> ShredReceipt {
        try await audited(.shredTenant, tenant: id, request: request) { () async throws -> ShredReceipt in
            guard let existing = try await self.repository.read({ try await $0.tenant(id, forUpdate: false) }) else {
                throw KeyServiceError(.notFound, "tenant \(id) not found")
            }
            guard existing.state != .shredded else {
                // Finish a shred whose token step was interrupted, then refuse.
                _ = try await self.token.destroyMasterKeys(labelPrefix: MasterKeyLabel.labelPrefix(for: id))
                throw KeyServiceError(.failedPrecondition, "tenant \(id) is already shredded")
            }
            let destroyedObjects = try await self.token.destroyMasterKeys(
                labelPrefix: MasterKeyLabel.labelPrefix(for: id)
            )
            let committed = try await self.committer.commit { transaction in
                guard var tenant = try await transaction.tenant(id, forUpdate: true) else {
                    throw KeyServiceError(.notFound, "tenant \(id) not found")
                }
                let now = Timestamp.now()
                var destroyedVersions: [MasterKeyVersionNumber] = []
                for var version in try await transaction.masterKeyVersions(id) where version.state != .destroyed {
                    version.state = .destroyed
                    version.destroyedAt = now
                    version.destroyAfter = nil
                    version.updatedAt = now
                    try await transaction.updateMasterKeyVersion(version)
                    destroyedVersions.append(version.version)
                }
                let deleted = try await transaction.deleteDataKeys(id)
                tenant.state = .shredded
                tenant.updatedAt = now
                try await transaction.updateTenant(tenant)
                let receipt = ShredReceipt(
                    tenant: id,
                    destroyedVersions: destroyedVersions,
                    dataKeysDeleted: deleted,
                    tokenObjectsDestroyed: destroyedObjects,
                    time: now,
                    auditSequence: 0,
                    auditHash: []
                )
                return UnitOutcome(
                    receipt,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: id,
                            operation: .shredTenant,
                            keyIDs: destroyedVersions.map { "v\($0)" },
                            requestID: request.requestID,
                            detail: "data-keys-deleted=\(deleted) token-objects-destroyed=\(destroyedObjects)"
                        )
                    ]
                )
            }
            self.forget(tenant: id)
            var receipt = committed.value
            receipt.auditSequence = committed.records[0].sequence
            receipt.auditHash = committed.records[0].hash
            return receipt
        }
    }

    // MARK: - Audit

    /// Verifies the whole audit log, a page at a time, against the stored head.
    public func verifyAuditLog(pageSize: Int = 1000) async throws(KeyServiceError) -> AuditVerification {
        try await mapErrors {
            let head = try await self.repository.read { try await $0.auditHead() }
            var verifier = AuditVerifier()
            var after: Int64 = 0
            while true {
                let page = try await self.repository.read { try await $0.auditRecords(after: after, limit: pageSize) }
                for record in page {
                    if case .broken(let problem) = verifier.check(record) { return .broken(problem) }
                }
                guard let last = page.last, page.count == pageSize else { break }
                after = last.sequence
            }
            return verifier.finish(head: head)
        }
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
                _ = try await committer.commit { _ in UnitOutcome((), audit: [event]) }
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
            if mapped.underlying != nil || mapped.code == .internalError || mapped.code == .dataLoss {
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
        primaryVersions.withLock { _ = $0.removeValue(forKey: tenant) }
        tokenKeyIDs.withLock { ids in ids = ids.filter { $0.key.tenant != tenant } }
        counters.forget(tenant: tenant)
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
