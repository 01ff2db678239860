import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SQLiteKeyStore
import SoftHSMTestSupport
import Testing

/// Tenant → data keys → decrypt, batches, Encrypt/Decrypt, idempotency and states, on both stores.
@Suite("Key hierarchy end to end")
struct HierarchyTests {
    @Test(arguments: StoreKind.allCases)
    func tenantDataKeyDecrypt(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "e2e")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("acme")

        let created = try await service.createTenant(tenant, request: admin)
        #expect(created.state == .enabled)
        #expect(created.primaryVersion == 1)
        let versions = try await service.masterKeyVersions(tenant)
        #expect(versions.map(\.state) == [.active])
        #expect(try await harness.masterKeyLabels() == ["hsmgw:mk:acme:v1"])

        let context: EncryptionContext = ["purpose": "invoices", "region": "eu"]
        let generated = try await service.generateDataKey(tenant, context: context, request: app)
        #expect(generated.version == 1)
        #expect(generated.wrapped.count == WrappedDataKey.encodedByteCount)
        let plaintext = try #require(generated.plaintext)
        #expect(plaintext.count == 32)

        let decrypted = try await service.decryptDataKey(tenant, id: generated.id, context: context, request: app)
        #expect(decrypted.plaintext.copyBytes() == plaintext.copyBytes())
        #expect(decrypted.version == 1)

        // The stored row matches what was returned; no plaintext anywhere in it.
        let row = try await service.dataKey(tenant, id: generated.id)
        #expect(row.wrapped == generated.wrapped)
        #expect(row.contextHash == context.hash)
        #expect(row.state == .enabled)

        let withoutPlaintext = try await service.generateDataKey(
            tenant,
            context: context,
            includePlaintext: false,
            request: app
        )
        #expect(withoutPlaintext.plaintext == nil)
        let later = try await service.decryptDataKey(tenant, id: withoutPlaintext.id, context: context, request: app)
        #expect(later.plaintext.count == 32)
        #expect(later.plaintext.copyBytes() != plaintext.copyBytes())

        // Another tenant sees nothing of acme's.
        let other = tenantID("globex")
        _ = try await service.createTenant(other, request: admin)
        let foreign = await serviceError {
            try await service.decryptDataKey(other, id: generated.id, context: context, request: app)
        }
        #expect(foreign?.code == .notFound)
        #expect(try await service.listDataKeys(other).items.isEmpty)

        let tenants = try await service.listTenants(PageRequest(limit: 1))
        #expect(tenants.items.map(\.id) == [tenant])
        let rest = try await service.listTenants(PageRequest(after: tenants.nextPage, limit: 10))
        #expect(rest.items.map(\.id) == [other])
        #expect(rest.nextPage == nil)

