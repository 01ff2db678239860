import KeyHierarchy
import Logging
import SQLiteNIO
import Synchronization

/// The statements of one `transaction` (on the writer) or one `read` (on a reader), on a connection
/// leased to it alone. Statements run one at a time, in the order the body awaits them.
final class SQLiteTransaction: KeyRepositoryTransaction {
    /// The most rows one multi-row INSERT carries: 1,000 data keys (9 values each) or audit records
    /// (11 each) stay far below SQLite's default limit of 32,766 bound variables, so one batch of the
    /// key service is one statement.
    static let maximumRowsPerInsert = 1000
    /// The most ids one `IN (...)` lookup binds, for the same reason.
    static let maximumIDsPerLookup = 1000

    /// The most rows one listing returns, whatever `limit` asks: bounds the memory of one read.
    /// Callers page with keyset cursors, so a smaller page loses nothing. (Same as the PostgreSQL
    /// store.)
    static let maximumRowsPerRead = 10_000

    let connection: SQLiteConnection
    let writable: Bool
    private let logger: Logger
    private let statements: StatementCounter
    private let state = Mutex(State())

    private struct State {
        var nextSavepoint = 1
        var ended = false
        /// A statement failed and no savepoint has rolled it back yet. SQLite itself would let the
        /// transaction go on, but PostgreSQL refuses everything until the transaction or savepoint
        /// ends, and both stores behave alike: later statements and the commit fail.
        var aborted: StorageError?
        /// A failure after which SQLite may have rolled back the whole transaction (I/O error, full
        /// disk, busy, out of memory): no savepoint can recover from it.
        var fatal: StorageError?
    }

    init(connection: SQLiteConnection, writable: Bool, logger: Logger, statements: StatementCounter) {
        self.connection = connection
        self.writable = writable
        self.statements = statements
        self.logger = logger
    }

    // MARK: - Running statements

    /// Runs one statement of the body and returns its rows.
    @discardableResult
    func run(_ operation: String, _ sql: String, _ binds: [SQLiteData] = []) async throws -> [SQLiteRow] {
        try checkUsable(operation)
        statements.add()
        do {
            return try await connection.query(sql, binds)
        } catch {
            let mapped = StorageError.from(error, during: operation)
            if writable, let storageError = mapped as? StorageError {
                let fatal = !StorageError.isStatementScoped(error)
                state.withLock { state in
                    state.aborted = state.aborted ?? storageError
                    if fatal { state.fatal = state.fatal ?? storageError }
                }
            }
            logger.debug("SQLite statement failed", metadata: ["error": "\(mapped)"])
            throw mapped
        }
    }

    /// Runs one statement that must not be a write inside `read`.
    @discardableResult
    func write(_ operation: String, _ sql: String, _ binds: [SQLiteData] = []) async throws -> [SQLiteRow] {
        guard writable else {
            throw StorageError(.other, "\(operation): a write inside read(); use transaction()")
        }
        return try await run(operation, sql, binds)
    }

    private func checkUsable(_ operation: String) throws {
        try state.withLock { state in
            if state.ended {
                throw StorageError(.other, "\(operation): used after its transaction ended")
            }
            if let fatal = state.fatal {
                throw StorageError(fatal.kind, "\(operation): the transaction already failed: \(fatal.detail)")
            }
            if let aborted = state.aborted {
                throw StorageError(
                    .other,
                    "\(operation): an earlier statement failed and no savepoint rolled it back: \(aborted.detail)"
                )
            }
        }
    }

    /// Runs a transaction-control statement (BEGIN, COMMIT, SAVEPOINT...) to completion even when
    /// the calling task is cancelled: sqlite-nio skips queued work of a cancelled task, and a
    /// skipped COMMIT or ROLLBACK would leave the connection inside a transaction.
    static func control(_ connection: SQLiteConnection, _ sql: String) async throws {
        do {
            try await Task { _ = try await connection.query(sql, []) }.value
        } catch {
            throw StorageError.from(error, during: sql)
        }
    }

