import Foundation
import GatewayServer
import PostgresTestSupport
import ProcessTestSupport
import Testing

/// The two stores; end-to-end tests run against both with `@Test(arguments: StoreKind.allCases)`.
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgres

    var testDescription: String { rawValue }

    /// Settings for a fresh store (PostgreSQL: a new database in the process's throwaway cluster,
    /// its password in an owner-only file; SQLite: a file in a new directory).
    func makeSettings(_ name: String, directory: String) async throws -> StoreSettings {
        switch self {
        case .sqlite:
            return .sqlite(path: directory + "/gateway.sqlite")
        case .postgres:
            let cluster = try PostgresTestCluster.shared()
            let database = try await cluster.createDatabase(name)
            let passwordFile = directory + "/pg-password"
            guard
                FileManager.default.createFile(
                    atPath: passwordFile, contents: Data(cluster.password.utf8), attributes: [.posixPermissions: 0o600])
            else { throw TestSetupError("cannot write \(passwordFile)") }
            return .postgres(
                PostgresSettings(
                    host: "127.0.0.1",
                    port: cluster.port,
                    user: cluster.username,
                    database: database,
                    passwordFile: passwordFile,
                    maximumConnections: 8
                )
            )
        }
    }
}
