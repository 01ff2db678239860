import SecretMemory

// The ports: what the key service needs from a token and from storage. Adapters implement
// them (`PKCS11KeyToken`, `PostgresKeyStore`, `SQLiteKeyStore`); the service never sees a
// session, a handle, a connection or SQL.

// MARK: - Token

/// The HSM as the key service uses it: master keys that never leave it, and AES-GCM under them.
public protocol MasterKeyToken: Sendable {
    /// Generates an AES-256 master key inside the token with the policy template (token object,
    /// private, sensitive, never extractable, ENCRYPT/DECRYPT only), `CKA_ID` = `id`,
    /// `CKA_LABEL` = `label`, reads its attributes back and refuses (destroying it) a key that is
    /// weaker than the policy.
    func generateMasterKey(id: TokenKeyID, label: String) async throws(TokenError)

    /// Destroys the master-key object with this `CKA_ID`. Returns false when there is none.
    func destroyMasterKey(id: TokenKeyID) async throws(TokenError) -> Bool

    /// Destroys every master-key object whose label starts with `labelPrefix` (crypto-shred,
    /// including objects left behind by a crash between token and database). Returns how many.
    func destroyMasterKeys(labelPrefix: String) async throws(TokenError) -> Int

    /// The labels of the master-key objects whose label starts with `labelPrefix`.
    func masterKeyLabels(labelPrefix: String) async throws(TokenError) -> [String]

    /// Runs `operations` in order in one session lease (one hop to the token's threads). Each
    /// operation succeeds or fails on its own; a failure of the whole lease (no session, token
    /// gone) throws.
    func perform(_ operations: [TokenOperation]) async throws(TokenError) -> [TokenResult]
}

/// One AES-GCM operation under a master key (96-bit IV, 128-bit tag).
public enum TokenOperation: Sendable {
    /// Draws 32 bytes from the token's RNG and encrypts them under `key`: a new data key.
    case generateAndWrap(key: TokenKeyID, iv: [UInt8], aad: [UInt8])
    /// Encrypts `plaintext` under `key`.
    case wrap(key: TokenKeyID, iv: [UInt8], aad: [UInt8], plaintext: SecretBytes)
    /// Decrypts and authenticates `ciphertextAndTag` under `key`.
    case unwrap(key: TokenKeyID, iv: [UInt8], aad: [UInt8], ciphertextAndTag: [UInt8])
    /// Unwrap under one key and wrap under another in one step; the plaintext is zeroed before
    /// this returns and never reaches the caller.
    case rewrap(
        from: TokenKeyID,
        iv: [UInt8],
        aad: [UInt8],
        ciphertextAndTag: [UInt8],
        to: TokenKeyID,
        newIV: [UInt8],
        newAAD: [UInt8]
    )
}

/// The result of one `TokenOperation`, in the same position.
public enum TokenResult: Sendable {
    case generated(plaintext: SecretBytes, ciphertextAndTag: [UInt8])
    case wrapped(ciphertextAndTag: [UInt8])
    case unwrapped(plaintext: SecretBytes)
    case rewrapped(ciphertextAndTag: [UInt8])
    case failed(TokenError)
}

// MARK: - Storage

/// Durable storage of tenants, versions, wrapped data keys, idempotency records, rewrap jobs
/// and the audit log. Two implementations (PostgreSQL, SQLite) pass one conformance suite.
///
/// Rules every implementation keeps:
/// - `transaction` commits durably before it returns (PostgreSQL `synchronous_commit` on;
///   SQLite WAL with `synchronous=FULL`); a throwing body rolls everything back.
/// - Unique constraints and foreign keys guard against duplicates and orphans; a violation
///   throws `StorageError(.uniqueViolation / .foreignKeyViolation)`.
/// - A lost race (serialization failure, deadlock, busy) throws `StorageError(.conflict)`.
/// - Never stored: token object handles, PINs, plaintext key material.
public protocol KeyRepository: Sendable {
    /// Runs `body` in one read-write transaction and commits it.
    func transaction<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T

    /// Runs `body` against committed data, without a write lock (listings, lookups, verify).
    /// Calling a write method inside `read` is a programming error.
    func read<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T

    /// Closes connections; later calls fail with `StorageError(.unavailable)`.
    func close() async
}

/// The statements the key service runs inside a transaction. All methods are scoped by tenant
/// where a tenant applies: a row of tenant A is never returned for tenant B.
public protocol KeyRepositoryTransaction: Sendable {
    // MARK: Savepoints

    /// Runs `body` inside a savepoint: when it throws, only its own changes are rolled back and
    /// the error is rethrown; the transaction goes on. (Group commit does not use it: a refused
    /// unit reruns the batch without it, cheaper than two round trips per unit.)
    func savepoint<T: Sendable>(_ body: () async throws -> T) async throws -> T

