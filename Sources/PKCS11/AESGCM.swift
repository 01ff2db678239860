internal import CPKCS11Shim

/// AES-GCM through the token (`CKM_AES_GCM`), with a 96-bit IV and a 128-bit tag.
extension Session {
    /// IV length: 96 bits, the length NIST SP 800-38D recommends for random IVs.
    public static let gcmIVByteCount = 12
    /// Tag length: 128 bits, the full GCM tag.
    public static let gcmTagByteCount = 16
    /// The largest AAD accepted: far above any encryption context the gateway builds, and a
    /// bound on what one call can make the token process.
    public static let maximumGCMAADByteCount = 64 * 1024
    /// The largest plaintext accepted in one call (1 MiB); the gateway's own payload limit is lower.
    public static let maximumGCMPlaintextByteCount = 1 << 20

    /// Encrypts `plaintext` under `key` with `iv` and `aad`; returns ciphertext followed by the tag.
    ///
    /// The IV must never repeat under one key: use `sealAESGCM`, which draws it from the token's
    /// RNG, unless the caller keeps its own IV discipline.
    public func encryptAESGCM(
        key: ObjectHandle,
        iv: [UInt8],
        aad: [UInt8],
        plaintext: UnsafeRawBufferPointer
    ) throws -> [UInt8] {
        try checkGCMArguments(function: .encryptInit, iv: iv, aad: aad, inputCount: plaintext.count)
        let outputCount = plaintext.count + Session.gcmTagByteCount
        return try withGCMMechanism(iv: iv, aad: aad) { mechanism in
            // The parameters stay alive from C_EncryptInit through C_Encrypt.
            try call(.encryptInit, \.C_EncryptInit) { $0(handle, mechanism, key.rawValue) }
            let input = UnsafeMutablePointer(mutating: plaintext.baseAddress?.assumingMemoryBound(to: CK_BYTE.self))
            // From here on an operation is active. Only success ends it for sure: any failure
            // (CKR_BUFFER_TOO_SMALL keeps it active by definition) leaves the session unusable.
            do {
                return try [UInt8](unsafeUninitializedCapacity: outputCount) { output, initialized in
                    var written = CK_ULONG(outputCount)
                    try call(.encrypt, \.C_Encrypt) {
                        $0(handle, input, CK_ULONG(plaintext.count), output.baseAddress, &written)
                    }
                    let count = try checkReported(.encrypt, written, capacity: outputCount)
                    // GCM output is exactly plaintext plus tag: less would be a truncated ciphertext
                    // that never decrypts again.
                    guard count == outputCount else {
                        throw misbehaved(.encrypt, "reported \(count) bytes of GCM output, expected \(outputCount)")
                    }
                    initialized = count
                }
            } catch let error as PKCS11Error {
                throw unusable(error)
            }
        }
    }

