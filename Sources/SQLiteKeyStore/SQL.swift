/// The statements the store runs, in one place so tests can check their query plans. Values are
/// always bound (`?`), never spliced into the text; lists use keyset pagination (`id > ?`), never
/// OFFSET.
enum SQL {
    // MARK: Tenants

    static let tenantColumns = "id, state, primary_version, created_at, updated_at"
    static let insertTenant = "INSERT INTO tenants (\(tenantColumns)) VALUES (?, ?, ?, ?, ?)"
    static let tenant = "SELECT \(tenantColumns) FROM tenants WHERE id = ?"
    static let updateTenant = "UPDATE tenants SET state = ?, primary_version = ?, updated_at = ? WHERE id = ?"
    static let tenantsFirst = "SELECT \(tenantColumns) FROM tenants ORDER BY id LIMIT ?"
    static let tenantsAfter = "SELECT \(tenantColumns) FROM tenants WHERE id > ? ORDER BY id LIMIT ?"

    // MARK: Master-key versions

    static let versionColumns = """
        tenant_id, version, state, token_key_id, invocations_reserved, created_at, updated_at, destroy_after, \
        destroyed_at
        """
    static let insertVersion =
        "INSERT INTO master_key_versions (\(versionColumns)) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    static let version = "SELECT \(versionColumns) FROM master_key_versions WHERE tenant_id = ? AND version = ?"
    static let versionsOfTenant =
        "SELECT \(versionColumns) FROM master_key_versions WHERE tenant_id = ? ORDER BY version"
    static let updateVersion = """
        UPDATE master_key_versions SET state = ?, updated_at = ?, destroy_after = ?, destroyed_at = ?
        WHERE tenant_id = ? AND version = ?
        """
    /// Binds: tenant, version, count, limit. `invocations_reserved <= limit - count` rather than
    /// `invocations_reserved + count <= limit`: both operands are non-negative, so it cannot overflow.
    static let reserveInvocations = """
        UPDATE master_key_versions SET invocations_reserved = invocations_reserved + ?3
        WHERE tenant_id = ?1 AND version = ?2 AND invocations_reserved <= ?4 - ?3
        RETURNING invocations_reserved - ?3 AS first
        """
    static let versionsDueForDestruction = """
        SELECT \(versionColumns) FROM master_key_versions
        WHERE destroy_after IS NOT NULL AND destroy_after <= ? AND state <> 'destroyed'
        ORDER BY destroy_after, tenant_id, version LIMIT ?
        """

    // MARK: Data keys

    static let dataKeyColumns =
        "tenant_id, id, version, state, wrapped, context_hash, encryptions, created_at, updated_at"
    /// The placeholders of one data key row.
    static let dataKeyRow = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
    static func insertDataKeys(rows: Int) -> String {
        "INSERT INTO data_keys (\(dataKeyColumns)) VALUES "
            + repeatElement(dataKeyRow, count: rows).joined(separator: ", ")
    }
    static let dataKey = "SELECT \(dataKeyColumns) FROM data_keys WHERE tenant_id = ? AND id = ?"
    /// The tenant, the rows among `count` ids and the version each names, in one statement: one row
    /// per key found (the tenant's columns repeated), or one row of NULL key columns when none is,
    /// and none when the tenant does not exist. Binds: the ids, then the tenant.
    static func dataKeysForUse(count: Int) -> String {
        """
        SELECT t.id AS t_id, t.state AS t_state, t.primary_version AS t_primary_version, \
        t.created_at AS t_created_at, t.updated_at AS t_updated_at, d.tenant_id AS tenant_id, d.id AS id, \
        d.version AS version, d.state AS state, d.wrapped AS wrapped, d.context_hash AS context_hash, \
        d.encryptions AS encryptions, d.created_at AS created_at, d.updated_at AS updated_at, \
        v.tenant_id AS v_tenant_id, v.version AS v_version, v.state AS v_state, \
        v.token_key_id AS v_token_key_id, v.invocations_reserved AS v_invocations_reserved, \
        v.created_at AS v_created_at, v.updated_at AS v_updated_at, v.destroy_after AS v_destroy_after, \
        v.destroyed_at AS v_destroyed_at \
        FROM tenants t \
        LEFT JOIN data_keys d ON d.tenant_id = t.id AND d.id IN (\(repeatElement("?", count: count).joined(separator: ", "))) \
        LEFT JOIN master_key_versions v ON v.tenant_id = t.id AND v.version = d.version \
        WHERE t.id = ?
        """
    }

