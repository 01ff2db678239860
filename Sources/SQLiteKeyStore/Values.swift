import KeyHierarchy
import SQLiteNIO

// MARK: - Errors

extension StorageError {
    /// Maps a failure of one statement. `detail` names the operation, SQLite's message (which names
    /// constraints and columns, never bound values) and the extended result code.
    static func from(_ error: any Error, during operation: String) -> any Error {
        switch error {
        case is StorageError, is CancellationError:
            return error
        case let error as SQLiteError where error.reason == .misuse && error.message == threadPoolInactive:
            // sqlite-nio's word for a thread pool that was shut down: the store is closing.
            return StorageError(.unavailable, "\(operation): \(error.message) [\(error.reason)]")
        case let error as SQLiteError:
            return StorageError(kind(of: error.reason), "\(operation): \(error.message) [\(error.reason)]")
        default:
            // Not SQLite's: the thread pool refused the work (it is shutting down), so the store
            // cannot be used now. Only the type, in case a message carried more than it should.
            return StorageError(.unavailable, "\(operation): \(type(of: error))")
        }
    }

    /// The message sqlite-nio gives (with `SQLITE_MISUSE`) when its thread pool no longer runs work.
    static let threadPoolInactive = "Thread pool is inactive"

    /// The port's kind for an SQLite result code.
    static func kind(of reason: SQLiteError.Reason) -> StorageError.Kind {
        switch reason {
        case .constraintUniqueFailed, .constraintPrimaryKeyFailed, .constraintUniqueRowIDFailed:
            return .uniqueViolation
        case .constraintForeignKeyFailed:
            return .foreignKeyViolation
        case .busy, .busyTimeout, .busyInRecovery, .busyInSnapshot, .locked, .lockedBySharedCache,
            .lockedVirtualTable:
            return .conflict
        case .cantOpen, .cantOpenDirectory, .cantOpenInvalidPath, .cantOpenCygwinPath, .cantOpenUnfollowedSymlink,
            .permission, .readonlyDirectory, .readonlyCantLock:
            return .unavailable
        case .corrupt, .corruptIndex, .corruptSequenceSchema, .corruptVirtualTable, .notADatabase,
            .ioErrorBadDataChecksum, .ioErrorCorruptedFilesystem:
            return .corrupt
        // The file cannot be read or written now (a failing disk or file system, a full disk, the
        // file moved or made read-only underneath): the store cannot be used, as a database
        // server that cannot be reached.
        case .ioError, .ioErrorFailedRead, .ioErrorIncompleteRead, .ioErrorFailedWrite, .ioErrorFailedSync,
            .ioErrorFailedDirSync, .ioErrorFailedTruncate, .ioErrorFailedStat, .ioErrorFailedUnlock,
            .ioErrorFailedReadLock, .ioErrorFailedDelete, .ioErrorFailedAccess, .ioErrorFailedLockCheck,
            .ioErrorFailedAdvisoryLock, .ioErrorFailedClose, .ioErrorFailedSharedMemOpen,
            .ioErrorFailedSharedMemSize, .ioErrorFailedSharedMemMap, .ioErrorFailedDeleteNonexistent,
            .ioErrorFailedMemoryMap, .ioErrorCantFindTempdir, .full, .readonlyInRecovery,
            .readonlyInRollback, .readonlyBackingMoved:
            return .unavailable
        default:
            return .other
        }
    }

    /// Whether SQLite undid only the failing statement (constraint and type errors, `ON CONFLICT
    /// ABORT`), so the transaction goes on. After any other error SQLite may have rolled back the
    /// whole transaction (FULL, IOERR, BUSY, NOMEM), and later statements would run outside it.
    static func isStatementScoped(_ error: any Error) -> Bool {
        guard let error = error as? SQLiteError else { return true }
        switch error.reason {
        case .constraint, .constraintCheckFailed, .constraintForeignKeyFailed, .constraintNotNullFailed,
            .constraintPrimaryKeyFailed, .constraintTriggerFailed, .constraintUniqueFailed,
            .constraintUniqueRowIDFailed, .constraintStrictDataTypeFailed, .mismatch, .range, .tooBig:
            return true
        default:
            return false
        }
    }
}

