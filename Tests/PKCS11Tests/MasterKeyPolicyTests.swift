import PKCS11
import SoftHSMTestSupport
import Testing

/// Security invariant 1: master keys are made and checked to be non-extractable, sensitive,
/// single-purpose token objects.
@Suite("Master-key policy", .serialized)
struct MasterKeyPolicyTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("mk")
    }

    func withUserSession<T>(_ body: (borrowing Session) throws -> T) throws -> T {
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            return try body(session)
        }
    }

    @Test("a generated master key reads back exactly as the template asked")
    func attributesMatchTemplate() throws {
        try withUserSession { session in
            let label = MasterKeyPolicy.labelPrefix + "tenant-a:v1"
            let key = try session.generateMasterKey(label: label, id: [0xA, 1])
            defer { try? session.destroyObject(key) }
            let values = try session.verifyMasterKey(key)
            #expect(MasterKeyPolicy.violations(in: values).isEmpty)
            #expect(values.unsignedInteger(.objectClass) == ObjectClass.secretKey.rawValue)
            #expect(values.unsignedInteger(.keyType) == KeyType.aes.rawValue)
            #expect(values.unsignedInteger(.valueLength) == 32)
            for (type, expected) in Self.policyFlags {
                #expect(values.bool(type) == expected, "\(type)")
            }
            let more = try session.attributes([.label, .id, .modifiable, .local], of: key)
            #expect(more.string(.label) == label)
            #expect(more.bytes(.id) == [0xA, 1])
            #expect(more.bool(.modifiable) == false)
            // NSS 3.87 leaves CKA_LOCAL false on keys it generated itself; nothing relies on it
            // (CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE, which the policy checks, are right).
            #expect(more.bool(.local) == (SoftHSMFixture.implementation == .softHSM2))
        }
    }

    @Test("reading CKA_VALUE of a master key fails with CKR_ATTRIBUTE_SENSITIVE")
    func valueIsSensitive() throws {
        try withUserSession { session in
            let key = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "sensitive", id: [0xB])
            defer { try? session.destroyObject(key) }
            let error = #expect(throws: PKCS11Error.self) { try session.secretValue(of: key) }
            #expect(error?.function == .getAttributeValue)
            #expect(error?.returnValue == .attributeSensitive)
            // attributes() refuses CKA_VALUE outright; it is never read into ordinary memory.
            let refused = #expect(throws: PKCS11Error.self) { try session.attributes([.value], of: key) }
            #expect(refused?.code == .invalidArgument)
        }
    }

    @Test("C_WrapKey of a master key fails with CKR_KEY_UNEXTRACTABLE")
    func cannotBeWrapped() throws {
        try withUserSession { session in
            let key = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "unwrappable", id: [0xC])
            defer { try? session.destroyObject(key) }
            let kek = try session.generateKey(
                .aesKeyGen,
                template: [
                    .objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(false), .wrap(true),
                    .unwrap(true), .encrypt(false), .decrypt(false),
                ]
            )
            defer { try? session.destroyObject(kek) }
            for mechanism in [Mechanism.aesKeyWrapPad, .aesKeyWrap] {
                let error = #expect(throws: PKCS11Error.self) {
                    try session.wrapKey(key, with: kek, mechanism: mechanism)
                }
                #expect(error?.function == .wrapKey)
                #expect(error?.returnValue == .keyUnextractable)
                // NSS 3.87 would wrap it: the wrapper refuses before C_WrapKey.
                if SoftHSMFixture.implementation == .nss {
                    #expect(error?.detail?.contains("refused by the wrapper") == true)
                }
            }
        }
    }

    @Test("a session copy cannot be made extractable")
    func copyCannotWeaken() throws {
        try withUserSession { session in
            let key = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "nocopyweaken", id: [0xD])
            defer { try? session.destroyObject(key) }
            let error = #expect(throws: PKCS11Error.self) {
                try session.copyObject(key, template: [.token(false), .extractable(true)])
            }
            #expect(error?.function == .copyObject)
            #expect(error?.returnValue == .attributeReadOnly)
            // SoftHSM2 refuses it itself; NSS 3.87 would make the copy, so the wrapper refuses first.
            if SoftHSMFixture.implementation == .nss {
                #expect(error?.detail?.contains("refused by the wrapper") == true)
            }
            let nonSensitive = #expect(throws: PKCS11Error.self) {
                try session.copyObject(key, template: [.token(false), .sensitive(false)])
            }
            #expect(nonSensitive?.returnValue == .attributeReadOnly)
        }
    }

    @Test("the verifier rejects an extractable key with a named violation")
    func rejectsExtractable() throws {
        try withUserSession { session in
            let key = try Self.makeKey(session, replacing: [.extractable], with: [.extractable(true)], id: 0xE)
            defer { try? session.destroyObject(key) }
            let error = #expect(throws: PKCS11Error.self) { try session.verifyMasterKey(key) }
            #expect(error?.code == .masterKeyPolicyViolation)
            #expect(error?.violations.contains(.extractable) == true)
            #expect(error?.violations.contains(.notNeverExtractable) == true)
            #expect(error?.description.contains("CKA_EXTRACTABLE is true") == true)
        }
    }

    @Test("the verifier rejects a key with WRAP and DECRYPT, and one with UNWRAP and ENCRYPT")
    func rejectsClulowCombinations() throws {
        try withUserSession { session in
            let usage: Set<AttributeType> = [.wrap, .unwrap, .encrypt, .decrypt]
            let wrapDecrypt = try Self.makeKey(
                session,
                replacing: usage,
                with: [.wrap(true), .decrypt(true), .encrypt(true), .unwrap(false)],
                id: 0x10
            )
            defer { try? session.destroyObject(wrapDecrypt) }
            let first = #expect(throws: PKCS11Error.self) { try session.verifyMasterKey(wrapDecrypt) }
            #expect(first?.violations == [.wrapWithDecrypt])

            let unwrapEncrypt = try Self.makeKey(
                session,
                replacing: usage,
                with: [.unwrap(true), .encrypt(true), .decrypt(true), .wrap(false)],
                id: 0x11
            )
            defer { try? session.destroyObject(unwrapEncrypt) }
            let second = #expect(throws: PKCS11Error.self) { try session.verifyMasterKey(unwrapEncrypt) }
            #expect(second?.violations == [.unwrapWithEncrypt])
        }
    }

    @Test("the verifier rejects a session object, a non-private key and a 128-bit key")
    func rejectsOtherWeakKeys() throws {
        try withUserSession { session in
            var cases: [(Attribute, MasterKeyPolicy.Violation)] = []
            cases.append((.token(false), .notTokenObject))
            cases.append((.private(false), .notPrivate))
            cases.append((.valueLength(16), .wrongKeyLength))
            cases.append((.sign(true), .extraUsage))
            for (index, (extra, violation)) in cases.enumerated() {
                let key: ObjectHandle
                do {
                    key = try Self.makeKey(session, replacing: [extra.type], with: [extra], id: UInt8(0x20 + index))
                } catch let error as PKCS11Error where error.function == .generateKey {
                    continue  // the token refuses to make such a key at all: even better
                }
                defer { try? session.destroyObject(key) }
                let error = #expect(throws: PKCS11Error.self) { try session.verifyMasterKey(key) }
                #expect(error?.violations.contains(violation) == true, "\(violation)")
            }
        }
    }

    @Test("violations(in:) on attribute sets the token would not produce")
    func violationsLogic() {
        // A key that once was readable: ALWAYS_SENSITIVE false even though SENSITIVE is true now.
        var values = Self.compliantValues()
        values[.alwaysSensitive] = .bytes([0])
        #expect(MasterKeyPolicy.violations(in: AttributeValues(values: values)) == [.notAlwaysSensitive])
        // An attribute the token would not reveal counts against the key.
        values = Self.compliantValues()
        values[.extractable] = .sensitive
        #expect(MasterKeyPolicy.violations(in: AttributeValues(values: values)).contains(.unreadableAttribute))
        // No purpose at all.
        values = Self.compliantValues()
        values[.encrypt] = .bytes([0])
        #expect(MasterKeyPolicy.violations(in: AttributeValues(values: values)) == [.noPurpose])
        // A wrap/unwrap-only key is a valid master key.
        values = Self.compliantValues()
        values[.encrypt] = .bytes([0])
        values[.decrypt] = .bytes([0])
        values[.wrap] = .bytes([1])
        values[.unwrap] = .bytes([1])
        #expect(MasterKeyPolicy.violations(in: AttributeValues(values: values)).isEmpty)
    }

    @Test("master keys are found again by label prefix and by CKA_ID, never by stored handle")
    func findAgain() throws {
        try withUserSession { session in
            let a = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "find:a", id: [0x30])
            defer { try? session.destroyObject(a) }
            let b = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "find:b", id: [0x31])
            defer { try? session.destroyObject(b) }
            let other = try session.generateKey(
                .aesKeyGen,
                template: [.objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(true), .label("other")]
            )
            defer { try? session.destroyObject(other) }
            let found = try session.findMasterKeys(labelPrefix: MasterKeyPolicy.labelPrefix + "find:")
            #expect(
                Set(found.map(\.label)) == [
                    MasterKeyPolicy.labelPrefix + "find:a", MasterKeyPolicy.labelPrefix + "find:b",
                ])
            #expect(try session.findMasterKey(id: [0x31]) == b)
            #expect(try session.findMasterKey(id: [0x99]) == nil)
            #expect(try session.findObjects([.label("other")]) == [other])
            #expect(try session.findObjects([.objectClass(.secretKey), .id([0x30])]) == [a])
            // Destroyed keys are gone from every search.
            try session.destroyObject(other)
            #expect(try session.findObjects([.label("other")]).isEmpty)
        }
    }

    /// A key from the master-key template with the `replacing` attributes swapped for `extra`.
    static func makeKey(
        _ session: borrowing Session,
        replacing: Set<AttributeType>,
        with extra: [Attribute],
        id: UInt8
    ) throws -> ObjectHandle {
        var template = MasterKeyPolicy.template(label: MasterKeyPolicy.labelPrefix + "weak-\(id)", id: [id])
        template.removeAll { replacing.contains($0.type) }
        return try session.generateKey(.aesKeyGen, template: template + extra)
    }

    static func compliantValues() -> [AttributeType: AttributeValue] {
        func ulong(_ value: UInt) -> AttributeValue {
            .bytes(withUnsafeBytes(of: value) { Array($0) })
        }
        var values: [AttributeType: AttributeValue] = [
            .objectClass: ulong(ObjectClass.secretKey.rawValue),
            .keyType: ulong(KeyType.aes.rawValue),
            .valueLength: ulong(32),
        ]
        for (type, flag) in policyFlags {
            values[type] = .bytes([flag ? 1 : 0])
        }
        return values
    }

    /// The boolean attributes of a compliant encrypt/decrypt master key.
    static let policyFlags: [(AttributeType, Bool)] = {
        var flags: [(AttributeType, Bool)] = []
        let on: [AttributeType] = [
            .token, .private, .sensitive, .alwaysSensitive, .neverExtractable, .encrypt, .decrypt,
        ]
        let off: [AttributeType] = [.extractable, .wrap, .unwrap, .sign, .verify, .derive]
        for type in on { flags.append((type, true)) }
        for type in off { flags.append((type, false)) }
        return flags
    }()
}
