/// One schema change: applied once, in its own transaction, and recorded in `schema_migrations`.
///
/// `statements` holds one SQL statement per element: SQLite prepares one statement at a time, and a
/// list keeps each failure pointing at its statement.
struct Migration: Sendable {
    let version: Int
    let name: String
    let statements: [String]
}

/// The schema, as the ordered list of migrations that builds it. Never edit an applied migration:
/// append a new one. Table and column names match the PostgreSQL store; times are INTEGER
/// milliseconds since the epoch; every table is STRICT (SQLite 3.37+), so a value of the wrong type
/// is refused instead of being stored as whatever it is.
enum Schema {
    /// Created before any migration runs, so the applied versions can be read.
    static let migrationsTable = """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at INTEGER NOT NULL
        ) STRICT
        """

    /// Every migration, in version order (1, 2, 3, ... with no gaps).
    static let migrations: [Migration] = [
        Migration(
            version: 1,
            name: "initial schema",
            statements: [
                """
                CREATE TABLE tenants (
                    id TEXT PRIMARY KEY,
                    state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'shredded')),
                    primary_version INTEGER NOT NULL,
                    created_at INTEGER NOT NULL,
                    updated_at INTEGER NOT NULL
                ) STRICT
                """,
                """
                CREATE TABLE master_key_versions (
                    tenant_id TEXT NOT NULL REFERENCES tenants (id),
                    version INTEGER NOT NULL CHECK (version > 0),
                    state TEXT NOT NULL CHECK (
                        state IN ('pre-active', 'active', 'suspended', 'deactivated', 'compromised', 'destroyed')
                    ),
                    token_key_id BLOB NOT NULL UNIQUE,
                    invocations_reserved INTEGER NOT NULL DEFAULT 0 CHECK (invocations_reserved >= 0),
                    created_at INTEGER NOT NULL,
                    updated_at INTEGER NOT NULL,
                    destroy_after INTEGER NULL,
                    destroyed_at INTEGER NULL,
                    PRIMARY KEY (tenant_id, version)
                ) STRICT
                """,
                """
                CREATE INDEX master_key_versions_destroy_after ON master_key_versions (destroy_after)
                    WHERE destroy_after IS NOT NULL
                """,
                """
                CREATE TABLE data_keys (
                    tenant_id TEXT NOT NULL,
                    id TEXT NOT NULL UNIQUE,
                    version INTEGER NOT NULL,
                    state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'destroyed')),
                    wrapped BLOB NULL,
                    context_hash BLOB NOT NULL,
                    encryptions INTEGER NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
                    created_at INTEGER NOT NULL,
                    updated_at INTEGER NOT NULL,
                    PRIMARY KEY (tenant_id, id),
                    FOREIGN KEY (tenant_id, version) REFERENCES master_key_versions (tenant_id, version),
                    CHECK ((state = 'destroyed') = (wrapped IS NULL))
                ) STRICT
                """,
                "CREATE INDEX data_keys_tenant_state_id ON data_keys (tenant_id, state, id)",
                "CREATE INDEX data_keys_tenant_version_id ON data_keys (tenant_id, version, id)",
                """
                CREATE TABLE idempotency_keys (
                    scope TEXT NOT NULL,
                    key TEXT NOT NULL,
                    operation TEXT NOT NULL,
                    fingerprint BLOB NOT NULL,
                    result TEXT NOT NULL,
                    created_at INTEGER NOT NULL,
                    PRIMARY KEY (scope, key)
                ) STRICT
                """,
                "CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)",
                """
                CREATE TABLE rewrap_jobs (
                    tenant_id TEXT PRIMARY KEY REFERENCES tenants (id),
                    target_version INTEGER NOT NULL,
                    state TEXT NOT NULL CHECK (state IN ('running', 'completed')),
                    cursor TEXT NULL,
                    moved INTEGER NOT NULL,
                    total INTEGER NOT NULL,
                    started_at INTEGER NOT NULL,
                    updated_at INTEGER NOT NULL
                ) STRICT
                """,
                """
                CREATE TABLE audit_log (
                    seq INTEGER PRIMARY KEY,
                    time INTEGER NOT NULL,
                    principal TEXT NOT NULL,
                    tenant_id TEXT NULL,
                    operation TEXT NOT NULL,
                    key_ids TEXT NOT NULL,
                    outcome TEXT NOT NULL,
                    request_id TEXT NOT NULL,
                    detail TEXT NOT NULL,
                    prev_hash BLOB NOT NULL,
                    hash BLOB NOT NULL
                ) STRICT
                """,
                "CREATE INDEX audit_log_tenant_seq ON audit_log (tenant_id, seq)",
                """
                CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
                BEGIN
                    SELECT RAISE(ABORT, 'audit_log is append-only');
                END
                """,
                """
                CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
                BEGIN
                    SELECT RAISE(ABORT, 'audit_log is append-only');
                END
                """,
                """
                CREATE TABLE audit_head (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    seq INTEGER NOT NULL,
                    hash BLOB NOT NULL
                ) STRICT
                """,
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32))",
            ]
        ),
        // Principals, their role bindings and API tokens (only SHA-256 hashes of the tokens). A
        // binding's scope is `*` or a tenant id, so it has no foreign key to `tenants`; the key
        // service checks the tenant when it grants.
        Migration(
            version: 2,
            name: "principals, role bindings and API tokens",
            statements: [
                """
                CREATE TABLE principals (
                    name TEXT PRIMARY KEY,
                    certificate_common_name TEXT NULL UNIQUE,
                    disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
                    created_at INTEGER NOT NULL
                ) STRICT
                """,
                """
                CREATE TABLE role_bindings (
                    principal TEXT NOT NULL REFERENCES principals (name),
                    scope TEXT NOT NULL,
                    role TEXT NOT NULL CHECK (role IN ('admin', 'key-user', 'decrypt-only')),
                    PRIMARY KEY (principal, scope, role)
                ) STRICT
                """,
                "CREATE INDEX role_bindings_scope ON role_bindings (scope)",
                """
                CREATE TABLE api_tokens (
                    id TEXT PRIMARY KEY,
                    principal TEXT NOT NULL REFERENCES principals (name),
                    hash BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
                    description TEXT NOT NULL,
                    created_at INTEGER NOT NULL,
                    expires_at INTEGER NULL,
                    revoked_at INTEGER NULL
                ) STRICT
                """,
                "CREATE INDEX api_tokens_principal_id ON api_tokens (principal, id)",
            ]
        ),
        // The `destroying` state of a master-key version, and the audit chain's anchor in the HSM
        // (the head row carries the checkpoint of the head; kept checkpoints go to an append-only
        // history). SQLite cannot change a CHECK in place, so `master_key_versions` is rebuilt:
        // its rows are set aside, the table is dropped and created again, and the rows put back.
        // Dropping it orphans `data_keys` rows for a moment; with deferred foreign keys that is
        // checked at commit, when every row has its version again.
        Migration(
            version: 3,
            name: "destroying state and audit anchor",
            statements: [
                "PRAGMA defer_foreign_keys = ON",
                "CREATE TEMP TABLE master_key_versions_v2 AS SELECT * FROM master_key_versions",
                "DROP TABLE master_key_versions",
                """
                CREATE TABLE master_key_versions (
                    tenant_id TEXT NOT NULL REFERENCES tenants (id),
                    version INTEGER NOT NULL CHECK (version > 0),
                    state TEXT NOT NULL CHECK (
                        state IN (
                            'pre-active', 'active', 'suspended', 'deactivated', 'compromised', 'destroying', 'destroyed'
                        )
                    ),
                    token_key_id BLOB NOT NULL UNIQUE,
                    invocations_reserved INTEGER NOT NULL DEFAULT 0 CHECK (invocations_reserved >= 0),
                    created_at INTEGER NOT NULL,
                    updated_at INTEGER NOT NULL,
                    destroy_after INTEGER NULL,
                    destroyed_at INTEGER NULL,
                    PRIMARY KEY (tenant_id, version)
                ) STRICT
                """,
                """
                INSERT INTO master_key_versions (
                    tenant_id, version, state, token_key_id, invocations_reserved, created_at, updated_at,
                    destroy_after, destroyed_at
                )
                SELECT tenant_id, version, state, token_key_id, invocations_reserved, created_at, updated_at,
                    destroy_after, destroyed_at
                FROM temp.master_key_versions_v2
                """,
                "DROP TABLE temp.master_key_versions_v2",
                """
                CREATE INDEX master_key_versions_destroy_after ON master_key_versions (destroy_after)
                    WHERE destroy_after IS NOT NULL
                """,
                "ALTER TABLE audit_head ADD COLUMN anchor_key_id BLOB NULL",
                "ALTER TABLE audit_head ADD COLUMN anchor_mac BLOB NULL",
                "ALTER TABLE audit_head ADD COLUMN anchor_time INTEGER NULL",
                """
                CREATE TABLE audit_checkpoints (
                    seq INTEGER PRIMARY KEY,
                    hash BLOB NOT NULL,
                    key_id BLOB NOT NULL,
                    mac BLOB NOT NULL,
                    time INTEGER NOT NULL
                ) STRICT
                """,
                """
                CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
                BEGIN
                    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
                END
                """,
                """
                CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
                BEGIN
                    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
                END
                """,
            ]
        ),
    ]

    /// The version a fully migrated database has.
    static var latestVersion: Int { migrations.last?.version ?? 0 }
}
