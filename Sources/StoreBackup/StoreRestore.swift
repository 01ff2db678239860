import Crypto
import Foundation
import KeyHierarchy

/// `hsm-admin restore`: loads a backup into an empty database, after proving that it is intact
/// and that it belongs to the token the gateway will use.
///
/// 1. Verify (nothing is written): the SHA-256 over the whole body against the trailer, and the
///    trailer's MAC of it recomputed by the backup key in the token (`BackupMAC`); every line
///    parsed and within its limits; the audit chain replayed, every kept checkpoint and the
///    head's checkpoint in place, and their MACs recomputed by the audit key in the token.
/// 2. Refuse a backup made under another token: its label and serial must be this token's
///    (unless `allowClonedToken`: a clone or an HSM cluster member reports another serial), and
///    in every case the audit anchor's MAC must verify with this token's audit key, which only
///    the token the backup was made under (or its clone) holds.
/// 3. Load in one transaction, into a database that holds no tenant, principal or audit record
///    (checked inside that transaction, with the audit head and the principals locked so that a
///    gateway starting meanwhile waits), checksumming the file again as it is read: a file that
///    changed since step 1 rolls everything back. Every master-key version is restored with its
///    invocation count raised to `BackupLimits.restoredInvocationCount`.
/// 4. Verify the loaded audit log with the gateway's own verifier (`KeyService.verifyAuditLog`).
public enum StoreRestore {
    /// How strict the token check is.
    public struct Options: Sendable {
        /// Accept a token whose label or serial differs from the backup's, as long as the audit
        /// anchor verifies with it (HSM clones and cluster members).
        public var allowClonedToken = false

        public init(allowClonedToken: Bool = false) {
            self.allowClonedToken = allowClonedToken
        }
    }

    /// What a verified backup holds.
    public struct Verified: Sendable {
        public var header: BackupHeader
        public var counts: BackupCounts
        public var sha256: String
    }

    /// What a restore loaded, and the verifier's answer on the loaded log.
    public struct Report: Sendable {
        public var header: BackupHeader
        public var counts: BackupCounts
        /// Versions the token holds that the backup did not know (see `TokenMasterKey`), added
        /// as `deactivated`.
        public var adoptedVersions: [MasterKeyVersionRecord]
        public var verification: AuditLogVerification
    }

    /// A master-key object on the token: its label and `CKA_ID` (PKCS#11
    /// `Session.findMasterKeys`).
    ///
    /// A backup misses the versions a rotation made after it, but the token still holds their
    /// keys. Restore adds a row for each such version of a restored tenant (by its label
    /// `hsmgw:mk:<tenant>:v<n>`, beyond the tenant's last restored version), `deactivated`: data
    /// keys wrapped under it decrypt from their callers' kept copies, and the next rotation
    /// numbers its version after it instead of making a second object with the same label.
    public struct TokenMasterKey: Sendable, Hashable {
        public var label: String
        public var id: TokenKeyID

        public init(label: String, id: TokenKeyID) {
            self.label = label
            self.id = id
        }
    }

