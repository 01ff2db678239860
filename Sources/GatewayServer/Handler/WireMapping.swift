import Foundation
import GatewayTransport
import GatewayWire
import KeyHierarchy
import NIOCore
import PKCS11
import SwiftProtobuf

/// A request that ends in a status other than OK: what the caller is told (never secrets, never
/// `KeyServiceError.underlying`).
struct RequestFailure: Error, Sendable {
    var status: StatusCode
    var message: String
    var reason: String

    init(_ status: StatusCode, _ message: String, reason: String = "") {
        self.status = status
        self.message = message
        self.reason = reason
    }

    /// The payload did not decode as the method's request message.
    static let malformedPayload = RequestFailure(
        .invalidArgument, "the payload is not a valid request message for this method",
        reason: StatusReason.malformedPayload)

    /// The caller's roles do not allow the action on the tenant. The same text whether or not
    /// the tenant exists.
    static let permissionDenied = RequestFailure(
        .permissionDenied, "the caller's roles do not allow this method on this tenant")

    /// The failed response.
    var response: OutgoingResponse {
        OutgoingResponse(status: status, payload: statusMessage.wirePayload())
    }

    var statusMessage: Hsmgw_V1_Status { Hsmgw_V1_Status(status, message, reason: reason) }

    /// Maps a key-service error: one status per code; the message is the client-safe one.
    init(_ error: KeyServiceError) {
        switch error.code {
        case .invalidArgument: self.init(.invalidArgument, error.message)
        case .notFound: self.init(.notFound, error.message)
        case .alreadyExists: self.init(.alreadyExists, error.message)
        case .failedPrecondition: self.init(.failedPrecondition, error.message)
        case .resourceExhausted: self.init(.resourceExhausted, error.message)
        case .decryptionFailed:
            self.init(.invalidArgument, error.message, reason: StatusReason.decryptionFailed)
        case .aborted: self.init(.aborted, error.message)
        case .unavailable: self.init(.unavailable, error.message)
        case .dataLoss: self.init(.dataLoss, error.message)
        case .internalError: self.init(.internalError, error.message)
        default: self.init(.internalError, "internal error")
        }
    }
}

/// Records of the domain as wire messages. Metadata only, except `dataKey`, which carries the
/// plaintext the caller asked for.
enum WireMapping {
    static func ok(_ message: some SwiftProtobuf.Message) -> OutgoingResponse {
        OutgoingResponse(status: .ok, payload: message.wirePayload())
    }

    static func dataKey(
        id: DataKeyID,
        version: MasterKeyVersionNumber,
        wrapped: [UInt8]?,
        plaintext: SecretBytes?
    ) -> Hsmgw_V1_DataKey {
        var key = Hsmgw_V1_DataKey()
        key.id = id.description
        key.masterKeyVersion = UInt32(clamping: version)
        if let wrapped { key.wrapped = Data(wrapped) }
        if let plaintext {
            key.plaintext = plaintext.withUnsafeBytes { Data($0) }
        }
        return key
    }

    static func dataKeyInfo(_ record: DataKeyRecord) -> Hsmgw_V1_DataKeyInfo {
        var info = Hsmgw_V1_DataKeyInfo()
        info.tenant = record.tenant.rawValue
        info.id = record.id.description
        info.masterKeyVersion = UInt32(clamping: record.version)
        info.state = record.state.rawValue
        info.encryptions = UInt64(clamping: record.encryptions)
        info.createdAtMs = record.createdAt.millisecondsSinceEpoch
        info.updatedAtMs = record.updatedAt.millisecondsSinceEpoch
        return info
    }

    static func tenantInfo(_ record: TenantRecord) -> Hsmgw_V1_TenantInfo {
        var info = Hsmgw_V1_TenantInfo()
        info.id = record.id.rawValue
        info.state = record.state.rawValue
        info.primaryMasterKeyVersion = UInt32(clamping: record.primaryVersion)
        info.createdAtMs = record.createdAt.millisecondsSinceEpoch
        info.updatedAtMs = record.updatedAt.millisecondsSinceEpoch
        return info
    }

    static func masterKeyInfo(_ record: MasterKeyVersionRecord, primary: MasterKeyVersionNumber?)
        -> Hsmgw_V1_MasterKeyInfo
    {
        var info = Hsmgw_V1_MasterKeyInfo()
        info.tenant = record.tenant.rawValue
        info.version = UInt32(clamping: record.version)
        info.state = record.state.rawValue
        info.primary = record.version == primary
        info.invocationsReserved = UInt64(clamping: record.invocationsReserved)
        info.createdAtMs = record.createdAt.millisecondsSinceEpoch
        info.updatedAtMs = record.updatedAt.millisecondsSinceEpoch
        info.destroyAfterMs = record.destroyAfter?.millisecondsSinceEpoch ?? 0
        info.destroyedAtMs = record.destroyedAt?.millisecondsSinceEpoch ?? 0
        return info
    }

    static func rewrapJobInfo(_ record: RewrapJobRecord) -> Hsmgw_V1_RewrapJobInfo {
        var info = Hsmgw_V1_RewrapJobInfo()
        info.tenant = record.tenant.rawValue
        info.targetVersion = UInt32(clamping: record.targetVersion)
        info.state = record.state.rawValue
        info.moved = UInt64(clamping: record.moved)
        info.total = UInt64(clamping: record.total)
        info.startedAtMs = record.startedAt.millisecondsSinceEpoch
        info.updatedAtMs = record.updatedAt.millisecondsSinceEpoch
        return info
    }

    static func roleBinding(_ binding: KeyHierarchy.RoleBinding) -> Hsmgw_V1_RoleBinding {
        var wire = Hsmgw_V1_RoleBinding()
        wire.tenant = binding.scope.rawValue
        wire.role = binding.role.rawValue
        return wire
    }

    static func principalInfo(_ record: PrincipalRecord) -> Hsmgw_V1_PrincipalInfo {
        var info = Hsmgw_V1_PrincipalInfo()
        info.name = record.name.rawValue
        info.certificateCommonName = record.certificateCommonName?.rawValue ?? ""
        info.roles = record.roles.map(roleBinding)
        info.createdAtMs = record.createdAt.millisecondsSinceEpoch
        info.disabled = record.disabled
        return info
    }

    static func apiTokenInfo(_ record: APITokenRecord) -> Hsmgw_V1_APITokenInfo {
        var info = Hsmgw_V1_APITokenInfo()
        info.id = record.id.rawValue
        info.principal = record.principal.rawValue
        info.description_p = record.description
        info.createdAtMs = record.createdAt.millisecondsSinceEpoch
        info.expiresAtMs = record.expiresAt?.millisecondsSinceEpoch ?? 0
        info.revokedAtMs = record.revokedAt?.millisecondsSinceEpoch ?? 0
        return info
    }

    static func auditRecordInfo(_ record: AuditRecord) -> Hsmgw_V1_AuditRecordInfo {
        var info = Hsmgw_V1_AuditRecordInfo()
        info.sequence = record.sequence
        info.timeMs = record.event.time.millisecondsSinceEpoch
        info.principal = record.event.principal.name
        info.tenant = record.event.tenant?.rawValue ?? ""
        info.operation = record.event.operation.rawValue
        info.keyIds = record.event.keyIDs
        // The stored text, exactly as the record's hash covers it (`ok`, `error:<code>`), so an
        // auditor can recompute the chain from these fields (protocol §16.4).
        info.outcome = record.event.outcome.description
        info.requestID = record.event.requestID
        info.detail = record.event.detail
        info.previousHash = Data(record.previousHash)
        info.hash = Data(record.hash)
        return info
    }
}