// MARK: - Binding

extension SQLiteData {
    static func int(_ value: Int64) -> SQLiteData { .integer(SQLiteInt64(value)) }
    static func int(_ value: Int) -> SQLiteData { .integer(SQLiteInt64(value)) }
    static func time(_ value: Timestamp) -> SQLiteData { .int(value.millisecondsSinceEpoch) }
    static func time(_ value: Timestamp?) -> SQLiteData { value.map { .time($0) } ?? .null }
    static func bytes(_ value: [UInt8]) -> SQLiteData { .blob(ByteBuffer(bytes: value)) }
    static func bytes(_ value: [UInt8]?) -> SQLiteData { value.map { .bytes($0) } ?? .null }
    static func text(_ value: String?) -> SQLiteData { value.map { .text($0) } ?? .null }
}

// MARK: - Decoding

/// Reads typed columns from a row; anything that does not parse is `StorageError(.corrupt)` naming
/// the table and column, never the value.
struct RowReader {
    let row: SQLiteRow
    let table: String
    /// Put before every column name: a joined result names its tables' columns apart (`t_state`).
    var columnPrefix = ""

    private func value(_ column: String) throws -> SQLiteData {
        guard let value = row.column(columnPrefix + column) else {
            throw StorageError(.corrupt, "\(table).\(column): column missing from the result")
        }
        return value
    }

    private func corrupt(_ column: String, _ problem: String) -> StorageError {
        StorageError(.corrupt, "\(table).\(column): \(problem)")
    }

    func text(_ column: String) throws -> String {
        guard case .text(let text) = try value(column) else { throw corrupt(column, "not TEXT") }
        return text
    }

    func optionalText(_ column: String) throws -> String? {
        switch try value(column) {
        case .null: return nil
        case .text(let text): return text
        default: throw corrupt(column, "not TEXT or NULL")
        }
    }

    func int64(_ column: String) throws -> Int64 {
        guard case .integer(let value) = try value(column) else { throw corrupt(column, "not INTEGER") }
        return Int64(value)
    }

    func int(_ column: String) throws -> Int {
        guard case .integer(let value) = try value(column) else { throw corrupt(column, "not INTEGER") }
        return Int(value)
    }

    func time(_ column: String) throws -> Timestamp {
        Timestamp(millisecondsSinceEpoch: try int64(column))
    }

    func optionalTime(_ column: String) throws -> Timestamp? {
        switch try value(column) {
        case .null: return nil
        case .integer(let value): return Timestamp(millisecondsSinceEpoch: Int64(value))
        default: throw corrupt(column, "not INTEGER or NULL")
        }
    }

    func bytes(_ column: String) throws -> [UInt8] {
        guard case .blob(let buffer) = try value(column) else { throw corrupt(column, "not BLOB") }
        return Array(buffer.readableBytesView)
    }

    func optionalBytes(_ column: String) throws -> [UInt8]? {
        switch try value(column) {
        case .null: return nil
        case .blob(let buffer): return Array(buffer.readableBytesView)
        default: throw corrupt(column, "not BLOB or NULL")
        }
    }

    func hash(_ column: String) throws -> [UInt8] {
        let bytes = try bytes(column)
        guard bytes.count == 32 else { throw corrupt(column, "not 32 bytes") }
        return bytes
    }

    func rawValue<Value: RawRepresentable>(_ column: String, as type: Value.Type) throws -> Value
    where Value.RawValue == String {
        guard let value = Value(rawValue: try text(column)) else { throw corrupt(column, "unknown value") }
        return value
    }

    func tenantID(_ column: String) throws -> TenantID {
        TenantID(trusted: try text(column))
    }

