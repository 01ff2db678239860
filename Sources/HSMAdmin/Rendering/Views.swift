import Foundation
import GatewayClient
import GatewayWire

// What `hsm-admin` prints, as values: one view per protocol message, encoded as `--json` prints
// it and rendered as tables or field lists for people. The JSON field names are part of the
// CLI's interface (docs/admin-cli.md): fields are only added. Times are ISO 8601 UTC strings,
// absent when unset; hashes are lowercase hex.

/// A role binding as printed: `{"tenant": "acme", "role": "key-user"}`.
struct RoleView: Codable, Sendable, Hashable {
    var tenant: String
    var role: String

    init(_ message: Hsmgw_V1_RoleBinding) {
        tenant = message.tenant
        role = message.role
    }

    /// `tenant:role`, as the CLI parses it.
    var text: String { "\(tenant):\(role)" }
}

/// `status`: the server's identity and health, and who this connection is.
struct StatusView: Codable, Sendable, Hashable {
    var server: String
    var serverVersion: String
    var instanceId: String
    var store: String
    var ready: Bool
    var sealed: Bool
    /// The seal's mode and progress.
    var seal: SealProgressView
    var tokenReachable: Bool
    var storeReachable: Bool
    var uptimeSeconds: UInt64
    var openConnections: UInt32
    var principal: String
    var roles: [RoleView]
    var maxFrameBytes: UInt32
    var maxRequestsInFlight: UInt32
    var keepaliveSeconds: UInt32

    init(server: String, info: Hsmgw_V1_ServerInfoResponse, hello: Hsmgw_V1_HelloResponse) {
        self.server = server
        serverVersion = info.serverVersion
        instanceId = info.instanceID
        store = info.store
        ready = info.ready
        sealed = info.sealed
        seal = SealProgressView(info.seal)
        tokenReachable = info.tokenReachable
        storeReachable = info.storeReachable
        uptimeSeconds = info.uptimeSeconds
        openConnections = info.openConnections
        principal = hello.principal.isEmpty ? info.principal : hello.principal
        roles = hello.roles.map(RoleView.init)
        maxFrameBytes = hello.maxFrameBytes
        maxRequestsInFlight = hello.maxRequestsInFlight
        keepaliveSeconds = hello.keepaliveSeconds
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("server", server)
        list.append("version", serverVersion)
        list.append("instance", instanceId)
        list.append("store", store)
        list.append("ready", ready ? "yes" : "NO")
        list.append("sealed", seal.mode == "shamir" ? seal.text : (sealed ? "YES" : "no"))
        list.append("hsm token", tokenReachable ? "reachable" : "UNREACHABLE")
        list.append("database", storeReachable ? "reachable" : "UNREACHABLE")
        list.append("uptime", DurationArgument.format(.seconds(Int64(clamping: uptimeSeconds))))
        list.append("connections", "\(openConnections)")
        list.append("principal", principal)
        list.append("roles", roles.isEmpty ? "-" : roles.map(\.text).joined(separator: ", "))
        list.append(
            "limits",
            "frame \(byteCount(maxFrameBytes)), \(maxRequestsInFlight) requests in flight, keepalive \(keepaliveSeconds)s"
        )
        return list
    }
}

/// A tenant.
struct TenantView: Codable, Sendable, Hashable {
    var id: String
    var state: String
    var primaryMasterKeyVersion: UInt32
    var createdAt: String?
    var updatedAt: String?

    init(_ message: Hsmgw_V1_TenantInfo) {
        id = message.id
        state = message.state
        primaryMasterKeyVersion = message.primaryMasterKeyVersion
        createdAt = Timestamp.iso8601(milliseconds: message.createdAtMs)
        updatedAt = Timestamp.iso8601(milliseconds: message.updatedAtMs)
        created = message.createdAtMs
        updated = message.updatedAtMs
    }

