internal import CPKCS11Shim

/// What the audit-anchor key must be, and the check that a key on the token is no weaker.
///
/// The gateway authenticates the head of its audit hash chain with HMAC-SHA-256 under one key
/// inside the token, so that whoever can write the database cannot rewrite the log consistently
/// (security invariant 5). The key follows the master-key policy where it applies: a token object,
/// private, sensitive, generated inside the token and never extractable; and it has one purpose,
/// sign+verify, never encrypt, decrypt, wrap, unwrap or derive (so it can be used for nothing but
/// MACs, and no WRAP∧DECRYPT or UNWRAP∧ENCRYPT pair can exist).
public enum AuditKeyPolicy {
    /// The audit key's label (the key service names the same label, `AuditAnchoring.keyLabel`).
    public static let label = "hsmgw:audit:v1"
    /// A 256-bit generic secret, the size of the HMAC-SHA-256 block's security level.
    public static let keyByteCount = 32
    /// HMAC-SHA-256 output length.
    public static let macByteCount = 32
    /// The longest message `signHMACSHA256` accepts: far above any checkpoint the gateway signs.
    public static let maximumMessageByteCount = 64 * 1024

    /// One way a key falls short of the policy.
    public enum Violation: String, Sendable, Hashable, CustomStringConvertible {
        case notSecretKey = "not-a-secret-key"
        case notGenericSecret = "not-generic-secret"
        case wrongKeyLength = "not-256-bit"
        case notTokenObject = "not-a-token-object"
        case notPrivate = "not-private"
        case notSensitive = "not-sensitive"
        case extractable = "extractable"
        case notAlwaysSensitive = "not-always-sensitive"
        case notNeverExtractable = "not-never-extractable"
        /// CKA_SIGN is false: it cannot MAC.
        case cannotSign = "cannot-sign"
        /// CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP or CKA_DERIVE is true.
        case extraUsage = "extra-usage"
        /// The token would not say (an attribute the policy needs came back unavailable).
        case unreadableAttribute = "unreadable-attribute"

        public var description: String {
            switch self {
            case .notSecretKey: "CKA_CLASS is not CKO_SECRET_KEY"
            case .notGenericSecret: "CKA_KEY_TYPE is not CKK_GENERIC_SECRET"
            case .wrongKeyLength: "CKA_VALUE_LEN is not 32 bytes"
            case .notTokenObject: "CKA_TOKEN is false"
            case .notPrivate: "CKA_PRIVATE is false"
            case .notSensitive: "CKA_SENSITIVE is false"
            case .extractable: "CKA_EXTRACTABLE is true"
            case .notAlwaysSensitive: "CKA_ALWAYS_SENSITIVE is false (the key was once readable)"
            case .notNeverExtractable: "CKA_NEVER_EXTRACTABLE is false (the key was once extractable)"
            case .cannotSign: "CKA_SIGN is false"
            case .extraUsage: "CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP or CKA_DERIVE is true"
            case .unreadableAttribute: "a required attribute could not be read"
            }
        }
    }

    /// The template for a new audit key.
    public static func template(label: String, id: [UInt8], modifiable: Bool = false) -> [Attribute] {
        var template: [Attribute] = [
            .objectClass(.secretKey), .keyType(.genericSecret), .valueLength(keyByteCount),
            .token(true), .private(true), .sensitive(true), .extractable(false),
            .sign(true), .verify(true),
            .encrypt(false), .decrypt(false), .wrap(false), .unwrap(false), .derive(false),
            .label(label), .id(id),
        ]
        if !modifiable {
            template.append(.modifiable(false))
        }
        return template
    }

    /// The attributes `violations(in:)` reads.
    public static let verifiedAttributes: [AttributeType] = [
        .objectClass, .keyType, .valueLength, .token, .private, .sensitive, .extractable,
        .alwaysSensitive, .neverExtractable, .sign, .encrypt, .decrypt, .wrap, .unwrap, .derive,
    ]

