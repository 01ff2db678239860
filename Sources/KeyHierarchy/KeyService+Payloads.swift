import Crypto
import Foundation
import SecretMemory

extension KeyService {
    /// Encrypts up to 64 KiB under a data key with AES-256-GCM (random 96-bit nonce) and returns
    /// a self-describing `PayloadCiphertext`. The data key is unwrapped in the token with the
    /// caller's context (which must be the one it was generated with); its plaintext stays in
    /// zeroed-on-release memory and is never returned. Each use is counted against
    /// `dataKeyEncryptionLimit`.
    public func encrypt(
        _ tenant: TenantID,
        dataKey id: DataKeyID,
        plaintext: [UInt8],
        context: EncryptionContext = .empty,
        request: RequestContext
    ) async throws(KeyServiceError) -> [UInt8] {
        try await audited(.encrypt, tenant: tenant, keyIDs: [id.description], request: request) {
            () async throws -> [UInt8] in
            guard plaintext.count <= PayloadCiphertext.maximumPlaintextByteCount else {
                throw KeyServiceError(
                    .invalidArgument,
                    "plaintext is \(plaintext.count) bytes; at most \(PayloadCiphertext.maximumPlaintextByteCount) are accepted"
                )
            }
            let key = try await self.unwrapOne(tenant, id, context, request: request)
            let contextHash = context.hash
            let count = try await self.committer.commit(lane: tenant.rawValue) { transaction -> UnitOutcome<Int64?> in
                let count = try await transaction.countEncryption(
                    tenant,
                    id,
                    limit: self.configuration.dataKeyEncryptionLimit
                )
                return UnitOutcome(
                    count,
                    audit: count == nil
                        ? []
                        : [
                            AuditEvent(
                                principal: request.principal,
                                tenant: tenant,
                                operation: .encrypt,
                                keyIDs: [id.description],
                                requestID: request.requestID,
                                detail: "context-sha256=\(contextHash.hexString)"
                            )
                        ]
                )
            }.value
            guard count != nil else {
                throw KeyServiceError(
                    .resourceExhausted,
                    "data key \(id) reached its encryption limit or was disabled; generate a new data key"
                )
            }
            let aad = PayloadCiphertext.aad(tenant: tenant, dataKeyID: id, contextHash: contextHash)
            return try Self.seal(plaintext, dataKeyID: id, key: key.plaintext, aad: aad).encoded
        }
    }

    private static func seal(_ plaintext: [UInt8], dataKeyID: DataKeyID, key: SecretBytes, aad: [UInt8]) throws
        -> PayloadCiphertext
    {
        let symmetricKey: SymmetricKey = key.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) -> SymmetricKey in
            SymmetricKey(data: bytes)
        }
        let sealed: AES.GCM.SealedBox = try AES.GCM.seal(
            plaintext,
            using: symmetricKey,
            nonce: AES.GCM.Nonce(),
            authenticating: aad
        )
        return PayloadCiphertext(
            dataKeyID: dataKeyID,
            nonce: Array(sealed.nonce),
            ciphertextAndTag: Array(sealed.ciphertext) + Array(sealed.tag)
        )
    }

    private static func open(_ ciphertext: PayloadCiphertext, key: SecretBytes, aad: [UInt8]) throws(KeyServiceError)
        -> [UInt8]
    {
        let symmetricKey: SymmetricKey = key.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) -> SymmetricKey in
            SymmetricKey(data: bytes)
        }
        do {
            let body: ArraySlice<UInt8> = ciphertext.ciphertextAndTag.dropLast(PayloadCiphertext.tagByteCount)
            let tag: ArraySlice<UInt8> = ciphertext.ciphertextAndTag.suffix(PayloadCiphertext.tagByteCount)
            let box = try AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: ciphertext.nonce), ciphertext: body, tag: tag)
            let opened: Data = try AES.GCM.open(box, using: symmetricKey, authenticating: aad)
            return Array(opened)
        } catch {
            throw KeyServiceError(.decryptionFailed, "decryption failed", underlying: "payload: \(error)")
        }
    }

    /// Decrypts a `PayloadCiphertext` made by `encrypt` for this tenant, with the exact context.
    ///
    /// Whatever is wrong with the ciphertext (its magic, format version, data key id, nonce, body
    /// or tag), with the context, or with the tenant it is presented to (another tenant's
    /// ciphertext names a key this tenant does not have), the caller gets one and the same
    /// `decryptionFailed` error, so the answer is no oracle for which byte was changed or whether
    /// a key id exists. The cause stays in `underlying`, for the server log. Only a ciphertext over
    /// the size limit (which no byte change produces) and the states of an intact tenant and key
    /// (disabled, destroyed) are answered otherwise.
    public func decrypt(
        _ tenant: TenantID,
        ciphertext: [UInt8],
        context: EncryptionContext = .empty,
        request: RequestContext
    ) async throws(KeyServiceError) -> [UInt8] {
        let keyIDs = (try? PayloadCiphertext(encoded: ciphertext)).map { [$0.dataKeyID.description] } ?? []
        return try await audited(.decrypt, tenant: tenant, keyIDs: keyIDs, request: request) {
            () async throws -> [UInt8] in
            let parsed: PayloadCiphertext
            do {
                parsed = try PayloadCiphertext(encoded: ciphertext)
            } catch let error where ciphertext.count <= PayloadCiphertext.maximumCiphertextByteCount {
                throw Self.uniformDecryptionFailure(error)
            }
            let key: DecryptedDataKey
            switch try await self.unwrapForCaller(
                tenant, [DataKeyRequest(id: parsed.dataKeyID, context: context)], request: request)[0]
            {
            case .success(let unwrapped):
                key = unwrapped
            case .failure(let error) where error.code == .notFound || error.code == .decryptionFailed:
                // No such key for this tenant (a changed id, another tenant's ciphertext), or its
                // wrapping does not authenticate with this context.
                throw Self.uniformDecryptionFailure(error)
            case .failure(let error):
                throw error
            }
            let contextHash = context.hash
            let aad = PayloadCiphertext.aad(tenant: tenant, dataKeyID: parsed.dataKeyID, contextHash: contextHash)
            let plaintext = try Self.open(parsed, key: key.plaintext, aad: aad)
            _ = try await self.committer.append(
                lane: tenant.rawValue,
                [
                    AuditEvent(
                        principal: request.principal,
                        tenant: tenant,
                        operation: .decrypt,
                        keyIDs: [parsed.dataKeyID.description],
                        requestID: request.requestID,
                        detail: "context-sha256=\(contextHash.hexString)"
                    )
                ]
            )
            return plaintext
        }
    }

    /// The one answer Decrypt gives for every tampered, foreign or unauthentic ciphertext; `cause`
    /// goes to the server log only.
    static func uniformDecryptionFailure(_ cause: any Error) -> KeyServiceError {
        let detail: String
        if let cause = cause as? KeyServiceError {
            detail = cause.underlying.map { "\(cause.message): \($0)" } ?? cause.message
        } else {
            detail = String(describing: cause)
        }
        return KeyServiceError(.decryptionFailed, "decryption failed", underlying: detail)
    }

    /// Unwraps one data key for the gateway's own use (Encrypt/Decrypt).
    private func unwrapOne(
        _ tenant: TenantID,
        _ id: DataKeyID,
        _ context: EncryptionContext,
        request: RequestContext
    ) async throws -> DecryptedDataKey {
        let results = try await unwrapForCaller(tenant, [DataKeyRequest(id: id, context: context)], request: request)
        return try results[0].get()
    }
}
