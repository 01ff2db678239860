import SecretMemory

/// A new data key: its id, the version that wrapped it, the wrapped blob, and the plaintext
/// unless the caller asked for none.
public struct GeneratedDataKey: Sendable {
    public var id: DataKeyID
    public var version: MasterKeyVersionNumber
    /// `WrappedDataKey` encoding (83 bytes); also stored by the gateway.
    public var wrapped: [UInt8]
    public var plaintext: SecretBytes?
}

/// A data key decrypted for its caller.
public struct DecryptedDataKey: Sendable {
    public var id: DataKeyID
    public var version: MasterKeyVersionNumber
    /// The stored `WrappedDataKey` encoding the plaintext was unwrapped from: the key's current
    /// wrapped copy (a rewrap replaces it).
    public var wrapped: [UInt8]
    public var plaintext: SecretBytes
}

/// One entry of a batch decrypt: the key, the exact context it was generated with and,
/// optionally, the wrapped copy the caller kept.
public struct DataKeyRequest: Sendable, Hashable {
    public var id: DataKeyID
    public var context: EncryptionContext
    /// The `WrappedDataKey` encoding the caller kept from GenerateDataKey (or a later decrypt), for
    /// the day the gateway has no row for `id` (a database lost or restored from an older
    /// backup). Used only when there is no row: a row that exists rules (its state, its current
    /// wrapped copy), so a disabled or destroyed key stays refused. Without a row, the blob is
    /// bound by the same AAD (tenant, id, version, context) and decrypts only under a version of
    /// this tenant whose state allows decrypt.
    public var wrapped: WrappedDataKey?

    public init(id: DataKeyID, context: EncryptionContext, wrapped: WrappedDataKey? = nil) {
        self.id = id
        self.context = context
        self.wrapped = wrapped
    }
}

extension KeyService {
    /// How often a write that lost a race (the primary moved, a lock conflict with another
    /// instance) is tried again before the caller gets `aborted`.
    static let writeAttempts = 10

    /// How a write unit that stores wraps under the primary ended.
    enum WriteOutcome: Sendable {
        case stored
        /// The tenant's primary is another version now: wrap again under it.
        case primaryMoved
        /// The primary reached `invocationLimit`: rotate, then wrap again.
        case invocationLimitReached
    }

    /// Inside a write transaction, after `checkPrimary` locked the tenant: adds `count` wraps to
    /// the version's invocation count when that stays within `invocationLimit`; false when it
    /// would not (nothing changes then).
    ///
    /// The count bounds how many times one key is used (NIST SP 800-38D §8.3); it does not make
    /// IVs unique, which the token's RNG does. Counting in the unit that stores the keys, after the
    /// tenant lock, adds one statement to a transaction that serialises on the tenant row anyway,
    /// instead of a transaction of its own per caller.
    func countInvocations(
        _ transaction: any KeyRepositoryTransaction,
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        _ count: Int64
    ) async throws -> Bool {
        try await transaction.reserveInvocations(tenant, version, count: count, limit: configuration.invocationLimit)
            != nil
    }

    /// Whether `error` says a unique constraint refused a row (directly or mapped).
    static func isDuplicate(_ error: any Error) -> Bool {
        if let error = error as? StorageError { return error.kind == .uniqueViolation }
        if let error = error as? KeyServiceError { return error.code == .alreadyExists }
        return false
    }

    // MARK: Generate

