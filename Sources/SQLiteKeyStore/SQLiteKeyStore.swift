import KeyHierarchy
import Logging
import SQLiteNIO
import Synchronization

/// The key repository in one SQLite file: the gateway's embedded single-node default.
///
/// - One writer connection, leased FIFO to one `transaction` at a time (`BEGIN IMMEDIATE` ...
///   `COMMIT`); waiting tasks suspend, no thread blocks.
/// - A few reader connections for `read`; in WAL mode they read committed data while the writer
///   writes.
/// - WAL with `synchronous=FULL`: a `COMMIT` that returned is on disk and survives power loss.
/// - `foreign_keys=ON` on every connection; STRICT tables.
/// - The file, and the `-wal` and `-shm` files next to it, are mode 0600: they hold wrapped keys and
///   the audit log.
/// - Blocking SQLite calls run on the store's own threads, never on an event loop or Swift's
///   cooperative pool.
///
/// Call `close()` before dropping the store.
public final class SQLiteKeyStore: KeyRepository {
    // MARK: Limits

    /// Reader connections: every decrypt starts with a read, so reads are most of the traffic;
    /// four keep a burst of lookups (all callers refreshing after a rotation) from queueing behind
    /// one listing, at the cost of one thread each.
    public static let readerCount = 4
    /// How long a `transaction` waits for the writer before failing with `StorageError(.conflict)`:
    /// transactions take milliseconds, so a wait this long means a pile-up that callers should see
    /// as an error rather than as latency. Measured: 10 s was reached on a 2-core machine with
    /// the whole test suite running beside a burst of 160 concurrent callers.
    static let writerWaitTimeout: Duration = .seconds(30)
    /// How long a `read` waits for a reader connection, for the same reason.
    static let readerWaitTimeout: Duration = .seconds(30)
    /// The most tasks waiting for one kind of connection; beyond it callers fail at once with
    /// `StorageError(.unavailable)` instead of queueing without bound.
    static let maximumWaiters = 4096
    /// How long SQLite itself retries when another process holds a lock on the file (a backup, the
    /// `sqlite3` shell), in milliseconds; then the statement fails with `.conflict`. It also replaces
    /// sqlite-nio's default busy handler, which retries forever.
    static let busyTimeoutMilliseconds = 5000
    /// The size the WAL file is truncated back to after a checkpoint, in bytes: bounds the disk a
    /// burst of writes leaves behind without truncating on every checkpoint.
    static let journalSizeLimit = 64 * 1024 * 1024
    /// The oldest SQLite this store runs on: STRICT tables need 3.37.0 (RETURNING needs 3.35.0).
    static let minimumSQLiteVersion: Int32 = 3_037_000

    // MARK: State

    /// The database file's path.
    let path: String
    private let logger: Logger
    private let threadPool: NIOThreadPool
    private let writer: ConnectionQueue
    private let readers: ConnectionQueue
    /// Set once `close()` starts.
    private let closed = Atomic<Bool>(false)
    private let statements = StatementCounter()

    public var statementsRun: Int? { statements.value }

    private init(
        path: String,
        logger: Logger,
        threadPool: NIOThreadPool,
        writer: SQLiteConnection,
        readers: [SQLiteConnection]
    ) {
        self.path = path
        self.logger = logger
        self.threadPool = threadPool
        self.writer = ConnectionQueue(
            name: "writer",
            connections: [writer],
            timeout: Self.writerWaitTimeout,
            maximumWaiters: Self.maximumWaiters
        )
        self.readers = ConnectionQueue(
            name: "reader",
            connections: readers,
            timeout: Self.readerWaitTimeout,
            maximumWaiters: Self.maximumWaiters
        )
    }

    deinit {
        // A safety net for a store dropped without `close()`: sqlite-nio and NIO assert that their
        // connections and thread pools were closed, so close them here rather than trap.
        guard !closed.load(ordering: .acquiring) else { return }
        let writer = self.writer
        let readers = self.readers
        let threadPool = self.threadPool
        let logger = self.logger
        logger.warning("SQLiteKeyStore dropped without close(); closing it in the background")
        Task {
            await Self.closeConnections(writer: writer, readers: readers, threadPool: threadPool, logger: logger)
        }
    }