        #expect(try await service.verifyAuditLog().isVerified)
    }

    @Test(arguments: StoreKind.allCases)
    func batches(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "batch")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("batch")
        _ = try await service.createTenant(tenant, request: admin)
        let context: EncryptionContext = ["job": "nightly"]

        let keys = try await service.generateDataKeys(tenant, count: 1000, context: context, request: app)
        #expect(keys.count == 1000)
        #expect(Set(keys.map(\.id)).count == 1000)
        let results = try await service.decryptDataKeys(
            tenant,
            keys.map { DataKeyRequest(id: $0.id, context: context) },
            request: app
        )
        for (key, result) in zip(keys, results) {
            #expect(try result.get().plaintext.copyBytes() == key.plaintext!.copyBytes())
        }

        let tooMany = await serviceError {
            try await service.generateDataKeys(tenant, count: 1001, request: app)
        }
        #expect(tooMany?.code == .invalidArgument)
        let none = await serviceError { try await service.generateDataKeys(tenant, count: 0, request: app) }
        #expect(none?.code == .invalidArgument)
        let tooManyIDs = await serviceError {
            try await service.decryptDataKeys(
                tenant,
                Array(repeating: DataKeyRequest(id: keys[0].id, context: context), count: 1001),
                request: app
            )
        }
        #expect(tooManyIDs?.code == .invalidArgument)

        // Mixed batch: each entry succeeds or fails on its own.
        let mixed = try await service.decryptDataKeys(
            tenant,
            [
                DataKeyRequest(id: keys[0].id, context: context),
                DataKeyRequest(id: keys[1].id, context: ["job": "other"]),
                DataKeyRequest(id: DataKeyID.random(), context: context),
                DataKeyRequest(id: keys[2].id, context: context),
            ],
            request: app
        )
        #expect((try? mixed[0].get()) != nil)
        #expect(mixed[1].failureCode == .decryptionFailed)
        #expect(mixed[2].failureCode == .notFound)
        #expect((try? mixed[3].get()) != nil)

        // Listing pages through all 1,000 in id order.
        var seen: [DataKeyID] = []
        var page = PageRequest(limit: 300)
        while true {
            let result = try await service.listDataKeys(tenant, page: page)
            seen += result.items.map(\.id)
            guard let next = result.nextPage else { break }
            page = PageRequest(after: next, limit: 300)
        }
        #expect(seen == keys.map(\.id).sorted())
        let badPage = await serviceError { try await service.listDataKeys(tenant, page: PageRequest(limit: 1001)) }
        #expect(badPage?.code == .invalidArgument)
    }

    @Test(arguments: StoreKind.allCases)
    func encryptDecryptPayloads(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "payload")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("payload")
        _ = try await service.createTenant(tenant, request: admin)
        let context: EncryptionContext = ["record": "42"]
        let key = try await service.generateDataKey(tenant, context: context, includePlaintext: false, request: app)

        for size in [0, 1, 1000, PayloadCiphertext.maximumPlaintextByteCount] {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            let ciphertext = try await service.encrypt(
                tenant,
                dataKey: key.id,
                plaintext: payload,
                context: context,
                request: app
            )
            #expect(ciphertext.count == PayloadCiphertext.headerByteCount + size + PayloadCiphertext.tagByteCount)
            let opened = try await service.decrypt(tenant, ciphertext: ciphertext, context: context, request: app)
            #expect(opened == payload)
        }

        let tooLarge = await serviceError {
            try await service.encrypt(
                tenant,
                dataKey: key.id,
                plaintext: [UInt8](repeating: 1, count: PayloadCiphertext.maximumPlaintextByteCount + 1),
                context: context,
                request: app
            )
        }
        #expect(tooLarge?.code == .invalidArgument)
        #expect(tooLarge?.message.contains("65536") == true)
        let oversizedCiphertext = await serviceError {
            try await service.decrypt(
                tenant,
                ciphertext: [UInt8](repeating: 0, count: PayloadCiphertext.maximumCiphertextByteCount + 1),
                context: context,
                request: app
            )
        }
        #expect(oversizedCiphertext?.code == .invalidArgument)

        let ciphertext = try await service.encrypt(
            tenant,
            dataKey: key.id,
            plaintext: Array("attack at dawn".utf8),
            context: context,
            request: app
        )
        // Every byte after the header flipped, and a wrong context, fail without plaintext.
        for index in stride(from: PayloadCiphertext.headerByteCount - 12, to: ciphertext.count, by: 3) {
            var tampered = ciphertext
            tampered[index] ^= 0x01
            let error = await serviceError {
                try await service.decrypt(tenant, ciphertext: tampered, context: context, request: app)
            }
            #expect(error?.code == .decryptionFailed)
        }
        let wrongContext = await serviceError {
            try await service.decrypt(tenant, ciphertext: ciphertext, context: ["record": "43"], request: app)
        }
        #expect(wrongContext?.code == .decryptionFailed)
        let truncated = await serviceError {
            try await service.decrypt(tenant, ciphertext: Array(ciphertext.prefix(20)), context: context, request: app)
        }
        // A truncated ciphertext is one more way to tamper with it: the same answer as the rest.
        #expect(truncated?.code == .decryptionFailed)
        #expect(truncated?.message == "decryption failed")

        // The data key's encryption count is kept.
        #expect(try await service.dataKey(tenant, id: key.id).encryptions == 5)
    }

    @Test(arguments: StoreKind.allCases)
    func encryptionLimitPerDataKey(kind: StoreKind) async throws {
        var configuration = KeyServiceConfiguration()
        configuration.dataKeyEncryptionLimit = 3
        let harness = try await ServiceHarness.make(kind, "enclimit", configuration: configuration)
        defer { Task { await harness.close() } }
        let tenant = tenantID("limit")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let key = try await harness.service.generateDataKey(tenant, request: app)
        for _ in 0..<3 {
            _ = try await harness.service.encrypt(tenant, dataKey: key.id, plaintext: [1, 2, 3], request: app)
        }
        let fourth = await serviceError {
            try await harness.service.encrypt(tenant, dataKey: key.id, plaintext: [1, 2, 3], request: app)
        }
        #expect(fourth?.code == .resourceExhausted)
    }

    @Test(arguments: StoreKind.allCases)
    func idempotentRetries(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "idem")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("idem")
        let first = try await service.createTenant(tenant, idempotencyKey: "create-1", request: admin)
        let again = try await service.createTenant(tenant, idempotencyKey: "create-1", request: admin)
        #expect(first == again)
        #expect(try await harness.masterKeyLabels().count == 1)

        let context: EncryptionContext = ["a": "b"]
        let key = try await service.generateDataKey(tenant, context: context, idempotencyKey: "gen-1", request: app)
        let retried = try await service.generateDataKey(tenant, context: context, idempotencyKey: "gen-1", request: app)
        #expect(retried.id == key.id)
        #expect(retried.wrapped == key.wrapped)
        #expect(retried.plaintext?.copyBytes() == key.plaintext?.copyBytes())
        #expect(try await service.listDataKeys(tenant).items.count == 1)

        // The same key with other parameters is refused, not silently answered.
        let reused = await serviceError {
            try await service.generateDataKey(tenant, context: ["a": "c"], idempotencyKey: "gen-1", request: app)
        }
        #expect(reused?.code == .alreadyExists)

        // Concurrent retries of one call create one key.
        let ids = try await withThrowingTaskGroup(of: DataKeyID.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    try await service.generateDataKey(tenant, context: context, idempotencyKey: "gen-2", request: app)
                        .id
                }
            }
            return try await group.reduce(into: Set<DataKeyID>()) { $0.insert($1) }
        }
        #expect(ids.count == 1)
        #expect(try await service.listDataKeys(tenant).items.count == 2)

        let rotated = try await service.rotateMasterKey(tenant, idempotencyKey: "rot-1", request: admin)
        let rotatedAgain = try await service.rotateMasterKey(tenant, idempotencyKey: "rot-1", request: admin)
        #expect(rotated.version == 2)
        #expect(rotatedAgain.version == 2)
        #expect(try await service.masterKeyVersions(tenant).count == 2)

        let batch = try await service.generateDataKeys(tenant, count: 5, idempotencyKey: "gen-3", request: app)
        let batchAgain = try await service.generateDataKeys(tenant, count: 5, idempotencyKey: "gen-3", request: app)
        #expect(batch.map(\.id) == batchAgain.map(\.id))
        let badKey = await serviceError {
            try await service.generateDataKey(tenant, idempotencyKey: String(repeating: "k", count: 129), request: app)
        }
        #expect(badKey?.code == .invalidArgument)
    }

    @Test(arguments: StoreKind.allCases)
    func dataKeyAndTenantStates(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "states")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("states")
        _ = try await service.createTenant(tenant, request: admin)
        let key = try await service.generateDataKey(tenant, request: app)

        #expect(try await service.disableDataKey(tenant, id: key.id, request: admin).state == .disabled)
        #expect(
            await serviceError { try await service.decryptDataKey(tenant, id: key.id, request: app) }?.code
                == .failedPrecondition)
        #expect(
            await serviceError { try await service.encrypt(tenant, dataKey: key.id, plaintext: [1], request: app) }?
                .code == .failedPrecondition
        )
        #expect(
            await serviceError { try await service.disableDataKey(tenant, id: key.id, request: admin) }?.code
                == .failedPrecondition)
        #expect(try await service.enableDataKey(tenant, id: key.id, request: admin).state == .enabled)
        #expect(try await service.decryptDataKey(tenant, id: key.id, request: app).plaintext.count == 32)
        #expect(try await service.listDataKeys(tenant, state: .disabled).items.isEmpty)

        let destroyed = try await service.destroyDataKey(tenant, id: key.id, request: admin)
        #expect(destroyed.state == .destroyed)
        #expect(destroyed.wrapped == nil)
        #expect(try await service.dataKey(tenant, id: key.id).wrapped == nil)
        #expect(
            await serviceError { try await service.decryptDataKey(tenant, id: key.id, request: app) }?.code
                == .failedPrecondition)
        #expect(
            await serviceError { try await service.enableDataKey(tenant, id: key.id, request: admin) }?.code
                == .failedPrecondition)
        #expect(
            await serviceError { try await service.destroyDataKey(tenant, id: key.id, request: admin) }?.code
                == .failedPrecondition)
        #expect(try await service.listDataKeys(tenant, state: .destroyed).items.map(\.id) == [key.id])

        let second = try await service.generateDataKey(tenant, request: app)
        _ = try await service.disableTenant(tenant, request: admin)
        #expect(
            await serviceError { try await service.generateDataKey(tenant, request: app) }?.code == .failedPrecondition)
        #expect(
            await serviceError { try await service.decryptDataKey(tenant, id: second.id, request: app) }?.code
                == .failedPrecondition)
        _ = try await service.enableTenant(tenant, request: admin)
        #expect(try await service.decryptDataKey(tenant, id: second.id, request: app).plaintext.count == 32)
        #expect(await serviceError { try await service.createTenant(tenant, request: admin) }?.code == .alreadyExists)
        #expect(await serviceError { try await service.tenant(tenantID("nobody")) }?.code == .notFound)
    }
}

