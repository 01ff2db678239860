import Foundation
import KeyHierarchy
import Logging
import PostgresNIO
import Synchronization

/// The statements of one `transaction` or `read`, on one leased connection.
///
/// Valid only inside the closure it was handed to: afterwards every method throws. In `read` mode
/// there is no `BEGIN` and the write methods (and row locks) are refused, so a `read` can never
/// change anything.
final class PostgresTransaction: KeyRepositoryTransaction {
    enum Mode: Sendable {
        case readWrite
        case readOnly
    }

    /// The most rows one statement inserts or looks up by id: the port's batch size (a
    /// GenerateDataKeys call of 1,000 keys is one statement). Larger inputs are split.
    static let maximumRowsPerStatement = 1000
    /// The most rows one listing returns, whatever `limit` asks: bounds the memory of one read.
    /// Callers page with keyset cursors, so a smaller page loses nothing.
    static let maximumRowsPerRead = 10_000

    private struct State: Sendable {
        var savepoints = 0
        /// A statement failed and no savepoint rolled it back: PostgreSQL refuses everything until
        /// the transaction (or the savepoint) ends, and a `COMMIT` would silently roll back.
        var aborted = false
        var finished = false
    }

    private let connection: PostgresConnection
    private let logger: Logger
    private let mode: Mode
    private let statements: StatementCounter
    private let state = Mutex(State())

    init(connection: PostgresConnection, logger: Logger, mode: Mode, statements: StatementCounter) {
        self.connection = connection
        self.logger = logger
        self.mode = mode
        self.statements = statements
    }

    // MARK: Life cycle (called by PostgresKeyStore)

    func begin() async throws {
        try await run("BEGIN", "begin")
    }