    // MARK: Opening

    /// Opens or creates the database file (mode 0600; the parent directory must exist), sets WAL,
    /// synchronous=FULL, foreign_keys=ON, busy_timeout, applies pending migrations in order and
    /// records them.
    ///
    /// - Throws: `StorageError(.unavailable)` when the file cannot be created or opened or does not
    ///   support WAL; `.corrupt` when it holds migrations this version does not know (a newer
    ///   gateway's database) or is not a database.
    public static func open(
        path: String,
        logger: Logger = Logger(label: "hsm-gateway.sqlite")
    ) async throws -> SQLiteKeyStore {
        let version = SQLiteConnection.libraryVersion()
        guard version >= minimumSQLiteVersion else {
            throw StorageError(
                .unavailable,
                "SQLite \(SQLiteConnection.libraryVersionString()) is older than 3.37.0 (STRICT tables)"
            )
        }
        try PrivateFile.create(path, logger: logger)

        let threadPool = NIOThreadPool(numberOfThreads: 1 + readerCount)
        threadPool.start()
        var opened: [SQLiteConnection] = []
        do {
            let writer = try await openConnection(path: path, threadPool: threadPool, logger: logger)
            opened.append(writer)
            try await configureWriter(writer)
            try await migrate(writer, logger: logger)
            var readers: [SQLiteConnection] = []
            for _ in 0..<readerCount {
                let reader = try await openConnection(path: path, threadPool: threadPool, logger: logger)
                opened.append(reader)
                try await configureReader(reader)
                readers.append(reader)
            }
            // SQLite creates `-wal` and `-shm` with the database file's mode; tighten any left
            // behind looser by an older process.
            for suffix in ["-wal", "-shm"] {
                PrivateFile.tighten(path + suffix, logger: logger)
            }
            logger.debug(
                "SQLite key store open",
                metadata: [
                    "path": "\(path)", "sqlite": "\(SQLiteConnection.libraryVersionString())",
                    "schema": "\(Schema.latestVersion)",
                ]
            )
            return SQLiteKeyStore(path: path, logger: logger, threadPool: threadPool, writer: writer, readers: readers)
        } catch {
            for connection in opened {
                try? await connection.close()
            }
            try? await threadPool.shutdownGracefully()
            throw StorageError.from(error, during: "open")
        }
    }

    private static func openConnection(
        path: String,
        threadPool: NIOThreadPool,
        logger: Logger
    ) async throws -> SQLiteConnection {
        do {
            return try await SQLiteConnection.open(
                storage: .file(path: path),
                threadPool: threadPool,
                logger: logger,
                on: MultiThreadedEventLoopGroup.singleton.any()
            )
        } catch let error as SQLiteError {
            throw StorageError(.unavailable, "cannot open the SQLite database: \(error.message) [\(error.reason)]")
        }
    }

    /// The settings every connection needs. `busy_timeout` comes first: it replaces sqlite-nio's
    /// busy handler, which would otherwise retry forever on a thread of the pool.
    private static func configureCommon(_ connection: SQLiteConnection) async throws {
        _ = try await connection.query("PRAGMA busy_timeout = \(busyTimeoutMilliseconds)")
        _ = try await connection.query("PRAGMA foreign_keys = ON")
        try await expectPragma(connection, "foreign_keys", equals: "1")
        _ = try await connection.query("PRAGMA trusted_schema = OFF")
    }

    private static func configureWriter(_ connection: SQLiteConnection) async throws {
        try await configureCommon(connection)
        let mode = try await pragmaValue(connection, "journal_mode = WAL")
        guard mode == "wal" else {
            throw StorageError(.unavailable, "the database file does not support WAL (journal_mode is \(mode))")
        }
        _ = try await connection.query("PRAGMA synchronous = FULL")
        try await expectPragma(connection, "synchronous", equals: "2")
        _ = try await connection.query("PRAGMA journal_size_limit = \(journalSizeLimit)")
    }

    private static func configureReader(_ connection: SQLiteConnection) async throws {
        try await configureCommon(connection)
        _ = try await connection.query("PRAGMA synchronous = FULL")
        // `read` is for reads: a write method called inside it fails instead of writing.
        _ = try await connection.query("PRAGMA query_only = ON")
        try await expectPragma(connection, "journal_mode", equals: "wal")
    }

