import Foundation
import KeyHierarchy

// The backup file (docs/operations.md, "Backup and restore"): JSON lines, one object per line,
// each with a `kind`:
//
//   header      format, format version, schema version, store kind, token identity, audit head
//               and the checkpoint that anchors it
//   tenant, version, rewrap-job, data-key      per tenant, in tenant id order
//   principal, api-token
//   audit, checkpoint                           the chain in sequence order; a kept checkpoint
//                                               follows the record it names
//   end         how many lines came before it and the SHA-256 of all their bytes
//
// Everything is written as it is read and read back a line at a time, so memory stays bounded
// whatever the size of the database. Byte fields are lowercase hex. Nothing secret is in it:
// wrapped data keys (useless without the token's master keys), SHA-256 hashes of API tokens,
// context hashes, the audit log. Never a PIN, a plaintext key or a context value.

/// The identity of the token a backup belongs to: its label and serial number, as the token
/// reports them (`C_GetTokenInfo`).
public struct BackupTokenIdentity: Codable, Sendable, Hashable, CustomStringConvertible {
    public var label: String
    public var serial: String

    public init(label: String, serial: String) {
        self.label = label
        self.serial = serial
    }

    public var description: String { "\"\(label)\" serial \(serial)" }
}

/// The first line of a backup.
public struct BackupHeader: Codable, Sendable, Hashable {
    /// `format`'s only value.
    public static let formatName = "hsmgw-backup"
    /// The format this code writes and the only one it reads.
    public static let currentFormatVersion = 1

    var kind = BackupLineKind.header
    public var format: String
    public var formatVersion: Int
    /// The store's schema version when the backup was made (informational: restore goes through
    /// the key repository's operations, so it loads into any schema this gateway knows).
    public var schemaVersion: Int
    /// `postgres` or `sqlite`.
    public var store: String
    public var createdAtMs: Int64
    public var token: BackupTokenIdentity
    /// The audit head in the snapshot.
    public var auditHead: BackupAuditHead
    /// The checkpoint of the head, made by the audit key in the token; nil only for an empty log.
    public var auditAnchor: BackupCheckpoint?
}

/// The kinds of lines.
enum BackupLineKind: String, Codable, Sendable {
    case header
    case tenant
    case version
    case rewrapJob = "rewrap-job"
    case dataKey = "data-key"
    case principal
    case apiToken = "api-token"
    case audit
    case checkpoint
    case end
}

/// Only the `kind` of a line, to choose its decoder.
struct BackupLineKindProbe: Decodable {
    var kind: BackupLineKind
}

/// A failure reading or writing a backup. `description` names the line, never a value from it.
public struct BackupError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        /// The file is not a backup this code reads, or is damaged or truncated.
        public static let malformed = Code("malformed")
        /// The file's SHA-256 does not match its trailer: changed after it was written.
        public static let checksumMismatch = Code("checksum-mismatch")
        /// The backup belongs to another token, or its MAC or audit anchor does not verify with
        /// this one.
        public static let wrongToken = Code("wrong-token")
        /// The target database is not empty.
        public static let targetNotEmpty = Code("target-not-empty")
        /// The backup's audit log does not verify.
        public static let auditLogBroken = Code("audit-log-broken")
        /// Reading or writing a file failed.
        public static let io = Code("io")
        public var description: String { name }
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

/// Limits of the format, each checked when reading.
public enum BackupLimits {
    /// The longest line accepted: an audit record lists at most 1,000 key ids of 36 bytes and a
    /// detail of 1 KiB (about 40 KiB as JSON), a principal at most 256 bindings. 1 MiB leaves
    /// room and still bounds what one line can make the reader hold.
    public static let maximumLineByteCount = 1 << 20
    /// Data keys inserted per statement, and audit records appended per call between kept
    /// checkpoints, on restore: the key repository's batch size.
    public static let dataKeysPerInsert = KeyServiceConfiguration.maximumBatchSize
    /// Checkpoints whose MACs are checked with the token in one lease while a backup is verified.
    public static let checkpointsPerTokenRound = 100
    /// The invocation count every restored master-key version gets, at least: above any
    /// configurable invocation limit (at most 2^32 - 1), so no restored version wraps again and
    /// the first GenerateDataKey (or rewrap) under a restored primary rotates the tenant. The
    /// database's count is behind the truth by every wrap made after the backup; a new version
    /// starts its count at zero, exactly. (IVs themselves come from the token's RNG, so a restore
    /// cannot bring one back; the count bounds how often one key is used, NIST SP 800-38D §8.3.)
    public static let restoredInvocationCount: Int64 = 1 << 32
}

// MARK: - Lines

/// The audit head: the last sequence and its hash.
public struct BackupAuditHead: Codable, Sendable, Hashable {
    public var sequence: Int64
    public var hash: String