    private var created: Int64 = 0
    private var updated: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case id, state, primaryMasterKeyVersion, createdAt, updatedAt
    }

    static func table(_ tenants: [TenantView]) -> TextTable {
        var table = TextTable([
            .init("TENANT"), .init("STATE"), .init("PRIMARY", .right), .init("CREATED"), .init("UPDATED"),
        ])
        for tenant in tenants {
            table.append([
                tenant.id, tenant.state, version(tenant.primaryMasterKeyVersion),
                Timestamp.text(milliseconds: tenant.created), Timestamp.text(milliseconds: tenant.updated),
            ])
        }
        return table
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", id)
        list.append("state", state)
        list.append("primary master key", version(primaryMasterKeyVersion))
        list.append("created", Timestamp.text(milliseconds: created))
        list.append("updated", Timestamp.text(milliseconds: updated))
        return list
    }
}

/// The result of `tenant shred`.
struct ShredView: Codable, Sendable, Hashable {
    var tenant: String
    var destroyedMasterKeyVersions: [UInt32]
    var deletedDataKeys: UInt64
    var shreddedAt: String?
    var auditSequence: Int64

    init(_ message: Hsmgw_V1_ShredTenantResponse) {
        tenant = message.tenant
        destroyedMasterKeyVersions = message.destroyedMasterKeyVersions
        deletedDataKeys = message.deletedDataKeys
        shreddedAt = Timestamp.iso8601(milliseconds: message.shreddedAtMs)
        auditSequence = message.auditSequence
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append(
            "destroyed master keys",
            destroyedMasterKeyVersions.isEmpty
                ? "-" : destroyedMasterKeyVersions.map { "v\($0)" }.joined(separator: ", ")
        )
        list.append("deleted data keys", "\(deletedDataKeys)")
        list.append("shredded", shreddedAt ?? "-")
        list.append("audit record", "#\(auditSequence)")
        return list
    }
}

/// A master-key version.
struct MasterKeyView: Codable, Sendable, Hashable {
    var tenant: String
    var version: UInt32
    var state: String
    var primary: Bool
    var invocationsReserved: UInt64
    var createdAt: String?
    var updatedAt: String?
    var destroyAfter: String?
    var destroyedAt: String?

    // The raw times, for tables (not encoded).
    private var createdMs: Int64 = 0
    private var updatedMs: Int64 = 0
    private var destroyAfterMs: Int64 = 0
    private var destroyedMs: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case tenant, version, state, primary, invocationsReserved, createdAt, updatedAt, destroyAfter, destroyedAt
    }

    init(_ message: Hsmgw_V1_MasterKeyInfo) {
        tenant = message.tenant
        version = message.version
        state = message.state
        primary = message.primary
        invocationsReserved = message.invocationsReserved
        createdAt = Timestamp.iso8601(milliseconds: message.createdAtMs)
        updatedAt = Timestamp.iso8601(milliseconds: message.updatedAtMs)
        destroyAfter = Timestamp.iso8601(milliseconds: message.destroyAfterMs)
        destroyedAt = Timestamp.iso8601(milliseconds: message.destroyedAtMs)
        createdMs = message.createdAtMs
        updatedMs = message.updatedAtMs
        destroyAfterMs = message.destroyAfterMs
        destroyedMs = message.destroyedAtMs
    }

    static func table(_ versions: [MasterKeyView]) -> TextTable {
        var table = TextTable([
            .init("VERSION", .right), .init("STATE"), .init("PRIMARY"), .init("INVOCATIONS", .right), .init("CREATED"),
            .init("DESTROY AFTER"), .init("DESTROYED"),
        ])
        for key in versions {
            table.append([
                "v\(key.version)", key.state, key.primary ? "yes" : "", "\(key.invocationsReserved)",
                Timestamp.text(milliseconds: key.createdMs), Timestamp.text(milliseconds: key.destroyAfterMs),
                Timestamp.text(milliseconds: key.destroyedMs),
            ])
        }
        return table
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append("version", "v\(version)")
        list.append("state", state)
        list.append("primary", primary ? "yes" : "no")
        list.append("invocations reserved", "\(invocationsReserved)")
        list.append("created", Timestamp.text(milliseconds: createdMs))
        list.append("updated", Timestamp.text(milliseconds: updatedMs))
        if destroyAfterMs != 0 { list.append("destroy after", Timestamp.text(milliseconds: destroyAfterMs)) }
        if destroyedMs != 0 { list.append("destroyed", Timestamp.text(milliseconds: destroyedMs)) }
        return list
    }
}

