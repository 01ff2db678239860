import Crypto
import Foundation
import KeyHierarchy
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

@testable import StoreBackup

/// Backup and restore (docs/operations.md, "Backup and restore") on a real SoftHSM2 token and
/// both real stores: the drill an operator runs, and every refusal.
@Suite("Backup and restore")
struct BackupRestoreTests {
    /// Source and target stores: each store into itself, and SQLite into PostgreSQL (an embedded
    /// node moved to the production store).
    static let pairs: [(StoreKind, StoreKind)] = [(.postgres, .postgres), (.sqlite, .sqlite), (.sqlite, .postgres)]

    /// Kept checkpoints every 5 records, so a small log has several to restore and verify.
    static var configuration: KeyServiceConfiguration {
        var configuration = KeyServiceConfiguration()
        configuration.auditCheckpointInterval = 5
        return configuration
    }

    @Test(arguments: pairs)
    func drill(source: StoreKind, target: StoreKind) async throws {
        let harness = try await ServiceHarness.make(source, "drill", configuration: Self.configuration)
        defer { Task { await harness.close() } }
        let service = harness.service
        let (a, b) = (tenantID("drill-a"), tenantID("drill-b"))
        _ = try await service.createTenant(a, request: admin)
        _ = try await service.createTenant(b, request: admin)
        let appName = try PrincipalName("app")
        _ = try await service.createPrincipal(
            appName, roles: [RoleBinding(scope: .tenant(a), role: .keyUser)], request: admin)
        let (tokenRecord, _) = try await service.createAPIToken(for: appName, description: "drill", request: admin)

        var acknowledged: [(tenant: TenantID, key: GeneratedDataKey, context: EncryptionContext)] = []
        for index in 0..<6 {
            let tenant = index.isMultiple(of: 2) ? a : b
            let context: EncryptionContext = ["row": "\(index)"]
            acknowledged.append(
                (tenant, try await service.generateDataKey(tenant, context: context, request: app), context))
        }
        _ = try await service.rotateMasterKey(a, request: admin)
        for key in try await service.generateDataKeys(a, count: 3, context: ["batch": "1"], request: app) {
            acknowledged.append((a, key, ["batch": "1"]))
        }
        let disabled = acknowledged[1]
        _ = try await service.disableDataKey(disabled.tenant, id: disabled.key.id, request: admin)

        let identity = try Self.identity(harness)
        let path = try Self.temporaryPath("drill")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let summary = try await StoreBackupWriter.write(
            from: try Self.source(harness.store), identity: identity, token: harness.token, to: path)
        #expect(summary.counts.tenants == 2)
        #expect(summary.counts.dataKeys == 9)
        #expect(summary.counts.versions == 3)
        #expect(summary.counts.principals == 1 && summary.counts.apiTokens == 1)
        #expect(summary.counts.checkpoints >= 2)
        #expect(summary.header.token == identity)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)

        // After the backup: a rotation (its version's row is lost with the database; its key stays on
        // the token) and keys acknowledged under it and under b's version.
        _ = try await service.rotateMasterKey(a, request: admin)
        var later: [(tenant: TenantID, key: GeneratedDataKey, context: EncryptionContext)] = []
        for index in 0..<4 {
            let tenant = index.isMultiple(of: 2) ? a : b
            let context: EncryptionContext = ["later": "\(index)"]
            later.append((tenant, try await service.generateDataKey(tenant, context: context, request: app), context))
        }

        // The database is gone: the old store is closed and never used again; a new, empty one
        // takes its place, on the same token.
        await harness.store.close()
        let restoredStore = try await target.makeStore("drill-restored")
        defer { Task { await restoredStore.close() } }
        let onToken = try await harness.pool.withSession { session in
            try session.findMasterKeys(labelPrefix: MasterKeyLabel.prefix).compactMap { object in
                TokenKeyID(bytes: object.id).map { StoreRestore.TokenMasterKey(label: object.label, id: $0) }
            }
        }
        let report = try await StoreRestore.restore(
            path: path, into: restoredStore, token: harness.token, identity: identity, masterKeysOnToken: onToken)
        #expect(report.counts == summary.counts)
        // a's v3 came after the backup: found on the token and kept, deactivated.
        #expect(report.adoptedVersions.map { "\($0.tenant):\($0.version):\($0.state)" } == ["drill-a:3:deactivated"])
        #expect(report.verification.anchoredThrough == summary.header.auditHead.sequence)

        let restored = try KeyService(
            token: harness.token, repository: restoredStore, configuration: Self.configuration)
        // What a gateway checks at start-up passes.
        _ = try await restored.checkAuditAnchor()

        // Every version's count is raised beyond any limit: none wraps again.
        for tenant in [a, b] {
            let versions = try await restoredStore.read { try await $0.masterKeyVersions(tenant) }
            #expect(versions.allSatisfy { $0.invocationsReserved >= BackupLimits.restoredInvocationCount })
        }

        // Every key acknowledged before the backup decrypts by id; the disabled one is still disabled.
        for entry in acknowledged where entry.key.id != disabled.key.id {
            let decrypted = try await restored.decryptDataKey(
                entry.tenant, id: entry.key.id, context: entry.context, request: app)
            #expect(decrypted.plaintext.copyBytes() == entry.key.plaintext?.copyBytes())
        }
        let stillDisabled = await serviceError {
            try await restored.decryptDataKey(
                disabled.tenant, id: disabled.key.id, context: disabled.context, request: app)
        }
        #expect(stillDisabled?.code == .failedPrecondition)

        // Keys made after the backup: unknown by id, recovered from the blob their caller kept.
        for entry in later {
            let byID = await serviceError {
                try await restored.decryptDataKey(entry.tenant, id: entry.key.id, context: entry.context, request: app)
            }
            #expect(byID?.code == .notFound)
            let blob = try #require(WrappedDataKey(encoded: entry.key.wrapped))
            let decrypted = try await restored.decryptDataKey(
                entry.tenant, id: entry.key.id, context: entry.context, wrapped: blob, request: app)
            #expect(decrypted.plaintext.copyBytes() == entry.key.plaintext?.copyBytes())
        }

        // Generation goes on, each tenant under a new version whose count starts from zero, numbered
        // after the versions the token holds (a: v4, after the v3 that came after the backup).
        var fresh: [GeneratedDataKey] = []
        fresh.append(try await restored.generateDataKey(a, context: ["new": "a"], request: app))
        fresh.append(try await restored.generateDataKey(b, context: ["new": "b"], request: app))
        fresh += try await restored.generateDataKeys(a, count: 5, request: app)
        #expect(fresh[0].version == 4)
        #expect(fresh[1].version == 2)
        #expect(fresh[2...].allSatisfy { $0.version == 4 })
        let newVersion = try #require(try await restoredStore.read { try await $0.masterKeyVersion(a, 4) })
        #expect(newVersion.invocationsReserved == 6)
        // One token object per version label: no rotation made a second v3.
        let labels = try await harness.masterKeyLabels(MasterKeyLabel.labelPrefix(for: a))
        #expect(labels.sorted() == (1...4).map { MasterKeyLabel.label(tenant: a, version: $0) })
        _ = try await restored.decryptDataKey(a, id: fresh[0].id, context: ["new": "a"], request: app)
        // The kept copies of keys wrapped under the adopted v3 still decrypt after the rotation.
        for entry in later where entry.tenant == a {
            #expect(try #require(WrappedDataKey(encoded: entry.key.wrapped)).version == 3)
            let blob = try #require(WrappedDataKey(encoded: entry.key.wrapped))
            _ = try await restored.decryptDataKey(
                a, id: entry.key.id, context: entry.context, wrapped: blob, request: app)
        }

        // No (key, IV) pair repeats across everything wrapped before, after and since the restore.
        let blobs =
            (acknowledged + later).map { ($0.tenant, $0.key.wrapped) } + [(a, fresh[0].wrapped)]
            + [(b, fresh[1].wrapped)] + fresh[2...].map { (a, $0.wrapped) }
        let pairs = try blobs.map { tenant, bytes in
            let blob = try #require(WrappedDataKey(encoded: bytes))
            return "\(tenant):\(blob.version):\(blob.iv)"
        }
        #expect(Set(pairs).count == pairs.count)

        // Principals and tokens came back; the log verifies and has grown since.
        let principal = try #require(try await restoredStore.read { try await $0.principal(appName) })
        #expect(principal.roles == [RoleBinding(scope: .tenant(a), role: .keyUser)])
        let token = try #require(try await restoredStore.read { try await $0.apiToken(tokenRecord.id) })
        #expect(token.hash == tokenRecord.hash)
        let verification = try await restored.verifyAuditLog()
        guard case .verified(let records, _) = verification.result else {
            Issue.record("the restored log does not verify: \(verification.result)")
            return
        }
        #expect(records > summary.header.auditHead.sequence)
    }