    /// Generates one data key (AES-256 from the token's RNG), wraps it under the tenant's
    /// primary version inside the token, and stores the wrapped copy.
    public func generateDataKey(
        _ tenant: TenantID,
        context: EncryptionContext = .empty,
        includePlaintext: Bool = true,
        idempotencyKey: String? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> GeneratedDataKey {
        try await generateDataKeys(
            tenant,
            count: 1,
            context: context,
            includePlaintext: includePlaintext,
            idempotencyKey: idempotencyKey,
            request: request
        )[0]
    }

    /// Generates `count` (1 to 1,000) data keys with one context, in one token lease and one
    /// transaction.
    public func generateDataKeys(
        _ tenant: TenantID,
        count: Int,
        context: EncryptionContext = .empty,
        includePlaintext: Bool = true,
        idempotencyKey: String? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> [GeneratedDataKey] {
        try await audited(.generateDataKey, tenant: tenant, request: request) { () async throws -> [GeneratedDataKey] in
            guard count >= 1, count <= KeyServiceConfiguration.maximumBatchSize else {
                throw KeyServiceError(
                    .invalidArgument,
                    "count must be 1 to \(KeyServiceConfiguration.maximumBatchSize)"
                )
            }
            let contextHash = context.hash
            let fingerprint = Self.fingerprint(
                AuditOperation.generateDataKey.rawValue,
                tenant.rawValue,
                "\(count)",
                contextHash.hexString,
                "\(includePlaintext)"
            )
            if let key = idempotencyKey,
                let replay = try await self.replay(scope: tenant.rawValue, key: key, .generateDataKey, fingerprint)
            {
                return try await self.replayGenerated(
                    tenant, replay, context: context, includePlaintext: includePlaintext, request: request)
            }
            for _ in 0..<Self.writeAttempts {
                do {
                    let primary = try await self.primaryVersion(tenant)
                    let key = try await self.masterKey(VersionRef(tenant: tenant, version: primary))
                    // Generated once per attempt: a retry after the primary moved wraps fresh keys
                    // under the new primary; nothing of this attempt was stored or returned.
                    let ids = (0..<count).map { _ in DataKeyID.random() }
                    let operations = ids.map { id in
                        TokenOperation.generateAndWrap(
                            key: key,
                            aad: WrappedDataKey.aad(
                                tenant: tenant, dataKeyID: id, version: primary, contextHash: contextHash)
                        )
                    }
                    let results = try await self.performChecked(operations, request: request)
                    var generated: [GeneratedDataKey] = []
                    var records: [DataKeyRecord] = []
                    let now = Timestamp.now()
                    for (index, result) in results.enumerated() {
                        guard case .generated(let plaintext, let iv, let ciphertextAndTag) = result else {
                            if case .failed(let error) = result { throw error }
                            throw KeyServiceError(.internalError, "unexpected token result")
                        }
                        let wrapped = WrappedDataKey(
                            version: primary,
                            dataKeyID: ids[index],
                            iv: iv,
                            ciphertextAndTag: ciphertextAndTag
                        ).encoded
                        generated.append(
                            GeneratedDataKey(
                                id: ids[index],
                                version: primary,
                                wrapped: wrapped,
                                plaintext: includePlaintext ? plaintext : nil
                            )
                        )
                        records.append(
                            DataKeyRecord(
                                tenant: tenant,
                                id: ids[index],
                                version: primary,
                                state: .enabled,
                                wrapped: wrapped,
                                contextHash: contextHash,
                                createdAt: now,
                                updatedAt: now
                            )
                        )
                    }
                    let recordsToInsert = records
                    // Set-based: the tenant lock, the version read, the invocation count and the
                    // insert are shared with the other GenerateDataKey calls of the batch.
                    let stored = try await self.committer.commitInScope(lane: tenant.rawValue) {
                        transaction, scope -> UnitOutcome<WriteOutcome> in
                        guard try await self.checkPrimary(transaction, tenant, primary, scope: scope) else {
                            return UnitOutcome(.primaryMoved, audit: [])
                        }
                        guard
                            try await scope.reserveInvocations(
                                tenant, primary, count: Int64(count), limit: self.configuration.invocationLimit,
                                in: transaction)
                        else {
                            return UnitOutcome(.invocationLimitReached, audit: [])
                        }
                        scope.insertDataKeys(recordsToInsert)
                        if let key = idempotencyKey {
                            try await self.rememberIdempotent(
                                transaction,
                                scope: tenant.rawValue,
                                key: key,
                                .generateDataKey,
                                fingerprint,
                                result: ids.map(\.description).joined(separator: ",")
                            )
                        }
                        return UnitOutcome(
                            .stored,
                            audit: [
                                AuditEvent(
                                    time: now,
                                    principal: request.principal,
                                    tenant: tenant,
                                    operation: .generateDataKey,
                                    keyIDs: ids.map(\.description),
                                    requestID: request.requestID,
                                    detail:
                                        "version=\(primary) count=\(count) plaintext=\(includePlaintext) context-sha256=\(contextHash.hexString)"
                                )
                            ]
                        )
                    }.value
                    switch stored {
                    case .stored:
                        return generated
                    case .primaryMoved:
                        // The primary changed while the keys were being wrapped: wrap again under the
                        // new one.
                        break
                    case .invocationLimitReached:
                        // The version reached its invocation limit: rotate (once, whoever gets there
                        // first) and generate under the new primary.
                        try await self.rotateAtInvocationLimit(tenant, primary: primary, request: request)
                    }
                    self.cache.forgetPrimary(tenant)
                } catch let error as StorageError where error.kind == .conflict {
                    // Lost a lock race to another gateway instance: nothing was stored; go again.
                    self.cache.forgetPrimary(tenant)
                } catch  where idempotencyKey != nil && Self.isDuplicate(error) {
                    // A concurrent call with the same idempotency key committed first.
                    guard let key = idempotencyKey,
                        let replay = try await self.replay(
                            scope: tenant.rawValue, key: key, .generateDataKey, fingerprint)
                    else { throw error }
                    return try await self.replayGenerated(
                        tenant,
                        replay,
                        context: context,
                        includePlaintext: includePlaintext,
                        request: request
                    )
                }
            }
            throw KeyServiceError(.aborted, "the primary version kept changing; retry")
        }
    }

    /// Inside a write transaction: the tenant is enabled, `version` is still its primary (the row
    /// is locked, so a rotation waits for this transaction) and active. False when the primary
    /// moved on; throws when the tenant or version state forbids new keys.
    /// With `scope`, the rows are read once per batch through it.
    func checkPrimary(
        _ transaction: any KeyRepositoryTransaction,
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        allowDisabledTenant: Bool = false,
        scope: BatchScope? = nil
    ) async throws -> Bool {
        let locked =
            if let scope {
                try await scope.lockedTenant(tenant, in: transaction)
            } else {
                try await transaction.tenant(tenant, forUpdate: true)
            }
        guard let record = locked else {
            throw KeyServiceError(.notFound, "tenant \(tenant) not found")
        }
        // Moving keys (rewrap) is maintenance and may run while the tenant is disabled.
        guard record.state == .enabled || (allowDisabledTenant && record.state == .disabled) else {
            throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is \(record.state.rawValue)")
        }
        guard record.primaryVersion == version else { return false }
        let read =
            if let scope {
                try await scope.masterKeyVersion(tenant, version, in: transaction)
            } else {
                try await transaction.masterKeyVersion(tenant, version)
            }
        guard let versionRecord = read, versionRecord.state == .active
        else {
            throw KeyServiceError(
                .failedPrecondition,
                "the primary master-key version of tenant \(tenant) is not active; rotate or resume it"
            )
        }
        return true
    }

    /// The tenant's primary version (cached), failing when the tenant cannot use keys.
    func primaryVersion(_ tenant: TenantID) async throws -> MasterKeyVersionNumber {
        if let cached = cache.primary(tenant) { return cached }
        guard let record = try await repository.read({ try await $0.tenant(tenant, forUpdate: false) }) else {
            throw KeyServiceError(.notFound, "tenant \(tenant) not found")
        }
        guard record.state == .enabled else {
            throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is \(record.state.rawValue)")
        }
        cache.setPrimary(tenant, record.primaryVersion)
        return record.primaryVersion
    }

    private func replayGenerated(
        _ tenant: TenantID,
        _ result: String,
        context: EncryptionContext,
        includePlaintext: Bool,
        request: RequestContext
    ) async throws -> [GeneratedDataKey] {
        let ids = try result.split(separator: ",").map { try DataKeyID(String($0)) }
        let rows = try await repository.read { try await $0.dataKeys(tenant, ids: ids) }
        let byID = Dictionary(uniqueKeysWithValues: rows.map { ($0.id, $0) })
        var generated: [GeneratedDataKey] = []
        var unwrap: [DataKeyRequest] = []
        for id in ids {
            guard let row = byID[id], let wrapped = row.wrapped else {
                throw KeyServiceError(.failedPrecondition, "a data key of the first call has been destroyed")
            }
            generated.append(GeneratedDataKey(id: id, version: row.version, wrapped: wrapped, plaintext: nil))
            unwrap.append(DataKeyRequest(id: id, context: context))
        }
        guard includePlaintext else { return generated }
        let plaintexts = try await unwrapForCaller(tenant, unwrap, request: request)
        for index in generated.indices {
            generated[index].plaintext = try plaintexts[index].get().plaintext
        }
        return generated
    }

    // MARK: Decrypt

    /// Decrypts one data key by id. The context must be exactly the one it was generated with.
    /// `wrapped`, the blob the caller kept, is used only when the gateway has no row for `id`
    /// (see `DataKeyRequest.wrapped`).
    public func decryptDataKey(
        _ tenant: TenantID,
        id: DataKeyID,
        context: EncryptionContext = .empty,
        wrapped: WrappedDataKey? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> DecryptedDataKey {
        try await decryptDataKeys(
            tenant, [DataKeyRequest(id: id, context: context, wrapped: wrapped)], request: request)[0].get()
    }

    /// Decrypts up to 1,000 data keys in one token lease; each entry succeeds or fails alone.
    public func decryptDataKeys(
        _ tenant: TenantID,
        _ requests: [DataKeyRequest],
        request: RequestContext
    ) async throws(KeyServiceError) -> [Result<DecryptedDataKey, KeyServiceError>] {
        try await audited(
            .decryptDataKey, tenant: tenant, keyIDs: requests.prefix(10).map(\.id.description), request: request
        ) {
            () async throws -> [Result<DecryptedDataKey, KeyServiceError>] in
            guard !requests.isEmpty, requests.count <= KeyServiceConfiguration.maximumBatchSize else {
                throw KeyServiceError(.invalidArgument, "1 to \(KeyServiceConfiguration.maximumBatchSize) ids per call")
            }
            var usedCallerBlobs = 0
            let results = try await self.unwrapForCaller(
                tenant, requests, request: request, usedCallerBlobs: &usedCallerBlobs)
            // Audited as any decrypt; the detail says how many entries had no row and were
            // decrypted (or refused) from the blob their caller kept.
            try await self.auditResults(
                .decryptDataKey, tenant, requests.map(\.id), results,
                detail: usedCallerBlobs > 0 ? "by-caller-blob=\(usedCallerBlobs)" : "",
                request: request)
            return results
        }
    }

    /// Loads the rows, the tenant and its versions in one read, checks tenant, key and version
    /// states, and unwraps in one token lease.
    func unwrapForCaller(
        _ tenant: TenantID,
        _ requests: [DataKeyRequest],
        request: RequestContext
    ) async throws -> [Result<DecryptedDataKey, KeyServiceError>] {
        var ignored = 0
        return try await unwrapForCaller(tenant, requests, request: request, usedCallerBlobs: &ignored)
    }

    /// `unwrapForCaller`, counting in `usedCallerBlobs` the entries that had no row and went by
    /// the caller's blob (`DataKeyRequest.wrapped`).
    func unwrapForCaller(
        _ tenant: TenantID,
        _ requests: [DataKeyRequest],
        request: RequestContext,
        usedCallerBlobs: inout Int
    ) async throws -> [Result<DecryptedDataKey, KeyServiceError>] {
        // One statement on both stores: the tenant, the rows and their versions, fresh (nothing a
        // decrypt checks is cached, so a disabled tenant or version refuses the next call).
        let use = try await useReads.submit(UseRead(tenant: tenant, ids: requests.map(\.id)))
        guard let use else { throw KeyServiceError(.notFound, "tenant \(tenant) not found") }
        let tenantRecord = use.tenant
        let versions = use.versions
        let rows = Dictionary(use.keys.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        guard tenantRecord.state == .enabled else {
            throw KeyServiceError(.failedPrecondition, "tenant \(tenant) is \(tenantRecord.state.rawValue)")
        }
        var versionByNumber = Dictionary(uniqueKeysWithValues: versions.map { ($0.version, $0) })
        // Entries with no row but a blob of the caller's: the versions their blobs name are read
        // too (one more statement, only on this path).
        let byBlob = requests.filter { rows[$0.id] == nil && $0.wrapped != nil }
        if !byBlob.isEmpty {
            let named = Set(byBlob.compactMap { $0.wrapped?.version })
            for version in try await repository.read({ try await $0.masterKeyVersions(tenant) })
            where named.contains(version.version) {
                versionByNumber[version.version] = version
            }
        }
        var results: [Result<DecryptedDataKey, KeyServiceError>?] = Array(repeating: nil, count: requests.count)
        var operations: [TokenOperation] = []
        var positions: [Int] = []
        var sources: [(version: MasterKeyVersionNumber, wrapped: [UInt8])] = []
        for (index, entry) in requests.enumerated() {
            do throws(KeyServiceError) {
                let (versionNumber, blob) = try Self.source(rows[entry.id], entry)
                if rows[entry.id] == nil { usedCallerBlobs += 1 }
                guard let version = versionByNumber[versionNumber], version.state.allowsDecrypt else {
                    let state = versionByNumber[versionNumber]?.state.rawValue ?? "missing"
                    throw KeyServiceError(
                        .failedPrecondition,
                        "the master-key version of data key \(entry.id) is \(state); it does not decrypt"
                    )
                }
                operations.append(
                    .unwrap(
                        key: TokenKeyReference(id: version.tokenKeyID, tenant: tenant, version: versionNumber),
                        iv: blob.iv,
                        aad: WrappedDataKey.aad(
                            tenant: tenant,
                            dataKeyID: entry.id,
                            version: versionNumber,
                            contextHash: entry.context.hash
                        ),
                        ciphertextAndTag: blob.ciphertextAndTag
                    )
                )
                positions.append(index)
                sources.append((versionNumber, blob.encoded))
            } catch {
                results[index] = .failure(error)
            }
        }
        if !operations.isEmpty {
            let tokenResults = try await performChecked(operations, request: request)
            for ((position, source), result) in zip(zip(positions, sources), tokenResults) {
                let entry = requests[position]
                switch result {
                case .unwrapped(let plaintext):
                    results[position] = .success(
                        DecryptedDataKey(
                            id: entry.id, version: source.version, wrapped: source.wrapped, plaintext: plaintext)
                    )
                case .failed(let error):
                    results[position] = .failure(Self.map(error))
                default:
                    results[position] = .failure(KeyServiceError(.internalError, "unexpected token result"))
                }
            }
        }
        return results.map { $0! }
    }

    /// One round of `useReads`: one read, one statement per tenant (the ids of all its requests),
    /// each request answered with its own keys and the versions they name.
    static func readForUse(_ requests: [UseRead], _ repository: any KeyRepository) async throws
        -> [Result<DataKeysForUse?, any Error>]
    {
        var idsByTenant: [TenantID: Set<DataKeyID>] = [:]
        for request in requests { idsByTenant[request.tenant, default: []].formUnion(request.ids) }
        let found = try await repository.read { transaction in
            var found: [TenantID: DataKeysForUse?] = [:]
            for (tenant, ids) in idsByTenant {
                found[tenant] = try await transaction.dataKeysForUse(tenant, ids: Array(ids))
            }
            return found
        }
        return requests.map { request in
            guard let use = found[request.tenant] ?? nil else { return .success(nil) }
            // Alone in its round: everything read is its own.
            if requests.count == 1 { return .success(use) }
            let mine = Set(request.ids)
            let keys = use.keys.filter { mine.contains($0.id) }
            let named = Set(keys.map(\.version))
            return .success(
                DataKeysForUse(
                    tenant: use.tenant, keys: keys, versions: use.versions.filter { named.contains($0.version) }))
        }
    }

    /// What one decrypt entry unwraps: the stored row when there is one (`usable`), otherwise the
    /// blob the caller kept, which must name this very key. Without a row the key's own state
    /// (enabled, disabled, destroyed) is unknown; the tenant and version checks still apply.
    static func source(_ row: DataKeyRecord?, _ entry: DataKeyRequest) throws(KeyServiceError) -> (
        MasterKeyVersionNumber, WrappedDataKey
    ) {
        // A blob of another key: refused before the token, as a moved row is (the AAD would
        // refuse it too), whether or not the key asked for has a row.
        if let blob = entry.wrapped, blob.dataKeyID != entry.id {
            throw KeyServiceError(.decryptionFailed, "decryption failed")
        }
        if let row {
            let (row, blob) = try usable(row, entry.id)
            return (row.version, blob)
        }
        guard let blob = entry.wrapped else {
            throw KeyServiceError(.notFound, "data key \(entry.id) not found")
        }
        return (blob.version, blob)
    }

    /// A stored row that can be used for a caller: exists, enabled, and holds a parseable blob
    /// that names this very key and version.
    static func usable(_ row: DataKeyRecord?, _ id: DataKeyID) throws(KeyServiceError) -> (
        DataKeyRecord, WrappedDataKey
    ) {
        guard let row else { throw KeyServiceError(.notFound, "data key \(id) not found") }
        guard row.state == .enabled else {
            throw KeyServiceError(.failedPrecondition, "data key \(id) is \(row.state.rawValue)")
        }
        guard let bytes = row.wrapped, let blob = WrappedDataKey(encoded: bytes) else {
            throw KeyServiceError(.dataLoss, "the stored wrapped key of \(id) is damaged")
        }
        // A blob copied from another row names another key or version: refuse before the token
        // (the AAD would refuse it too).
        guard blob.dataKeyID == id, blob.version == row.version else {
            throw KeyServiceError(.decryptionFailed, "decryption failed")
        }
        return (row, blob)
    }

    /// One audit unit for a batch: a success record listing the keys that worked and a failure
    /// record per error code listing the keys that did not.
    func auditResults<T>(
        _ operation: AuditOperation,
        _ tenant: TenantID,
        _ ids: [DataKeyID],
        _ results: [Result<T, KeyServiceError>],
        detail: String = "",
        request: RequestContext
    ) async throws {
        var succeeded: [String] = []
        var failed: [String: [String]] = [:]
        for (id, result) in zip(ids, results) {
            switch result {
            case .success: succeeded.append(id.description)
            case .failure(let error): failed[error.code.description, default: []].append(id.description)
            }
        }
        var events: [AuditEvent] = []
        if !succeeded.isEmpty {
            events.append(
                AuditEvent(
                    principal: request.principal,
                    tenant: tenant,
                    operation: operation,
                    keyIDs: succeeded,
                    requestID: request.requestID,
                    detail: detail
                )
            )
        }
        for (code, keys) in failed.sorted(by: { $0.key < $1.key }) {
            events.append(
                AuditEvent(
                    principal: request.principal,
                    tenant: tenant,
                    operation: operation,
                    keyIDs: keys,
                    outcome: .failure(code),
                    requestID: request.requestID,
                    detail: detail
                )
            )
        }
        _ = try await committer.append(lane: tenant.rawValue, events)
    }

    // MARK: ReWrap

    /// Moves one data key to the tenant's primary version inside the gateway: unwrapped and
    /// wrapped again in one token lease, the plaintext zeroed before the lease ends. Needs the
    /// exact context. A key already under the primary is left as it is: an unwrap proves the
    /// context, and the row comes back unchanged (no new wrapping, no write but the audit record).
    public func rewrapDataKey(
        _ tenant: TenantID,
        id: DataKeyID,
        context: EncryptionContext = .empty,
        request: RequestContext
    ) async throws(KeyServiceError) -> DataKeyRecord {
        try await audited(.rewrapDataKey, tenant: tenant, keyIDs: [id.description], request: request) {
            () async throws -> DataKeyRecord in
            guard let row = try await self.repository.read({ try await $0.dataKey(tenant, id) }) else {
                throw KeyServiceError(.notFound, "data key \(id) not found")
            }
            guard row.state != .destroyed else {
                throw KeyServiceError(.failedPrecondition, "data key \(id) is destroyed")
            }
            let moved = try await self.rewrap(tenant, [row], contextHashes: [context.hash], request: request)
            return try moved[0].get()
        }
    }

    /// Moves `rows` to the primary version: rewraps in one lease, counts the wraps and updates the
    /// rows that are still under their old version in one write unit, audits. Used by ReWrap (with
    /// the context the caller proved) and by the rewrap job (with the stored context hashes).
    ///
    /// The new wrapping is bound to `contextHashes[i]`, the hash the unwrap just authenticated,
    /// never to the stored `context_hash` alone: for ReWrap the caller's context is proven by the
    /// unwrap, and the row's stored hash is rewritten from it (a changed stored hash is repaired
    /// and logged, since the database is not trusted for key binding).
    ///
    /// For ReWrap (`job == nil`), a row already under the primary is only unwrapped: that proves
    /// the caller's context, and the row is returned as it is (protocol §9.3). The job is given
    /// rows under other versions only, and wraps every row it is given.
    func rewrap(
        _ tenant: TenantID,
        _ rows: [DataKeyRecord],
        contextHashes: [[UInt8]],
        job: RewrapJobRecord? = nil,
        request: RequestContext
    ) async throws -> [Result<DataKeyRecord, KeyServiceError>] {
        for _ in 0..<Self.writeAttempts {
            let primary = try await primaryVersion(tenant)
            let target = try await masterKey(VersionRef(tenant: tenant, version: primary))
            let versions = try await repository.read { try await $0.masterKeyVersions(tenant) }
            let versionByNumber = Dictionary(uniqueKeysWithValues: versions.map { ($0.version, $0) })
            var results: [Result<DataKeyRecord, KeyServiceError>?] = Array(repeating: nil, count: rows.count)
            var pending: [(position: Int, blob: WrappedDataKey)] = []
            for (index, row) in rows.enumerated() {
                guard let bytes = row.wrapped, let blob = WrappedDataKey(encoded: bytes), blob.dataKeyID == row.id,
                    blob.version == row.version
                else {
                    results[index] = .failure(
                        KeyServiceError(.dataLoss, "the stored wrapped key of \(row.id) is damaged"))
                    continue
                }
                guard let source = versionByNumber[row.version], source.state.allowsRewrapFrom else {
                    results[index] = .failure(
                        KeyServiceError(.failedPrecondition, "version \(row.version) cannot be unwrapped any more")
                    )
                    continue
                }
                pending.append((index, blob))
            }
            if pending.isEmpty { return results.map { $0! } }
            // Rows a ReWrap finds under the primary already: proven by an unwrap, left as they are.
            let unwrapOnly = Set(
                pending.map(\.position).filter { job == nil && rows[$0].version == primary })
            var operations: [TokenOperation] = []
            for item in pending {
                let row = rows[item.position]
                let contextHash = contextHashes[item.position]
                if unwrapOnly.contains(item.position) {
                    operations.append(
                        .unwrap(
                            key: TokenKeyReference(
                                id: versionByNumber[row.version]!.tokenKeyID, tenant: tenant, version: row.version),
                            iv: item.blob.iv,
                            aad: WrappedDataKey.aad(
                                tenant: tenant, dataKeyID: row.id, version: row.version, contextHash: contextHash),
                            ciphertextAndTag: item.blob.ciphertextAndTag
                        )
                    )
                    continue
                }
                operations.append(
                    .rewrap(
                        from: TokenKeyReference(
                            id: versionByNumber[row.version]!.tokenKeyID, tenant: tenant, version: row.version),
                        iv: item.blob.iv,
                        aad: WrappedDataKey.aad(
                            tenant: tenant, dataKeyID: row.id, version: row.version, contextHash: contextHash),
                        ciphertextAndTag: item.blob.ciphertextAndTag,
                        to: target,
                        newAAD: WrappedDataKey.aad(
                            tenant: tenant, dataKeyID: row.id, version: primary, contextHash: contextHash)
                    )
                )
            }
            let tokenResults = try await performChecked(operations, request: request)
            var updates: [(position: Int, row: DataKeyRecord)] = []
            var unchanged: [Int] = []
            let now = Timestamp.now()
            for (item, result) in zip(pending, tokenResults) {
                switch result {
                case .unwrapped:
                    // The context is proven; the plaintext is released (and zeroed) right here.
                    if rows[item.position].contextHash != contextHashes[item.position] {
                        logger.warning(
                            """
                            the stored context hash of a data key differs from the one its unwrap proved; \
                            left as stored until the key is rewrapped to a new primary
                            """,
                            metadata: ["tenant": "\(tenant)", "data_key": "\(rows[item.position].id)"]
                        )
                    }
                    unchanged.append(item.position)
                case .rewrapped(let iv, let ciphertextAndTag):
                    var row = rows[item.position]
                    let proven = contextHashes[item.position]
                    if row.contextHash != proven {
                        logger.warning(
                            "the stored context hash of a data key differed from the one its unwrap proved; repaired",
                            metadata: ["tenant": "\(tenant)", "data_key": "\(row.id)"]
                        )
                    }
                    row.wrapped =
                        WrappedDataKey(version: primary, dataKeyID: row.id, iv: iv, ciphertextAndTag: ciphertextAndTag)
                        .encoded
                    row.version = primary
                    row.contextHash = proven
                    row.updatedAt = now
                    updates.append((item.position, row))
                case .failed(let error):
                    results[item.position] = .failure(Self.map(error))
                default:
                    results[item.position] = .failure(KeyServiceError(.internalError, "unexpected token result"))
                }
            }
            let plannedUpdates = updates
            let provenUnchanged = unchanged
            let originalRows = rows
            let priorResults = results
            let committed = try await committer.commit {
                transaction -> UnitOutcome<(WriteOutcome, [Result<DataKeyRecord, KeyServiceError>?])> in
                guard try await self.checkPrimary(transaction, tenant, primary, allowDisabledTenant: true) else {
                    return UnitOutcome((.primaryMoved, []), audit: [])
                }
                if !plannedUpdates.isEmpty {
                    guard try await self.countInvocations(transaction, tenant, primary, Int64(plannedUpdates.count))
                    else { return UnitOutcome((.invocationLimitReached, []), audit: []) }
                }
                var results = priorResults
                var moved: [String] = []
                var repaired = 0
                for update in plannedUpdates {
                    let original = originalRows[update.position]
                    let changed = try await transaction.updateDataKeyWrapping(
                        tenant,
                        original.id,
                        fromVersion: original.version,
                        toVersion: primary,
                        wrapped: update.row.wrapped!,
                        contextHash: update.row.contextHash,
                        at: now
                    )
                    if changed {
                        results[update.position] = .success(update.row)
                        moved.append(original.id.description)
                        if original.contextHash != update.row.contextHash { repaired += 1 }
                    } else {
                        results[update.position] = .failure(
                            KeyServiceError(.aborted, "data key \(original.id) changed meanwhile")
                        )
                    }
                }
                // Still under the primary (checked above, under the tenant lock): as they are.
                for position in provenUnchanged { results[position] = .success(originalRows[position]) }
                let unchangedIDs = provenUnchanged.map { originalRows[$0].id.description }
                var audit: [AuditEvent] = []
                if !moved.isEmpty || !unchangedIDs.isEmpty || job != nil {
                    audit.append(
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: tenant,
                            operation: job == nil ? .rewrapDataKey : .rewrapJob,
                            keyIDs: moved + unchangedIDs,
                            requestID: request.requestID,
                            detail: "to-version=\(primary) moved=\(moved.count)"
                                + (unchangedIDs.isEmpty ? "" : " unchanged=\(unchangedIDs.count)")
                                + (repaired > 0 ? " context-hash-repaired=\(repaired)" : "")
                        )
                    )
                }
                if var job {
                    job.targetVersion = primary
                    job.cursor = originalRows.last?.id
                    job.moved += Int64(moved.count)
                    job.updatedAt = now
                    try await transaction.saveRewrapJob(job)
                }
                return UnitOutcome((.stored, results), audit: audit)
            }.value
            switch committed.0 {
            case .stored:
                return committed.1.map { $0! }
            case .primaryMoved:
                break
            case .invocationLimitReached:
                try await rotateAtInvocationLimit(tenant, primary: primary, request: request)
            }
            cache.forgetPrimary(tenant)
        }
        throw KeyServiceError(.aborted, "the primary version kept changing; retry")
    }

    /// Runs `operations` in the token and handles binding violations: for every master key whose
    /// token object turned out not to be the one its version names, the cached reference is
    /// dropped, the error is logged and an audit record says a key binding was violated (in a
    /// transaction of its own, so it stays even though the call fails). The operations concerned
    /// come back as failures, which callers map to `dataLoss`.
    func performChecked(_ operations: [TokenOperation], request: RequestContext) async throws -> [TokenResult] {
        let results = try await tokenRounds.submit(operations)
        var violated: [TokenKeyID: (version: VersionRef?, detail: String)] = [:]
        for (operation, result) in zip(operations, results) {
            guard case .failed(let error) = result, error.kind == .bindingViolation, let key = error.key else {
                continue
            }
            // The version whose row named this object: the label the operation expected says which.
            let reference = operation.keyReferences.first { $0.id == key }
            let version = reference.flatMap { MasterKeyLabel.parse($0.label) }.map {
                VersionRef(tenant: $0.tenant, version: $0.version)
            }
            violated[key] = (version, error.detail)
        }
        guard !violated.isEmpty else { return results }
        for (key, (version, detail)) in violated.sorted(by: { $0.key.description < $1.key.description }) {
            if let version {
                cache.forgetTokenKey(version)
            }
            logger.error(
                "master key binding violated: the key store names a token object that is not this version's key",
                metadata: [
                    "tenant": "\(version?.tenant.rawValue ?? "?")", "version": "\(version?.version ?? 0)",
                    "token_key_id": "\(key)", "detail": "\(detail)",
                ]
            )
            let event = AuditEvent(
                principal: request.principal,
                tenant: version?.tenant,
                operation: .keyBindingViolation,
                keyIDs: version.map { ["v\($0.version)"] } ?? [],
                outcome: .failure("binding-violation"),
                requestID: request.requestID,
                detail: "token-key-id=\(key)"
            )
            do {
                _ = try await committer.commit { _ in UnitOutcome((), audit: [event]) }
            } catch {
                logger.error(
                    "could not audit a key binding violation",
                    metadata: ["error": "\(Self.map(error).logDescription)"]
                )
            }
        }
        return results
    }

    // MARK: State and listing

    /// Refuses decrypt and encrypt with the key until it is enabled again.
    public func disableDataKey(_ tenant: TenantID, id: DataKeyID, request: RequestContext) async throws(KeyServiceError)
        -> DataKeyRecord
    {
        try await setDataKeyState(tenant, id, from: [.enabled], to: .disabled, .disableDataKey, request)
    }

    public func enableDataKey(_ tenant: TenantID, id: DataKeyID, request: RequestContext) async throws(KeyServiceError)
        -> DataKeyRecord
    {
        try await setDataKeyState(tenant, id, from: [.disabled], to: .enabled, .enableDataKey, request)
    }

    /// Deletes the wrapped copy: the key can never be decrypted again (crypto-shred of one key).
    public func destroyDataKey(_ tenant: TenantID, id: DataKeyID, request: RequestContext) async throws(KeyServiceError)
        -> DataKeyRecord
    {
        try await setDataKeyState(tenant, id, from: [.enabled, .disabled], to: .destroyed, .destroyDataKey, request)
    }

    private func setDataKeyState(
        _ tenant: TenantID,
        _ id: DataKeyID,
        from allowed: Set<DataKeyState>,
        to state: DataKeyState,
        _ operation: AuditOperation,
        _ request: RequestContext
    ) async throws(KeyServiceError) -> DataKeyRecord {
        try await audited(operation, tenant: tenant, keyIDs: [id.description], request: request) {
            () async throws -> DataKeyRecord in
            try await self.committer.commit { transaction in
                guard let tenantRecord = try await transaction.tenant(tenant, forUpdate: false),
                    tenantRecord.state != .shredded
                else { throw KeyServiceError(.notFound, "tenant \(tenant) not found") }
                guard var row = try await transaction.dataKey(tenant, id) else {
                    throw KeyServiceError(.notFound, "data key \(id) not found")
                }
                guard allowed.contains(row.state) else {
                    throw KeyServiceError(
                        .failedPrecondition,
                        "a \(row.state.rawValue) data key cannot become \(state.rawValue)"
                    )
                }
                let now = Timestamp.now()
                guard
                    try await transaction.setDataKeyState(
                        tenant,
                        id,
                        to: state,
                        clearWrapped: state == .destroyed,
                        at: now
                    )
                else { throw KeyServiceError(.aborted, "data key \(id) changed meanwhile") }
                row.state = state
                row.updatedAt = now
                if state == .destroyed { row.wrapped = nil }
                return UnitOutcome(
                    row,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: tenant,
                            operation: operation,
                            keyIDs: [id.description],
                            requestID: request.requestID,
                            detail: "state=\(state.rawValue)"
                        )
                    ]
                )
            }.value
        }
    }

    /// One data key's metadata (never its plaintext).
    public func dataKey(_ tenant: TenantID, id: DataKeyID) async throws(KeyServiceError) -> DataKeyRecord {
        try await mapErrors {
            guard let row = try await self.repository.read({ try await $0.dataKey(tenant, id) }) else {
                throw KeyServiceError(.notFound, "data key \(id) not found")
            }
            return row
        }
    }

    /// A tenant's data keys ordered by id, optionally one state only, a page at a time.
    public func listDataKeys(
        _ tenant: TenantID,
        state: DataKeyState? = nil,
        page: PageRequest = PageRequest()
    ) async throws(KeyServiceError) -> Page<DataKeyRecord> {
        try await mapErrors {
            let limit = try Self.checkedLimit(page.limit)
            let after = try page.after.map { (value: String) throws(KeyServiceError) in try DataKeyID(value) }
            let items = try await self.repository.read {
                try await $0.dataKeys(tenant, state: state, after: after, limit: limit + 1)
            }
            let pageItems = Array(items.prefix(limit))
            return Page(items: pageItems, nextPage: items.count > limit ? pageItems.last?.id.description : nil)
        }
    }
}