    /// Marks the transaction over (later use throws) and returns why it must not commit, if a
    /// statement failed and the body went on anyway.
    func end() -> StorageError? {
        state.withLock { state in
            state.ended = true
            if let fatal = state.fatal { return fatal }
            if state.aborted != nil {
                return StorageError(
                    .other,
                    "commit: a statement failed inside the transaction and the body went on; rolled back"
                )
            }
            return nil
        }
    }

    static func clamped(_ limit: Int) -> Int {
        min(max(limit, 0), maximumRowsPerRead)
    }

    private func single<T>(_ rows: [SQLiteRow], _ decode: (SQLiteRow) throws -> T) throws -> T? {
        try rows.first.map(decode)
    }

    func changedRows(_ operation: String) async throws -> Int64 {
        let rows = try await run(operation, SQL.changes)
        guard let row = rows.first else { throw StorageError(.other, "\(operation): changes() returned no row") }
        return try RowReader(row: row, table: "changes()").int64("n")
    }

    // MARK: - Savepoints

    func savepoint<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        try checkUsable("savepoint")
        let name = state.withLock { state in
            defer { state.nextSavepoint += 1 }
            return "sp_\(state.nextSavepoint)"
        }
        try await controlInTransaction("SAVEPOINT \(name)")
        let value: T
        do {
            value = try await body()
        } catch {
            try await rollback(to: name)
            throw error
        }
        if state.withLock({ $0.aborted != nil }) {
            try await rollback(to: name)
            throw StorageError(.other, "savepoint: a statement failed inside it and the body went on; rolled back")
        }
        try await controlInTransaction("RELEASE \(name)")
        return value
    }

    /// Undoes the savepoint's changes and ends it; the transaction goes on (unless a fatal error
    /// already ended it inside SQLite).
    private func rollback(to name: String) async throws {
        try await controlInTransaction("ROLLBACK TO \(name)")
        try await controlInTransaction("RELEASE \(name)")
        state.withLock { $0.aborted = nil }
    }

    private func controlInTransaction(_ sql: String) async throws {
        do {
            try await Self.control(connection, sql)
        } catch let error as StorageError {
            if writable {
                state.withLock { state in
                    state.aborted = state.aborted ?? error
                    state.fatal = state.fatal ?? error
                }
            }
            throw error
        }
    }

    // MARK: - Tenants

    func insertTenant(_ tenant: TenantRecord) async throws {
        try await write("insertTenant", SQL.insertTenant, tenant.binds)
    }

    func tenant(_ id: TenantID, forUpdate: Bool) async throws -> TenantRecord? {
        // `forUpdate` needs nothing: the writer connection is exclusive for the whole transaction.
        try single(try await run("tenant", SQL.tenant, [.text(id.rawValue)]), TenantRecord.init(row:))
    }

    func updateTenant(_ tenant: TenantRecord) async throws {
        try await write(
            "updateTenant",
            SQL.updateTenant,
            [
                .text(tenant.state.rawValue), .int(tenant.primaryVersion), .time(tenant.updatedAt),
                .text(tenant.id.rawValue),
            ]
        )
    }

    func tenants(after: TenantID?, limit: Int) async throws -> [TenantRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        let rows =
            if let after {
                try await run("tenants", SQL.tenantsAfter, [.text(after.rawValue), .int(limit)])
            } else {
                try await run("tenants", SQL.tenantsFirst, [.int(limit)])
            }
        return try rows.map(TenantRecord.init(row:))
    }

    // MARK: - Master-key versions

    func insertMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws {
        try await write("insertMasterKeyVersion", SQL.insertVersion, version.binds)
    }

    func masterKeyVersion(_ tenant: TenantID, _ version: MasterKeyVersionNumber) async throws
        -> MasterKeyVersionRecord?
    {
        try single(
            try await run("masterKeyVersion", SQL.version, [.text(tenant.rawValue), .int(version)]),
            MasterKeyVersionRecord.init(row:)
        )
    }

    func masterKeyVersions(_ tenant: TenantID) async throws -> [MasterKeyVersionRecord] {
        try await run("masterKeyVersions", SQL.versionsOfTenant, [.text(tenant.rawValue)])
            .map(MasterKeyVersionRecord.init(row:))
    }

    func updateMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws {
        try await write(
            "updateMasterKeyVersion",
            SQL.updateVersion,
            [
                .text(version.state.rawValue), .time(version.updatedAt), .time(version.destroyAfter),
                .time(version.destroyedAt), .text(version.tenant.rawValue), .int(version.version),
            ]
        )
    }

    func reserveInvocations(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        count: Int64,
        limit: Int64
    ) async throws -> Int64? {
        guard count >= 0 else {
            throw StorageError(.other, "reserveInvocations: negative count (programming error)")
        }
        let rows = try await write(
            "reserveInvocations",
            SQL.reserveInvocations,
            [.text(tenant.rawValue), .int(version), .int(count), .int(limit)]
        )
        return try rows.first.map { try RowReader(row: $0, table: "master_key_versions").int64("first") }
    }

    func versionsDueForDestruction(now: Timestamp, limit: Int) async throws -> [MasterKeyVersionRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        return try await run("versionsDueForDestruction", SQL.versionsDueForDestruction, [.time(now), .int(limit)])
            .map(MasterKeyVersionRecord.init(row:))
    }

    // MARK: - Data keys

    func insertDataKeys(_ keys: [DataKeyRecord]) async throws {
        var start = 0
        while start < keys.count {
            let end = min(start + Self.maximumRowsPerInsert, keys.count)
            var binds: [SQLiteData] = []
            binds.reserveCapacity((end - start) * 9)
            for key in keys[start..<end] {
                key.appendBinds(to: &binds)
            }
            try await write("insertDataKeys", SQL.insertDataKeys(rows: end - start), binds)
            start = end
        }
    }

    func dataKey(_ tenant: TenantID, _ id: DataKeyID) async throws -> DataKeyRecord? {
        try single(
            try await run("dataKey", SQL.dataKey, [.text(tenant.rawValue), .text(id.description)]),
            DataKeyRecord.init(row:)
        )
    }

    func dataKeys(_ tenant: TenantID, ids: [DataKeyID]) async throws -> [DataKeyRecord] {
        let unique = Array(Set(ids))
        var records: [DataKeyRecord] = []
        records.reserveCapacity(unique.count)
        var start = 0
        while start < unique.count {
            let end = min(start + Self.maximumIDsPerLookup, unique.count)
            var binds: [SQLiteData] = [.text(tenant.rawValue)]
            binds.reserveCapacity(end - start + 1)
            for id in unique[start..<end] {
                binds.append(.text(id.description))
            }
            let rows = try await run("dataKeys(ids:)", SQL.dataKeysByID(count: end - start), binds)
            records += try rows.map(DataKeyRecord.init(row:))
            start = end
        }
        return records
    }

    func dataKeysForUse(_ tenant: TenantID, ids: [DataKeyID]) async throws -> DataKeysForUse? {
        let unique = Array(Set(ids))
        guard unique.count <= Self.maximumIDsPerLookup else {
            throw StorageError(.other, "dataKeysForUse: more than \(Self.maximumIDsPerLookup) ids")
        }
        var binds: [SQLiteData] = unique.map { .text($0.description) }
        binds.append(.text(tenant.rawValue))
        let rows = try await run("dataKeysForUse", SQL.dataKeysForUse(count: unique.count), binds)
        var found: DataKeysForUse?
        var versions: [Int: MasterKeyVersionRecord] = [:]
        for row in rows {
            if found == nil {
                found = DataKeysForUse(tenant: try TenantRecord(row: row, columnPrefix: "t_"), keys: [], versions: [])
            }
            // The key's and the version's columns are NULL when nothing matched the outer join.
            guard try RowReader(row: row, table: "data_keys").optionalText("id") != nil else { continue }
            let key = try DataKeyRecord(row: row)
            found?.keys.append(key)
            guard versions[key.version] == nil,
                try RowReader(row: row, table: "master_key_versions").optionalText("v_state") != nil
            else { continue }
            versions[key.version] = try MasterKeyVersionRecord(row: row, columnPrefix: "v_")
        }
        found?.versions = versions.keys.sorted().map { versions[$0]! }
        return found
    }

    func dataKeys(_ tenant: TenantID, state: DataKeyState?, after: DataKeyID?, limit: Int) async throws
        -> [DataKeyRecord]
    {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        var binds: [SQLiteData] = [.text(tenant.rawValue)]
        if let state { binds.append(.text(state.rawValue)) }
        if let after { binds.append(.text(after.description)) }
        binds.append(.int(limit))
        return try await run("dataKeys", SQL.dataKeys(state: state != nil, after: after != nil), binds)
            .map(DataKeyRecord.init(row:))
    }

    func dataKeysNotUnderVersion(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        after: DataKeyID?,
        limit: Int
    ) async throws -> [DataKeyRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        var binds: [SQLiteData] = [.text(tenant.rawValue), .int(version)]
        if let after { binds.append(.text(after.description)) }
        binds.append(.int(limit))
        return try await run("dataKeysNotUnderVersion", SQL.dataKeysNotUnderVersion(after: after != nil), binds)
            .map(DataKeyRecord.init(row:))
    }

    func countLiveDataKeys(_ tenant: TenantID, version: MasterKeyVersionNumber?) async throws -> Int64 {
        let rows =
            if let version {
                try await run(
                    "countLiveDataKeys", SQL.countLiveDataKeysUnderVersion, [.text(tenant.rawValue), .int(version)])
            } else {
                try await run("countLiveDataKeys", SQL.countLiveDataKeys, [.text(tenant.rawValue)])
            }
        guard let row = rows.first else { throw StorageError(.other, "countLiveDataKeys: count returned no row") }
        return try RowReader(row: row, table: "data_keys").int64("n")
    }

    func updateDataKeyWrapping(
        _ tenant: TenantID,
        _ id: DataKeyID,
        fromVersion: MasterKeyVersionNumber,
        toVersion: MasterKeyVersionNumber,
        wrapped: [UInt8],
        contextHash: [UInt8],
        at time: Timestamp
    ) async throws -> Bool {
        let rows = try await write(
            "updateDataKeyWrapping",
            SQL.updateDataKeyWrapping,
            [
                .int(toVersion), .bytes(wrapped), .bytes(contextHash), .time(time), .text(tenant.rawValue),
                .text(id.description), .int(fromVersion),
            ]
        )
        return !rows.isEmpty
    }

    func setDataKeyState(
        _ tenant: TenantID,
        _ id: DataKeyID,
        to state: DataKeyState,
        clearWrapped: Bool,
        at time: Timestamp
    ) async throws -> Bool {
        let rows = try await write(
            "setDataKeyState",
            clearWrapped ? SQL.setDataKeyStateClearingWrapped : SQL.setDataKeyState,
            [.text(state.rawValue), .time(time), .text(tenant.rawValue), .text(id.description)]
        )
        return !rows.isEmpty
    }

    func countEncryption(_ tenant: TenantID, _ id: DataKeyID, limit: Int64) async throws -> Int64? {
        let rows = try await write(
            "countEncryption",
            SQL.countEncryption,
            [.text(tenant.rawValue), .text(id.description), .int(limit)]
        )
        return try rows.first.map { try RowReader(row: $0, table: "data_keys").int64("encryptions") }
    }

    func deleteDataKeys(_ tenant: TenantID) async throws -> Int64 {
        try await write("deleteDataKeys", SQL.deleteDataKeys, [.text(tenant.rawValue)])
        return try await changedRows("deleteDataKeys")
    }

    // MARK: - Idempotency

    func idempotencyRecord(scope: String, key: String) async throws -> IdempotencyRecord? {
        try single(
            try await run("idempotencyRecord", SQL.idempotencyRecord, [.text(scope), .text(key)]),
            IdempotencyRecord.init(row:)
        )
    }

    func insertIdempotencyRecord(_ record: IdempotencyRecord) async throws {
        try await write("insertIdempotencyRecord", SQL.insertIdempotencyRecord, record.binds)
    }

    func deleteIdempotencyRecords(before time: Timestamp) async throws -> Int64 {
        try await write("deleteIdempotencyRecords", SQL.deleteIdempotencyRecords, [.time(time)])
        return try await changedRows("deleteIdempotencyRecords")
    }

    // MARK: - Rewrap jobs

    func rewrapJob(_ tenant: TenantID) async throws -> RewrapJobRecord? {
        try single(try await run("rewrapJob", SQL.rewrapJob, [.text(tenant.rawValue)]), RewrapJobRecord.init(row:))
    }

    func saveRewrapJob(_ job: RewrapJobRecord) async throws {
        try await write("saveRewrapJob", SQL.saveRewrapJob, job.binds)
    }

    // MARK: - Audit

    func lockAuditHead() async throws -> AnchoredAuditHead {
        // No lock to take: the writer connection is exclusive for the whole transaction, so appends
        // are already ordered.
        try await auditHead()
    }

    func auditHead() async throws -> AnchoredAuditHead {
        guard let row = try await run("auditHead", SQL.auditHead).first else {
            throw StorageError(.corrupt, "audit_head: the row is missing")
        }
        return try AnchoredAuditHead(row: row)
    }

    func appendAuditRecords(
        _ records: [AuditRecord],
        head: AuditHead,
        anchor: AuditCheckpoint?,
        keepCheckpoint: Bool
    ) async throws {
        for record in records
        where record.event.keyIDs.contains(where: { $0.isEmpty || $0.contains(AuditRecord.keyIDSeparator) }) {
            throw StorageError(
                .other,
                "appendAuditRecords: record \(record.sequence) has an empty key id or one containing ','"
            )
        }
        var start = 0
        while start < records.count {
            let end = min(start + Self.maximumRowsPerInsert, records.count)
            var binds: [SQLiteData] = []
            binds.reserveCapacity((end - start) * 11)
            for record in records[start..<end] {
                record.appendBinds(to: &binds)
            }
            try await write("appendAuditRecords", SQL.insertAuditRecords(rows: end - start), binds)
            start = end
        }
        let moved = try await write(
            "appendAuditRecords",
            SQL.updateAuditHead,
            [
                .int(head.sequence), .bytes(head.hash), .bytes(anchor?.keyID.bytes), .bytes(anchor?.mac),
                .time(anchor?.time),
            ]
        )
        guard !moved.isEmpty else {
            throw StorageError(.corrupt, "audit_head: the row is missing")
        }
        if keepCheckpoint, let anchor {
            try await write(
                "appendAuditRecords",
                SQL.insertAuditCheckpoint,
                [
                    .int(anchor.sequence), .bytes(anchor.hash), .bytes(anchor.keyID.bytes), .bytes(anchor.mac),
                    .time(anchor.time),
                ]
            )
        }
    }

    func auditCheckpoints(after: Int64, limit: Int) async throws -> [AuditCheckpoint] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        return try await run("auditCheckpoints", SQL.auditCheckpoints, [.int(after), .int(limit)])
            .map(AuditCheckpoint.init(row:))
    }

    func auditRecords(after: Int64, limit: Int) async throws -> [AuditRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        return try await run("auditRecords", SQL.auditRecords, [.int(after), .int(limit)]).map(AuditRecord.init(row:))
    }
}
