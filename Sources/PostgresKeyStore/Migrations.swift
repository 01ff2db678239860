/// One schema change: applied once, in one transaction, and recorded in `schema_migrations`.
///
/// Statements are separate because PostgreSQL's extended query protocol (what postgres-nio
/// speaks) runs one statement per query. Never edit a released migration: add a new one.
struct Migration: Sendable {
    /// 1, 2, 3, ... in the order they are applied.
    let version: Int
    /// A short description, recorded next to the version.
    let name: String
    /// The statements, run in order inside the migration's transaction.
    let statements: [String]
}

/// The schema's history. The table and column names are shared with the SQLite store.
///
/// Tenant ids are `COLLATE "C"` so that `ORDER BY id` (and keyset paging) is byte order whatever
/// the cluster's locale, the same order as SQLite's and as `TenantID`'s `<`.
enum Migrations {
    /// Every migration, in order.
    static let all: [Migration] = [initialSchema, accessControl, destroyingAndAuditAnchor, changeNotifications, leases]

    /// The highest version this build knows.
    static var latestVersion: Int { all.last?.version ?? 0 }

    /// Created before any migration runs, outside the numbered list.
    static let createMigrationsTable = """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version INT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )
        """

    static let initialSchema = Migration(
        version: 1,
        name: "initial schema",
        statements: [
            """
            CREATE TABLE tenants (
                id TEXT COLLATE "C" PRIMARY KEY,
                state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'shredded')),
                primary_version INT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE master_key_versions (
                tenant_id TEXT COLLATE "C" NOT NULL REFERENCES tenants (id),
                version INT NOT NULL CHECK (version > 0),
                state TEXT NOT NULL CHECK (
                    state IN ('pre-active', 'active', 'suspended', 'deactivated', 'compromised', 'destroyed')
                ),
                token_key_id BYTEA NOT NULL UNIQUE,
                invocations_reserved BIGINT NOT NULL DEFAULT 0 CHECK (invocations_reserved >= 0),
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                destroy_after BIGINT NULL,
                destroyed_at BIGINT NULL,
                PRIMARY KEY (tenant_id, version)
            )
            """,
            """
            CREATE INDEX master_key_versions_destroy_after ON master_key_versions (destroy_after)
                WHERE destroy_after IS NOT NULL
            """,
            """
            CREATE TABLE data_keys (
                tenant_id TEXT COLLATE "C" NOT NULL,
                id UUID NOT NULL UNIQUE,
                version INT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'destroyed')),
                wrapped BYTEA NULL,
                context_hash BYTEA NOT NULL,
                encryptions BIGINT NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (tenant_id, id),
                FOREIGN KEY (tenant_id, version) REFERENCES master_key_versions (tenant_id, version),
                CHECK ((state = 'destroyed') = (wrapped IS NULL))
            )
            """,
            "CREATE INDEX data_keys_tenant_state ON data_keys (tenant_id, state, id)",
            "CREATE INDEX data_keys_tenant_version ON data_keys (tenant_id, version, id)",
            """
            CREATE TABLE idempotency_keys (
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                operation TEXT NOT NULL,
                fingerprint BYTEA NOT NULL,
                result TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (scope, key)
            )
            """,
            "CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)",
            """
            CREATE TABLE rewrap_jobs (
                tenant_id TEXT COLLATE "C" PRIMARY KEY REFERENCES tenants (id),
                target_version INT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('running', 'completed')),
                cursor UUID NULL,
                moved BIGINT NOT NULL,
                total BIGINT NOT NULL,
                started_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE audit_log (
                seq BIGINT PRIMARY KEY,
                time BIGINT NOT NULL,
                principal TEXT NOT NULL,
                tenant_id TEXT COLLATE "C" NULL,
                operation TEXT NOT NULL,
                key_ids TEXT NOT NULL,
                outcome TEXT NOT NULL,
                request_id TEXT NOT NULL,
                detail TEXT NOT NULL,
                prev_hash BYTEA NOT NULL,
                hash BYTEA NOT NULL
            )
            """,
            "CREATE INDEX audit_log_tenant_seq ON audit_log (tenant_id, seq)",
            """
            CREATE TABLE audit_head (
                id INT PRIMARY KEY CHECK (id = 1),
                seq BIGINT NOT NULL,
                hash BYTEA NOT NULL
            )
            """,
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'))",
            // Append-only: the hash chain detects edits, the triggers refuse them in the first place.
            """
            CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$
            """,
            """
            CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
                FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change()
            """,
            """
            CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
                FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change()
            """,
            """
            CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
                FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()
            """,
        ]
    )