    /// Step 1 and 2: reads the whole file, writes nothing.
    public static func verify(
        path: String,
        token: any MasterKeyToken,
        identity: BackupTokenIdentity,
        options: Options = Options()
    ) async throws -> Verified {
        let reader = try BackupFileReader(path: path)
        var hasher = SHA256()
        guard let first = try reader.nextLine() else {
            throw BackupError(.malformed, "the file is empty")
        }
        hasher.update(data: first + [UInt8(ascii: "\n")])
        let header = try decodeHeader(first)
        try checkIdentity(header, identity, options)
        let expectedHead = try header.auditHead.head()

        var counts = BackupCounts()
        var verifier = AuditVerifier()
        var lastRecord: AuditRecord?
        var pendingMACs: [AuditCheckpoint] = []
        var end: EndLine?
        while let line = try reader.nextLine() {
            guard end == nil else {
                throw BackupError(.malformed, "line \(reader.lineNumber) follows the end line")
            }
            let kind = try probe(line, reader.lineNumber)
            if kind == .end {
                end = try decode(EndLine.self, line, reader.lineNumber)
                continue
            }
            hasher.update(data: line + [UInt8(ascii: "\n")])
            do {
                switch kind {
                case .header:
                    throw BackupError(.malformed, "a second header")
                case .tenant:
                    _ = try decode(TenantLine.self, line, reader.lineNumber).record()
                    counts.tenants += 1
                case .version:
                    _ = try decode(VersionLine.self, line, reader.lineNumber).record()
                    counts.versions += 1
                case .rewrapJob:
                    _ = try decode(RewrapJobLine.self, line, reader.lineNumber).record()
                    counts.rewrapJobs += 1
                case .dataKey:
                    _ = try decode(DataKeyLine.self, line, reader.lineNumber).record()
                    counts.dataKeys += 1
                case .principal:
                    _ = try decode(PrincipalLine.self, line, reader.lineNumber).record()
                    counts.principals += 1
                case .apiToken:
                    _ = try decode(APITokenLine.self, line, reader.lineNumber).record()
                    counts.apiTokens += 1
                case .audit:
                    let record = try decode(AuditLine.self, line, reader.lineNumber).record()
                    if case .broken(let problem) = verifier.check(record) {
                        throw BackupError(.auditLogBroken, "the backup's audit log does not verify: \(problem)")
                    }
                    lastRecord = record
                    counts.auditRecords += 1
                case .checkpoint:
                    let checkpoint = try decode(BackupCheckpoint.self, line, reader.lineNumber).checkpoint()
                    guard let lastRecord, checkpoint.sequence == lastRecord.sequence,
                        checkpoint.hash == lastRecord.hash
                    else {
                        throw BackupError(
                            .auditLogBroken,
                            "the checkpoint at record \(checkpoint.sequence) does not match the record it follows")
                    }
                    pendingMACs.append(checkpoint)
                    counts.checkpoints += 1
                    if pendingMACs.count >= BackupLimits.checkpointsPerTokenRound {
                        try await checkMACs(pendingMACs, token: token)
                        pendingMACs.removeAll()
                    }
                case .end:
                    break
                }
            } catch let error as BackupError {
                throw error
            } catch let error as TokenError {
                throw error
            } catch {
                throw BackupError(.malformed, "line \(reader.lineNumber): \(error)")
            }
        }
        guard let end else {
            throw BackupError(.malformed, "the file has no end line: it is truncated")
        }
        let digest = Hex.encode(Array(hasher.finalize()))
        guard end.sha256 == digest, end.lines == reader.lineNumber - 1 else {
            throw BackupError(
                .checksumMismatch,
                "the file's SHA-256 does not match its end line: it was changed or damaged after it was written")
        }
        // The seal: only the token the backup was made under can have made this MAC of this
        // checksum, so a file changed and checksummed again is refused here.
        try await checkMAC(end, digest: digest, token: token)
        guard case .verified = verifier.finish(head: expectedHead) else {
            throw BackupError(.auditLogBroken, "the backup's audit log does not end at the head its header names")
        }
        try await checkMACs(pendingMACs, token: token)
        if expectedHead.sequence > 0 {
            guard let anchor = try header.auditAnchor?.checkpoint(), anchor.covers(expectedHead) else {
                throw BackupError(
                    .auditLogBroken, "the backup's audit head carries no checkpoint from the HSM that covers it")
            }
            try await checkMACs([anchor], token: token)
        }
        return Verified(header: header, counts: counts, sha256: digest)
    }

    /// Steps 1 to 4. Throws `BackupError` naming what failed; nothing is written unless every
    /// check of step 1 and 2 passed and the target was empty.
    public static func restore(
        path: String,
        into repository: any KeyRepository,
        token: any MasterKeyToken,
        identity: BackupTokenIdentity,
        masterKeysOnToken: [TokenMasterKey] = [],
        options: Options = Options()
    ) async throws -> Report {
        try await restore(
            path: path, into: repository, token: token, identity: identity, masterKeysOnToken: masterKeysOnToken,
            options: options, batchSize: BackupLimits.dataKeysPerInsert)
    }

