import PKCS11
import SoftHSMTestSupport
import Testing

/// AES key wrap with padding (RFC 5649) through the token.
@Suite("AES key wrap with padding", .serialized)
struct KeyWrapTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("wrap")
    }

    /// The mechanism `Session.keyWrapWithPadding` picks on this token.
    func mechanism() throws -> Mechanism {
        try #require(Session.keyWrapWithPadding(among: try fixture.module.mechanisms(token.slot)))
    }

    @Test(
        "the padded key wrap chosen: SoftHSM2's CKM_AES_KEY_WRAP_PAD is RFC 5649 for whole blocks only; NSS's KWP is RFC 5649"
    )
    func conformance() throws {
        let mechanism = try mechanism()
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            switch SoftHSMFixture.implementation {
            case .softHSM2:
                #expect(mechanism == .aesKeyWrapPad, "SoftHSM2 lists CKM_AES_KEY_WRAP_PAD, not KWP")
                // Measured on SoftHSM2 2.6.1: it zero-pads the key first, so the length indicator
                // says 24 for a 20-byte key. Data keys are 32 bytes, where it agrees with the RFC.
                #expect(try session.checkKeyWrapWithPadding(mechanism) == .rfc5649ForWholeBlocks)
            case .nss:
                // NSS 3.87 lists PKCS#11 3.0's CKM_AES_KEY_WRAP_KWP, preferred to its
                // CKM_AES_KEY_WRAP_PAD, which is RFC 3394 over PKCS#7 padding (48 bytes for 32).
                #expect(mechanism == .aesKeyWrapKWP)
                #expect(try session.checkKeyWrapWithPadding(mechanism) == .rfc5649)
                #expect(try session.checkKeyWrapWithPadding(.aesKeyWrapPad) == .nonconforming)
            }
        }
    }

    @Test("the RFC 5649 vectors: whole-block ones wrap to the published bytes; others show the deviation")
    func knownAnswers() throws {
        let vectors = try KnownAnswers.load().rfc5649
        let mechanism = try mechanism()
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            for vector in vectors {
                let kek = try session.createObject([
                    .objectClass(.secretKey), .keyType(.aes), .token(false), .wrap(true), .unwrap(true),
                    .value(SecretBytes(copying: vector.kek)),
                ])
                defer { try? session.destroyObject(kek) }
                let key = try session.createObject([
                    .objectClass(.secretKey), .keyType(.genericSecret), .token(false), .extractable(true),
                    .sensitive(false), .value(SecretBytes(copying: vector.key)),
                ])
                defer { try? session.destroyObject(key) }
                let wrapped = try session.wrapKey(key, with: kek, mechanism: mechanism)
                #expect(wrapped.count == vector.wrapped.count)
                if vector.key.count % 8 == 0 || mechanism == .aesKeyWrapKWP {
                    #expect(wrapped == vector.wrapped)
                } else {
                    #expect(
                        wrapped != vector.wrapped,
                        "SoftHSM2 became RFC 5649 conformant: update checkKeyWrapWithPadding's docs")
                }
            }
        }
    }

    @Test("wrap-pad round trip of a generated 256-bit key; a changed blob does not unwrap")
    func roundTrip() throws {
        let mechanism = try mechanism()
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            let kek = try session.generateKey(
                .aesKeyGen,
                template: [
                    .objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(false), .sensitive(true),
                    .extractable(false), .wrap(true), .unwrap(true), .encrypt(false), .decrypt(false),
                ]
            )
            defer { try? session.destroyObject(kek) }
            let dataKey = try session.generateKey(
                .aesKeyGen,
                template: [
                    .objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(false), .sensitive(false),
                    .extractable(true), .encrypt(true), .decrypt(true),
                ]
            )
            defer { try? session.destroyObject(dataKey) }
            let wrapped = try session.wrapKey(dataKey, with: kek, mechanism: mechanism)
            #expect(wrapped.count == 40)
            let template: [Attribute] = [
                .objectClass(.secretKey), .keyType(.aes), .token(false), .sensitive(false), .extractable(true),
                .encrypt(true), .decrypt(true),
            ]
            let unwrapped = try session.unwrapKey(wrapped, with: kek, mechanism: mechanism, template: template)
            defer { try? session.destroyObject(unwrapped) }
            let original = try session.secretValue(of: dataKey)
            #expect(try session.secretValue(of: unwrapped).constantTimeEquals(original.copyBytes()))

            var tampered = wrapped
            tampered[5] ^= 1
            let error = #expect(throws: PKCS11Error.self) {
                try session.unwrapKey(tampered, with: kek, mechanism: mechanism, template: template)
            }
            #expect(error?.function == .unwrapKey)
        }
    }
}