    /// Starts a transaction whose statements all see one snapshot and cannot write (a backup).
    func beginSnapshot() async throws {
        try await run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "begin snapshot")
    }

    /// Commits, or rolls back and throws when a statement failed without the error reaching
    /// `transaction` (a body that caught a storage error and returned normally).
    func commit() async throws {
        if state.withLock({ $0.aborted }) {
            await rollback()
            throw StorageError(
                .other,
                "commit: a statement failed inside the transaction and the body went on; rolled back"
            )
        }
        defer { finish() }
        let result = try await run("COMMIT", "commit")
        guard result.metadata.command == "COMMIT" else {
            throw StorageError(.conflict, "commit: the server rolled the transaction back")
        }
    }

    /// Rolls back; when even that fails the connection is closed, so the pool never hands out a
    /// connection left inside a transaction.
    func rollback() async {
        finish()
        do {
            _ = try await Self.execute("ROLLBACK", on: connection, logger: logger, operation: "rollback")
        } catch {
            let mapped = PostgresErrorMapping.storageError(error, operation: "rollback")
            logger.warning("rollback failed; closing the connection", metadata: ["error": "\(mapped.detail)"])
            let closing: EventLoopFuture<Void> = connection.close()
            _ = try? await closing.get()
        }
    }

    func finish() {
        state.withLock { $0.finished = true }
    }

    /// The longest one statement of a transaction or read may take. The gateway's statements take
    /// milliseconds (a lock wait behind another instance's batch, a long listing: seconds at most);
    /// one that has not answered after this is on a connection that will not answer, so the
    /// connection is closed and the statement fails with `.unavailable`, instead of holding its
    /// caller, and the group commit behind it, for ever. (A connection the server closes is
    /// caught at once, below; this is the backstop for one that vanished without a word. At 10 s
    /// it failed a test's lock wait on a machine whose every thread was busy.)
    static let statementTimeout: Duration = .seconds(30)

    /// Runs one statement. It fails with `.unavailable` as soon as its connection closes, even if
    /// postgres-nio never completes it (1.33 was seen to leave statements on a backend terminated
    /// by `pg_terminate_backend` waiting for good), and after `statementTimeout` (30 s) at the latest
    /// (closing the connection).
    ///
    /// Both guards live on the connection's event loop (a scheduled task and a close callback), so
    /// a statement costs one hop there and one back: a timer task per statement, as this once had,
    /// cost two task spawns and a wake-up of the dispatch timer thread each, about a third of the
    /// gateway's CPU at one caller (docs/benchmarks.md, issue 13).
    static func execute(
        _ query: PostgresQuery,
        on connection: PostgresConnection,
        logger: Logger,
        operation: String
    ) async throws -> PostgresQueryResult {
        do {
            return try await guarded(connection, connection.query(query, logger: logger)).get()
        } catch is StatementTimedOut {
            logger.error(
                "a postgres statement did not complete in time; closing its connection",
                metadata: ["operation": "\(operation)", "timeout": "\(statementTimeout)"]
            )
            connection.close().whenComplete { _ in }
            throw StorageError(.unavailable, "\(operation): no answer within \(statementTimeout)")
        }
    }

    /// The connection closed before the statement completed.
    struct ConnectionClosedMidStatement: Error {}

    /// The statement did not complete within `statementTimeout`.
    struct StatementTimedOut: Error {}

    /// `future`, or a failure as soon as `connection` closes first or `statementTimeout` passes.
    /// Every callback runs on the connection's event loop, so the box that decides which came
    /// first needs no lock.
    private static func guarded<Value: Sendable>(
        _ connection: PostgresConnection,
        _ future: EventLoopFuture<Value>
    ) -> EventLoopFuture<Value> {
        let loop = connection.eventLoop
        let promise = loop.makePromise(of: Value.self)
        let completed = NIOLoopBoundBox.makeBoxSendingValue(false, eventLoop: loop)
        let timer = loop.scheduleTask(in: .nanoseconds(Int64(statementTimeout.components.seconds) * 1_000_000_000)) {
            guard !completed.value else { return }
            completed.value = true
            promise.fail(StatementTimedOut())
        }
        let watch = ClosingConnections.shared.watch(connection) {
            loop.execute {
                guard !completed.value else { return }
                completed.value = true
                promise.fail(ConnectionClosedMidStatement())
            }
        }
        future.hop(to: loop).whenComplete { result in
            timer.cancel()
            ClosingConnections.shared.unwatch(connection, watch)
            guard !completed.value else { return }
            completed.value = true
            promise.completeWith(result)
        }
        return promise.futureResult
    }

    // MARK: Statements

    @discardableResult
    func run(_ query: PostgresQuery, _ operation: String) async throws -> PostgresQueryResult {
        let finished = state.withLock { $0.finished }
        guard !finished else {
            throw StorageError(.other, "\(operation): used after its transaction ended")
        }
        statements.add()
        do {
            return try await Self.execute(query, on: connection, logger: logger, operation: operation)
        } catch {
            let mapped = PostgresErrorMapping.storageError(error, operation: operation)
            if mode == .readWrite {
                state.withLock { $0.aborted = true }
            }
            logger.debug("postgres statement failed", metadata: ["error": "\(mapped.detail)"])
            throw mapped
        }
    }

    func requireWritable(_ operation: String) throws {
        guard mode == .readWrite else {
            throw StorageError(.other, "\(operation): a write inside read(); use transaction()")
        }
    }

    static func clamped(_ limit: Int) -> Int {
        min(max(limit, 0), maximumRowsPerRead)
    }

    // MARK: Savepoints

    func savepoint<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        guard mode == .readWrite else { return try await body() }
        let name = state.withLock { state in
            state.savepoints += 1
            return "sp_\(state.savepoints)"
        }
        try await run("SAVEPOINT \(unescaped: name)", "savepoint")
        let value: T
        do {
            value = try await body()
        } catch {
            try await rollback(to: name)
            throw error
        }
        if state.withLock({ $0.aborted }) {
            try await rollback(to: name)
            throw StorageError(.other, "savepoint: a statement failed inside it and the body went on; rolled back")
        }
        try await run("RELEASE SAVEPOINT \(unescaped: name)", "savepoint")
        return value
    }

    private func rollback(to name: String) async throws {
        try await run("ROLLBACK TO SAVEPOINT \(unescaped: name)", "savepoint rollback")
        state.withLock { $0.aborted = false }
        try await run("RELEASE SAVEPOINT \(unescaped: name)", "savepoint rollback")
    }

    // MARK: Tenants

    func insertTenant(_ tenant: TenantRecord) async throws {
        try requireWritable("insertTenant")
        try await run(
            """
            INSERT INTO tenants (id, state, primary_version, created_at, updated_at) \
            VALUES (\(tenant.id.rawValue), \(tenant.state.rawValue), \(tenant.primaryVersion), \
            \(tenant.createdAt.millisecondsSinceEpoch), \(tenant.updatedAt.millisecondsSinceEpoch))
            """,
            "insertTenant"
        )
    }

    func tenant(_ id: TenantID, forUpdate: Bool) async throws -> TenantRecord? {
        if forUpdate { try requireWritable("tenant(forUpdate:)") }
        let lock = forUpdate ? " FOR UPDATE" : ""
        let result = try await run(
            "SELECT \(unescaped: Columns.tenant) FROM tenants WHERE id = \(id.rawValue)\(unescaped: lock)",
            "tenant"
        )
        return try result.first.map { try Rows.tenant($0) }
    }

    func updateTenant(_ tenant: TenantRecord) async throws {
        try requireWritable("updateTenant")
        try await run(
            """
            UPDATE tenants SET state = \(tenant.state.rawValue), primary_version = \(tenant.primaryVersion), \
            updated_at = \(tenant.updatedAt.millisecondsSinceEpoch) WHERE id = \(tenant.id.rawValue)
            """,
            "updateTenant"
        )
    }

    func tenants(after: TenantID?, limit: Int) async throws -> [TenantRecord] {
        let limit = Self.clamped(limit)
        let query: PostgresQuery =
            if let after {
                """
                SELECT \(unescaped: Columns.tenant) FROM tenants WHERE id > \(after.rawValue) \
                ORDER BY id LIMIT \(limit)
                """
            } else {
                "SELECT \(unescaped: Columns.tenant) FROM tenants ORDER BY id LIMIT \(limit)"
            }
        return try await run(query, "tenants").map(Rows.tenant)
    }

    // MARK: Master-key versions

    func insertMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws {
        try requireWritable("insertMasterKeyVersion")
        try await run(
            """
            INSERT INTO master_key_versions (\(unescaped: Columns.version)) VALUES (\(version.tenant.rawValue), \
            \(version.version), \(version.state.rawValue), \(ByteBuffer(bytes: version.tokenKeyID.bytes)), \
            \(version.invocationsReserved), \(version.createdAt.millisecondsSinceEpoch), \
            \(version.updatedAt.millisecondsSinceEpoch), \(version.destroyAfter?.millisecondsSinceEpoch), \
            \(version.destroyedAt?.millisecondsSinceEpoch))
            """,
            "insertMasterKeyVersion"
        )
    }

    func masterKeyVersion(_ tenant: TenantID, _ version: MasterKeyVersionNumber) async throws
        -> MasterKeyVersionRecord?
    {
        let result = try await run(
            """
            SELECT \(unescaped: Columns.version) FROM master_key_versions \
            WHERE tenant_id = \(tenant.rawValue) AND version = \(version)
            """,
            "masterKeyVersion"
        )
        return try result.first.map { try Rows.version($0) }
    }

    func masterKeyVersions(_ tenant: TenantID) async throws -> [MasterKeyVersionRecord] {
        try await run(
            """
            SELECT \(unescaped: Columns.version) FROM master_key_versions \
            WHERE tenant_id = \(tenant.rawValue) ORDER BY version
            """,
            "masterKeyVersions"
        ).map(Rows.version)
    }

    func updateMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws {
        try requireWritable("updateMasterKeyVersion")
        try await run(
            """
            UPDATE master_key_versions SET state = \(version.state.rawValue), \
            updated_at = \(version.updatedAt.millisecondsSinceEpoch), \
            destroy_after = \(version.destroyAfter?.millisecondsSinceEpoch), \
            destroyed_at = \(version.destroyedAt?.millisecondsSinceEpoch) \
            WHERE tenant_id = \(version.tenant.rawValue) AND version = \(version.version)
            """,
            "updateMasterKeyVersion"
        )
    }

    func reserveInvocations(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        count: Int64,
        limit: Int64
    ) async throws -> Int64? {
        try requireWritable("reserveInvocations")
        guard count >= 0 else { throw StorageError(.other, "reserveInvocations: negative count") }
        let result = try await run(
            """
            UPDATE master_key_versions SET invocations_reserved = invocations_reserved + \(count) \
            WHERE tenant_id = \(tenant.rawValue) AND version = \(version) \
            AND invocations_reserved <= \(limit) - \(count) \
            RETURNING invocations_reserved - \(count)
            """,
            "reserveInvocations"
        )
        return try result.first.map { try decodeRow($0, as: Int64.self, operation: "reserveInvocations") }
    }

    func versionsDueForDestruction(now: Timestamp, limit: Int) async throws -> [MasterKeyVersionRecord] {
        try await run(
            """
            SELECT \(unescaped: Columns.version) FROM master_key_versions \
            WHERE destroy_after IS NOT NULL AND destroy_after <= \(now.millisecondsSinceEpoch) \
            AND state <> 'destroyed' ORDER BY destroy_after, tenant_id, version LIMIT \(Self.clamped(limit))
            """,
            "versionsDueForDestruction"
        ).map(Rows.version)
    }

    // MARK: Data keys

    func insertDataKeys(_ keys: [DataKeyRecord]) async throws {
        try requireWritable("insertDataKeys")
        var start = keys.startIndex
        while start < keys.endIndex {
            let end = min(start + Self.maximumRowsPerStatement, keys.endIndex)
            try await insertDataKeyBatch(keys[start..<end])
            start = end
        }
    }

    /// One `INSERT … SELECT FROM UNNEST(arrays)`: nine binds whatever the batch size, so one
    /// statement (and one plan) serves every batch. `wrapped` may be NULL, which a `bytea[]`
    /// from postgres-nio cannot hold, so a parallel `bool[]` says which entries are NULL.
    private func insertDataKeyBatch(_ keys: ArraySlice<DataKeyRecord>) async throws {
        var tenants: [String] = []
        var ids: [UUID] = []
        var versions: [Int] = []
        var states: [String] = []
        var wrapped: [ByteBuffer] = []
        var wrappedIsNull: [Bool] = []
        var contextHashes: [ByteBuffer] = []
        var encryptions: [Int64] = []
        var created: [Int64] = []
        var updated: [Int64] = []
        for key in keys {
            tenants.append(key.tenant.rawValue)
            ids.append(key.id.uuid)
            versions.append(key.version)
            states.append(key.state.rawValue)
            wrapped.append(ByteBuffer(bytes: key.wrapped ?? []))
            wrappedIsNull.append(key.wrapped == nil)
            contextHashes.append(ByteBuffer(bytes: key.contextHash))
            encryptions.append(key.encryptions)
            created.append(key.createdAt.millisecondsSinceEpoch)
            updated.append(key.updatedAt.millisecondsSinceEpoch)
        }
        try await run(
            """
            INSERT INTO data_keys (\(unescaped: Columns.dataKey)) \
            SELECT t, i, v, s, CASE WHEN n THEN NULL ELSE w END, h, e, c, u \
            FROM UNNEST(\(tenants)::text[], \(ids)::uuid[], \(versions)::int[], \(states)::text[], \
            \(wrapped)::bytea[], \(wrappedIsNull)::bool[], \(contextHashes)::bytea[], \(encryptions)::bigint[], \
            \(created)::bigint[], \(updated)::bigint[]) AS k (t, i, v, s, w, n, h, e, c, u)
            """,
            "insertDataKeys"
        )
    }

    func dataKey(_ tenant: TenantID, _ id: DataKeyID) async throws -> DataKeyRecord? {
        let result = try await run(SQL.dataKeyByID(tenant.rawValue, id.uuid), "dataKey")
        return try result.first.map { try Rows.dataKey($0) }
    }

    func dataKeys(_ tenant: TenantID, ids: [DataKeyID]) async throws -> [DataKeyRecord] {
        var records: [DataKeyRecord] = []
        var start = ids.startIndex
        while start < ids.endIndex {
            let end = min(start + Self.maximumRowsPerStatement, ids.endIndex)
            let batch = ids[start..<end].map(\.uuid)
            let rows = try await run(SQL.dataKeysByIDs(tenant.rawValue, batch), "dataKeys(ids:)")
            records += try rows.map(Rows.dataKey)
            start = end
        }
        return records
    }

    func dataKeysForUse(_ tenant: TenantID, ids: [DataKeyID]) async throws -> DataKeysForUse? {
        guard ids.count <= Self.maximumRowsPerStatement else {
            throw StorageError(.other, "dataKeysForUse: more than \(Self.maximumRowsPerStatement) ids")
        }
        // Each id once: the statement joins on the ids as given.
        let unique = Array(Set(ids.map(\.uuid)))
        let rows = try await run(SQL.dataKeysForUse(tenant.rawValue, unique), "dataKeysForUse")
        return try Rows.dataKeysForUse(tenant, rows)
    }

    func dataKeys(
        _ tenant: TenantID,
        state: DataKeyState?,
        after: DataKeyID?,
        limit: Int
    ) async throws -> [DataKeyRecord] {
        let limit = Self.clamped(limit)
        let query: PostgresQuery =
            switch (state, after) {
            case (nil, nil):
                SQL.dataKeysByTenant(tenant.rawValue, limit: limit)
            case (nil, let after?):
                SQL.dataKeysByTenant(tenant.rawValue, after: after.uuid, limit: limit)
            case (let state?, nil):
                SQL.dataKeysByState(tenant.rawValue, state.rawValue, limit: limit)
            case (let state?, let after?):
                SQL.dataKeysByState(tenant.rawValue, state.rawValue, after: after.uuid, limit: limit)
            }
        return try await run(query, "dataKeys").map(Rows.dataKey)
    }

    func dataKeysNotUnderVersion(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        after: DataKeyID?,
        limit: Int
    ) async throws -> [DataKeyRecord] {
        let limit = Self.clamped(limit)
        let query: PostgresQuery =
            if let after {
                SQL.dataKeysNotUnderVersion(tenant.rawValue, version, after: after.uuid, limit: limit)
            } else {
                SQL.dataKeysNotUnderVersion(tenant.rawValue, version, limit: limit)
            }
        return try await run(query, "dataKeysNotUnderVersion").map(Rows.dataKey)
    }

    func countLiveDataKeys(_ tenant: TenantID, version: MasterKeyVersionNumber?) async throws -> Int64 {
        let query: PostgresQuery =
            if let version {
                SQL.countLiveDataKeys(tenant.rawValue, version: version)
            } else {
                SQL.countLiveDataKeys(tenant.rawValue)
            }
        let result = try await run(query, "countLiveDataKeys")
        return try PostgresKeyStore.decode(result.first, as: Int64.self, operation: "countLiveDataKeys")
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
        try requireWritable("updateDataKeyWrapping")
        let result = try await run(
            """
            UPDATE data_keys SET version = \(toVersion), wrapped = \(ByteBuffer(bytes: wrapped)), \
            context_hash = \(ByteBuffer(bytes: contextHash)), updated_at = \(time.millisecondsSinceEpoch) \
            WHERE tenant_id = \(tenant.rawValue) AND id = \(id.uuid) AND version = \(fromVersion) \
            AND state <> 'destroyed'
            """,
            "updateDataKeyWrapping"
        )
        return (result.metadata.rows ?? 0) > 0
    }

    func setDataKeyState(
        _ tenant: TenantID,
        _ id: DataKeyID,
        to state: DataKeyState,
        clearWrapped: Bool,
        at time: Timestamp
    ) async throws -> Bool {
        try requireWritable("setDataKeyState")
        let wrapped = clearWrapped ? "NULL" : "wrapped"
        let result = try await run(
            """
            UPDATE data_keys SET state = \(state.rawValue), wrapped = \(unescaped: wrapped), \
            updated_at = \(time.millisecondsSinceEpoch) \
            WHERE tenant_id = \(tenant.rawValue) AND id = \(id.uuid) AND state <> 'destroyed'
            """,
            "setDataKeyState"
        )
        return (result.metadata.rows ?? 0) > 0
    }

    func countEncryption(_ tenant: TenantID, _ id: DataKeyID, limit: Int64) async throws -> Int64? {
        try requireWritable("countEncryption")
        let result = try await run(
            """
            UPDATE data_keys SET encryptions = encryptions + 1 \
            WHERE tenant_id = \(tenant.rawValue) AND id = \(id.uuid) AND state = 'enabled' \
            AND encryptions < \(limit) RETURNING encryptions
            """,
            "countEncryption"
        )
        return try result.first.map { try decodeRow($0, as: Int64.self, operation: "countEncryption") }
    }

    func deleteDataKeys(_ tenant: TenantID) async throws -> Int64 {
        try requireWritable("deleteDataKeys")
        let result = try await run("DELETE FROM data_keys WHERE tenant_id = \(tenant.rawValue)", "deleteDataKeys")
        return Int64(result.metadata.rows ?? 0)
    }

    // MARK: Idempotency

    func idempotencyRecord(scope: String, key: String) async throws -> IdempotencyRecord? {
        let result = try await run(
            """
            SELECT \(unescaped: Columns.idempotency) FROM idempotency_keys \
            WHERE scope = \(scope) AND key = \(key)
            """,
            "idempotencyRecord"
        )
        return try result.first.map { try Rows.idempotency($0) }
    }

    func insertIdempotencyRecord(_ record: IdempotencyRecord) async throws {
        try requireWritable("insertIdempotencyRecord")
        try await run(
            """
            INSERT INTO idempotency_keys (\(unescaped: Columns.idempotency)) VALUES (\(record.scope), \
            \(record.key), \(record.operation), \(ByteBuffer(bytes: record.fingerprint)), \(record.result), \
            \(record.createdAt.millisecondsSinceEpoch))
            """,
            "insertIdempotencyRecord"
        )
    }

    func deleteIdempotencyRecords(before time: Timestamp) async throws -> Int64 {
        try requireWritable("deleteIdempotencyRecords")
        let result = try await run(
            "DELETE FROM idempotency_keys WHERE created_at < \(time.millisecondsSinceEpoch)",
            "deleteIdempotencyRecords"
        )
        return Int64(result.metadata.rows ?? 0)
    }

    // MARK: Rewrap jobs

    func rewrapJob(_ tenant: TenantID) async throws -> RewrapJobRecord? {
        let result = try await run(
            "SELECT \(unescaped: Columns.rewrapJob) FROM rewrap_jobs WHERE tenant_id = \(tenant.rawValue)",
            "rewrapJob"
        )
        return try result.first.map { try Rows.rewrapJob($0) }
    }

    func saveRewrapJob(_ job: RewrapJobRecord) async throws {
        try requireWritable("saveRewrapJob")
        try await run(
            """
            INSERT INTO rewrap_jobs (\(unescaped: Columns.rewrapJob)) VALUES (\(job.tenant.rawValue), \
            \(job.targetVersion), \(job.state.rawValue), \(job.cursor?.uuid), \(job.moved), \(job.total), \
            \(job.startedAt.millisecondsSinceEpoch), \(job.updatedAt.millisecondsSinceEpoch)) \
            ON CONFLICT (tenant_id) DO UPDATE SET target_version = excluded.target_version, \
            state = excluded.state, cursor = excluded.cursor, moved = excluded.moved, total = excluded.total, \
            started_at = excluded.started_at, updated_at = excluded.updated_at
            """,
            "saveRewrapJob"
        )
    }

    // MARK: Audit

    private static let auditHeadColumns = "seq, hash, anchor_key_id, anchor_mac, anchor_time"

    func lockAuditHead() async throws -> AnchoredAuditHead {
        try requireWritable("lockAuditHead")
        let result = try await run(
            "SELECT \(unescaped: Self.auditHeadColumns) FROM audit_head WHERE id = 1 FOR UPDATE", "lockAuditHead")
        return try Rows.auditHead(result.first, operation: "lockAuditHead")
    }

    func auditHead() async throws -> AnchoredAuditHead {
        let result = try await run(
            "SELECT \(unescaped: Self.auditHeadColumns) FROM audit_head WHERE id = 1", "auditHead")
        return try Rows.auditHead(result.first, operation: "auditHead")
    }

    /// One `INSERT … SELECT FROM UNNEST(arrays)` for the records (NULL tenants flagged in a
    /// parallel `bool[]`), then the head with its anchor, then the kept checkpoint.
    func appendAuditRecords(
        _ records: [AuditRecord],
        head: AuditHead,
        anchor: AuditCheckpoint?,
        keepCheckpoint: Bool
    ) async throws {
        try requireWritable("appendAuditRecords")
        // The head is locked while this runs, so it costs every other batch: records and head go
        // in one statement, one round trip. A batch of over `maximumRowsPerStatement` records goes
        // in chunks, each moving the head to its last record; the last chunk sets the anchor.
        var start = records.startIndex
        var rows = 0
        repeat {
            let end = min(start + Self.maximumRowsPerStatement, records.endIndex)
            let isLast = end == records.endIndex
            let chunkHead = isLast ? head : AuditHead(sequence: records[end - 1].sequence, hash: records[end - 1].hash)
            rows = try await appendAuditChunk(records[start..<end], head: chunkHead, anchor: isLast ? anchor : nil)
            start = end
        } while start < records.endIndex
        guard rows == 1 else {
            throw StorageError(.corrupt, "appendAuditRecords: the audit_head row is missing")
        }
        if keepCheckpoint, let anchor {
            try await run(
                """
                INSERT INTO audit_checkpoints (seq, hash, key_id, mac, time) VALUES (\(anchor.sequence), \
                \(ByteBuffer(bytes: anchor.hash)), \(ByteBuffer(bytes: anchor.keyID.bytes)), \
                \(ByteBuffer(bytes: anchor.mac)), \(anchor.time.millisecondsSinceEpoch))
                """,
                "appendAuditRecords: checkpoint"
            )
        }
    }

    func auditCheckpoints(after: Int64, limit: Int) async throws -> [AuditCheckpoint] {
        try await run(
            """
            SELECT seq, hash, key_id, mac, time FROM audit_checkpoints WHERE seq > \(after) \
            ORDER BY seq LIMIT \(Self.clamped(limit))
            """,
            "auditCheckpoints"
        ).map(Rows.checkpoint)
    }

    /// The audit columns of `records` as parallel arrays, for `UNNEST` (NULL tenants flagged in
    /// `tenantIsNull`).
    private struct AuditColumns {
        var sequences: [Int64] = []
        var times: [Int64] = []
        var principals: [String] = []
        var tenants: [String] = []
        var tenantIsNull: [Bool] = []
        var operations: [String] = []
        var keyIDs: [String] = []
        var outcomes: [String] = []
        var requestIDs: [String] = []
        var details: [String] = []
        var previousHashes: [ByteBuffer] = []
        var hashes: [ByteBuffer] = []

        init(_ records: ArraySlice<AuditRecord>) {
            for record in records {
                let event = record.event
                sequences.append(record.sequence)
                times.append(event.time.millisecondsSinceEpoch)
                principals.append(event.principal.name)
                tenants.append(event.tenant?.rawValue ?? "")
                tenantIsNull.append(event.tenant == nil)
                operations.append(event.operation.rawValue)
                keyIDs.append(event.keyIDs.joined(separator: ","))
                outcomes.append(event.outcome.description)
                requestIDs.append(event.requestID)
                details.append(event.detail)
                previousHashes.append(ByteBuffer(bytes: record.previousHash))
                hashes.append(ByteBuffer(bytes: record.hash))
            }
        }
    }

    /// Appends `records` and sets the head row, in one statement; returns the head rows updated
    /// (1 unless the row is missing).
    private func appendAuditChunk(
        _ records: ArraySlice<AuditRecord>, head: AuditHead, anchor: AuditCheckpoint?
    ) async throws -> Int {
        let columns = AuditColumns(records)
        return try await run(
            """
            WITH appended AS (INSERT INTO audit_log (\(unescaped: Columns.audit)) \
            SELECT s, t, p, CASE WHEN tn THEN NULL ELSE te END, o, k, r, q, d, ph, h \
            FROM UNNEST(\(columns.sequences)::bigint[], \(columns.times)::bigint[], \(columns.principals)::text[], \
            \(columns.tenants)::text[], \(columns.tenantIsNull)::bool[], \(columns.operations)::text[], \
            \(columns.keyIDs)::text[], \(columns.outcomes)::text[], \(columns.requestIDs)::text[], \
            \(columns.details)::text[], \(columns.previousHashes)::bytea[], \(columns.hashes)::bytea[]) \
            AS a (s, t, p, te, tn, o, k, r, q, d, ph, h)) \
            UPDATE audit_head SET seq = \(head.sequence), hash = \(ByteBuffer(bytes: head.hash)), \
            anchor_key_id = \(anchor.map { ByteBuffer(bytes: $0.keyID.bytes) }), \
            anchor_mac = \(anchor.map { ByteBuffer(bytes: $0.mac) }), \
            anchor_time = \(anchor?.time.millisecondsSinceEpoch) WHERE id = 1
            """,
            "appendAuditRecords"
        ).metadata.rows ?? 0
    }

    func auditRecords(after: Int64, limit: Int) async throws -> [AuditRecord] {
        try await run(
            """
            SELECT \(unescaped: Columns.audit) FROM audit_log WHERE seq > \(after) \
            ORDER BY seq LIMIT \(Self.clamped(limit))
            """,
            "auditRecords"
        ).map(Rows.audit)
    }
}

