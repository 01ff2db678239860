import Foundation
import KeyHierarchy
import Testing

@testable import SQLiteKeyStore

/// What only the SQLite store has to prove: its file, its pragmas, its migrations, its writer lock
/// and its query plans. The behaviour every store shares is in the repository conformance suite.
@Suite("SQLite store")
struct SQLiteStoreTests {
    // MARK: File and connection settings

    @Test("the writer runs in WAL mode with synchronous=FULL and foreign keys on; readers are query-only")
    func pragmas() async throws {
        try await withSQLiteStore { store, _ in
            #expect(try await store.queryForTesting("PRAGMA journal_mode").first?["journal_mode"] == "wal")
            #expect(try await store.queryForTesting("PRAGMA synchronous").first?["synchronous"] == "2")
            #expect(try await store.queryForTesting("PRAGMA foreign_keys").first?["foreign_keys"] == "1")
            #expect(try await store.queryForTesting("PRAGMA busy_timeout").first?["timeout"] == "5000")
            let reader = try await store.queryForTesting("PRAGMA query_only", onWriter: false)
            #expect(reader.first?["query_only"] == "1")
            let readerKeys = try await store.queryForTesting("PRAGMA foreign_keys", onWriter: false)
            #expect(readerKeys.first?["foreign_keys"] == "1")
            let version = try await store.queryForTesting("SELECT sqlite_version() AS v").first?["v"] ?? ""
            #expect(version.compare("3.37.0", options: .numeric) != .orderedAscending)
        }
    }