/// A data key's metadata (never the key).
/// A data key's metadata as printed (shared with `hsmgw rewrap`).
public struct DataKeyView: Codable, Sendable, Hashable {
    public var tenant: String
    public var id: String
    public var masterKeyVersion: UInt32
    public var state: String
    public var encryptions: UInt64
    public var createdAt: String?
    public var updatedAt: String?

    private var created: Int64 = 0
    private var updated: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case tenant, id, masterKeyVersion, state, encryptions, createdAt, updatedAt
    }

    public init(_ message: Hsmgw_V1_DataKeyInfo) {
        tenant = message.tenant
        id = message.id
        masterKeyVersion = message.masterKeyVersion
        state = message.state
        encryptions = message.encryptions
        createdAt = Timestamp.iso8601(milliseconds: message.createdAtMs)
        updatedAt = Timestamp.iso8601(milliseconds: message.updatedAtMs)
        created = message.createdAtMs
        updated = message.updatedAtMs
    }

    static func table(_ keys: [DataKeyView]) -> TextTable {
        var table = TextTable([
            .init("ID"), .init("VERSION", .right), .init("STATE"), .init("ENCRYPTIONS", .right), .init("CREATED"),
            .init("UPDATED"),
        ])
        for key in keys {
            table.append([
                key.id, "v\(key.masterKeyVersion)", key.state, "\(key.encryptions)",
                Timestamp.text(milliseconds: key.created), Timestamp.text(milliseconds: key.updated),
            ])
        }
        return table
    }

    public var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append("id", id)
        list.append("master key", "v\(masterKeyVersion)")
        list.append("state", state)
        list.append("encryptions", "\(encryptions)")
        list.append("created", Timestamp.text(milliseconds: created))
        list.append("updated", Timestamp.text(milliseconds: updated))
        return list
    }
}

/// A rewrap job.
struct RewrapJobView: Codable, Sendable, Hashable {
    var tenant: String
    var targetVersion: UInt32
    var state: String
    var moved: UInt64
    var total: UInt64
    var startedAt: String?
    var updatedAt: String?

    private var started: Int64 = 0
    private var updated: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case tenant, targetVersion, state, moved, total, startedAt, updatedAt
    }

    init(_ message: Hsmgw_V1_RewrapJobInfo) {
        tenant = message.tenant
        targetVersion = message.targetVersion
        state = message.state
        moved = message.moved
        total = message.total
        startedAt = Timestamp.iso8601(milliseconds: message.startedAtMs)
        updatedAt = Timestamp.iso8601(milliseconds: message.updatedAtMs)
        started = message.startedAtMs
        updated = message.updatedAtMs
    }

    /// Whether the job is over (the watch stops).
    var isFinished: Bool { state != "running" }

    /// `1234/5000 (24.6%)`; `0/0 (100.0%)` for a job with nothing to move.
    var progressText: String {
        let percent = total == 0 ? 100 : Double(min(moved, total)) / Double(total) * 100
        let tenths = Int((percent * 10).rounded(.down))
        return "\(moved)/\(total) (\(tenths / 10).\(tenths % 10)%)"
    }

    /// One line: `rewrap acme to v3: running, 1234/5000 (24.6%)`.
    var line: String {
        "rewrap \(tenant) to v\(targetVersion): \(state), \(progressText)".sanitizedForTerminal
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append("target version", "v\(targetVersion)")
        list.append("state", state)
        list.append("progress", progressText)
        list.append("started", Timestamp.text(milliseconds: started))
        list.append("updated", Timestamp.text(milliseconds: updated))
        return list
    }
}

/// A principal.
struct PrincipalView: Codable, Sendable, Hashable {
    var name: String
    var certificateCommonName: String?
    var roles: [RoleView]
    var createdAt: String?
    var disabled: Bool