    func dataKeyID(_ column: String) throws -> DataKeyID {
        do {
            return try DataKeyID(try text(column))
        } catch is KeyServiceError {
            throw corrupt(column, "not a UUID")
        }
    }

    func optionalDataKeyID(_ column: String) throws -> DataKeyID? {
        guard let text = try optionalText(column) else { return nil }
        do {
            return try DataKeyID(text)
        } catch {
            throw corrupt(column, "not a UUID")
        }
    }

    func tokenKeyID(_ column: String) throws -> TokenKeyID {
        guard let id = TokenKeyID(bytes: try bytes(column)) else {
            throw corrupt(column, "not \(TokenKeyID.byteCount) bytes")
        }
        return id
    }
}

extension TenantRecord {
    init(row: SQLiteRow) throws { try self.init(row: row, columnPrefix: "") }

    /// From a joined result whose columns for this table carry `columnPrefix`.
    init(row: SQLiteRow, columnPrefix: String) throws {
        let r = RowReader(row: row, table: "tenants", columnPrefix: columnPrefix)
        self.init(
            id: try r.tenantID("id"),
            state: try r.rawValue("state", as: TenantState.self),
            primaryVersion: try r.int("primary_version"),
            createdAt: try r.time("created_at"),
            updatedAt: try r.time("updated_at")
        )
    }

    var binds: [SQLiteData] {
        [.text(id.rawValue), .text(state.rawValue), .int(primaryVersion), .time(createdAt), .time(updatedAt)]
    }
}

extension MasterKeyVersionRecord {
    init(row: SQLiteRow) throws { try self.init(row: row, columnPrefix: "") }

    /// From a joined result whose columns for this table carry `columnPrefix`.
    init(row: SQLiteRow, columnPrefix: String) throws {
        let r = RowReader(row: row, table: "master_key_versions", columnPrefix: columnPrefix)
        self.init(
            tenant: try r.tenantID("tenant_id"),
            version: try r.int("version"),
            state: try r.rawValue("state", as: MasterKeyState.self),
            tokenKeyID: try r.tokenKeyID("token_key_id"),
            invocationsReserved: try r.int64("invocations_reserved"),
            createdAt: try r.time("created_at"),
            updatedAt: try r.time("updated_at"),
            destroyAfter: try r.optionalTime("destroy_after"),
            destroyedAt: try r.optionalTime("destroyed_at")
        )
    }

    var binds: [SQLiteData] {
        [
            .text(tenant.rawValue), .int(version), .text(state.rawValue), .bytes(tokenKeyID.bytes),
            .int(invocationsReserved), .time(createdAt), .time(updatedAt), .time(destroyAfter), .time(destroyedAt),
        ]
    }
}

extension DataKeyRecord {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "data_keys")
        self.init(
            tenant: try r.tenantID("tenant_id"),
            id: try r.dataKeyID("id"),
            version: try r.int("version"),
            state: try r.rawValue("state", as: DataKeyState.self),
            wrapped: try r.optionalBytes("wrapped"),
            contextHash: try r.bytes("context_hash"),
            encryptions: try r.int64("encryptions"),
            createdAt: try r.time("created_at"),
            updatedAt: try r.time("updated_at")
        )
    }

    /// In `SQL.dataKeyColumns` order.
    func appendBinds(to binds: inout [SQLiteData]) {
        binds.append(.text(tenant.rawValue))
        binds.append(.text(id.description))
        binds.append(.int(version))
        binds.append(.text(state.rawValue))
        binds.append(.bytes(wrapped))
        binds.append(.bytes(contextHash))
        binds.append(.int(encryptions))
        binds.append(.time(createdAt))
        binds.append(.time(updatedAt))
    }
}

