import Foundation
import KeyHierarchy
import Logging
import NIOSSL
import PostgresNIO
import Synchronization

/// The key repository on PostgreSQL: the production store, shared by several gateway instances.
///
/// A pool of connections (postgres-nio's `PostgresClient`, run by a task the store owns). Each
/// `transaction` is one pooled connection between `BEGIN` and `COMMIT`; `read` runs its statements
/// on a pooled connection without a transaction (each sees committed data). Commits are durable
/// when they return: `open` refuses a server, database or role with `fsync` or
/// `synchronous_commit` off.
///
/// Bound values (wrapped keys, hashes, ids) are never logged and never put in errors.
public final class PostgresKeyStore: KeyRepository {
    /// How long `open` waits for the first connection (TCP connect, TLS, start-up and login)
    /// before failing with `.unavailable`: a gateway that cannot reach its database should say so
    /// at start-up, not hang. Also the pool's connect timeout for later connections.
    public static let connectTimeout: Duration = .seconds(5)

    /// How long `open` waits for another instance that is applying migrations (building an index
    /// on millions of rows takes minutes) before failing with `.conflict`.
    public static let migrationLockTimeout: Duration = .seconds(600)

    /// The advisory-lock key that serialises migrations across gateway instances ("hsmgwmig").
    static let migrationLockKey: Int64 = 0x6873_6D67_776D_6967

    /// The pool, replaced after an outage, and whether the server can be reached.
    private let pool: PostgresPool
    let logger: Logger
    /// Opens a connection outside the pool, for the change listener (`followChanges`).
    let makeDedicatedConnection: @Sendable () async throws -> PostgresConnection
    private let isClosed = Atomic<Bool>(false)
    private let statements = StatementCounter()

    public var statementsRun: Int? { statements.value }

    private init(
        pool: PostgresPool,
        logger: Logger,
        makeDedicatedConnection: @escaping @Sendable () async throws -> PostgresConnection
    ) {
        self.pool = pool
        self.logger = logger
        self.makeDedicatedConnection = makeDedicatedConnection
    }

    /// Whether the store's monitor last found the server reachable (calls fail at once with
    /// `.unavailable` while it does not).
    public var isReachable: Bool { pool.isReachable }

    /// The index, in `configuration.servers` (`host` first, then `failoverServers`), of the server
    /// the pool connects to now: the one that last accepted writes.
    public var currentServer: Int { pool.server }

    /// How many times the connection pool was replaced after the server could not be reached.
    public var poolGeneration: Int { pool.generation }

    /// Connects (pool), applies pending migrations under an advisory lock (several gateway
    /// instances may start at once), records them.
    ///
    /// Throws `StorageError(.unavailable)` within `connectTimeout` when the server cannot be
    /// reached or refuses the login, and `StorageError(.other)` for a configuration outside its
    /// limits, a server with `fsync` or `synchronous_commit` off, or a database migrated by a
    /// newer gateway.
    public static func open(
        _ configuration: PostgresKeyStoreConfiguration,
        logger: Logger = Logger(label: "hsm-gateway.postgres")
    ) async throws -> PostgresKeyStore {
        guard PostgresKeyStoreConfiguration.maximumConnectionsRange.contains(configuration.maximumConnections) else {
            throw StorageError(
                .other,
                "maximumConnections must be in \(PostgresKeyStoreConfiguration.maximumConnectionsRange), "
                    + "not \(configuration.maximumConnections)"
            )
        }
        guard configuration.servers.count <= PostgresKeyStoreConfiguration.maximumServers else {
            throw StorageError(
                .other,
                "at most \(PostgresKeyStoreConfiguration.maximumServers) servers, not \(configuration.servers.count)")
        }
        guard configuration.unixSocketPath == nil || configuration.failoverServers.isEmpty else {
            throw StorageError(.other, "failover servers need TCP, not a Unix socket")
        }
        guard (configuration.applicationName?.utf8.count ?? 0) <= 63 else {
            throw StorageError(.other, "applicationName is longer than PostgreSQL's 63 bytes")
        }
        let tls = try tlsSetup(configuration)
        let (connection, server) = try await connectToPrimary(configuration, tls: tls, logger: logger)
        do {
            try await checkDurability(connection, configuration: configuration, logger: logger)
            try await migrate(connection, logger: logger)
        } catch {
            try? await connection.close()
            throw PostgresErrorMapping.storageError(error, operation: "migrate")
        }

        let pool = PostgresPool(
            server: server,
            describe: { configuration.endpointDescription(server: $0) },
            makeClient: { server in
                PostgresClient(
                    configuration: clientConfiguration(configuration, server: server, tls: tls),
                    backgroundLogger: logger)
            },
            probe: { try await connectToPrimary(configuration, tls: tls, logger: logger, probing: true) },
            logger: logger
        )
        // The connection that migrated becomes the monitor's.
        pool.startMonitor(with: connection)
        let store = PostgresKeyStore(
            pool: pool, logger: logger,
            makeDedicatedConnection: {
                try await connectToPrimary(configuration, tls: tls, logger: logger, probing: true).0
            })
        logger.info(
            "postgres key store open",
            metadata: [
                "endpoint": "\(configuration.endpointDescription(server: server))",
                "pool": "\(configuration.maximumConnections)",
                "schema": "\(Migrations.latestVersion)",
            ]
        )
        return store
    }