    private var created: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case name, certificateCommonName, roles, createdAt, disabled
    }

    init(_ message: Hsmgw_V1_PrincipalInfo) {
        name = message.name
        certificateCommonName = message.certificateCommonName.isEmpty ? nil : message.certificateCommonName
        roles = message.roles.map(RoleView.init)
        createdAt = Timestamp.iso8601(milliseconds: message.createdAtMs)
        disabled = message.disabled
        created = message.createdAtMs
    }

    static func table(_ principals: [PrincipalView]) -> TextTable {
        var table = TextTable([
            .init("PRINCIPAL"), .init("STATE"), .init("CERTIFICATE CN"), .init("CREATED"), .init("ROLES"),
        ])
        for principal in principals {
            table.append([
                principal.name, principal.disabled ? "disabled" : "enabled", principal.certificateCommonName ?? "-",
                Timestamp.text(milliseconds: principal.created),
                principal.roles.isEmpty ? "-" : principal.roles.map(\.text).joined(separator: ","),
            ])
        }
        return table
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("principal", name)
        list.append("state", disabled ? "disabled" : "enabled")
        list.append("certificate CN", certificateCommonName ?? "-")
        list.append("roles", roles.isEmpty ? "-" : roles.map(\.text).joined(separator: ", "))
        list.append("created", Timestamp.text(milliseconds: created))
        return list
    }
}

/// An API token's metadata (never the token).
struct APITokenView: Codable, Sendable, Hashable {
    var id: String
    var principal: String
    var description: String
    var state: String
    var createdAt: String?
    var expiresAt: String?
    var revokedAt: String?

    // The raw times, for tables (not encoded).
    private var createdMs: Int64 = 0
    private var expiresMs: Int64 = 0
    private var revokedMs: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case id, principal, description, state, createdAt, expiresAt, revokedAt
    }

    /// The view of `message`; `now` (milliseconds since 1970) decides whether it has expired.
    init(_ message: Hsmgw_V1_APITokenInfo, now: Int64) {
        id = message.id
        principal = message.principal
        description = message.description_p
        state = Self.state(expiresAtMs: message.expiresAtMs, revokedAtMs: message.revokedAtMs, now: now)
        createdAt = Timestamp.iso8601(milliseconds: message.createdAtMs)
        expiresAt = Timestamp.iso8601(milliseconds: message.expiresAtMs)
        revokedAt = Timestamp.iso8601(milliseconds: message.revokedAtMs)
        createdMs = message.createdAtMs
        expiresMs = message.expiresAtMs
        revokedMs = message.revokedAtMs
    }

    /// `revoked`, `expired` or `active`.
    static func state(expiresAtMs: Int64, revokedAtMs: Int64, now: Int64) -> String {
        if revokedAtMs != 0 { return "revoked" }
        if expiresAtMs != 0, expiresAtMs <= now { return "expired" }
        return "active"
    }

    private var expiresText: String { expiresMs == 0 ? "never" : Timestamp.text(milliseconds: expiresMs) }

    static func table(_ tokens: [APITokenView]) -> TextTable {
        var table = TextTable([
            .init("ID"), .init("PRINCIPAL"), .init("STATE"), .init("CREATED"), .init("EXPIRES"), .init("DESCRIPTION"),
        ])
        for token in tokens {
            table.append([
                token.id, token.principal, token.state, Timestamp.text(milliseconds: token.createdMs),
                token.expiresText,
                token.description,
            ])
        }
        return table
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("id", id)
        list.append("principal", principal)
        list.append("state", state)
        list.append("description", description.isEmpty ? "-" : description)
        list.append("created", Timestamp.text(milliseconds: createdMs))
        list.append("expires", expiresText)
        if revokedMs != 0 { list.append("revoked", Timestamp.text(milliseconds: revokedMs)) }
        return list
    }
}

/// `token create --json`: the only time the token is shown.
struct CreatedTokenView: Encodable, Sendable {
    var token: String
    var info: APITokenView
}

/// An audit record.
struct AuditRecordView: Codable, Sendable, Hashable {
    var sequence: Int64
    var time: String?
    var principal: String
    var tenant: String
    var operation: String
    var keyIds: [String]
    var outcome: String
    var requestId: String
    var detail: String
    var previousHash: String
    var hash: String

    private var timeMs: Int64 = 0

    private enum CodingKeys: String, CodingKey {
        case sequence, time, principal, tenant, operation, keyIds, outcome, requestId, detail, previousHash, hash
    }