extension IdempotencyRecord {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "idempotency_keys")
        self.init(
            scope: try r.text("scope"),
            key: try r.text("key"),
            operation: try r.text("operation"),
            fingerprint: try r.bytes("fingerprint"),
            result: try r.text("result"),
            createdAt: try r.time("created_at")
        )
    }

    var binds: [SQLiteData] {
        [.text(scope), .text(key), .text(operation), .bytes(fingerprint), .text(result), .time(createdAt)]
    }
}

extension RewrapJobRecord {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "rewrap_jobs")
        self.init(
            tenant: try r.tenantID("tenant_id"),
            targetVersion: try r.int("target_version"),
            state: try r.rawValue("state", as: RewrapJobState.self),
            cursor: try r.optionalDataKeyID("cursor"),
            moved: try r.int64("moved"),
            total: try r.int64("total"),
            startedAt: try r.time("started_at"),
            updatedAt: try r.time("updated_at")
        )
    }

    var binds: [SQLiteData] {
        [
            .text(tenant.rawValue), .int(targetVersion), .text(state.rawValue), .text(cursor?.description),
            .int(moved), .int(total), .time(startedAt), .time(updatedAt),
        ]
    }
}

extension AnchoredAuditHead {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "audit_head")
        let head = AuditHead(sequence: try r.int64("seq"), hash: try r.hash("hash"))
        guard let keyID = try r.optionalBytes("anchor_key_id"), let mac = try r.optionalBytes("anchor_mac"),
            let time = try r.optionalTime("anchor_time")
        else {
            self.init(head: head, anchor: nil)
            return
        }
        guard let key = TokenKeyID(bytes: keyID) else {
            throw StorageError(.corrupt, "audit_head.anchor_key_id is not \(TokenKeyID.byteCount) bytes")
        }
        self.init(
            head: head,
            anchor: AuditCheckpoint(sequence: head.sequence, hash: head.hash, keyID: key, mac: mac, time: time)
        )
    }
}

extension AuditCheckpoint {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "audit_checkpoints")
        guard let key = TokenKeyID(bytes: try r.bytes("key_id")) else {
            throw StorageError(.corrupt, "audit_checkpoints.key_id is not \(TokenKeyID.byteCount) bytes")
        }
        self.init(
            sequence: try r.int64("seq"), hash: try r.hash("hash"), keyID: key, mac: try r.bytes("mac"),
            time: try r.time("time"))
    }
}

extension AuditRecord {
    /// How `key_ids` joins the ids. Data key ids are UUIDs and version ids `v<n>`, so none holds it;
    /// `appendAuditRecords` refuses one that does rather than store an ambiguous list.
    static let keyIDSeparator: Character = ","

    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "audit_log")
        let keyIDs = try r.text("key_ids")
        let event = AuditEvent(
            time: try r.time("time"),
            principal: Principal(try r.text("principal")),
            tenant: try r.optionalText("tenant_id").map(TenantID.init(trusted:)),
            operation: try r.rawValue("operation", as: AuditOperation.self),
            keyIDs: keyIDs.isEmpty
                ? [] : keyIDs.split(separator: Self.keyIDSeparator, omittingEmptySubsequences: false).map(String.init),
            outcome: AuditOutcome(stored: try r.text("outcome")),
            requestID: try r.text("request_id"),
            detail: try r.text("detail")
        )
        self.init(
            sequence: try r.int64("seq"),
            event: event,
            previousHash: try r.bytes("prev_hash"),
            hash: try r.bytes("hash")
        )
    }

    /// In `SQL.auditColumns` order.
    func appendBinds(to binds: inout [SQLiteData]) {
        binds.append(.int(sequence))
        binds.append(.time(event.time))
        binds.append(.text(event.principal.name))
        binds.append(.text(event.tenant?.rawValue))
        binds.append(.text(event.operation.rawValue))
        binds.append(.text(event.keyIDs.joined(separator: String(Self.keyIDSeparator))))
        binds.append(.text(event.outcome.description))
        binds.append(.text(event.requestID))
        binds.append(.text(event.detail))
        binds.append(.bytes(previousHash))
        binds.append(.bytes(hash))
    }
}