    // MARK: KeyRepository

    /// Runs `body` between `BEGIN` and `COMMIT` on one pooled connection; a throwing body is
    /// rolled back and its error rethrown unchanged. A statement that failed inside the body
    /// without a savepoint around it makes the commit fail too (PostgreSQL would roll back).
    public func transaction<T: Sendable>(
        _ body: (any KeyRepositoryTransaction) async throws -> T
    ) async throws -> T {
        try requireOpen()
        return try await withLeasedConnection(operation: "transaction") { connection in
            let transaction = PostgresTransaction(
                connection: connection, logger: logger, mode: .readWrite, statements: statements)
            try await transaction.begin()
            let value: T
            do {
                value = try await body(transaction)
            } catch {
                await transaction.rollback()
                throw error
            }
            try await transaction.commit()
            return value
        }
    }

    /// Runs `body` on one pooled connection without a transaction: each statement sees what is
    /// committed when it runs. Writes and row locks throw `StorageError(.other)`.
    public func read<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        try requireOpen()
        return try await withLeasedConnection(operation: "read") { connection in
            let transaction = PostgresTransaction(
                connection: connection, logger: logger, mode: .readOnly, statements: statements)
            defer { transaction.finish() }
            return try await body(transaction)
        }
    }

    /// Runs `body` in one `REPEATABLE READ READ ONLY` transaction: every statement sees the same
    /// snapshot, whatever other connections commit meanwhile (a consistent backup of a store in
    /// use). Writes and row locks throw `StorageError(.other)`; nothing is committed.
    public func snapshot<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        try requireOpen()
        return try await withLeasedConnection(operation: "snapshot") { connection in
            let transaction = PostgresTransaction(
                connection: connection, logger: logger, mode: .readOnly, statements: statements)
            try await transaction.beginSnapshot()
            let value: T
            do {
                value = try await body(transaction)
            } catch {
                await transaction.rollback()
                throw error
            }
            await transaction.rollback()
            return value
        }
    }

    /// Write transactions run side by side on the pool's connections.
    public var concurrentWriteTransactions: Bool { true }

    /// Cancels the pool's task and waits for it: connections close; later calls throw
    /// `StorageError(.unavailable)`.
    public func close() async {
        guard isClosed.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
        else { return }
        await pool.close()
        logger.info("postgres key store closed")
    }

    // MARK: Tools

    /// Migrations in order; `schemaVersion()` returns the highest applied.
    public func schemaVersion() async throws -> Int {
        try requireOpen()
        return try await withLeasedConnection(operation: "schemaVersion") { connection in
            let rows = try await Self.query(
                connection,
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                logger: logger,
                operation: "schemaVersion"
            )
            return try Self.decode(rows.first, as: Int.self, operation: "schemaVersion")
        }
    }

    /// For tests and repair tools only, never with caller input: runs one SQL statement.
    public func executeUnsafeSQL(_ sql: String) async throws {
        try requireOpen()
        try await withLeasedConnection(operation: "executeUnsafeSQL") { connection in
            _ = try await Self.query(
                connection,
                PostgresQuery(unsafeSQL: sql),
                logger: logger,
                operation: "executeUnsafeSQL"
            )
        }
    }

    // MARK: Internals

    private func requireOpen() throws {
        if isClosed.load(ordering: .sequentiallyConsistent) {
            throw StorageError(.unavailable, "the postgres key store is closed")
        }
    }

    /// Marks errors thrown by the caller's body, so they pass through unchanged while anything
    /// else from the lease (pool closed, circuit breaker open) becomes a `StorageError`.
    private struct BodyError: Error {
        let error: any Error
    }

    func withLeasedConnection<T: Sendable>(
        operation: String,
        _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        // While the server cannot be reached this throws `.unavailable` at once.
        let lease = try pool.beginLease()
        defer { pool.ended(lease) }
        do {
            return try await lease.client.withConnection { connection in
                pool.granted(lease)
                do {
                    return try await body(connection)
                } catch {
                    throw BodyError(error: error)
                }
            }
        } catch let error as BodyError {
            throw error.error
        } catch {
            let mapped = PostgresErrorMapping.storageError(error, operation: operation)
            logger.warning("postgres connection lease failed", metadata: ["error": "\(mapped.detail)"])
            throw mapped
        }
    }

    /// Runs one statement outside a `PostgresTransaction`, mapping errors.
    static func query(
        _ connection: PostgresConnection,
        _ query: PostgresQuery,
        logger: Logger,
        operation: String
    ) async throws -> PostgresQueryResult {
        do {
            let future: EventLoopFuture<PostgresQueryResult> = connection.query(query, logger: logger)
            return try await future.get()
        } catch {
            throw PostgresErrorMapping.storageError(error, operation: operation)
        }
    }

    static func decode<Value: PostgresDecodable>(
        _ row: PostgresRow?,
        as type: Value.Type,
        operation: String
    ) throws -> Value {
        guard let row else { throw StorageError(.corrupt, "\(operation): no row returned") }
        do {
            return try row.decode(Value.self)
        } catch {
            throw PostgresErrorMapping.storageError(error, operation: operation)
        }
    }

    // MARK: Opening

    /// What `verifyFull` makes: the configuration the pool takes, the context a single connection
    /// takes (loaded once, so an unreadable CA file fails `open` with its own message), and the
    /// name to verify.
    private struct TLSSetup {
        let configuration: TLSConfiguration
        let context: NIOSSLContext
        let serverName: String?
    }

    /// The TLS setup for `configuration.tls`; nil for `.disable`.
    private static func tlsSetup(_ configuration: PostgresKeyStoreConfiguration) throws -> TLSSetup? {
        guard case .verifyFull(let caFile, let serverName) = configuration.tls else { return nil }
        guard configuration.unixSocketPath == nil else {
            throw StorageError(.other, "TLS is for TCP connections; a Unix socket does not use it")
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = .fullVerification
        if let caFile {
            tls.trustRoots = .file(caFile)
        }
        do {
            return TLSSetup(configuration: tls, context: try NIOSSLContext(configuration: tls), serverName: serverName)
        } catch {
            throw StorageError(
                .other, "TLS: cannot load the CA certificates \(caFile ?? "of the system") (PEM expected)")
        }
    }

    /// One connection, logged in, within `connectTimeout`. `quiet` leaves failures unlogged (the
    /// monitor tries every few hundred milliseconds during an outage and logs state changes).
    private static func connect(
        _ configuration: PostgresKeyStoreConfiguration,
        server: Int = 0,
        tls: TLSSetup?,
        logger: Logger,
        quiet: Bool = false
    ) async throws -> PostgresConnection {
        let target = configuration.servers[server]
        var connectionConfiguration =
            if let path = configuration.unixSocketPath {
                PostgresConnection.Configuration(
                    unixSocketPath: path,
                    username: configuration.username,
                    password: configuration.password,
                    database: configuration.database
                )
            } else {
                PostgresConnection.Configuration(
                    host: target.host,
                    port: target.port,
                    username: configuration.username,
                    password: configuration.password,
                    database: configuration.database,
                    tls: tls.map { .require($0.context) } ?? .disable
                )
            }
        connectionConfiguration.options.connectTimeout = .init(connectTimeout)
        if let name = configuration.applicationName {
            connectionConfiguration.options.additionalStartupParameters = [("application_name", name)]
        }
        connectionConfiguration.options.tlsServerName = tls?.serverName
        let endpoint = configuration.endpointDescription(server: server)
        let finalConfiguration = connectionConfiguration
        do {
            // The connect timeout bounds the TCP handshake only; the race bounds the login too (a
            // server that accepts and then says nothing).
            return try await withThrowingTaskGroup(of: PostgresConnection?.self) { group in
                group.addTask {
                    try await PostgresConnection.connect(
                        configuration: finalConfiguration,
                        id: 0,
                        logger: logger
                    )
                }
                group.addTask {
                    try await Task.sleep(for: connectTimeout)
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let connection = first else {
                    throw StorageError(.unavailable, "no connection to \(endpoint) within \(connectTimeout)")
                }
                return connection
            }
        } catch {
            var mapped = PostgresErrorMapping.storageError(error, operation: "connect to \(endpoint)")
            if mapped.kind == .other, !(error is StorageError) {
                // Anything that stops the first login (protocol, TLS, authentication) means the
                // database is not available to us.
                mapped = StorageError(.unavailable, mapped.detail)
            }
            if !quiet { logger.error("cannot connect to postgres", metadata: ["error": "\(mapped.detail)"]) }
            throw mapped
        }
    }

    /// The pool's settings for `servers[server]`.
    private static func clientConfiguration(
        _ configuration: PostgresKeyStoreConfiguration, server: Int, tls: TLSSetup?
    ) -> PostgresClient.Configuration {
        var options = PostgresClient.Configuration.Options()
        options.maximumConnections = configuration.maximumConnections
        options.minimumConnections = 0
        options.connectTimeout = connectTimeout
        options.tlsServerName = tls?.serverName
        if let name = configuration.applicationName {
            options.additionalStartupParameters = [("application_name", name)]
        }
        var clientConfiguration: PostgresClient.Configuration
        if let path = configuration.unixSocketPath {
            clientConfiguration = PostgresClient.Configuration(
                unixSocketPath: path,
                username: configuration.username,
                password: configuration.password,
                database: configuration.database
            )
        } else {
            let target = configuration.servers[server]
            clientConfiguration = PostgresClient.Configuration(
                host: target.host,
                port: target.port,
                username: configuration.username,
                password: configuration.password,
                database: configuration.database,
                tls: tls.map { .require($0.configuration) } ?? .disable
            )
        }
        clientConfiguration.options = options
        return clientConfiguration
    }

    /// One connection to the first server, in the configured order, that accepts writes (is not
    /// in recovery: a standby answers logins but refuses every write), and that server's index.
    ///
    /// When `probing` (the pool's monitor), each server gets `PostgresPool.probeConnectTimeout`
    /// and failures are not logged; a server that does not answer in time makes the whole probe
    /// inconclusive (`PostgresPool.ProbeTimeout`) unless a later one accepts writes, since a
    /// slow primary is not a gone one. Throws `.unavailable` naming every server's answer when
    /// none accepts writes.
    private static func connectToPrimary(
        _ configuration: PostgresKeyStoreConfiguration,
        tls: TLSSetup?,
        logger: Logger,
        probing: Bool = false
    ) async throws -> (PostgresConnection, Int) {
        var answers: [String] = []
        var timedOut = false
        for server in configuration.servers.indices {
            let endpoint = configuration.servers.count == 1 ? "" : "\(configuration.servers[server]): "
            let connection: PostgresConnection
            do {
                if probing {
                    let late: @Sendable (PostgresConnection) async -> Void = { try? await $0.close() }
                    connection = try await PostgresPool.withTimeout(PostgresPool.probeConnectTimeout, late: late) {
                        try await connect(configuration, server: server, tls: tls, logger: logger, quiet: true)
                    }
                } else {
                    connection = try await connect(
                        configuration, server: server, tls: tls, logger: logger,
                        quiet: configuration.servers.count > 1)
                }
            } catch is PostgresPool.ProbeTimeout {
                timedOut = true
                answers.append("\(endpoint)no answer within \(PostgresPool.probeConnectTimeout)")
                continue
            } catch let error as StorageError {
                answers.append("\(endpoint)\(error.detail)")
                continue
            }
            do {
                let inRecovery = try await PostgresPool.withTimeout(PostgresPool.pingTimeout) {
                    try await isInRecovery(connection, logger: logger)
                }
                if !inRecovery { return (connection, server) }
                answers.append("\(endpoint)a standby (in recovery), which accepts no writes")
            } catch is PostgresPool.ProbeTimeout {
                timedOut = true
                answers.append("\(endpoint)no answer within \(PostgresPool.pingTimeout)")
            } catch {
                answers.append(
                    "\(endpoint)\(PostgresErrorMapping.storageError(error, operation: "recovery check").detail)")
            }
            Task { try? await connection.close() }
        }
        if probing, timedOut { throw PostgresPool.ProbeTimeout() }
        let failure = StorageError(
            .unavailable,
            configuration.servers.count == 1
                ? answers.joined() : "no server accepts writes: " + answers.joined(separator: "; "))
        if !probing, configuration.servers.count > 1 {
            logger.error("cannot connect to postgres", metadata: ["error": "\(failure.detail)"])
        }
        throw failure
    }

    /// Whether the server on `connection` is a standby (in recovery): it then accepts no writes.
    static func isInRecovery(_ connection: PostgresConnection, logger: Logger) async throws -> Bool {
        let rows = try await connection.query("SELECT pg_is_in_recovery()", logger: logger).get()
        guard let row = rows.first else { throw StorageError(.corrupt, "recovery check: no row") }
        return try row.decode(Bool.self)
    }

    /// Refuses a server that would acknowledge commits it can lose (`fsync` or
    /// `synchronous_commit` off, for the server, the database or the role): a data key id handed
    /// to a caller must survive a crash. With standbys (streaming from this server now, or named
    /// in `failoverServers`), a commit must also survive a failover: `synchronous_commit` `on` or
    /// `remote_apply` with `synchronous_standby_names` set; otherwise `standbyDurability` says
    /// whether to refuse or to warn.
    private static func checkDurability(
        _ connection: PostgresConnection, configuration: PostgresKeyStoreConfiguration, logger: Logger
    ) async throws {
        let rows = try await query(
            connection,
            """
            SELECT current_setting('fsync'), current_setting('synchronous_commit'),
                   current_setting('synchronous_standby_names'), (SELECT count(*) FROM pg_stat_replication)
            """,
            logger: logger,
            operation: "durability check"
        )
        guard let row = rows.first else { throw StorageError(.corrupt, "durability check: no row") }
        let (fsync, synchronousCommit, standbyNames, standbys) = try decodeRow(
            row, as: (String, String, String, Int64).self, operation: "durability check")
        guard fsync == "on", synchronousCommit != "off" else {
            throw StorageError(
                .other,
                "the server acknowledges commits it can lose (fsync=\(fsync), synchronous_commit="
                    + "\(synchronousCommit)): turn both on"
            )
        }
        guard standbys > 0 || !configuration.failoverServers.isEmpty else { return }
        let survivesFailover =
            ["on", "remote_apply"].contains(synchronousCommit)
            && !standbyNames.trimmingCharacters(in: .whitespaces).isEmpty
        guard !survivesFailover else { return }
        let problem =
            "a commit acknowledged by this server may be lost in a failover to a standby "
            + "(synchronous_commit=\(synchronousCommit), synchronous_standby_names='\(standbyNames)', "
            + "\(standbys) standby(s) streaming): set synchronous_standby_names, and synchronous_commit "
            + "to on or remote_apply"
        switch configuration.standbyDurability {
        case .refuse:
            throw StorageError(.other, problem + " (store.postgres.standby_durability is refuse)")
        case .warn:
            logger.warning("\(problem)", metadata: ["standby_durability": "warn"])
        }
    }

    /// Applies pending migrations, one transaction each, while holding a session advisory lock
    /// (released by `pg_advisory_unlock`, or by the server if the connection drops).
    private static func migrate(_ connection: PostgresConnection, logger: Logger) async throws {
        func run(_ query: PostgresQuery, _ operation: String) async throws -> PostgresQueryResult {
            try await Self.query(connection, query, logger: logger, operation: operation)
        }
        let lockTimeout = "\(migrationLockTimeout.components.seconds)s"
        _ = try await run("SET lock_timeout = \(unescaped: "'\(lockTimeout)'")", "migrate: lock_timeout")
        _ = try await run("SELECT pg_advisory_lock(\(migrationLockKey))", "migrate: lock")
        _ = try await run("RESET lock_timeout", "migrate: lock_timeout")
        do {
            _ = try await run(PostgresQuery(unsafeSQL: Migrations.createMigrationsTable), "migrate: bootstrap")
            let rows = try await run("SELECT version, name FROM schema_migrations ORDER BY version", "migrate: list")
            var applied: [Int: String] = [:]
            for row in rows {
                let (version, name) = try decodeRow(row, as: (Int, String).self, operation: "migrate: list")
                applied[version] = name
            }
            if let newest = applied.keys.max(), newest > Migrations.latestVersion {
                throw StorageError(
                    .other,
                    "the database schema is at version \(newest), newer than this gateway's "
                        + "\(Migrations.latestVersion): upgrade the gateway"
                )
            }
            for migration in Migrations.all {
                if let name = applied[migration.version] {
                    guard name == migration.name else {
                        throw StorageError(
                            .corrupt,
                            "schema_migrations records version \(migration.version) as '\(name)', "
                                + "this gateway knows it as '\(migration.name)'"
                        )
                    }
                    continue
                }
                try await apply(migration, connection: connection, logger: logger)
            }
            _ = try await run("SELECT pg_advisory_unlock(\(migrationLockKey))", "migrate: unlock")
        } catch {
            _ = try? await run("SELECT pg_advisory_unlock(\(migrationLockKey))", "migrate: unlock")
            throw error
        }
    }

    private static func apply(_ migration: Migration, connection: PostgresConnection, logger: Logger) async throws {
        let operation = "migration \(migration.version)"
        _ = try await query(connection, "BEGIN", logger: logger, operation: operation)
        do {
            for statement in migration.statements {
                _ = try await query(
                    connection, PostgresQuery(unsafeSQL: statement), logger: logger, operation: operation)
            }
            let now = Timestamp.now().millisecondsSinceEpoch
            _ = try await query(
                connection,
                """
                INSERT INTO schema_migrations (version, name, applied_at) \
                VALUES (\(migration.version), \(migration.name), \(now))
                """,
                logger: logger,
                operation: operation
            )
            _ = try await query(connection, "COMMIT", logger: logger, operation: operation)
        } catch {
            _ = try? await query(connection, "ROLLBACK", logger: logger, operation: operation)
            throw error
        }
        logger.notice(
            "applied schema migration",
            metadata: ["version": "\(migration.version)", "name": "\(migration.name)"]
        )
    }
}

/// Decodes a whole row as a tuple, mapping decoding failures to `StorageError(.corrupt)`.
func decodeRow<each Column: PostgresDecodable>(
    _ row: PostgresRow,
    as type: (repeat each Column).Type,
    operation: String
) throws -> (repeat each Column) {
    do {
        return try row.decode(type, context: .default)
    } catch {
        throw PostgresErrorMapping.storageError(error, operation: operation)
    }
}