    @Test(arguments: StoreKind.allCases)
    func refusals(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "restore-refused", configuration: Self.configuration)
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("refused")
        _ = try await service.createTenant(tenant, request: admin)
        let keys = try await service.generateDataKeys(tenant, count: 3, context: ["k": "v"], request: app)
        let identity = try Self.identity(harness)
        let path = try Self.temporaryPath("refused")
        defer { try? FileManager.default.removeItem(atPath: path) }
        _ = try await StoreBackupWriter.write(
            from: try Self.source(harness.store), identity: identity, token: harness.token, to: path)

        // Holds wrapped keys and hashes only: no plaintext key, no PIN.
        let text = try String(contentsOfFile: path, encoding: .utf8)
        for key in keys {
            let plaintext = try #require(key.plaintext).copyBytes().map { String(format: "%02x", $0) }.joined()
            #expect(!text.contains(plaintext))
        }
        #expect(!text.contains(harness.testToken.userPIN))
        // An existing file is never replaced.
        await #expect(throws: BackupError.self) {
            try await StoreBackupWriter.write(
                from: try Self.source(harness.store), identity: identity, token: harness.token, to: path)
        }

        let target = try await kind.makeStore("restore-target")
        defer { Task { await target.close() } }

        // Another token: refused by its identity, and by the anchor's MAC even when the identity
        // check is waived (a clone would pass it; another token cannot).
        let other = try await ServiceHarness.make(kind, "restore-other")
        defer { Task { await other.close() } }
        _ = try await other.service.createTenant(tenantID("other"), request: admin)
        let otherIdentity = try Self.identity(other)
        #expect(
            await restoreError(path, target, other.token, otherIdentity) == .wrongToken)
        #expect(
            await restoreError(path, target, other.token, otherIdentity, StoreRestore.Options(allowClonedToken: true))
                == .wrongToken)
        // The right identity claimed for the wrong token: the MAC still refuses.
        #expect(await restoreError(path, target, other.token, identity) == .wrongToken)

        // One character of a wrapped key changed: the checksum refuses the file.
        let tampered = try Self.temporaryPath("tampered")
        defer { try? FileManager.default.removeItem(atPath: tampered) }
        let wrappedHex = keys[0].wrapped.map { String(format: "%02x", $0) }.joined()
        let changed =
            String(wrappedHex.prefix(80)) + (wrappedHex.dropFirst(80).first == "0" ? "1" : "0")
            + wrappedHex.dropFirst(81)
        try text.replacingOccurrences(of: wrappedHex, with: changed).write(
            toFile: tampered, atomically: false, encoding: .utf8)
        #expect(await restoreError(tampered, target, harness.token, identity) == .checksumMismatch)

        // Changed and checksummed again (a principal slipped in, say): the checksum holds, but the
        // token's MAC of it does not.
        let resealed = try Self.temporaryPath("resealed")
        defer { try? FileManager.default.removeItem(atPath: resealed) }
        var body = text.split(separator: "\n").dropLast().map { String($0) + "\n" }.joined()
        body = body.replacingOccurrences(of: wrappedHex, with: changed)
        let endLine = try #require(
            try JSONSerialization.jsonObject(with: Data(text.split(separator: "\n").last!.utf8)) as? [String: Any])
        var forgedEnd = endLine
        forgedEnd["sha256"] = SHA256.hash(data: Data(body.utf8)).map { String(format: "%02x", $0) }.joined()
        let forgedEndLine = String(
            decoding: try JSONSerialization.data(withJSONObject: forgedEnd, options: [.sortedKeys]), as: UTF8.self)
        try (body + forgedEndLine + "\n").write(toFile: resealed, atomically: false, encoding: .utf8)
        #expect(await restoreError(resealed, target, harness.token, identity) == .wrongToken)

        // Truncated: the end line is missing.
        let truncated = try Self.temporaryPath("truncated")
        defer { try? FileManager.default.removeItem(atPath: truncated) }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        try (lines.dropLast(2).joined(separator: "\n") + "\n").write(
            toFile: truncated, atomically: false, encoding: .utf8)
        #expect(await restoreError(truncated, target, harness.token, identity) == .malformed)

        // A format this code does not know, a line after the end, a line over the limit.
        let malformed: [(String, String)] = [
            ("version", text.replacingOccurrences(of: "\"formatVersion\":1", with: "\"formatVersion\":2")),
            ("trailing", text + "{\"kind\":\"tenant\"}\n"),
            (
                "long",
                String(text.prefix { $0 != "\n" }) + "\n" + String(repeating: "x", count: 2 << 20) + "\n"
                    + text.drop { $0 != "\n" }.dropFirst()
            ),
        ]
        for (name, content) in malformed {
            let file = try Self.temporaryPath(name)
            defer { try? FileManager.default.removeItem(atPath: file) }
            try content.write(toFile: file, atomically: false, encoding: .utf8)
            #expect(await restoreError(file, target, harness.token, identity) == .malformed, "\(name)")
        }

        // Nothing was written by any refused restore.
        #expect(try await target.read { try await $0.tenants(after: nil, limit: 1) }.isEmpty)
        #expect(try await target.read { try await $0.auditHead() }.head.sequence == 0)

        // A database in use is refused.
        #expect(await restoreError(path, harness.store, harness.token, identity) == .targetNotEmpty)

        // The intact file restores, once.
        _ = try await StoreRestore.restore(path: path, into: target, token: harness.token, identity: identity)
        #expect(await restoreError(path, target, harness.token, identity) == .targetNotEmpty)
    }

    /// Every row of every table comes back exactly, paged three rows at a time and loaded two at a
    /// time, so every paging loop and every flush turns (the restored versions' invocation count
    /// aside, raised on purpose).
    @Test(arguments: pairs)
    func everyRowComesBackExactly(source: StoreKind, target: StoreKind) async throws {
        let harness = try await ServiceHarness.make(source, "roundtrip", configuration: Self.configuration)
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenants = (0..<4).map { tenantID("rt-\($0)") }
        for tenant in tenants { _ = try await service.createTenant(tenant, request: admin) }
        _ = try await service.rotateMasterKey(tenants[0], request: admin)
        _ = try await service.generateDataKeys(tenants[0], count: 7, request: app)
        _ = try await service.generateDataKeys(tenants[1], count: 2, context: ["a": "b"], request: app)
        let destroyed = try await service.generateDataKey(tenants[2], request: app)
        _ = try await service.destroyDataKey(tenants[2], id: destroyed.id, request: admin)
        _ = try await service.startRewrapJob(tenants[0], request: admin)
        _ = try await service.disableTenant(tenants[3], request: admin)
        for index in 0..<4 {
            let name = try PrincipalName("rt-p\(index)")
            _ = try await service.createPrincipal(
                name,
                certificateCommonName: index == 0 ? try CertificateCommonName("rt-p0.example") : nil,
                roles: [RoleBinding(scope: index == 1 ? .all : .tenant(tenants[index]), role: .keyUser)],
                request: admin)
            let (token, _) = try await service.createAPIToken(
                for: name, description: "token \(index)", timeToLiveSeconds: index == 2 ? 3600 : nil, request: admin)
            if index == 3 { _ = try await service.revokeAPIToken(token.id, request: admin) }
        }
        _ = try await service.disablePrincipal(try PrincipalName("rt-p2"), request: admin)

        let path = try Self.temporaryPath("roundtrip")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let identity = try Self.identity(harness)
        let summary = try await StoreBackupWriter.write(
            from: try Self.source(harness.store), identity: identity, token: harness.token, to: path, now: .now(),
            pageSize: 3)
        let restoredStore = try await target.makeStore("roundtrip-restored")
        defer { Task { await restoredStore.close() } }
        let report = try await StoreRestore.restore(
            path: path, into: restoredStore, token: harness.token, identity: identity, options: StoreRestore.Options(),
            batchSize: 2)
        #expect(report.counts == summary.counts)
        #expect(summary.counts.tenants == 4 && summary.counts.dataKeys == 10 && summary.counts.principals == 4)
        #expect(summary.counts.rewrapJobs == 1 && summary.counts.checkpoints >= 4)

        var original = try await StoreContents.read(harness.store)
        original.versions = original.versions.map {
            var version = $0
            version.invocationsReserved = BackupLimits.restoredInvocationCount
            return version
        }
        let restored = try await StoreContents.read(restoredStore)
        // Table by table, so a difference names its table.
        #expect(restored.tenants == original.tenants)
        #expect(restored.versions == original.versions)
        #expect(restored.rewrapJobs == original.rewrapJobs)
        #expect(restored.dataKeys == original.dataKeys)
        #expect(restored.principals == original.principals)
        #expect(restored.apiTokens == original.apiTokens)
        #expect(restored.auditRecords == original.auditRecords)
        #expect(restored.checkpoints == original.checkpoints)
        #expect(restored.head == original.head)
        #expect(original.auditRecords.count == Int(summary.header.auditHead.sequence))
    }

    // MARK: Helpers

    static func identity(_ harness: ServiceHarness) throws -> BackupTokenIdentity {
        let info = try SoftHSMFixture.shared().module.tokenInfo(harness.testToken.slot)
        return BackupTokenIdentity(label: info.label, serial: info.serialNumber)
    }

    static func source(_ store: any KeyRepository) throws -> any BackupSource {
        guard let source = store as? any BackupSource else {
            throw StoreKindError("not a store that can be backed up: \(type(of: store))")
        }
        return source
    }

    /// A fresh path in the temporary directory (the caller removes the file).
    static func temporaryPath(_ name: String) throws -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-backup-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).jsonl"
        ).path
    }
}

