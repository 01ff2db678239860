import Foundation
import KeyHierarchy
import PostgresNIO

/// Column lists, in the order `Rows` decodes them.
enum Columns {
    static let tenant = "id, state, primary_version, created_at, updated_at"
    static let version = """
        tenant_id, version, state, token_key_id, invocations_reserved, created_at, updated_at, destroy_after, \
        destroyed_at
        """
    static let dataKey = "tenant_id, id, version, state, wrapped, context_hash, encryptions, created_at, updated_at"
    static let idempotency = "scope, key, operation, fingerprint, result, created_at"
    static let rewrapJob = "tenant_id, target_version, state, cursor, moved, total, started_at, updated_at"
    static let audit =
        "seq, time, principal, tenant_id, operation, key_ids, outcome, request_id, detail, prev_hash, hash"
}

/// The data-key lookups and listings: one fixed statement per shape (no `$after IS NULL OR …`, which would
/// keep the planner from using the index range), so each has one plan that `EXPLAIN` can check.
/// Every one walks an index in id order and stops after `limit` rows (keyset paging, no OFFSET).
enum SQL {
    static func dataKeyByID(_ tenant: String, _ id: UUID) -> PostgresQuery {
        "SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) AND id = \(id)"
    }

    static func dataKeysByIDs(_ tenant: String, _ ids: [UUID]) -> PostgresQuery {
        "SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) AND id = ANY(\(ids)::uuid[])"
    }

    /// The tenant, the rows among `ids` and the version each names, in one statement: one row per
    /// key found (the tenant's columns repeated), or one row of NULL key columns when none is, and
    /// none when the tenant does not exist.
    ///
    /// Each id is looked up through the unique index on `id` alone (the `LATERAL … OFFSET 0` keeps
    /// the planner from pushing the tenant into that lookup), and the tenant is checked on the row
    /// found. Written as `tenant_id = $1 AND id = ANY($2)`, the planner chose by its estimate of
    /// the tenant's rows, and with statistics taken while the tenant was small it scanned every key
    /// of the tenant for each lookup: with 1,000,000 other rows in the table, DecryptDataKey fell
    /// from 4,600 to 1,300 calls a second (docs/benchmarks.md, issue 13).
    static func dataKeysForUse(_ tenant: String, _ ids: [UUID]) -> PostgresQuery {
        """
        SELECT t.state, t.primary_version, t.created_at, t.updated_at, \
        d.id, d.version, d.state, d.wrapped, d.context_hash, d.encryptions, d.created_at, d.updated_at, \
        v.state, v.token_key_id, v.invocations_reserved, v.created_at, v.updated_at, v.destroy_after, v.destroyed_at \
        FROM tenants t \
        LEFT JOIN (unnest(\(ids)::uuid[]) AS k(id) \
        CROSS JOIN LATERAL (SELECT * FROM data_keys x WHERE x.id = k.id OFFSET 0) d) ON d.tenant_id = t.id \
        LEFT JOIN master_key_versions v ON v.tenant_id = t.id AND v.version = d.version \
        WHERE t.id = \(tenant)
        """
    }

    static func countLiveDataKeys(_ tenant: String) -> PostgresQuery {
        "SELECT count(*) FROM data_keys WHERE tenant_id = \(tenant) AND state <> 'destroyed'"
    }

    static func countLiveDataKeys(_ tenant: String, version: Int) -> PostgresQuery {
        """
        SELECT count(*) FROM data_keys WHERE tenant_id = \(tenant) AND version = \(version) \
        AND state <> 'destroyed'
        """
    }