    /// Every way the key described by `values` is weaker than the policy; empty when it complies.
    public static func violations(in values: AttributeValues) -> [Violation] {
        var found: [Violation] = []
        func flag(_ type: AttributeType) -> Bool? {
            let value = values.bool(type)
            if value == nil, !found.contains(.unreadableAttribute) {
                found.append(.unreadableAttribute)
            }
            return value
        }
        if values.unsignedInteger(.objectClass) != ObjectClass.secretKey.rawValue { found.append(.notSecretKey) }
        if values.unsignedInteger(.keyType) != KeyType.genericSecret.rawValue { found.append(.notGenericSecret) }
        if values.unsignedInteger(.valueLength) != UInt(keyByteCount) { found.append(.wrongKeyLength) }
        if flag(.token) != true { found.append(.notTokenObject) }
        if flag(.private) != true { found.append(.notPrivate) }
        if flag(.sensitive) != true { found.append(.notSensitive) }
        if flag(.extractable) != false { found.append(.extractable) }
        if flag(.alwaysSensitive) != true { found.append(.notAlwaysSensitive) }
        if flag(.neverExtractable) != true { found.append(.notNeverExtractable) }
        if flag(.sign) != true { found.append(.cannotSign) }
        // Absent usage attributes (a token without them) are no extra usage.
        if [AttributeType.encrypt, .decrypt, .wrap, .unwrap, .derive].contains(where: { values.bool($0) == true }) {
            found.append(.extraUsage)
        }
        return found
    }
}

extension Session {
    /// Generates an audit key inside the token with `AuditKeyPolicy.template`, asking for
    /// `CKA_MODIFIABLE` false and retrying without it when the token refuses that attribute.
    public func generateAuditKey(label: String, id: [UInt8]) throws -> ObjectHandle {
        do {
            return try generateKey(.genericSecretKeyGen, template: AuditKeyPolicy.template(label: label, id: id))
        } catch let error as PKCS11Error
            where error.returnValue == .attributeTypeInvalid || error.returnValue == .attributeValueInvalid
            || error.returnValue == .templateInconsistent
        {
            return try generateKey(
                .genericSecretKeyGen,
                template: AuditKeyPolicy.template(label: label, id: id, modifiable: true)
            )
        }
    }

    /// Reads back the policy's attributes of `key` and throws `masterKeyPolicyViolation` (the
    /// code for any gateway key weaker than its policy), naming every violation.
    public func verifyAuditKey(_ key: ObjectHandle) throws {
        let values = try attributes(AuditKeyPolicy.verifiedAttributes, of: key)
        let violations = AuditKeyPolicy.violations(in: values)
        guard violations.isEmpty else {
            throw PKCS11Error(
                code: .masterKeyPolicyViolation,
                detail: "audit key: " + violations.map(\.description).joined(separator: "; ")
            )
        }
    }

    /// The secret-key token objects labelled exactly `label`, with their `CKA_ID`s.
    public func findSecretKeys(label: String) throws -> [(handle: ObjectHandle, id: [UInt8])] {
        try findObjects([.objectClass(.secretKey), .token(true), .label(label)], limit: 16).map { handle in
            (handle, try attributes([.id], of: handle).bytes(.id) ?? [])
        }
    }

    /// `C_SignInit` + `C_Sign` with `CKM_SHA256_HMAC`: the 32-byte HMAC-SHA-256 of `message`.
    public func signHMACSHA256(key: ObjectHandle, message: [UInt8]) throws -> [UInt8] {
        guard message.count <= AuditKeyPolicy.maximumMessageByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: .signInit,
                detail: "HMAC input of \(message.count) bytes is over \(AuditKeyPolicy.maximumMessageByteCount)"
            )
        }
        var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_SHA256_HMAC), pParameter: nil, ulParameterLen: 0)
        try call(.signInit, \.C_SignInit) { $0(handle, &mechanism, key.rawValue) }
        // From here on an operation is active: only success ends it for sure, so any failure
        // leaves the session unusable (CKR_BUFFER_TOO_SMALL keeps it active by definition).
        do {
            return try message.withUnsafeBufferPointer { input in
                let inputPointer = UnsafeMutablePointer(mutating: input.baseAddress)
                var mac = [UInt8](repeating: 0, count: AuditKeyPolicy.macByteCount)
                var written = CK_ULONG(mac.count)
                try call(.sign, \.C_Sign) { $0(handle, inputPointer, CK_ULONG(input.count), &mac, &written) }
                let count = try checkReported(.sign, written, capacity: mac.count)
                guard count == AuditKeyPolicy.macByteCount else {
                    throw misbehaved(.sign, "reported \(count) bytes of HMAC-SHA-256, expected \(mac.count)")
                }
                return mac
            }
        } catch let error as PKCS11Error {
            throw unusable(error)
        }
    }
}