    // MARK: Tenants

    func insertTenant(_ tenant: TenantRecord) async throws
    /// With `forUpdate`, locks the row until the transaction ends (PostgreSQL `FOR UPDATE`; SQLite
    /// needs nothing, its writer is already exclusive).
    func tenant(_ id: TenantID, forUpdate: Bool) async throws -> TenantRecord?
    /// Writes state, primary version and updatedAt.
    func updateTenant(_ tenant: TenantRecord) async throws
    /// Tenants ordered by id, after `after` (exclusive).
    func tenants(after: TenantID?, limit: Int) async throws -> [TenantRecord]

    // MARK: Master-key versions

    func insertMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws
    func masterKeyVersion(_ tenant: TenantID, _ version: MasterKeyVersionNumber) async throws -> MasterKeyVersionRecord?
    /// All versions of a tenant, ordered by version.
    func masterKeyVersions(_ tenant: TenantID) async throws -> [MasterKeyVersionRecord]
    /// Writes state, updatedAt, destroyAfter and destroyedAt (not the invocation count).
    func updateMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws
    /// Atomically: when `invocationsReserved + count <= limit`, adds `count` and returns the value
    /// before the addition (the first counter of the reserved block); otherwise returns nil and
    /// changes nothing. Nil also when the version does not exist.
    func reserveInvocations(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        count: Int64,
        limit: Int64
    ) async throws -> Int64?
    /// Versions of any tenant with `destroyAfter <= now` and state not destroyed, oldest first.
    func versionsDueForDestruction(now: Timestamp, limit: Int) async throws -> [MasterKeyVersionRecord]

    // MARK: Data keys

    /// Inserts up to 1,000 rows in one statement or a few.
    func insertDataKeys(_ keys: [DataKeyRecord]) async throws
    func dataKey(_ tenant: TenantID, _ id: DataKeyID) async throws -> DataKeyRecord?
    /// The rows among `ids` (at most 1,000) that exist for `tenant`, in any order.
    func dataKeys(_ tenant: TenantID, ids: [DataKeyID]) async throws -> [DataKeyRecord]
    /// A tenant's data keys ordered by id, after `after` (exclusive), optionally one state only.
    func dataKeys(_ tenant: TenantID, state: DataKeyState?, after: DataKeyID?, limit: Int) async throws
        -> [DataKeyRecord]
    /// Data keys not destroyed and not under `version`, ordered by id, after `after` (the rewrap
    /// job's scan).
    func dataKeysNotUnderVersion(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        after: DataKeyID?,
        limit: Int
    ) async throws -> [DataKeyRecord]
    /// How many data keys that are not destroyed the tenant has, under `version` or under any.
    func countLiveDataKeys(_ tenant: TenantID, version: MasterKeyVersionNumber?) async throws -> Int64
    /// Replaces the wrapping of one key only if it is still under `fromVersion` and not
    /// destroyed. Returns whether a row changed.
    func updateDataKeyWrapping(
        _ tenant: TenantID,
        _ id: DataKeyID,
        fromVersion: MasterKeyVersionNumber,
        toVersion: MasterKeyVersionNumber,
        wrapped: [UInt8],
        at time: Timestamp
    ) async throws -> Bool
    /// Sets the state of one key that is not destroyed; with `clearWrapped` the wrapped copy is
    /// deleted (set to NULL). Returns whether a row changed.
    func setDataKeyState(
        _ tenant: TenantID,
        _ id: DataKeyID,
        to state: DataKeyState,
        clearWrapped: Bool,
        at time: Timestamp
    ) async throws -> Bool
    /// When the key is enabled and `encryptions < limit`, adds one and returns the new count;
    /// otherwise nil.
    func countEncryption(_ tenant: TenantID, _ id: DataKeyID, limit: Int64) async throws -> Int64?
    /// Deletes every data key row of the tenant (crypto-shred). Returns how many.
    func deleteDataKeys(_ tenant: TenantID) async throws -> Int64

    // MARK: Idempotency

    func idempotencyRecord(scope: String, key: String) async throws -> IdempotencyRecord?
    /// Throws `uniqueViolation` when (scope, key) exists.
    func insertIdempotencyRecord(_ record: IdempotencyRecord) async throws
    /// Deletes records created before `time`. Returns how many.
    func deleteIdempotencyRecords(before time: Timestamp) async throws -> Int64

    // MARK: Rewrap jobs

    func rewrapJob(_ tenant: TenantID) async throws -> RewrapJobRecord?
    /// Inserts or replaces the tenant's job.
    func saveRewrapJob(_ job: RewrapJobRecord) async throws

    // MARK: Audit