    @Test("the database file and its -wal and -shm files are mode 0600")
    func fileMode() async throws {
        try await withSQLiteStore { store, path in
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("mode")) }
            #expect(PrivateFile.permissions(of: path) == 0o600)
            #expect(PrivateFile.permissions(of: path + "-wal") == 0o600)
            #expect(PrivateFile.permissions(of: path + "-shm") == 0o600)
        }
    }

    @Test("an existing file readable by others is set to 0600 when opened")
    func existingFileIsTightened() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let path = directory + "/keys.sqlite"
            #expect(FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o644]))
            #expect(PrivateFile.permissions(of: path) == 0o644)
            let store = try await SQLiteKeyStore.open(path: path)
            await store.close()
            #expect(PrivateFile.permissions(of: path) == 0o600)
        }
    }

    @Test("a missing parent directory fails with unavailable")
    func missingDirectory() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let error = await sqliteStorageError {
                _ = try await SQLiteKeyStore.open(path: directory + "/missing/keys.sqlite")
            }
            #expect(error?.kind == .unavailable)
        }
    }

    // MARK: Migrations

    @Test("migrations are applied once and recorded once across reopening")
    func migrationsRecordedOnce() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let path = directory + "/keys.sqlite"
            for _ in 0..<3 {
                let store = try await SQLiteKeyStore.open(path: path)
                #expect(try await store.schemaVersion() == Schema.latestVersion)
                let rows = try await store.queryForTesting(
                    "SELECT version, name FROM schema_migrations ORDER BY version")
                #expect(rows.map { $0["version"] } == Schema.migrations.map { String($0.version) })
                #expect(rows.map { $0["name"] } == Schema.migrations.map(\.name))
                let head = try await store.read { try await $0.auditHead() }
                #expect(head == AnchoredAuditHead(head: .genesis, anchor: nil))
                await store.close()
            }
        }
    }

    @Test("a database holding a migration this build does not know is refused")
    func unknownMigrationRefused() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let path = directory + "/keys.sqlite"
            let store = try await SQLiteKeyStore.open(path: path)
            try await store.executeUnsafeSQL(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'from the future', 0)")
            await store.close()
            let error = await sqliteStorageError { _ = try await SQLiteKeyStore.open(path: path) }
            #expect(error?.kind == .corrupt)
        }
    }

    // MARK: Transactions

    @Test("committed data is there after close and reopen, audit chain included")
    func durableAcrossReopen() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let path = directory + "/keys.sqlite"
            let tenant = SQLiteFixture.tenant("durable")
            let version = SQLiteFixture.version("durable", 1)
            let keys = (0..<1500).map { _ in SQLiteFixture.dataKey("durable", 1) }
            let events = (0..<3).map { index in
                AuditEvent(
                    time: SQLiteFixture.time,
                    principal: Principal("tester"),
                    tenant: tenant.id,
                    operation: .generateDataKey,
                    keyIDs: [keys[index].id.description],
                    requestID: "request-\(index)",
                    detail: "count=1"
                )
            }
            let store = try await SQLiteKeyStore.open(path: path)
            try await store.transaction { tx in
                try await tx.insertTenant(tenant)
                try await tx.insertMasterKeyVersion(version)
                try await tx.insertDataKeys(keys)
                let linked = AuditChain.link(events, after: try await tx.lockAuditHead().head)
                try await tx.appendAuditRecords(linked.records, head: linked.head)
            }
            await store.close()

            let reopened = try await SQLiteKeyStore.open(path: path)
            let (readTenant, readVersion, count, sample, records, head) = try await reopened.read { tx in
                (
                    try await tx.tenant(tenant.id, forUpdate: false),
                    try await tx.masterKeyVersion(tenant.id, 1),
                    try await tx.countLiveDataKeys(tenant.id, version: nil),
                    try await tx.dataKey(tenant.id, keys[1234].id),
                    try await tx.auditRecords(after: 0, limit: 10),
                    try await tx.auditHead().head
                )
            }
            await reopened.close()
            #expect(readTenant == tenant)
            #expect(readVersion == version)
            #expect(count == 1500)
            #expect(sample == keys[1234])
            #expect(records.map(\.event) == events)
            #expect(AuditChain.verify(records, head: head) == .verified(records: 3, head: head))
        }
    }

    @Test("a body that throws leaves nothing behind")
    func thrownBodyRollsBack() async throws {
        try await withSQLiteStore { store, _ in
            struct Boom: Error {}
            await #expect(throws: Boom.self) {
                try await store.transaction { tx in
                    try await tx.insertTenant(SQLiteFixture.tenant("gone"))
                    try await tx.insertMasterKeyVersion(SQLiteFixture.version("gone", 1))
                    try await tx.insertDataKeys([SQLiteFixture.dataKey("gone", 1)])
                    let linked = AuditChain.link(
                        [SQLiteFixture.event("gone")], after: try await tx.lockAuditHead().head)
                    try await tx.appendAuditRecords(linked.records, head: linked.head)
                    throw Boom()
                }
            }
            let (tenant, versions, keys, head) = try await store.read { tx in
                (
                    try await tx.tenant(TenantID(trusted: "gone"), forUpdate: false),
                    try await tx.masterKeyVersions(TenantID(trusted: "gone")),
                    try await tx.countLiveDataKeys(TenantID(trusted: "gone"), version: nil),
                    try await tx.auditHead().head
                )
            }
            #expect(tenant == nil)
            #expect(versions.isEmpty)
            #expect(keys == 0)
            #expect(head == .genesis)
            // The writer is free again.
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("gone")) }
        }
    }

    @Test("a failing savepoint rolls back only its own changes; the transaction goes on")
    func failingSavepointKeepsTheRest() async throws {
        try await withSQLiteStore { store, _ in
            try await store.transaction { tx in
                try await tx.insertTenant(SQLiteFixture.tenant("kept-1"))
                let thrown = await sqliteStorageError {
                    try await tx.savepoint {
                        try await tx.insertTenant(SQLiteFixture.tenant("dropped"))
                        try await tx.insertTenant(SQLiteFixture.tenant("kept-1"))  // unique violation
                    }
                }
                #expect(thrown?.kind == .uniqueViolation)
                // Nested: the inner one fails, the outer one keeps its own row.
                try await tx.savepoint {
                    try await tx.insertTenant(SQLiteFixture.tenant("kept-2"))
                    struct Inner: Error {}
                    _ = try? await tx.savepoint {
                        try await tx.insertTenant(SQLiteFixture.tenant("dropped-inner"))
                        throw Inner()
                    }
                }
                try await tx.insertTenant(SQLiteFixture.tenant("kept-3"))
            }
            let ids = try await store.read { try await $0.tenants(after: nil, limit: 10) }.map(\.id.rawValue)
            #expect(ids == ["kept-1", "kept-2", "kept-3"])
        }
    }

    @Test("a failed statement the body swallows outside a savepoint fails the commit, as on PostgreSQL")
    func swallowedFailureFailsCommit() async throws {
        try await withSQLiteStore { store, _ in
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("existing")) }
            let error = await sqliteStorageError {
                try await store.transaction { tx in
                    try await tx.insertTenant(SQLiteFixture.tenant("new"))
                    _ = try? await tx.insertTenant(SQLiteFixture.tenant("existing"))
                }
            }
            #expect(error?.kind == .other)
            let new = try await store.read { try await $0.tenant(TenantID(trusted: "new"), forUpdate: false) }
            #expect(new == nil)
        }
    }

    @Test("unique and foreign-key violations map to their kinds")
    func constraintKinds() async throws {
        try await withSQLiteStore { store, _ in
            let version = SQLiteFixture.version("c", 1)
            try await store.transaction { tx in
                try await tx.insertTenant(SQLiteFixture.tenant("c"))
                try await tx.insertMasterKeyVersion(version)
            }
            let key = SQLiteFixture.dataKey("c", 1)
            try await store.transaction { try await $0.insertDataKeys([key]) }
            let cases: [(String, StorageError.Kind, @Sendable (any KeyRepositoryTransaction) async throws -> Void)] = [
                ("duplicate tenant", .uniqueViolation, { try await $0.insertTenant(SQLiteFixture.tenant("c")) }),
                ("duplicate version", .uniqueViolation, { try await $0.insertMasterKeyVersion(version) }),
                (
                    "duplicate token key id", .uniqueViolation,
                    {
                        var other = SQLiteFixture.version("c", 2)
                        other.tokenKeyID = version.tokenKeyID
                        try await $0.insertMasterKeyVersion(other)
                    }
                ),
                ("duplicate data key", .uniqueViolation, { try await $0.insertDataKeys([key]) }),
                (
                    "duplicate idempotency key", .uniqueViolation,
                    { tx in
                        try await tx.insertIdempotencyRecord(SQLiteFixture.idempotency("c", "k"))
                        try await tx.insertIdempotencyRecord(SQLiteFixture.idempotency("c", "k"))
                    }
                ),
                (
                    "version of a missing tenant", .foreignKeyViolation,
                    { try await $0.insertMasterKeyVersion(SQLiteFixture.version("missing", 1)) }
                ),
                (
                    "data key under a missing version", .foreignKeyViolation,
                    { try await $0.insertDataKeys([SQLiteFixture.dataKey("c", 9)]) }
                ),
                (
                    "rewrap job of a missing tenant", .foreignKeyViolation,
                    { try await $0.saveRewrapJob(SQLiteFixture.rewrapJob("missing")) }
                ),
            ]
            for (name, kind, body) in cases {
                let error = await sqliteStorageError { try await store.transaction(body) }
                #expect(error?.kind == kind, "\(name): \(String(describing: error))")
            }
        }
    }

    @Test("errors name the constraint, never the bound values")
    func errorDetailHasNoValues() async throws {
        try await withSQLiteStore { store, _ in
            let secretLookingID = "zz-value-that-must-not-leak"
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant(secretLookingID)) }
            let error = await sqliteStorageError {
                try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant(secretLookingID)) }
            }
            #expect(error?.kind == .uniqueViolation)
            #expect(error?.detail.contains("tenants.id") == true)
            #expect(error?.detail.contains(secretLookingID) == false)
        }
    }

    @Test("the append-only triggers refuse UPDATE and DELETE on audit_log")
    func auditLogIsAppendOnly() async throws {
        try await withSQLiteStore { store, _ in
            try await store.transaction { tx in
                let linked = AuditChain.link(
                    [SQLiteFixture.event("a"), SQLiteFixture.event("b")], after: try await tx.lockAuditHead().head)
                try await tx.appendAuditRecords(linked.records, head: linked.head)
            }
            for sql in ["UPDATE audit_log SET detail = 'forged' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 2"] {
                let error = await sqliteStorageError { try await store.executeUnsafeSQL(sql) }
                #expect(error?.detail.contains("audit_log is append-only") == true, "\(sql)")
            }
            let (records, head) = try await store.read { tx in
                (try await tx.auditRecords(after: 0, limit: 10), try await tx.auditHead().head)
            }
            #expect(AuditChain.verify(records, head: head) == .verified(records: 2, head: head))

            // An attacker with the file drops the trigger first; the chain still shows the edit.
            try await store.executeUnsafeSQL("DROP TRIGGER audit_log_no_update")
            try await store.executeUnsafeSQL("UPDATE audit_log SET detail = 'forged' WHERE seq = 1")
            let forged = try await store.read { try await $0.auditRecords(after: 0, limit: 10) }
            guard case .broken(let problem) = AuditChain.verify(forged, head: head) else {
                Issue.record("an edited record verified")
                return
            }
            #expect(problem.kind == .edited)
            #expect(problem.sequence == 1)
        }
    }

    @Test("a write inside read is refused and changes nothing")
    func writeInsideReadRefused() async throws {
        try await withSQLiteStore { store, _ in
            let error = await sqliteStorageError {
                try await store.read { try await $0.insertTenant(SQLiteFixture.tenant("sneaky")) }
            }
            #expect(error?.kind == .other)
            let tenant = try await store.read { try await $0.tenant(TenantID(trusted: "sneaky"), forUpdate: false) }
            #expect(tenant == nil)
        }
    }

    @Test("a transaction object used after its transaction ended throws")
    func escapedTransactionRefused() async throws {
        try await withSQLiteStore { store, _ in
            let escaped = try await store.transaction { $0 }
            let error = await sqliteStorageError { try await escaped.insertTenant(SQLiteFixture.tenant("late")) }
            #expect(error?.kind == .other)
        }
    }

    // MARK: Concurrency

    @Test("16 concurrent transactions are serialised by the writer lock: every increment counts")
    func concurrentTransactions() async throws {
        try await withSQLiteStore { store, _ in
            let tenant = TenantID(trusted: "busy")
            try await store.transaction { tx in
                var record = SQLiteFixture.tenant("busy")
                record.primaryVersion = 0
                try await tx.insertTenant(record)
                try await tx.insertMasterKeyVersion(SQLiteFixture.version("busy", 1))
            }
            let firsts = try await withThrowingTaskGroup(of: Int64?.self) { group in
                for _ in 0..<16 {
                    group.addTask {
                        try await store.transaction { tx in
                            // A read-modify-write with a pause in the middle: lost updates show up
                            // unless transactions run one at a time.
                            var record = try await tx.tenant(tenant, forUpdate: true)!
                            try await Task.sleep(for: .milliseconds(2))
                            record.primaryVersion += 1
                            try await tx.updateTenant(record)
                            return try await tx.reserveInvocations(tenant, 1, count: 1, limit: 1_000)
                        }
                    }
                }
                var firsts: [Int64?] = []
                for try await first in group { firsts.append(first) }
                return firsts
            }
            #expect(firsts.compactMap { $0 }.sorted() == Array(0..<16))
            let (record, version) = try await store.read { tx in
                (try await tx.tenant(tenant, forUpdate: false), try await tx.masterKeyVersion(tenant, 1))
            }
            #expect(record?.primaryVersion == 16)
            #expect(version?.invocationsReserved == 16)
        }
    }

    @Test("a reader sees committed data while a write transaction is open, and not the uncommitted rows")
    func readerBesideWriter() async throws {
        try await withSQLiteStore { store, _ in
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("committed")) }
            let (entered, enteredSignal) = AsyncStream<Void>.makeStream()
            let (release, releaseSignal) = AsyncStream<Void>.makeStream()
            async let writing: Void = store.transaction { tx in
                try await tx.insertTenant(SQLiteFixture.tenant("pending"))
                enteredSignal.yield()
                for await _ in release { break }
            }
            for await _ in entered { break }
            let seen = try await store.read { tx in
                try await tx.tenants(after: nil, limit: 10).map(\.id.rawValue)
            }
            releaseSignal.yield()
            try await writing
            #expect(seen == ["committed"])
            let after = try await store.read { try await $0.tenants(after: nil, limit: 10) }.map(\.id.rawValue)
            #expect(after == ["committed", "pending"])
        }
    }

    @Test("a task cancelled while waiting for the writer leaves the queue; the others still run in order")
    func cancelledWaiterLeavesQueue() async throws {
        try await withSQLiteStore { store, _ in
            let (entered, enteredSignal) = AsyncStream<Void>.makeStream()
            let (release, releaseSignal) = AsyncStream<Void>.makeStream()
            async let holding: Void = store.transaction { tx in
                try await tx.insertTenant(SQLiteFixture.tenant("first"))
                enteredSignal.yield()
                for await _ in release { break }
            }
            for await _ in entered { break }
            let cancelled = Task {
                try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("cancelled")) }
            }
            let waiting = Task {
                try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("second")) }
            }
            try await Task.sleep(for: .milliseconds(50))
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            releaseSignal.yield()
            try await holding
            try await waiting.value
            let ids = try await store.read { try await $0.tenants(after: nil, limit: 10) }.map(\.id.rawValue)
            #expect(ids == ["first", "second"])
        }
    }

    @Test("a transaction cancelled in its body rolls back and leaves the writer usable")
    func cancelledBodyRollsBack() async throws {
        try await withSQLiteStore { store, _ in
            let (entered, enteredSignal) = AsyncStream<Void>.makeStream()
            let task = Task {
                try await store.transaction { tx in
                    try await tx.insertTenant(SQLiteFixture.tenant("half"))
                    enteredSignal.yield()
                    // Ends when the task is cancelled; the next statement then fails.
                    let (never, _) = AsyncStream<Void>.makeStream()
                    for await _ in never {}
                    try await tx.insertTenant(SQLiteFixture.tenant("after-cancel"))
                }
            }
            for await _ in entered { break }
            task.cancel()
            await #expect(throws: CancellationError.self) { try await task.value }
            try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("next")) }
            let ids = try await store.read { try await $0.tenants(after: nil, limit: 10) }.map(\.id.rawValue)
            #expect(ids == ["next"])
        }
    }

    @Test("a store dropped without close() is closed in the background, and the file opens again")
    func droppedStoreClosesItself() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let path = directory + "/keys.sqlite"
            do {
                let store = try await SQLiteKeyStore.open(path: path)
                try await store.transaction { try await $0.insertTenant(SQLiteFixture.tenant("dropped")) }
            }
            try await Task.sleep(for: .milliseconds(200))
            let reopened = try await SQLiteKeyStore.open(path: path)
            let tenant = try await reopened.read { try await $0.tenant(TenantID(trusted: "dropped"), forUpdate: false) }
            await reopened.close()
            #expect(tenant != nil)
        }
    }

    @Test("a closed store fails with unavailable; closing twice is harmless")
    func closedStore() async throws {
        try await withSQLiteTemporaryDirectory { directory in
            let store = try await SQLiteKeyStore.open(path: directory + "/keys.sqlite")
            await store.close()
            await store.close()
            let write = await sqliteStorageError { try await store.transaction { _ in } }
            let read = await sqliteStorageError { try await store.read { _ in } }
            #expect(write?.kind == .unavailable)
            #expect(read?.kind == .unavailable)
        }
    }

    // MARK: Statements

    @Test("every statement round-trips its records")
    func statementsRoundTrip() async throws {
        try await withSQLiteStore { store, _ in
            let tenant = TenantID(trusted: "rt")
            let v1 = SQLiteFixture.version("rt", 1)
            var v2 = SQLiteFixture.version("rt", 2)
            v2.destroyAfter = SQLiteFixture.time.adding(days: 7)
            let keys = (0..<10).map { _ in SQLiteFixture.dataKey("rt", 1) }.sorted { $0.id < $1.id }
            try await store.transaction { tx in
                try await tx.insertTenant(SQLiteFixture.tenant("rt"))
                try await tx.insertTenant(SQLiteFixture.tenant("other"))
                try await tx.insertMasterKeyVersion(v1)
                try await tx.insertMasterKeyVersion(v2)
                try await tx.insertMasterKeyVersion(SQLiteFixture.version("other", 1))
                try await tx.insertDataKeys(keys)
                try await tx.insertDataKeys([SQLiteFixture.dataKey("other", 1)])
            }
            try await store.transaction { tx in
                // Tenants: update and keyset listing.
                var record = try await tx.tenant(tenant, forUpdate: true)!
                record.state = .disabled
                record.primaryVersion = 2
                record.updatedAt = SQLiteFixture.time.adding(days: 1)
                try await tx.updateTenant(record)
                #expect(try await tx.tenant(tenant, forUpdate: false) == record)
                #expect(try await tx.tenants(after: TenantID(trusted: "other"), limit: 5).map(\.id) == [tenant])
                #expect(try await tx.tenants(after: nil, limit: 0).isEmpty)

                // Versions.
                #expect(try await tx.masterKeyVersions(tenant) == [v1, v2])
                var updated = v1
                updated.state = .deactivated
                updated.updatedAt = SQLiteFixture.time.adding(days: 2)
                updated.destroyAfter = SQLiteFixture.time.adding(days: 3)
                updated.invocationsReserved = 99  // not written by updateMasterKeyVersion
                try await tx.updateMasterKeyVersion(updated)
                updated.invocationsReserved = 0
                #expect(try await tx.masterKeyVersion(tenant, 1) == updated)
                #expect(try await tx.reserveInvocations(tenant, 1, count: 10, limit: 15) == 0)
                #expect(try await tx.reserveInvocations(tenant, 1, count: 5, limit: 15) == 10)
                #expect(try await tx.reserveInvocations(tenant, 1, count: 1, limit: 15) == nil)
                #expect(try await tx.reserveInvocations(tenant, 1, count: 1, limit: .max) == 15)
                #expect(try await tx.reserveInvocations(tenant, 7, count: 1, limit: 15) == nil)
                let due = try await tx.versionsDueForDestruction(now: SQLiteFixture.time.adding(days: 10), limit: 10)
                #expect(due.map(\.version) == [1, 2])
                #expect(
                    try await tx.versionsDueForDestruction(now: SQLiteFixture.time.adding(days: 4), limit: 10).count
                        == 1)

                // Data keys: lookups and listings.
                #expect(try await tx.dataKey(tenant, keys[3].id) == keys[3])
                #expect(try await tx.dataKey(TenantID(trusted: "other"), keys[3].id) == nil)
                let some = try await tx.dataKeys(tenant, ids: [keys[1].id, keys[5].id, .random(), keys[5].id])
                #expect(Set(some) == [keys[1], keys[5]])
                let page1 = try await tx.dataKeys(tenant, state: nil, after: nil, limit: 4)
                let page2 = try await tx.dataKeys(tenant, state: nil, after: page1.last?.id, limit: 100)
                #expect(page1 + page2 == keys)

                // State changes.
                let t = SQLiteFixture.time.adding(days: 5)
                #expect(try await tx.setDataKeyState(tenant, keys[0].id, to: .disabled, clearWrapped: false, at: t))
                #expect(try await tx.setDataKeyState(tenant, keys[1].id, to: .destroyed, clearWrapped: true, at: t))
                #expect(try await !tx.setDataKeyState(tenant, keys[1].id, to: .enabled, clearWrapped: false, at: t))
                #expect(try await tx.dataKey(tenant, keys[1].id)?.wrapped == nil)
                #expect(
                    try await tx.dataKeys(tenant, state: .disabled, after: nil, limit: 10).map(\.id) == [keys[0].id])
                #expect(try await tx.countLiveDataKeys(tenant, version: nil) == 9)
                #expect(try await tx.countLiveDataKeys(tenant, version: 1) == 9)
                #expect(try await tx.countLiveDataKeys(tenant, version: 2) == 0)

                // Rewrap.
                #expect(try await tx.dataKeysNotUnderVersion(tenant, 2, after: nil, limit: 100).count == 9)
                #expect(
                    try await tx.updateDataKeyWrapping(
                        tenant, keys[2].id, fromVersion: 1, toVersion: 2, wrapped: [1, 2, 3],
                        contextHash: Array(repeating: 7, count: 32), at: t))
                #expect(
                    try await !tx.updateDataKeyWrapping(
                        tenant, keys[2].id, fromVersion: 1, toVersion: 2, wrapped: [4],
                        contextHash: Array(repeating: 7, count: 32), at: t))
                #expect(
                    try await !tx.updateDataKeyWrapping(
                        tenant, keys[1].id, fromVersion: 1, toVersion: 2, wrapped: [4],
                        contextHash: Array(repeating: 7, count: 32), at: t))
                #expect(try await tx.dataKey(tenant, keys[2].id)?.wrapped == [1, 2, 3])
                let remaining = try await tx.dataKeysNotUnderVersion(tenant, 2, after: keys[2].id, limit: 100)
                #expect(remaining.map(\.id) == keys[3...].map(\.id))

                // Encryption counter.
                #expect(try await tx.countEncryption(tenant, keys[3].id, limit: 2) == 1)
                #expect(try await tx.countEncryption(tenant, keys[3].id, limit: 2) == 2)
                #expect(try await tx.countEncryption(tenant, keys[3].id, limit: 2) == nil)
                #expect(try await tx.countEncryption(tenant, keys[0].id, limit: 2) == nil)  // disabled

                // Idempotency.
                let old = SQLiteFixture.idempotency("rt", "old")
                var new = SQLiteFixture.idempotency("rt", "new")
                new.createdAt = SQLiteFixture.time.adding(days: 1)
                try await tx.insertIdempotencyRecord(old)
                try await tx.insertIdempotencyRecord(new)
                #expect(try await tx.idempotencyRecord(scope: "rt", key: "old") == old)
                #expect(try await tx.deleteIdempotencyRecords(before: SQLiteFixture.time.adding(days: 1)) == 1)
                #expect(try await tx.idempotencyRecord(scope: "rt", key: "old") == nil)

                // Rewrap job: insert, then replace.
                var job = SQLiteFixture.rewrapJob("rt")
                try await tx.saveRewrapJob(job)
                #expect(try await tx.rewrapJob(tenant) == job)
                job.state = .completed
                job.cursor = keys[9].id
                job.moved = 9
                try await tx.saveRewrapJob(job)
                #expect(try await tx.rewrapJob(tenant) == job)

                // Crypto-shred.
                #expect(try await tx.deleteDataKeys(tenant) == 10)
                #expect(try await tx.countLiveDataKeys(TenantID(trusted: "other"), version: nil) == 1)
            }
        }
    }

    @Test("audit records with no tenant, no key ids and many key ids round-trip and verify")
    func auditRoundTrip() async throws {
        try await withSQLiteStore { store, _ in
            let events = [
                AuditEvent(
                    time: SQLiteFixture.time, principal: .system, tenant: nil, operation: .createTenant, requestID: "r0"
                ),
                AuditEvent(
                    time: SQLiteFixture.time,
                    principal: Principal("alice"),
                    tenant: TenantID(trusted: "t"),
                    operation: .generateDataKey,
                    keyIDs: (0..<1000).map { _ in DataKeyID.random().description },
                    outcome: .failure("resource exhausted"),
                    requestID: "r1",
                    detail: "count=1000"
                ),
            ]
            let head = try await store.transaction { tx in
                let linked = AuditChain.link(events, after: try await tx.lockAuditHead().head)
                try await tx.appendAuditRecords(linked.records, head: linked.head)
                return linked.head
            }
            let (records, stored) = try await store.read { tx in
                (try await tx.auditRecords(after: 0, limit: 10), try await tx.auditHead().head)
            }
            #expect(stored == head)
            #expect(records.map(\.event) == events)
            #expect(AuditChain.verify(records, head: stored) == .verified(records: 2, head: head))
            #expect(try await store.read { try await $0.auditRecords(after: 1, limit: 10) }.map(\.sequence) == [2])
        }
    }

    // MARK: Query plans

    @Test("listing, lookup and version queries use an index on 20,000 data keys, never a table scan")
    func queryPlansUseIndexes() async throws {
        try await withSQLiteStore { store, _ in
            try await store.transaction { tx in
                for name in ["plan", "other"] {
                    try await tx.insertTenant(SQLiteFixture.tenant(name))
                    try await tx.insertMasterKeyVersion(SQLiteFixture.version(name, 1))
                    try await tx.insertMasterKeyVersion(SQLiteFixture.version(name, 2))
                }
            }
            for batch in 0..<20 {
                let keys = (0..<1000).map { index in
                    SQLiteFixture.dataKey(
                        batch % 4 == 0 ? "other" : "plan",
                        1 + index % 2,
                        state: index % 10 == 0 ? .disabled : .enabled
                    )
                }
                try await store.transaction { try await $0.insertDataKeys(keys) }
            }
            let statements: [(String, String)] = [
                ("list by tenant", SQL.dataKeys(state: false, after: false)),
                ("list by tenant after", SQL.dataKeys(state: false, after: true)),
                ("list by state", SQL.dataKeys(state: true, after: false)),
                ("list by state after", SQL.dataKeys(state: true, after: true)),
                ("by id", SQL.dataKey),
                ("by ids", SQL.dataKeysByID(count: 3)),
                ("count live", SQL.countLiveDataKeys),
                ("count by version", SQL.countLiveDataKeysUnderVersion),
                ("not under version", SQL.dataKeysNotUnderVersion(after: true)),
                ("update wrapping", SQL.updateDataKeyWrapping),
                ("set state", SQL.setDataKeyState),
                ("count encryption", SQL.countEncryption),
                ("delete tenant's keys", SQL.deleteDataKeys),
            ]
            for (name, sql) in statements {
                let plan = try await store.queryForTesting("EXPLAIN QUERY PLAN " + sql).compactMap { $0["detail"] }
                let text = plan.joined(separator: " | ")
                #expect(!plan.isEmpty, "\(name)")
                #expect(!plan.contains { $0.hasPrefix("SCAN data_keys") }, "\(name): \(text)")
                #expect(plan.contains { $0.contains("USING") && $0.contains("INDEX") }, "\(name): \(text)")
                #expect(!plan.contains { $0.contains("TEMP B-TREE") }, "\(name): \(text)")
            }
            for (name, sql, table) in [
                ("due for destruction", SQL.versionsDueForDestruction, "master_key_versions"),
                ("idempotency expiry", SQL.deleteIdempotencyRecords, "idempotency_keys"),
                ("audit page", SQL.auditRecords, "audit_log"),
            ] {
                let plan = try await store.queryForTesting("EXPLAIN QUERY PLAN " + sql).compactMap { $0["detail"] }
                #expect(!plan.contains { $0.hasPrefix("SCAN \(table)") }, "\(name): \(plan)")
            }
        }
    }
}