    /// Encrypts bytes held in an array.
    public func encryptAESGCM(key: ObjectHandle, iv: [UInt8], aad: [UInt8], plaintext: [UInt8]) throws -> [UInt8] {
        try plaintext.withUnsafeBytes { try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: $0) }
    }

    /// Encrypts secret bytes (key material).
    public func encryptAESGCM(key: ObjectHandle, iv: [UInt8], aad: [UInt8], plaintext: SecretBytes) throws -> [UInt8] {
        try plaintext.withUnsafeBytes { try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: $0) }
    }

    /// Decrypts ciphertext-and-tag under `key`; any change to ciphertext, tag, IV or AAD fails
    /// (`C_Decrypt` returns an error; SoftHSM2 says `CKR_GENERAL_ERROR`, others
    /// `CKR_ENCRYPTED_DATA_INVALID` or `CKR_AEAD_DECRYPT_FAILED`). No plaintext is returned on
    /// failure. The plaintext comes back in zeroed-on-release memory.
    public func decryptAESGCM(
        key: ObjectHandle,
        iv: [UInt8],
        aad: [UInt8],
        ciphertextAndTag: [UInt8]
    ) throws -> SecretBytes {
        try checkGCMArguments(
            function: .decryptInit,
            iv: iv,
            aad: aad,
            inputCount: ciphertextAndTag.count - Session.gcmTagByteCount
        )
        return try withGCMMechanism(iv: iv, aad: aad) { mechanism in
            try call(.decryptInit, \.C_DecryptInit) { $0(handle, mechanism, key.rawValue) }
            let expected = ciphertextAndTag.count - Session.gcmTagByteCount
            // From here on an operation is active. A ciphertext that does not authenticate ends
            // it (those codes say so); any other failure leaves the session unusable.
            do {
                return try ciphertextAndTag.withUnsafeBufferPointer { input in
                    // C_Decrypt's input pointer is not const in the C API but is only read.
                    let inputPointer = UnsafeMutablePointer(mutating: input.baseAddress)
                    // Some modules want room for the whole input before they know the tag checks out.
                    return try SecretBytes(capacity: input.count) { buffer in
                        var written = CK_ULONG(buffer.count)
                        let output = buffer.baseAddress!.assumingMemoryBound(to: CK_BYTE.self)
                        try call(.decrypt, \.C_Decrypt) {
                            $0(handle, inputPointer, CK_ULONG(input.count), output, &written)
                        }
                        let count = try checkReported(.decrypt, written, capacity: buffer.count)
                        guard count == expected else {
                            throw misbehaved(.decrypt, "reported \(count) bytes of GCM plaintext, expected \(expected)")
                        }
                        return count
                    }
                }
            } catch let error as PKCS11Error where !error.isDecryptAuthenticationFailure {
                throw unusable(error)
            }
        }
    }

    /// A GCM encryption with a fresh IV from the token's RNG.
    public func sealAESGCM(key: ObjectHandle, aad: [UInt8], plaintext: UnsafeRawBufferPointer) throws -> AESGCMSealedBox
    {
        let iv = try generateRandom(count: Session.gcmIVByteCount)
        let sealed = try encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: plaintext)
        return AESGCMSealedBox(iv: iv, ciphertextAndTag: sealed)
    }

    /// Opens a sealed box made by `sealAESGCM` (or any AES-GCM with a 96-bit IV and 128-bit tag).
    public func openAESGCM(key: ObjectHandle, aad: [UInt8], box: AESGCMSealedBox) throws -> SecretBytes {
        try decryptAESGCM(key: key, iv: box.iv, aad: aad, ciphertextAndTag: box.ciphertextAndTag)
    }

    func checkGCMArguments(function: PKCS11Function, iv: [UInt8], aad: [UInt8], inputCount: Int) throws {
        guard iv.count == Session.gcmIVByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM IV must be \(Session.gcmIVByteCount) bytes, got \(iv.count)"
            )
        }
        guard aad.count <= Session.maximumGCMAADByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM AAD of \(aad.count) bytes is over \(Session.maximumGCMAADByteCount)"
            )
        }
        guard inputCount >= 0 else {
            throw PKCS11Error(code: .invalidArgument, function: function, detail: "GCM input shorter than the tag")
        }
        guard inputCount <= Session.maximumGCMPlaintextByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: function,
                detail: "GCM input of \(inputCount) bytes is over \(Session.maximumGCMPlaintextByteCount)"
            )
        }
    }

    /// Builds `CK_GCM_PARAMS` over `iv` and `aad`, which stay alive until `body` returns. The
    /// C struct's pointers are not const, but modules only read through them.
    private func withGCMMechanism<R>(
        iv: [UInt8],
        aad: [UInt8],
        _ body: (UnsafeMutablePointer<CK_MECHANISM>) throws -> R
    ) throws -> R {
        try iv.withUnsafeBufferPointer { ivBuffer in
            try aad.withUnsafeBufferPointer { aadBuffer in
                var parameters = CK_GCM_PARAMS(
                    pIv: UnsafeMutablePointer(mutating: ivBuffer.baseAddress),
                    ulIvLen: CK_ULONG(ivBuffer.count),
                    ulIvBits: CK_ULONG(ivBuffer.count * 8),
                    pAAD: aadBuffer.count == 0 ? nil : UnsafeMutablePointer(mutating: aadBuffer.baseAddress),
                    ulAADLen: CK_ULONG(aadBuffer.count),
                    ulTagBits: CK_ULONG(Session.gcmTagByteCount * 8)
                )
                return try withUnsafeMutablePointer(to: &parameters) { parameters in
                    var mechanism = CK_MECHANISM(
                        mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM),
                        pParameter: UnsafeMutableRawPointer(parameters),
                        ulParameterLen: CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size)
                    )
                    return try body(&mechanism)
                }
            }
        }
    }
}

/// The output of `sealAESGCM`: the IV the token chose and ciphertext followed by the tag.
public struct AESGCMSealedBox: Hashable, Sendable {
    public let iv: [UInt8]
    public let ciphertextAndTag: [UInt8]

    public init(iv: [UInt8], ciphertextAndTag: [UInt8]) {
        self.iv = iv
        self.ciphertextAndTag = ciphertextAndTag
    }
}