    /// The head of the chain, locked until the transaction ends (PostgreSQL `FOR UPDATE`), so
    /// appends from every gateway instance are ordered.
    func lockAuditHead() async throws -> AuditHead
    /// The head without a lock.
    func auditHead() async throws -> AuditHead
    /// Inserts `records` and moves the head to `head`.
    func appendAuditRecords(_ records: [AuditRecord], head: AuditHead) async throws
    /// Records with sequence > `after`, in sequence order... as stored: ordered by the primary
    /// key, which is the sequence.
    func auditRecords(after: Int64, limit: Int) async throws -> [AuditRecord]

    // MARK: Principals

    /// Inserts the principal and its role bindings. Throws `uniqueViolation` when the name or
    /// the certificate common name is taken.
    func insertPrincipal(_ principal: PrincipalRecord) async throws
    /// One principal with its role bindings (ordered by scope, then role).
    func principal(_ name: PrincipalName) async throws -> PrincipalRecord?
    /// The principal whose certificate common name is exactly `commonName`.
    func principal(certificateCommonName commonName: CertificateCommonName) async throws -> PrincipalRecord?
    /// Principals ordered by name, after `after` (exclusive), each with its role bindings.
    func principals(after: PrincipalName?, limit: Int) async throws -> [PrincipalRecord]
    /// How many principals exist.
    func countPrincipals() async throws -> Int64
    /// Locks the principals against inserts from other transactions until this one ends
    /// (PostgreSQL `LOCK TABLE`; SQLite needs nothing, its writer is already exclusive), so
    /// "insert only if none exists" cannot race.
    func lockPrincipals() async throws
    /// Sets the disabled flag. Returns whether the principal exists.
    func setPrincipalDisabled(_ name: PrincipalName, _ disabled: Bool) async throws -> Bool
    /// Adds a binding. Returns false when the principal already holds it; throws
    /// `foreignKeyViolation` when the principal does not exist.
    func insertRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool
    /// Removes a binding. Returns whether the principal held it.
    func deleteRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool

    // MARK: API tokens

    /// Throws `uniqueViolation` when the id or the hash exists, `foreignKeyViolation` when the
    /// principal does not.
    func insertAPIToken(_ token: APITokenRecord) async throws
    /// The token whose SHA-256 is `hash` (the lookup at authentication).
    func apiToken(hash: [UInt8]) async throws -> APITokenRecord?
    func apiToken(_ id: APITokenID) async throws -> APITokenRecord?
    /// Tokens ordered by id, after `after` (exclusive), of one principal or of all.
    func apiTokens(principal: PrincipalName?, after: APITokenID?, limit: Int) async throws -> [APITokenRecord]
    /// Sets `revokedAt` when the token is not revoked yet. Returns whether a row changed.
    func revokeAPIToken(_ id: APITokenID, at time: Timestamp) async throws -> Bool
}

/// Access-control storage is newer than the rest of the port: these defaults let an
/// implementation that predates it (a test double) still conform. Both stores implement every
/// method, and the conformance suite checks them.
extension KeyRepositoryTransaction {
    private static func unsupported() -> StorageError {
        StorageError(.other, "this repository does not store principals or API tokens")
    }

    public func insertPrincipal(_ principal: PrincipalRecord) async throws { throw Self.unsupported() }
    public func principal(_ name: PrincipalName) async throws -> PrincipalRecord? { throw Self.unsupported() }
    public func principal(certificateCommonName commonName: CertificateCommonName) async throws -> PrincipalRecord? {
        throw Self.unsupported()
    }
    public func principals(after: PrincipalName?, limit: Int) async throws -> [PrincipalRecord] {
        throw Self.unsupported()
    }
    public func countPrincipals() async throws -> Int64 { throw Self.unsupported() }
    public func lockPrincipals() async throws { throw Self.unsupported() }
    public func setPrincipalDisabled(_ name: PrincipalName, _ disabled: Bool) async throws -> Bool {
        throw Self.unsupported()
    }
    public func insertRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        throw Self.unsupported()
    }
    public func deleteRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        throw Self.unsupported()
    }
    public func insertAPIToken(_ token: APITokenRecord) async throws { throw Self.unsupported() }
    public func apiToken(hash: [UInt8]) async throws -> APITokenRecord? { throw Self.unsupported() }
    public func apiToken(_ id: APITokenID) async throws -> APITokenRecord? { throw Self.unsupported() }
    public func apiTokens(principal: PrincipalName?, after: APITokenID?, limit: Int) async throws -> [APITokenRecord] {
        throw Self.unsupported()
    }
    public func revokeAPIToken(_ id: APITokenID, at time: Timestamp) async throws -> Bool { throw Self.unsupported() }
}
