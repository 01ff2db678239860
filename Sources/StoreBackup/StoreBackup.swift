import Foundation
import KeyHierarchy
import PostgresKeyStore
import SQLiteKeyStore

/// A store that can be backed up: one consistent snapshot of everything it holds.
public protocol BackupSource: KeyRepository {
    /// `postgres` or `sqlite`.
    var storeKind: String { get }
    /// The highest schema migration applied.
    func schemaVersion() async throws -> Int
    /// Runs `body` against one consistent, read-only snapshot: every statement sees the same
    /// committed state, while gateways keep writing.
    func snapshot<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T
}

extension PostgresKeyStore: BackupSource {
    public var storeKind: String { "postgres" }
}

extension SQLiteKeyStore: BackupSource {
    public var storeKind: String { "sqlite" }
}

/// What a backup or a restore handled.
public struct BackupCounts: Sendable, Hashable, Codable {
    public var tenants = 0
    public var versions = 0
    public var rewrapJobs = 0
    public var dataKeys = 0
    public var principals = 0
    public var apiTokens = 0
    public var auditRecords = 0
    public var checkpoints = 0

    public init() {}
}

/// `hsm-admin backup`: writes one consistent snapshot of a store to a file.
public enum StoreBackupWriter {
    /// Rows read per statement while the snapshot is walked.
    static let pageSize = 1000

    /// What was written.
    public struct Summary: Sendable {
        public var header: BackupHeader
        public var counts: BackupCounts
        public var bytes: Int64
        /// SHA-256 of the body, as in the trailer (hex).
        public var sha256: String
    }

    /// Writes a backup of `source` to `path` (created with mode 0600; an existing file is not
    /// replaced). `identity` names the token the gateway uses, `token` is that token: its backup
    /// key (`BackupMAC.keyLabel`, made on the first backup) seals the file's checksum, and the
    /// audit head's checkpoint in the header proves the log. On failure the partial file is
    /// removed.
    public static func write(
        from source: some BackupSource,
        identity: BackupTokenIdentity,
        token: any MasterKeyToken,
        to path: String,
        now: Timestamp = .now()
    ) async throws -> Summary {
        try await write(from: source, identity: identity, token: token, to: path, now: now, pageSize: pageSize)
    }

    /// `write` reading `pageSize` rows per statement (tests page through small stores with tiny
    /// pages, so every paging loop turns).
    static func write(
        from source: some BackupSource,
        identity: BackupTokenIdentity,
        token: any MasterKeyToken,
        to path: String,
        now: Timestamp,
        pageSize: Int
    ) async throws -> Summary {
        let schemaVersion = try await source.schemaVersion()
        // Before the file exists: a token that cannot seal the backup fails the command first.
        let (macKeyID, _) = try await token.prepareAuditKey(label: BackupMAC.keyLabel)
        let writer = try BackupFileWriter(creating: path)
        do {
            let (header, counts) = try await source.snapshot { transaction in
                try await writeSnapshot(
                    transaction, writer: writer, schemaVersion: schemaVersion, store: source.storeKind,
                    token: identity, now: now, pageSize: pageSize)
            }
            let digest = writer.digest
            let results = try await token.perform([
                .mac(
                    key: TokenKeyReference(id: macKeyID, label: BackupMAC.keyLabel),
                    message: BackupMAC.message(sha256: digest))
            ])
            guard case .mac(let mac) = results.first else {
                if case .failed(let error) = results.first { throw error }
                throw BackupError(.io, "the token did not answer the backup's MAC")
            }
            try writer.finish(macKeyID: macKeyID, mac: mac)
            return Summary(header: header, counts: counts, bytes: writer.bytes, sha256: Hex.encode(digest))
        } catch {
            try? FileManager.default.removeItem(atPath: path)
            throw error
        }
    }