    init(_ head: AuditHead) {
        sequence = head.sequence
        hash = Hex.encode(head.hash)
    }

    func head() throws(BackupError) -> AuditHead {
        AuditHead(sequence: sequence, hash: try Hex.decode(hash, bytes: 32, field: "audit head hash"))
    }
}

/// A checkpoint of the audit chain (a kept one, or the head's anchor).
public struct BackupCheckpoint: Codable, Sendable, Hashable {
    var kind = BackupLineKind.checkpoint
    public var sequence: Int64
    public var hash: String
    public var keyID: String
    public var mac: String
    public var timeMs: Int64

    init(_ checkpoint: AuditCheckpoint) {
        sequence = checkpoint.sequence
        hash = Hex.encode(checkpoint.hash)
        keyID = Hex.encode(checkpoint.keyID.bytes)
        mac = Hex.encode(checkpoint.mac)
        timeMs = checkpoint.time.millisecondsSinceEpoch
    }

    func checkpoint() throws(BackupError) -> AuditCheckpoint {
        guard
            let keyID = TokenKeyID(
                bytes: try Hex.decode(keyID, bytes: TokenKeyID.byteCount, field: "checkpoint key id"))
        else { throw BackupError(.malformed, "a checkpoint's key id is malformed") }
        return AuditCheckpoint(
            sequence: sequence,
            hash: try Hex.decode(hash, bytes: 32, field: "checkpoint hash"),
            keyID: keyID,
            mac: try Hex.decode(mac, bytes: 32, field: "checkpoint MAC"),
            time: Timestamp(millisecondsSinceEpoch: timeMs)
        )
    }
}

struct TenantLine: Codable {
    var kind = BackupLineKind.tenant
    var id: String
    var state: String
    var primaryVersion: Int
    var createdAtMs: Int64
    var updatedAtMs: Int64

    init(_ record: TenantRecord) {
        id = record.id.rawValue
        state = record.state.rawValue
        primaryVersion = record.primaryVersion
        createdAtMs = record.createdAt.millisecondsSinceEpoch
        updatedAtMs = record.updatedAt.millisecondsSinceEpoch
    }

    func record() throws -> TenantRecord {
        TenantRecord(
            id: try TenantID(id),
            state: try parse(TenantState.self, state, "tenant state"),
            primaryVersion: primaryVersion,
            createdAt: Timestamp(millisecondsSinceEpoch: createdAtMs),
            updatedAt: Timestamp(millisecondsSinceEpoch: updatedAtMs)
        )
    }
}

struct VersionLine: Codable {
    var kind = BackupLineKind.version
    var tenant: String
    var version: Int
    var state: String
    var tokenKeyID: String
    var invocationsReserved: Int64
    var createdAtMs: Int64
    var updatedAtMs: Int64
    var destroyAfterMs: Int64?
    var destroyedAtMs: Int64?

    init(_ record: MasterKeyVersionRecord) {
        tenant = record.tenant.rawValue
        version = record.version
        state = record.state.rawValue
        tokenKeyID = Hex.encode(record.tokenKeyID.bytes)
        invocationsReserved = record.invocationsReserved
        createdAtMs = record.createdAt.millisecondsSinceEpoch
        updatedAtMs = record.updatedAt.millisecondsSinceEpoch
        destroyAfterMs = record.destroyAfter?.millisecondsSinceEpoch
        destroyedAtMs = record.destroyedAt?.millisecondsSinceEpoch
    }

    func record() throws -> MasterKeyVersionRecord {
        guard version > 0, invocationsReserved >= 0,
            let keyID = TokenKeyID(
                bytes: try Hex.decode(tokenKeyID, bytes: TokenKeyID.byteCount, field: "token key id"))
        else { throw BackupError(.malformed, "a master-key version line is malformed") }
        return MasterKeyVersionRecord(
            tenant: try TenantID(tenant),
            version: version,
            state: try parse(MasterKeyState.self, state, "master-key state"),
            tokenKeyID: keyID,
            invocationsReserved: invocationsReserved,
            createdAt: Timestamp(millisecondsSinceEpoch: createdAtMs),
            updatedAt: Timestamp(millisecondsSinceEpoch: updatedAtMs),
            destroyAfter: destroyAfterMs.map(Timestamp.init(millisecondsSinceEpoch:)),
            destroyedAt: destroyedAtMs.map(Timestamp.init(millisecondsSinceEpoch:))
        )
    }
}

struct RewrapJobLine: Codable {
    var kind = BackupLineKind.rewrapJob
    var tenant: String
    var targetVersion: Int
    var state: String
    var cursor: String?
    var moved: Int64
    var total: Int64
    var startedAtMs: Int64
    var updatedAtMs: Int64