extension AuditVerification {
    var isVerified: Bool {
        if case .verified = self { return true }
        return false
    }

    var problem: AuditProblem? {
        if case .broken(let problem) = self { return problem }
        return nil
    }
}

extension AuditLogVerification {
    /// The chain and every checkpoint hold, and the head is anchored.
    var isVerified: Bool { result.isVerified }
    var problem: AuditProblem? { result.problem }
}

extension Result where Failure == KeyServiceError {
    var failureCode: KeyServiceError.Code? {
        if case .failure(let error) = self { return error.code }
        return nil
    }
}

/// Security invariant 4 at the storage level: the SQLite file (and its WAL) never holds a data
/// key's plaintext or an encryption context value, byte for byte.
@Suite("Nothing secret at rest")
struct NothingSecretAtRestTests {
    @Test func sqliteFileHoldsNoPlaintextKeysOrContextValues() async throws {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken("at-rest")
        let pool = try await SessionPool(module: fixture.module, tokenLabel: testToken.label, pin: testToken.pin)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-at-rest-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        )
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("keys.sqlite").path
        let store = try await SQLiteKeyStore.open(path: path)
        let service = try KeyService(token: PKCS11KeyToken(pool: pool), repository: store)
        let tenant = tenantID("at-rest")
        _ = try await service.createTenant(tenant, request: admin)
        let secretValue = "context-value-that-must-not-be-stored"
        let context: EncryptionContext = ["owner": secretValue]
        let keys = try await service.generateDataKeys(tenant, count: 50, context: context, request: app)
        let payload = Array("payload-that-must-not-be-stored".utf8)
        _ = try await service.encrypt(tenant, dataKey: keys[0].id, plaintext: payload, context: context, request: app)
        _ = try await service.decryptDataKey(tenant, id: keys[1].id, context: context, request: app)