    private static func pragmaValue(_ connection: SQLiteConnection, _ pragma: String) async throws -> String {
        let rows = try await connection.query("PRAGMA \(pragma)")
        guard let value = rows.first?.columns.first?.data else {
            throw StorageError(.unavailable, "PRAGMA \(pragma) returned nothing")
        }
        switch value {
        case .integer(let integer): return String(integer)
        case .text(let text): return text.lowercased()
        default: return value.description
        }
    }

    private static func expectPragma(_ connection: SQLiteConnection, _ name: String, equals expected: String)
        async throws
    {
        let value = try await pragmaValue(connection, name)
        guard value == expected else {
            throw StorageError(.unavailable, "PRAGMA \(name) is \(value), expected \(expected)")
        }
    }

    // MARK: Migrations

    /// Applies the migrations the file does not have yet, each in its own `BEGIN IMMEDIATE`
    /// transaction together with its `schema_migrations` row (checked again inside the
    /// transaction, in case another process migrated first).
    private static func migrate(_ connection: SQLiteConnection, logger: Logger) async throws {
        _ = try await connection.query(Schema.migrationsTable)
        let applied = try await connection.query(SQL.appliedMigrations).map { row in
            let r = RowReader(row: row, table: "schema_migrations")
            return (version: try r.int("version"), name: try r.text("name"))
        }
        let known = Dictionary(uniqueKeysWithValues: Schema.migrations.map { ($0.version, $0.name) })
        for migration in applied {
            guard let name = known[migration.version] else {
                throw StorageError(
                    .corrupt,
                    "schema_migrations holds version \(migration.version), which this gateway does not know "
                        + "(the database belongs to a newer version); refusing to use it"
                )
            }
            guard name == migration.name else {
                throw StorageError(
                    .corrupt,
                    "schema_migrations version \(migration.version) is \"\(migration.name)\", expected \"\(name)\""
                )
            }
        }
        let appliedVersions = Set(applied.map(\.version))
        for migration in Schema.migrations where !appliedVersions.contains(migration.version) {
            try await SQLiteTransaction.control(connection, "BEGIN IMMEDIATE")
            do {
                let already = try await connection.query(SQL.migrationApplied, [.int(migration.version)])
                if already.isEmpty {
                    for statement in migration.statements {
                        _ = try await connection.query(statement)
                    }
                    _ = try await connection.query(
                        SQL.recordMigration,
                        [.int(migration.version), .text(migration.name), .time(.now())]
                    )
                }
                try await SQLiteTransaction.control(connection, "COMMIT")
                if already.isEmpty {
                    logger.notice(
                        "applied SQLite schema migration",
                        metadata: ["version": "\(migration.version)", "name": "\(migration.name)"]
                    )
                }
            } catch {
                try? await SQLiteTransaction.control(connection, "ROLLBACK")
                throw StorageError.from(error, during: "migration \(migration.version) (\(migration.name))")
            }
        }
    }

    // MARK: KeyRepository

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction on the writer and commits it. A throwing
    /// body, or one that swallowed a failed statement outside a savepoint (as PostgreSQL would
    /// refuse to commit), rolls everything back.
    public func transaction<T: Sendable>(
        _ body: (any KeyRepositoryTransaction) async throws -> T
    ) async throws -> T {
        let connection = try await writer.acquire()
        defer { writer.release(connection) }
        return try await run(body, on: connection, writable: true, begin: "BEGIN IMMEDIATE")
    }