    init(_ record: RewrapJobRecord) {
        tenant = record.tenant.rawValue
        targetVersion = record.targetVersion
        state = record.state.rawValue
        cursor = record.cursor?.description
        moved = record.moved
        total = record.total
        startedAtMs = record.startedAt.millisecondsSinceEpoch
        updatedAtMs = record.updatedAt.millisecondsSinceEpoch
    }

    func record() throws -> RewrapJobRecord {
        RewrapJobRecord(
            tenant: try TenantID(tenant),
            targetVersion: targetVersion,
            state: try parse(RewrapJobState.self, state, "rewrap job state"),
            cursor: try cursor.map { try DataKeyID($0) },
            moved: moved,
            total: total,
            startedAt: Timestamp(millisecondsSinceEpoch: startedAtMs),
            updatedAt: Timestamp(millisecondsSinceEpoch: updatedAtMs)
        )
    }
}

struct DataKeyLine: Codable {
    var kind = BackupLineKind.dataKey
    var tenant: String
    var id: String
    var version: Int
    var state: String
    var wrapped: String?
    var contextHash: String
    var encryptions: Int64
    var createdAtMs: Int64
    var updatedAtMs: Int64

    init(_ record: DataKeyRecord) {
        tenant = record.tenant.rawValue
        id = record.id.description
        version = record.version
        state = record.state.rawValue
        wrapped = record.wrapped.map(Hex.encode)
        contextHash = Hex.encode(record.contextHash)
        encryptions = record.encryptions
        createdAtMs = record.createdAt.millisecondsSinceEpoch
        updatedAtMs = record.updatedAt.millisecondsSinceEpoch
    }

    func record() throws -> DataKeyRecord {
        DataKeyRecord(
            tenant: try TenantID(tenant),
            id: try DataKeyID(id),
            version: version,
            state: try parse(DataKeyState.self, state, "data key state"),
            wrapped: try wrapped.map {
                try Hex.decode($0, bytes: WrappedDataKey.encodedByteCount, field: "wrapped key")
            },
            contextHash: try Hex.decode(contextHash, bytes: 32, field: "context hash"),
            encryptions: encryptions,
            createdAt: Timestamp(millisecondsSinceEpoch: createdAtMs),
            updatedAt: Timestamp(millisecondsSinceEpoch: updatedAtMs)
        )
    }
}

struct PrincipalLine: Codable {
    struct Binding: Codable {
        var scope: String
        var role: String
    }

    var kind = BackupLineKind.principal
    var name: String
    var certificateCommonName: String?
    var roles: [Binding]
    var createdAtMs: Int64
    var disabled: Bool

    init(_ record: PrincipalRecord) {
        name = record.name.rawValue
        certificateCommonName = record.certificateCommonName?.rawValue
        roles = record.roles.map { Binding(scope: $0.scope.rawValue, role: $0.role.rawValue) }
        createdAtMs = record.createdAt.millisecondsSinceEpoch
        disabled = record.disabled
    }

    func record() throws -> PrincipalRecord {
        guard roles.count <= PrincipalRecord.maximumRoleBindings else {
            throw BackupError(.malformed, "a principal holds more than \(PrincipalRecord.maximumRoleBindings) roles")
        }
        return PrincipalRecord(
            // Reserved names (`system`) never reach the store through the API: refuse them here too.
            name: try PrincipalName(name),
            certificateCommonName: try certificateCommonName.map { try CertificateCommonName($0) },
            roles: try roles.map { try RoleBinding(scope: $0.scope, role: $0.role) },
            createdAt: Timestamp(millisecondsSinceEpoch: createdAtMs),
            disabled: disabled
        )
    }
}

struct APITokenLine: Codable {
    var kind = BackupLineKind.apiToken
    var id: String
    var principal: String
    /// SHA-256 of the token: the token itself is never stored, so never backed up.
    var hash: String
    var description: String
    var createdAtMs: Int64
    var expiresAtMs: Int64?
    var revokedAtMs: Int64?

    init(_ record: APITokenRecord) {
        id = record.id.rawValue
        principal = record.principal.rawValue
        hash = Hex.encode(record.hash)
        description = record.description
        createdAtMs = record.createdAt.millisecondsSinceEpoch
        expiresAtMs = record.expiresAt?.millisecondsSinceEpoch
        revokedAtMs = record.revokedAt?.millisecondsSinceEpoch
    }

    func record() throws -> APITokenRecord {
        try APITokenRecord.validateDescription(description)
        return APITokenRecord(
            id: try APITokenID(id),
            principal: try PrincipalName(principal),
            hash: try Hex.decode(hash, bytes: 32, field: "token hash"),
            description: description,
            createdAt: Timestamp(millisecondsSinceEpoch: createdAtMs),
            expiresAt: expiresAtMs.map(Timestamp.init(millisecondsSinceEpoch:)),
            revokedAt: revokedAtMs.map(Timestamp.init(millisecondsSinceEpoch:))
        )
    }
}

