import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

/// PKCS#11 3.0 message-based AES-GCM with the token's IV generator
/// (`sealAESGCMWithMessageGenerator`): on NSS's softoken it works and its output is ordinary GCM;
/// on SoftHSM2 2.6, which has no 3.0 interface, it fails with a clear error.
@Suite("AES-GCM with the token's IV generator (PKCS#11 3.0 messages)", .serialized)
struct AESGCMMessageTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("gcm-message")
    }

    /// Runs `body` in a logged-in session with a fresh AES-256 session key.
    func withKey<T>(_ body: (borrowing Session, ObjectHandle) throws -> T) throws -> T {
        try withAESSessionKey(fixture, token, body)
    }

    @Test(
        "the token's IV: plain C_Decrypt opens it, C_Encrypt with that IV gives the same bytes, IVs differ",
        .enabled(if: SoftHSMFixture.implementation == .nss, "SoftHSM2 2.6 has no PKCS#11 3.0 interface")
    )
    func sealsOrdinaryGCM() throws {
        #expect(fixture.module.hasVersion3Interface)
        try withKey { session, key in
            let aad = Array("tenant=acme;key=7".utf8)
            var ivs: Set<[UInt8]> = []
            for size in [0, 1, 32, 4096] {
                let plaintext = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
                let box = try session.sealAESGCMWithMessageGenerator(key: key, aad: aad, plaintext: plaintext)
                #expect(box.iv.count == Session.gcmIVByteCount)
                #expect(box.ciphertextAndTag.count == size + Session.gcmTagByteCount)
                ivs.insert(box.iv)
                // Decryption is plain C_Decrypt with the stored IV: formats do not change.
                let opened = try session.openAESGCM(key: key, aad: aad, box: box)
                #expect(opened.copyBytes() == plaintext)
                // And the token really used that IV: C_Encrypt with it gives the same ciphertext and tag.
                #expect(
                    try session.encryptAESGCM(key: key, iv: box.iv, aad: aad, plaintext: plaintext)
                        == box.ciphertextAndTag)
            }
            for _ in 0..<28 {
                ivs.insert(try session.sealAESGCMWithMessageGenerator(key: key, aad: aad, plaintext: [1, 2, 3]).iv)
            }
            #expect(ivs.count == 32)
        }
    }

    @Test(
        "the AAD is authenticated, and the session stays usable after each seal",
        .enabled(if: SoftHSMFixture.implementation == .nss, "SoftHSM2 2.6 has no PKCS#11 3.0 interface")
    )
    func authenticatesAAD() throws {
        try withKey { session, key in
            let box = try session.sealAESGCMWithMessageGenerator(key: key, aad: [1], plaintext: [9, 9, 9])
            let error = #expect(throws: PKCS11Error.self) { try session.openAESGCM(key: key, aad: [2], box: box) }
            #expect(error?.isDecryptAuthenticationFailure == true)
            let unusable = session.isMarkedUnusable
            #expect(!unusable)
            // A message operation was ended each time: a classic C_EncryptInit works right after.
            _ = try session.sealAESGCM(key: key, aad: [], plaintext: UnsafeRawBufferPointer(start: nil, count: 0))
        }
    }

    @Test(
        "a module without a PKCS#11 3.0 interface: functionNotSupported, naming C_MessageEncryptInit",
        .enabled(if: SoftHSMFixture.implementation == .softHSM2, "NSS's softoken has the 3.0 interface")
    )
    func noVersion3Interface() throws {
        #expect(!fixture.module.hasVersion3Interface)
        try withKey { session, key in
            let error = #expect(throws: PKCS11Error.self) {
                try session.sealAESGCMWithMessageGenerator(key: key, aad: [], plaintext: [1])
            }
            #expect(error?.code == .functionNotSupported)
            #expect(error?.function == .messageEncryptInit)
            #expect(error?.detail?.contains("no PKCS#11 3.0 interface") == true)
            let unusable = session.isMarkedUnusable
            #expect(!unusable)
        }
    }

    @Test("over-limit AAD is refused before the module is called")
    func limits() throws {
        try withKey { session, key in
            let aad = [UInt8](repeating: 0, count: Session.maximumGCMAADByteCount + 1)
            let error = #expect(throws: PKCS11Error.self) {
                try session.sealAESGCMWithMessageGenerator(key: key, aad: aad, plaintext: [1])
            }
            #expect(error?.code == .invalidArgument)
        }
    }
}