    static func dataKeysByTenant(_ tenant: String, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) \
        ORDER BY id LIMIT \(limit)
        """
    }

    static func dataKeysByTenant(_ tenant: String, after: UUID, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) AND id > \(after) \
        ORDER BY id LIMIT \(limit)
        """
    }

    static func dataKeysByState(_ tenant: String, _ state: String, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) AND state = \(state) \
        ORDER BY id LIMIT \(limit)
        """
    }

    static func dataKeysByState(_ tenant: String, _ state: String, after: UUID, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) AND state = \(state) \
        AND id > \(after) ORDER BY id LIMIT \(limit)
        """
    }

    static func dataKeysNotUnderVersion(_ tenant: String, _ version: Int, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) \
        AND version <> \(version) AND state <> 'destroyed' ORDER BY id LIMIT \(limit)
        """
    }

    static func dataKeysNotUnderVersion(_ tenant: String, _ version: Int, after: UUID, limit: Int) -> PostgresQuery {
        """
        SELECT \(unescaped: Columns.dataKey) FROM data_keys WHERE tenant_id = \(tenant) \
        AND version <> \(version) AND state <> 'destroyed' AND id > \(after) ORDER BY id LIMIT \(limit)
        """
    }
}

/// Row decoders. A value that does not parse (unknown state, wrong length) is `.corrupt`.
enum Rows {
    static func tenant(_ row: PostgresRow) throws -> TenantRecord {
        let (id, state, primaryVersion, created, updated) = try decodeRow(
            row,
            as: (String, String, Int, Int64, Int64).self,
            operation: "tenants"
        )
        return try tenant(TenantID(trusted: id), state, primaryVersion, created, updated)
    }

    static func version(_ row: PostgresRow) throws -> MasterKeyVersionRecord {
        let (tenant, version, state, tokenKeyID, reserved, created, updated, destroyAfter, destroyedAt) =
            try decodeRow(
                row,
                as: (String, Int, String, ByteBuffer, Int64, Int64, Int64, Int64?, Int64?).self,
                operation: "master_key_versions"
            )
        return try Self.version(
            TenantID(trusted: tenant), version, state, tokenKeyID, reserved, created, updated, destroyAfter,
            destroyedAt)
    }

    static func dataKey(_ row: PostgresRow) throws -> DataKeyRecord {
        let (tenant, id, version, state, wrapped, contextHash, encryptions, created, updated) = try decodeRow(
            row,
            as: (String, UUID, Int, String, ByteBuffer?, ByteBuffer, Int64, Int64, Int64).self,
            operation: "data_keys"
        )
        return try dataKey(
            TenantID(trusted: tenant), id, version, state, wrapped, contextHash, encryptions, created, updated)
    }

    /// The rows of `SQL.dataKeysForUse`: the tenant's columns, then a key's and its version's, all
    /// NULL where the outer joins found nothing.
    static func dataKeysForUse(_ tenant: TenantID, _ rows: PostgresQueryResult) throws -> DataKeysForUse? {
        var found: DataKeysForUse?
        var versions: [Int: MasterKeyVersionRecord] = [:]
        for row in rows {
            let (
                tenantState, primary, tenantCreated, tenantUpdated,
                id, version, state, wrapped, contextHash, encryptions, created, updated,
                versionState, tokenKeyID, reserved, versionCreated, versionUpdated, destroyAfter, destroyedAt
            ) = try decodeRow(
                row,
                as: (
                    String, Int, Int64, Int64,
                    UUID?, Int?, String?, ByteBuffer?, ByteBuffer?, Int64?, Int64?, Int64?,
                    String?, ByteBuffer?, Int64?, Int64?, Int64?, Int64?, Int64?
                ).self,
                operation: "dataKeysForUse"
            )
            if found == nil {
                found = DataKeysForUse(
                    tenant: try Self.tenant(tenant, tenantState, primary, tenantCreated, tenantUpdated),
                    keys: [],
                    versions: []
                )
            }
            guard let id, let version, let state, let contextHash, let encryptions, let created, let updated else {
                continue
            }
            found?.keys.append(
                try dataKey(tenant, id, version, state, wrapped, contextHash, encryptions, created, updated))
            guard versions[version] == nil, let versionState, let tokenKeyID, let reserved, let versionCreated,
                let versionUpdated
            else { continue }
            versions[version] = try Self.version(
                tenant, version, versionState, tokenKeyID, reserved, versionCreated, versionUpdated, destroyAfter,
                destroyedAt)
        }
        found?.versions = versions.keys.sorted().map { versions[$0]! }
        return found
    }

    // The records from decoded columns, shared by the single-table decoders and the join.

    private static func tenant(
        _ id: TenantID, _ state: String, _ primaryVersion: Int, _ created: Int64, _ updated: Int64
    ) throws -> TenantRecord {
        TenantRecord(
            id: id,
            state: try parse(TenantState.self, state, "tenants.state"),
            primaryVersion: primaryVersion,
            createdAt: Timestamp(millisecondsSinceEpoch: created),
            updatedAt: Timestamp(millisecondsSinceEpoch: updated)
        )
    }

    private static func version(
        _ tenant: TenantID, _ version: Int, _ state: String, _ tokenKeyID: ByteBuffer, _ reserved: Int64,
        _ created: Int64, _ updated: Int64, _ destroyAfter: Int64?, _ destroyedAt: Int64?
    ) throws -> MasterKeyVersionRecord {
        guard let keyID = TokenKeyID(bytes: Array(tokenKeyID.readableBytesView)) else {
            throw StorageError(.corrupt, "master_key_versions.token_key_id is not \(TokenKeyID.byteCount) bytes")
        }
        return MasterKeyVersionRecord(
            tenant: tenant,
            version: version,
            state: try parse(MasterKeyState.self, state, "master_key_versions.state"),
            tokenKeyID: keyID,
            invocationsReserved: reserved,
            createdAt: Timestamp(millisecondsSinceEpoch: created),
            updatedAt: Timestamp(millisecondsSinceEpoch: updated),
            destroyAfter: destroyAfter.map(Timestamp.init(millisecondsSinceEpoch:)),
            destroyedAt: destroyedAt.map(Timestamp.init(millisecondsSinceEpoch:))
        )
    }

    private static func dataKey(
        _ tenant: TenantID, _ id: UUID, _ version: Int, _ state: String, _ wrapped: ByteBuffer?,
        _ contextHash: ByteBuffer, _ encryptions: Int64, _ created: Int64, _ updated: Int64
    ) throws -> DataKeyRecord {
        DataKeyRecord(
            tenant: tenant,
            id: DataKeyID(uuid: id),
            version: version,
            state: try parse(DataKeyState.self, state, "data_keys.state"),
            wrapped: wrapped.map { Array($0.readableBytesView) },
            contextHash: Array(contextHash.readableBytesView),
            encryptions: encryptions,
            createdAt: Timestamp(millisecondsSinceEpoch: created),
            updatedAt: Timestamp(millisecondsSinceEpoch: updated)
        )
    }

    static func idempotency(_ row: PostgresRow) throws -> IdempotencyRecord {
        let (scope, key, operation, fingerprint, result, created) = try decodeRow(
            row,
            as: (String, String, String, ByteBuffer, String, Int64).self,
            operation: "idempotency_keys"
        )
        return IdempotencyRecord(
            scope: scope,
            key: key,
            operation: operation,
            fingerprint: Array(fingerprint.readableBytesView),
            result: result,
            createdAt: Timestamp(millisecondsSinceEpoch: created)
        )
    }

    static func rewrapJob(_ row: PostgresRow) throws -> RewrapJobRecord {
        let (tenant, target, state, cursor, moved, total, started, updated) = try decodeRow(
            row,
            as: (String, Int, String, UUID?, Int64, Int64, Int64, Int64).self,
            operation: "rewrap_jobs"
        )
        return RewrapJobRecord(
            tenant: TenantID(trusted: tenant),
            targetVersion: target,
            state: try parse(RewrapJobState.self, state, "rewrap_jobs.state"),
            cursor: cursor.map(DataKeyID.init(uuid:)),
            moved: moved,
            total: total,
            startedAt: Timestamp(millisecondsSinceEpoch: started),
            updatedAt: Timestamp(millisecondsSinceEpoch: updated)
        )
    }

    static func audit(_ row: PostgresRow) throws -> AuditRecord {
        let (sequence, time, principal, tenant, operation, keyIDs, outcome, requestID, detail, previousHash, hash) =
            try decodeRow(
                row,
                as: (
                    Int64, Int64, String, String?, String, String, String, String, String, ByteBuffer, ByteBuffer
                ).self,
                operation: "audit_log"
            )
        let event = AuditEvent(
            time: Timestamp(millisecondsSinceEpoch: time),
            principal: Principal(principal),
            tenant: tenant.map(TenantID.init(trusted:)),
            operation: try parse(AuditOperation.self, operation, "audit_log.operation"),
            keyIDs: keyIDs.isEmpty
                ? [] : keyIDs.split(separator: ",", omittingEmptySubsequences: false).map(String.init),
            outcome: AuditOutcome(stored: outcome),
            requestID: requestID,
            detail: detail
        )
        return AuditRecord(
            sequence: sequence,
            event: event,
            previousHash: Array(previousHash.readableBytesView),
            hash: Array(hash.readableBytesView)
        )
    }

    /// Reads `seq, hash, anchor_key_id, anchor_mac, anchor_time` of the `audit_head` row.
    static func auditHead(_ row: PostgresRow?, operation: String) throws -> AnchoredAuditHead {
        guard let row else { throw StorageError(.corrupt, "\(operation): the audit_head row is missing") }
        let (sequence, hash, keyID, mac, time) = try decodeRow(
            row, as: (Int64, ByteBuffer, ByteBuffer?, ByteBuffer?, Int64?).self, operation: operation)
        let head = AuditHead(sequence: sequence, hash: Array(hash.readableBytesView))
        guard let keyID, let mac, let time else { return AnchoredAuditHead(head: head, anchor: nil) }
        return AnchoredAuditHead(
            head: head,
            anchor: try checkpoint(
                sequence: sequence, hash: head.hash, keyID: keyID, mac: mac, time: time, operation: operation)
        )
    }

    /// Reads `seq, hash, key_id, mac, time` of an `audit_checkpoints` row.
    static func checkpoint(_ row: PostgresRow) throws -> AuditCheckpoint {
        let (sequence, hash, keyID, mac, time) = try decodeRow(
            row, as: (Int64, ByteBuffer, ByteBuffer, ByteBuffer, Int64).self, operation: "audit_checkpoints")
        return try checkpoint(
            sequence: sequence, hash: Array(hash.readableBytesView), keyID: keyID, mac: mac, time: time,
            operation: "audit_checkpoints")
    }

    private static func checkpoint(
        sequence: Int64,
        hash: [UInt8],
        keyID: ByteBuffer,
        mac: ByteBuffer,
        time: Int64,
        operation: String
    ) throws -> AuditCheckpoint {
        guard let key = TokenKeyID(bytes: Array(keyID.readableBytesView)) else {
            throw StorageError(.corrupt, "\(operation): an audit anchor key id is not \(TokenKeyID.byteCount) bytes")
        }
        return AuditCheckpoint(
            sequence: sequence, hash: hash, keyID: key, mac: Array(mac.readableBytesView),
            time: Timestamp(millisecondsSinceEpoch: time))
    }

    private static func parse<Value: RawRepresentable>(
        _ type: Value.Type,
        _ stored: String,
        _ column: String
    ) throws -> Value where Value.RawValue == String {
        guard let value = Value(rawValue: stored) else {
            throw StorageError(.corrupt, "\(column) holds an unknown value")
        }
        return value
    }
}