    /// `restore` inserting at most `batchSize` data keys or audit records per statement (tests
    /// use tiny batches, so every flush turns).
    static func restore(
        path: String,
        into repository: any KeyRepository,
        token: any MasterKeyToken,
        identity: BackupTokenIdentity,
        masterKeysOnToken: [TokenMasterKey] = [],
        options: Options,
        batchSize: Int
    ) async throws -> Report {
        // Fail fast on a used database, before reading a large file.
        try await repository.read { try await checkEmpty($0) }
        let verified = try await verify(path: path, token: token, identity: identity, options: options)
        let (counts, adopted) = try await repository.transaction { transaction in
            // Held until the commit: a gateway started on this database meanwhile can neither
            // append an audit record nor bootstrap an admin between the check and the load.
            _ = try await transaction.lockAuditHead()
            try await transaction.lockPrincipals()
            try await checkEmpty(transaction)
            let (counts, restoredVersions) = try await load(
                path: path, expected: verified, into: transaction, batchSize: batchSize)
            let adopted = try adoptions(masterKeysOnToken, restoredVersions: restoredVersions, now: .now())
            for version in adopted { try await transaction.insertMasterKeyVersion(version) }
            return (counts, adopted)
        }
        let service = try KeyService(token: token, repository: repository)
        let verification = try await service.verifyAuditLog()
        guard case .verified = verification.result else {
            throw BackupError(
                .auditLogBroken,
                "the restored audit log does not verify (\(verification.result)); the database now holds the "
                    + "backup: empty it before trying again")
        }
        return Report(
            header: verified.header, counts: counts, adoptedVersions: adopted, verification: verification)
    }

    // MARK: Steps

    private static func load(
        path: String,
        expected: Verified,
        into transaction: any KeyRepositoryTransaction,
        batchSize: Int
    ) async throws -> (BackupCounts, [TenantID: MasterKeyVersionNumber]) {
        let reader = try BackupFileReader(path: path)
        var hasher = SHA256()
        var counts = BackupCounts()
        var keys: [DataKeyRecord] = []
        var records: [AuditRecord] = []
        var end: EndLine?
        // Each restored tenant's highest version (0 for a tenant whose versions are all gone).
        var restoredVersions: [TenantID: MasterKeyVersionNumber] = [:]
        func flushKeys() async throws {
            guard !keys.isEmpty else { return }
            try await transaction.insertDataKeys(keys)
            counts.dataKeys += keys.count
            keys.removeAll(keepingCapacity: true)
        }
        func flushRecords(anchor: AuditCheckpoint?) async throws {
            guard let last = records.last else { return }
            try await transaction.appendAuditRecords(
                records, head: AuditHead(sequence: last.sequence, hash: last.hash), anchor: anchor,
                keepCheckpoint: anchor != nil)
            counts.auditRecords += records.count
            records.removeAll(keepingCapacity: true)
        }
        while let line = try reader.nextLine() {
            let kind = try probe(line, reader.lineNumber)
            if kind == .end {
                end = try decode(EndLine.self, line, reader.lineNumber)
                break
            }
            hasher.update(data: line + [UInt8(ascii: "\n")])
            switch kind {
            case .header, .end:
                continue
            case .tenant:
                try await flushKeys()
                let tenant = try decode(TenantLine.self, line, reader.lineNumber).record()
                try await transaction.insertTenant(tenant)
                restoredVersions[tenant.id] = 0
                counts.tenants += 1
            case .version:
                try await flushKeys()
                var version = try decode(VersionLine.self, line, reader.lineNumber).record()
                version.invocationsReserved = max(version.invocationsReserved, BackupLimits.restoredInvocationCount)
                try await transaction.insertMasterKeyVersion(version)
                restoredVersions[version.tenant] = max(restoredVersions[version.tenant] ?? 0, version.version)
                counts.versions += 1
            case .rewrapJob:
                try await transaction.saveRewrapJob(try decode(RewrapJobLine.self, line, reader.lineNumber).record())
                counts.rewrapJobs += 1
            case .dataKey:
                keys.append(try decode(DataKeyLine.self, line, reader.lineNumber).record())
                if keys.count >= batchSize { try await flushKeys() }
            case .principal:
                try await flushKeys()
                try await transaction.insertPrincipal(try decode(PrincipalLine.self, line, reader.lineNumber).record())
                counts.principals += 1
            case .apiToken:
                try await transaction.insertAPIToken(try decode(APITokenLine.self, line, reader.lineNumber).record())
                counts.apiTokens += 1
            case .audit:
                try await flushKeys()
                // Flushed before a record is added, never after: a kept checkpoint follows the
                // record it names, which must still be in the buffer to be appended with it.
                if records.count >= batchSize { try await flushRecords(anchor: nil) }
                records.append(try decode(AuditLine.self, line, reader.lineNumber).record())
            case .checkpoint:
                // Appended up to the record it names and kept, as the gateway kept it.
                let checkpoint = try decode(BackupCheckpoint.self, line, reader.lineNumber).checkpoint()
                guard records.last?.sequence == checkpoint.sequence else {
                    throw BackupError(.malformed, "the checkpoint at record \(checkpoint.sequence) is out of place")
                }
                try await flushRecords(anchor: checkpoint)
                counts.checkpoints += 1
            }
        }
        try await flushKeys()
        // The head and its anchor exactly as in the backup (the last records, if any, with them).
        let head = try expected.header.auditHead.head()
        let anchor = try expected.header.auditAnchor?.checkpoint()
        counts.auditRecords += records.count
        try await transaction.appendAuditRecords(records, head: head, anchor: anchor, keepCheckpoint: false)
        guard let end, Hex.encode(Array(hasher.finalize())) == expected.sha256, end.sha256 == expected.sha256 else {
            throw BackupError(
                .checksumMismatch, "the file changed while it was being restored; nothing was written")
        }
        guard counts == expected.counts else {
            throw BackupError(.malformed, "the file changed while it was being restored; nothing was written")
        }
        return (counts, restoredVersions)
    }