/// The code of the `BackupError` a restore throws, or nil when it succeeds (any other error is
/// recorded as a test failure).
func restoreError(
    _ path: String,
    _ repository: any KeyRepository,
    _ token: PKCS11KeyToken,
    _ identity: BackupTokenIdentity,
    _ options: StoreRestore.Options = StoreRestore.Options(),
    sourceLocation: SourceLocation = #_sourceLocation
) async -> BackupError.Code? {
    do {
        _ = try await StoreRestore.restore(
            path: path, into: repository, token: token, identity: identity, options: options)
        return nil
    } catch let error as BackupError {
        return error.code
    } catch {
        Issue.record("expected a BackupError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Everything a store holds, read through the port, for comparing two stores.
struct StoreContents: Hashable {
    var tenants: [TenantRecord] = []
    var versions: [MasterKeyVersionRecord] = []
    var rewrapJobs: [RewrapJobRecord] = []
    var dataKeys: [DataKeyRecord] = []
    var principals: [PrincipalRecord] = []
    var apiTokens: [APITokenRecord] = []
    var auditRecords: [AuditRecord] = []
    var checkpoints: [AuditCheckpoint] = []
    var head: AnchoredAuditHead?

    static func read(_ store: any KeyRepository) async throws -> StoreContents {
        try await store.read { transaction in
            var contents = StoreContents()
            contents.tenants = try await transaction.tenants(after: nil, limit: 1000)
            for tenant in contents.tenants {
                contents.versions += try await transaction.masterKeyVersions(tenant.id)
                if let job = try await transaction.rewrapJob(tenant.id) { contents.rewrapJobs.append(job) }
                contents.dataKeys += try await transaction.dataKeys(tenant.id, state: nil, after: nil, limit: 1000)
            }
            contents.principals = try await transaction.principals(after: nil, limit: 1000)
            contents.apiTokens = try await transaction.apiTokens(principal: nil, after: nil, limit: 1000)
            contents.auditRecords = try await transaction.auditRecords(after: 0, limit: 1000)
            contents.checkpoints = try await transaction.auditCheckpoints(after: 0, limit: 1000)
            contents.head = try await transaction.auditHead()
            return contents
        }
    }
}