    /// Principals, their role bindings and API tokens (only SHA-256 hashes of the tokens).
    /// Names, scopes and ids are `COLLATE "C"` for byte-order paging, like tenant ids. A binding's
    /// scope is `*` or a tenant id, so it has no foreign key to `tenants`; the key service checks
    /// the tenant when it grants.
    static let accessControl = Migration(
        version: 2,
        name: "principals, role bindings and API tokens",
        statements: [
            """
            CREATE TABLE principals (
                name TEXT COLLATE "C" PRIMARY KEY,
                certificate_common_name TEXT COLLATE "C" NULL UNIQUE,
                disabled BOOLEAN NOT NULL DEFAULT false,
                created_at BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE role_bindings (
                principal TEXT COLLATE "C" NOT NULL REFERENCES principals (name),
                scope TEXT COLLATE "C" NOT NULL,
                role TEXT COLLATE "C" NOT NULL CHECK (role IN ('admin', 'key-user', 'decrypt-only')),
                PRIMARY KEY (principal, scope, role)
            )
            """,
            "CREATE INDEX role_bindings_scope ON role_bindings (scope)",
            """
            CREATE TABLE api_tokens (
                id TEXT COLLATE "C" PRIMARY KEY,
                principal TEXT COLLATE "C" NOT NULL REFERENCES principals (name),
                hash BYTEA NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
                description TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NULL,
                revoked_at BIGINT NULL
            )
            """,
            "CREATE INDEX api_tokens_principal_id ON api_tokens (principal, id)",
        ]
    )

    /// The `destroying` state of a master-key version (due destruction checked and begun, the
    /// token object not destroyed yet), and the audit chain's anchor in the HSM: the head row
    /// carries the checkpoint (HMAC) of the head, and kept checkpoints go to an append-only history.
    static let destroyingAndAuditAnchor = Migration(
        version: 3,
        name: "destroying state and audit anchor",
        statements: [
            "ALTER TABLE master_key_versions DROP CONSTRAINT master_key_versions_state_check",
            """
            ALTER TABLE master_key_versions ADD CONSTRAINT master_key_versions_state_check CHECK (
                state IN ('pre-active', 'active', 'suspended', 'deactivated', 'compromised', 'destroying', 'destroyed')
            )
            """,
            """
            ALTER TABLE audit_head ADD COLUMN anchor_key_id BYTEA NULL, ADD COLUMN anchor_mac BYTEA NULL,
                ADD COLUMN anchor_time BIGINT NULL,
                ADD CONSTRAINT audit_head_anchor_complete CHECK (
                    (anchor_key_id IS NULL) = (anchor_mac IS NULL) AND (anchor_mac IS NULL) = (anchor_time IS NULL)
                )
            """,
            """
            CREATE TABLE audit_checkpoints (
                seq BIGINT PRIMARY KEY,
                hash BYTEA NOT NULL,
                key_id BYTEA NOT NULL,
                mac BYTEA NOT NULL,
                time BIGINT NOT NULL
            )
            """,
            """
            CREATE FUNCTION audit_checkpoints_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_checkpoints is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$
            """,
            """
            CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
                FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_refuse_change()
            """,
            """
            CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
                FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_refuse_change()
            """,
            """
            CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
                FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_refuse_change()
            """,
        ]
    )