// MARK: - Helpers

/// Fixed records; ids vary by argument, keys and token ids are random.
private enum SQLiteFixture {
    static let time = Timestamp(millisecondsSinceEpoch: 1_700_000_000_000)

    static func tenant(_ id: String) -> TenantRecord {
        TenantRecord(id: TenantID(trusted: id), state: .enabled, primaryVersion: 1, createdAt: time, updatedAt: time)
    }

    static func version(_ tenant: String, _ version: Int) -> MasterKeyVersionRecord {
        MasterKeyVersionRecord(
            tenant: TenantID(trusted: tenant),
            version: version,
            state: .active,
            tokenKeyID: .random(),
            createdAt: time,
            updatedAt: time
        )
    }

    static func dataKey(_ tenant: String, _ version: Int, state: DataKeyState = .enabled) -> DataKeyRecord {
        DataKeyRecord(
            tenant: TenantID(trusted: tenant),
            id: .random(),
            version: version,
            state: state,
            wrapped: (0..<60).map { _ in UInt8.random(in: 0...255) },
            contextHash: (0..<32).map { _ in UInt8.random(in: 0...255) },
            createdAt: time,
            updatedAt: time
        )
    }

    static func idempotency(_ scope: String, _ key: String) -> IdempotencyRecord {
        IdempotencyRecord(
            scope: scope,
            key: key,
            operation: AuditOperation.generateDataKey.rawValue,
            fingerprint: Array(repeating: 7, count: 32),
            result: "ok",
            createdAt: time
        )
    }