    /// The versions to add for `TokenMasterKey` objects beyond each restored tenant's last
    /// version. Throws when two objects carry one such label: which one wrapped the callers' keys
    /// cannot be told, and an operator must resolve it on the token first.
    static func adoptions(
        _ objects: [TokenMasterKey],
        restoredVersions: [TenantID: MasterKeyVersionNumber],
        now: Timestamp
    ) throws(BackupError) -> [MasterKeyVersionRecord] {
        var found: [String: [TokenMasterKey]] = [:]
        for object in objects {
            guard let (tenant, version) = MasterKeyLabel.parse(object.label),
                let restored = restoredVersions[tenant], version > restored
            else { continue }
            found[object.label, default: []].append(object)
        }
        var adopted: [MasterKeyVersionRecord] = []
        for (label, objects) in found.sorted(by: { $0.key < $1.key }) {
            guard objects.count == 1, let (tenant, version) = MasterKeyLabel.parse(label) else {
                throw BackupError(
                    .malformed,
                    "the token holds \(objects.count) master keys labelled \(label): remove the one no data key "
                        + "was wrapped under before restoring")
            }
            adopted.append(
                MasterKeyVersionRecord(
                    tenant: tenant, version: version, state: .deactivated, tokenKeyID: objects[0].id,
                    invocationsReserved: BackupLimits.restoredInvocationCount, createdAt: now, updatedAt: now))
        }
        return adopted
    }

    /// Throws `targetNotEmpty` unless the store holds no tenant, principal or audit record.
    static func checkEmpty(_ transaction: any KeyRepositoryTransaction) async throws {
        let tenants = try await transaction.tenants(after: nil, limit: 1)
        let principals = try await transaction.principals(after: nil, limit: 1)
        let head = try await transaction.auditHead()
        guard tenants.isEmpty, principals.isEmpty, head.head.sequence == 0 else {
            throw BackupError(
                .targetNotEmpty,
                "the target database is not empty (it holds tenants, principals or audit records): restore "
                    + "only into a new database that no gateway has started on")
        }
    }

    private static func checkIdentity(
        _ header: BackupHeader,
        _ identity: BackupTokenIdentity,
        _ options: Options
    ) throws(BackupError) {
        guard header.token == identity || options.allowClonedToken else {
            throw BackupError(
                .wrongToken,
                "the backup was made under token \(header.token), not \(identity): restore it with the token "
                    + "it belongs to (for an HSM clone with another serial, --allow-cloned-token)")
        }
    }

