import Foundation
import KeyHierarchy
import Testing

/// The `KeyRepository` contract, checked against both stores with the same tests: every port
/// method, round trips of every record type, ordering and keyset paging, tenant scoping, the
/// atomic counters under concurrency, the audit head, savepoints and rollback.
@Suite("Repository conformance")
struct RepositoryConformanceTests {
    // MARK: Tenants

    @Test(arguments: StoreKind.allCases)
    func tenantRoundTripAndUpdate(kind: StoreKind) async throws {
        try await withStore(kind, "tenant_round_trip") { store in
            let tenant = TenantRecord(
                id: TenantID(trusted: "acme"),
                state: .enabled,
                primaryVersion: 0,
                createdAt: t0,
                updatedAt: t0
            )
            try await store.transaction { try await $0.insertTenant(tenant) }
            #expect(try await store.read { try await $0.tenant(tenant.id, forUpdate: false) } == tenant)
            #expect(try await store.transaction { try await $0.tenant(tenant.id, forUpdate: true) } == tenant)
            #expect(try await store.read { try await $0.tenant(TenantID(trusted: "other"), forUpdate: false) } == nil)

            var updated = tenant
            updated.state = .disabled
            updated.primaryVersion = 3
            updated.updatedAt = later
            updated.createdAt = later  // not written by updateTenant
            try await store.transaction { try await $0.updateTenant(updated) }
            let read = try #require(try await store.read { try await $0.tenant(tenant.id, forUpdate: false) })
            #expect(read.state == .disabled)
            #expect(read.primaryVersion == 3)
            #expect(read.updatedAt == later)
            #expect(read.createdAt == t0)

            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertTenant(tenant) }
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func tenantsAreListedInByteOrderWithKeysetPaging(kind: StoreKind) async throws {
        try await withStore(kind, "tenant_paging") { store in
            // '-' < '0'-'9' < '_' < 'a'-'z' in byte order; a locale-aware collation would differ.
            let ids = ["b", "a_b", "a-b", "ab", "a", "0x", "9", "a0", "z-z", "b_"]
            try await store.transaction { transaction in
                for id in ids {
                    try await transaction.insertTenant(
                        TenantRecord(
                            id: TenantID(trusted: id),
                            state: .enabled,
                            primaryVersion: 1,
                            createdAt: t0,
                            updatedAt: t0
                        )
                    )
                }
            }
            var listed: [String] = []
            var after: TenantID?
            while true {
                let page = try await store.read { [after] in try await $0.tenants(after: after, limit: 3) }
                #expect(page.count <= 3)
                listed += page.map(\.id.rawValue)
                guard let last = page.last, page.count == 3 else { break }
                after = last.id
            }
            #expect(listed == ids.map { TenantID(trusted: $0) }.sorted().map(\.rawValue))
            #expect(listed == ids.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) })
        }
    }

    // MARK: Master-key versions

    @Test(arguments: StoreKind.allCases)
    func masterKeyVersionRoundTripAllFields(kind: StoreKind) async throws {
        try await withStore(kind, "version_round_trip") { store in
            let tenant = try await seedTenant(store, "acme", versions: 0)
            let first = MasterKeyVersionRecord(
                tenant: tenant,
                version: 1,
                state: .deactivated,
                tokenKeyID: TokenKeyID.random(),
                invocationsReserved: 5_000_000_000,
                createdAt: t0,
                updatedAt: later,
                destroyAfter: Timestamp(millisecondsSinceEpoch: 4_102_444_800_000),
                destroyedAt: Timestamp(millisecondsSinceEpoch: 1)
            )
            let second = MasterKeyVersionRecord(
                tenant: tenant,
                version: 2,
                state: .preActive,
                tokenKeyID: TokenKeyID.random(),
                createdAt: later,
                updatedAt: later
            )
            try await store.transaction { transaction in
                try await transaction.insertMasterKeyVersion(second)
                try await transaction.insertMasterKeyVersion(first)
            }
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 1) } == first)
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 2) } == second)
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 3) } == nil)
            #expect(try await store.read { try await $0.masterKeyVersions(tenant) } == [first, second])

            // updateMasterKeyVersion writes state, updatedAt, destroyAfter and destroyedAt only.
            var changed = second
            changed.state = .active
            changed.updatedAt = Timestamp(millisecondsSinceEpoch: later.millisecondsSinceEpoch + 1)
            changed.destroyAfter = Timestamp(millisecondsSinceEpoch: 77)
            changed.invocationsReserved = 999
            changed.createdAt = Timestamp(millisecondsSinceEpoch: 3)
            try await store.transaction { try await $0.updateMasterKeyVersion(changed) }
            var expected = changed
            expected.invocationsReserved = 0
            expected.createdAt = second.createdAt
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 2) } == expected)

            var cleared = first
            cleared.destroyAfter = nil
            cleared.destroyedAt = nil
            try await store.transaction { try await $0.updateMasterKeyVersion(cleared) }
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 1) } == cleared)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func masterKeyVersionConstraints(kind: StoreKind) async throws {
        try await withStore(kind, "version_constraints") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let existing = try #require(try await store.read { try await $0.masterKeyVersion(tenant, 1) })
            var duplicateVersion = existing
            duplicateVersion.tokenKeyID = TokenKeyID.random()
            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertMasterKeyVersion(duplicateVersion) }
            }
            var duplicateTokenKey = existing
            duplicateTokenKey.version = 2
            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertMasterKeyVersion(duplicateTokenKey) }
            }
            let orphan = MasterKeyVersionRecord(
                tenant: TenantID(trusted: "nobody"),
                version: 1,
                state: .active,
                tokenKeyID: TokenKeyID.random(),
                createdAt: t0,
                updatedAt: t0
            )
            await expectStorageError(.foreignKeyViolation) {
                try await store.transaction { try await $0.insertMasterKeyVersion(orphan) }
            }
            // Tenant scoping: another tenant's version 1 is not this one's.
            let other = try await seedTenant(store, "other", versions: 0)
            #expect(try await store.read { try await $0.masterKeyVersion(other, 1) } == nil)
            #expect(try await store.read { try await $0.masterKeyVersions(other) } == [])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func versionsDueForDestructionOldestFirst(kind: StoreKind) async throws {
        try await withStore(kind, "due_for_destruction") { store in
            let a = try await seedTenant(store, "a", versions: 0)
            let b = try await seedTenant(store, "b", versions: 0)
            func version(_ tenant: TenantID, _ number: Int, _ state: MasterKeyState, due: Int64?)
                -> MasterKeyVersionRecord
            {
                MasterKeyVersionRecord(
                    tenant: tenant,
                    version: number,
                    state: state,
                    tokenKeyID: TokenKeyID.random(),
                    createdAt: t0,
                    updatedAt: t0,
                    destroyAfter: due.map { Timestamp(millisecondsSinceEpoch: $0) }
                )
            }
            let versions = [
                version(a, 1, .deactivated, due: 3000),
                version(a, 2, .compromised, due: 1000),
                version(a, 3, .destroyed, due: 500),  // already destroyed: never due
                version(a, 4, .active, due: nil),
                version(b, 1, .deactivated, due: 2000),
                version(b, 2, .preActive, due: 9000),  // not yet
            ]
            try await store.transaction { transaction in
                for version in versions { try await transaction.insertMasterKeyVersion(version) }
            }
            let now = Timestamp(millisecondsSinceEpoch: 3000)
            let due = try await store.read { try await $0.versionsDueForDestruction(now: now, limit: 10) }
            #expect(due.map { "\($0.tenant.rawValue)/\($0.version)" } == ["a/2", "b/1", "a/1"])
            #expect(due.first == versions[1])
            let one = try await store.read { try await $0.versionsDueForDestruction(now: now, limit: 1) }
            #expect(one.map(\.version) == [2])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func reserveInvocationsAtAndOverTheLimit(kind: StoreKind) async throws {
        try await withStore(kind, "reserve_limit") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let first = try await store.transaction {
                try await $0.reserveInvocations(tenant, 1, count: 60, limit: 100)
            }
            #expect(first == 0)
            let second = try await store.transaction {
                try await $0.reserveInvocations(tenant, 1, count: 40, limit: 100)
            }
            #expect(second == 60)  // exactly at the limit: allowed
            let over = try await store.transaction { try await $0.reserveInvocations(tenant, 1, count: 1, limit: 100) }
            #expect(over == nil)
            let version = try #require(try await store.read { try await $0.masterKeyVersion(tenant, 1) })
            #expect(version.invocationsReserved == 100)
            let missing = try await store.transaction {
                try await $0.reserveInvocations(tenant, 9, count: 1, limit: 100)
            }
            #expect(missing == nil)
            let otherTenant = try await store.transaction {
                try await $0.reserveInvocations(TenantID(trusted: "nobody"), 1, count: 1, limit: 100)
            }
            #expect(otherTenant == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func reserveInvocationsUnderConcurrentTransactions(kind: StoreKind) async throws {
        try await withStore(kind, "reserve_concurrent") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let workers = 16
            let attemptsPerWorker = 10
            let blockSize: Int64 = 10
            let limit: Int64 = 1000  // 1,600 asked for: exactly 100 blocks fit
            let starts = try await withThrowingTaskGroup(of: [Int64].self) { group in
                for _ in 0..<workers {
                    group.addTask {
                        var mine: [Int64] = []
                        for _ in 0..<attemptsPerWorker {
                            let start = try await store.transaction {
                                try await $0.reserveInvocations(tenant, 1, count: blockSize, limit: limit)
                            }
                            if let start { mine.append(start) }
                        }
                        return mine
                    }
                }
                var all: [Int64] = []
                for try await mine in group { all += mine }
                return all
            }
            #expect(starts.count == Int(limit / blockSize))
            #expect(starts.sorted() == Array(stride(from: Int64(0), to: limit, by: Int(blockSize))))
            let version = try #require(try await store.read { try await $0.masterKeyVersion(tenant, 1) })
            #expect(version.invocationsReserved == limit)
        }
    }

    // MARK: Data keys

    @Test(arguments: StoreKind.allCases)
    func dataKeyRoundTripAllFields(kind: StoreKind) async throws {
        try await withStore(kind, "data_key_round_trip") { store in
            let tenant = try await seedTenant(store, "acme", versions: 2)
            let enabled = DataKeyRecord(
                tenant: tenant,
                id: .random(),
                version: 2,
                state: .enabled,
                wrapped: randomBytes(60),
                contextHash: randomBytes(32),
                encryptions: 4_294_967_296,
                createdAt: t0,
                updatedAt: later
            )
            let disabled = dataKey(tenant, version: 1, state: .disabled)
            let destroyed = dataKey(tenant, version: 1, state: .destroyed)
            #expect(destroyed.wrapped == nil)
            try await store.transaction { try await $0.insertDataKeys([enabled, disabled, destroyed]) }
            for key in [enabled, disabled, destroyed] {
                #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == key)
            }
            #expect(try await store.read { try await $0.dataKey(tenant, .random()) } == nil)
            let byIDs = try await store.read {
                try await $0.dataKeys(tenant, ids: [destroyed.id, .random(), enabled.id])
            }
            #expect(Set(byIDs) == [enabled, destroyed])
            #expect(try await store.read { try await $0.dataKeys(tenant, ids: []) } == [])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func dataKeysAreScopedByTenant(kind: StoreKind) async throws {
        try await withStore(kind, "data_key_scoping") { store in
            let a = try await seedTenant(store, "a", versions: 1)
            let b = try await seedTenant(store, "b", versions: 1)
            let keyOfA = dataKey(a, version: 1)
            let keyOfB = dataKey(b, version: 1)
            try await store.transaction { try await $0.insertDataKeys([keyOfA, keyOfB]) }
            #expect(try await store.read { try await $0.dataKey(b, keyOfA.id) } == nil)
            #expect(try await store.read { try await $0.dataKeys(b, ids: [keyOfA.id, keyOfB.id]) } == [keyOfB])
            #expect(try await store.read { try await $0.dataKeys(b, state: nil, after: nil, limit: 10) } == [keyOfB])
            #expect(
                try await store.read { try await $0.dataKeysNotUnderVersion(b, 2, after: nil, limit: 10) } == [keyOfB])
            #expect(try await store.read { try await $0.countLiveDataKeys(b, version: nil) } == 1)
            let wrapped = randomBytes(60)
            #expect(
                try await store.transaction {
                    try await $0.updateDataKeyWrapping(
                        b, keyOfA.id, fromVersion: 1, toVersion: 1, wrapped: wrapped, contextHash: randomBytes(32),
                        at: later)
                } == false
            )
            #expect(
                try await store.transaction {
                    try await $0.setDataKeyState(b, keyOfA.id, to: .disabled, clearWrapped: false, at: later)
                } == false
            )
            #expect(try await store.transaction { try await $0.countEncryption(b, keyOfA.id, limit: 10) } == nil)
            #expect(try await store.read { try await $0.dataKey(a, keyOfA.id) } == keyOfA)
        }
    }

    /// The joined read a decrypt makes (one statement) answers exactly what the three separate
    /// reads answer: the tenant, the rows among the ids (scoped by tenant, duplicates once), the
    /// versions they name; nil for a tenant that does not exist.
    @Test(arguments: StoreKind.allCases)
    func dataKeysForUseIsOneStatementAndMatchesTheSeparateReads(kind: StoreKind) async throws {
        try await withStore(kind, "data_keys_for_use") { store in
            let a = try await seedTenant(store, "a", versions: 3)
            let b = try await seedTenant(store, "b", versions: 1)
            let underOne = dataKey(a, version: 1)
            let underThree = dataKey(a, version: 3)
            let disabled = dataKey(a, version: 3, state: .disabled)
            let keyOfB = dataKey(b, version: 1)
            try await store.transaction { try await $0.insertDataKeys([underOne, underThree, disabled, keyOfB]) }
            let missing = DataKeyID.random()
            let ids = [underThree.id, missing, underOne.id, keyOfB.id, disabled.id, underOne.id]

            let before = try #require(store.statementsRun)
            let joined = try #require(try await store.read { try await $0.dataKeysForUse(a, ids: ids) })
            // BEGIN (SQLite's read snapshot), the statement, COMMIT; PostgreSQL reads need no BEGIN.
            #expect(try #require(store.statementsRun) - before <= 3)

            let tenant = try #require(try await store.read { try await $0.tenant(a, forUpdate: false) })
            #expect(joined.tenant == tenant)
            #expect(Set(joined.keys) == [underOne, underThree, disabled])
            #expect(joined.keys.count == 3)
            let versions = try await store.read { try await $0.masterKeyVersions(a) }
            #expect(joined.versions == versions.filter { $0.version == 1 || $0.version == 3 })

            let none = try #require(try await store.read { try await $0.dataKeysForUse(a, ids: [missing]) })
            #expect(none.tenant == tenant)
            #expect(none.keys.isEmpty && none.versions.isEmpty)
            let empty = try #require(try await store.read { try await $0.dataKeysForUse(b, ids: []) })
            #expect(empty.keys.isEmpty)
            #expect(try await store.read { try await $0.dataKeysForUse(TenantID(trusted: "nobody"), ids: ids) } == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func dataKeyListingsAreOrderedAndPagedByID(kind: StoreKind) async throws {
        try await withStore(kind, "data_key_paging") { store in
            let a = try await seedTenant(store, "a", versions: 1)
            let b = try await seedTenant(store, "b", versions: 1)
            let keysOfA = (0..<250).map { dataKey(a, version: 1, state: $0 % 5 == 0 ? .disabled : .enabled) }
            let keysOfB = (0..<50).map { _ in dataKey(b, version: 1) }
            try await store.transaction { try await $0.insertDataKeys(keysOfA + keysOfB) }

            func pages(state: DataKeyState?) async throws -> [DataKeyRecord] {
                var all: [DataKeyRecord] = []
                var after: DataKeyID?
                while true {
                    let page = try await store.read { [after] in
                        try await $0.dataKeys(a, state: state, after: after, limit: 64)
                    }
                    #expect(page.count <= 64)
                    all += page
                    guard let last = page.last, page.count == 64 else { return all }
                    after = last.id
                }
            }
            let everything = try await pages(state: nil)
            #expect(everything == keysOfA.sorted { $0.id < $1.id })
            let disabled = try await pages(state: .disabled)
            #expect(disabled == keysOfA.filter { $0.state == .disabled }.sorted { $0.id < $1.id })
            #expect(try await pages(state: .destroyed) == [])
            // The string order DataKeyID uses is the order the store returns.
            #expect(everything.map(\.id.description) == everything.map(\.id.description).sorted())
        }
    }

    @Test(arguments: StoreKind.allCases)
    func insertDataKeysTakesABatchOfOneThousand(kind: StoreKind) async throws {
        try await withStore(kind, "data_key_batch") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let keys = (0..<1000).map { _ in dataKey(tenant, version: 1) }
            try await store.transaction { try await $0.insertDataKeys(keys) }
            #expect(try await store.read { try await $0.countLiveDataKeys(tenant, version: nil) } == 1000)
            let sample = keys[keys.count / 2]
            #expect(try await store.read { try await $0.dataKey(tenant, sample.id) } == sample)
            let found = try await store.read { try await $0.dataKeys(tenant, ids: keys.map(\.id)) }
            #expect(Set(found) == Set(keys))

            // A duplicate id anywhere in a batch refuses the whole transaction.
            let fresh = (0..<10).map { _ in dataKey(tenant, version: 1) }
            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertDataKeys(fresh + [keys[0]]) }
            }
            #expect(try await store.read { try await $0.dataKey(tenant, fresh[0].id) } == nil)
            // Under a version that does not exist: an orphan.
            await expectStorageError(.foreignKeyViolation) {
                try await store.transaction { try await $0.insertDataKeys([dataKey(tenant, version: 7)]) }
            }
            // The same id under another tenant is still a duplicate (ids are globally unique).
            let other = try await seedTenant(store, "other", versions: 1)
            var stolen = keys[1]
            stolen.tenant = other
            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertDataKeys([stolen]) }
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func notUnderVersionAndLiveCounts(kind: StoreKind) async throws {
        try await withStore(kind, "not_under_version") { store in
            let tenant = try await seedTenant(store, "acme", versions: 3)
            let underOne = (0..<7).map { _ in dataKey(tenant, version: 1) }
            let underTwo = (0..<5).map { i in dataKey(tenant, version: 2, state: i == 0 ? .disabled : .enabled) }
            let underThree = (0..<4).map { _ in dataKey(tenant, version: 3) }
            let destroyed = (0..<3).map { _ in dataKey(tenant, version: 1, state: .destroyed) }
            try await store.transaction { try await $0.insertDataKeys(underOne + underTwo + underThree + destroyed) }

            let expected = (underOne + underTwo).sorted { $0.id < $1.id }
            var scanned: [DataKeyRecord] = []
            var after: DataKeyID?
            while true {
                let page = try await store.read { [after] in
                    try await $0.dataKeysNotUnderVersion(tenant, 3, after: after, limit: 5)
                }
                scanned += page
                guard let last = page.last, page.count == 5 else { break }
                after = last.id
            }
            #expect(scanned == expected)
            #expect(try await store.read { try await $0.countLiveDataKeys(tenant, version: nil) } == 16)
            #expect(try await store.read { try await $0.countLiveDataKeys(tenant, version: 1) } == 7)
            #expect(try await store.read { try await $0.countLiveDataKeys(tenant, version: 2) } == 5)
            #expect(try await store.read { try await $0.countLiveDataKeys(tenant, version: 9) } == 0)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func updateDataKeyWrappingOnlyFromTheExpectedVersion(kind: StoreKind) async throws {
        try await withStore(kind, "update_wrapping") { store in
            let tenant = try await seedTenant(store, "acme", versions: 2)
            let key = dataKey(tenant, version: 1)
            let gone = dataKey(tenant, version: 1, state: .destroyed)
            try await store.transaction { try await $0.insertDataKeys([key, gone]) }
            let rewrapped = randomBytes(60)
            let rebound = randomBytes(32)

            let fromWrongVersion = try await store.transaction {
                try await $0.updateDataKeyWrapping(
                    tenant, key.id, fromVersion: 2, toVersion: 2, wrapped: rewrapped, contextHash: rebound, at: later)
            }
            #expect(fromWrongVersion == false)
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == key)

            let moved = try await store.transaction {
                try await $0.updateDataKeyWrapping(
                    tenant, key.id, fromVersion: 1, toVersion: 2, wrapped: rewrapped, contextHash: rebound, at: later)
            }
            #expect(moved)
            var expected = key
            expected.version = 2
            expected.wrapped = rewrapped
            expected.contextHash = rebound
            expected.updatedAt = later
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == expected)

            let again = try await store.transaction {
                try await $0.updateDataKeyWrapping(
                    tenant, key.id, fromVersion: 1, toVersion: 2, wrapped: rewrapped, contextHash: rebound, at: later)
            }
            #expect(again == false)
            let destroyedKey = try await store.transaction {
                try await $0.updateDataKeyWrapping(
                    tenant, gone.id, fromVersion: 1, toVersion: 2, wrapped: rewrapped, contextHash: rebound, at: later)
            }
            #expect(destroyedKey == false)
            #expect(try await store.read { try await $0.dataKey(tenant, gone.id) } == gone)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func setDataKeyStateAndClearWrapped(kind: StoreKind) async throws {
        try await withStore(kind, "set_state") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let key = dataKey(tenant, version: 1)
            try await store.transaction { try await $0.insertDataKeys([key]) }

            let t1 = Timestamp(millisecondsSinceEpoch: later.millisecondsSinceEpoch + 10)
            #expect(
                try await store.transaction {
                    try await $0.setDataKeyState(tenant, key.id, to: .disabled, clearWrapped: false, at: t1)
                }
            )
            var expected = key
            expected.state = .disabled
            expected.updatedAt = t1
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == expected)

            let t2 = Timestamp(millisecondsSinceEpoch: later.millisecondsSinceEpoch + 20)
            #expect(
                try await store.transaction {
                    try await $0.setDataKeyState(tenant, key.id, to: .destroyed, clearWrapped: true, at: t2)
                }
            )
            expected.state = .destroyed
            expected.wrapped = nil
            expected.updatedAt = t2
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == expected)

            // Destroyed is final.
            #expect(
                try await store.transaction {
                    try await $0.setDataKeyState(tenant, key.id, to: .enabled, clearWrapped: false, at: later)
                } == false
            )
            #expect(
                try await store.transaction {
                    try await $0.setDataKeyState(tenant, .random(), to: .disabled, clearWrapped: false, at: later)
                } == false
            )
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == expected)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func countEncryptionStopsAtTheLimit(kind: StoreKind) async throws {
        try await withStore(kind, "count_encryption") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            var key = dataKey(tenant, version: 1)
            key.encryptions = 0
            var disabled = dataKey(tenant, version: 1, state: .disabled)
            disabled.encryptions = 0
            try await store.transaction { try await $0.insertDataKeys([key, disabled]) }
            var counts: [Int64?] = []
            for _ in 0..<4 {
                counts.append(try await store.transaction { try await $0.countEncryption(tenant, key.id, limit: 3) })
            }
            #expect(counts == [1, 2, 3, nil])
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) }?.encryptions == 3)
            #expect(try await store.transaction { try await $0.countEncryption(tenant, disabled.id, limit: 3) } == nil)
            #expect(try await store.transaction { try await $0.countEncryption(tenant, .random(), limit: 3) } == nil)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func deleteDataKeysCountsOnlyTheTenantsRows(kind: StoreKind) async throws {
        try await withStore(kind, "delete_data_keys") { store in
            let a = try await seedTenant(store, "a", versions: 1)
            let b = try await seedTenant(store, "b", versions: 1)
            let keysOfA = (0..<12).map { i in dataKey(a, version: 1, state: i == 0 ? .destroyed : .enabled) }
            let keysOfB = (0..<5).map { _ in dataKey(b, version: 1) }
            try await store.transaction { try await $0.insertDataKeys(keysOfA + keysOfB) }
            #expect(try await store.transaction { try await $0.deleteDataKeys(a) } == 12)
            #expect(try await store.read { try await $0.dataKeys(a, state: nil, after: nil, limit: 100) } == [])
            #expect(try await store.read { try await $0.countLiveDataKeys(b, version: nil) } == 5)
            #expect(try await store.transaction { try await $0.deleteDataKeys(a) } == 0)
        }
    }

    // MARK: Idempotency

    @Test(arguments: StoreKind.allCases)
    func idempotencyRecords(kind: StoreKind) async throws {
        try await withStore(kind, "idempotency") { store in
            let record = IdempotencyRecord(
                scope: "acme",
                key: "create-1",
                operation: AuditOperation.generateDataKey.rawValue,
                fingerprint: randomBytes(32),
                result: "0f1e2d3c-0000-4000-8000-000000000001",
                createdAt: t0
            )
            let unscoped = IdempotencyRecord(
                scope: "",
                key: "create-1",
                operation: AuditOperation.createTenant.rawValue,
                fingerprint: randomBytes(32),
                result: "acme",
                createdAt: later
            )
            try await store.transaction { transaction in
                try await transaction.insertIdempotencyRecord(record)
                try await transaction.insertIdempotencyRecord(unscoped)  // same key, other scope
            }
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "acme", key: "create-1") } == record)
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "", key: "create-1") } == unscoped)
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "other", key: "create-1") } == nil)

            var reused = record
            reused.fingerprint = randomBytes(32)
            await expectStorageError(.uniqueViolation) {
                try await store.transaction { try await $0.insertIdempotencyRecord(reused) }
            }
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "acme", key: "create-1") } == record)

            #expect(try await store.transaction { try await $0.deleteIdempotencyRecords(before: t0) } == 0)
            #expect(try await store.transaction { try await $0.deleteIdempotencyRecords(before: later) } == 1)
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "acme", key: "create-1") } == nil)
            #expect(try await store.read { try await $0.idempotencyRecord(scope: "", key: "create-1") } == unscoped)
        }
    }

    // MARK: Rewrap jobs

    @Test(arguments: StoreKind.allCases)
    func rewrapJobUpsert(kind: StoreKind) async throws {
        try await withStore(kind, "rewrap_job") { store in
            let tenant = try await seedTenant(store, "acme", versions: 2)
            #expect(try await store.read { try await $0.rewrapJob(tenant) } == nil)
            let started = RewrapJobRecord(
                tenant: tenant,
                targetVersion: 2,
                state: .running,
                cursor: nil,
                moved: 0,
                total: 3_000_000_000,
                startedAt: t0,
                updatedAt: t0
            )
            try await store.transaction { try await $0.saveRewrapJob(started) }
            #expect(try await store.read { try await $0.rewrapJob(tenant) } == started)

            var progressed = started
            progressed.cursor = .random()
            progressed.moved = 1000
            progressed.updatedAt = later
            try await store.transaction { try await $0.saveRewrapJob(progressed) }
            #expect(try await store.read { try await $0.rewrapJob(tenant) } == progressed)

            var completed = progressed
            completed.state = .completed
            completed.cursor = nil
            try await store.transaction { try await $0.saveRewrapJob(completed) }
            #expect(try await store.read { try await $0.rewrapJob(tenant) } == completed)

            let other = try await seedTenant(store, "other", versions: 1)
            #expect(try await store.read { try await $0.rewrapJob(other) } == nil)
        }
    }

    // MARK: Audit

    @Test(arguments: StoreKind.allCases)
    func auditHeadLockAppendAndReadBack(kind: StoreKind) async throws {
        try await withStore(kind, "audit") { store in
            #expect(try await store.read { try await $0.auditHead().head } == .genesis)
            let tenant = TenantID(trusted: "acme")
            let events = [
                AuditEvent(
                    time: t0,
                    principal: Principal("admin"),
                    tenant: nil,
                    operation: .createTenant,
                    outcome: .failure("already-exists"),
                    requestID: "r-1"
                ),
                AuditEvent(
                    time: later,
                    principal: Principal("svc-payments"),
                    tenant: tenant,
                    operation: .generateDataKey,
                    keyIDs: [DataKeyID.random().description, DataKeyID.random().description],
                    requestID: "r-2",
                    detail: "context-sha256=00ff count=2"
                ),
                AuditEvent(
                    time: Timestamp(millisecondsSinceEpoch: 4_102_444_800_000),
                    principal: .system,
                    tenant: tenant,
                    operation: .rotateMasterKey,
                    keyIDs: ["v2"],
                    requestID: "r-3",
                    detail: "état=active"
                ),
            ]
            let (records, head) = try await store.transaction { transaction in
                let current = try await transaction.lockAuditHead().head
                #expect(current == .genesis)
                let linked = AuditChain.link(events, after: current)
                try await transaction.appendAuditRecords(linked.records, head: linked.head)
                return linked
            }
            #expect(try await store.read { try await $0.auditHead().head } == head)
            #expect(head.sequence == 3)
            let stored = try await store.read { try await $0.auditRecords(after: 0, limit: 100) }
            #expect(stored == records)
            #expect(try await store.read { try await $0.auditRecords(after: 1, limit: 1) } == [records[1]])
            #expect(try await store.read { try await $0.auditRecords(after: 3, limit: 10) } == [])
            #expect(AuditChain.verify(stored, head: head) == .verified(records: 3, head: head))

            let more = try await store.transaction { transaction in
                let current = try await transaction.lockAuditHead().head
                #expect(current == head)
                let linked = AuditChain.link(
                    [AuditEvent(principal: .system, tenant: tenant, operation: .rewrapJob, requestID: "r-4")],
                    after: current
                )
                try await transaction.appendAuditRecords(linked.records, head: linked.head)
                return linked
            }
            let all = try await store.read { try await $0.auditRecords(after: 0, limit: 100) }
            #expect(all == records + more.records)
            #expect(AuditChain.verify(all, head: more.head) == .verified(records: 4, head: more.head))
        }
    }

    /// More records than one statement carries (PostgreSQL appends in chunks of 1,000, each
    /// moving the head): every record stored once, in order, and the head and its anchor are the
    /// batch's own.
    @Test(arguments: StoreKind.allCases)
    func auditAppendLargerThanOneStatement(kind: StoreKind) async throws {
        try await withStore(kind, "audit-large") { store in
            let events = (0..<2_345).map { index in
                AuditEvent(
                    time: t0, principal: Principal("svc"), tenant: index % 7 == 0 ? nil : TenantID(trusted: "acme"),
                    operation: .decryptDataKey, requestID: "r-\(index)")
            }
            let linked = AuditChain.link(events, after: .genesis)
            let anchor = AuditCheckpoint(
                sequence: linked.head.sequence, hash: linked.head.hash, keyID: TokenKeyID.random(),
                mac: Array(repeating: 7, count: 32), time: later)
            try await store.transaction { transaction in
                _ = try await transaction.lockAuditHead()
                try await transaction.appendAuditRecords(
                    linked.records, head: linked.head, anchor: anchor, keepCheckpoint: true)
            }
            let head = try await store.read { try await $0.auditHead() }
            #expect(head.head == linked.head)
            #expect(head.anchor == anchor)
            var stored: [AuditRecord] = []
            while stored.count < events.count {
                let page = try await store.read {
                    try await $0.auditRecords(after: stored.last?.sequence ?? 0, limit: 1_000)
                }
                if page.isEmpty { break }
                stored += page
            }
            #expect(stored == linked.records)
            #expect(try await store.read { try await $0.auditCheckpoints(after: 0, limit: 10) } == [anchor])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentAuditAppendsStayOneChain(kind: StoreKind) async throws {
        try await withStore(kind, "audit_concurrent") { store in
            let writers = 8
            let appendsPerWriter = 5
            try await withThrowingTaskGroup(of: Void.self) { group in
                for writer in 0..<writers {
                    group.addTask {
                        for index in 0..<appendsPerWriter {
                            try await store.transaction { transaction in
                                let current = try await transaction.lockAuditHead().head
                                let linked = AuditChain.link(
                                    [
                                        AuditEvent(
                                            principal: Principal("writer-\(writer)"),
                                            tenant: nil,
                                            operation: .encrypt,
                                            requestID: "\(writer)-\(index)"
                                        )
                                    ],
                                    after: current
                                )
                                try await transaction.appendAuditRecords(linked.records, head: linked.head)
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let head = try await store.read { try await $0.auditHead().head }
            let all = try await store.read { try await $0.auditRecords(after: 0, limit: 1000) }
            #expect(head.sequence == Int64(writers * appendsPerWriter))
            #expect(AuditChain.verify(all, head: head) == .verified(records: head.sequence, head: head))
        }
    }

    // MARK: Transactions

    @Test(arguments: StoreKind.allCases)
    func aFailingSavepointKeepsTheRestOfTheTransaction(kind: StoreKind) async throws {
        try await withStore(kind, "savepoint") { store in
            try await store.transaction { transaction in
                try await transaction.insertTenant(tenantRecord("kept-1"))
                // A body that throws: its own insert is undone.
                await #expect(throws: TestFailure.self) {
                    try await transaction.savepoint {
                        try await transaction.insertTenant(tenantRecord("undone"))
                        throw TestFailure()
                    }
                }
                // A statement that fails: the transaction goes on.
                let error = await #expect(throws: StorageError.self) {
                    try await transaction.savepoint {
                        try await transaction.insertTenant(tenantRecord("kept-1"))
                    }
                }
                #expect(error?.kind == .uniqueViolation)
                // Nested: the inner failure leaves the outer savepoint's work.
                try await transaction.savepoint {
                    try await transaction.insertTenant(tenantRecord("kept-2"))
                    _ = try? await transaction.savepoint {
                        try await transaction.insertTenant(tenantRecord("kept-2"))
                    }
                }
                let value = try await transaction.savepoint { 42 }
                #expect(value == 42)
                try await transaction.insertTenant(tenantRecord("kept-3"))
            }
            let ids = try await store.read { try await $0.tenants(after: nil, limit: 10) }.map(\.id.rawValue)
            #expect(ids == ["kept-1", "kept-2", "kept-3"])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aThrowingBodyRollsEverythingBack(kind: StoreKind) async throws {
        try await withStore(kind, "rollback") { store in
            let tenant = try await seedTenant(store, "acme", versions: 1)
            let key = dataKey(tenant, version: 1)
            await #expect(throws: TestFailure.self) {
                try await store.transaction { transaction in
                    try await transaction.insertTenant(tenantRecord("ghost"))
                    try await transaction.insertDataKeys([key])
                    _ = try await transaction.reserveInvocations(tenant, 1, count: 5, limit: 100)
                    let current = try await transaction.lockAuditHead().head
                    let linked = AuditChain.link(
                        [AuditEvent(principal: .system, tenant: tenant, operation: .encrypt, requestID: "x")],
                        after: current
                    )
                    try await transaction.appendAuditRecords(linked.records, head: linked.head)
                    throw TestFailure()
                }
            }
            #expect(try await store.read { try await $0.tenant(TenantID(trusted: "ghost"), forUpdate: false) } == nil)
            #expect(try await store.read { try await $0.dataKey(tenant, key.id) } == nil)
            #expect(try await store.read { try await $0.masterKeyVersion(tenant, 1) }?.invocationsReserved == 0)
            #expect(try await store.read { try await $0.auditHead().head } == .genesis)
            #expect(try await store.read { try await $0.auditRecords(after: 0, limit: 10) } == [])
            // The store is still usable afterwards.
            try await store.transaction { try await $0.insertTenant(tenantRecord("after")) }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aClosedStoreIsUnavailable(kind: StoreKind) async throws {
        let store = try await kind.makeStore("closed")
        try await store.transaction { try await $0.insertTenant(tenantRecord("acme")) }
        await store.close()
        await expectStorageError(.unavailable) {
            _ = try await store.read { try await $0.tenants(after: nil, limit: 1) }
        }
        await expectStorageError(.unavailable) {
            try await store.transaction { try await $0.insertTenant(tenantRecord("late")) }
        }
        await store.close()  // twice is harmless
    }
}

// MARK: - Fixtures

/// 2023-11-14T22:13:20.123Z: above 2^32 ms, so a 32-bit column would truncate it.
private let t0 = Timestamp(millisecondsSinceEpoch: 1_700_000_000_123)
private let later = Timestamp(millisecondsSinceEpoch: 1_700_000_360_456)

private struct TestFailure: Error {}

private func randomBytes(_ count: Int) -> [UInt8] {
    (0..<count).map { _ in UInt8.random(in: 0...255) }
}

private func tenantRecord(_ id: String) -> TenantRecord {
    TenantRecord(id: TenantID(trusted: id), state: .enabled, primaryVersion: 1, createdAt: t0, updatedAt: t0)
}

private func dataKey(_ tenant: TenantID, version: Int, state: DataKeyState = .enabled) -> DataKeyRecord {
    DataKeyRecord(
        tenant: tenant,
        id: .random(),
        version: version,
        state: state,
        wrapped: state == .destroyed ? nil : randomBytes(60),
        contextHash: randomBytes(32),
        encryptions: Int64.random(in: 0...1000),
        createdAt: t0,
        updatedAt: later
    )
}

/// A tenant with `versions` active master-key versions 1...versions.
private func seedTenant(_ store: any KeyRepository, _ id: String, versions: Int) async throws -> TenantID {
    let tenant = TenantID(trusted: id)
    try await store.transaction { transaction in
        try await transaction.insertTenant(
            TenantRecord(id: tenant, state: .enabled, primaryVersion: versions, createdAt: t0, updatedAt: t0)
        )
        for version in stride(from: 1, through: versions, by: 1) {
            try await transaction.insertMasterKeyVersion(
                MasterKeyVersionRecord(
                    tenant: tenant,
                    version: version,
                    state: .active,
                    tokenKeyID: TokenKeyID.random(),
                    createdAt: t0,
                    updatedAt: t0
                )
            )
        }
    }
    return tenant
}

/// Runs `body` on a fresh store of `kind` and closes it afterwards.
func withStore<T>(
    _ kind: StoreKind,
    _ name: String,
    _ body: (any KeyRepository) async throws -> T
) async throws -> T {
    let store = try await kind.makeStore(name)
    do {
        let value = try await body(store)
        await store.close()
        return value
    } catch {
        await store.close()
        throw error
    }
}

/// Expects `body` to throw a `StorageError` of `kind`.
func expectStorageError(
    _ kind: StorageError.Kind,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async {
    do {
        try await body()
        Issue.record("expected StorageError(.\(kind)), nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as StorageError {
        #expect(error.kind == kind, "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected StorageError(.\(kind)), got \(error)", sourceLocation: sourceLocation)
    }
}
