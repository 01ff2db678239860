import GatewayTransport
import GatewayWire
import KeyHierarchy
import NIOCore
import SwiftProtobuf

/// The limits on repeated fields and maps of request messages, checked on the wire bytes before a
/// request is decoded (`RepeatedFieldScan`): a request over one is refused INVALID_ARGUMENT after
/// reading at most one entry more than the limit, instead of after building every entry the frame
/// holds. The same limits are checked again on the decoded message where they are enforced today
/// (the data-key handlers, `EncryptionContext`, the principal's role bindings).
enum RequestEntryLimits {
    /// The encryption context map at `fieldNumber`: at most 64 pairs.
    static func encryptionContext(_ fieldNumber: UInt64) -> RepeatedFieldScan.Rule {
        RepeatedFieldScan.Rule(
            fieldNumber: fieldNumber, name: "encryption_context", maximum: ServerLimits.maxEncryptionContextPairs)
    }

    /// The rules of each request message that has repeated fields, by its full protobuf name.
    static let rules: [String: [RepeatedFieldScan.Rule]] = [
        Hsmgw_V1_GenerateDataKeyRequest.protoMessageName: [encryptionContext(2)],
        Hsmgw_V1_GenerateDataKeysRequest.protoMessageName: [encryptionContext(3)],
        Hsmgw_V1_DecryptDataKeyRequest.protoMessageName: [encryptionContext(3)],
        Hsmgw_V1_DecryptDataKeysRequest.protoMessageName: [
            RepeatedFieldScan.Rule(
                fieldNumber: 2, name: "keys", maximum: ServerLimits.maxBatchKeys,
                entryRules: [encryptionContext(2)])
        ],
        Hsmgw_V1_EncryptRequest.protoMessageName: [encryptionContext(4)],
        Hsmgw_V1_DecryptRequest.protoMessageName: [encryptionContext(3)],
        Hsmgw_V1_RewrapDataKeyRequest.protoMessageName: [encryptionContext(3)],
        Hsmgw_V1_CreatePrincipalRequest.protoMessageName: [
            RepeatedFieldScan.Rule(fieldNumber: 3, name: "roles", maximum: PrincipalRecord.maximumRoleBindings)
        ],
    ]

    /// Throws INVALID_ARGUMENT naming the first field of `payload` over its limit, or
    /// MALFORMED_PAYLOAD when the bytes are not a protobuf message; returns when `M` has no
    /// counted field or every one is within its limit.
    static func check<M: SwiftProtobuf.Message>(_ type: M.Type, _ payload: ByteBuffer) throws(RequestFailure) {
        guard let rules = rules[M.protoMessageName] else { return }
        switch RepeatedFieldScan.scan(payload, rules: rules).outcome {
        case .withinLimits:
            return
        case .over(let excess):
            throw RequestFailure(
                .invalidArgument,
                "\(excess.path) holds more than \(excess.maximum) entries, the limit (counted before decoding)"
            )
        case .malformed:
            throw RequestFailure.malformedPayload
        }
    }
}
