import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import Synchronization
import Testing

/// Security invariant 5: the audit chain is anchored by an HMAC key inside the HSM, so whoever can
/// write the database cannot rewrite the log consistently. Tampering is done straight in the
/// database, as an attacker with write access (and DDL rights, to drop the append-only triggers)
/// would.
@Suite("Audit chain anchored in the HSM")
struct AuditAnchorTests {
    static func harness(_ kind: StoreKind, _ name: String, interval: Int64 = 5) async throws -> ServiceHarness {
        var configuration = KeyServiceConfiguration()
        configuration.auditCheckpointInterval = interval
        return try await ServiceHarness.make(kind, name, configuration: configuration)
    }

    /// Drops the append-only guards, as someone with DDL rights can.
    static func dropGuards(_ harness: ServiceHarness) async throws {
        switch harness.kind {
        case .postgres:
            try await harness.sql("ALTER TABLE audit_log DISABLE TRIGGER USER")
            try await harness.sql("ALTER TABLE audit_checkpoints DISABLE TRIGGER USER")
        case .sqlite:
            for trigger in [
                "audit_log_no_update", "audit_log_no_delete", "audit_checkpoints_no_update",
                "audit_checkpoints_no_delete",
            ] {
                try await harness.sql("DROP TRIGGER \(trigger)")
            }
        }
    }

    /// A log of one tenant creation and 30 data keys (31 records; checkpoints kept every 5).
    static func populate(_ harness: ServiceHarness) async throws {
        let tenant = tenantID("audited")
        _ = try await harness.service.createTenant(tenant, request: admin)
        for _ in 0..<30 { _ = try await harness.service.generateDataKey(tenant, request: app) }
    }

    /// Rewrites every record from `first` on (another principal, the chain recomputed) and the
    /// head, keeping the head row's anchor (which the attacker cannot remake): what passed the
    /// unanchored verification.
    static func rewriteTail(_ harness: ServiceHarness, from first: Int64, anchor: AuditCheckpoint?) async throws
        -> [AuditRecord]
    {
        let records = try await harness.auditRecords()
        let kept = records.filter { $0.sequence < first }
        let forgedEvents = records.filter { $0.sequence >= first }.map { record -> AuditEvent in
            var event = record.event
            event.principal = Principal("mallory")
            return event
        }
        let base = kept.last.map { AuditHead(sequence: $0.sequence, hash: $0.hash) } ?? .genesis
        let forged = AuditChain.link(forgedEvents, after: base)
        try await harness.sql("DELETE FROM audit_log WHERE seq >= \(first)")
        try await harness.store.transaction { transaction in
            try await transaction.appendAuditRecords(
                forged.records, head: forged.head, anchor: anchor, keepCheckpoint: false)
        }
        return kept + forged.records
    }

    @Test(arguments: StoreKind.allCases)
    func cleanLogVerifiesAndIsAnchored(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-clean")
        defer { Task { await harness.close() } }
        #expect(try await harness.service.checkAuditAnchor() == .empty)
        try await Self.populate(harness)
        let verification = try await harness.service.verifyAuditLog()
        #expect(verification.isVerified)
        #expect(verification.anchoredThrough == 31)
        // Kept: the first anchored head (1), then one per multiple of 5 crossed, and the head's own.
        #expect(verification.checkpointsChecked == 1 + 6 + 1)
        let head = try await harness.store.read { try await $0.auditHead() }
        #expect(head.anchor?.covers(head.head) == true)
        #expect(try await harness.restarted().checkAuditAnchor() == .anchored(through: 31))
    }