    init(_ message: Hsmgw_V1_AuditRecordInfo) {
        sequence = message.sequence
        time = Timestamp.iso8601(milliseconds: message.timeMs)
        principal = message.principal
        tenant = message.tenant
        operation = message.operation
        keyIds = message.keyIds
        outcome = message.outcome
        requestId = message.requestID
        detail = message.detail
        previousHash = message.previousHash.lowercaseHex
        hash = message.hash.lowercaseHex
        timeMs = message.timeMs
    }

    /// The audit table's columns (fixed, so `--follow` can print rows as they come).
    static let columns: [TextTable.Column] = [
        .init("SEQ", .right), .init("TIME"), .init("PRINCIPAL"), .init("TENANT"), .init("OPERATION"),
        .init("OUTCOME"), .init("KEYS"), .init("DETAIL"),
    ]

    var cells: [String] {
        [
            "\(sequence)", Timestamp.text(milliseconds: timeMs), principal.isEmpty ? "-" : principal,
            tenant.isEmpty ? "-" : tenant, operation, outcome,
            keyIds.isEmpty ? "-" : keyIds.joined(separator: ","), detail,
        ]
    }

    static func table(_ records: [AuditRecordView]) -> TextTable {
        var table = TextTable(columns)
        for record in records { table.append(record.cells) }
        return table
    }
}

/// `audit verify`.
struct AuditVerificationView: Codable, Sendable, Hashable {
    var intact: Bool
    var recordsChecked: Int64
    var headSequence: Int64
    var headHash: String
    /// Checkpoints whose HMAC verified in the HSM.
    var checkpointsChecked: Int64
    /// The record the head's checkpoint anchors, when intact.
    var anchoredThrough: Int64?
    var problemSequence: Int64?
    var problemKind: String?
    var problem: String?

    init(_ message: Hsmgw_V1_VerifyAuditLogResponse) {
        intact = message.intact
        recordsChecked = message.recordsChecked
        headSequence = message.headSequence
        headHash = message.headHash.lowercaseHex
        checkpointsChecked = message.checkpointsChecked
        anchoredThrough = message.intact ? message.anchoredThrough : nil
        problemSequence = message.intact ? nil : message.problemSequence
        problemKind = message.intact || message.problemKind.isEmpty ? nil : message.problemKind
        problem = message.intact ? nil : message.problem
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("audit chain", intact ? "intact" : "BROKEN")
        list.append("records checked", "\(recordsChecked)")
        list.append("head", "#\(headSequence) \(headHash.isEmpty ? "-" : headHash)")
        list.append("HSM checkpoints", "\(checkpointsChecked) verified")
        if let anchoredThrough {
            list.append("anchored up to", anchoredThrough == 0 ? "- (empty log)" : "#\(anchoredThrough)")
        }
        if let problemSequence { list.append("first bad record", "#\(problemSequence)") }
        if let problem { list.append("problem", problem) }
        return list
    }
}

/// `1 MiB`, `64 KiB`, `1000 bytes`: binary units when exact.
func byteCount(_ count: UInt32) -> String {
    if count >= 1 << 20, count % (1 << 20) == 0 { return "\(count >> 20) MiB" }
    if count >= 1 << 10, count % (1 << 10) == 0 { return "\(count >> 10) KiB" }
    return "\(count) bytes"
}

/// `v3`, or `-` for 0 (none).
func version(_ number: UInt32) -> String { number == 0 ? "-" : "v\(number)" }

/// JSON as `hsm-admin` (and `hsmgw`) prints it: keys sorted, slashes unescaped.
public enum AdminJSON {
    /// One indented document with a final newline.
    public static func document(_ value: some Encodable) -> String {
        encode(value, formatting: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) + "\n"
    }

    /// One compact line with a final newline (JSON lines).
    public static func line(_ value: some Encodable) -> String {
        encode(value, formatting: [.sortedKeys, .withoutEscapingSlashes]) + "\n"
    }

    private static func encode(_ value: some Encodable, formatting: JSONEncoder.OutputFormatting) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = formatting
        // The views hold strings, numbers, booleans and arrays of them: encoding cannot fail.
        guard let data = try? encoder.encode(value) else { return "null" }
        return String(decoding: data, as: UTF8.self)
    }
}