    static func dataKeysByID(count: Int) -> String {
        "SELECT \(dataKeyColumns) FROM data_keys WHERE tenant_id = ? AND id IN ("
            + repeatElement("?", count: count).joined(separator: ", ") + ")"
    }
    /// Binds: tenant, [state], [after], limit.
    static func dataKeys(state: Bool, after: Bool) -> String {
        "SELECT \(dataKeyColumns) FROM data_keys WHERE tenant_id = ?"
            + (state ? " AND state = ?" : "")
            + (after ? " AND id > ?" : "")
            + " ORDER BY id LIMIT ?"
    }
    /// Binds: tenant, version, [after], limit. `state IN (...)` rather than `<> 'destroyed'` lets
    /// the planner use equality on the state index where it prefers it.
    static func dataKeysNotUnderVersion(after: Bool) -> String {
        "SELECT \(dataKeyColumns) FROM data_keys WHERE tenant_id = ? AND version <> ?"
            + " AND state IN ('enabled', 'disabled')"
            + (after ? " AND id > ?" : "")
            + " ORDER BY id LIMIT ?"
    }
    static let countLiveDataKeys =
        "SELECT count(*) AS n FROM data_keys WHERE tenant_id = ? AND state IN ('enabled', 'disabled')"
    static let countLiveDataKeysUnderVersion = """
        SELECT count(*) AS n FROM data_keys
        WHERE tenant_id = ? AND version = ? AND state IN ('enabled', 'disabled')
        """
    /// Binds: toVersion, wrapped, contextHash, updatedAt, tenant, id, fromVersion.
    static let updateDataKeyWrapping = """
        UPDATE data_keys SET version = ?, wrapped = ?, context_hash = ?, updated_at = ?
        WHERE tenant_id = ? AND id = ? AND version = ? AND state <> 'destroyed'
        RETURNING 1 AS changed
        """
    /// Binds: state, updatedAt, tenant, id.
    static let setDataKeyState = """
        UPDATE data_keys SET state = ?, updated_at = ?
        WHERE tenant_id = ? AND id = ? AND state <> 'destroyed'
        RETURNING 1 AS changed
        """
    /// Binds: state, updatedAt, tenant, id.
    static let setDataKeyStateClearingWrapped = """
        UPDATE data_keys SET state = ?, wrapped = NULL, updated_at = ?
        WHERE tenant_id = ? AND id = ? AND state <> 'destroyed'
        RETURNING 1 AS changed
        """
    /// Binds: tenant, id, limit.
    static let countEncryption = """
        UPDATE data_keys SET encryptions = encryptions + 1
        WHERE tenant_id = ? AND id = ? AND state = 'enabled' AND encryptions < ?
        RETURNING encryptions
        """
    static let deleteDataKeys = "DELETE FROM data_keys WHERE tenant_id = ?"

    /// The rows the previous statement on this connection changed (the writer is exclusive, so
    /// nothing runs in between).
    static let changes = "SELECT changes() AS n"

    // MARK: Idempotency

    static let idempotencyColumns = "scope, key, operation, fingerprint, result, created_at"
    static let idempotencyRecord =
        "SELECT \(idempotencyColumns) FROM idempotency_keys WHERE scope = ? AND key = ?"
    static let insertIdempotencyRecord =
        "INSERT INTO idempotency_keys (\(idempotencyColumns)) VALUES (?, ?, ?, ?, ?, ?)"
    static let deleteIdempotencyRecords = "DELETE FROM idempotency_keys WHERE created_at < ?"

    // MARK: Rewrap jobs

    static let rewrapJobColumns = "tenant_id, target_version, state, cursor, moved, total, started_at, updated_at"
    static let rewrapJob = "SELECT \(rewrapJobColumns) FROM rewrap_jobs WHERE tenant_id = ?"
    static let saveRewrapJob = """
        INSERT INTO rewrap_jobs (\(rewrapJobColumns)) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (tenant_id) DO UPDATE SET
            target_version = excluded.target_version, state = excluded.state, cursor = excluded.cursor,
            moved = excluded.moved, total = excluded.total, started_at = excluded.started_at,
            updated_at = excluded.updated_at
        """

    // MARK: Audit

    static let auditHead = "SELECT seq, hash, anchor_key_id, anchor_mac, anchor_time FROM audit_head WHERE id = 1"
    static let auditColumns =
        "seq, time, principal, tenant_id, operation, key_ids, outcome, request_id, detail, prev_hash, hash"
    /// The placeholders of one audit row.
    static let auditRow = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    static func insertAuditRecords(rows: Int) -> String {
        "INSERT INTO audit_log (\(auditColumns)) VALUES "
            + repeatElement(auditRow, count: rows).joined(separator: ", ")
    }
    /// Binds: seq, hash, anchor key id, anchor MAC, anchor time.
    static let updateAuditHead = """
        UPDATE audit_head SET seq = ?, hash = ?, anchor_key_id = ?, anchor_mac = ?, anchor_time = ?
        WHERE id = 1 RETURNING 1 AS changed
        """
    /// Binds: seq, hash, key id, MAC, time.
    static let insertAuditCheckpoint =
        "INSERT INTO audit_checkpoints (seq, hash, key_id, mac, time) VALUES (?, ?, ?, ?, ?)"
    static let auditCheckpoints =
        "SELECT seq, hash, key_id, mac, time FROM audit_checkpoints WHERE seq > ? ORDER BY seq LIMIT ?"
    static let auditRecords = "SELECT \(auditColumns) FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?"

    // MARK: Schema

    static let appliedMigrations = "SELECT version, name FROM schema_migrations ORDER BY version"
    static let migrationApplied = "SELECT 1 AS applied FROM schema_migrations WHERE version = ?"
    static let recordMigration = "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"
    static let schemaVersion = "SELECT coalesce(max(version), 0) AS version FROM schema_migrations"
}
