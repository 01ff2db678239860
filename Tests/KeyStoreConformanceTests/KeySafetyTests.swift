import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

/// Security invariant 3 against a database that rewinds or lies: IVs never repeat whatever the
/// database does (restores, edited counters), a master key found by `CKA_ID` must be the one of
/// its tenant and version, and old blobs keep decrypting.
@Suite("Key safety against a database that rewinds or lies")
struct KeySafetyTests {
    /// A data key handed to a caller: what it must still decrypt to.
    struct Acknowledged: Sendable {
        let key: GeneratedDataKey
        var blob: WrappedDataKey { WrappedDataKey(encoded: key.wrapped)! }
    }

    /// `count` data keys from `tasks` concurrent callers.
    static func generate(
        _ service: KeyService,
        _ tenant: TenantID,
        count: Int,
        tasks: Int = 8
    ) async throws -> [Acknowledged] {
        try await withThrowingTaskGroup(of: [Acknowledged].self) { group in
            for task in 0..<tasks {
                group.addTask {
                    var keys: [Acknowledged] = []
                    for _ in stride(from: task, to: count, by: tasks) {
                        keys.append(Acknowledged(key: try await service.generateDataKey(tenant, request: app)))
                    }
                    return keys
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
    }

    /// Wrapped blobs that share a (version, IV) pair: under one label-version, the same IV twice.
    static func duplicateIVs(_ keys: [Acknowledged]) -> Int {
        var seen: Set<[UInt8]> = []
        var duplicates = 0
        for key in keys {
            let blob = key.blob
            var pair = [UInt8](repeating: 0, count: 4)
            for index in 0..<4 { pair[index] = UInt8(truncatingIfNeeded: blob.version >> (24 - 8 * index)) }
            if !seen.insert(pair + blob.iv).inserted { duplicates += 1 }
        }
        return duplicates
    }

    /// A backup taken while callers generate keys, more keys, the backup restored, more keys: no
    /// IV is used twice under one master-key version, and every key acknowledged before the backup
    /// still decrypts. The invocation limit makes the tenant rotate after the backup, so the
    /// restored database has forgotten that version and rotates to the same version number again
    /// (a new token object under the same label).
    @Test(arguments: StoreKind.allCases)
    func restoredBackupNeverRepeatsAnIV(kind: StoreKind) async throws {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken("restore-\(kind)")
        var poolConfiguration = SessionPoolConfiguration()
        poolConfiguration.maximumSessions = 4
        let pool = try await SessionPool(
            module: fixture.module, tokenLabel: testToken.label, pin: testToken.pin, configuration: poolConfiguration)
        defer { Task { await pool.shutdown() } }
        let token = PKCS11KeyToken(pool: pool)
        var configuration = KeyServiceConfiguration()
        configuration.invocationLimit = 500
        let location = try await StoreLocation.make(kind, "restore")
        var store = try await location.open()
        var service = try KeyService(token: token, repository: store, configuration: configuration)
        let tenant = tenantID("restored")
        _ = try await service.createTenant(tenant, request: admin)

        let beforeBackup = try await Self.generate(service, tenant, count: 300)
        // The backup is taken while four callers keep generating.
        let running = service
        async let during = Self.generate(running, tenant, count: 100, tasks: 4)
        let backup = try await location.backup(store)
        let duringBackup = try await during
        let afterBackup = try await Self.generate(service, tenant, count: 300)
        #expect(Set(afterBackup.map(\.key.version)).contains(2), "the tenant rotated after the backup")

        await store.close()
        try await location.restore(from: backup)
        store = try await location.open()
        service = try KeyService(token: token, repository: store, configuration: configuration)
        #expect(try await service.checkAuditAnchor() != .empty)
        let afterRestore = try await Self.generate(service, tenant, count: 300)
        #expect(Set(afterRestore.map(\.key.version)).contains(2), "the restored tenant rotated to v2 again")

        let all = beforeBackup + duringBackup + afterBackup + afterRestore
        let duplicates = Self.duplicateIVs(all)
        print(
            "restore test (\(kind)): \(all.count) keys generated, \(all.count) IVs checked, \(duplicates) duplicates; "
                + "versions: \(Dictionary(grouping: all, by: \.key.version).mapValues(\.count).sorted { $0.key < $1.key })"
        )
        #expect(all.count == 1000)
        #expect(duplicates == 0)
        // Two token objects carry the label of v2: the one the restore forgot and the new one.
        #expect(try await token.masterKeyLabels(labelPrefix: "hsmgw:mk:restored:v2").count == 2)

        // Every key acknowledged before the backup decrypts, and so does every key made since.
        for acknowledged in beforeBackup + afterRestore {
            let decrypted = try await service.decryptDataKey(tenant, id: acknowledged.key.id, request: app)
            #expect(decrypted.plaintext.copyBytes() == acknowledged.key.plaintext?.copyBytes())
        }
        // What was acknowledged after the backup is not in the restored database (issue 14 lets
        // callers bring their wrapped blobs back); it is gone, never mixed up with another key.
        for acknowledged in afterBackup.prefix(20) {
            let error = await serviceError {
                try await service.decryptDataKey(tenant, id: acknowledged.key.id, request: app)
            }
            #expect(error?.code == .notFound)
        }
        #expect(try await service.verifyAuditLog().isVerified)
        await store.close()
    }

    /// Someone with write access sets the invocation count back to 0: new wraps still never
    /// reuse an IV (uniqueness does not rest on the count), and the count is a rotation budget only.
    @Test(arguments: StoreKind.allCases)
    func counterEditedDownRepeatsNoIV(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "counter")
        defer { Task { await harness.close() } }
        let tenant = tenantID("counter")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let first = try await Self.generate(harness.service, tenant, count: 200)
        #expect(try await harness.service.masterKeyVersions(tenant)[0].invocationsReserved == 200)
        try await harness.sql("UPDATE master_key_versions SET invocations_reserved = 0")
        let restarted = try harness.restarted()
        let second = try await Self.generate(restarted, tenant, count: 200)
        #expect(Self.duplicateIVs(first + second) == 0)
        #expect(Set((first + second).map(\.key.version)) == [1])
        #expect(try await restarted.masterKeyVersions(tenant)[0].invocationsReserved == 200)
        // IVs are random (NIST SP 800-38D §8.2.2), not the old fixed field and counter.
        #expect((first + second).filter { Array($0.blob.iv.prefix(4)) == [0, 0, 0, 1] }.count <= 1)
    }

    /// A blob written before IVs were random (fixed field 00000001 and a counter, format 1) still
    /// decrypts, rewraps (to a random IV) and serves Encrypt.
    @Test(arguments: StoreKind.allCases)
    func counterIVBlobsStillDecrypt(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "oldblob")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("oldblob")
        _ = try await service.createTenant(tenant, request: admin)
        let version = try await service.masterKeyVersions(tenant)[0]
        let context: EncryptionContext = ["purpose": "legacy"]
        let id = DataKeyID.random()
        let plaintext = (0..<32).map { UInt8($0 * 7 % 256) }
        let iv: [UInt8] = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 42]
        let aad = WrappedDataKey.aad(tenant: tenant, dataKeyID: id, version: 1, contextHash: context.hash)
        let tokenKeyID = version.tokenKeyID
        let sealed = try await harness.pool.withSession { session in
            let handle = try #require(try session.findMasterKey(id: tokenKeyID.bytes))
            return try session.encryptAESGCM(key: handle, iv: iv, aad: aad, plaintext: plaintext)
        }
        let now = Timestamp.now()
        let blob = WrappedDataKey(version: 1, dataKeyID: id, iv: iv, ciphertextAndTag: sealed)
        try await harness.store.transaction {
            try await $0.insertDataKeys([
                DataKeyRecord(
                    tenant: tenant, id: id, version: 1, state: .enabled, wrapped: blob.encoded,
                    contextHash: context.hash, createdAt: now, updatedAt: now)
            ])
        }
        #expect(
            try await service.decryptDataKey(tenant, id: id, context: context, request: app).plaintext.copyBytes()
                == plaintext)
        let ciphertext = try await service.encrypt(
            tenant, dataKey: id, plaintext: [1, 2, 3], context: context, request: app)
        _ = try await service.rotateMasterKey(tenant, request: admin)
        let moved = try await service.rewrapDataKey(tenant, id: id, context: context, request: app)
        #expect(moved.version == 2)
        #expect(WrappedDataKey(encoded: moved.wrapped!)!.iv != iv)
        #expect(
            try await service.decryptDataKey(tenant, id: id, context: context, request: app).plaintext.copyBytes()
                == plaintext)
        #expect(try await service.decrypt(tenant, ciphertext: ciphertext, context: context, request: app) == [1, 2, 3])
    }

    /// Tenant A's version row pointed at tenant B's key (and B's at A's, since `token_key_id` is
    /// unique): every use is refused with `dataLoss`, audited as a binding violation, and works
    /// again once the rows are put right. Run with a warm handle cache (a restarted service on the
    /// same token adapter) and a cold one (a new adapter).
    @Test(arguments: StoreKind.allCases, [true, false])
    func versionPointedAtAnotherTenantsKeyIsRefused(kind: StoreKind, warmAdapter: Bool) async throws {
        let harness = try await ServiceHarness.make(kind, "bindkey")
        defer { Task { await harness.close() } }
        let a = tenantID("alpha")
        let b = tenantID("beta")
        _ = try await harness.service.createTenant(a, request: admin)
        _ = try await harness.service.createTenant(b, request: admin)
        let keyOfA = try await harness.service.generateDataKey(a, request: app)
        let keyOfB = try await harness.service.generateDataKey(b, request: app)
        let idOfA = try await harness.service.masterKeyVersions(a)[0].tokenKeyID
        let idOfB = try await harness.service.masterKeyVersions(b)[0].tokenKeyID

        func swapKeys(_ first: TokenKeyID, _ second: TokenKeyID) async throws {
            let placeholder = blobLiteral(harness.kind, [UInt8](repeating: 0xEE, count: 16))
            try await harness.sql(
                "UPDATE master_key_versions SET token_key_id = \(placeholder) WHERE tenant_id = 'alpha'")
            try await harness.sql(
                "UPDATE master_key_versions SET token_key_id = \(blobLiteral(harness.kind, first.bytes)) WHERE tenant_id = 'beta'"
            )
            try await harness.sql(
                "UPDATE master_key_versions SET token_key_id = \(blobLiteral(harness.kind, second.bytes)) WHERE tenant_id = 'alpha'"
            )
        }
        try await swapKeys(idOfA, idOfB)
        let service =
            warmAdapter
            ? try harness.restarted()
            : try KeyService(
                token: PKCS11KeyToken(pool: harness.pool), repository: harness.store,
                configuration: harness.service.configuration)

        let generate = await serviceError { try await service.generateDataKey(a, request: app) }
        #expect(generate?.code == .dataLoss)
        #expect(generate?.message.contains("binding") == true)
        let decrypt = await serviceError { try await service.decryptDataKey(a, id: keyOfA.id, request: app) }
        #expect(decrypt?.code == .dataLoss)
        let decryptB = await serviceError { try await service.decryptDataKey(b, id: keyOfB.id, request: app) }
        #expect(decryptB?.code == .dataLoss)
        // The token never encrypted under the wrong key: nothing of A was stored.
        #expect(try await service.listDataKeys(a).items.map(\.id) == [keyOfA.id])

        let violations = try await harness.auditRecords().filter { $0.event.operation == .keyBindingViolation }
        #expect(Set(violations.compactMap(\.event.tenant)) == [a, b])
        #expect(
            violations.allSatisfy { $0.event.outcome == .failure("binding-violation") && $0.event.keyIDs == ["v1"] })

        // Put right: the cached references were dropped, so the rows are read again.
        try await swapKeys(idOfB, idOfA)
        #expect(
            try await service.decryptDataKey(a, id: keyOfA.id, request: app).plaintext.copyBytes()
                == keyOfA.plaintext?.copyBytes())
        _ = try await service.generateDataKey(a, request: app)
        _ = try await service.decryptDataKey(b, id: keyOfB.id, request: app)
        #expect(try await service.verifyAuditLog().isVerified)
    }

    /// ReWrap binds the new wrapping to the context the caller just proved, not to the stored
    /// context hash, which a database writer may have changed; the stored hash is repaired.
    @Test(arguments: StoreKind.allCases)
    func rewrapBindsToTheProvenContext(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "rewrapctx")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("rewrapctx")
        _ = try await service.createTenant(tenant, request: admin)
        let context: EncryptionContext = ["order": "1001"]
        let attackers: EncryptionContext = ["order": "evil"]
        let key = try await service.generateDataKey(tenant, context: context, request: app)
        try await harness.sql(
            "UPDATE data_keys SET context_hash = \(blobLiteral(kind, attackers.hash)) WHERE id = '\(key.id)'")
        _ = try await service.rotateMasterKey(tenant, request: admin)

        let moved = try await service.rewrapDataKey(tenant, id: key.id, context: context, request: app)
        #expect(moved.version == 2)
        #expect(moved.contextHash == context.hash)
        #expect(try await service.dataKey(tenant, id: key.id).contextHash == context.hash)
        #expect(
            try await service.decryptDataKey(tenant, id: key.id, context: context, request: app).plaintext.copyBytes()
                == key.plaintext?.copyBytes())
        let rebound = await serviceError {
            try await service.decryptDataKey(tenant, id: key.id, context: attackers, request: app)
        }
        #expect(rebound?.code == .decryptionFailed)
        let audit = try await harness.auditRecords().last { $0.event.operation == .rewrapDataKey }
        #expect(audit?.event.detail.contains("context-hash-repaired=1") == true)
    }

    /// Every byte of 50 Encrypt outputs flipped, the ciphertext truncated, and another tenant's
    /// ciphertext: one identical answer for all (no oracle for which byte changed or whether a
    /// key id exists).
    @Test(arguments: StoreKind.allCases)
    func tamperedAndForeignCiphertextsGetOneAnswer(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "oracle")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("oracle")
        let other = tenantID("oracle2")
        _ = try await service.createTenant(tenant, request: admin)
        _ = try await service.createTenant(other, request: admin)
        let context: EncryptionContext = ["row": "7"]
        let key = try await service.generateDataKey(tenant, context: context, request: app)
        let otherKey = try await service.generateDataKey(other, request: app)
        var answers: [String: Int] = [:]
        func record(_ error: KeyServiceError?) {
            answers["\(error?.code.description ?? "none")|\(error?.message ?? "")", default: 0] += 1
        }
        var ciphertexts: [[UInt8]] = []
        for index in 0..<50 {
            ciphertexts.append(
                try await service.encrypt(
                    tenant, dataKey: key.id, plaintext: Array("message \(index)".utf8), context: context, request: app))
        }
        var attempts = 0
        for ciphertext in ciphertexts {
            for position in ciphertext.indices {
                var tampered = ciphertext
                tampered[position] ^= 0x01 << UInt8(position % 8)
                attempts += 1
                record(
                    await serviceError {
                        try await service.decrypt(tenant, ciphertext: tampered, context: context, request: app)
                    })
            }
        }
        for cut in [0, 1, 2, 3, 18, 19, 30, 31, 46] {
            attempts += 1
            record(
                await serviceError {
                    try await service.decrypt(
                        tenant, ciphertext: Array(ciphertexts[0].prefix(cut)), context: context, request: app)
                })
        }
        let foreign = try await service.encrypt(other, dataKey: otherKey.id, plaintext: [9], request: app)
        attempts += 1
        record(await serviceError { try await service.decrypt(tenant, ciphertext: foreign, request: app) })
        #expect(answers == ["decryption failed|decryption failed": attempts])
        #expect(attempts > 50 * 31)
    }
}
