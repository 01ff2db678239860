/// What a tenant master key must be, and the check that a key on the token is no weaker.
///
/// Master keys are AES-256 token objects, private, sensitive and never extractable, generated
/// inside the token, with one purpose: encrypt+decrypt (AES-GCM over data keys) or wrap+unwrap
/// (key wrap). No key may hold WRAP together with DECRYPT, nor UNWRAP together with ENCRYPT:
/// with both, a caller can wrap a key and decrypt the blob as data, or encrypt chosen bytes and
/// unwrap them as a key (Clulow, "On the security of PKCS #11", CHES 2003).
public enum MasterKeyPolicy {
    /// The purpose a master key is generated for.
    public enum Usage: String, Sendable, Hashable {
        /// `CKA_ENCRYPT` and `CKA_DECRYPT` (data keys wrapped with AES-GCM through `C_Encrypt`).
        case encryptDecrypt = "encrypt-decrypt"
        /// `CKA_WRAP` and `CKA_UNWRAP` (data keys wrapped with a key-wrap mechanism).
        case wrapUnwrap = "wrap-unwrap"
    }

    /// AES-256.
    public static let keyByteCount = 32

    /// The label prefix that marks a token object as a gateway master key; preflight and the
    /// gateway check every secret key whose label starts with it.
    public static let labelPrefix = "hsmgw:mk:"

    /// One way a key falls short of the policy.
    public enum Violation: String, Sendable, Hashable, CustomStringConvertible {
        case notSecretKey = "not-a-secret-key"
        case notAES = "not-aes"
        case wrongKeyLength = "not-256-bit"
        case notTokenObject = "not-a-token-object"
        case notPrivate = "not-private"
        case notSensitive = "not-sensitive"
        case extractable = "extractable"
        case notAlwaysSensitive = "not-always-sensitive"
        case notNeverExtractable = "not-never-extractable"
        /// CKA_WRAP together with CKA_DECRYPT.
        case wrapWithDecrypt = "wrap-with-decrypt"
        /// CKA_UNWRAP together with CKA_ENCRYPT.
        case unwrapWithEncrypt = "unwrap-with-encrypt"
        /// Neither encrypt+decrypt nor wrap+unwrap.
        case noPurpose = "no-purpose"
        /// Usage beyond the one purpose: CKA_SIGN, CKA_VERIFY or CKA_DERIVE.
        case extraUsage = "extra-usage"
        /// The token would not say (an attribute the policy needs came back unavailable).
        case unreadableAttribute = "unreadable-attribute"

        public var description: String {
            switch self {
            case .notSecretKey: "CKA_CLASS is not CKO_SECRET_KEY"
            case .notAES: "CKA_KEY_TYPE is not CKK_AES"
            case .wrongKeyLength: "CKA_VALUE_LEN is not 32 bytes"
            case .notTokenObject: "CKA_TOKEN is false"
            case .notPrivate: "CKA_PRIVATE is false"
            case .notSensitive: "CKA_SENSITIVE is false"
            case .extractable: "CKA_EXTRACTABLE is true"
            case .notAlwaysSensitive: "CKA_ALWAYS_SENSITIVE is false (the key was once readable)"
            case .notNeverExtractable: "CKA_NEVER_EXTRACTABLE is false (the key was once extractable)"
            case .wrapWithDecrypt: "CKA_WRAP and CKA_DECRYPT are both true"
            case .unwrapWithEncrypt: "CKA_UNWRAP and CKA_ENCRYPT are both true"
            case .noPurpose: "neither encrypt+decrypt nor wrap+unwrap is allowed"
            case .extraUsage: "CKA_SIGN, CKA_VERIFY or CKA_DERIVE is true"
            case .unreadableAttribute: "a required attribute could not be read"
            }
        }
    }

