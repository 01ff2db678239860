internal import CPKCS11Shim

/// AES-GCM through PKCS#11 3.0's message-based encryption, with the IV made by the token.
///
/// `C_MessageEncryptInit` with `CKM_AES_GCM`, one `C_EncryptMessage` whose `CK_GCM_MESSAGE_PARAMS`
/// ask for `CKG_GENERATE_RANDOM` (a 96-bit IV from the token's RNG, written back into the
/// parameters) and a 128-bit tag, then `C_MessageEncryptFinal`. This is how a module that must
/// choose its IVs itself (FIPS mode) takes a GCM request under PKCS#11 3.0; the result is an
/// ordinary GCM ciphertext that plain `C_Decrypt` with the returned IV opens (`openAESGCM`).
///
/// NSS's softoken 3.87 implements it (and refuses `CKG_GENERATE_COUNTER` with no fixed bits);
/// SoftHSM2 2.6 has no 3.0 interface, so the call fails with `functionNotSupported`.
extension Session {
    /// Encrypts `plaintext` under `key` with `aad`; the token generates the IV.
    ///
    /// - Throws: `functionNotSupported` when the module offers no PKCS#11 3.0 function table
    ///   (the detail says so); `invalidArgument` for an AAD or plaintext over the limits of
    ///   `encryptAESGCM`; `functionFailed` from the three calls (e.g. `CKR_MECHANISM_INVALID` when
    ///   the token has no message-based GCM); `moduleMisbehaved` when the module returns a
    ///   ciphertext of the wrong length or leaves the IV untouched.
    public func sealAESGCMWithMessageGenerator(
        key: ObjectHandle,
        aad: [UInt8],
        plaintext: UnsafeRawBufferPointer
    ) throws -> AESGCMSealedBox {
        // The IV passed to the checks is a stand-in of the right length: the token writes the real one.
        try checkGCMArguments(
            function: .messageEncryptInit, iv: [UInt8](repeating: 0, count: Session.gcmIVByteCount), aad: aad,
            inputCount: plaintext.count)
        var mechanism = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM), pParameter: nil, ulParameterLen: 0)
        try call(.messageEncryptInit, \.C_MessageEncryptInit) { $0(handle, &mechanism, key.rawValue) }
        // A message-based operation stays active until C_MessageEncryptFinal, whatever
        // C_EncryptMessage answered: end it on every path, or the session is unusable.
        let sealed: AESGCMSealedBox
        do {
            sealed = try encryptOneMessage(aad: aad, plaintext: plaintext)
        } catch let error as PKCS11Error {
            if (try? call(.messageEncryptFinal, \.C_MessageEncryptFinal) { $0(handle) }) == nil {
                throw unusable(error)
            }
            throw error
        }
        do {
            try call(.messageEncryptFinal, \.C_MessageEncryptFinal) { $0(handle) }
        } catch let error as PKCS11Error {
            throw unusable(error)
        }
        return sealed
    }

    /// Encrypts bytes held in an array, the token generating the IV.
    public func sealAESGCMWithMessageGenerator(key: ObjectHandle, aad: [UInt8], plaintext: [UInt8]) throws
        -> AESGCMSealedBox
    {
        try plaintext.withUnsafeBytes { try sealAESGCMWithMessageGenerator(key: key, aad: aad, plaintext: $0) }
    }

    /// Encrypts secret bytes (key material), the token generating the IV.
    public func sealAESGCMWithMessageGenerator(key: ObjectHandle, aad: [UInt8], plaintext: SecretBytes) throws
        -> AESGCMSealedBox
    {
        try plaintext.withUnsafeBytes { try sealAESGCMWithMessageGenerator(key: key, aad: aad, plaintext: $0) }
    }

    /// One `C_EncryptMessage` inside an active message-based operation.
    private func encryptOneMessage(aad: [UInt8], plaintext: UnsafeRawBufferPointer) throws -> AESGCMSealedBox {
        // Zero before the call: a module that ignored the generator and used the IV it was given
        // would leave zeros, which a random 96-bit IV is with probability 2^-96.
        var iv = [UInt8](repeating: 0, count: Session.gcmIVByteCount)
        var tag = [UInt8](repeating: 0, count: Session.gcmTagByteCount)
        // GCM's ciphertext is as long as the plaintext; the tag goes to its own buffer. One byte
        // at least, so no module is handed a null output pointer.
        let capacity = max(plaintext.count, 1)
        var ciphertext = [UInt8](repeating: 0, count: capacity)
        let input = UnsafeMutablePointer(mutating: plaintext.baseAddress?.assumingMemoryBound(to: CK_BYTE.self))
        var aadCopy = aad
        let written: Int = try iv.withUnsafeMutableBufferPointer { ivBuffer in
            try tag.withUnsafeMutableBufferPointer { tagBuffer in
                try aadCopy.withUnsafeMutableBufferPointer { aadBuffer in
                    try ciphertext.withUnsafeMutableBufferPointer { output in
                        // The parameters outlive the call; the module writes the IV and tag through them.
                        var parameters = hsmgw_ck_gcm_message_params(
                            pIv: ivBuffer.baseAddress,
                            ulIvLen: CK_ULONG(ivBuffer.count),
                            ulIvFixedBits: 0,
                            ivGenerator: hsmgw_ckg_generate_random,
                            pTag: tagBuffer.baseAddress,
                            ulTagBits: CK_ULONG(tagBuffer.count * 8)
                        )
                        var length = CK_ULONG(capacity)
                        try call(.encryptMessage, \.C_EncryptMessage) {
                            $0(
                                handle, &parameters, CK_ULONG(MemoryLayout<hsmgw_ck_gcm_message_params>.size),
                                aadBuffer.count == 0 ? nil : aadBuffer.baseAddress, CK_ULONG(aadBuffer.count),
                                input, CK_ULONG(plaintext.count), output.baseAddress, &length)
                        }
                        return try checkReported(.encryptMessage, length, capacity: capacity)
                    }
                }
            }
        }
        guard written == plaintext.count else {
            throw misbehaved(
                .encryptMessage, "reported \(written) bytes of GCM ciphertext, expected \(plaintext.count)")
        }
        guard iv.contains(where: { $0 != 0 }) else {
            throw misbehaved(.encryptMessage, "left the IV unset although asked to generate it")
        }
        return AESGCMSealedBox(iv: iv, ciphertextAndTag: Array(ciphertext.prefix(written)) + tag)
    }
}