    /// Throws `wrongToken` unless the end line's MAC of `digest` is recomputed by the token's
    /// backup key.
    private static func checkMAC(_ end: EndLine, digest: String, token: any MasterKeyToken) async throws {
        let keyID = try TokenKeyID(bytes: Hex.decode(end.macKeyID, bytes: TokenKeyID.byteCount, field: "MAC key id"))
        let mac = try Hex.decode(end.mac, bytes: 32, field: "MAC")
        guard let keyID else { throw BackupError(.malformed, "the end line's MAC key id is malformed") }
        let results = try await token.perform([
            .mac(
                key: TokenKeyReference(id: keyID, label: BackupMAC.keyLabel),
                message: BackupMAC.message(sha256: try Hex.decode(digest, bytes: 32, field: "SHA-256")))
        ])
        switch results.first {
        case .mac(let recomputed) where constantTimeEquals(recomputed, mac):
            return
        case .mac:
            throw BackupError(
                .wrongToken,
                "the backup's MAC does not verify with this token's backup key: the file was changed after it "
                    + "was made, or it was made under another token")
        case .failed(let error) where error.kind == .keyNotFound || error.kind == .bindingViolation:
            throw BackupError(
                .wrongToken,
                "this token holds no backup key with the id the file names: the backup was made under another token")
        case .failed(let error):
            throw error
        default:
            throw BackupError(.io, "the token did not answer the backup's MAC")
        }
    }

    /// Throws `wrongToken` unless every checkpoint's MAC is recomputed by the token's audit key.
    private static func checkMACs(_ checkpoints: [AuditCheckpoint], token: any MasterKeyToken) async throws {
        guard !checkpoints.isEmpty else { return }
        let operations = checkpoints.map {
            TokenOperation.mac(
                key: TokenKeyReference(id: $0.keyID, label: AuditAnchoring.keyLabel),
                message: AuditCheckpoint.message(sequence: $0.sequence, hash: $0.hash)
            )
        }
        let results = try await token.perform(operations)
        for (checkpoint, result) in zip(checkpoints, results) {
            switch result {
            case .mac(let mac) where constantTimeEquals(mac, checkpoint.mac):
                continue
            case .mac:
                throw BackupError(
                    .wrongToken,
                    "the audit checkpoint at record \(checkpoint.sequence) does not verify with this token's "
                        + "audit key: the backup belongs to another token, or its log was forged")
            case .failed(let error) where error.kind == .keyNotFound || error.kind == .bindingViolation:
                // The token holds no audit key with the id the backup names.
                throw BackupError(
                    .wrongToken,
                    "the audit checkpoint at record \(checkpoint.sequence) does not verify with this token's "
                        + "audit key: the backup belongs to another token, or its log was forged")
            case .failed(let error):
                throw error
            default:
                throw BackupError(.io, "unexpected token result")
            }
        }
    }

    private static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }

    // MARK: Lines

    private static func decodeHeader(_ line: [UInt8]) throws(BackupError) -> BackupHeader {
        guard (try? probe(line, 1)) == .header else {
            throw BackupError(
                .malformed, "the file does not start with a backup header: it is not an hsm-gateway backup")
        }
        let header = try decode(BackupHeader.self, line, 1)
        guard header.format == BackupHeader.formatName else {
            throw BackupError(.malformed, "the file is not an hsm-gateway backup")
        }
        guard header.formatVersion == BackupHeader.currentFormatVersion else {
            throw BackupError(
                .malformed,
                "backup format version \(header.formatVersion) is not supported (this gateway reads "
                    + "\(BackupHeader.currentFormatVersion))")
        }
        return header
    }

    private static func probe(_ line: [UInt8], _ number: Int64) throws(BackupError) -> BackupLineKind {
        try decode(BackupLineKindProbe.self, line, number).kind
    }

    private static func decode<T: Decodable>(_ type: T.Type, _ line: [UInt8], _ number: Int64) throws(BackupError) -> T
    {
        do {
            return try JSONDecoder().decode(type, from: Data(line))
        } catch {
            // The decoder's message may quote the line; name the line number only.
            throw BackupError(.malformed, "line \(number) is not a valid backup line")
        }
    }
}