/// The statements in flight on each connection, failed at once when their connection closes.
///
/// One close callback per connection, not one per statement: a callback registered on
/// `closeFuture` stays until the connection closes, so one per statement made a long-lived pooled
/// connection grow by a closure per statement, without bound.
final class ClosingConnections: Sendable {
    static let shared = ClosingConnections()

    private struct Watched: Sendable {
        weak var connection: PostgresConnection?
        var nextID = 0
        var onClose: [Int: @Sendable () -> Void] = [:]
    }

    private let state = Mutex<[ObjectIdentifier: Watched]>([:])

    /// Calls `onClose` when `connection` closes (at once if it has), unless `unwatch` comes first.
    func watch(_ connection: PostgresConnection, onClose: @escaping @Sendable () -> Void) -> Int {
        let key = ObjectIdentifier(connection)
        let (id, isNew) = state.withLock { state -> (Int, Bool) in
            var watched = state[key] ?? Watched()
            // An entry left by an earlier connection at the same address (it cannot outlive its
            // close callback, but be sure) is replaced.
            let isNew = watched.connection !== connection
            if isNew { watched = Watched(connection: connection) }
            let id = watched.nextID
            watched.nextID += 1
            watched.onClose[id] = onClose
            state[key] = watched
            return (id, isNew)
        }
        if isNew {
            connection.closeFuture.whenComplete { [weak self] _ in self?.closed(key) }
        }
        return id
    }

    func unwatch(_ connection: PostgresConnection, _ id: Int) {
        state.withLock { _ = $0[ObjectIdentifier(connection)]?.onClose.removeValue(forKey: id) }
    }

    private func closed(_ key: ObjectIdentifier) {
        let callbacks = state.withLock { $0.removeValue(forKey: key)?.onClose.values.map { $0 } ?? [] }
        for callback in callbacks { callback() }
    }
}
