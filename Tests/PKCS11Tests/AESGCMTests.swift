import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

/// AES-GCM through the token: known answers, round trips, and authentication of every input.
@Suite("AES-GCM", .serialized)
struct AESGCMTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("gcm")
    }

    /// Runs `body` in a logged-in session with a fresh AES-256 session key (sensitive, not
    /// extractable, encrypt and decrypt only).
    func withKey<T>(_ body: (borrowing Session, ObjectHandle) throws -> T) throws -> T {
        try withAESSessionKey(fixture, token, body)
    }

    @Test("known answer: GCM spec test case 16 (AES-256, 96-bit IV, 20-byte AAD)")
    func knownAnswer() throws {
        let vector = try KnownAnswers.load().gcm
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            let key = try session.createObject([
                .objectClass(.secretKey), .keyType(.aes), .token(false), .encrypt(true), .decrypt(true),
                .value(SecretBytes(copying: vector.key)),
            ])
            defer { try? session.destroyObject(key) }
            let sealed = try session.encryptAESGCM(
                key: key, iv: vector.iv, aad: vector.aad, plaintext: vector.plaintext)
            #expect(sealed == vector.ciphertext + vector.tag)
            let opened = try session.decryptAESGCM(key: key, iv: vector.iv, aad: vector.aad, ciphertextAndTag: sealed)
            #expect(opened.copyBytes() == vector.plaintext)
        }
    }

    @Test("round trip with AAD, for sizes 0, 1, 32 and 64 KiB; a fresh IV per seal")
    func roundTrip() throws {
        try withKey { session, key in
            let aad = Array("tenant=acme;key=42".utf8)
            var ivs: Set<[UInt8]> = []
            for size in [0, 1, 32, 65_536] {
                let plaintext = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
                let box = try plaintext.withUnsafeBytes { try session.sealAESGCM(key: key, aad: aad, plaintext: $0) }
                #expect(box.iv.count == Session.gcmIVByteCount)
                #expect(box.ciphertextAndTag.count == size + Session.gcmTagByteCount)
                #expect(ivs.insert(box.iv).inserted)
                if size > 0 {
                    #expect(Array(box.ciphertextAndTag.prefix(size)) != plaintext)
                }
                let opened = try session.openAESGCM(key: key, aad: aad, box: box)
                #expect(opened.copyBytes() == plaintext)
            }
        }
    }

    @Test("flipping any byte of ciphertext, tag, IV or AAD fails authentication")
    func everyByteIsAuthenticated() throws {
        try withKey { session, key in
            let aad = Array("context:tenant-a/dek-7/v1".utf8)
            let plaintext = [UInt8](repeating: 0xA5, count: 32)
            let box = try plaintext.withUnsafeBytes { try session.sealAESGCM(key: key, aad: aad, plaintext: $0) }

            var cases: [(iv: [UInt8], aad: [UInt8], sealed: [UInt8], what: String)] = []
            for index in box.ciphertextAndTag.indices {
                var sealed = box.ciphertextAndTag
                sealed[index] ^= 0x01
                let part = index < plaintext.count ? "ciphertext" : "tag"
                cases.append((box.iv, aad, sealed, "\(part) byte \(index)"))
            }
            for index in box.iv.indices {
                var iv = box.iv
                iv[index] ^= 0x80
                cases.append((iv, aad, box.ciphertextAndTag, "IV byte \(index)"))
            }
            for index in aad.indices {
                var changed = aad
                changed[index] ^= 0x20
                cases.append((box.iv, changed, box.ciphertextAndTag, "AAD byte \(index)"))
            }
            cases.append((box.iv, [], box.ciphertextAndTag, "AAD removed"))
            cases.append((box.iv, aad + [0], box.ciphertextAndTag, "AAD extended"))
            cases.append((box.iv, aad, Array(box.ciphertextAndTag.dropLast()), "tag truncated"))
            #expect(cases.count == 48 + 12 + aad.count + 3)
            for change in cases {
                do {
                    let opened = try session.decryptAESGCM(
                        key: key,
                        iv: change.iv,
                        aad: change.aad,
                        ciphertextAndTag: change.sealed
                    )
                    Issue.record("\(change.what): decrypted \(opened.count) bytes")
                } catch let error as PKCS11Error {
                    // SoftHSM2 reports a failed tag check as CKR_GENERAL_ERROR from C_Decrypt.
                    #expect(error.function == .decrypt, "\(change.what)")
                } catch {
                    Issue.record("\(change.what): \(error)")
                }
            }
            // The session is still usable after the failures, and the original still opens.
            #expect(try session.openAESGCM(key: key, aad: aad, box: box).copyBytes() == plaintext)
        }
    }

    @Test("arguments over the named limits are refused before the token sees them")
    func limits() throws {
        try withKey { session, key in
            let short = #expect(throws: PKCS11Error.self) {
                try session.encryptAESGCM(key: key, iv: [0, 1, 2], aad: [], plaintext: [1])
            }
            #expect(short?.code == .invalidArgument)
            let bigAAD = [UInt8](repeating: 0, count: Session.maximumGCMAADByteCount + 1)
            let aad = #expect(throws: PKCS11Error.self) {
                try session.encryptAESGCM(key: key, iv: [UInt8](repeating: 0, count: 12), aad: bigAAD, plaintext: [1])
            }
            #expect(aad?.code == .invalidArgument)
            let bigPlaintext = [UInt8](repeating: 0, count: Session.maximumGCMPlaintextByteCount + 1)
            let plaintext = #expect(throws: PKCS11Error.self) {
                try session.encryptAESGCM(
                    key: key, iv: [UInt8](repeating: 0, count: 12), aad: [], plaintext: bigPlaintext)
            }
            #expect(plaintext?.code == .invalidArgument)
            let tooShort = #expect(throws: PKCS11Error.self) {
                try session.decryptAESGCM(
                    key: key, iv: [UInt8](repeating: 0, count: 12), aad: [], ciphertextAndTag: [1])
            }
            #expect(tooShort?.code == .invalidArgument)
        }
    }

    @Test("a session copy of a modifiable token key stays sensitive; a policy master key cannot be copied")
    func sessionCopyOfTokenKey() throws {
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            let master = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "copy", id: [9, 9])
            defer { try? session.destroyObject(master) }
            switch SoftHSMFixture.implementation {
            case .softHSM2:
                // With CKA_MODIFIABLE false (the master-key policy) SoftHSM2 refuses C_CopyObject
                // with a changed template: the faster session-copy path is closed to master keys.
                let refused = #expect(throws: PKCS11Error.self) {
                    try session.copyObject(master, template: [.token(false)])
                }
                #expect(refused?.returnValue == .attributeReadOnly)
            case .nss:
                // NSS 3.87 applies CKA_MODIFIABLE to C_SetAttributeValue only: the session copy is
                // made, and stays sensitive and non-extractable.
                let copy = try session.copyObject(master, template: [.token(false)])
                defer { try? session.destroyObject(copy) }
                let values = try session.attributes([.sensitive, .extractable], of: copy)
                #expect(values.bool(.sensitive) == true)
                #expect(values.bool(.extractable) == false)
            }

            let template = MasterKeyPolicy.template(
                label: MasterKeyPolicy.labelPrefix + "copyable",
                id: [9, 8],
                modifiable: true
            )
            let tokenKey = try session.generateKey(.aesKeyGen, template: template)
            defer { try? session.destroyObject(tokenKey) }
            let copy = try session.copyObject(tokenKey, template: [.token(false)])
            defer { try? session.destroyObject(copy) }
            let values = try session.attributes([.token, .sensitive, .extractable, .neverExtractable], of: copy)
            #expect(values.bool(.token) == false)
            #expect(values.bool(.sensitive) == true)
            #expect(values.bool(.extractable) == false)
            // PKCS#11 keeps CKA_NEVER_EXTRACTABLE through a copy that leaves CKA_EXTRACTABLE alone;
            // NSS 3.87 resets it to false on every copy (so never verify a copy as a master key).
            #expect(values.bool(.neverExtractable) == (SoftHSMFixture.implementation == .softHSM2))
            let plaintext = [UInt8](repeating: 7, count: 32)
            let box = try plaintext.withUnsafeBytes { try session.sealAESGCM(key: copy, aad: [1], plaintext: $0) }
            #expect(try session.openAESGCM(key: tokenKey, aad: [1], box: box).copyBytes() == plaintext)
        }
    }

    @Test("random bytes: requested lengths, distinct draws, limit enforced")
    func random() throws {
        try withKey { session, _ in
            let first = try session.generateRandom(count: 32)
            let second = try session.generateRandom(count: 32)
            #expect(first.count == 32)
            #expect(first != second)
            #expect(try session.generateRandom(count: 0).isEmpty)
            let secret = try session.generateRandomSecret(count: 32)
            #expect(secret.count == 32)
            #expect(
                secret.description.contains(secret.copyBytes().map { String(format: "%02x", $0) }.joined()) == false)
            let error = #expect(throws: PKCS11Error.self) {
                try session.generateRandom(count: Session.maximumRandomByteCount + 1)
            }
            #expect(error?.code == .invalidArgument)
        }
    }
}

/// Runs `body` in a logged-in session of `token` with a fresh AES-256 session key (sensitive, not
/// extractable, encrypt and decrypt only), destroyed afterwards.
func withAESSessionKey<T>(
    _ fixture: SoftHSMFixture,
    _ token: TestToken,
    _ body: (borrowing Session, ObjectHandle) throws -> T
) throws -> T {
    try fixture.module.withSession(slot: token.slot) { session in
        try session.login(.user, pin: token.pin)
        let key = try session.generateKey(
            .aesKeyGen,
            template: [
                .objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(false), .sensitive(true),
                .extractable(false), .encrypt(true), .decrypt(true),
            ]
        )
        defer { try? session.destroyObject(key) }
        return try body(session, key)
    }
}