    /// Runs `body` in one read transaction on a reader connection: a consistent snapshot of
    /// committed data, taken at its first statement. The reader is `query_only`: a write fails.
    public func read<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        let connection = try await readers.acquire()
        defer { readers.release(connection) }
        return try await run(body, on: connection, writable: false, begin: "BEGIN")
    }

    /// `read`: one read transaction is already one consistent snapshot (WAL readers see the
    /// database as of their first statement, whatever the writer commits meanwhile). For a backup;
    /// the write-ahead log cannot be checkpointed past the snapshot while it lasts.
    public func snapshot<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        try await read(body)
    }

    private func run<T: Sendable>(
        _ body: (any KeyRepositoryTransaction) async throws -> T,
        on connection: SQLiteConnection,
        writable: Bool,
        begin: String
    ) async throws -> T {
        // BEGIN and COMMIT (or ROLLBACK).
        statements.add(2)
        try await SQLiteTransaction.control(connection, begin)
        let transaction = SQLiteTransaction(
            connection: connection, writable: writable, logger: logger, statements: statements)
        let value: T
        do {
            value = try await body(transaction)
        } catch {
            _ = transaction.end()
            await rollback(connection)
            throw error
        }
        if let failure = transaction.end() {
            // A statement failed and the body went on without a savepoint: committing now would
            // commit part of the work (and after some errors SQLite has rolled back already).
            await rollback(connection)
            throw failure
        }
        do {
            try await SQLiteTransaction.control(connection, "COMMIT")
        } catch {
            await rollback(connection)
            throw error
        }
        return value
    }

    private func rollback(_ connection: SQLiteConnection) async {
        do {
            try await SQLiteTransaction.control(connection, "ROLLBACK")
        } catch let error as StorageError where error.detail.contains("no transaction is active") {
            // SQLite rolled back already (after an I/O error or a full disk).
        } catch {
            logger.error("SQLite ROLLBACK failed", metadata: ["error": "\(error)"])
        }
    }

    /// Waits for running transactions and reads, then closes every connection and the store's
    /// threads. Later calls fail with `StorageError(.unavailable)`.
    public func close() async {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        await Self.closeConnections(writer: writer, readers: readers, threadPool: threadPool, logger: logger)
    }

    private static func closeConnections(
        writer: ConnectionQueue,
        readers: ConnectionQueue,
        threadPool: NIOThreadPool,
        logger: Logger
    ) async {
        let connections = await readers.drain() + writer.drain()
        for connection in connections {
            do {
                try await connection.close()
            } catch {
                logger.error("closing an SQLite connection failed", metadata: ["error": "\(error)"])
            }
        }
        try? await threadPool.shutdownGracefully()
    }

    // MARK: Maintenance

    /// The highest migration version applied to the file.
    public func schemaVersion() async throws -> Int {
        let connection = try await readers.acquire()
        defer { readers.release(connection) }
        do {
            let rows = try await connection.query(SQL.schemaVersion)
            guard let row = rows.first else { throw StorageError(.corrupt, "schema_migrations: no version row") }
            return try RowReader(row: row, table: "schema_migrations").int("version")
        } catch {
            throw StorageError.from(error, during: "schemaVersion")
        }
    }

    /// For tests and repair tools only, never with caller input: runs one SQL statement on the
    /// writer, outside any transaction (SQLite's autocommit). Text after the first statement is
    /// ignored.
    public func executeUnsafeSQL(_ sql: String) async throws {
        let connection = try await writer.acquire()
        defer { writer.release(connection) }
        do {
            _ = try await connection.query(sql)
        } catch {
            throw StorageError.from(error, during: "executeUnsafeSQL")
        }
    }

    /// For tests: runs one statement on the writer (or a reader) and returns each row as column
    /// name to text (integers in decimal, blobs in hex, NULL as "NULL").
    func queryForTesting(_ sql: String, onWriter: Bool = true) async throws -> [[String: String]] {
        let queue = onWriter ? writer : readers
        let connection = try await queue.acquire()
        defer { queue.release(connection) }
        do {
            return try await connection.query(sql).map { row in
                var values: [String: String] = [:]
                for column in row.columns {
                    switch column.data {
                    case .integer(let value): values[column.name] = String(value)
                    case .float(let value): values[column.name] = String(value)
                    case .text(let value): values[column.name] = value
                    case .blob(let buffer):
                        values[column.name] = buffer.readableBytesView.map { byte in
                            let hex = String(byte, radix: 16)
                            return hex.count == 1 ? "0" + hex : hex
                        }.joined()
                    case .null: values[column.name] = "NULL"
                    }
                }
                return values
            }
        } catch {
            throw StorageError.from(error, during: "queryForTesting")
        }
    }
}
