import Foundation
import KeyHierarchy
import SQLiteNIO
import Testing

@testable import PostgresKeyStore
@testable import SQLiteKeyStore

/// docs/protocol.md §10.1: a store that cannot be reached is UNAVAILABLE, never INTERNAL. How
/// each store's errors are classified, on real failures where they can be made, and what a refused
/// authentication answers when its audit record cannot be written (§7.1).
@Suite("Storage error classification")
struct StorageErrorClassificationTests {
    // MARK: PostgreSQL

    @Test(
        "SQLSTATEs of a server that cannot serve us are unavailable",
        arguments: [
            "08000", "08003", "08006", "08001", "08004", "53300", "53100", "57P01", "57P02", "57P03", "57P04",
            "57P05", "25P03", "28P01", "3D000", "25006", "57014",
        ]
    )
    func unavailableSQLStates(state: String) {
        #expect(PostgresErrorMapping.serverKind(state) == .unavailable)
    }

    @Test("a statement error of our own is not unavailable", arguments: ["42P01", "42601", "P0001", "XX000", "22P02"])
    func otherSQLStates(state: String) {
        #expect(PostgresErrorMapping.serverKind(state) == .other)
    }

    @Test("an error the pool or the network raises (not postgres-nio's own) is unavailable")
    func foreignErrorsAreUnavailable() {
        struct ConnectionRefused: Error {}
        #expect(PostgresErrorMapping.storageError(ConnectionRefused(), operation: "read").kind == .unavailable)
        #expect(PostgresErrorMapping.storageError(CancellationError(), operation: "read").kind == .unavailable)
    }

    // MARK: SQLite

    @Test(
        "SQLite I/O failures, a full disk and a file moved or unwritable are unavailable",
        arguments: [
            SQLiteError.Reason.ioError, .ioErrorFailedRead, .ioErrorFailedWrite, .ioErrorFailedSync,
            .ioErrorFailedReadLock, .ioErrorFailedSharedMemOpen, .full, .readonlyBackingMoved, .readonlyInRecovery,
            .cantOpen, .permission,
        ]
    )
    func sqliteUnavailable(reason: SQLiteError.Reason) {
        #expect(StorageError.kind(of: reason) == .unavailable)
    }

    @Test("SQLite checksum and file-system corruption are corrupt; a write on a reader is not unavailable")
    func sqliteOtherKinds() {
        #expect(StorageError.kind(of: .ioErrorBadDataChecksum) == .corrupt)
        #expect(StorageError.kind(of: .ioErrorCorruptedFilesystem) == .corrupt)
        #expect(StorageError.kind(of: .readOnly) == .other)
        #expect(StorageError.kind(of: .misuse) == .other)
        #expect(StorageError.kind(of: .constraintCheckFailed) == .other)
    }

    @Test("an error that is not SQLite's (its thread pool refusing work) is unavailable")
    func sqliteForeignError() {
        struct ThreadPoolInactive: Error {}
        let mapped = StorageError.from(ThreadPoolInactive(), during: "read") as? StorageError
        #expect(mapped?.kind == .unavailable)
        #expect(StorageError.from(CancellationError(), during: "read") is CancellationError)
    }

    // MARK: A refused authentication whose audit record cannot be written

    /// Makes every insert into `audit_log` fail with `sqlState` (PostgreSQL) or a trigger error
    /// (SQLite), as a store that refuses writes would.
    static func failAuditInserts(_ harness: ServiceHarness, sqlState: String = "P0001") async throws {
        switch harness.kind {
        case .postgres:
            try await harness.sql(
                """
                CREATE FUNCTION hsmgw_test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'audit inserts refused for the test' USING ERRCODE = '\(sqlState)'; END $$
                """
            )
            try await harness.sql(
                "CREATE TRIGGER hsmgw_test_refuse_audit BEFORE INSERT ON audit_log "
                    + "FOR EACH ROW EXECUTE FUNCTION hsmgw_test_refuse_audit()"
            )
        case .sqlite:
            try await harness.sql(
                "CREATE TRIGGER hsmgw_test_refuse_audit BEFORE INSERT ON audit_log "
                    + "BEGIN SELECT RAISE(ABORT, 'audit inserts refused for the test'); END"
            )
        }
    }

    @Test(
        "a refusal that cannot be audited for another reason than an unreachable store is still a refusal",
        arguments: StoreKind.allCases
    )
    func refusalStandsWhenTheAuditFails(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "refusal-audit-fails")
        defer { Task { await harness.close() } }
        let before = try await harness.auditRecords()
        try await Self.failAuditInserts(harness)
        let unknown = "hsmgw_" + String(repeating: "A", count: 43)
        for presented in [unknown, "not-a-token"] {
            let result = try await harness.service.authenticate(apiToken: presented, requestID: "r-\(presented.count)")
            guard case .refused = result else {
                Issue.record("\(presented.count)-character token: \(result)")
                continue
            }
        }
        let certificate = try await harness.service.authenticate(certificateCommonName: "nobody", requestID: "r-cn")
        #expect(certificate == .refused(.unknownCertificate))
        #expect(try await harness.auditRecords() == before)  // nothing could be written
    }

    @Test("a refusal that cannot be audited because the store is unreachable is UNAVAILABLE")
    func refusalWithAnUnreachableStoreIsUnavailable() async throws {
        let harness = try await ServiceHarness.make(.postgres, "refusal-store-gone")
        defer { Task { await harness.close() } }
        // The server's own code for "the server is going away", as a failover raises it.
        try await Self.failAuditInserts(harness, sqlState: "57P01")
        let error = await serviceError {
            try await harness.service.authenticate(
                apiToken: "hsmgw_" + String(repeating: "B", count: 43), requestID: "r-gone")
        }
        #expect(error?.code == .unavailable)
    }
}
