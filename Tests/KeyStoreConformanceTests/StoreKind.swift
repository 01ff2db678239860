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
            let database = try cluster.createDatabase(name)
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

/// One temporary directory per test process for the SQLite stores' files, removed at exit.
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