        var bytes: [UInt8] = []
        for suffix in ["", "-wal"] {
            if let data = FileManager.default.contents(atPath: path + suffix) { bytes += data }
        }
        #expect(bytes.count > 0)
        let plaintexts = try keys.map { try #require($0.plaintext).copyBytes() }
        let secrets = plaintexts + [Array(secretValue.utf8), payload]
        #expect(bytes.occurrences(of: secrets).isEmpty)
        // The wrapped copies are there: the scan does find what is stored.
        #expect(bytes.occurrences(of: keys.map(\.wrapped)).count == keys.count)
        await store.close()
        await pool.shutdown()
    }
}

extension Array where Element == UInt8 {
    /// Which of `needles` (each at least 8 bytes) occur in `self`: one pass over the haystack,
    /// matching 8-byte prefixes first.
    func occurrences(of needles: [[UInt8]]) -> Set<[UInt8]> {
        func prefix(_ bytes: UnsafeBufferPointer<UInt8>, _ at: Int) -> UInt64 {
            var value: UInt64 = 0
            for offset in 0..<8 { value = value << 8 | UInt64(bytes[at + offset]) }
            return value
        }
        var byPrefix: [UInt64: [[UInt8]]] = [:]
        for needle in needles where needle.count >= 8 {
            byPrefix[needle.withUnsafeBufferPointer { prefix($0, 0) }, default: []].append(needle)
        }
        var found: Set<[UInt8]> = []
        withUnsafeBufferPointer { haystack in
            guard haystack.count >= 8 else { return }
            for start in 0...(haystack.count - 8) {
                guard let candidates = byPrefix[prefix(haystack, start)] else { continue }
                for needle in candidates where start + needle.count <= haystack.count {
                    if haystack[start..<start + needle.count].elementsEqual(needle) { found.insert(needle) }
                }
            }
        }
        return found
    }
}

extension KeyRepositoryTransaction {
    /// Appends without an anchor, as the repository-level tests do (the key service always anchors).
    func appendAuditRecords(_ records: [AuditRecord], head: AuditHead) async throws {
        try await appendAuditRecords(records, head: head, anchor: nil, keepCheckpoint: false)
    }
}