    /// Change notifications for the other gateway instances (PostgreSQL only; SQLite is one node):
    /// a write that changes what an instance caches (a tenant's state or primary version, a
    /// master-key version's state, a principal, its role bindings, an API token) sends
    /// `NOTIFY hsmgw_changes` from a trigger, so it is in the writer's own transaction and is
    /// delivered when, and only if, it commits. The payload is a kind and a name (`tenant:acme`,
    /// `principal:app`, `token:<token id>`), never a secret. Counter updates (a version's
    /// reserved invocations, a tenant's `updated_at`) send nothing: the `WHEN` clauses keep the
    /// hot write path free of notifications.
    static let changeNotifications = Migration(
        version: 4,
        name: "change notifications",
        statements: [
            """
            CREATE FUNCTION hsmgw_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                item record;
            BEGIN
                IF TG_OP = 'DELETE' THEN item := OLD; ELSE item := NEW; END IF;
                CASE TG_TABLE_NAME
                    WHEN 'tenants' THEN PERFORM pg_notify('hsmgw_changes', 'tenant:' || item.id);
                    WHEN 'master_key_versions' THEN PERFORM pg_notify('hsmgw_changes', 'tenant:' || item.tenant_id);
                    WHEN 'principals' THEN PERFORM pg_notify('hsmgw_changes', 'principal:' || item.name);
                    WHEN 'role_bindings' THEN PERFORM pg_notify('hsmgw_changes', 'principal:' || item.principal);
                    WHEN 'api_tokens' THEN PERFORM pg_notify('hsmgw_changes', 'token:' || item.id);
                END CASE;
                RETURN NULL;
            END
            $$
            """,
            """
            CREATE TRIGGER tenants_notify_insert_delete AFTER INSERT OR DELETE ON tenants
                FOR EACH ROW EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER tenants_notify_update AFTER UPDATE ON tenants
                FOR EACH ROW WHEN (
                    OLD.state IS DISTINCT FROM NEW.state OR OLD.primary_version IS DISTINCT FROM NEW.primary_version
                ) EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER master_key_versions_notify_insert_delete AFTER INSERT OR DELETE ON master_key_versions
                FOR EACH ROW EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER master_key_versions_notify_update AFTER UPDATE ON master_key_versions
                FOR EACH ROW WHEN (
                    OLD.state IS DISTINCT FROM NEW.state OR OLD.token_key_id IS DISTINCT FROM NEW.token_key_id
                ) EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER principals_notify AFTER INSERT OR UPDATE OR DELETE ON principals
                FOR EACH ROW EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER role_bindings_notify AFTER INSERT OR UPDATE OR DELETE ON role_bindings
                FOR EACH ROW EXECUTE FUNCTION hsmgw_notify_change()
            """,
            """
            CREATE TRIGGER api_tokens_notify AFTER UPDATE OR DELETE ON api_tokens
                FOR EACH ROW EXECUTE FUNCTION hsmgw_notify_change()
            """,
        ]
    )

    /// Leases for background work that must run on one instance at a time (rewrap jobs, scheduled
    /// destruction): who holds each, until when by the server's clock (so instances' clocks need
    /// not agree), and a fencing token that grows at every change of holder. A rewrap job started
    /// or restarted notifies `hsmgw_changes` (`job:<tenant>`), so the holder starts it at once. A
    /// running job's row is fenced: only the live holder's connections (`application_name` = the
    /// holder) may update it, in the same transaction as the keys the batch moved.
    static let leases = Migration(
        version: 5,
        name: "leases for background work",
        statements: [
            """
            CREATE TABLE leases (
                name TEXT COLLATE "C" PRIMARY KEY,
                holder TEXT NOT NULL,
                token BIGINT NOT NULL CHECK (token > 0),
                expires_at TIMESTAMPTZ NOT NULL
            )
            """,
            """
            CREATE FUNCTION hsmgw_notify_rewrap_job() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('hsmgw_changes', 'job:' || NEW.tenant_id);
                RETURN NULL;
            END
            $$
            """,
            """
            CREATE TRIGGER rewrap_jobs_notify_insert AFTER INSERT ON rewrap_jobs
                FOR EACH ROW WHEN (NEW.state = 'running') EXECUTE FUNCTION hsmgw_notify_rewrap_job()
            """,
            """
            CREATE TRIGGER rewrap_jobs_notify_update AFTER UPDATE ON rewrap_jobs
                FOR EACH ROW WHEN (NEW.state = 'running' AND OLD.state IS DISTINCT FROM NEW.state)
                EXECUTE FUNCTION hsmgw_notify_rewrap_job()
            """,
            // The fence: a running job's progress is written only by the connection whose
            // application_name is the background lease's live holder (or when no live lease
            // exists: tools, tests). The lease row is share-locked until the writer commits, so a
            // takeover waits for the batch in flight and then sees its progress.
            """
            CREATE FUNCTION hsmgw_fence_rewrap_job() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                lease_holder TEXT;
                live BOOLEAN;
            BEGIN
                IF OLD.state = 'running' THEN
                    SELECT holder, expires_at > clock_timestamp() INTO lease_holder, live
                        FROM leases WHERE name = 'background-work' FOR SHARE;
                    IF FOUND AND live AND lease_holder <> current_setting('application_name') THEN
                        RAISE EXCEPTION 'rewrap job progress refused: the background lease is held by another gateway'
                            USING ERRCODE = 'object_not_in_prerequisite_state';
                    END IF;
                END IF;
                RETURN NEW;
            END
            $$
            """,
            """
            CREATE TRIGGER rewrap_jobs_fence BEFORE UPDATE ON rewrap_jobs
                FOR EACH ROW EXECUTE FUNCTION hsmgw_fence_rewrap_job()
            """,
        ]
    )
}