    private static func writeSnapshot(
        _ transaction: any KeyRepositoryTransaction,
        writer: BackupFileWriter,
        schemaVersion: Int,
        store: String,
        token: BackupTokenIdentity,
        now: Timestamp,
        pageSize: Int
    ) async throws -> (BackupHeader, BackupCounts) {
        let anchored = try await transaction.auditHead()
        let header = BackupHeader(
            format: BackupHeader.formatName,
            formatVersion: BackupHeader.currentFormatVersion,
            schemaVersion: schemaVersion,
            store: store,
            createdAtMs: now.millisecondsSinceEpoch,
            token: token,
            auditHead: BackupAuditHead(anchored.head),
            auditAnchor: anchored.anchor.map(BackupCheckpoint.init)
        )
        try writer.append(header)
        var counts = BackupCounts()

        var afterTenant: TenantID?
        while true {
            let tenants = try await transaction.tenants(after: afterTenant, limit: pageSize)
            for tenant in tenants {
                try writer.append(TenantLine(tenant))
                counts.tenants += 1
                for version in try await transaction.masterKeyVersions(tenant.id) {
                    try writer.append(VersionLine(version))
                    counts.versions += 1
                }
                if let job = try await transaction.rewrapJob(tenant.id) {
                    try writer.append(RewrapJobLine(job))
                    counts.rewrapJobs += 1
                }
                var afterKey: DataKeyID?
                while true {
                    let keys = try await transaction.dataKeys(tenant.id, state: nil, after: afterKey, limit: pageSize)
                    for key in keys { try writer.append(DataKeyLine(key)) }
                    counts.dataKeys += keys.count
                    guard keys.count == pageSize, let last = keys.last else { break }
                    afterKey = last.id
                }
            }
            guard tenants.count == pageSize, let last = tenants.last else { break }
            afterTenant = last.id
        }

        var afterPrincipal: PrincipalName?
        while true {
            let principals = try await transaction.principals(after: afterPrincipal, limit: pageSize)
            for principal in principals { try writer.append(PrincipalLine(principal)) }
            counts.principals += principals.count
            guard principals.count == pageSize, let last = principals.last else { break }
            afterPrincipal = last.name
        }
        var afterToken: APITokenID?
        while true {
            let tokens = try await transaction.apiTokens(principal: nil, after: afterToken, limit: pageSize)
            for token in tokens { try writer.append(APITokenLine(token)) }
            counts.apiTokens += tokens.count
            guard tokens.count == pageSize, let last = tokens.last else { break }
            afterToken = last.id
        }

        // The chain in order, each kept checkpoint right after the record it names (restore
        // appends up to it and keeps it, as the gateway did).
        var afterRecord: Int64 = 0
        var checkpoints: [AuditCheckpoint] = []
        var checkpointsAfter: Int64 = 0
        var checkpointsExhausted = false
        func nextCheckpoint() async throws -> AuditCheckpoint? {
            if checkpoints.isEmpty, !checkpointsExhausted {
                checkpoints = try await transaction.auditCheckpoints(after: checkpointsAfter, limit: pageSize)
                checkpointsAfter = checkpoints.last?.sequence ?? checkpointsAfter
                checkpointsExhausted = checkpoints.count < pageSize
            }
            return checkpoints.first
        }
        while true {
            let records = try await transaction.auditRecords(after: afterRecord, limit: pageSize)
            for record in records {
                try writer.append(AuditLine(record))
                counts.auditRecords += 1
                while let checkpoint = try await nextCheckpoint(), checkpoint.sequence <= record.sequence {
                    try writer.append(BackupCheckpoint(checkpoint))
                    counts.checkpoints += 1
                    checkpoints.removeFirst()
                }
            }
            guard records.count == pageSize, let last = records.last else { break }
            afterRecord = last.sequence
        }
        // Checkpoints past the last record (a damaged log): written as they are; restore refuses.
        while let checkpoint = try await nextCheckpoint() {
            try writer.append(BackupCheckpoint(checkpoint))
            counts.checkpoints += 1
            checkpoints.removeFirst()
        }
        return (header, counts)
    }
}
