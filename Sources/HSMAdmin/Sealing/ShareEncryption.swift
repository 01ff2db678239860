import Crypto
import Foundation
import Sealing
import SecretMemory

/// Shares encrypted to operators' public keys, so a share file can travel (mail, a shared
/// directory) and only its operator can read it: HPKE (RFC 9180) base mode with P-256, HKDF-SHA256
/// and AES-256-GCM, the key pair an `openssl ecparam -name prime256v1 -genkey` makes.
///
/// File layout (text): `hsmgw-share-hpke-v1`, then the base64 of the encapsulated key, then the
/// base64 of the ciphertext of the share's text form, one per line.
enum ShareEncryption {
    /// The first line of an encrypted share file.
    static let magic = "hsmgw-share-hpke-v1"
    static let ciphersuite = HPKE.Ciphersuite.P256_SHA256_AES_GCM_256
    /// Binds the ciphertext to its use: a file encrypted for something else does not open here.
    static let info = Data("hsmgw share v1".utf8)
    /// The largest key file read: a PEM key is a few hundred bytes.
    static let maximumKeyFileSize = 8192
    /// The largest encrypted share file read: the magic, 88 base64 characters of encapsulated key
    /// and at most 1,384 of ciphertext (a 1,024-character share and its tag), with line breaks.
    static let maximumFileSize = 4096

    /// An operator's public key (PEM, `-----BEGIN PUBLIC KEY-----`, P-256).
    static func recipient(_ path: String) throws(AdminError) -> P256.KeyAgreement.PublicKey {
        let text = try ShareFiles.readText(path, limit: maximumKeyFileSize, what: "public key", ownerOnly: false)
        do {
            return try P256.KeyAgreement.PublicKey(pemRepresentation: text)
        } catch {
            throw AdminError(.configuration, "public key \(path) is not a P-256 public key in PEM")
        }
    }

    /// An operator's private key (PEM, SEC1 or PKCS#8, P-256), from a file of mode 0600.
    static func identity(_ path: String) throws(AdminError) -> P256.KeyAgreement.PrivateKey {
        let text = try ShareFiles.readText(path, limit: maximumKeyFileSize, what: "private key", ownerOnly: true)
        do {
            return try P256.KeyAgreement.PrivateKey(pemRepresentation: text)
        } catch {
            throw AdminError(.configuration, "private key \(path) is not a P-256 private key in PEM")
        }
    }

    /// The encrypted file's contents for `share`.
    static func seal(_ share: SecretShare, to recipient: P256.KeyAgreement.PublicKey) throws(AdminError) -> [UInt8] {
        do {
            var sender = try HPKE.Sender(recipientKey: recipient, ciphersuite: ciphersuite, info: info)
            let ciphertext = try share.text.withUnsafeBytes { try sender.seal($0) }
            let text =
                [magic, sender.encapsulatedKey.base64EncodedString(), ciphertext.base64EncodedString()]
                .joined(separator: "\n") + "\n"
            return Array(text.utf8)
        } catch {
            throw AdminError(.internalError, "cannot encrypt a share: \(error)")
        }
    }

    /// Whether `contents` is an encrypted share file.
    static func isEncrypted(_ contents: UnsafeRawBufferPointer) -> Bool {
        contents.starts(with: magic.utf8)
    }

    /// Opens an encrypted share file with the first of `identities` that can.
    static func open(_ contents: UnsafeRawBufferPointer, identities: [P256.KeyAgreement.PrivateKey], path: String)
        throws(AdminError) -> SecretShare
    {
        let lines = String(decoding: contents, as: UTF8.self).split(whereSeparator: \.isNewline)
        guard lines.count == 3, lines[0] == magic, let encapsulatedKey = Data(base64Encoded: String(lines[1])),
            let ciphertext = Data(base64Encoded: String(lines[2]))
        else {
            throw AdminError(.usage, "share file \(path) is not an encrypted share")
        }
        guard !identities.isEmpty else {
            throw AdminError(.usage, "share file \(path) is encrypted: give --identity with your private key")
        }
        for identity in identities {
            guard
                var recipient = try? HPKE.Recipient(
                    privateKey: identity, ciphersuite: ciphersuite, info: info, encapsulatedKey: encapsulatedKey),
                var plaintext = try? recipient.open(ciphertext)
            else { continue }
            defer { plaintext.resetBytes(in: 0..<plaintext.count) }
            let text = SecretBytes(copying: plaintext)
            do {
                return try text.withUnsafeBytes { (bytes) throws(SecretSharingError) in try SecretShare(text: bytes) }
            } catch {
                throw AdminError(.usage, "share file \(path): \(error.message)")
            }
        }
        throw AdminError(.usage, "share file \(path) does not open with the private key given (encrypted to another)")
    }
}