    /// The template for a new master key. `modifiable: false` is asked for; tokens that refuse it
    /// get the key without it (`Session.generateMasterKey` retries).
    public static func template(label: String, id: [UInt8], usage: Usage = .encryptDecrypt, modifiable: Bool = false)
        -> [Attribute]
    {
        var template: [Attribute] = [
            .objectClass(.secretKey), .keyType(.aes), .valueLength(keyByteCount),
            .token(true), .private(true), .sensitive(true), .extractable(false),
            .encrypt(usage == .encryptDecrypt), .decrypt(usage == .encryptDecrypt),
            .wrap(usage == .wrapUnwrap), .unwrap(usage == .wrapUnwrap),
            .sign(false), .verify(false), .derive(false),
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
        .alwaysSensitive, .neverExtractable, .encrypt, .decrypt, .wrap, .unwrap, .sign, .verify, .derive,
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
        if values.unsignedInteger(.keyType) != KeyType.aes.rawValue { found.append(.notAES) }
        if values.unsignedInteger(.valueLength) != UInt(keyByteCount) { found.append(.wrongKeyLength) }
        if flag(.token) != true { found.append(.notTokenObject) }
        if flag(.private) != true { found.append(.notPrivate) }
        if flag(.sensitive) != true { found.append(.notSensitive) }
        if flag(.extractable) != false { found.append(.extractable) }
        if flag(.alwaysSensitive) != true { found.append(.notAlwaysSensitive) }
        if flag(.neverExtractable) != true { found.append(.notNeverExtractable) }
        let encrypt = flag(.encrypt) ?? true
        let decrypt = flag(.decrypt) ?? true
        let wrap = flag(.wrap) ?? true
        let unwrap = flag(.unwrap) ?? true
        if wrap && decrypt { found.append(.wrapWithDecrypt) }
        if unwrap && encrypt { found.append(.unwrapWithEncrypt) }
        if !(encrypt && decrypt) && !(wrap && unwrap) { found.append(.noPurpose) }
        // Absent sign/verify/derive (a token without them) is no extra usage.
        if values.bool(.sign) == true || values.bool(.verify) == true || values.bool(.derive) == true {
            found.append(.extraUsage)
        }
        return found
    }
}

/// A master key found on the token.
public struct MasterKeyObject: Sendable {
    public let handle: ObjectHandle
    public let label: String
    public let id: [UInt8]
}

extension Session {
    /// Generates a master key inside the token with `MasterKeyPolicy.template`, asking for
    /// `CKA_MODIFIABLE` false and retrying without it when the token refuses that attribute.
    public func generateMasterKey(
        label: String,
        id: [UInt8],
        usage: MasterKeyPolicy.Usage = .encryptDecrypt
    ) throws -> ObjectHandle {
        do {
            return try generateKey(.aesKeyGen, template: MasterKeyPolicy.template(label: label, id: id, usage: usage))
        } catch let error as PKCS11Error
            where error.returnValue == .attributeTypeInvalid || error.returnValue == .attributeValueInvalid
            || error.returnValue == .templateInconsistent
        {
            return try generateKey(
                .aesKeyGen,
                template: MasterKeyPolicy.template(label: label, id: id, usage: usage, modifiable: true)
            )
        }
    }

    /// Reads back the policy's attributes of `key` and throws `masterKeyPolicyViolation`, listing
    /// every violation, when the key is weaker than the policy.
    @discardableResult
    public func verifyMasterKey(_ key: ObjectHandle) throws -> AttributeValues {
        let values = try attributes(MasterKeyPolicy.verifiedAttributes, of: key)
        let violations = MasterKeyPolicy.violations(in: values)
        guard violations.isEmpty else {
            throw PKCS11Error(
                code: .masterKeyPolicyViolation,
                detail: violations.map(\.description).joined(separator: "; "),
                violations: violations
            )
        }
        return values
    }

    /// Every secret-key token object whose label starts with `labelPrefix`.
    public func findMasterKeys(labelPrefix: String = MasterKeyPolicy.labelPrefix) throws -> [MasterKeyObject] {
        let candidates = try findObjects([.objectClass(.secretKey), .token(true)])
        return try candidates.compactMap { handle in
            let values = try attributes([.label, .id], of: handle)
            guard let label = values.string(.label), label.hasPrefix(labelPrefix) else { return nil }
            return MasterKeyObject(handle: handle, label: label, id: values.bytes(.id) ?? [])
        }
    }

    /// The master key with exactly this `CKA_ID`, if there is one.
    public func findMasterKey(id: [UInt8]) throws -> ObjectHandle? {
        let matches = try findObjects([.objectClass(.secretKey), .token(true), .id(id)], limit: 2)
        guard matches.count <= 1 else {
            throw PKCS11Error(code: .invalidArgument, detail: "\(matches.count) master keys share one CKA_ID")
        }
        return matches.first
    }
}
