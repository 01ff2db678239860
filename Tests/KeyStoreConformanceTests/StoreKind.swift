import Foundation
import KeyHierarchy
import PostgresKeyStore
import PostgresTestSupport
import SQLiteKeyStore
import Testing

/// The two `KeyRepository` implementations; conformance tests run against both with
/// `@Test(arguments: StoreKind.allCases)`.
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case postgres
    case sqlite

    var testDescription: String { rawValue }

    /// A store on a fresh database (PostgreSQL: a new database in the process's throwaway
    /// cluster; SQLite: a new file in a new temporary directory).
    func makeStore(_ name: String) async throws -> any KeyRepository {
        switch self {
        case .postgres:
            let cluster = try PostgresTestCluster.shared()
            let database = try await cluster.createDatabase(name)
            return try await PostgresKeyStore.open(
                PostgresKeyStoreConfiguration(
                    port: cluster.port,
                    username: cluster.username,
                    password: cluster.password,
                    database: database
                )
            )
        case .sqlite:
            let directory = try SQLiteFiles.shared.get().appendingPathComponent(
                "\(name)-\(UInt32.random(in: 0...UInt32.max))"
            )
            try FileManager.default.createDirectory(
                at: directory,
                withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700]
            )
            return try await SQLiteKeyStore.open(path: directory.appendingPathComponent("store.sqlite").path)
        }
    }

    /// Runs one SQL statement on `store` (which this kind made), for tests that tamper or inspect.
    func executeUnsafeSQL(_ store: any KeyRepository, _ sql: String) async throws {
        switch self {
        case .postgres:
            guard let store = store as? PostgresKeyStore else {
                throw StoreKindError("not a PostgresKeyStore: \(type(of: store))")
            }
            try await store.executeUnsafeSQL(sql)
        case .sqlite:
            guard let store = store as? SQLiteKeyStore else {
                throw StoreKindError("not a SQLiteKeyStore: \(type(of: store))")
            }
            try await store.executeUnsafeSQL(sql)
        }
    }
}

/// A test set-up failure.
struct StoreKindError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One temporary directory per test process for the SQLite stores' files and backups, removed at
/// exit.
private enum SQLiteFiles {
    static let shared: Result<URL, any Error> = Result {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-sqlite-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        )
        try FileManager.default.createDirectory(
            at: root,
            withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700]
        )
        atexit {
            if case .success(let root) = SQLiteFiles.shared {
                try? FileManager.default.removeItem(at: root)
            }
        }
        return root
    }
}

/// A store found again by its location, so a test can close it, back it up while it is in use,
/// restore the backup and open it again, as an operator does.
struct StoreLocation: Sendable {
    let kind: StoreKind
    /// PostgreSQL: the database name in the process's throwaway cluster; SQLite: the file path.
    let name: String

    static func make(_ kind: StoreKind, _ prefix: String) async throws -> StoreLocation {
        switch kind {
        case .postgres:
            return StoreLocation(kind: kind, name: try await PostgresTestCluster.shared().createDatabase(prefix))
        case .sqlite:
            let directory = try SQLiteFiles.shared.get().appendingPathComponent(
                "\(prefix)-\(UInt32.random(in: 0...UInt32.max))")
            try FileManager.default.createDirectory(
                at: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            return StoreLocation(kind: kind, name: directory.appendingPathComponent("store.sqlite").path)
        }
    }

    func open() async throws -> any KeyRepository {
        switch kind {
        case .postgres:
            let cluster = try PostgresTestCluster.shared()
            return try await PostgresKeyStore.open(
                PostgresKeyStoreConfiguration(
                    port: cluster.port, username: cluster.username, password: cluster.password, database: name)
            )
        case .sqlite:
            return try await SQLiteKeyStore.open(path: name)
        }
    }

    /// A backup of `store` taken while it is open and in use; returns where it is.
    ///
    /// PostgreSQL: `pg_dump` (a consistent snapshot). SQLite: a copy of the database file and its
    /// write-ahead log made while a write transaction holds the writer, so no commit lands
    /// half-way through the copy: what a file-system snapshot of a running gateway captures.
    func backup(_ store: any KeyRepository) async throws -> String {
        switch kind {
        case .postgres:
            let backup = try SQLiteFiles.shared.get().appendingPathComponent(
                "\(name)-backup-\(UInt32.random(in: 0...UInt32.max)).dump"
            ).path
            try await PostgresTestCluster.shared().dump(name, to: backup)
            return backup
        case .sqlite:
            let backup = "\(name)-backup-\(UInt32.random(in: 0...UInt32.max))"
            try FileManager.default.createDirectory(
                atPath: backup, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
            try await store.transaction { _ in
                for suffix in ["", "-wal"] where FileManager.default.fileExists(atPath: name + suffix) {
                    try FileManager.default.copyItem(atPath: name + suffix, toPath: "\(backup)/store.sqlite\(suffix)")
                }
            }
            return backup
        }
    }

    /// Replaces the database with `backup`; every store on it must be closed.
    func restore(from backup: String) async throws {
        switch kind {
        case .postgres:
            try await PostgresTestCluster.shared().restore(name, from: backup)
        case .sqlite:
            for suffix in ["", "-wal", "-shm"] where FileManager.default.fileExists(atPath: name + suffix) {
                try FileManager.default.removeItem(atPath: name + suffix)
            }
            for suffix in ["", "-wal"] where FileManager.default.fileExists(atPath: "\(backup)/store.sqlite\(suffix)") {
                try FileManager.default.copyItem(atPath: "\(backup)/store.sqlite\(suffix)", toPath: name + suffix)
            }
        }
    }
}