    static func rewrapJob(_ tenant: String) -> RewrapJobRecord {
        RewrapJobRecord(
            tenant: TenantID(trusted: tenant),
            targetVersion: 2,
            state: .running,
            cursor: nil,
            moved: 0,
            total: 9,
            startedAt: time,
            updatedAt: time
        )
    }

    static func event(_ requestID: String) -> AuditEvent {
        AuditEvent(
            time: time,
            principal: Principal("tester"),
            tenant: TenantID(trusted: "t"),
            operation: .rotateMasterKey,
            keyIDs: ["v1", "v2"],
            requestID: requestID
        )
    }
}

/// Runs `body` with a fresh directory that is removed afterwards.
private func withSQLiteTemporaryDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("sqlite-key-store-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: false)
    defer { try? FileManager.default.removeItem(at: url) }
    return try await body(url.path)
}

/// Runs `body` with a new store in a fresh directory and closes it afterwards, even on failure.
private func withSQLiteStore<T>(_ body: (SQLiteKeyStore, String) async throws -> T) async throws -> T {
    try await withSQLiteTemporaryDirectory { directory in
        let path = directory + "/keys.sqlite"
        let store = try await SQLiteKeyStore.open(path: path)
        do {
            let result = try await body(store, path)
            await store.close()
            return result
        } catch {
            await store.close()
            throw error
        }
    }
}

/// The `StorageError` `body` throws, or nil (a test then fails on the kind it expected).
private func sqliteStorageError(_ body: () async throws -> Void) async -> StorageError? {
    do {
        try await body()
        return nil
    } catch let error as StorageError {
        return error
    } catch {
        Issue.record("expected a StorageError, got \(error)")
        return nil
    }
}