struct AuditLine: Codable {
    var kind = BackupLineKind.audit
    var sequence: Int64
    var timeMs: Int64
    var principal: String
    var tenant: String?
    var operation: String
    var keyIDs: [String]
    var outcome: String
    var requestID: String
    var detail: String
    var previousHash: String
    var hash: String

    init(_ record: AuditRecord) {
        sequence = record.sequence
        timeMs = record.event.time.millisecondsSinceEpoch
        principal = record.event.principal.name
        tenant = record.event.tenant?.rawValue
        operation = record.event.operation.rawValue
        keyIDs = record.event.keyIDs
        outcome = record.event.outcome.description
        requestID = record.event.requestID
        detail = record.event.detail
        previousHash = Hex.encode(record.previousHash)
        hash = Hex.encode(record.hash)
    }

    func record() throws -> AuditRecord {
        guard let operation = AuditOperation(rawValue: operation) else {
            throw BackupError(.malformed, "audit record \(sequence) names an unknown operation")
        }
        guard keyIDs.count <= AuditEvent.maximumKeyIDs, detail.utf8.count <= AuditEvent.maximumDetailLength else {
            throw BackupError(.malformed, "audit record \(sequence) is larger than an audit record can be")
        }
        let event = AuditEvent(
            time: Timestamp(millisecondsSinceEpoch: timeMs),
            principal: Principal(principal),
            // Stored tenants were validated when written; an audit record of a refused call may
            // name a tenant id as the caller sent it, so it is taken as it is (the hash covers it).
            tenant: tenant.map { TenantID(trusted: $0) },
            operation: operation,
            keyIDs: keyIDs,
            outcome: AuditOutcome(stored: outcome),
            requestID: requestID,
            detail: detail
        )
        return AuditRecord(
            sequence: sequence,
            event: event,
            previousHash: try Hex.decode(previousHash, bytes: 32, field: "audit previous hash"),
            hash: try Hex.decode(hash, bytes: 32, field: "audit hash")
        )
    }
}

struct EndLine: Codable {
    var kind = BackupLineKind.end
    /// Lines before this one, the header included.
    var lines: Int64
    /// SHA-256 of every byte before this line.
    var sha256: String
    /// The `CKA_ID` of the backup key (`BackupMAC.keyLabel`) that made `mac`.
    var macKeyID: String
    /// HMAC-SHA-256 of `BackupMAC.message(sha256:)` by the backup key in the token.
    var mac: String
}

/// The HSM's seal on a backup file: an HMAC-SHA-256, by a key inside the token, of the file's
/// SHA-256. The checksum alone catches damage; the MAC catches a file changed on purpose and
/// checksummed again (a principal or an API token hash slipped in), which only someone able to
/// use the token could seal again. Its own key, not the audit-anchor key, which signs nothing
/// but audit checkpoints.
public enum BackupMAC {
    /// The label of the backup key: a non-extractable HMAC-SHA-256 key, made on the first backup
    /// with the audit key's policy.
    public static let keyLabel = "hsmgw:backup:v1"

    /// What the MAC covers: a domain tag and the SHA-256 of the body, each length-prefixed.
    static func message(sha256 digest: [UInt8]) -> [UInt8] {
        let tag = Array("hsmgw-backup-v1".utf8)
        var out: [UInt8] = []
        for field in [tag, digest] {
            let count = UInt32(field.count)
            out += [
                UInt8(count >> 24 & 0xff), UInt8(count >> 16 & 0xff), UInt8(count >> 8 & 0xff), UInt8(count & 0xff),
            ]
            out += field
        }
        return out
    }
}

// MARK: - Helpers

func parse<State: RawRepresentable>(_ type: State.Type, _ text: String, _ field: String) throws -> State
where State.RawValue == String {
    guard let value = State(rawValue: text) else {
        throw BackupError(.malformed, "unknown \(field) '\(text.prefix(32))'")
    }
    return value
}

enum Hex {
    static func encode(_ bytes: some Collection<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String, bytes count: Int, field: String) throws(BackupError) -> [UInt8] {
        let utf8 = Array(text.utf8)
        guard utf8.count == count * 2 else {
            throw BackupError(.malformed, "\(field) must be \(count) bytes of hex")
        }
        var out: [UInt8] = []
        out.reserveCapacity(count)
        var index = 0
        while index < utf8.count {
            guard let high = nibble(utf8[index]), let low = nibble(utf8[index + 1]) else {
                throw BackupError(.malformed, "\(field) is not hex")
            }
            out.append(high << 4 | low)
            index += 2
        }
        return out
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        default: return nil
        }
    }
}