    /// Decrypt records take a path of their own to the log (joining the batch in flight on
    /// SQLite, their own transactions beside the write batches on PostgreSQL): under concurrent
    /// generates and decrypts the chain stays gapless, anchored and complete.
    @Test(arguments: StoreKind.allCases)
    func decryptRecordsBesideWriteBatchesKeepTheChain(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-lanes", interval: 50)
        defer { Task { await harness.close() } }
        let tenant = tenantID("lanes")
        _ = try await harness.service.createTenant(tenant, request: admin)
        var keys: [DataKeyID] = []
        for _ in 0..<8 { keys.append(try await harness.service.generateDataKey(tenant, request: app).id) }
        let known = keys
        let service = harness.service
        let (generated, decrypted) = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            for caller in 0..<16 {
                group.addTask {
                    var counts = (0, 0)
                    for round in 0..<25 {
                        if caller % 2 == 0 {
                            _ = try await service.generateDataKey(tenant, request: app)
                            counts.0 += 1
                        } else {
                            _ = try await service.decryptDataKey(
                                tenant, id: known[(caller + round) % known.count], request: app)
                            counts.1 += 1
                        }
                    }
                    return counts
                }
            }
            return try await group.reduce((0, 0)) { ($0.0 + $1.0, $0.1 + $1.1) }
        }
        #expect(generated == 200 && decrypted == 200)
        let verification = try await harness.service.verifyAuditLog()
        #expect(verification.isVerified)
        let records = try await harness.auditRecords()
        #expect(records.map(\.sequence) == Array(1...Int64(records.count)))
        #expect(verification.anchoredThrough == Int64(records.count))
        #expect(records.filter { $0.event.operation == .decryptDataKey }.count == 200)
        #expect(records.filter { $0.event.operation == .generateDataKey }.count == 208)
    }

    /// Verification reads the head first and the records after, in several reads: records
    /// appended in between (every busy gateway's case) are not the log's, and a checkpoint made
    /// for them meanwhile is not a sign of removed records. Small pages and a stream of writes
    /// make the window wide; a verification that ran past the head it read reported
    /// "does not match the stored head".
    @Test(arguments: StoreKind.allCases)
    func verificationDuringWritesChecksTheLogAsOfItsHead(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-busy", interval: 3)
        defer { Task { await harness.close() } }
        let tenant = tenantID("busy")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let service = harness.service
        let writing = WritingFlag()
        let results = try await withThrowingTaskGroup(of: [AuditLogVerification].self) { group in
            for _ in 0..<4 {
                group.addTask {
                    while writing.on.load(ordering: .relaxed) {
                        _ = try await service.generateDataKey(tenant, request: app)
                    }
                    return []
                }
            }
            group.addTask {
                defer { writing.on.store(false, ordering: .relaxed) }
                var verifications: [AuditLogVerification] = []
                for _ in 0..<12 { verifications.append(try await service.verifyAuditLog(pageSize: 2)) }
                return verifications
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        #expect(results.count == 12)
        for result in results { #expect(result.isVerified, "\(result.result)") }
        #expect(try await harness.service.verifyAuditLog().isVerified)
    }

    /// The key is made by the gateway, inside the token, and can do nothing but MACs.
    @Test(arguments: StoreKind.allCases)
    func auditKeyFollowsThePolicy(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-key")
        defer { Task { await harness.close() } }
        _ = try await harness.service.checkAuditAnchor()
        let (violations, valueRead, count) = try await harness.pool.withSession { session in
            let found = try session.findSecretKeys(label: AuditAnchoring.keyLabel)
            let handle = try #require(found.first?.handle)
            let values = try session.attributes(AuditKeyPolicy.verifiedAttributes, of: handle)
            let read = Result { try session.secretValue(of: handle) }
            return (AuditKeyPolicy.violations(in: values), read, found.count)
        }
        #expect(count == 1)
        #expect(violations.isEmpty)
        // Preflight (which does not link the key service) looks for the same label.
        #expect(AuditKeyPolicy.label == AuditAnchoring.keyLabel)
        guard case .failure(let error as PKCS11Error) = valueRead else {
            Issue.record("the audit key's value could be read")
            return
        }
        #expect(error.returnValue == .attributeSensitive)
    }

    /// A key planted under the audit label that is weaker than the policy (extractable, and able
    /// to decrypt) is refused, not used.
    @Test(arguments: StoreKind.allCases)
    func weakAuditKeyIsRefused(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-weak")
        defer { Task { await harness.close() } }
        try await harness.pool.withSession { session in
            _ = try session.generateKey(
                .genericSecretKeyGen,
                template: [
                    .objectClass(.secretKey), .keyType(.genericSecret), .valueLength(32), .token(true),
                    .private(true), .sensitive(false), .extractable(true), .sign(true), .verify(true),
                    .label(AuditAnchoring.keyLabel), .id([UInt8](repeating: 7, count: 16)),
                ])
        }
        let error = await serviceError { try await harness.service.checkAuditAnchor() }
        #expect(error?.code == .failedPrecondition)
        #expect(await serviceError { try await harness.service.createTenant(tenantID("x"), request: admin) } != nil)
    }

    /// The attack the anchor exists for: the tail and the head rewritten consistently. The plain
    /// hash chain (all that was checked before) verifies; the anchored verification names the
    /// first checkpoint the forgery breaks, and every write is refused.
    @Test(arguments: StoreKind.allCases)
    func tailAndHeadRewriteIsCaught(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-rewrite")
        defer { Task { await harness.close() } }
        try await Self.populate(harness)
        try await Self.dropGuards(harness)
        let anchor = try await harness.store.read { try await $0.auditHead() }.anchor
        let forged = try await Self.rewriteTail(harness, from: 12, anchor: anchor)
        let head = try await harness.store.read { try await $0.auditHead() }.head
        #expect(AuditChain.verify(forged, head: head) == .verified(records: 31, head: head))

        let verification = try await harness.service.verifyAuditLog()
        let problem = try #require(verification.problem)
        #expect(problem.kind == .anchorMismatch)
        #expect(problem.sequence == 15)
        #expect(problem.explanation.contains("checkpoint at record 15"))
        #expect(problem.explanation.contains("after the checkpoint at record 10"))

        // Fail closed: a restarted gateway refuses to extend the forged log.
        let restarted = try harness.restarted()
        let check = await serviceError { try await restarted.checkAuditAnchor() }
        #expect(check?.code == .dataLoss)
        let generate = await serviceError { try await restarted.generateDataKey(tenantID("audited"), request: app) }
        #expect(generate?.code == .dataLoss)
        #expect(generate?.message.contains("audit log failed its integrity check") == true)
        #expect(
            restarted.auditIntegrityFailure?.contains("does not verify against its checkpoint") == true,
            "\(restarted.auditIntegrityFailure ?? "nil")")
        #expect(try await harness.auditRecords().count == 31)
    }

    /// A rewrite after the last kept checkpoint: the head's own checkpoint catches it.
    @Test(arguments: StoreKind.allCases)
    func rewriteAfterTheLastKeptCheckpointIsCaughtByTheHead(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-headonly")
        defer { Task { await harness.close() } }
        try await Self.populate(harness)
        try await Self.dropGuards(harness)
        let anchor = try await harness.store.read { try await $0.auditHead() }.anchor
        _ = try await Self.rewriteTail(harness, from: 31, anchor: anchor)
        let problem = try #require(try await harness.service.verifyAuditLog().problem)
        #expect(problem.kind == .anchorMismatch)
        #expect(problem.sequence == 31)
        #expect(problem.explanation.contains("rewritten after the checkpoint at record 30"))
    }

    /// The same rewrite with the kept checkpoints after it deleted and the head's anchor removed:
    /// the head is reported unanchored, naming the last checkpoint that holds, and writes fail.
    @Test(arguments: StoreKind.allCases)
    func rewriteThatRemovesTheAnchorIsCaught(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-removed")
        defer { Task { await harness.close() } }
        try await Self.populate(harness)
        try await Self.dropGuards(harness)
        _ = try await Self.rewriteTail(harness, from: 12, anchor: nil)
        try await harness.sql("DELETE FROM audit_checkpoints WHERE seq >= 12")

        let problem = try #require(try await harness.service.verifyAuditLog().problem)
        #expect(problem.kind == .unanchored)
        #expect(problem.sequence == 31)
        #expect(problem.explanation.contains("last checkpoint that holds is at record 10"))
        let restarted = try harness.restarted()
        #expect(await serviceError { try await restarted.checkAuditAnchor() }?.code == .dataLoss)
        #expect(
            await serviceError { try await restarted.createTenant(tenantID("more"), request: admin) }?.code == .dataLoss
        )
    }

    /// A checkpoint whose MAC was replaced does not verify with the key in the HSM.
    @Test(arguments: StoreKind.allCases)
    func forgedCheckpointIsCaught(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-forged")
        defer { Task { await harness.close() } }
        try await Self.populate(harness)
        try await Self.dropGuards(harness)
        try await harness.sql(
            "UPDATE audit_checkpoints SET mac = \(blobLiteral(kind, [UInt8](repeating: 0x42, count: 32))) WHERE seq = 20"
        )
        let problem = try #require(try await harness.service.verifyAuditLog().problem)
        #expect(problem.kind == .anchorForged)
        #expect(problem.sequence == 20)
    }

    /// A log written before anchoring existed (no audit key in the token yet) is adopted once:
    /// its head is anchored with an audit record saying so. Once the key exists, a head without
    /// an anchor is a removed anchor, never adopted again.
    @Test(arguments: StoreKind.allCases)
    func logFromBeforeAnchoringIsAdoptedOnce(kind: StoreKind) async throws {
        let harness = try await Self.harness(kind, "anchor-adopt")
        defer { Task { await harness.close() } }
        let old = (1...3).map { index in
            AuditEvent(
                principal: admin.principal, tenant: nil, operation: .createPrincipal, requestID: "old-\(index)")
        }
        try await harness.store.transaction { transaction in
            let linked = AuditChain.link(old, after: try await transaction.lockAuditHead().head)
            try await transaction.appendAuditRecords(linked.records, head: linked.head)
        }
        #expect(try await harness.service.checkAuditAnchor() == .adopted(through: 3))
        let records = try await harness.auditRecords()
        #expect(records.count == 4)
        #expect(records.last?.event.operation == .anchorAuditLog)
        #expect(records.last?.event.detail == "adopted-through=3")
        let verification = try await harness.service.verifyAuditLog()
        #expect(verification.isVerified)
        #expect(verification.anchoredThrough == 4)
        _ = try await harness.service.createTenant(tenantID("after"), request: admin)
        #expect(try await harness.service.verifyAuditLog().isVerified)

        // The anchor removed later (the key exists now): refused, not adopted.
        try await Self.dropGuards(harness)
        try await harness.sql("UPDATE audit_head SET anchor_key_id = NULL, anchor_mac = NULL, anchor_time = NULL")
        try await harness.sql("DELETE FROM audit_checkpoints")
        let restarted = try harness.restarted()
        let error = await serviceError { try await restarted.checkAuditAnchor() }
        #expect(error?.code == .dataLoss)
        #expect(error?.underlying?.contains("carries no checkpoint") == true)
    }
}

/// Whether the writers of `verificationDuringWritesChecksTheLogAsOfItsHead` go on.
private final class WritingFlag: Sendable {
    let on = Atomic<Bool>(true)
}
